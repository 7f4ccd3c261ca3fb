//! Deskewing of a 28x28 digit by its second moments, as in the classic MNIST preprocessing (LeCun,
//! Bottou, Bengio and Haffner 1998, the "deskewed" rows of their table: "the deskewing of each image by
//! computing the principal axis of the shape ... and shearing it to make it vertical"): with the image's
//! intensity as mass, `alpha = cov(x, y) / var(y)` is the slant of the strokes, and the output samples the
//! input along the shear `x_in = x_out + alpha (y_out - c) + (mx - c)`, `y_in = y_out + (my - c)`, which
//! makes the digit upright and moves its centre of mass `(mx, my)` to the image centre `c` (bilinear,
//! zero outside).

use crate::{pixel_or_zero, IMAGE_PIXELS, IMAGE_SIDE};

/// Where the centre of mass is moved to: the image centre, between pixels 13 and 14 of each axis.
pub const DESKEW_CENTRE: f32 = (IMAGE_SIDE as f32 - 1.0) / 2.0;

/// A shape whose variance along y is under this share of its mass counts as flat: its slant is
/// `cov(x, y)` over this floor instead (then clamped to [`MAX_SLANT`]).
pub const FLAT_SHAPE: f64 = 1e-9;

/// The largest slant corrected (in pixels of x per pixel of y); a steeper estimate comes from a shape
/// with almost no height (a dash) and is clamped rather than smeared across the image.
pub const MAX_SLANT: f32 = 1.0;

/// The slant and centre of mass of a 28x28 image (`alpha`, `mx`, `my`); `None` for an image without
/// mass. The slant is `cov(x, y) / max(var(y), FLAT_SHAPE * mass)`, clamped to [`MAX_SLANT`].
pub fn slant(image: &[f32]) -> Option<(f32, f32, f32)> {
    let image = &image[..IMAGE_PIXELS];
    let (mut m, mut sx, mut sy) = (0f64, 0f64, 0f64);
    for (i, &v) in image.iter().enumerate() {
        let (x, y) = ((i % IMAGE_SIDE) as f64, (i / IMAGE_SIDE) as f64);
        m += v as f64;
        sx += x * v as f64;
        sy += y * v as f64;
    }
    if m <= 0.0 {
        return None;
    }
    let (mx, my) = (sx / m, sy / m);
    let (mut cxy, mut cyy) = (0f64, 0f64);
    for (i, &v) in image.iter().enumerate() {
        let (dx, dy) = ((i % IMAGE_SIDE) as f64 - mx, (i / IMAGE_SIDE) as f64 - my);
        cxy += dx * dy * v as f64;
        cyy += dy * dy * v as f64;
    }
    // A shape with (almost) no height has no slant to speak of: its estimate is clamped below.
    let alpha = cxy / cyy.max(FLAT_SHAPE * m);
    Some((
        (alpha as f32).clamp(-MAX_SLANT, MAX_SLANT),
        mx as f32,
        my as f32,
    ))
}

/// Writes the deskewed `src` (28x28, any non-negative intensities) into `dst`; an image without mass is
/// copied as it is.
pub fn deskew_into(src: &[f32], dst: &mut [f32]) {
    let (src, dst) = (&src[..IMAGE_PIXELS], &mut dst[..IMAGE_PIXELS]);
    let Some((alpha, mx, my)) = slant(src) else {
        dst.copy_from_slice(src);
        return;
    };
    let c = DESKEW_CENTRE;
    let at = |x: i32, y: i32| pixel_or_zero(src, x, y);
    for (i, d) in dst.iter_mut().enumerate() {
        let (xo, yo) = ((i % IMAGE_SIDE) as f32, (i / IMAGE_SIDE) as f32);
        let xi = xo + alpha * (yo - c) + (mx - c);
        let yi = yo + (my - c);
        let (x0, y0) = (xi.floor(), yi.floor());
        let (fx, fy) = (xi - x0, yi - y0);
        let (x0, y0) = (x0 as i32, y0 as i32);
        *d = (1.0 - fy) * ((1.0 - fx) * at(x0, y0) + fx * at(x0 + 1, y0))
            + fy * ((1.0 - fx) * at(x0, y0 + 1) + fx * at(x0 + 1, y0 + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bar two pixels wide from (x0, 4) to (x0 + 20 * slope, 23).
    fn slanted_bar(x0: f32, slope: f32) -> Vec<f32> {
        let mut img = vec![0f32; IMAGE_PIXELS];
        for y in 4..24 {
            let x = (x0 + slope * (y - 4) as f32).round() as usize;
            img[y * IMAGE_SIDE + x] = 1.0;
            img[y * IMAGE_SIDE + x + 1] = 1.0;
        }
        img
    }

    #[test]
    fn a_slanted_bar_comes_out_upright_and_centred() {
        let img = slanted_bar(6.0, 0.5);
        let (alpha, _, _) = slant(&img).unwrap();
        assert!((alpha - 0.5).abs() < 0.05, "{alpha}");
        let mut out = vec![0f32; IMAGE_PIXELS];
        deskew_into(&img, &mut out);
        let (alpha, mx, my) = slant(&out).unwrap();
        assert!(alpha.abs() < 0.05, "upright: {alpha}");
        assert!(
            (mx - 13.5).abs() < 0.3 && (my - 13.5).abs() < 0.3,
            "centred: {mx} {my}"
        );
        // Mass is kept (nothing falls outside).
        let (a, b): (f32, f32) = (img.iter().sum(), out.iter().sum());
        assert!((a - b).abs() < 0.05 * a, "{a} {b}");
    }

    #[test]
    fn an_upright_centred_shape_is_left_alone_and_a_blank_is_copied() {
        // Symmetric about the centre (13.5, 13.5): no slant, no shift.
        let mut img = vec![0f32; IMAGE_PIXELS];
        for y in 6..22 {
            for x in 11..17 {
                img[y * IMAGE_SIDE + x] = 0.5;
            }
        }
        let mut out = vec![f32::NAN; IMAGE_PIXELS];
        deskew_into(&img, &mut out);
        for (a, b) in img.iter().zip(&out) {
            assert!((a - b).abs() < 1e-5);
        }
        let blank = vec![0f32; IMAGE_PIXELS];
        deskew_into(&blank, &mut out);
        assert_eq!(out, blank);
    }

    #[test]
    fn a_flat_dash_has_its_slant_clamped() {
        let mut img = vec![0f32; IMAGE_PIXELS];
        img[14 * IMAGE_SIDE + 10] = 1.0;
        img[14 * IMAGE_SIDE + 11] = 1.0;
        img[15 * IMAGE_SIDE + 18] = 1.0;
        let (alpha, _, _) = slant(&img).unwrap();
        assert!(alpha.abs() <= MAX_SLANT);
        let mut out = vec![0f32; IMAGE_PIXELS];
        deskew_into(&img, &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
    }
}

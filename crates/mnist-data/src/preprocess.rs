//! Any picture of a digit -> the 28x28 MNIST form ([`to_mnist`]): the one preprocessing path of `predict`,
//! the pretrained-model API and the draw-a-digit server.
//!
//! MNIST was made by fitting each (anti-aliased, grey) digit into a 20x20 box, keeping its aspect ratio, and
//! placing that box in a 28x28 field so that the centre of mass of the ink lies at the field's centre. Ink
//! is light (255) on a dark (0) background. [`to_mnist`] does the same to an arbitrary picture: grey, inverted
//! when it is dark on light (decided by the border), background removed, cropped to the ink, fitted into
//! 20x20 and centred by centre of mass.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage};

use crate::{IMAGE_PIXELS, IMAGE_SIDE};

/// The side of the box a digit is fitted into, as in MNIST.
pub const FIT_SIDE: u32 = 20;

/// Why an image file could not be turned into an MNIST image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a PNG or JPEG image, or it is damaged.
    #[error("{}: not a readable PNG or JPEG image: {reason}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// Bytes that are not a PNG or JPEG image (no file involved).
    #[error("not a readable PNG or JPEG image: {reason}")]
    Undecodable {
        /// What the decoder said.
        reason: String,
    },
    /// The image has no pixels.
    #[error("the image is empty ({width}x{height})")]
    Empty {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The image is (nearly) uniform: there is no digit to classify.
    #[error("the image is blank: no ink stands out from the background (levels {low}..={high})")]
    Blank {
        /// Darkest grey level.
        low: u8,
        /// Lightest grey level.
        high: u8,
    },
    /// A file-level error wrapping the cause, naming the file.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<ImageError>,
    },
}

/// Reads an image file (PNG or JPEG, any size, grey or colour; the format is taken from the content, not the
/// name) and converts it with [`to_mnist`].
pub fn load_mnist_image(path: &Path) -> Result<Vec<u8>, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let img = image::load_from_memory(&bytes).map_err(|e| ImageError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    to_mnist(&img).map_err(|e| ImageError::InFile {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// Decodes PNG or JPEG bytes (the format is taken from the content) and converts the picture with
/// [`to_mnist`]: what a server does with an uploaded image.
pub fn decode_mnist_image(bytes: &[u8]) -> Result<Vec<u8>, ImageError> {
    let img = image::load_from_memory(bytes).map_err(|e| ImageError::Undecodable {
        reason: e.to_string(),
    })?;
    to_mnist(&img)
}

/// Grey levels of `img`: transparent pixels are composited over white (a drawing on a transparent canvas is
/// dark ink on nothing).
fn to_grey(img: &DynamicImage) -> GrayImage {
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let (w, h) = rgba.dimensions();
        GrayImage::from_fn(w, h, |x, y| {
            let p = rgba.get_pixel(x, y).0;
            let a = p[3] as f32 / 255.0;
            let l = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
            image::Luma([(a * l + (1.0 - a) * 255.0).round().clamp(0.0, 255.0) as u8])
        })
    } else {
        img.to_luma8()
    }
}

/// The median of the pixels on the outer frame of `img` (a frame about 1/20 of the side thick, at least 1
/// pixel): the background level.
fn border_median(img: &GrayImage) -> u8 {
    let (w, h) = img.dimensions();
    let t = (w.min(h) / 20).max(1);
    let mut values: Vec<u8> = img
        .enumerate_pixels()
        .filter(|(x, y, _)| *x < t || *y < t || *x + t >= w || *y + t >= h)
        .map(|(_, _, p)| p.0[0])
        .collect();
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Converts any picture of one digit into MNIST's form: 784 grey levels (row-major 28x28), light ink on
/// black, the digit fitted into 20x20 (aspect ratio kept) and its centre of mass at the centre.
///
/// Steps: grey (alpha over white); invert when the border is lighter than mid-grey (dark on light);
/// subtract the background (the border's median) and stretch the ink to 0..=255, dropping faint noise
/// (below 1/8 of the full ink level); crop to the ink; resize so the longer side is 20 pixels (triangle
/// filter, which anti-aliases when shrinking); paste into 28x28 with the centre of mass at (14, 14).
///
/// Errors: an empty image, or a blank one (no ink stands out from the background).
pub fn to_mnist(img: &DynamicImage) -> Result<Vec<u8>, ImageError> {
    let (width, height) = (img.width(), img.height());
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    let mut grey = to_grey(img);
    if border_median(&grey) > 127 {
        image::imageops::invert(&mut grey);
    }
    let background = border_median(&grey) as f32;
    let (low, high) = grey
        .pixels()
        .fold((255u8, 0u8), |(lo, hi), p| (lo.min(p.0[0]), hi.max(p.0[0])));
    let peak = high as f32;
    // The ink must stand out from the background by a clear margin.
    if peak - background < 32.0 {
        return Err(ImageError::Blank { low, high });
    }
    let span = peak - background;
    let cutoff = 255.0 / 8.0;
    let ink = GrayImage::from_fn(width, height, |x, y| {
        let v = ((grey.get_pixel(x, y).0[0] as f32 - background) / span * 255.0).clamp(0.0, 255.0);
        image::Luma([if v < cutoff { 0 } else { v.round() as u8 }])
    });

    // Crop to the ink's bounding box.
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
    for (x, y, p) in ink.enumerate_pixels() {
        if p.0[0] > 0 {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    if x0 == u32::MAX {
        return Err(ImageError::Blank { low, high });
    }
    let (cw, ch) = (x1 - x0 + 1, y1 - y0 + 1);
    let crop = image::imageops::crop_imm(&ink, x0, y0, cw, ch).to_image();

    // Fit the longer side into 20 pixels, keeping the aspect ratio.
    let scale = FIT_SIDE as f32 / cw.max(ch) as f32;
    let fw = ((cw as f32 * scale).round() as u32).clamp(1, FIT_SIDE);
    let fh = ((ch as f32 * scale).round() as u32).clamp(1, FIT_SIDE);
    let fitted = image::imageops::resize(&crop, fw, fh, FilterType::Triangle);

    // Centre of mass, in pixel-centre coordinates.
    let (mut mass, mut mx, mut my) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y, p) in fitted.enumerate_pixels() {
        let v = p.0[0] as f64;
        mass += v;
        mx += v * (x as f64 + 0.5);
        my += v * (y as f64 + 0.5);
    }
    let (cx, cy) = if mass > 0.0 {
        (mx / mass, my / mass)
    } else {
        (fw as f64 / 2.0, fh as f64 / 2.0)
    };
    let centre = IMAGE_SIDE as f64 / 2.0;
    let ox = (centre - cx).round() as i64;
    let oy = (centre - cy).round() as i64;
    let side = IMAGE_SIDE as i64;
    let mut out = vec![0u8; IMAGE_PIXELS];
    for (x, y, p) in fitted.enumerate_pixels() {
        let (tx, ty) = (x as i64 + ox, y as i64 + oy);
        if (0..side).contains(&tx) && (0..side).contains(&ty) {
            out[(ty * side + tx) as usize] = p.0[0];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    /// A light "7"-like stroke pattern on black: a bar on top and a diagonal, in a `w` x `h` canvas.
    fn seven(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let top = (0.2..0.3).contains(&fy) && (0.3..0.7).contains(&fx);
            let diag = (0.2..0.8).contains(&fy) && ((0.7 - (fy - 0.2) * 0.5) - fx).abs() < 0.05;
            Luma([if top || diag { 255 } else { 0 }])
        })
    }

    fn bbox(px: &[u8]) -> (usize, usize, usize, usize) {
        let (mut x0, mut y0, mut x1, mut y1) = (28, 28, 0, 0);
        for y in 0..28 {
            for x in 0..28 {
                if px[y * 28 + x] > 0 {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
            }
        }
        (x0, y0, x1, y1)
    }

    fn centre_of_mass(px: &[u8]) -> (f64, f64) {
        let (mut m, mut mx, mut my) = (0.0, 0.0, 0.0);
        for y in 0..28 {
            for x in 0..28 {
                let v = px[y * 28 + x] as f64;
                m += v;
                mx += v * (x as f64 + 0.5);
                my += v * (y as f64 + 0.5);
            }
        }
        (mx / m, my / m)
    }

    #[test]
    fn fits_into_20_by_20_and_centres_the_mass() {
        for (w, h) in [(56, 56), (100, 80), (28, 28), (300, 200)] {
            let out = to_mnist(&DynamicImage::ImageLuma8(seven(w, h))).unwrap();
            assert_eq!(out.len(), 784);
            let (x0, y0, x1, y1) = bbox(&out);
            let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
            assert!(
                bw.max(bh) <= 21 && bw.max(bh) >= 19,
                "{w}x{h}: ink box {bw}x{bh}"
            );
            let (cx, cy) = centre_of_mass(&out);
            assert!(
                (cx - 14.0).abs() <= 1.0 && (cy - 14.0).abs() <= 1.0,
                "{w}x{h}: centre of mass ({cx:.2}, {cy:.2})"
            );
            assert!(
                out.iter().any(|&v| v >= 200),
                "{w}x{h}: the strokes lost their full intensity"
            );
        }
    }

    #[test]
    fn dark_on_light_is_inverted_to_light_on_dark() {
        let light = seven(60, 60);
        let mut dark = light.clone();
        image::imageops::invert(&mut dark);
        let a = to_mnist(&DynamicImage::ImageLuma8(light)).unwrap();
        let b = to_mnist(&DynamicImage::ImageLuma8(dark)).unwrap();
        assert_eq!(a, b);
        // The corners are background: black.
        assert_eq!((b[0], b[27], b[783]), (0, 0, 0));
    }

    #[test]
    fn colour_and_grey_give_the_same_result() {
        let grey = seven(40, 50);
        // Black ink on a white page, in RGB.
        let rgb = RgbImage::from_fn(40, 50, |x, y| {
            let v = 255 - grey.get_pixel(x, y).0[0];
            Rgb([v, v, v])
        });
        let a = to_mnist(&DynamicImage::ImageLuma8(grey)).unwrap();
        let b = to_mnist(&DynamicImage::ImageRgb8(rgb)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_grey_background_is_removed() {
        // Ink 230 on a background of 60 with the same shape: the background becomes 0, the ink bright.
        let img = GrayImage::from_fn(64, 64, |x, y| {
            Luma([if seven(64, 64).get_pixel(x, y).0[0] > 0 {
                230
            } else {
                60
            }])
        });
        let out = to_mnist(&DynamicImage::ImageLuma8(img)).unwrap();
        assert_eq!(out[0], 0);
        assert!(out.iter().copied().max().unwrap() >= 200);
    }

    #[test]
    fn an_mnist_sized_digit_keeps_its_shape() {
        // A 20x20 block of ink centred in 28x28 is already in MNIST form.
        let img = GrayImage::from_fn(28, 28, |x, y| {
            Luma([if (4..24).contains(&x) && (4..24).contains(&y) {
                255
            } else {
                0
            }])
        });
        let out = to_mnist(&DynamicImage::ImageLuma8(img.clone())).unwrap();
        assert_eq!(out, img.into_raw());
    }

    #[test]
    fn blank_and_empty_images_are_errors() {
        let blank = DynamicImage::ImageLuma8(GrayImage::from_pixel(30, 30, Luma([200])));
        assert!(matches!(to_mnist(&blank), Err(ImageError::Blank { .. })));
        let empty = DynamicImage::ImageLuma8(GrayImage::new(0, 5));
        assert!(matches!(
            to_mnist(&empty),
            Err(ImageError::Empty {
                width: 0,
                height: 5
            })
        ));
    }

    #[test]
    fn unreadable_and_non_image_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.png");
        std::fs::write(&text, "not an image").unwrap();
        let err = load_mnist_image(&text).unwrap_err();
        assert!(matches!(err, ImageError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("notes.png"), "{err}");
        let missing = dir.path().join("missing.png");
        let err = load_mnist_image(&missing).unwrap_err();
        assert!(matches!(err, ImageError::Read { .. }), "{err}");
        // A real PNG round-trips through the file.
        let png = dir.path().join("seven.png");
        seven(50, 50).save(&png).unwrap();
        let out = load_mnist_image(&png).unwrap();
        assert_eq!(
            out,
            to_mnist(&DynamicImage::ImageLuma8(seven(50, 50))).unwrap()
        );
    }
}

//! Stroke-thickness augmentation: each training image's strokes made thicker or thinner by a random
//! amount, a change of pen that the affine warp does not make (it scales a stroke's width only with the
//! whole digit). The "thickness" perturbation of Bengio et al., "Deep Learners Benefit More from
//! Out-of-Distribution Examples" (AISTATS 2011), in a continuous form: a grayscale dilation (the largest
//! value of each pixel and its four neighbours) or erosion (the smallest) of the warped image, blended
//! with it by a share drawn per image.

use rand::Rng;

use crate::error::{DataError, Result};
use crate::{pixel_or_zero, IMAGE_PIXELS, IMAGE_SIDE};

/// Stroke thickness: each image is blended with its dilation or erosion by a share `t` drawn uniformly in
/// `[-max, max]` (`t > 0` thickens, `t < 0` thins; `|t| = 1` is the whole dilation or erosion by one
/// pixel's cross).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThicknessConfig {
    /// The largest share, in `[0, 1]` (0 = off).
    pub max: f32,
}

impl ThicknessConfig {
    /// Thickness changes of up to `max`.
    pub fn new(max: f32) -> Self {
        Self { max }
    }

    /// True when no image changes (`max == 0`): nothing is drawn then.
    pub fn is_identity(&self) -> bool {
        self.max == 0.0
    }

    /// Rejects a share outside `[0, 1]` or not finite.
    pub fn validate(&self) -> Result<()> {
        if self.max.is_finite() && (0.0..=1.0).contains(&self.max) {
            Ok(())
        } else {
            Err(DataError::Config(format!(
                "stroke thickness: max {} must be in [0, 1]",
                self.max
            )))
        }
    }

    /// Draws one share `t` (one uniform) and applies it to `image` (28x28, values in `[0, 1]`).
    pub fn apply(&self, image: &mut [f32], rng: &mut impl Rng) {
        let u: f32 = rng.random();
        thicken(image, self.max * (2.0 * u - 1.0));
    }
}

/// Blends the 28x28 `image` with its dilation (`t > 0`) or erosion (`t < 0`) by the share `|t|`, each by
/// the cross of a pixel and its four neighbours; pixels outside the image count as background (0).
pub fn thicken(image: &mut [f32], t: f32) {
    debug_assert_eq!(image.len(), IMAGE_PIXELS);
    if t == 0.0 {
        return;
    }
    let src: [f32; IMAGE_PIXELS] = image.try_into().expect("a 28x28 image");
    let share = t.abs();
    let grow = t > 0.0;
    for (i, out) in image.iter_mut().enumerate() {
        let (x, y) = ((i % IMAGE_SIDE) as i32, (i / IMAGE_SIDE) as i32);
        let ring =
            [(0, -1), (0, 1), (-1, 0), (1, 0)].map(|(dx, dy)| pixel_or_zero(&src, x + dx, y + dy));
        let c = src[i];
        let m = if grow {
            ring.iter().fold(c, |a, &b| a.max(b))
        } else {
            ring.iter().fold(c, |a, &b| a.min(b))
        };
        *out = c + share * (m - c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A vertical bar 2 pixels wide, columns 13-14, rows 5-22.
    fn bar() -> Vec<f32> {
        let mut im = vec![0f32; IMAGE_PIXELS];
        for y in 5..23 {
            im[y * IMAGE_SIDE + 13] = 1.0;
            im[y * IMAGE_SIDE + 14] = 1.0;
        }
        im
    }

    fn ink(im: &[f32]) -> f32 {
        im.iter().sum()
    }

    #[test]
    fn a_full_dilation_widens_a_bar_by_a_pixel_each_side() {
        let mut im = bar();
        thicken(&mut im, 1.0);
        let row = &im[10 * IMAGE_SIDE..11 * IMAGE_SIDE];
        assert_eq!(&row[11..17], &[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        // The ends grow by one row too (the cross reaches up and down).
        assert_eq!(im[4 * IMAGE_SIDE + 13], 1.0);
        assert_eq!(im[3 * IMAGE_SIDE + 13], 0.0);
    }

    #[test]
    fn a_full_erosion_removes_a_two_pixel_bar_and_a_half_one_halves_it() {
        let mut gone = bar();
        thicken(&mut gone, -1.0);
        assert_eq!(ink(&gone), 0.0);
        let mut half = bar();
        thicken(&mut half, -0.5);
        assert!((ink(&half) - ink(&bar()) / 2.0).abs() < 1e-4);
    }

    #[test]
    fn shares_blend_between_the_image_and_its_dilation() {
        let (base, mut full, mut part) = (bar(), bar(), bar());
        thicken(&mut full, 1.0);
        thicken(&mut part, 0.25);
        for ((b, f), p) in base.iter().zip(&full).zip(&part) {
            assert!((p - (b + 0.25 * (f - b))).abs() < 1e-6);
        }
        let mut same = bar();
        thicken(&mut same, 0.0);
        assert_eq!(same, base);
    }

    #[test]
    fn edges_count_as_background() {
        let mut im = vec![1f32; IMAGE_PIXELS];
        thicken(&mut im, -1.0);
        // The border pixels have a neighbour outside; the inside stays.
        assert_eq!(im[0], 0.0);
        assert_eq!(im[IMAGE_SIDE + 1], 1.0);
        assert_eq!(im[IMAGE_PIXELS - 1], 0.0);
    }

    #[test]
    fn draws_are_uniform_in_the_range_and_seeded() {
        let cfg = ThicknessConfig::new(0.5);
        let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(3), ChaCha8Rng::seed_from_u64(3));
        let (mut thicker, mut thinner) = (0, 0);
        for _ in 0..200 {
            let (mut x, mut y) = (bar(), bar());
            cfg.apply(&mut x, &mut a);
            cfg.apply(&mut y, &mut b);
            assert_eq!(x, y);
            let d = ink(&x) - ink(&bar());
            // At most half of the full change either way (the full dilation adds 2 * 18 + 2 * 2 = 40).
            assert!(d.abs() <= 0.5 * 40.0 + 1e-3, "{d}");
            if d > 0.0 {
                thicker += 1;
            } else if d < 0.0 {
                thinner += 1;
            }
        }
        assert!(thicker > 70 && thinner > 70, "{thicker} / {thinner}");
    }

    #[test]
    fn shares_outside_zero_to_one_are_refused() {
        for bad in [-0.1, 1.5, f32::NAN] {
            let e = ThicknessConfig::new(bad)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains("stroke thickness"), "{e}");
        }
        assert!(ThicknessConfig::new(0.0).is_identity());
        ThicknessConfig::new(1.0).validate().unwrap();
    }
}

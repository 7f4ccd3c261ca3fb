//! Augmentations that take pixels away from an image or mix two images of a batch, beside the warp of
//! [`crate::augment_into`]:
//!
//! - random erasing ([`EraseConfig`]): with probability `p`, one rectangle of an image set to 0, the
//!   background (Zhong, Zheng, Kang, Li and Yang, "Random Erasing Data Augmentation", AAAI 2020; the
//!   draws of torchvision's `RandomErasing`: area a uniform share of the image, aspect ratio log-uniform,
//!   up to ten tries for a rectangle that fits, else nothing erased);
//! - mixup and CutMix ([`MixConfig`]): each image of a batch mixed with a partner drawn by a random
//!   permutation of the batch, with one share `lam ~ Beta(alpha, alpha)` per batch, either blended
//!   (`lam x + (1 - lam) x[partner]`; Zhang, Cisse, Dauphin and Lopez-Paz, "mixup: Beyond Empirical
//!   Risk Minimization", ICLR 2018) or as a rectangle of the partner pasted in (area `1 - lam`, clipped
//!   to the image, `lam` then set to the share actually kept; Yun et al., "CutMix", ICCV 2019). The loss
//!   weighs the two labels by `lam` and `1 - lam` ([`BatchMix`]).
//!
//! Each draws from an rng of its own ([`crate::Batcher`]), so turning one on leaves the shuffle and the
//! warps of a run as they were: a candidate with it is paired image for image with a run without it.

use rand::Rng;
use rand_distr::{Beta, Distribution};

use crate::error::{DataError, Result};
use crate::{IMAGE_PIXELS, IMAGE_SIDE};

/// The erased rectangle's default share of the image (torchvision's); the smallest share is also the
/// least `--erase-max-area` may set.
pub const ERASE_AREA: (f32, f32) = (0.02, 0.33);

fn default_area() -> (f32, f32) {
    ERASE_AREA
}

fn default_aspect() -> (f32, f32) {
    (0.3, 3.3)
}

/// Random erasing of one rectangle per image, with torchvision's defaults for the shape.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EraseConfig {
    /// The chance that an image has a rectangle erased, in `[0, 1]` (0 = off).
    pub probability: f32,
    /// The rectangle's area as a share of the image, uniform in this range (default `(0.02, 0.33)`).
    #[serde(default = "default_area")]
    pub area: (f32, f32),
    /// Height over width, log-uniform in this range (default `(0.3, 3.3)`).
    #[serde(default = "default_aspect")]
    pub aspect: (f32, f32),
}

/// One erased rectangle: rows `top..top + height`, columns `left..left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl Rect {
    fn fill(&self, image: &mut [f32], value: impl Fn(usize) -> f32) {
        for y in self.top..self.top + self.height {
            for x in self.left..self.left + self.width {
                let i = y * IMAGE_SIDE + x;
                image[i] = value(i);
            }
        }
    }

    /// Pixels covered.
    pub fn area(&self) -> usize {
        self.height * self.width
    }
}

impl EraseConfig {
    /// Erasing with probability `p` and the default shapes.
    pub fn new(probability: f32) -> Self {
        Self {
            probability,
            area: default_area(),
            aspect: default_aspect(),
        }
    }

    /// True when nothing is ever erased (`p == 0`): nothing is drawn then.
    pub fn is_identity(&self) -> bool {
        self.probability == 0.0
    }

    /// Rejects a probability outside `[0, 1]`, an area range outside `(0, 1]` or reversed, an aspect
    /// range not positive or reversed, and anything not finite.
    pub fn validate(&self) -> Result<()> {
        let EraseConfig {
            probability: p,
            area: (a0, a1),
            aspect: (r0, r1),
        } = *self;
        let problem = if !(p.is_finite() && (0.0..=1.0).contains(&p)) {
            Some(format!("probability {p} must be in [0, 1]"))
        } else if !(a0.is_finite() && a1.is_finite() && a0 > 0.0 && a0 <= a1 && a1 <= 1.0) {
            Some(format!(
                "area ({a0}, {a1}) must satisfy 0 < min <= max <= 1"
            ))
        } else if !(r0.is_finite() && r1.is_finite() && r0 > 0.0 && r0 <= r1) {
            Some(format!("aspect ({r0}, {r1}) must satisfy 0 < min <= max"))
        } else {
            None
        };
        match problem {
            Some(p) => Err(DataError::Config(format!("random erasing: {p}"))),
            None => Ok(()),
        }
    }

    /// Draws whether and where to erase: one uniform for the coin, then for each try (at most ten) two
    /// uniforms for the shape and, once a shape fits, two for its place (torchvision's order).
    pub fn sample(&self, rng: &mut impl Rng) -> Option<Rect> {
        if rng.random::<f32>() >= self.probability {
            return None;
        }
        let side = IMAGE_SIDE as f32;
        let (log_r0, log_r1) = (self.aspect.0.ln(), self.aspect.1.ln());
        for _ in 0..10 {
            let area =
                side * side * (self.area.0 + rng.random::<f32>() * (self.area.1 - self.area.0));
            let aspect = (log_r0 + rng.random::<f32>() * (log_r1 - log_r0)).exp();
            let height = (area * aspect).sqrt().round() as usize;
            let width = (area / aspect).sqrt().round() as usize;
            if height == 0 || width == 0 || height >= IMAGE_SIDE || width >= IMAGE_SIDE {
                continue;
            }
            let top = rng.random_range(0..=IMAGE_SIDE - height);
            let left = rng.random_range(0..=IMAGE_SIDE - width);
            return Some(Rect {
                top,
                left,
                height,
                width,
            });
        }
        None
    }

    /// Erases (sets to 0) one drawn rectangle of the 28x28 `image`, or nothing; returns what it erased.
    pub fn apply(&self, image: &mut [f32], rng: &mut impl Rng) -> Option<Rect> {
        let rect = self.sample(rng)?;
        rect.fill(&mut image[..IMAGE_PIXELS], |_| 0.0);
        Some(rect)
    }
}

/// How two images of a batch are mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixKind {
    /// Every pixel blended, `lam x + (1 - lam) x[partner]`.
    Mixup,
    /// A rectangle of the partner pasted in.
    Cutmix,
}

/// Mixing the images of each training batch in pairs ([`MixKind`]), one share per batch.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MixConfig {
    /// Blend or paste.
    pub kind: MixKind,
    /// The share of an image's own label is drawn from `Beta(alpha, alpha)` (`> 0`; 1 = uniform, small
    /// values keep most images almost unmixed: mixup's authors used 0.2-0.4, CutMix's 1).
    pub alpha: f32,
}

/// What mixing did to a batch: image `i` holds `lam` of itself and `1 - lam` of image `partner[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchMix {
    /// The share of each image's own label in its target.
    pub lam: f32,
    /// For each image, the index (within the batch) of the image mixed into it.
    pub partner: Vec<usize>,
}

impl MixConfig {
    /// Rejects a non-positive or non-finite `alpha`.
    pub fn validate(&self) -> Result<()> {
        if self.alpha.is_finite() && self.alpha > 0.0 {
            Ok(())
        } else {
            Err(DataError::Config(format!(
                "{:?}: alpha {} must be finite and above 0",
                self.kind, self.alpha
            )))
        }
    }

    /// Mixes the `b` images of `pixels` (`b * 784`, row-major 28x28 each) in place. Draws `lam` (Beta),
    /// the partners (a uniformly random permutation of the batch, Fisher-Yates) and, for CutMix, the
    /// rectangle's centre (two uniforms), in that order.
    pub fn apply(&self, pixels: &mut [f32], rng: &mut impl Rng) -> Result<BatchMix> {
        let b = pixels.len() / IMAGE_PIXELS;
        self.validate()?;
        let beta = Beta::new(self.alpha, self.alpha)
            .map_err(|e| DataError::Config(format!("{:?}: {e}", self.kind)))?;
        let mut lam: f32 = beta.sample(rng);
        let partner = crate::permutation(b, rng);
        let source = pixels.to_vec();
        let image = |i: usize| &source[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS];
        match self.kind {
            MixKind::Mixup => {
                for (i, dst) in pixels.chunks_exact_mut(IMAGE_PIXELS).enumerate() {
                    for (d, &o) in dst.iter_mut().zip(image(partner[i])) {
                        *d = lam * *d + (1.0 - lam) * o;
                    }
                }
            }
            MixKind::Cutmix => {
                let rect = cut_rect(1.0 - lam, rng);
                for (i, dst) in pixels.chunks_exact_mut(IMAGE_PIXELS).enumerate() {
                    let other = image(partner[i]);
                    rect.fill(dst, |p| other[p]);
                }
                lam = (IMAGE_PIXELS - rect.area()) as f32 / IMAGE_PIXELS as f32;
            }
        }
        Ok(BatchMix { lam, partner })
    }
}

/// CutMix's box: sides `28 sqrt(share)` about a uniformly drawn centre, clipped to the image (so the
/// area may be smaller than `share`; the caller recomputes the share from the box).
fn cut_rect(share: f32, rng: &mut impl Rng) -> Rect {
    let n = IMAGE_SIDE as f32;
    let side = n * share.clamp(0.0, 1.0).sqrt();
    let (cy, cx): (f32, f32) = (rng.random::<f32>() * n, rng.random::<f32>() * n);
    let clip = |v: f32| v.round().clamp(0.0, n) as usize;
    let (top, bottom) = (clip(cy - side / 2.0), clip(cy + side / 2.0));
    let (left, right) = (clip(cx - side / 2.0), clip(cx + side / 2.0));
    Rect {
        top,
        left,
        height: bottom - top,
        width: right - left,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn ones() -> Vec<f32> {
        vec![1.0; IMAGE_PIXELS]
    }

    #[test]
    fn erasing_zeroes_one_rectangle_of_the_drawn_shape_and_nothing_else() {
        let cfg = EraseConfig::new(1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut erased = 0;
        for _ in 0..500 {
            let mut img = ones();
            let Some(r) = cfg.apply(&mut img, &mut rng) else {
                continue;
            };
            erased += 1;
            assert!(r.top + r.height <= IMAGE_SIDE && r.left + r.width <= IMAGE_SIDE);
            let share = r.area() as f32 / IMAGE_PIXELS as f32;
            // Rounding each side moves the area by up to about a side's length.
            assert!(share > 0.005 && share < 0.42, "{r:?}");
            for y in 0..IMAGE_SIDE {
                for x in 0..IMAGE_SIDE {
                    let inside = (r.top..r.top + r.height).contains(&y)
                        && (r.left..r.left + r.width).contains(&x);
                    assert_eq!(img[y * IMAGE_SIDE + x], if inside { 0.0 } else { 1.0 });
                }
            }
        }
        // Every coin says erase; only shapes that fit in none of ten tries are skipped (rare).
        assert!(erased > 480, "{erased}");
    }

    #[test]
    fn erasing_follows_its_probability_and_its_seed() {
        let cfg = EraseConfig::new(0.5);
        let draws = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..2000).map(|_| cfg.sample(&mut rng)).collect::<Vec<_>>()
        };
        let a = draws(1);
        assert_eq!(a, draws(1));
        assert_ne!(a, draws(2));
        let hits = a.iter().filter(|r| r.is_some()).count();
        assert!((900..1100).contains(&hits), "{hits} of 2000 at p = 0.5");
        // p = 0 erases nothing, and says it is the identity.
        let off = EraseConfig::new(0.0);
        assert!(off.is_identity());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!((0..100).all(|_| off.sample(&mut rng).is_none()));
    }

    #[test]
    fn bad_erasing_settings_are_refused_by_name() {
        for (cfg, needle) in [
            (EraseConfig::new(1.5), "probability 1.5"),
            (EraseConfig::new(f32::NAN), "probability NaN"),
            (
                EraseConfig {
                    area: (0.3, 0.1),
                    ..EraseConfig::new(0.5)
                },
                "area (0.3, 0.1)",
            ),
            (
                EraseConfig {
                    area: (0.0, 0.1),
                    ..EraseConfig::new(0.5)
                },
                "area (0, 0.1)",
            ),
            (
                EraseConfig {
                    aspect: (0.0, 1.0),
                    ..EraseConfig::new(0.5)
                },
                "aspect (0, 1)",
            ),
        ] {
            let err = cfg.validate().expect_err("invalid").to_string();
            assert!(
                err.contains("random erasing") && err.contains(needle),
                "{err}"
            );
        }
        EraseConfig::new(0.5).validate().unwrap();
    }

    /// Images whose pixels all hold their own index, so a mixed pixel says where it came from.
    fn indexed(b: usize) -> Vec<f32> {
        (0..b * IMAGE_PIXELS)
            .map(|i| (i / IMAGE_PIXELS) as f32)
            .collect()
    }

    #[test]
    fn mixup_blends_each_image_with_its_partner_by_lam() {
        let cfg = MixConfig {
            kind: MixKind::Mixup,
            alpha: 0.4,
        };
        let b = 9;
        let mut px = indexed(b);
        let mix = cfg
            .apply(&mut px, &mut ChaCha8Rng::seed_from_u64(5))
            .unwrap();
        assert!((0.0..=1.0).contains(&mix.lam));
        let mut sorted = mix.partner.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..b).collect::<Vec<_>>(), "a permutation");
        for i in 0..b {
            let want = mix.lam * i as f32 + (1.0 - mix.lam) * mix.partner[i] as f32;
            assert!(px[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
                .iter()
                .all(|&v| v == want));
        }
        // Same seed, same mix; another seed, another.
        let mut again = indexed(b);
        assert_eq!(
            cfg.apply(&mut again, &mut ChaCha8Rng::seed_from_u64(5))
                .unwrap(),
            mix
        );
        assert_eq!(again, px);
        let mut other = indexed(b);
        assert_ne!(
            cfg.apply(&mut other, &mut ChaCha8Rng::seed_from_u64(6))
                .unwrap(),
            mix
        );
    }

    #[test]
    fn cutmix_pastes_one_rectangle_and_lam_is_the_share_kept() {
        let cfg = MixConfig {
            kind: MixKind::Cutmix,
            alpha: 1.0,
        };
        let b = 6;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut pasted_any = false;
        for _ in 0..50 {
            let mut px = indexed(b);
            let mix = cfg.apply(&mut px, &mut rng).unwrap();
            for i in 0..b {
                let img = &px[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS];
                let own = img.iter().filter(|&&v| v == i as f32).count();
                let other = img.iter().filter(|&&v| v == mix.partner[i] as f32).count();
                if mix.partner[i] == i {
                    assert_eq!(own, IMAGE_PIXELS);
                } else {
                    assert_eq!(own + other, IMAGE_PIXELS);
                    assert_eq!(
                        own as f32 / IMAGE_PIXELS as f32,
                        mix.lam,
                        "lam is the share kept"
                    );
                    pasted_any |= other > 0;
                }
            }
        }
        assert!(pasted_any);
    }

    #[test]
    fn a_non_positive_alpha_is_refused() {
        for alpha in [0.0, -1.0, f32::INFINITY] {
            let cfg = MixConfig {
                kind: MixKind::Mixup,
                alpha,
            };
            let err = cfg.validate().expect_err("invalid").to_string();
            assert!(err.contains("alpha"), "{err}");
            assert!(cfg
                .apply(&mut ones(), &mut ChaCha8Rng::seed_from_u64(1))
                .is_err());
        }
    }
}

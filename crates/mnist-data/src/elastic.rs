//! Elastic distortion of 28x28 images as Simard, Steinkraus and Platt (ICDAR 2003, "Best practices for
//! convolutional neural networks applied to visual document analysis") describe it: a random
//! displacement field, uniform in `[-1, 1]` per pixel and axis, smoothed by a Gaussian of standard
//! deviation `sigma` pixels and scaled by `alpha`, so that output pixel `p` samples the input at
//! `p + alpha * (G_sigma * U)(p)`.
//!
//! The blur is separable (one horizontal and one vertical pass of a 1-D kernel truncated at
//! `ceil(3 sigma)` pixels and normalised to sum 1) with zeros outside the field, as the usual
//! `scipy.ndimage.gaussian_filter(mode="constant")` implementation. Being a weighted mean of values in
//! `[-1, 1]` with weights summing to at most 1, every displacement is at most `alpha` pixels per axis;
//! typical ones are far smaller (with `sigma = 4`, the root mean square per axis is about `0.04 alpha`).
//!
//! The field is applied by [`crate::augment_into`] in the same bilinear (or nearest) sampling pass as
//! the affine warp, after it: the result is the affine-warped image, elastically distorted.

use rand::Rng;

use crate::error::{DataError, Result};
use crate::{IMAGE_PIXELS, IMAGE_SIDE};

/// Simard et al.'s choice of smoothing for MNIST, used when a configuration gives none.
pub const DEFAULT_ELASTIC_SIGMA: f32 = 4.0;

fn default_sigma() -> f32 {
    DEFAULT_ELASTIC_SIGMA
}

/// How strong the elastic distortion is.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ElasticConfig {
    /// Scale of the smoothed field, in pixels (`>= 0`; 0 = no distortion). Simard et al. used 34 with
    /// `sigma = 4`; a weak distortion is a fraction of that.
    pub alpha: f32,
    /// Standard deviation of the Gaussian smoothing, in pixels (`> 0`). Default 4.
    #[serde(default = "default_sigma")]
    pub sigma: f32,
}

impl ElasticConfig {
    /// A distortion of strength `alpha` with the default smoothing.
    pub fn new(alpha: f32) -> Self {
        Self {
            alpha,
            sigma: DEFAULT_ELASTIC_SIGMA,
        }
    }

    /// True when the distortion moves nothing (`alpha == 0`): nothing is drawn then.
    pub fn is_identity(&self) -> bool {
        self.alpha == 0.0
    }

    /// Rejects a negative or non-finite `alpha` and a non-positive or non-finite `sigma`.
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(DataError::Config(format!(
                "elastic alpha {} must be finite and at least 0",
                self.alpha
            )));
        }
        if !(self.sigma.is_finite() && self.sigma > 0.0) {
            return Err(DataError::Config(format!(
                "elastic sigma {} must be finite and above 0",
                self.sigma
            )));
        }
        Ok(())
    }

    /// Draws one displacement field: `2 * 784` uniforms from `rng` (all of `dx`, then all of `dy`, in
    /// row-major order), each field blurred and scaled by `alpha`.
    pub fn sample(&self, rng: &mut impl Rng) -> Displacement {
        let mut field = Displacement {
            dx: [0.0; IMAGE_PIXELS],
            dy: [0.0; IMAGE_PIXELS],
        };
        for v in field.dx.iter_mut().chain(field.dy.iter_mut()) {
            *v = 2.0 * rng.random::<f32>() - 1.0;
        }
        let kernel = gaussian_kernel(self.sigma);
        for f in [&mut field.dx, &mut field.dy] {
            blur(f, &kernel);
            for v in f.iter_mut() {
                *v *= self.alpha;
            }
        }
        field
    }
}

/// A displacement per output pixel, in pixels, row-major: output pixel `(x, y)` samples its input at
/// `(x + dx, y + dy)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Displacement {
    /// Horizontal displacement (positive = sample further right).
    pub dx: [f32; IMAGE_PIXELS],
    /// Vertical displacement (positive = sample further down).
    pub dy: [f32; IMAGE_PIXELS],
}

impl Displacement {
    /// The largest displacement along either axis, in pixels.
    pub fn max_abs(&self) -> f32 {
        self.dx
            .iter()
            .chain(&self.dy)
            .fold(0.0f32, |m, v| m.max(v.abs()))
    }
}

/// The 1-D Gaussian of standard deviation `sigma`, truncated at `ceil(3 sigma)` taps each side (at most
/// 27: a wider kernel reaches nothing more of a 28-pixel field) and normalised to sum 1.
fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = ((3.0 * sigma).ceil() as usize).clamp(1, IMAGE_SIDE - 1);
    let two_s2 = 2.0 * sigma * sigma;
    let mut k: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-d * d / two_s2).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    for v in &mut k {
        *v /= sum;
    }
    k
}

/// Blurs a 28x28 field in place with the separable `kernel` (odd length), zeros outside the field.
fn blur(field: &mut [f32; IMAGE_PIXELS], kernel: &[f32]) {
    const N: usize = IMAGE_SIDE;
    let r = kernel.len() / 2;
    // Horizontal pass: each row padded with r zeros each side, then out[x] = sum_k w[k] pad[x + k].
    let mut row = vec![0f32; N + 2 * r];
    let mut tmp = [0f32; IMAGE_PIXELS];
    for (src, out) in field.chunks_exact(N).zip(tmp.chunks_exact_mut(N)) {
        row[r..r + N].copy_from_slice(src);
        for (k, &w) in kernel.iter().enumerate() {
            for (o, &p) in out.iter_mut().zip(&row[k..k + N]) {
                *o += w * p;
            }
        }
    }
    // Vertical pass: output row y = sum_k w[k] row (y + k - r) of the horizontal result.
    field.fill(0.0);
    for y in 0..N {
        let out = &mut field[y * N..(y + 1) * N];
        for (k, &w) in kernel.iter().enumerate() {
            let Some(sy) = (y + k).checked_sub(r).filter(|&sy| sy < N) else {
                continue;
            };
            for (o, &p) in out.iter_mut().zip(&tmp[sy * N..(sy + 1) * N]) {
                *o += w * p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn kernel_is_normalised_and_symmetric() {
        for sigma in [0.5f32, 2.0, 4.0, 30.0] {
            let k = gaussian_kernel(sigma);
            assert_eq!(k.len() % 2, 1);
            assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{sigma}");
            for (a, b) in k.iter().zip(k.iter().rev()) {
                assert_eq!(a, b);
            }
            assert!(k.len() < 2 * IMAGE_SIDE);
        }
        assert_eq!(gaussian_kernel(4.0).len(), 25);
    }

    #[test]
    fn blur_matches_a_direct_2d_convolution() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut field = [0f32; IMAGE_PIXELS];
        for v in field.iter_mut() {
            *v = rng.random::<f32>() * 2.0 - 1.0;
        }
        let kernel = gaussian_kernel(2.0);
        let r = kernel.len() as isize / 2;
        let mut direct = [0f32; IMAGE_PIXELS];
        for y in 0..28isize {
            for x in 0..28isize {
                let mut acc = 0.0f64;
                for ky in -r..=r {
                    for kx in -r..=r {
                        let (sx, sy) = (x + kx, y + ky);
                        if (0..28).contains(&sx) && (0..28).contains(&sy) {
                            let w =
                                kernel[(ky + r) as usize] as f64 * kernel[(kx + r) as usize] as f64;
                            acc += w * field[(sy * 28 + sx) as usize] as f64;
                        }
                    }
                }
                direct[(y * 28 + x) as usize] = acc as f32;
            }
        }
        blur(&mut field, &kernel);
        let d = field
            .iter()
            .zip(&direct)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d < 1e-5, "separable vs direct: max |diff| = {d}");
    }

    #[test]
    fn displacement_is_bounded_smooth_and_deterministic() {
        let cfg = ElasticConfig::new(8.0);
        let draw = |seed| cfg.sample(&mut ChaCha8Rng::seed_from_u64(seed));
        let a = draw(1);
        assert_eq!(a, draw(1), "same seed, same field");
        assert_ne!(a, draw(2));
        let mut sum_sq = 0.0f64;
        for seed in 0..50 {
            let f = draw(seed);
            assert!(f.max_abs() <= cfg.alpha, "{} > alpha", f.max_abs());
            sum_sq += f.dx.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            // Smooth: neighbours move alike (the field varies over about sigma pixels).
            for y in 0..28 {
                for x in 0..27 {
                    let i = y * 28 + x;
                    assert!((f.dx[i] - f.dx[i + 1]).abs() < 0.2 * cfg.alpha);
                }
            }
        }
        let rms = (sum_sq / (50.0 * 784.0)).sqrt() as f32;
        // About 0.04 alpha for sigma 4 (less at the borders, where the zeros outside count).
        assert!(
            rms > 0.015 * cfg.alpha && rms < 0.06 * cfg.alpha,
            "rms {rms}"
        );
        // Zero alpha moves nothing.
        let zero = ElasticConfig::new(0.0).sample(&mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(zero.max_abs(), 0.0);
        assert!(ElasticConfig::new(0.0).is_identity());
    }

    #[test]
    fn validate_names_the_bad_value() {
        assert!(ElasticConfig::new(0.0).validate().is_ok());
        assert!(ElasticConfig::new(34.0).validate().is_ok());
        for (bad, what) in [
            (ElasticConfig::new(-1.0), "alpha"),
            (ElasticConfig::new(f32::NAN), "alpha"),
            (
                ElasticConfig {
                    alpha: 1.0,
                    sigma: 0.0,
                },
                "sigma",
            ),
            (
                ElasticConfig {
                    alpha: 1.0,
                    sigma: f32::INFINITY,
                },
                "sigma",
            ),
        ] {
            let msg = bad.validate().unwrap_err().to_string();
            assert!(msg.contains(what), "{bad:?}: {msg}");
        }
        let cfg: ElasticConfig = serde_json::from_str(r#"{"alpha": 2.5}"#).unwrap();
        assert_eq!(cfg, ElasticConfig::new(2.5));
    }
}

//! Inverted dropout with masks drawn from a shared, seeded RNG.

use candle_core::{ModuleT, Result, Tensor};
use rand::Rng;

use crate::{LayerError, SharedRng};

/// Inverted dropout: in training, each element is zeroed with probability `p` and the survivors are
/// scaled by `1 / (1 - p)`; in eval it is the identity. The mask comes from the shared seeded RNG, so a
/// seeded run is reproducible.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f32,
    rng: SharedRng,
}

/// Builds a [`Dropout`] with drop probability `p` (checked in `forward_t`: must be in `[0, 1)`).
pub fn dropout(p: f32, rng: SharedRng) -> Dropout {
    Dropout { p, rng }
}

impl Dropout {
    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(
                LayerError::Config(format!("dropout: p = {} must be in [0, 1)", self.p)).into(),
            );
        }
        if !train || self.p == 0.0 {
            return Ok(xs.clone());
        }
        let scale = 1.0 / (1.0 - self.p);
        let mask = {
            let mut rng = self.rng.lock().map_err(|_| LayerError::RngPoisoned)?;
            draw_mask(&mut *rng, xs.elem_count(), self.p, scale)
        };
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs.mul(&mask)
    }
}

/// `n` mask values, each `0` with probability `p` and `scale` otherwise: value `i` is `0` exactly when the
/// `i`-th `rng.random::<f32>()` would be below `p`. The words are drawn in one bulk fill (the same `u32`s
/// as `n` calls of `next_u32`) and turned into floats as rand's `StandardUniform` does (the top 24 bits
/// times `2^-24`), so the masks are the same as drawing one float at a time, in a fraction of the time.
fn draw_mask(rng: &mut impl Rng, n: usize, p: f32, scale: f32) -> Vec<f32> {
    const CHUNK: usize = 1024;
    let mut words = [0u32; CHUNK];
    let mut out = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let take = left.min(CHUNK);
        let words = &mut words[..take];
        rng.fill(words);
        out.extend(words.iter().map(|&u| {
            let x = (u >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
            if x < p {
                0.0
            } else {
                scale
            }
        }));
        left -= take;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_rng;
    use candle_core::{DType, Device};

    #[test]
    fn dropout_is_seeded_and_scaled() {
        let x = Tensor::ones((4, 1000), DType::F32, &Device::Cpu).unwrap();
        let a = dropout(0.25, shared_rng(3)).forward_t(&x, true).unwrap();
        let b = dropout(0.25, shared_rng(3)).forward_t(&x, true).unwrap();
        let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(av, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let zeros = av.iter().filter(|&&v| v == 0.0).count() as f32 / av.len() as f32;
        assert!((zeros - 0.25).abs() < 0.03, "drop rate {zeros}");
        assert!(av.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let e = dropout(0.25, shared_rng(3)).forward_t(&x, false).unwrap();
        assert_eq!(e.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4000.0);
        assert!(dropout(1.0, shared_rng(0)).forward_t(&x, true).is_err());
    }

    /// The bulk-drawn mask is the one-float-at-a-time mask, also when earlier draws left the generator
    /// in the middle of a block and for lengths that are not a multiple of the chunk or the block.
    #[test]
    fn bulk_mask_is_the_one_float_at_a_time_mask() {
        use rand::SeedableRng;
        for (seed, skip, n) in [
            (1u64, 0usize, 1usize),
            (2, 3, 1023),
            (3, 7, 1024),
            (4, 17, 5488),
            (5, 1, 70_001),
        ] {
            let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            for _ in 0..skip {
                a.random::<u32>();
            }
            let mut b = a.clone();
            let fast = draw_mask(&mut a, n, 0.25, 4.0 / 3.0);
            let slow: Vec<f32> = (0..n)
                .map(|_| {
                    if b.random::<f32>() < 0.25 {
                        0.0
                    } else {
                        4.0 / 3.0
                    }
                })
                .collect();
            assert_eq!(fast, slow, "seed {seed}, skip {skip}, n {n}");
            assert_eq!(
                a.random::<u64>(),
                b.random::<u64>(),
                "the generators end in the same state"
            );
        }
    }
}

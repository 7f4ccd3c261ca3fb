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
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().map_err(|_| LayerError::RngPoisoned)?;
            (0..xs.elem_count())
                .map(|_| {
                    if rng.random::<f32>() < self.p {
                        0.0
                    } else {
                        scale
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs.mul(&mask)
    }
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
}

//! Seeded, Keras-like weight initialisation.
//!
//! candle's CPU RNG cannot be seeded, so [`SeededVarMap`] draws every random initial value from its own
//! `ChaCha8Rng`: the same seed and the same construction order give bit-identical weights.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::LayerError;

/// The Keras glorot-uniform limit `sqrt(6 / (fan_in + fan_out))`: weights are drawn from `U(-limit, limit)`.
pub fn glorot_uniform_limit(fan_in: usize, fan_out: usize) -> f64 {
    (6.0 / (fan_in + fan_out).max(1) as f64).sqrt()
}

/// The glorot-uniform [`Init`] for the given fans.
pub fn glorot_uniform(fan_in: usize, fan_out: usize) -> Init {
    WeightInit::GlorotUniform.init(fan_in, fan_out)
}

/// How a layer's weights are drawn, from `U(-limit, limit)` with the limit set by the layer's fans. Every
/// choice draws the same uniforms in the same order, so two models differing only here start from the same
/// draws, scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightInit {
    /// Keras's default, `sqrt(6 / (fan_in + fan_out))` (Glorot and Bengio, AISTATS 2010).
    #[default]
    GlorotUniform,
    /// He et al.'s for ReLU layers, `sqrt(6 / fan_in)` (ICCV 2015; Keras's `he_uniform`).
    HeUniform,
    /// PyTorch's default for convolutions and linear layers, `sqrt(1 / fan_in)` (`kaiming_uniform_` with
    /// `a = sqrt(5)`).
    Pytorch,
}

impl WeightInit {
    /// The half-width of the uniform range for a layer with these fans.
    pub fn limit(self, fan_in: usize, fan_out: usize) -> f64 {
        let per_fan_in = |n: f64| (n / fan_in.max(1) as f64).sqrt();
        match self {
            WeightInit::GlorotUniform => glorot_uniform_limit(fan_in, fan_out),
            WeightInit::HeUniform => per_fan_in(6.0),
            WeightInit::Pytorch => per_fan_in(1.0),
        }
    }

    /// The [`Init`] for a layer with these fans.
    pub fn init(self, fan_in: usize, fan_out: usize) -> Init {
        let limit = self.limit(fan_in, fan_out);
        Init::Uniform {
            lo: -limit,
            up: limit,
        }
    }
}

/// A [`VarMap`] whose random initial values come from a seeded `ChaCha8Rng`.
///
/// Cloning is cheap and shares both the variables and the RNG.
#[derive(Clone)]
pub struct SeededVarMap {
    map: VarMap,
    rng: Arc<Mutex<ChaCha8Rng>>,
}

impl std::fmt::Debug for SeededVarMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeededVarMap")
            .field("vars", &self.map.all_vars().len())
            .finish()
    }
}

impl SeededVarMap {
    /// An empty map whose RNG is seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            map: VarMap::new(),
            rng: Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))),
        }
    }

    /// A `VarBuilder` creating its variables in this map.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The underlying `VarMap` (for `all_vars`, `save`, `load`).
    pub fn var_map(&self) -> &VarMap {
        &self.map
    }

    /// Mutable access to the underlying `VarMap` (for `load`).
    pub fn var_map_mut(&mut self) -> &mut VarMap {
        &mut self.map
    }

    /// Consumes the wrapper and returns the `VarMap`.
    pub fn into_var_map(self) -> VarMap {
        self.map
    }

    fn sample(&self, shape: &Shape, init: Init) -> Result<Option<Tensor>> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().map_err(|_| LayerError::RngPoisoned)?;
        let values: Vec<f32> = match init {
            Init::Uniform { lo, up } => (0..n)
                .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
                .collect(),
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| {
                    // Box-Muller on (0, 1] x [0, 1).
                    let u1 = 1.0 - rng.random::<f64>();
                    let u2 = rng.random::<f64>();
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (mean + stdev * z) as f32
                })
                .collect(),
            _ => return Ok(None),
        };
        Ok(Some(Tensor::from_vec(values, shape, &Device::Cpu)?))
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        {
            let data = self
                .map
                .data()
                .lock()
                .map_err(|_| LayerError::RngPoisoned)?;
            if let Some(var) = data.get(name) {
                if var.shape() != &s {
                    candle_core::bail!(
                        "shape mismatch on {name}: requested {s:?}, stored {:?}",
                        var.shape()
                    )
                }
                return Ok(var.as_tensor().clone());
            }
        }
        let var = match self.sample(&s, h)? {
            Some(t) => Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?)?,
            None => h.var(s, dtype, dev)?,
        };
        let tensor = var.as_tensor().clone();
        self.map
            .data()
            .lock()
            .map_err(|_| LayerError::RngPoisoned)?
            .insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("SeededVarMap needs a shape to create {name}, use `get`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_init_limits() {
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        // A 3x3 convolution from 10 to 20 channels: fans 90 and 180.
        close(
            WeightInit::GlorotUniform.limit(90, 180),
            (6.0f64 / 270.0).sqrt(),
        );
        close(WeightInit::HeUniform.limit(90, 180), (6.0f64 / 90.0).sqrt());
        close(WeightInit::Pytorch.limit(90, 180), 1.0 / 90f64.sqrt());
        // The default is Keras's; the names as a spec writes them.
        assert_eq!(WeightInit::default(), WeightInit::GlorotUniform);
        for (name, init) in ["glorot_uniform", "he_uniform", "pytorch"].iter().zip([
            WeightInit::GlorotUniform,
            WeightInit::HeUniform,
            WeightInit::Pytorch,
        ]) {
            assert_eq!(serde_json::to_string(&init).unwrap(), format!("\"{name}\""));
        }
    }

    fn build(seed: u64) -> Vec<(String, Vec<f32>)> {
        let m = SeededVarMap::new(seed);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        vb.get_with_hints((4, 3), "a", glorot_uniform(3, 4))
            .unwrap();
        vb.get_with_hints(
            5,
            "b",
            Init::Randn {
                mean: 1.0,
                stdev: 2.0,
            },
        )
        .unwrap();
        vb.get_with_hints(2, "c", Init::Const(0.5)).unwrap();
        let data = m.var_map().data().lock().unwrap();
        let mut out: Vec<_> = data
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn same_seed_same_weights_bit_identical() {
        let a = build(7);
        let b = build(7);
        assert_eq!(a, b);
        let c = build(8);
        assert_ne!(a[0].1, c[0].1);
        // Uniform within the glorot limit, const exact.
        let limit = glorot_uniform_limit(3, 4) as f32;
        assert!(a[0].1.iter().all(|v| v.abs() <= limit));
        assert_eq!(a[2].1, vec![0.5, 0.5]);
    }

    #[test]
    fn existing_var_is_reused_and_shape_checked() {
        let m = SeededVarMap::new(1);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let a = vb.get_with_hints(3, "w", glorot_uniform(1, 1)).unwrap();
        let b = vb.get_with_hints(3, "w", glorot_uniform(1, 1)).unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        assert!(vb.get_with_hints(4, "w", glorot_uniform(1, 1)).is_err());
        assert_eq!(m.var_map().all_vars().len(), 1);
    }

    #[test]
    fn randn_moments() {
        let m = SeededVarMap::new(3);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let t = vb
            .get_with_hints(
                20_000,
                "n",
                Init::Randn {
                    mean: 1.0,
                    stdev: 2.0,
                },
            )
            .unwrap();
        let v = t.to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }
}

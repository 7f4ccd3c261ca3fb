//! The MNIST Challenge architectures: models with fewer than 10,000 parameters.
//!
//! Three solutions ([`Solution`]), each as the faithful original ([`Variant::Seed`]) and as our improved
//! variant ([`Variant::Improved`]). Models take `[b, 1, 28, 28]` f32 images (pixels / 255) and return
//! `[b, 10]` logits.
//!
//! ```no_run
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use mnist_layers::init::SeededVarMap;
//! use mnist_models::{build, ModelConfig, Solution, Variant};
//!
//! let vars = SeededVarMap::new(42);
//! let vb = vars.var_builder(DType::F32, &Device::Cpu);
//! let cfg = ModelConfig::new(Solution::Conv, Variant::Seed);
//! let model = build(&cfg, vb, mnist_models::dropout_rng(42))?;
//! let logits = model.forward_t(&Tensor::zeros((8, 1, 28, 28), DType::F32, &Device::Cpu)?, false)?;
//! assert_eq!(logits.dims(), &[8, 10]);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod config;
mod improved;
mod net;
mod seed;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use mnist_layers::init::SeededVarMap;
use mnist_layers::SharedRng;
use rand_chacha::rand_core::SeedableRng;

pub use config::{ModelConfig, Solution, Variant};
pub use net::{is_trainable, summarize, LayerSummary, Net, StageTrace, Summary};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A solution name that is not one of conv, separable, inception.
    #[error("unknown solution '{0}' (expected conv, separable or inception)")]
    UnknownSolution(String),
    /// A variant name that is not one of seed, improved.
    #[error("unknown variant '{0}' (expected seed or improved)")]
    UnknownVariant(String),
    /// An error from candle while building or running a model.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A shared, seeded random generator for the dropout masks of one model.
pub fn dropout_rng(seed: u64) -> SharedRng {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(7);
    Arc::new(Mutex::new(rng))
}

/// Builds the model `cfg` describes, creating (or loading) its variables through `vb`.
/// Dropout masks are drawn from `rng`.
pub fn build(cfg: &ModelConfig, vb: VarBuilder, rng: SharedRng) -> candle_core::Result<Net> {
    let k = cfg.kernels;
    let stages = match (cfg.solution, cfg.variant) {
        (Solution::Conv, Variant::Seed) => seed::conv(vb, rng, k)?,
        (Solution::Separable, Variant::Seed) => seed::separable(vb, rng, k)?,
        (Solution::Inception, Variant::Seed) => seed::inception(vb, rng, k)?,
        (Solution::Conv, Variant::Improved) => improved::conv(vb, rng, k)?,
        (Solution::Separable, Variant::Improved) => improved::separable(vb, rng, k)?,
        (Solution::Inception, Variant::Improved) => improved::inception(vb, rng, k)?,
    };
    Ok(Net::new(*cfg, stages))
}

/// Builds the model on the CPU with throw-away weights and summarises it, layer by layer as Keras does
/// (built with the reference kernels, so fused blocks show as their separate layers; the variables and
/// counts are the same either way).
pub fn summary(cfg: &ModelConfig) -> candle_core::Result<Summary> {
    let vars = SeededVarMap::new(0);
    let cfg = cfg.with_kernels(mnist_layers::Kernels::Reference);
    let net = build(
        &cfg,
        vars.var_builder(DType::F32, &Device::Cpu),
        dropout_rng(0),
    )?;
    summarize(&net, vars.var_map())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_models_match_keras_parameter_counts() {
        let expected = [
            (Solution::Conv, 8_640, 8_580),
            (Solution::Separable, 4_967, 4_879),
            (Solution::Inception, 3_077, 3_077),
        ];
        for (solution, total, trainable) in expected {
            let s = summary(&ModelConfig::new(solution, Variant::Seed)).unwrap();
            assert_eq!(s.params_total, total, "{solution}: {s}");
            assert_eq!(s.params_trainable, trainable, "{solution}: {s}");
        }
    }

    #[test]
    fn improved_models_fit_their_budgets() {
        for solution in Solution::ALL {
            let s = summary(&ModelConfig::new(solution, Variant::Improved)).unwrap();
            assert!(s.params_total <= solution.param_budget(), "{solution}: {s}");
            assert_eq!(s.layers.last().unwrap().output_shape, vec![10]);
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Solution::ALL {
            assert_eq!(s.to_string().parse::<Solution>().unwrap(), s);
        }
        for v in Variant::ALL {
            assert_eq!(v.to_string().parse::<Variant>().unwrap(), v);
        }
        assert!("dense".parse::<Solution>().is_err());
    }
}

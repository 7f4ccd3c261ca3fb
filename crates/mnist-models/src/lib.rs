//! The MNIST Challenge architectures: models with fewer than 10,000 parameters, described as data.
//!
//! An architecture is an [`ArchSpec`]: an ordered list of layer specs, JSON on disk (see [`spec`]).
//! Three solutions ([`Solution`]) each have two built-in specs: the faithful original
//! ([`Variant::Seed`]) and our improved variant ([`Variant::Improved`]) ([`builtin`]). [`build`] lowers
//! any spec to a [`Net`] that takes `[b, 1, 28, 28]` f32 images (pixels / 255) and returns `[b, 10]`
//! logits; [`summary()`] describes one layer by layer, as Keras's `model.summary()`.
//!
//! Every built-in variant also ships trained: [`pretrained`] returns a [`Classifier`] ready to classify
//! images, and [`pretrained_info`] says how it was made and how it scores (test accuracy on the 10,000
//! MNIST test images):
//!
//! | model | params | test accuracy | seed |
//! |---|---|---|---|
//! | conv-seed | 8,640 | 99.05% | 1 |
//! | conv-improved | 8,184 | 99.56% | 1 |
//! | separable-seed | 4,967 | 98.18% | 1 |
//! | separable-improved | 4,763 | 99.46% | 1 |
//! | inception-seed | 3,077 | 95.95% | 1 |
//! | inception-improved | 3,066 | 99.35% | 1 |
//!
//! Made by `scripts/pretrain.sh` (the command and date of each are in its `pretrained/*.json`).
//!
//! ```no_run
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use mnist_layers::{init::SeededVarMap, Kernels};
//! use mnist_models::{build, builtin, dropout_rng, Solution, Variant};
//!
//! let vars = SeededVarMap::new(42);
//! let vb = vars.var_builder(DType::F32, &Device::Cpu);
//! let spec = builtin(Solution::Conv, Variant::Seed);
//! let model = build(spec, vb, Kernels::Auto, dropout_rng(42))?;
//! let logits = model.forward_t(&Tensor::zeros((8, 1, 28, 28), DType::F32, &Device::Cpu)?, false)?;
//! assert_eq!(logits.dims(), &[8, 10]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod classify;
mod config;
mod lower;
mod net;
pub mod plan;
mod pretrained;
pub mod spec;
mod summary;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mnist_layers::SharedRng;
use rand_chacha::rand_core::SeedableRng;

pub use classify::{Classifier, Prediction, INFER_BATCH};
pub use config::{builtin, builtin_before_specs, ModelConfig, Solution, Variant};
pub use lower::build;
pub use mnist_data::{load_mnist_image, to_mnist, ImageError};
pub use net::{is_trainable, Net, StageTrace, EVAL_CHUNK};
pub use plan::{Dims, LayerSummary};
pub use pretrained::{pretrained, pretrained_info, PretrainedInfo};
pub use spec::{ArchSpec, SpecError};
pub use summary::{summary, thousands, Summary};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A solution name that is not one of conv, separable, inception.
    #[error("unknown solution '{0}' (expected conv, separable or inception)")]
    UnknownSolution(String),
    /// A variant name that is not one of seed, improved.
    #[error("unknown variant '{0}' (expected seed or improved)")]
    UnknownVariant(String),
    /// An architecture that does not describe a model.
    #[error("invalid architecture: {0}")]
    Spec(#[from] SpecError),
    /// An architecture file that cannot be read or does not describe a model.
    #[error("{}: {reason}", path.display())]
    SpecFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weights file (or shipped weights) that is missing, corrupt or of another model.
    #[error("weights {}: {reason}", path.display())]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Images that cannot be classified (wrong size).
    #[error("{0}")]
    Input(String),
    /// A picture that cannot be brought into MNIST's form.
    #[error(transparent)]
    Image(#[from] mnist_data::ImageError),
    /// Turning logits into predictions failed.
    #[error(transparent)]
    Metrics(#[from] mnist_metrics::MetricsError),
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

#[cfg(test)]
mod tests {
    use super::*;

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

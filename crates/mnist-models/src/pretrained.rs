//! The shipped models: every built-in variant trained once with its recipe, inside this crate.
//!
//! Each model is two files in `pretrained/`: `<solution>-<variant>.safetensors` (the weights, as training
//! writes `model.safetensors`) and `<solution>-<variant>.json` (what it is: the model config it was
//! trained as, the seed, the command, when, and its accuracy on the 10,000 MNIST test images).
//! `scripts/pretrain.sh` makes both; a test evaluates every shipped model on the test set and must get
//! exactly the recorded figure.

use std::sync::OnceLock;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::classify::shipped_origin;
use crate::{Classifier, ModelConfig, ModelError, Solution, Variant};

/// What a shipped model is and how it scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainedInfo {
    /// The model it is (solution, built-in variant, architecture).
    pub model: ModelConfig,
    /// The training seed.
    pub seed: u64,
    /// The command that trained it (in a checkout of this repository).
    pub command: String,
    /// When it was trained (UTC date) and at which commit.
    pub made: String,
    /// Parameters, BatchNorm statistics included.
    pub params: usize,
    /// Validation accuracy after the last epoch (the last 6,000 training images).
    pub val_accuracy: f64,
    /// Test images classified correctly, of `test_images`.
    pub test_correct: usize,
    /// Test images (10,000).
    pub test_images: usize,
}

impl PretrainedInfo {
    /// Test accuracy, as a fraction.
    pub fn test_accuracy(&self) -> f64 {
        self.test_correct as f64 / self.test_images as f64
    }
}

/// The shipped files of `(solution, variant)`: its info JSON and its weights.
fn files(solution: Solution, variant: Variant) -> (&'static str, &'static [u8]) {
    macro_rules! shipped {
        ($name:literal) => {
            (
                include_str!(concat!("../pretrained/", $name, ".json")),
                include_bytes!(concat!("../pretrained/", $name, ".safetensors")).as_slice(),
            )
        };
    }
    match (solution, variant) {
        (Solution::Conv, Variant::Seed) => shipped!("conv-seed"),
        (Solution::Conv, Variant::Improved) => shipped!("conv-improved"),
        (Solution::Separable, Variant::Seed) => shipped!("separable-seed"),
        (Solution::Separable, Variant::Improved) => shipped!("separable-improved"),
        (Solution::Inception, Variant::Seed) => shipped!("inception-seed"),
        (Solution::Inception, Variant::Improved) => shipped!("inception-improved"),
    }
}

/// What the shipped model of `(solution, variant)` is and how it scores on the test set.
pub fn pretrained_info(solution: Solution, variant: Variant) -> &'static PretrainedInfo {
    static INFOS: OnceLock<Vec<(Solution, Variant, PretrainedInfo)>> = OnceLock::new();
    let infos = INFOS.get_or_init(|| {
        let mut all = Vec::new();
        for s in Solution::ALL {
            for v in Variant::ALL {
                // The shipped files are checked by this crate's tests; a broken one is a build defect.
                let info: PretrainedInfo = serde_json::from_str(files(s, v).0)
                    .unwrap_or_else(|e| panic!("shipped pretrained/{s}-{v}.json is invalid: {e}"));
                all.push((s, v, info));
            }
        }
        all
    });
    infos
        .iter()
        .find(|(s, v, _)| (*s, *v) == (solution, variant))
        .map(|(_, _, info)| info)
        .unwrap_or_else(|| unreachable!("every (solution, variant) pair is shipped"))
}

/// The shipped model of `(solution, variant)`, ready to classify on the CPU (fast kernels).
///
/// ```no_run
/// let model = mnist_models::pretrained(mnist_models::Solution::Conv, mnist_models::Variant::Improved)?;
/// let digit = model.classify_file("digit.png".as_ref())?.digit;
/// # let _ = digit;
/// # Ok::<(), mnist_models::ModelError>(())
/// ```
pub fn pretrained(solution: Solution, variant: Variant) -> Result<Classifier, ModelError> {
    let info = pretrained_info(solution, variant);
    let (_, weights) = files(solution, variant);
    Classifier::from_safetensors(
        info.model.clone(),
        weights,
        &shipped_origin(&format!("{solution}-{variant}")),
        &Device::Cpu,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_model_loads_and_is_what_it_says() {
        for s in Solution::ALL {
            for v in Variant::ALL {
                let info = pretrained_info(s, v);
                assert_eq!(info.model.solution, s);
                assert_eq!(info.model.variant, Some(v));
                assert_eq!(info.test_images, 10_000);
                let summary = crate::summary(&info.model.arch).unwrap();
                assert_eq!(info.params, summary.params_total, "{s}-{v}");
                let model = pretrained(s, v).unwrap();
                let p = model.predict(&[vec![0u8; 784]]).unwrap();
                assert_eq!(p[0].probabilities.len(), 10);
            }
        }
    }
}

//! Which model to build: the solution, the architecture (a built-in variant or any spec) and the kernels.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use mnist_layers::Kernels;
use serde::{Deserialize, Serialize};

use crate::{ArchSpec, ModelError};

/// The three MNIST Challenge solutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Solution {
    /// Solution 1: big 7x7 and 5x5 kernels, BatchNorm, max-pooling, dropout, dense head.
    Conv,
    /// Solution 2: 3x3 separable convolutions with many channels and BatchNorm.
    Separable,
    /// Solution 3: an inception module (1x1, 3x3, 5x5 branches) first.
    Inception,
}

impl Solution {
    /// All solutions, in the challenge's order.
    pub const ALL: [Solution; 3] = [Solution::Conv, Solution::Separable, Solution::Inception];

    /// The parameter count of the original Keras model (BatchNorm statistics included); the budget that
    /// every variant of this solution must stay within.
    pub fn param_budget(self) -> usize {
        match self {
            Solution::Conv => 8_640,
            Solution::Separable => 4_967,
            Solution::Inception => 3_077,
        }
    }

    /// The test accuracy the original Keras notebook reports for this solution (one run, 10 epochs).
    pub fn original_test_accuracy(self) -> f64 {
        match self {
            Solution::Conv => 0.9920,
            Solution::Separable => 0.9842,
            Solution::Inception => 0.9736,
        }
    }

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Solution::Conv => "conv",
            Solution::Separable => "separable",
            Solution::Inception => "inception",
        }
    }
}

impl fmt::Display for Solution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Solution {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "conv" | "1" => Ok(Solution::Conv),
            "separable" | "2" => Ok(Solution::Separable),
            "inception" | "3" => Ok(Solution::Inception),
            _ => Err(ModelError::UnknownSolution(s.to_string())),
        }
    }
}

/// A built-in architecture of a solution: the faithful original or our improved one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The original notebook's architecture, layer for layer.
    Seed,
    /// Our variant that reaches > 99% within 10 epochs under the same parameter budget.
    #[default]
    Improved,
}

impl Variant {
    /// All variants.
    pub const ALL: [Variant; 2] = [Variant::Seed, Variant::Improved];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Seed => "seed",
            Variant::Improved => "improved",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "seed" | "original" => Ok(Variant::Seed),
            "improved" => Ok(Variant::Improved),
            _ => Err(ModelError::UnknownVariant(s.to_string())),
        }
    }
}

/// The JSON of every built-in variant (`specs/<solution>-<variant>.json`): the only description of them.
const BUILTIN_JSON: [(Solution, Variant, &str); 6] = [
    (
        Solution::Conv,
        Variant::Seed,
        include_str!("../specs/conv-seed.json"),
    ),
    (
        Solution::Conv,
        Variant::Improved,
        include_str!("../specs/conv-improved.json"),
    ),
    (
        Solution::Separable,
        Variant::Seed,
        include_str!("../specs/separable-seed.json"),
    ),
    (
        Solution::Separable,
        Variant::Improved,
        include_str!("../specs/separable-improved.json"),
    ),
    (
        Solution::Inception,
        Variant::Seed,
        include_str!("../specs/inception-seed.json"),
    ),
    (
        Solution::Inception,
        Variant::Improved,
        include_str!("../specs/inception-improved.json"),
    ),
];

/// A table of embedded spec files, parsed once.
type SpecTable = OnceLock<Vec<(Solution, Variant, ArchSpec)>>;

/// The spec of `(solution, variant)` in `table` (the JSON of `files`, parsed on first use), if it has one.
fn find_spec(
    table: &'static SpecTable,
    files: &[(Solution, Variant, &str)],
    solution: Solution,
    variant: Variant,
) -> Option<&'static ArchSpec> {
    let specs = table.get_or_init(|| {
        files
            .iter()
            .map(|&(s, v, json)| {
                // The embedded files are checked by this crate's tests; a broken one is a build defect.
                let spec = ArchSpec::from_json(json)
                    .unwrap_or_else(|e| panic!("embedded spec {s}-{v} is invalid: {e}"));
                (s, v, spec)
            })
            .collect()
    });
    specs
        .iter()
        .find(|(s, v, _)| (*s, *v) == (solution, variant))
        .map(|(_, _, spec)| spec)
}

/// The architecture of a built-in variant.
pub fn builtin(solution: Solution, variant: Variant) -> &'static ArchSpec {
    static SPECS: SpecTable = OnceLock::new();
    find_spec(&SPECS, &BUILTIN_JSON, solution, variant)
        .unwrap_or_else(|| unreachable!("every (solution, variant) pair has a built-in spec"))
}

/// The built-ins that have changed since run folders began to record their architecture (`arch`), as they
/// were before: the improved variants before the wide-early designs (2026-12-03).
const LEGACY_JSON: [(Solution, Variant, &str); 3] = [
    (
        Solution::Conv,
        Variant::Improved,
        include_str!("../specs/conv-improved-v1.json"),
    ),
    (
        Solution::Separable,
        Variant::Improved,
        include_str!("../specs/separable-improved-v1.json"),
    ),
    (
        Solution::Inception,
        Variant::Improved,
        include_str!("../specs/inception-improved-v1.json"),
    ),
];

/// The architecture a `config.json` without `arch` (written before architectures were data) means by
/// `variant`: the built-in of that time, which is today's unless it has changed since ([`LEGACY_JSON`]).
pub fn builtin_before_specs(solution: Solution, variant: Variant) -> &'static ArchSpec {
    static SPECS: SpecTable = OnceLock::new();
    find_spec(&SPECS, &LEGACY_JSON, solution, variant).unwrap_or_else(|| builtin(solution, variant))
}

/// Everything needed to rebuild a model (saved beside its weights as part of `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// The solution (its binary, its recipes, its parameter budget).
    pub solution: Solution,
    /// The built-in variant `arch` is, or `None` for an architecture from a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<Variant>,
    /// The architecture.
    pub arch: ArchSpec,
    /// Fast CPU kernels (`auto`) or candle's own ops (`reference`). Not part of the architecture.
    pub kernels: Kernels,
}

/// `config.json`'s `model` as written: files from before architectures were data hold only `solution`
/// and `variant`, and stand for that built-in architecture as it was then ([`builtin_before_specs`]).
#[derive(Deserialize)]
struct ModelConfigFile {
    solution: Solution,
    #[serde(default)]
    variant: Option<Variant>,
    #[serde(default)]
    arch: Option<ArchSpec>,
    #[serde(default)]
    kernels: Kernels,
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = ModelConfigFile::deserialize(d)?;
        let arch = match (f.arch, f.variant) {
            (Some(arch), _) => arch,
            (None, Some(v)) => builtin_before_specs(f.solution, v).clone(),
            (None, None) => {
                return Err(serde::de::Error::custom(
                    "a model needs an `arch` or a built-in `variant` (seed or improved)",
                ))
            }
        };
        Ok(Self {
            solution: f.solution,
            variant: f.variant,
            arch,
            kernels: f.kernels,
        })
    }
}

impl ModelConfig {
    /// A built-in variant on the default (fast where possible) kernels.
    pub fn new(solution: Solution, variant: Variant) -> Self {
        Self {
            solution,
            variant: Some(variant),
            arch: builtin(solution, variant).clone(),
            kernels: Kernels::default(),
        }
    }

    /// Any architecture for `solution`, on the default kernels.
    pub fn custom(solution: Solution, arch: ArchSpec) -> Self {
        Self {
            solution,
            variant: None,
            arch,
            kernels: Kernels::default(),
        }
    }

    /// Builds the model (see [`crate::build`]) on this config's kernels.
    pub fn build(
        &self,
        vb: candle_nn::VarBuilder,
        rng: mnist_layers::SharedRng,
    ) -> Result<crate::Net, ModelError> {
        crate::build(&self.arch, vb, self.kernels, rng)
    }

    /// The same model built with the given kernels.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }

    /// How runs of this model are labelled: the variant's name (`seed`, `improved`), else the
    /// architecture's name (`custom` when it has none).
    pub fn label(&self) -> String {
        match self.variant {
            Some(v) => v.name().to_string(),
            None => self.arch.label().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_arch_mean_the_architecture_of_their_time() {
        let old = |s| builtin_before_specs(s, Variant::Improved);
        assert_eq!(old(Solution::Conv).name, "conv-improved-v1");
        assert_eq!(old(Solution::Separable).name, "separable-improved-v1");
        assert_eq!(old(Solution::Inception).name, "inception-improved-v1");
        for s in Solution::ALL {
            assert_eq!(
                builtin_before_specs(s, Variant::Seed),
                builtin(s, Variant::Seed)
            );
        }
        let file = r#"{ "solution": "conv", "variant": "improved" }"#;
        let cfg: ModelConfig = serde_json::from_str(file).unwrap();
        assert_eq!(&cfg.arch, old(Solution::Conv));
        let now =
            serde_json::to_string(&ModelConfig::new(Solution::Conv, Variant::Improved)).unwrap();
        let cfg: ModelConfig = serde_json::from_str(&now).unwrap();
        assert_eq!(&cfg.arch, builtin(Solution::Conv, Variant::Improved));
    }
}

//! Which model to build: solution, variant and kernel choice.

use std::fmt;
use std::str::FromStr;

use mnist_layers::Kernels;
use serde::{Deserialize, Serialize};

use crate::ModelError;

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

/// Which architecture of a solution: the faithful original or our improved one.
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

/// Everything needed to rebuild a model (saved beside its weights as part of `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The solution.
    pub solution: Solution,
    /// The variant of that solution.
    pub variant: Variant,
    /// Fast CPU kernels (`auto`) or candle's own ops (`reference`). Not part of the architecture.
    #[serde(default)]
    pub kernels: Kernels,
}

impl ModelConfig {
    /// A config with the default (fast where possible) kernels.
    pub fn new(solution: Solution, variant: Variant) -> Self {
        Self {
            solution,
            variant,
            kernels: Kernels::default(),
        }
    }

    /// The same model built with the given kernels.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }
}

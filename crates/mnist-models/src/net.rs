//! A model as a list of named stages, which also gives a Keras-style summary for free.

use std::fmt;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use crate::{ModelConfig, Solution, Variant};

/// A stateless or stateful layer of a [`Net`].
pub(crate) enum Layer {
    Plain(Box<dyn Module + Send + Sync>),
    Train(Box<dyn ModuleT + Send + Sync>),
}

/// One named stage of a [`Net`]: its variables live under `prefix.` for each of its prefixes (one, or
/// several for a fused block such as conv1 + bn1 + pool1).
pub(crate) struct Stage {
    pub(crate) name: String,
    pub(crate) kind: &'static str,
    pub(crate) prefixes: Vec<String>,
    pub(crate) layer: Layer,
}

impl Stage {
    pub(crate) fn plain(
        name: &str,
        kind: &'static str,
        m: impl Module + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.to_string(),
            kind,
            prefixes: vec![name.to_string()],
            layer: Layer::Plain(Box::new(m)),
        }
    }

    pub(crate) fn train(
        name: &str,
        kind: &'static str,
        m: impl ModuleT + Send + Sync + 'static,
    ) -> Self {
        Self::fused(name, kind, &[name], m)
    }

    /// A stage whose variables live under several prefixes (a fused block of separately named layers).
    pub(crate) fn fused(
        name: &str,
        kind: &'static str,
        prefixes: &[&str],
        m: impl ModuleT + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.to_string(),
            kind,
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            layer: Layer::Train(Box::new(m)),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match &self.layer {
            Layer::Plain(m) => m.forward(xs),
            Layer::Train(m) => m.forward_t(xs, train),
        }
    }
}

/// `[b, ...] -> [b, prod(...)]`.
pub(crate) struct Flatten;

impl Module for Flatten {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.flatten_from(1)
    }
}

/// Global average pooling `[b, c, h, w] -> [b, c]`.
pub(crate) struct GlobalAvgPool;

impl Module for GlobalAvgPool {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        mnist_layers::global_avg_pool(xs)
    }
}

/// One stage of a [`Net`] as seen by [`Net::trace_shapes`].
#[derive(Debug, Clone)]
pub struct StageTrace {
    /// The stage name.
    pub name: String,
    /// The Keras-style layer type.
    pub kind: &'static str,
    /// The prefixes of the stage's variables.
    pub prefixes: Vec<String>,
    /// The output shape, batch dimension included.
    pub dims: Vec<usize>,
}

/// A built model: `[b, 1, 28, 28]` images (pixels / 255) to `[b, 10]` logits (softmax is in the loss).
pub struct Net {
    config: ModelConfig,
    stages: Vec<Stage>,
}

impl Net {
    pub(crate) fn new(config: ModelConfig, stages: Vec<Stage>) -> Self {
        Self { config, stages }
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs the model in inference mode on `xs` and describes every stage's output.
    pub fn trace_shapes(&self, xs: &Tensor) -> Result<Vec<StageTrace>> {
        let mut shapes = Vec::with_capacity(self.stages.len());
        let mut ys = xs.clone();
        for stage in &self.stages {
            ys = stage.forward_t(&ys, false)?;
            shapes.push(StageTrace {
                name: stage.name.clone(),
                kind: stage.kind,
                prefixes: stage.prefixes.clone(),
                dims: ys.dims().to_vec(),
            });
        }
        Ok(shapes)
    }
}

impl ModuleT for Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut ys = xs.clone();
        for stage in &self.stages {
            ys = stage.forward_t(&ys, train)?;
        }
        Ok(ys)
    }
}

/// True for variables the optimizer trains; false for BatchNorm running statistics (Keras's
/// "non-trainable params").
pub fn is_trainable(name: &str) -> bool {
    !(name.ends_with("running_mean") || name.ends_with("running_var"))
}

/// One row of a [`Summary`].
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    /// The stage name (the prefix of its variables).
    pub name: String,
    /// The Keras-style layer type.
    pub kind: String,
    /// Output shape without the batch dimension.
    pub output_shape: Vec<usize>,
    /// Parameters of this stage, BatchNorm statistics included.
    pub params: usize,
}

/// A Keras `model.summary()`: layers with output shapes and parameter counts, and the totals.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The solution.
    pub solution: Solution,
    /// The variant.
    pub variant: Variant,
    /// One row per stage.
    pub layers: Vec<LayerSummary>,
    /// All parameters, BatchNorm statistics included.
    pub params_total: usize,
    /// Parameters the optimizer trains.
    pub params_trainable: usize,
    /// BatchNorm running statistics.
    pub params_non_trainable: usize,
}

/// Summarises a built model whose variables are in `varmap`.
pub fn summarize(net: &Net, varmap: &VarMap) -> Result<Summary> {
    let device = varmap
        .all_vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let xs = Tensor::zeros((1, 1, 28, 28), DType::F32, &device)?;
    let shapes = net.trace_shapes(&xs)?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".to_string()))?;
    let mut layers = Vec::with_capacity(shapes.len());
    for StageTrace {
        name,
        kind,
        prefixes,
        dims,
    } in shapes
    {
        let prefixes: Vec<String> = prefixes.iter().map(|p| format!("{p}.")).collect();
        let params = data
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .map(|(_, v)| v.elem_count())
            .sum();
        layers.push(LayerSummary {
            name,
            kind: kind.to_string(),
            output_shape: dims[1..].to_vec(),
            params,
        });
    }
    let params_total = data.values().map(|v| v.elem_count()).sum();
    let params_trainable = data
        .iter()
        .filter(|(k, _)| is_trainable(k))
        .map(|(_, v)| v.elem_count())
        .sum();
    Ok(Summary {
        solution: net.config.solution,
        variant: net.config.variant,
        layers,
        params_total,
        params_trainable,
        params_non_trainable: params_total - params_trainable,
    })
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .layers
            .iter()
            .map(|l| format!("{} ({})", l.name, l.kind))
            .collect();
        // Keras's column widths, widened so long layer names keep a gap before the shape.
        let w = names.iter().map(|n| n.len() + 2).fold(32, usize::max);
        let rule = "=".repeat(w + 34);
        writeln!(f, "Model: \"{} ({})\"", self.solution, self.variant)?;
        writeln!(f, "{rule}")?;
        writeln!(
            f,
            "{:<w$}{:<22}{:>12}",
            "Layer (type)", "Output Shape", "Param #"
        )?;
        writeln!(f, "{rule}")?;
        for (l, name) in self.layers.iter().zip(&names) {
            let shape = format!(
                "(None, {})",
                l.output_shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            writeln!(f, "{name:<w$}{shape:<22}{:>12}", thousands(l.params))?;
        }
        writeln!(f, "{rule}")?;
        writeln!(f, "Total params: {}", thousands(self.params_total))?;
        writeln!(f, "Trainable params: {}", thousands(self.params_trainable))?;
        write!(
            f,
            "Non-trainable params: {}",
            thousands(self.params_non_trainable)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(8640), "8,640");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}

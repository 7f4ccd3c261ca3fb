//! A Keras `model.summary()` computed from an [`ArchSpec`] alone: every layer on its own row with its
//! output shape and parameters, then the totals. It does not depend on which kernels run the model.

use std::fmt;

use serde::Serialize;

use crate::plan::{plan, LayerSummary};
use crate::spec::{ArchSpec, SpecError};

/// Layers with output shapes and parameter counts, and the totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The model's name.
    pub name: String,
    /// One row per layer (a conv block's convolution, BatchNorm and pool are rows of their own).
    pub layers: Vec<LayerSummary>,
    /// All parameters, BatchNorm statistics included.
    pub params_total: usize,
    /// Parameters the optimizer trains.
    pub params_trainable: usize,
    /// BatchNorm running statistics.
    pub params_non_trainable: usize,
}

/// The summary of `spec` (an error when the spec does not describe a model).
pub fn summary(spec: &ArchSpec) -> Result<Summary, SpecError> {
    let plan = plan(spec)?;
    // A deskewing model's input transform is a row of its own, without parameters.
    let deskew = spec.deskew.then(|| LayerSummary {
        name: "deskew".into(),
        kind: "Deskew".into(),
        output_shape: crate::plan::INPUT.to_vec(),
        params: 0,
        non_trainable: 0,
        weights_of: None,
    });
    let layers: Vec<LayerSummary> = deskew.into_iter().chain(plan.rows().cloned()).collect();
    let params_total = layers.iter().map(|l| l.params).sum();
    let params_non_trainable = layers.iter().map(|l| l.non_trainable).sum();
    Ok(Summary {
        name: spec.label().to_string(),
        layers,
        params_total,
        params_trainable: params_total - params_non_trainable,
        params_non_trainable,
    })
}

/// `8640` as `8,640`.
pub fn thousands(n: usize) -> String {
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
            .map(|l| match &l.weights_of {
                Some(owner) => format!("{} ({}, weights of {owner})", l.name, l.kind),
                None => format!("{} ({})", l.name, l.kind),
            })
            .collect();
        // Keras's column widths, widened so long layer names keep a gap before the shape.
        let w = names.iter().map(|n| n.len() + 2).fold(32, usize::max);
        let rule = "=".repeat(w + 34);
        writeln!(f, "Model: \"{}\"", self.name)?;
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

    /// A tied convolution (`weights_of`) shows no parameters of its own and names the owner, whose
    /// weights the total counts once.
    #[test]
    fn a_tied_convolution_counts_its_weights_at_the_owner() {
        let spec = |tie: &str| {
            crate::ArchSpec::from_json(&format!(
                r#"{{ "layers": [
                {{ "type": "conv", "filters": 4, "kernel": 3 }},
                {{ "type": "conv", "filters": 4, "kernel": 3, "batch_norm": "after" }},
                {{ "type": "conv", "filters": 4, "kernel": 3, "batch_norm": "after"{tie} }},
                {{ "type": "global_avg_pool" }}, {{ "type": "dense", "units": 10 }} ] }}"#
            ))
            .unwrap()
        };
        let tied = super::summary(&spec(r#", "weights_of": 1"#)).unwrap();
        let untied = super::summary(&spec("")).unwrap();
        assert_eq!(tied.params_total, untied.params_total - (4 * 4 * 9 + 4));
        let row = tied
            .layers
            .iter()
            .find(|l| l.name == "block3.conv")
            .unwrap();
        assert_eq!(
            (row.params, row.weights_of.as_deref()),
            (0, Some("block2.conv"))
        );
        assert!(untied.layers.iter().all(|l| l.weights_of.is_none()));
        assert!(tied
            .to_string()
            .contains("block3.conv (Conv2D, weights of block2.conv)"));
    }
}

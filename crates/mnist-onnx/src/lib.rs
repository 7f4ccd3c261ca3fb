//! ONNX export of the MNIST Challenge models: any architecture ([`mnist_models::ArchSpec`]) with its
//! trained weights as a standard ONNX file that other runtimes (onnxruntime, tract, a browser, a phone)
//! run without candle.
//!
//! The file holds one graph, opset [`OPSET`]: input [`INPUT_NAME`] `[N, 1, 28, 28]` float32 (the pixels
//! divided by 255, in `[0, 1]`, light ink on black as MNIST; `N` is free), output [`OUTPUT_NAME`]
//! `[N, 10]` (the logits; their softmax gives the class probabilities). Each layer becomes the standard
//! operators that compute what [`mnist_models::build`] computes in inference mode (see `lower.rs`):
//! `Conv` (separable convolutions as a depthwise `Conv` with `group` = channels and a 1x1 `Conv`; Keras
//! 'same' padding as explicit, possibly asymmetric, pads), `Relu`, `BatchNormalization` (running
//! statistics), `MaxPool`, `Flatten`, `GlobalAveragePool`, `Gemm` and, for an inception module, its
//! branches and a `Concat` on the channels. Dropout is the identity at inference and leaves no node.
//!
//! ```no_run
//! use mnist_models::{pretrained, Solution, Variant};
//! let model = pretrained(Solution::Conv, Variant::Improved)?;
//! let bytes = mnist_onnx::export(model.config(), model.vars())?;
//! mnist_fs::write_bytes_atomic("conv-improved.onnx".as_ref(), &bytes)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod encode;
mod graph;
mod lower;

use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::VarMap;
use mnist_models::{ModelConfig, SpecError};

/// The name of the graph's input: `[N, 1, 28, 28]` float32 in `[0, 1]`.
pub const INPUT_NAME: &str = "input";
/// The name of the graph's output: the logits `[N, 10]`.
pub const OUTPUT_NAME: &str = "logits";
/// The ONNX operator set the graph is written for (default domain).
pub const OPSET: i64 = 13;

/// Why a model could not be exported. Messages say where in the architecture (`layers[3] (conv)`).
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The architecture does not describe a model.
    #[error("invalid architecture: {0}")]
    Spec(#[from] SpecError),
    /// A variable the architecture needs is not among the weights.
    #[error("{at}: no variable '{name}' in the weights (are they weights of another model?)")]
    MissingWeight {
        /// The layer (`layers[0] (conv)`).
        at: String,
        /// The variable.
        name: String,
    },
    /// A variable of another shape than the architecture needs.
    #[error(
        "{at}: variable '{name}' is {got:?}, the architecture needs {expected:?} (are they weights of another model?)"
    )]
    WeightShape {
        /// The layer.
        at: String,
        /// The variable.
        name: String,
        /// The shape the architecture needs.
        expected: Vec<usize>,
        /// The shape in the weights.
        got: Vec<usize>,
    },
    /// A layer (or an option of one) that the exporter cannot write as ONNX operators.
    #[error("{at}: cannot be exported to ONNX: {reason}")]
    Unsupported {
        /// The layer.
        at: String,
        /// Why.
        reason: String,
    },
    /// The protobuf encoder failed (a model over its 2 GiB limit).
    #[error("writing the ONNX protobuf: {0}")]
    Encode(String),
    /// A variable whose values could not be read.
    #[error("{at}: reading variable '{name}': {source}")]
    Candle {
        /// The layer.
        at: String,
        /// The variable.
        name: String,
        /// What candle said.
        source: Box<candle_core::Error>,
    },
}

/// The ONNX file (protobuf bytes) of the model `config` describes, with the weights in `vars` (a
/// trained model's variables, named as [`mnist_models::build`] names them).
pub fn export(config: &ModelConfig, vars: &VarMap) -> Result<Vec<u8>, OnnxError> {
    let weights: HashMap<String, Tensor> = {
        let data = vars.data().lock().map_err(|_| OnnxError::Unsupported {
            at: "the weights".into(),
            reason: "their lock is poisoned (a thread panicked while holding it)".into(),
        })?;
        data.iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect()
    };
    export_tensors(config, &weights)
}

/// [`export`] with the weights as a map from variable name to tensor (as
/// `candle_core::safetensors::load` reads a weights file).
pub fn export_tensors(
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<Vec<u8>, OnnxError> {
    let graph = lower::lower(&config.arch, weights)?;
    let label = config.label();
    tracing::debug!(
        solution = %config.solution,
        model = %label,
        nodes = graph.nodes.len(),
        initializers = graph.initializers.len(),
        "exporting to ONNX"
    );
    let meta = encode::Meta {
        graph_name: format!("{}-{label}", config.solution),
        doc: format!(
            "MNIST Challenge model {} ({label}). Input '{INPUT_NAME}': [N, 1, 28, 28] float32, the 28x28 \
             grey levels divided by 255 (light ink on black, as MNIST). Output '{OUTPUT_NAME}': [N, 10] \
             logits, one per digit; their softmax gives the probabilities.",
            config.solution
        ),
        props: vec![
            ("solution".into(), config.solution.to_string()),
            ("model".into(), label),
        ],
    };
    encode::encode(&graph, &meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use mnist_layers::init::SeededVarMap;
    use mnist_models::{builtin, ArchSpec, Solution, Variant};
    use onnx_protobuf::{Message, ModelProto};

    /// A model of `arch` with seeded random weights.
    fn model(arch: ArchSpec) -> (ModelConfig, VarMap) {
        let config = ModelConfig::custom(Solution::Conv, arch);
        let vars = SeededVarMap::new(3);
        config
            .build(
                vars.var_builder(DType::F32, &Device::Cpu),
                mnist_models::dropout_rng(3),
            )
            .unwrap();
        (config, vars.var_map().clone())
    }

    fn decode(bytes: &[u8]) -> ModelProto {
        ModelProto::parse_from_bytes(bytes).unwrap()
    }

    fn ints<'a>(m: &'a ModelProto, node: &str, attr: &str) -> &'a [i64] {
        let graph = m.graph.as_ref().unwrap();
        let n = graph
            .node
            .iter()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        &n.attribute.iter().find(|a| a.name == attr).unwrap().ints
    }

    #[test]
    fn every_builtin_model_exports_all_its_weights() {
        for s in Solution::ALL {
            for v in Variant::ALL {
                let spec = builtin(s, v);
                let (config, vars) = model(spec.clone());
                let m = decode(&export(&config, &vars).unwrap());
                assert_eq!(m.opset_import[0].version, OPSET);
                let graph = m.graph.unwrap();
                // The deskewing's constants (pixel coordinates, bounds) are no variables.
                let (constants, weights): (Vec<_>, Vec<_>) = graph
                    .initializer
                    .iter()
                    .partition(|t| t.name.starts_with("deskew."));
                assert_eq!(!constants.is_empty(), spec.deskew, "{s}-{v}: deskewing");
                let stored: usize = weights
                    .iter()
                    .map(|t| t.dims.iter().product::<i64>() as usize)
                    .sum();
                let params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
                assert_eq!(stored, params, "{s}-{v}: every variable, once");
                assert_eq!(graph.node.last().unwrap().output, [OUTPUT_NAME], "{s}-{v}");
                assert!(
                    graph.node.iter().all(|n| n.op_type != "Dropout"),
                    "{s}-{v}: dropout is the identity"
                );
            }
        }
    }

    #[test]
    fn same_padding_is_written_as_we_compute_it() {
        let arch = ArchSpec::from_json(
            r#"{ "layers": [
                { "type": "conv", "filters": 2, "kernel": 4, "padding": "same", "batch_norm": "before" },
                { "type": "max_pool", "kernel": 2, "stride": 1, "padding": "same" },
                { "type": "separable_conv", "filters": 3, "kernel": 3, "stride": 2, "padding": "same" },
                { "type": "global_avg_pool" },
                { "type": "dense", "units": 10 }
            ] }"#,
        )
        .unwrap();
        let (config, vars) = model(arch);
        let m = decode(&export(&config, &vars).unwrap());
        // [top, left, bottom, right]: Keras puts the odd pixel at the bottom/right.
        assert_eq!(ints(&m, "block1.conv", "pads"), [1, 1, 2, 2]);
        assert_eq!(ints(&m, "pool", "pads"), [0, 0, 1, 1]);
        assert_eq!(ints(&m, "pool", "strides"), [1, 1]);
        // 28 -> 14 with stride 2: total pad 1, at the bottom/right.
        assert_eq!(ints(&m, "block2.conv.depthwise", "pads"), [0, 0, 1, 1]);
        assert_eq!(ints(&m, "block2.conv.depthwise", "strides"), [2, 2]);
        let ops: Vec<String> = m
            .graph
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.clone())
            .collect();
        // BatchNorm before the activation: Conv, BatchNormalization, Relu.
        assert_eq!(
            ops,
            [
                "Conv",
                "BatchNormalization",
                "Relu",
                "MaxPool",
                "Conv",
                "Conv",
                "Relu",
                "GlobalAveragePool",
                "Flatten",
                "Gemm"
            ]
        );
    }

    #[test]
    fn weights_of_another_model_are_refused_naming_the_layer() {
        let (config, _) = model(builtin(Solution::Conv, Variant::Seed).clone());
        let (_, other) = model(builtin(Solution::Conv, Variant::Improved).clone());
        let err = export(&config, &other).unwrap_err().to_string();
        assert!(
            err.starts_with("layers[0] (conv): no variable 'conv1.weight'"),
            "{err}"
        );

        let (config, vars) = model(builtin(Solution::Conv, Variant::Seed).clone());
        let mut weights: HashMap<String, Tensor> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        weights.insert(
            "dense.weight".into(),
            Tensor::zeros((10, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = export_tensors(&config, &weights).unwrap_err().to_string();
        assert!(
            err.starts_with("layers[4] (dense): variable 'dense.weight' is [10, 3], the architecture needs [10, 250]"),
            "{err}"
        );
    }
}

//! Architectures as data: an [`ArchSpec`] is an ordered list of layer specs, read from and written to JSON.
//!
//! ```json
//! {
//!   "name": "small-conv",
//!   "batch_norm": { "momentum": 0.9 },
//!   "layers": [
//!     { "type": "conv", "filters": 8, "kernel": 3, "padding": "same", "batch_norm": "after" },
//!     { "type": "conv", "filters": 16, "kernel": 3, "batch_norm": "after", "pool": { "kernel": 2 } },
//!     { "type": "global_avg_pool" },
//!     { "type": "dense", "units": 10 }
//!   ]
//! }
//! ```
//!
//! Input channels are never written: each layer takes what the previous one gives, starting from the
//! `[1, 28, 28]` image. Fields left out take their defaults (see each type). [`ArchSpec::from_json`] checks
//! the whole description (every size, kernels against their inputs, a 10-output end; see
//! [`crate::plan`]) and names the layer and the problem in its error:
//! `layers[3] (conv): kernel 7 is larger than its 5x5 input`. Which kernels run a model, and whether its
//! layers are fused, is not part of the description: [`crate::build`] decides.

use std::fmt;
use std::path::Path;

use mnist_layers::{Activation, Padding, WeightInit};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ModelError;

/// A model: its layers in order, and how its variables are named.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchSpec {
    /// A name for people (the summary's title, the run's label).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// How variables are named in weights files (default [`Naming::Blocks`]).
    #[serde(default, skip_serializing_if = "is_default")]
    pub names: Naming,
    /// Settings of every BatchNorm in the model.
    #[serde(default, skip_serializing_if = "is_default")]
    pub batch_norm: BatchNormSpec,
    /// How every convolution's and dense layer's weights are drawn (default glorot-uniform, as Keras);
    /// biases start at zero.
    #[serde(default, skip_serializing_if = "is_default")]
    pub init: WeightInit,
    /// Deskew every input image before the first layer (`mnist_data::deskew_into`: sheared upright by
    /// its second moments and centred by its centre of mass), in training, evaluation and prediction
    /// alike. Off by default.
    #[serde(default, skip_serializing_if = "is_default")]
    pub deskew: bool,
    /// The layers, input first.
    pub layers: Vec<LayerSpec>,
}

/// How the variables of a model are named (the keys of its weights file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    /// Every conv layer is a block: `block1.conv.weight`, `block1.bn.gamma`, ...; other layers are
    /// named by kind (`dense`, `inception`, numbered `dense1`, `dense2` when there are several).
    #[default]
    Blocks,
    /// As the original Keras notebook: every layer named by kind (`conv1`, `bn1`, `pool1`, `conv2`, ...,
    /// numbered only when the kind occurs more than once).
    Keras,
}

/// Settings shared by every BatchNorm of a model (Keras's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchNormSpec {
    /// `running = momentum * running + (1 - momentum) * batch` (default 0.99).
    pub momentum: f64,
    /// Added to the variance (default 1e-3).
    pub eps: f64,
}

impl Default for BatchNormSpec {
    fn default() -> Self {
        Self {
            momentum: 0.99,
            eps: 1e-3,
        }
    }
}

/// One layer of a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerSpec {
    /// A convolution block: convolution, activation, optional BatchNorm, optional max-pool.
    Conv(ConvSpec),
    /// The same with a Keras separable convolution (depthwise, no bias, then pointwise with the bias).
    SeparableConv(ConvSpec),
    /// Max pooling.
    MaxPool(PoolSpec),
    /// BatchNorm over the channels.
    BatchNorm,
    /// Inverted dropout.
    Dropout(DropoutSpec),
    /// `[c, h, w] -> [c * h * w]`.
    Flatten,
    /// `[c, h, w] -> [c]` (the mean of each channel).
    GlobalAvgPool,
    /// A dense (fully connected) layer.
    Dense(DenseSpec),
    /// Parallel branches over the same input, concatenated along the channels.
    Inception(InceptionSpec),
    /// Squeeze-and-excitation: each channel scaled by a learned gate computed from all channels' means.
    SqueezeExcite(SqueezeExciteSpec),
}

/// A convolution block (plain or separable).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvSpec {
    /// Output channels.
    pub filters: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride (default 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub stride: usize,
    /// Keras padding: `valid` (default) or `same`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub padding: Padding,
    /// `relu` (default), `none` or `silu`.
    #[serde(default = "relu", skip_serializing_if = "is_relu")]
    pub activation: Activation,
    /// A bias per output channel (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub bias: bool,
    /// Where a BatchNorm goes: `none` (default), `after` the activation (as the original models) or
    /// `before` it.
    #[serde(default, skip_serializing_if = "is_default")]
    pub batch_norm: BnPlace,
    /// A max-pool at the end of the block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolSpec>,
    /// Weight tying: the convolution uses the weights (and bias) of the earlier top-level layer
    /// `layers[N]`, a convolution of the same kind and shape, applied again with this block's own
    /// BatchNorm, stride, padding and pool (none of its own weights; their gradients add up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_of: Option<usize>,
    /// A residual (identity) shortcut, as in ResNet (He et al. 2016): the input of the top-level layer
    /// `layers[N]` (this layer or an earlier one) is added to this block's output, after its pool if
    /// any; the two must have the same shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shortcut: Option<usize>,
}

impl ConvSpec {
    /// The activation the convolution applies itself: with the BatchNorm before the activation, the
    /// activation moves behind the BatchNorm (every lowering follows this: `mnist_models::build`, the
    /// ONNX export).
    pub fn conv_activation(&self) -> Activation {
        match self.batch_norm {
            BnPlace::Before => Activation::None,
            BnPlace::None | BnPlace::After => self.activation,
        }
    }

    /// The activation that follows the BatchNorm as a layer of its own: only with the BatchNorm placed
    /// before an activation other than none (the other half of [`Self::conv_activation`]).
    pub fn activation_after_bn(&self) -> Option<Activation> {
        (self.batch_norm == BnPlace::Before && self.activation != Activation::None)
            .then_some(self.activation)
    }
}

/// Where a conv block's BatchNorm goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BnPlace {
    /// No BatchNorm.
    #[default]
    None,
    /// convolution -> activation -> BatchNorm (the original models).
    After,
    /// convolution -> BatchNorm -> activation.
    Before,
}

/// Max pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Square window size.
    pub kernel: usize,
    /// Stride (default: the kernel size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    /// Keras padding (padded cells count as `-inf`): `valid` (default) or `same`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub padding: Padding,
}

impl PoolSpec {
    /// The stride, the kernel size unless given.
    pub fn stride(&self) -> usize {
        self.stride.unwrap_or(self.kernel)
    }
}

/// Dropout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropoutSpec {
    /// The probability of dropping a value, in `[0, 1)`.
    pub rate: f32,
}

/// A dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseSpec {
    /// Output size.
    pub units: usize,
    /// `none` (default: the logits), `relu` or `silu`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub activation: Activation,
}

/// A squeeze-and-excitation layer (Hu et al. 2018): `[c, h, w] -> [c, h, w]`, the channel means through
/// a dense layer of `units` with ReLU and one back to `c` with a sigmoid, the result scaling each channel
/// (`2 c units + units + c` parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqueezeExciteSpec {
    /// The bottleneck's size (Hu et al. use `c / 16`; at a few dozen channels, a handful).
    pub units: usize,
}

/// An inception module.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InceptionSpec {
    /// The branches, each a list of `conv`, `separable_conv`, `max_pool`, `batch_norm` and `dropout`
    /// layers (an empty branch passes the input through), concatenated in this order.
    pub branches: Vec<Vec<LayerSpec>>,
    /// A BatchNorm over the concatenated channels (default false).
    #[serde(default, skip_serializing_if = "is_default")]
    pub batch_norm: bool,
}

/// The fields of an inception module besides its branches.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InceptionRest {
    #[serde(default)]
    batch_norm: bool,
}

/// The top-level fields besides the layers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchHead {
    #[serde(default)]
    name: String,
    #[serde(default)]
    names: Naming,
    #[serde(default)]
    batch_norm: BatchNormSpec,
    #[serde(default)]
    init: WeightInit,
    #[serde(default)]
    deskew: bool,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}
fn one() -> usize {
    1
}
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn relu() -> Activation {
    Activation::Relu
}
fn is_relu(a: &Activation) -> bool {
    *a == Activation::Relu
}
fn yes() -> bool {
    true
}
fn is_true(v: &bool) -> bool {
    *v
}

/// A problem with an architecture description; the message says where (`layers[3] (conv): ...`).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The text is not JSON.
    #[error("malformed JSON: {0}")]
    Json(serde_json::Error),
    /// The JSON does not describe a model (an unknown layer or field, a missing or invalid value, sizes
    /// that do not fit).
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

/// The layer types, as written in `"type"`.
pub const LAYER_TYPES: [&str; 10] = [
    "conv",
    "separable_conv",
    "max_pool",
    "batch_norm",
    "dropout",
    "flatten",
    "global_avg_pool",
    "dense",
    "inception",
    "squeeze_excite",
];

impl LayerSpec {
    /// The layer's `"type"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            LayerSpec::Conv(_) => "conv",
            LayerSpec::SeparableConv(_) => "separable_conv",
            LayerSpec::MaxPool(_) => "max_pool",
            LayerSpec::BatchNorm => "batch_norm",
            LayerSpec::Dropout(_) => "dropout",
            LayerSpec::Flatten => "flatten",
            LayerSpec::GlobalAvgPool => "global_avg_pool",
            LayerSpec::Dense(_) => "dense",
            LayerSpec::Inception(_) => "inception",
            LayerSpec::SqueezeExcite(_) => "squeeze_excite",
        }
    }

    /// The layer whose input a residual shortcut adds to this one's output ([`ConvSpec::shortcut`]).
    pub fn shortcut(&self) -> Option<usize> {
        match self {
            LayerSpec::Conv(c) | LayerSpec::SeparableConv(c) => c.shortcut,
            _ => None,
        }
    }

    /// Reads one layer from JSON; `at` says where it is (`layers[3]`) in errors.
    fn from_value(v: &Value, at: &str) -> Result<Self, SpecError> {
        let Value::Object(map) = v else {
            return Err(invalid(format!("{at}: a layer is a JSON object, got {v}")));
        };
        let kind = match map.get("type") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(invalid(format!(
                    "{at}: \"type\" must be a string, got {other}"
                )))
            }
            None => {
                return Err(invalid(format!(
                    "{at}: no \"type\" (one of {})",
                    LAYER_TYPES.join(", ")
                )))
            }
        };
        let mut rest = map.clone();
        rest.remove("type");
        // A layer's fields as `T`, a wrong value named by its path.
        fn fields<T: serde::de::DeserializeOwned>(
            rest: Map<String, Value>,
        ) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
            serde_path_to_error::deserialize(Value::Object(rest))
        }
        // Errors name the field (`layers[1] (conv): shortcut: invalid value: integer `-1`, expected usize`).
        let err = |e: serde_path_to_error::Error<serde_json::Error>| {
            let path = e.path().to_string();
            match path.as_str() {
                "." | "" => invalid(format!("{at} ({kind}): {}", e.inner())),
                _ => invalid(format!("{at} ({kind}): {path}: {}", e.inner())),
            }
        };
        let no_fields = |rest: &Map<String, Value>| match rest.keys().next() {
            Some(k) => Err(invalid(format!(
                "{at} ({kind}): unknown field `{k}` ({kind} takes no fields)"
            ))),
            None => Ok(()),
        };
        Ok(match kind {
            "conv" => LayerSpec::Conv(fields(rest).map_err(err)?),
            "separable_conv" => LayerSpec::SeparableConv(fields(rest).map_err(err)?),
            "max_pool" => LayerSpec::MaxPool(fields(rest).map_err(err)?),
            "dropout" => LayerSpec::Dropout(fields(rest).map_err(err)?),
            "dense" => LayerSpec::Dense(fields(rest).map_err(err)?),
            "squeeze_excite" => LayerSpec::SqueezeExcite(fields(rest).map_err(err)?),
            "batch_norm" => {
                no_fields(&rest)?;
                LayerSpec::BatchNorm
            }
            "flatten" => {
                no_fields(&rest)?;
                LayerSpec::Flatten
            }
            "global_avg_pool" => {
                no_fields(&rest)?;
                LayerSpec::GlobalAvgPool
            }
            "inception" => {
                let branches = match rest.remove("branches") {
                    Some(Value::Array(bs)) => bs,
                    Some(other) => {
                        return Err(invalid(format!(
                            "{at} (inception): \"branches\" must be a list of lists of layers, got {other}"
                        )))
                    }
                    None => return Err(invalid(format!("{at} (inception): missing field `branches`"))),
                };
                let rest: InceptionRest = fields(rest).map_err(err)?;
                let mut out = Vec::with_capacity(branches.len());
                for (i, branch) in branches.iter().enumerate() {
                    let Value::Array(layers) = branch else {
                        return Err(invalid(format!(
                            "{at} (inception): branches[{i}] must be a list of layers, got {branch}"
                        )));
                    };
                    let layers = layers
                        .iter()
                        .enumerate()
                        .map(|(j, l)| {
                            LayerSpec::from_value(
                                l,
                                &format!("{at} (inception): branches[{i}][{j}]"),
                            )
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    out.push(layers);
                }
                LayerSpec::Inception(InceptionSpec {
                    branches: out,
                    batch_norm: rest.batch_norm,
                })
            }
            other => {
                return Err(invalid(format!(
                    "{at}: unknown layer type '{other}' (one of {})",
                    LAYER_TYPES.join(", ")
                )))
            }
        })
    }
}

impl ArchSpec {
    /// Reads a description from parsed JSON, without checking that its sizes fit (see
    /// [`ArchSpec::from_json`]).
    pub fn from_value(v: &Value) -> Result<Self, SpecError> {
        let Value::Object(map) = v else {
            return Err(invalid(format!(
                "an architecture is a JSON object with \"layers\", got {}",
                short(v)
            )));
        };
        let mut head = map.clone();
        let layers = match head.remove("layers") {
            Some(Value::Array(layers)) => layers,
            Some(other) => {
                return Err(invalid(format!(
                    "\"layers\" must be a list of layers, got {}",
                    short(&other)
                )))
            }
            None => return Err(invalid("missing field `layers` (the list of layers)")),
        };
        let head: ArchHead = serde_json::from_value(Value::Object(head))
            .map_err(|e| invalid(format!("top level: {e}")))?;
        let layers = layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerSpec::from_value(l, &format!("layers[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: head.name,
            names: head.names,
            batch_norm: head.batch_norm,
            init: head.init,
            deskew: head.deskew,
            layers,
        })
    }

    /// Reads and checks a description from JSON text: malformed JSON, unknown layers or fields, missing
    /// or invalid values and sizes that do not fit are errors that say where.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        let v: Value = serde_json::from_str(text).map_err(SpecError::Json)?;
        let spec = Self::from_value(&v)?;
        crate::plan::plan(&spec)?;
        Ok(spec)
    }

    /// [`ArchSpec::from_json`] of a file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::SpecFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text).map_err(|e| ModelError::SpecFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The description as pretty JSON, which [`ArchSpec::from_json`] reads back to the same spec.
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The name, or `custom` when it has none.
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            "custom"
        } else {
            &self.name
        }
    }
}

/// A JSON value in errors, cut short.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.floor_char_boundary(57)])
    } else {
        s
    }
}

impl<'de> Deserialize<'de> for ArchSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let spec = ArchSpec::from_value(&v).map_err(serde::de::Error::custom)?;
        crate::plan::plan(&spec).map_err(serde::de::Error::custom)?;
        Ok(spec)
    }
}

impl fmt::Display for ArchSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

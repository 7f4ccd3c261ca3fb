//! The one walk over an [`ArchSpec`]: shapes, parameter counts and variable names of every layer, and
//! every check of the description. The summary, the lowering to a [`crate::Net`] and the export read it.

use std::collections::HashMap;
use std::fmt;

use mnist_layers::Padding;
use serde::Serialize;

use crate::spec::{
    ArchSpec, BnPlace, ConvSpec, InceptionSpec, LayerSpec, Naming, PoolSpec, SpecError,
};

/// The model's input: one 28x28 grey image.
pub const INPUT: Dims = Dims::Map { c: 1, h: 28, w: 28 };

/// The number of classes, the size the model must end at.
pub const OUTPUTS: usize = 10;

/// The shape of one image's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dims {
    /// Feature maps `[c, h, w]`.
    Map {
        /// Channels.
        c: usize,
        /// Height.
        h: usize,
        /// Width.
        w: usize,
    },
    /// A vector `[n]`.
    Flat(usize),
}

impl Dims {
    /// As a list (`[c, h, w]` or `[n]`).
    pub fn to_vec(self) -> Vec<usize> {
        match self {
            Dims::Map { c, h, w } => vec![c, h, w],
            Dims::Flat(n) => vec![n],
        }
    }

    /// The channels of feature maps.
    pub fn channels(self) -> Option<usize> {
        match self {
            Dims::Map { c, .. } => Some(c),
            Dims::Flat(_) => None,
        }
    }
}

impl fmt::Display for Dims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dims::Map { c, h, w } => write!(f, "{c}x{h}x{w}"),
            Dims::Flat(n) => write!(f, "{n} values"),
        }
    }
}

/// One row of a summary: a layer (or a part of a conv block) with its output and parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSummary {
    /// The prefix of its variables (`block1.conv`), or its name when it has none (`block1.pool`).
    pub name: String,
    /// The Keras layer type (`Conv2D`, `BatchNormalization`, ...).
    pub kind: String,
    /// Output shape without the batch dimension.
    pub output_shape: Vec<usize>,
    /// Parameters, BatchNorm statistics included.
    pub params: usize,
    /// Of which not trained (BatchNorm running statistics).
    pub non_trainable: usize,
    /// A tied convolution's owner (`weights_of`): the prefix of the weights it uses, counted there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights_of: Option<String>,
}

/// The variable prefixes of a conv block's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNames {
    /// The convolution (`block1.conv`, `conv1`).
    pub conv: String,
    /// The prefix of the convolution's variables: `conv`, or the tied layer's where the spec says
    /// `weights_of` (`block5.conv`).
    pub weights: String,
    /// The BatchNorm (`block1.bn`, `bn1`).
    pub bn: String,
    /// The activation after a BatchNorm placed before it (`block1.relu`).
    pub act: String,
    /// The pool (`block1.pool`, `pool1`).
    pub pool: String,
    /// The addition of a residual shortcut (`block1.add`, `add1`).
    pub add: String,
}

/// One top-level layer as planned: its spec, input and output, names and summary rows.
#[derive(Debug, Clone)]
pub struct Planned<'a> {
    /// The layer.
    pub spec: &'a LayerSpec,
    /// Its input.
    pub input: Dims,
    /// Its output.
    pub output: Dims,
    /// Its name (the variable prefix of a layer that has variables; a conv block's parts are in
    /// `block`; an inception module's branch layers live under `{name}.branch{i}.{j}` and its
    /// BatchNorm under `{name}_bn`).
    pub name: String,
    /// The names of a conv block's parts.
    pub block: Option<BlockNames>,
    /// Its rows in the summary.
    pub rows: Vec<LayerSummary>,
}

/// The planned layers of a model.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// The top-level layers.
    pub layers: Vec<Planned<'a>>,
}

impl Plan<'_> {
    /// Every summary row, in order.
    pub fn rows(&self) -> impl Iterator<Item = &LayerSummary> {
        self.layers.iter().flat_map(|l| l.rows.iter())
    }
}

/// The name of the BatchNorm after an inception module's concatenation.
pub fn inception_bn_name(module: &str) -> String {
    format!("{module}_bn")
}

/// The variable prefix of layer `j` of branch `i` of an inception module.
pub fn branch_layer_name(module: &str, i: usize, j: usize) -> String {
    format!("{module}.branch{i}.{j}")
}

fn conv_kind(separable: bool) -> &'static str {
    if separable {
        "SeparableConv2D"
    } else {
        "Conv2D"
    }
}

fn row(name: &str, kind: &str, output: Dims, params: usize, non_trainable: usize) -> LayerSummary {
    LayerSummary {
        name: name.to_string(),
        kind: kind.to_string(),
        output_shape: output.to_vec(),
        params,
        non_trainable,
        weights_of: None,
    }
}

/// Where an error is: `layers[3] (conv)`.
struct At<'s>(&'s str, &'static str);

impl At<'_> {
    fn err(&self, msg: impl fmt::Display) -> SpecError {
        SpecError::Invalid(format!("{} ({}): {msg}", self.0, self.1))
    }
}

fn positive(at: &At, field: &str, v: usize) -> Result<(), SpecError> {
    if v == 0 {
        Err(at.err(format!("{field} must be at least 1, got 0")))
    } else {
        Ok(())
    }
}

/// The feature maps a layer needs, or an error naming what it got.
fn map_input(at: &At, input: Dims) -> Result<(usize, usize, usize), SpecError> {
    match input {
        Dims::Map { c, h, w } => Ok((c, h, w)),
        Dims::Flat(n) => Err(at.err(format!(
            "needs [c, h, w] feature maps, but its input is flat ({n} values): put it before the flatten / global_avg_pool layer"
        ))),
    }
}

/// Output size of a window op along one axis.
fn window(
    at: &At,
    what: &str,
    (h, w): (usize, usize),
    k: usize,
    stride: usize,
    padding: Padding,
) -> Result<(usize, usize), SpecError> {
    if padding == Padding::Valid && (k > h || k > w) {
        return Err(at.err(format!("{what} {k} is larger than its {h}x{w} input")));
    }
    let out = |n: usize| match padding {
        Padding::Valid => (n - k) / stride + 1,
        Padding::Same => n.div_ceil(stride),
    };
    Ok((out(h), out(w)))
}

fn check_pool(at: &At, p: &PoolSpec, (h, w): (usize, usize)) -> Result<(usize, usize), SpecError> {
    positive(at, "pool kernel", p.kernel)?;
    positive(at, "pool stride", p.stride())?;
    window(at, "pool", (h, w), p.kernel, p.stride(), p.padding)
}

/// A convolution's output and parameters (the convolution alone, BatchNorm and pool aside).
fn conv_shape(
    at: &At,
    c: &ConvSpec,
    separable: bool,
    (ci, h, w): (usize, usize, usize),
) -> Result<(Dims, usize), SpecError> {
    positive(at, "filters", c.filters)?;
    positive(at, "kernel", c.kernel)?;
    positive(at, "stride", c.stride)?;
    let (oh, ow) = window(at, "kernel", (h, w), c.kernel, c.stride, c.padding)?;
    let kk = c.kernel * c.kernel;
    let bias = if c.bias { c.filters } else { 0 };
    let params = if separable {
        ci * kk + c.filters * ci + bias
    } else {
        c.filters * ci * kk + bias
    };
    Ok((
        Dims::Map {
            c: c.filters,
            h: oh,
            w: ow,
        },
        params,
    ))
}

/// The kind of each named part, for numbering (`conv1`, `conv2`) in [`Naming::Keras`] and for the
/// layers named by kind in [`Naming::Blocks`].
fn part_kinds(spec: &ArchSpec) -> Vec<Vec<&'static str>> {
    spec.layers
        .iter()
        .map(|l| match l {
            LayerSpec::Conv(c) | LayerSpec::SeparableConv(c) => {
                if spec.names == Naming::Blocks {
                    return vec!["block"];
                }
                let mut parts = vec![if matches!(l, LayerSpec::Conv(_)) {
                    "conv"
                } else {
                    "sepconv"
                }];
                if c.batch_norm != BnPlace::None {
                    parts.push("bn");
                }
                if let Some(act) = c.activation_after_bn() {
                    parts.push(act.name());
                }
                if c.pool.is_some() {
                    parts.push("pool");
                }
                if c.shortcut.is_some() {
                    parts.push("add");
                }
                parts
            }
            LayerSpec::MaxPool(_) => vec!["pool"],
            LayerSpec::BatchNorm => vec!["bn"],
            LayerSpec::Dropout(_) => vec!["dropout"],
            LayerSpec::Flatten => vec!["flatten"],
            LayerSpec::GlobalAvgPool => vec!["gap"],
            LayerSpec::Dense(_) => vec!["dense"],
            LayerSpec::Inception(_) => vec!["inception"],
            LayerSpec::SqueezeExcite(_) => vec!["se"],
        })
        .collect()
}

/// Names every part: a kind that occurs once keeps its bare name, others are numbered from 1; blocks
/// are always numbered.
fn part_names(spec: &ArchSpec) -> Vec<Vec<String>> {
    let kinds = part_kinds(spec);
    let mut total: HashMap<&str, usize> = HashMap::new();
    for k in kinds.iter().flatten() {
        *total.entry(k).or_default() += 1;
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    kinds
        .iter()
        .map(|parts| {
            parts
                .iter()
                .map(|k| {
                    let n = seen.entry(k).or_default();
                    *n += 1;
                    if *k == "block" || total[k] > 1 {
                        format!("{k}{n}")
                    } else {
                        k.to_string()
                    }
                })
                .collect()
        })
        .collect()
}

/// The variable prefix of the convolution `layers[n]` that `layer` (planned with `ci` input channels)
/// ties its weights to, or an error: `n` must be an earlier top-level conv layer of the same kind that
/// owns its weights, with the same input channels, filters, kernel and bias.
fn tied_weights(
    at: &At,
    n: usize,
    layer: &LayerSpec,
    ci: usize,
    earlier: &[Planned],
) -> Result<String, SpecError> {
    let Some(owner) = earlier.get(n) else {
        return Err(at.err(format!(
            "weights_of {n}: layers[{n}] is not an earlier layer (a layer ties to one before it)"
        )));
    };
    let (c, o) = match (layer, owner.spec) {
        (LayerSpec::Conv(c), LayerSpec::Conv(o))
        | (LayerSpec::SeparableConv(c), LayerSpec::SeparableConv(o)) => (c, o),
        _ => {
            return Err(at.err(format!(
                "weights_of {n}: layers[{n}] is a {} layer, not a {} layer",
                owner.spec.type_name(),
                layer.type_name()
            )))
        }
    };
    if let Some(m) = o.weights_of {
        return Err(at.err(format!(
            "weights_of {n}: layers[{n}] ties its own weights to layers[{m}]; name layers[{m}]"
        )));
    }
    let oci = owner.input.channels().unwrap_or(0);
    if (ci, c.filters, c.kernel, c.bias) != (oci, o.filters, o.kernel, o.bias) {
        return Err(at.err(format!(
            "weights_of {n}: its weights would be {ci} -> {} channels, kernel {}, bias {}, but layers[{n}]'s are {oci} -> {} channels, kernel {}, bias {}",
            c.filters, c.kernel, c.bias, o.filters, o.kernel, o.bias
        )));
    }
    Ok(owner
        .block
        .as_ref()
        .map(|b| b.weights.clone())
        .unwrap_or_default())
}

/// Checks the residual shortcut of the layer planned after `earlier` (with `input`, giving `out`) from
/// the input of `layers[n]`: `n` must be this layer or an earlier one, and that input the shape of `out`.
fn shortcut_from(
    at: &At,
    n: usize,
    input: Dims,
    out: Dims,
    earlier: &[Planned],
) -> Result<(), SpecError> {
    let from = match earlier.get(n) {
        Some(l) => l.input,
        None if n == earlier.len() => input,
        None => {
            return Err(at.err(format!(
                "shortcut {n}: layers[{n}] is not this layer or an earlier one (a shortcut adds the input of a layer at or before the one it ends at)"
            )))
        }
    };
    if from != out {
        return Err(at.err(format!(
            "shortcut {n}: the input of layers[{n}] is {from}, but this layer's output is {out}; a shortcut adds maps of the same shape (the same channels; pad 'same', stride 1 and no pool in between)"
        )));
    }
    Ok(())
}

/// Plans (and so checks) a model: every layer's input and output, names and parameters; the model must
/// end in 10 outputs.
pub fn plan(spec: &ArchSpec) -> Result<Plan<'_>, SpecError> {
    if spec.layers.is_empty() {
        return Err(SpecError::Invalid(
            "\"layers\" is empty: a model needs at least one layer".into(),
        ));
    }
    let bn = spec.batch_norm;
    if !(bn.eps.is_finite() && bn.eps > 0.0) {
        return Err(SpecError::Invalid(format!(
            "batch_norm.eps must be a positive number, got {}",
            bn.eps
        )));
    }
    if !(0.0..=1.0).contains(&bn.momentum) {
        return Err(SpecError::Invalid(format!(
            "batch_norm.momentum must be in [0, 1], got {}",
            bn.momentum
        )));
    }
    let names = part_names(spec);
    let mut dims = INPUT;
    let mut layers = Vec::with_capacity(spec.layers.len());
    for (i, (layer, names)) in spec.layers.iter().zip(names).enumerate() {
        let loc = format!("layers[{i}]");
        let at = At(&loc, layer.type_name());
        let planned = plan_layer(spec, layer, &at, dims, names, &layers)?;
        dims = planned.output;
        layers.push(planned);
    }
    if dims != Dims::Flat(OUTPUTS) {
        return Err(SpecError::Invalid(format!(
            "the model ends in {dims}, not {OUTPUTS} outputs: end it with a dense layer of {OUTPUTS} units"
        )));
    }
    Ok(Plan { layers })
}

fn plan_layer<'a>(
    spec: &ArchSpec,
    layer: &'a LayerSpec,
    at: &At,
    input: Dims,
    names: Vec<String>,
    earlier: &[Planned<'a>],
) -> Result<Planned<'a>, SpecError> {
    let mut rows = Vec::new();
    let mut block = None;
    let first = names.first().cloned().unwrap_or_default();
    let output = match layer {
        LayerSpec::Conv(c) | LayerSpec::SeparableConv(c) => {
            let separable = matches!(layer, LayerSpec::SeparableConv(_));
            let (ci, h, w) = map_input(at, input)?;
            let (conv_out, own_params) = conv_shape(at, c, separable, (ci, h, w))?;
            let tied = match c.weights_of {
                Some(n) => Some(tied_weights(at, n, layer, ci, earlier)?),
                None => None,
            };
            // A tied convolution's weights are counted once, at the layer that owns them.
            let params = if tied.is_some() { 0 } else { own_params };
            let mut parts = match spec.names {
                Naming::Blocks => BlockNames {
                    conv: format!("{first}.conv"),
                    weights: format!("{first}.conv"),
                    bn: format!("{first}.bn"),
                    act: format!("{first}.{}", c.activation.name()),
                    pool: format!("{first}.pool"),
                    add: format!("{first}.add"),
                },
                Naming::Keras => {
                    // The block's parts in `part_kinds`'s order, each named only where it exists.
                    let mut it = names.iter().skip(1);
                    let mut part = |present: bool| match present {
                        true => it.next().cloned().unwrap_or_default(),
                        false => String::new(),
                    };
                    let bn = part(c.batch_norm != BnPlace::None);
                    let act = part(c.activation_after_bn().is_some());
                    let pool = part(c.pool.is_some());
                    let add = part(c.shortcut.is_some());
                    BlockNames {
                        conv: first.clone(),
                        weights: first.clone(),
                        bn,
                        act,
                        pool,
                        add,
                    }
                }
            };
            let mut conv_row = row(&parts.conv, conv_kind(separable), conv_out, params, 0);
            if let Some(owner) = tied {
                conv_row.weights_of = Some(owner.clone());
                parts.weights = owner;
            }
            rows.push(conv_row);
            if c.batch_norm != BnPlace::None {
                rows.push(row(
                    &parts.bn,
                    "BatchNormalization",
                    conv_out,
                    4 * c.filters,
                    2 * c.filters,
                ));
                if let Some(act) = c.activation_after_bn() {
                    rows.push(row(&parts.act, act.keras_layer(), conv_out, 0, 0));
                }
            }
            let mut out = conv_out;
            if let Some(p) = &c.pool {
                let (oh, ow) = check_pool(at, p, (h_of(conv_out), w_of(conv_out)))?;
                out = Dims::Map {
                    c: c.filters,
                    h: oh,
                    w: ow,
                };
                rows.push(row(&parts.pool, "MaxPooling2D", out, 0, 0));
            }
            if let Some(n) = c.shortcut {
                shortcut_from(at, n, input, out, earlier)?;
                rows.push(row(&parts.add, "Add", out, 0, 0));
            }
            block = Some(parts);
            out
        }
        LayerSpec::MaxPool(p) => {
            let (c, h, w) = map_input(at, input)?;
            let (oh, ow) = check_pool(at, p, (h, w))?;
            let out = Dims::Map { c, h: oh, w: ow };
            rows.push(row(&first, "MaxPooling2D", out, 0, 0));
            out
        }
        LayerSpec::BatchNorm => {
            let (c, _, _) = map_input(at, input)?;
            rows.push(row(&first, "BatchNormalization", input, 4 * c, 2 * c));
            input
        }
        LayerSpec::Dropout(d) => {
            if !(0.0..1.0).contains(&d.rate) {
                return Err(at.err(format!("rate must be in [0, 1), got {}", d.rate)));
            }
            rows.push(row(&first, "Dropout", input, 0, 0));
            input
        }
        LayerSpec::Flatten => {
            let (c, h, w) = map_input(at, input)?;
            let out = Dims::Flat(c * h * w);
            rows.push(row(&first, "Flatten", out, 0, 0));
            out
        }
        LayerSpec::GlobalAvgPool => {
            let (c, _, _) = map_input(at, input)?;
            let out = Dims::Flat(c);
            rows.push(row(&first, "GlobalAveragePooling2D", out, 0, 0));
            out
        }
        LayerSpec::Dense(d) => {
            positive(at, "units", d.units)?;
            let n = match input {
                Dims::Flat(n) => n,
                Dims::Map { .. } => {
                    return Err(at.err(format!(
                        "needs a flat input, but its input is {input}: add a flatten or global_avg_pool layer before it"
                    )))
                }
            };
            let out = Dims::Flat(d.units);
            rows.push(row(&first, "Dense", out, n * d.units + d.units, 0));
            out
        }
        LayerSpec::Inception(m) => plan_inception(at, m, input, &first, &mut rows)?,
        LayerSpec::SqueezeExcite(se) => {
            positive(at, "units", se.units)?;
            let (c, _, _) = map_input(at, input)?;
            let params = 2 * c * se.units + se.units + c;
            rows.push(row(&first, "SqueezeExcite", input, params, 0));
            input
        }
    };
    Ok(Planned {
        spec: layer,
        input,
        output,
        name: first,
        block,
        rows,
    })
}

fn h_of(d: Dims) -> usize {
    match d {
        Dims::Map { h, .. } => h,
        Dims::Flat(_) => 1,
    }
}

fn w_of(d: Dims) -> usize {
    match d {
        Dims::Map { w, .. } => w,
        Dims::Flat(_) => 1,
    }
}

fn plan_inception(
    at: &At,
    m: &InceptionSpec,
    input: Dims,
    name: &str,
    rows: &mut Vec<LayerSummary>,
) -> Result<Dims, SpecError> {
    let (c0, h0, w0) = map_input(at, input)?;
    if m.branches.is_empty() {
        return Err(at.err("\"branches\" is empty: an inception module needs at least one branch"));
    }
    let mut ends: Vec<(usize, usize, usize)> = Vec::with_capacity(m.branches.len());
    for (i, branch) in m.branches.iter().enumerate() {
        let mut dims = (c0, h0, w0);
        for (j, layer) in branch.iter().enumerate() {
            let loc = format!("{} ({}): branches[{i}][{j}]", at.0, at.1);
            let bat = At(&loc, layer.type_name());
            let lname = branch_layer_name(name, i, j);
            let d = Dims::Map {
                c: dims.0,
                h: dims.1,
                w: dims.2,
            };
            dims = match layer {
                LayerSpec::Conv(c) | LayerSpec::SeparableConv(c) => {
                    if c.batch_norm != BnPlace::None || c.pool.is_some() {
                        return Err(bat.err(
                            "inside a branch, write a BatchNorm or a pool as a batch_norm or max_pool layer of its own",
                        ));
                    }
                    if c.weights_of.is_some() {
                        return Err(bat.err("weights_of ties top-level layers only, not a branch's"));
                    }
                    if c.shortcut.is_some() {
                        return Err(bat.err(
                            "a shortcut joins top-level layers only, not a branch's layers",
                        ));
                    }
                    let separable = matches!(layer, LayerSpec::SeparableConv(_));
                    let (out, params) = conv_shape(&bat, c, separable, dims)?;
                    rows.push(row(&lname, conv_kind(separable), out, params, 0));
                    (c.filters, h_of(out), w_of(out))
                }
                LayerSpec::MaxPool(p) => {
                    let (oh, ow) = check_pool(&bat, p, (dims.1, dims.2))?;
                    let out = (dims.0, oh, ow);
                    rows.push(row(&lname, "MaxPooling2D", Dims::Map { c: out.0, h: oh, w: ow }, 0, 0));
                    out
                }
                LayerSpec::BatchNorm => {
                    rows.push(row(&lname, "BatchNormalization", d, 4 * dims.0, 2 * dims.0));
                    dims
                }
                LayerSpec::Dropout(dr) => {
                    if !(0.0..1.0).contains(&dr.rate) {
                        return Err(bat.err(format!("rate must be in [0, 1), got {}", dr.rate)));
                    }
                    rows.push(row(&lname, "Dropout", d, 0, 0));
                    dims
                }
                other => {
                    return Err(bat.err(format!(
                        "a branch holds conv, separable_conv, max_pool, batch_norm and dropout layers, not {}",
                        other.type_name()
                    )))
                }
            };
        }
        ends.push(dims);
    }
    let (_, h, w) = ends[0];
    if let Some((k, e)) = ends.iter().enumerate().find(|(_, e)| (e.1, e.2) != (h, w)) {
        return Err(at.err(format!(
            "its branches must end at the same size: branch 0 ends at {h}x{w}, branch {k} at {}x{}",
            e.1, e.2
        )));
    }
    let c: usize = ends.iter().map(|e| e.0).sum();
    let out = Dims::Map { c, h, w };
    rows.push(row(name, "Concatenate", out, 0, 0));
    if m.batch_norm {
        rows.push(row(
            &inception_bn_name(name),
            "BatchNormalization",
            out,
            4 * c,
            2 * c,
        ));
    }
    Ok(out)
}

//! An [`ArchSpec`] and its weights as a [`Graph`]: every layer as the standard ONNX operators that compute
//! what `mnist_models::build` computes in inference mode.
//!
//! - conv: `Conv` (weight `[out, in, k, k]`, bias `[out]`), pads from [`Padding::resolve2d`] (Keras
//!   'same' puts the odd pixel at the bottom/right, so pads may be asymmetric).
//! - separable_conv: a depthwise `Conv` with `group = in` (weight `[in, 1, k, k]`, no bias, the layer's
//!   stride and pads), then a 1x1 `Conv` (weight `[out, in, 1, 1]`, the bias).
//! - The activation follows the convolution, unless the BatchNorm is placed before it: `Relu`, or SiLU as
//!   `Mul(x, Sigmoid(x))`.
//! - batch_norm: `BatchNormalization` with the running statistics and the spec's epsilon.
//! - max_pool: `MaxPool`; ONNX ignores padded cells as our pool counts them `-inf`, and rounds down
//!   (`ceil_mode = 0`) as Keras 'valid' does.
//! - dropout: nothing (the identity at inference).
//! - flatten: `Flatten` (axis 1: `[N, c, h, w] -> [N, c*h*w]`, NCHW order as candle's).
//! - global_avg_pool: `GlobalAveragePool` then `Flatten`.
//! - dense: `Gemm` with `transB = 1` (weight `[out, in]`, bias `[out]`), then its activation if any.
//! - a residual shortcut (conv, separable_conv): `Add` of the block's output and the input of the layer
//!   it starts at.
//! - deskew (the spec's `"deskew": true`): see [`Emit::deskew`], before the first layer.
//! - inception: each branch from the module's input, then `Concat` on the channels (axis 1), then the
//!   module's BatchNorm if any.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use mnist_layers::{Activation, Padding};
use mnist_models::plan::{self, branch_layer_name, inception_bn_name, BlockNames, Planned};
use mnist_models::spec::{ArchSpec, BnPlace, ConvSpec, InceptionSpec, LayerSpec, PoolSpec};
use mnist_models::Dims;

use crate::graph::{Attr, Attrs, Graph};
use crate::{OnnxError, INPUT_NAME, OUTPUT_NAME};

/// The graph of `arch` with the weights `weights` (by the names `mnist_models::build` gives them).
pub(crate) fn lower(
    arch: &ArchSpec,
    weights: &HashMap<String, Tensor>,
) -> Result<Graph, OnnxError> {
    let planned = plan::plan(arch)?;
    let mut emit = Emit {
        graph: Graph::new(INPUT_NAME),
        weights,
        eps: arch.batch_norm.eps as f32,
        at: String::new(),
        emitted: HashMap::new(),
    };
    let mut x = INPUT_NAME.to_string(); // [N, 1, 28, 28]
    if arch.deskew {
        x = emit.deskew(x); // [N, 1, 28, 28]
    }
    let mut dims = plan::INPUT;
    // Each top-level layer's input, for residual shortcuts.
    let mut inputs: Vec<String> = Vec::with_capacity(planned.layers.len());
    for (i, layer) in planned.layers.iter().enumerate() {
        inputs.push(x.clone());
        emit.at = format!("layers[{i}] ({})", layer.spec.type_name());
        if dims != layer.input {
            return Err(emit.unsupported(format!(
                "its input is {dims} here, but {} in the plan",
                layer.input
            )));
        }
        (x, dims) = emit.layer(layer, x, dims)?;
        if let (Some(n), Some(names)) = (layer.spec.shortcut(), &layer.block) {
            let from = inputs.get(n).cloned().ok_or_else(|| {
                emit.unsupported(format!("a shortcut from layers[{n}], not yet lowered"))
            })?;
            x = emit.graph.node("Add", &names.add, vec![x, from], vec![]); // [N, c, h, w]
        }
        if dims != layer.output {
            return Err(emit.unsupported(format!(
                "it gives {dims} here, but {} in the plan",
                layer.output
            )));
        }
    }
    if x == INPUT_NAME || !emit.graph.name_last_output(OUTPUT_NAME) {
        return Err(OnnxError::Unsupported {
            at: "the model".into(),
            reason: "it has no operator to export".into(),
        });
    }
    Ok(emit.graph)
}

fn ints(v: &[usize]) -> Attr {
    Attr::Ints(v.iter().map(|&x| x as i64).collect())
}

struct Emit<'w> {
    graph: Graph,
    weights: &'w HashMap<String, Tensor>,
    /// Every BatchNorm's epsilon.
    eps: f32,
    /// Where in the spec the layer being lowered is (`layers[3] (conv)`), for errors.
    at: String,
    /// The initializer already made for a variable (a tied convolution's weights, `weights_of`,
    /// are one initializer that both `Conv` nodes read).
    emitted: HashMap<String, String>,
}

impl Emit<'_> {
    fn unsupported(&self, reason: impl Into<String>) -> OnnxError {
        OnnxError::Unsupported {
            at: self.at.clone(),
            reason: reason.into(),
        }
    }

    /// The feature maps `(c, h, w)` a layer needs.
    fn map(&self, dims: Dims) -> Result<(usize, usize, usize), OnnxError> {
        match dims {
            Dims::Map { c, h, w } => Ok((c, h, w)),
            Dims::Flat(n) => Err(self.unsupported(format!(
                "needs [c, h, w] feature maps, gets {n} flat values"
            ))),
        }
    }

    /// The variable `name` as an initializer, checked to be `dims`.
    fn weight(&mut self, name: &str, dims: &[usize]) -> Result<String, OnnxError> {
        self.weight_as(name, dims, dims)
    }

    /// [`Self::weight`] stored under the shape `as_dims` (the same number of values, e.g. a dense
    /// layer's `[out, in]` as a 1x1 convolution's `[out, in, 1, 1]`).
    fn weight_as(
        &mut self,
        name: &str,
        dims: &[usize],
        as_dims: &[usize],
    ) -> Result<String, OnnxError> {
        if let Some(done) = self.emitted.get(name) {
            return Ok(done.clone());
        }
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| OnnxError::MissingWeight {
                at: self.at.clone(),
                name: name.to_string(),
            })?;
        if t.dims() != dims {
            return Err(OnnxError::WeightShape {
                at: self.at.clone(),
                name: name.to_string(),
                expected: dims.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        let data = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|source| OnnxError::Candle {
                at: self.at.clone(),
                name: name.to_string(),
                source: Box::new(source),
            })?;
        debug_assert_eq!(
            dims.iter().product::<usize>(),
            as_dims.iter().product::<usize>()
        );
        let init = self.graph.initializer(name, as_dims.to_vec(), data);
        self.emitted.insert(name.to_string(), init.clone());
        Ok(init)
    }

    /// The attributes of a `k x k` window with `stride` and Keras `padding` over an `h x w` input, and
    /// the output size: ONNX `pads` are `[top, left, bottom, right]`.
    fn window(
        &self,
        padding: Padding,
        (h, w): (usize, usize),
        k: usize,
        stride: usize,
    ) -> Result<(Attrs, (usize, usize)), OnnxError> {
        let ((top, left, bottom, right), out) = padding
            .resolve2d(h, w, k, stride)
            .map_err(|e| self.unsupported(e.to_string()))?;
        Ok((
            vec![
                ("kernel_shape", ints(&[k, k])),
                ("strides", ints(&[stride, stride])),
                ("pads", ints(&[top, left, bottom, right])),
            ],
            out,
        ))
    }

    /// The deskewed images (`mnist_data::deskew_into`) of `x` `[N, 1, 28, 28]`: the moments as
    /// `ReduceMean`s (ratios of means are ratios of sums), the slant `Clip`ped, and the bilinear shear as
    /// two `MatMul`s with hat-function weights `Relu(1 - |target - source|)`: rows first (`V [N, 1, 28,
    /// 28]`, each output row from the source rows about `row + my - c`), then each row's columns (`H [N,
    /// 28, 28, 28]`, output column `x` from the columns about `x + alpha (row - c) + mx - c`); samples
    /// outside the image get no weight, as zero padding.
    fn deskew(&mut self, x: String) -> String {
        let n = mnist_data::IMAGE_SIDE;
        let c = mnist_data::DESKEW_CENTRE;
        let idx: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let g = &mut self.graph;
        let col = g.initializer("deskew.col", vec![1, 1, 1, n], idx.clone()); // [1, 1, 1, 28]
        let row = g.initializer("deskew.row", vec![1, 1, n, 1], idx.clone()); // [1, 1, 28, 1]
        let row_c = g.initializer(
            "deskew.row_centred",
            vec![1, 1, n, 1],
            idx.iter().map(|i| i - c).collect(),
        );
        let scalar = |g: &mut Graph, name: &str, v: f32| g.initializer(name, vec![1], vec![v]);
        let centre = scalar(g, "deskew.centre", c);
        let one = scalar(g, "deskew.one", 1.0);
        let tiny = scalar(g, "deskew.tiny", 1e-12);
        let flat = scalar(g, "deskew.flat", mnist_data::FLAT_SHAPE as f32);
        let (lo, hi) = (
            scalar(g, "deskew.min_slant", -mnist_data::MAX_SLANT),
            scalar(g, "deskew.max_slant", mnist_data::MAX_SLANT),
        );
        let mean = |g: &mut Graph, name: &str, v: String| {
            let attrs = vec![("axes", ints(&[2, 3])), ("keepdims", Attr::Int(1))];
            g.node("ReduceMean", name, vec![v], attrs) // [N, 1, 1, 1]
        };
        let op = |g: &mut Graph, op: &'static str, name: &str, a: &str, b: &str| {
            g.node(op, name, vec![a.to_string(), b.to_string()], vec![])
        };
        // Mass and centre of mass.
        let m = mean(g, "deskew.mass", x.clone());
        let m = op(g, "Max", "deskew.mass_or_tiny", &m, &tiny);
        let xc = op(g, "Mul", "deskew.x_col", &x, &col);
        let mx = mean(g, "deskew.mean_x_col", xc);
        let mx = op(g, "Div", "deskew.mx", &mx, &m);
        let xr = op(g, "Mul", "deskew.x_row", &x, &row);
        let my = mean(g, "deskew.mean_x_row", xr);
        let my = op(g, "Div", "deskew.my", &my, &m);
        // Slant: cov(x, y) / var(y), clamped.
        let dx = op(g, "Sub", "deskew.dx", &col, &mx); // [N, 1, 1, 28]
        let dy = op(g, "Sub", "deskew.dy", &row, &my); // [N, 1, 28, 1]
        let wdy = op(g, "Mul", "deskew.x_dy", &x, &dy);
        let cxy = op(g, "Mul", "deskew.x_dx_dy", &wdy, &dx);
        let cxy = mean(g, "deskew.cxy", cxy);
        let cyy = op(g, "Mul", "deskew.x_dy_dy", &wdy, &dy);
        let cyy = mean(g, "deskew.cyy", cyy);
        let floor = op(g, "Mul", "deskew.flat_floor", &m, &flat);
        let cyy = op(g, "Max", "deskew.cyy_or_floor", &cyy, &floor);
        let alpha = op(g, "Div", "deskew.slant", &cxy, &cyy);
        let alpha = g.node("Clip", "deskew.slant_clamped", vec![alpha, lo, hi], vec![]); // [N, 1, 1, 1]

        // Rows: output row i reads the source rows about i + (my - c).
        let dyo = op(g, "Sub", "deskew.row_shift", &my, &centre);
        let src_row = op(g, "Add", "deskew.source_row", &row, &dyo); // [N, 1, 28, 1]
        let hat = |g: &mut Graph, name: &str, target: &str, source: &str| {
            let d = op(g, "Sub", &format!("{name}.offset"), target, source);
            let d = g.node("Abs", &format!("{name}.distance"), vec![d], vec![]);
            let w = op(g, "Sub", &format!("{name}.hat"), &one, &d);
            g.node("Relu", name, vec![w], vec![])
        };
        let v = hat(g, "deskew.rows", &col, &src_row); // [N, 1, 28 out, 28 source]
        let t = op(g, "MatMul", "deskew.rows_sampled", &v, &x); // [N, 1, 28, 28]

        // Columns: output column x of row y reads the source columns about x + s[y].
        let shear = op(g, "Mul", "deskew.shear", &alpha, &row_c);
        let dxo = op(g, "Sub", "deskew.col_shift", &mx, &centre);
        let s = op(g, "Add", "deskew.source_shift", &shear, &dxo); // [N, 1, 28, 1]
        let perm = || vec![("perm", ints(&[0, 2, 1, 3]))];
        let s = g.node("Transpose", "deskew.shift_by_row", vec![s], perm()); // [N, 28, 1, 1]
        let src_col = op(g, "Add", "deskew.source_col", &col, &s); // [N, 28, 1, 28 out]
        let h = hat(g, "deskew.cols", &src_col, &row); // [N, 28, 28 source, 28 out]
        let t = g.node("Transpose", "deskew.by_row", vec![t], perm()); // [N, 28, 1, 28]
        let o = op(g, "MatMul", "deskew.cols_sampled", &t, &h); // [N, 28, 1, 28]
        g.node("Transpose", "deskew", vec![o], perm()) // [N, 1, 28, 28]
    }

    /// `act` on `x`: nothing, `Relu`, or SiLU as `Mul(x, Sigmoid(x))` (opset 13 has no SiLU operator).
    fn activation(&mut self, x: String, act: Activation, name: &str) -> String {
        match act {
            Activation::None => x,
            Activation::Relu => self.graph.node("Relu", name, vec![x], vec![]),
            Activation::Silu => {
                let s = self.graph.node(
                    "Sigmoid",
                    &format!("{name}.sigmoid"),
                    vec![x.clone()],
                    vec![],
                );
                self.graph.node("Mul", name, vec![x, s], vec![])
            }
        }
    }

    fn layer(&mut self, l: &Planned, x: String, dims: Dims) -> Result<(String, Dims), OnnxError> {
        match l.spec {
            LayerSpec::Conv(c) | LayerSpec::SeparableConv(c) => {
                let separable = matches!(l.spec, LayerSpec::SeparableConv(_));
                let names = l
                    .block
                    .as_ref()
                    .ok_or_else(|| self.unsupported("a conv block without part names"))?;
                self.conv_block(x, dims, c, separable, names)
            }
            LayerSpec::MaxPool(p) => self.max_pool(x, dims, p, &l.name),
            LayerSpec::BatchNorm => Ok((self.batch_norm(x, dims, &l.name)?, dims)),
            // Inverted dropout is the identity at inference.
            LayerSpec::Dropout(_) => Ok((x, dims)),
            LayerSpec::Flatten => {
                let (c, h, w) = self.map(dims)?;
                let y = self
                    .graph
                    .node("Flatten", &l.name, vec![x], vec![("axis", Attr::Int(1))]); // [N, c*h*w]
                Ok((y, Dims::Flat(c * h * w)))
            }
            LayerSpec::GlobalAvgPool => {
                let (c, _, _) = self.map(dims)?;
                let y = self
                    .graph
                    .node("GlobalAveragePool", &l.name, vec![x], vec![]); // [N, c, 1, 1]
                let y = self.graph.node(
                    "Flatten",
                    &format!("{}.flatten", l.name),
                    vec![y],
                    vec![("axis", Attr::Int(1))],
                ); // [N, c]
                Ok((y, Dims::Flat(c)))
            }
            LayerSpec::Dense(d) => {
                let n = match dims {
                    Dims::Flat(n) => n,
                    Dims::Map { .. } => {
                        return Err(self.unsupported(format!("needs a flat input, gets {dims}")))
                    }
                };
                let w = self.weight(&format!("{}.weight", l.name), &[d.units, n])?;
                let b = self.weight(&format!("{}.bias", l.name), &[d.units])?;
                // x [N, n] . w^T [n, units] + b
                let mut y = self.graph.node(
                    "Gemm",
                    &l.name,
                    vec![x, w, b],
                    vec![("transB", Attr::Int(1))],
                ); // [N, units]
                y = self.activation(
                    y,
                    d.activation,
                    &format!("{}.{}", l.name, d.activation.name()),
                );
                Ok((y, Dims::Flat(d.units)))
            }
            LayerSpec::Inception(m) => self.inception(x, dims, m, &l.name),
            LayerSpec::SqueezeExcite(se) => {
                let (c, _, _) = self.map(dims)?;
                let u = se.units;
                let name = &l.name;
                // The two dense layers as 1x1 convolutions on the [N, c, 1, 1] means, so the gate
                // broadcasts over the planes without a reshape.
                let w1 =
                    self.weight_as(&format!("{name}.reduce.weight"), &[u, c], &[u, c, 1, 1])?;
                let b1 = self.weight(&format!("{name}.reduce.bias"), &[u])?;
                let w2 =
                    self.weight_as(&format!("{name}.expand.weight"), &[c, u], &[c, u, 1, 1])?;
                let b2 = self.weight(&format!("{name}.expand.bias"), &[c])?;
                let s = self.graph.node(
                    "GlobalAveragePool",
                    &format!("{name}.squeeze"),
                    vec![x.clone()],
                    vec![],
                ); // [N, c, 1, 1]
                let z = self
                    .graph
                    .node("Conv", &format!("{name}.reduce"), vec![s, w1, b1], vec![]); // [N, u, 1, 1]
                let z = self
                    .graph
                    .node("Relu", &format!("{name}.reduce.relu"), vec![z], vec![]);
                let a = self
                    .graph
                    .node("Conv", &format!("{name}.expand"), vec![z, w2, b2], vec![]); // [N, c, 1, 1]
                let g = self
                    .graph
                    .node("Sigmoid", &format!("{name}.gate"), vec![a], vec![]);
                let y = self.graph.node("Mul", name, vec![x, g], vec![]); // [N, c, h, w]
                Ok((y, dims))
            }
        }
    }

    /// The convolution of a conv or separable_conv layer, then the activation `act`: its nodes named
    /// from `prefix`, its weights the variables under `wp` (the same prefix, or a tied layer's).
    fn conv(
        &mut self,
        x: String,
        dims: Dims,
        c: &ConvSpec,
        separable: bool,
        (prefix, wp): (&str, &str),
        act: Activation,
    ) -> Result<(String, Dims), OnnxError> {
        let (ci, h, w) = self.map(dims)?;
        let k = c.kernel;
        let (mut attrs, (oh, ow)) = self.window(c.padding, (h, w), k, c.stride)?;
        let y = if separable {
            let dw = self.weight(&format!("{wp}.depthwise.weight"), &[ci, 1, k, k])?;
            attrs.push(("group", Attr::Int(ci as i64)));
            let y = self
                .graph
                .node("Conv", &format!("{prefix}.depthwise"), vec![x, dw], attrs); // [N, ci, oh, ow]
            let pw = self.weight(&format!("{wp}.pointwise.weight"), &[c.filters, ci, 1, 1])?;
            let mut inputs = vec![y, pw];
            if c.bias {
                inputs.push(self.weight(&format!("{wp}.pointwise.bias"), &[c.filters])?);
            }
            self.graph.node(
                "Conv",
                &format!("{prefix}.pointwise"),
                inputs,
                vec![("kernel_shape", ints(&[1, 1]))],
            ) // [N, filters, oh, ow]
        } else {
            let wt = self.weight(&format!("{wp}.weight"), &[c.filters, ci, k, k])?;
            let mut inputs = vec![x, wt];
            if c.bias {
                inputs.push(self.weight(&format!("{wp}.bias"), &[c.filters])?);
            }
            self.graph.node("Conv", prefix, inputs, attrs) // [N, filters, oh, ow]
        };
        let y = self.activation(y, act, &format!("{prefix}.{}", act.name()));
        Ok((
            y,
            Dims::Map {
                c: c.filters,
                h: oh,
                w: ow,
            },
        ))
    }

    /// A conv block: convolution, activation and BatchNorm in the spec's order, then the pool.
    fn conv_block(
        &mut self,
        x: String,
        dims: Dims,
        c: &ConvSpec,
        separable: bool,
        names: &BlockNames,
    ) -> Result<(String, Dims), OnnxError> {
        let (mut y, mut dims) = self.conv(
            x,
            dims,
            c,
            separable,
            (&names.conv, &names.weights),
            c.conv_activation(),
        )?;
        if c.batch_norm != BnPlace::None {
            y = self.batch_norm(y, dims, &names.bn)?;
            if let Some(act) = c.activation_after_bn() {
                y = self.activation(y, act, &names.act);
            }
        }
        if let Some(p) = &c.pool {
            (y, dims) = self.max_pool(y, dims, p, &names.pool)?;
        }
        Ok((y, dims))
    }

    fn max_pool(
        &mut self,
        x: String,
        dims: Dims,
        p: &PoolSpec,
        name: &str,
    ) -> Result<(String, Dims), OnnxError> {
        let (c, h, w) = self.map(dims)?;
        let (attrs, (oh, ow)) = self.window(p.padding, (h, w), p.kernel, p.stride())?;
        let y = self.graph.node("MaxPool", name, vec![x], attrs); // [N, c, oh, ow]
        Ok((y, Dims::Map { c, h: oh, w: ow }))
    }

    /// Inference BatchNorm over the channels of `x` with the variables under `prefix`.
    fn batch_norm(&mut self, x: String, dims: Dims, prefix: &str) -> Result<String, OnnxError> {
        let (c, _, _) = self.map(dims)?;
        let mut inputs = vec![x];
        for part in ["gamma", "beta", "running_mean", "running_var"] {
            inputs.push(self.weight(&format!("{prefix}.{part}"), &[c])?);
        }
        Ok(self.graph.node(
            "BatchNormalization",
            prefix,
            inputs,
            vec![("epsilon", Attr::Float(self.eps))],
        ))
    }

    fn inception(
        &mut self,
        x: String,
        dims: Dims,
        m: &InceptionSpec,
        name: &str,
    ) -> Result<(String, Dims), OnnxError> {
        let mut ends = Vec::with_capacity(m.branches.len());
        let mut channels = 0;
        let mut size = None;
        for (i, branch) in m.branches.iter().enumerate() {
            let (mut y, mut d) = (x.clone(), dims);
            for (j, layer) in branch.iter().enumerate() {
                let lname = branch_layer_name(name, i, j);
                (y, d) = match layer {
                    LayerSpec::Conv(c) | LayerSpec::SeparableConv(c) => {
                        let separable = matches!(layer, LayerSpec::SeparableConv(_));
                        if c.batch_norm != BnPlace::None || c.pool.is_some() {
                            return Err(self.unsupported(format!(
                                "branches[{i}][{j}] ({}): a BatchNorm or pool inside a branch's convolution",
                                layer.type_name()
                            )));
                        }
                        self.conv(y, d, c, separable, (&lname, &lname), c.conv_activation())?
                    }
                    LayerSpec::MaxPool(p) => self.max_pool(y, d, p, &lname)?,
                    LayerSpec::BatchNorm => (self.batch_norm(y, d, &lname)?, d),
                    LayerSpec::Dropout(_) => (y, d),
                    other => {
                        return Err(self.unsupported(format!(
                            "branches[{i}][{j}]: a {} layer inside an inception branch",
                            other.type_name()
                        )))
                    }
                };
            }
            let (c, h, w) = self.map(d)?;
            match size {
                None => size = Some((h, w)),
                Some(s) if s != (h, w) => {
                    return Err(self.unsupported(format!(
                        "branch {i} ends at {h}x{w}, branch 0 at {}x{}",
                        s.0, s.1
                    )))
                }
                Some(_) => {}
            }
            channels += c;
            ends.push(y); // [N, c, h, w]
        }
        let (h, w) =
            size.ok_or_else(|| self.unsupported("an inception module without branches"))?;
        let out = Dims::Map { c: channels, h, w };
        let mut y = self
            .graph
            .node("Concat", name, ends, vec![("axis", Attr::Int(1))]); // [N, channels, h, w]
        if m.batch_norm {
            y = self.batch_norm(y, out, &inception_bn_name(name))?;
        }
        Ok((y, out))
    }
}

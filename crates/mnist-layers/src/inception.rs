//! The inception module: parallel branches over the same input, concatenated along channels.

use candle_core::{Module, ModuleT, Result, Tensor};

use crate::error::shape_err;
use crate::ops::{self, InceptionPlan, InferStep};
use crate::{
    Activation, BatchNorm, Conv2d, Dropout, Kernels, LayerError, MaxPool2d, SeparableConv2d,
};

/// One layer of an inception branch.
#[derive(Debug, Clone)]
pub enum BranchLayer {
    /// A convolution (its activation included).
    Conv(Conv2d),
    /// A separable convolution (its activation included).
    SepConv(SeparableConv2d),
    /// Max pooling.
    MaxPool(MaxPool2d),
    /// BatchNorm over the current channels.
    BatchNorm(BatchNorm),
    /// Dropout.
    Dropout(Dropout),
}

impl BranchLayer {
    /// `(input channels, output channels)`, or `None` for a layer that keeps any channel count.
    fn channels(&self) -> Result<Option<(usize, usize)>> {
        Ok(match self {
            BranchLayer::Conv(m) => {
                let (o, c, _, _) = m.weight().dims4()?;
                Some((c, o))
            }
            BranchLayer::SepConv(m) => {
                let c = m.depthwise().weight().dim(0)?;
                Some((c, m.pointwise().weight().dim(0)?))
            }
            BranchLayer::BatchNorm(m) => {
                let c = m.gamma().dim(0)?;
                Some((c, c))
            }
            BranchLayer::MaxPool(_) | BranchLayer::Dropout(_) => None,
        })
    }

    fn with_kernels(self, k: Kernels) -> Self {
        match self {
            BranchLayer::Conv(m) => BranchLayer::Conv(m.with_kernels(k)),
            BranchLayer::SepConv(m) => BranchLayer::SepConv(m.with_kernels(k)),
            BranchLayer::MaxPool(m) => BranchLayer::MaxPool(m.with_kernels(k)),
            BranchLayer::BatchNorm(m) => BranchLayer::BatchNorm(m.with_kernels(k)),
            BranchLayer::Dropout(m) => BranchLayer::Dropout(m),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            BranchLayer::Conv(m) => m.forward(xs),
            BranchLayer::SepConv(m) => m.forward(xs),
            BranchLayer::MaxPool(m) => m.forward(xs),
            BranchLayer::BatchNorm(m) => m.forward_t(xs, train),
            BranchLayer::Dropout(m) => m.forward_t(xs, train),
        }
    }

    /// The layer as a step of the image-by-image inference plan.
    fn infer_step(&self) -> Result<Planned> {
        let vec1 = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        Ok(Planned::Step(match self {
            BranchLayer::Conv(conv) => {
                let cfg = conv.config();
                let (o, _, k, _) = conv.weight().dims4()?;
                if cfg.stride != 1 || !cfg.activation.fuses() {
                    return Ok(Planned::Uncovered);
                }
                InferStep::Conv {
                    weight: vec1(conv.weight())?,
                    o,
                    k,
                    padding: cfg.padding,
                    bias: conv.bias().map(vec1).transpose()?,
                    relu: cfg.activation.is_relu(),
                }
            }
            BranchLayer::SepConv(sep) => {
                let (dw, pw) = (sep.depthwise(), sep.pointwise());
                let (dcfg, pcfg) = (dw.config(), pw.config());
                if dcfg.stride != 1
                    || dw.bias().is_some()
                    || dcfg.activation != Activation::None
                    || !pcfg.activation.fuses()
                {
                    return Ok(Planned::Uncovered);
                }
                let (c, _, k, _) = dw.weight().dims4()?;
                let o = pw.weight().dim(0)?;
                InferStep::Conv {
                    weight: ops::fold_separable(&vec1(dw.weight())?, &vec1(pw.weight())?, c, o, k),
                    o,
                    k,
                    padding: dcfg.padding,
                    bias: pw.bias().map(vec1).transpose()?,
                    relu: pcfg.activation.is_relu(),
                }
            }
            BranchLayer::MaxPool(p) => {
                let p = p.config();
                InferStep::Pool {
                    kernel: p.kernel,
                    stride: p.stride,
                    padding: p.padding,
                }
            }
            BranchLayer::BatchNorm(bn) => {
                let (scale, shift) = bn.eval_scale_shift()?;
                InferStep::Affine {
                    scale: vec1(&scale)?,
                    shift: vec1(&shift)?,
                }
            }
            BranchLayer::Dropout(_) => return Ok(Planned::Skip),
        }))
    }
}

/// What a branch layer is in the inference plan.
enum Planned {
    /// A step.
    Step(InferStep),
    /// Nothing (a dropout: the identity in inference).
    Skip,
    /// A layer the plan does not cover (a strided convolution, a depthwise stage with bias or
    /// activation): the module runs layer by layer.
    Uncovered,
}

/// [`InceptionModule::train_branches`]: the branches and the module's output `(h, w)`.
type TrainBranches<'a> = (Vec<ops::InceptionBranch<'a>>, (usize, usize));

/// An inception module's training as one op ([`InceptionModule::fused_parts`]): what
/// [`ops::inception_train`] (or, with fused blocks after it, [`ops::inception_stack_train`]) takes.
pub(crate) struct FusedParts<'a> {
    /// The branches.
    pub branches: Vec<ops::InceptionBranch<'a>>,
    /// The module's BatchNorm, if any.
    pub bn: Option<ops::ModuleBn<'a>>,
    /// The module's output `(h, w)`.
    pub hw: (usize, usize),
}

/// Parallel branches over one input, concatenated along the channel axis:
/// `[b, c, h, w] -> [b, sum(out_i), h', w']` (every branch must end at the same spatial size; an empty
/// branch passes its input through).
#[derive(Debug, Clone)]
pub struct InceptionModule {
    branches: Vec<Vec<BranchLayer>>,
    in_channels: usize,
    out_channels: usize,
    kernels: Kernels,
}

impl InceptionModule {
    /// The module over `in_c` input channels made of `branches` (layers already built, e.g. with
    /// variables under `inception.branch{i}.{j}`), on the fast kernels. Checks that the channels of
    /// every branch chain up.
    pub fn new(in_c: usize, branches: Vec<Vec<BranchLayer>>) -> Result<Self> {
        if branches.is_empty() {
            return Err(
                LayerError::Config("inception module needs at least one branch".into()).into(),
            );
        }
        let mut out_channels = 0;
        for (i, branch) in branches.iter().enumerate() {
            let mut c = in_c;
            for (j, layer) in branch.iter().enumerate() {
                if let Some((ci, co)) = layer.channels()? {
                    if ci != c {
                        return Err(LayerError::Config(format!(
                            "inception branch {i}, layer {j}: takes {ci} channels, gets {c}"
                        ))
                        .into());
                    }
                    c = co;
                }
            }
            out_channels += c;
        }
        Ok(Self {
            branches,
            in_channels: in_c,
            out_channels,
            kernels: Kernels::Auto,
        })
    }

    /// The same module (and its layers) running on `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            branches: self
                .branches
                .into_iter()
                .map(|b| b.into_iter().map(|l| l.with_kernels(kernels)).collect())
                .collect(),
            kernels,
            ..self
        }
    }

    /// The number of output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The branches.
    pub fn branches(&self) -> &[Vec<BranchLayer>] {
        &self.branches
    }

    /// The layer-by-layer forward pass (candle ops or the fast ops, as the layers' kernels say).
    fn forward_layers(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.branches.len());
        for branch in &self.branches {
            let mut ys = xs.clone();
            for op in branch {
                ys = op.forward_t(&ys, train)?;
            }
            outs.push(ys); // [b, c_i, h, w]
        }
        Tensor::cat(&outs, 1) // [b, sum c_i, h, w]
    }

    /// The image-by-image inference plan for `xs`, or `None` when a layer is not covered by it.
    fn plan(&self, xs: &Tensor) -> Result<Option<InceptionPlan>> {
        let dims = match xs.dims() {
            &[b, c, h, w] if c == self.in_channels => (b, c, h, w),
            d => {
                return Err(shape_err(
                    "inception",
                    format!("[b, {}, h, w]", self.in_channels),
                    d,
                ))
            }
        };
        let mut steps = Vec::with_capacity(self.branches.len());
        for branch in &self.branches {
            let mut b = Vec::with_capacity(branch.len());
            for layer in branch {
                match layer.infer_step()? {
                    Planned::Step(step) => b.push(step),
                    Planned::Skip => {}
                    Planned::Uncovered => return Ok(None),
                }
            }
            steps.push(b);
        }
        InceptionPlan::new(dims, &steps).map(Some)
    }

    /// The branches as [`ops::inception_train`] takes them and the first one's output `(h, w)` (every
    /// branch must give the same: the op checks it), or `None` unless every branch is one stride-1
    /// convolution, optionally after a max pool.
    fn train_branches(&self, xs: &Tensor) -> Result<Option<TrainBranches<'_>>> {
        let (h, w) = match xs.dims() {
            &[_, _, h, w] => (h, w),
            d => return Err(shape_err("inception", "[b, c, h, w]", d)),
        };
        let mut out = Vec::with_capacity(self.branches.len());
        let mut out_hw = None;
        for branch in &self.branches {
            let (pool, conv) = match branch.as_slice() {
                [BranchLayer::Conv(conv)] => (None, conv),
                [BranchLayer::MaxPool(p), BranchLayer::Conv(conv)] => (Some(p.config()), conv),
                _ => return Ok(None),
            };
            let cfg = conv.config();
            if cfg.stride != 1 || !cfg.activation.fuses() {
                return Ok(None);
            }
            let (pool, (ph, pw)) = match pool {
                Some(p) => {
                    let (pad, out) = p.padding.resolve2d(h, w, p.kernel, p.stride)?;
                    let pool = ops::BranchPool {
                        kernel: p.kernel,
                        stride: p.stride,
                        pad,
                    };
                    (Some(pool), out)
                }
                None => (None, (h, w)),
            };
            let k = conv.weight().dim(3)?;
            let (pad, hw) = cfg.padding.resolve2d(ph, pw, k, 1)?;
            out_hw.get_or_insert(hw);
            out.push(ops::InceptionBranch {
                pool,
                w: conv.weight(),
                bias: conv.bias(),
                pad,
                relu: cfg.activation.is_relu(),
            });
        }
        Ok(Some((out, out_hw.unwrap_or((h, w)))))
    }

    /// The branches and BatchNorm as [`ops::inception_train`] takes them and the module's output
    /// `(h, w)`, or `None` when that cannot run: other kernels (of the module or of `bn`), an input that
    /// needs a gradient (a module that does not come first), or a branch that is not one stride-1
    /// convolution after an optional max pool.
    pub(crate) fn fused_parts<'a>(
        &'a self,
        xs: &Tensor,
        bn: Option<&'a BatchNorm>,
    ) -> Result<Option<FusedParts<'a>>> {
        let fast = self.kernels.use_fast(xs) && bn.is_none_or(|bn| bn.kernels().use_fast(xs));
        if !fast || xs.track_op() {
            return Ok(None);
        }
        let Some((branches, hw)) = self.train_branches(xs)? else {
            return Ok(None);
        };
        let bn = bn.map(|bn| ops::ModuleBn {
            gamma: bn.gamma(),
            beta: bn.beta(),
            eps: bn.config().eps,
        });
        Ok(Some(FusedParts { branches, bn, hw }))
    }

    /// Training as ONE op ([`ops::inception_train`]), followed by `bn` if given (running statistics
    /// updated), or `None` when that cannot run (see [`Self::fused_parts`]).
    fn train_fused(&self, xs: &Tensor, bn: Option<&BatchNorm>) -> Result<Option<Tensor>> {
        let Some(parts) = self.fused_parts(xs, bn)? else {
            return Ok(None);
        };
        let (ys, stats) = ops::inception_train(xs, &parts.branches, parts.bn)?;
        if let (Some(bn), Some((mean, var))) = (bn, stats) {
            bn.update_running(&mean, &var)?;
        }
        Ok(Some(ys))
    }

    /// The module then `bn` (over its output channels) in training mode, running statistics updated:
    /// ONE op when [`Self::train_fused`] can run it, else the module and then `bn` (the same results).
    pub fn train_with_bn(&self, bn: &BatchNorm, xs: &Tensor) -> Result<Tensor> {
        match self.train_fused(xs, Some(bn))? {
            Some(ys) => Ok(ys),
            None => bn.forward_t(&self.forward_t(xs, true)?, true),
        }
    }
}

impl ModuleT for InceptionModule {
    /// Inference with the fast kernels runs [`InceptionPlan`]: all branches of one image at a time, in
    /// cache (no gradient). Training is ONE op when [`Self::train_fused`] can run it (the same results
    /// as the layers). Otherwise the layers run one after the other.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            if let Some(ys) = self.train_fused(xs, None)? {
                return Ok(ys);
            }
        } else if self.kernels.use_fast(xs) {
            if let Some(plan) = self.plan(xs)? {
                return plan.run(xs);
            }
        }
        self.forward_layers(xs, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededVarMap;
    use crate::ops::test_util::{assert_close, rand_t};
    use crate::{
        batch_norm, conv2d, dropout, separable_conv2d, shared_rng, Activation, BatchNormConfig,
        Conv2dConfig, MaxPool2dConfig, Padding,
    };
    use candle_core::{DType, Device};

    /// A branch layer to build: conv / separable conv (out, k) with 'same' padding, a stride-1 'same'
    /// max-pool (k), BatchNorm, dropout (p).
    #[derive(Clone, Copy)]
    enum L {
        Conv(usize, usize),
        Sep(usize, usize),
        Pool(usize),
        Bn,
        Drop(f32),
    }

    fn build(branches: &[Vec<L>], in_c: usize, relu: bool, kernels: Kernels) -> InceptionModule {
        let vars = SeededVarMap::new(7);
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        let conv_cfg = Conv2dConfig {
            padding: Padding::Same,
            activation: if relu {
                Activation::Relu
            } else {
                Activation::None
            },
            ..Default::default()
        };
        let mut built = Vec::new();
        for (i, spec) in branches.iter().enumerate() {
            let mut c = in_c;
            let mut layers = Vec::new();
            for (j, l) in spec.iter().enumerate() {
                let vb = vb.pp(format!("branch{i}.{j}"));
                layers.push(match *l {
                    L::Conv(o, k) => {
                        let m = conv2d(c, o, k, conv_cfg, vb).unwrap();
                        c = o;
                        BranchLayer::Conv(m)
                    }
                    L::Sep(o, k) => {
                        let m = separable_conv2d(c, o, k, conv_cfg, vb).unwrap();
                        c = o;
                        BranchLayer::SepConv(m)
                    }
                    L::Pool(k) => BranchLayer::MaxPool(MaxPool2d::new(MaxPool2dConfig {
                        kernel: k,
                        stride: 1,
                        padding: Padding::Same,
                    })),
                    L::Bn => BranchLayer::BatchNorm(
                        batch_norm(c, BatchNormConfig::default(), vb).unwrap(),
                    ),
                    L::Drop(p) => BranchLayer::Dropout(dropout(p, shared_rng(0))),
                });
            }
            built.push(layers);
        }
        InceptionModule::new(in_c, built)
            .unwrap()
            .with_kernels(kernels)
    }

    /// The image-by-image inference plan against the same module on candle's ops and on the
    /// layer-by-layer fast ops (random inputs, odd sizes), and bit-identical on 1 and 3 threads.
    #[test]
    fn inference_plan_matches_reference() {
        use L::{Bn, Conv, Drop, Pool, Sep};
        let seed = vec![
            vec![Sep(2, 3), Pool(2), Conv(1, 1), Drop(0.25)],
            vec![Conv(2, 1), Sep(2, 5), Drop(0.25)],
            vec![Conv(2, 1), Drop(0.25)],
            vec![Conv(2, 1), Sep(2, 3)],
        ];
        let improved = vec![
            vec![Conv(4, 1), Bn],
            vec![Conv(3, 3)],
            vec![Conv(5, 5), Bn, Pool(3)],
            vec![Pool(3), Conv(4, 1)],
            vec![Drop(0.5)],
        ];
        for (cfg, in_c, relu) in [
            (&seed, 1, true),
            (&improved, 1, false),
            (&seed, 3, true),
            (&improved, 2, false),
        ] {
            let fast = build(cfg, in_c, relu, Kernels::Auto);
            let refr = build(cfg, in_c, relu, Kernels::Reference);
            // One training step each, so that the BatchNorm running statistics are not 0 / 1.
            let xt = rand_t(&[6, in_c, 12, 10], 1);
            fast.forward_t(&xt, true).unwrap();
            refr.forward_t(&xt, true).unwrap();
            for (i, (h, w)) in [(28, 28), (9, 13), (5, 6)].into_iter().enumerate() {
                let x = rand_t(&[3, in_c, h, w], 10 + i as u64);
                let what = format!("in_c {in_c} {h}x{w} relu {relu} branches {}", cfg.len());
                assert!(fast.plan(&x).unwrap().is_some(), "no plan: {what}");
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| fast.forward_t(&x, false).unwrap())
                };
                let y1 = run(1);
                let yr = refr.forward_t(&x, false).unwrap();
                assert_eq!(y1.dims(), yr.dims(), "{what}");
                assert_close(&y1, &yr, 1e-4, &format!("plan vs reference {what}"));
                let yl = fast.forward_layers(&x, false).unwrap();
                assert_close(&y1, &yl, 1e-4, &format!("plan vs fast layers {what}"));
                assert_close(&run(3), &y1, 0.0, &format!("1 vs 3 threads {what}"));
            }
        }
        let fast = build(&seed, 1, true, Kernels::Auto);
        assert!(fast.forward_t(&rand_t(&[2, 3, 8, 8], 1), false).is_err());
    }

    #[test]
    fn channels_must_chain_up() {
        let vars = SeededVarMap::new(1);
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        let conv = conv2d(3, 2, 1, Conv2dConfig::default(), vb.pp("a")).unwrap();
        let err = InceptionModule::new(1, vec![vec![BranchLayer::Conv(conv)]]).unwrap_err();
        assert!(
            err.to_string().contains("takes 3 channels, gets 1"),
            "{err}"
        );
        assert!(InceptionModule::new(1, vec![]).is_err());
    }
}

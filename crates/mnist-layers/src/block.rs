//! [`ConvBnPool`]: a `Conv2d -> BatchNorm -> [MaxPool2d]` block that trains through one fused op.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::error::shape_err;
use crate::inception::{FusedParts, InceptionModule};
use crate::ops::{self, BlockSpec, PoolSpec};
use crate::{
    batch_norm, conv2d, separable_conv2d, BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig,
    DepthwiseConv2d, SeparableConv2d,
};
use crate::{Kernels, LayerError, MaxPool2d, MaxPool2dConfig};

/// Configuration of a [`ConvBnPool`] block.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ConvBnPoolConfig {
    /// The convolution (its activation is applied before the BatchNorm).
    pub conv: Conv2dConfig,
    /// The BatchNorm.
    pub bn: BatchNormConfig,
    /// The max pool after the BatchNorm, if any (default none).
    pub pool: Option<MaxPool2dConfig>,
}

/// `pool?(BatchNorm(conv(x)))`: an existing [`Conv2d`] and [`BatchNorm`] (same variables, same
/// checkpoints) run as one block.
///
/// With the fast kernels (the default; [`ConvBnPool::with_kernels`]) on an `f32` CPU input, training mode
/// is ONE custom op ([`ops::conv_bn_pool_train`]) and the running statistics are updated as
/// [`BatchNorm`] does; inference mode is [`ops::conv_bn_pool_infer`] (image by image, in cache, no
/// gradient). Otherwise it runs the three layers one after the other.
#[derive(Debug, Clone)]
pub struct ConvBnPool {
    conv: Conv2d,
    bn: BatchNorm,
    pool: Option<MaxPool2dConfig>,
    kernels: Kernels,
}

impl ConvBnPool {
    /// Wraps existing layers: `conv [o, c, k, k]` followed by `bn` over the same `o` channels and an
    /// optional pool, on the fast kernels.
    pub fn new(conv: Conv2d, bn: BatchNorm, pool: Option<MaxPool2dConfig>) -> Result<Self> {
        let act = conv.config().activation;
        if !act.fuses() {
            return Err(LayerError::Config(format!(
                "conv_bn_pool: the fused block applies ReLU or nothing, not {}; build the \
                 convolution, BatchNorm and pool as layers of their own",
                act.name()
            ))
            .into());
        }
        let o = conv.weight().dim(0)?;
        let c = bn.gamma().dim(0)?;
        if o != c {
            return Err(shape_err(
                "conv_bn_pool",
                format!("batch norm over {o} channels"),
                bn.gamma().dims(),
            ));
        }
        Ok(Self {
            conv,
            bn,
            pool,
            kernels: Kernels::Auto,
        })
    }
    /// The same block (and its layers) running on `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            conv: self.conv.with_kernels(kernels),
            bn: self.bn.with_kernels(kernels),
            kernels,
            ..self
        }
    }
    /// The convolution.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }
    /// The BatchNorm.
    pub fn bn(&self) -> &BatchNorm {
        &self.bn
    }
    /// The pool, if any.
    pub fn pool(&self) -> Option<&MaxPool2dConfig> {
        self.pool.as_ref()
    }

    /// The op spec for an input of spatial size `h x w`, and the output's size.
    fn spec(&self, h: usize, w: usize) -> Result<(BlockSpec, (usize, usize))> {
        let cfg = self.conv.config();
        let k = self.conv.weight().dim(3)?;
        block_spec(
            (h, w),
            k,
            cfg,
            cfg.activation.is_relu(),
            &self.bn,
            self.pool,
        )
    }
}

/// The op spec of a block whose (first) convolution is `k x k` with `cfg`'s stride and padding on
/// `h x w` inputs, then `relu`, BatchNorm and `pool`; and the size of its output.
fn block_spec(
    (h, w): (usize, usize),
    k: usize,
    cfg: &Conv2dConfig,
    relu: bool,
    bn: &BatchNorm,
    pool: Option<MaxPool2dConfig>,
) -> Result<(BlockSpec, (usize, usize))> {
    let (pad, (oh, ow)) = cfg.padding.resolve2d(h, w, k, cfg.stride)?;
    let (pool, out) = match pool {
        Some(p) => {
            let (pp, out) = p.padding.resolve2d(oh, ow, p.kernel, p.stride)?;
            let spec = PoolSpec {
                kernel: p.kernel,
                stride: p.stride,
                pad: pp,
            };
            (Some(spec), out)
        }
        None => (None, (oh, ow)),
    };
    let spec = BlockSpec {
        stride: cfg.stride,
        pad,
        relu,
        eps: bn.config().eps,
        pool,
    };
    Ok((spec, out))
}

/// Builds a [`ConvBnPool`] from fresh layers: [`conv2d`]`(in_c, out_c, k, cfg.conv, vb_conv)`,
/// [`batch_norm`]`(out_c, cfg.bn, vb_bn)` and `cfg.pool` (two builders so the variables keep the names
/// of separate layers, e.g. `conv1.weight` and `bn1.gamma`).
pub fn conv_bn_pool(
    in_c: usize,
    out_c: usize,
    k: usize,
    cfg: ConvBnPoolConfig,
    vb_conv: VarBuilder,
    vb_bn: VarBuilder,
) -> Result<ConvBnPool> {
    let conv = conv2d(in_c, out_c, k, cfg.conv, vb_conv)?;
    let bn = batch_norm(out_c, cfg.bn, vb_bn)?;
    ConvBnPool::new(conv, bn, cfg.pool)
}

impl ModuleT for ConvBnPool {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (h, w) = match xs.dims() {
            &[_, _, h, w] => (h, w),
            d => return Err(shape_err("conv_bn_pool", "[b, c, h, w]", d)),
        };
        if !self.kernels.use_fast(xs) {
            let ys = self.conv.forward(xs)?.apply_t(&self.bn, train)?;
            return match self.pool {
                Some(p) => MaxPool2d::new(p).with_kernels(self.kernels).forward(&ys),
                None => Ok(ys),
            };
        }
        let (spec, _) = self.spec(h, w)?;
        let (wt, bias) = (self.conv.weight(), self.conv.bias());
        if train {
            let (ys, mean, var) =
                ops::conv_bn_pool_train(xs, wt, bias, self.bn.gamma(), self.bn.beta(), &spec)?;
            self.bn.update_running(&mean, &var)?;
            Ok(ys)
        } else {
            let (scale, shift) = self.bn.eval_scale_shift()?;
            ops::conv_bn_pool_infer(xs, wt, bias, &scale, &shift, &spec)
        }
    }
}

/// Keras `SeparableConv2D -> BatchNormalization -> [MaxPooling2D]` (the same variables as the separate
/// layers).
///
/// With the fast kernels (the default; [`SeparableBnPool::with_kernels`]) on an `f32` CPU input,
/// training mode is ONE custom op ([`ops::separable_bn_pool_train`]: each image's depthwise output goes
/// straight into the pointwise convolution in cache) and the running statistics are updated as
/// [`BatchNorm`] does; inference mode is [`ops::separable_bn_pool_infer`]. Otherwise the layers run one
/// after the other.
#[derive(Debug, Clone)]
pub struct SeparableBnPool {
    depthwise: DepthwiseConv2d,
    block: ConvBnPool,
}

impl SeparableBnPool {
    /// Wraps an existing separable convolution, BatchNorm (over its output channels) and pool, on the
    /// fast kernels.
    pub fn new(
        sep: &SeparableConv2d,
        bn: BatchNorm,
        pool: Option<MaxPool2dConfig>,
    ) -> Result<Self> {
        Ok(Self {
            depthwise: sep.depthwise().clone().with_kernels(Kernels::Auto),
            block: ConvBnPool::new(sep.pointwise().clone(), bn, pool)?,
        })
    }
    /// The same block running on `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            depthwise: self.depthwise.with_kernels(kernels),
            block: self.block.with_kernels(kernels),
        }
    }
    /// The depthwise stage.
    pub fn depthwise(&self) -> &DepthwiseConv2d {
        &self.depthwise
    }
    /// The pointwise -> BatchNorm -> pool part.
    pub fn block(&self) -> &ConvBnPool {
        &self.block
    }

    /// The op spec for an input of spatial size `h x w` (stride and padding are the depthwise stage's),
    /// and the output's size.
    fn spec(&self, h: usize, w: usize) -> Result<(BlockSpec, (usize, usize))> {
        let blk = &self.block;
        let k = self.depthwise.weight().dim(3)?;
        let relu = blk.conv.config().activation.is_relu();
        block_spec((h, w), k, self.depthwise.config(), relu, &blk.bn, blk.pool)
    }
}

/// Builds a [`SeparableBnPool`]: [`separable_conv2d`]`(in_c, out_c, k, cfg.conv, vb_sep)` (variables
/// `depthwise.weight`, `pointwise.weight`, `pointwise.bias` under `vb_sep`), [`batch_norm`]`(out_c,
/// cfg.bn, vb_bn)` and `cfg.pool`.
pub fn separable_bn_pool(
    in_c: usize,
    out_c: usize,
    k: usize,
    cfg: ConvBnPoolConfig,
    vb_sep: VarBuilder,
    vb_bn: VarBuilder,
) -> Result<SeparableBnPool> {
    let sep = separable_conv2d(in_c, out_c, k, cfg.conv, vb_sep)?;
    let bn = batch_norm(out_c, cfg.bn, vb_bn)?;
    SeparableBnPool::new(&sep, bn, cfg.pool)
}

impl ModuleT for SeparableBnPool {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let blk = &self.block;
        if !blk.kernels.use_fast(xs) {
            return xs.apply(&self.depthwise)?.apply_t(blk, train);
        }
        let (h, w) = match xs.dims() {
            &[_, _, h, w] => (h, w),
            d => return Err(shape_err("separable_bn_pool", "[b, c, h, w]", d)),
        };
        let (dw, pw) = (&self.depthwise, &blk.conv);
        let (spec, _) = self.spec(h, w)?;
        if train {
            let (ys, mean, var) = ops::separable_bn_pool_train(
                xs,
                dw.weight(),
                pw.weight(),
                pw.bias(),
                blk.bn.gamma(),
                blk.bn.beta(),
                &spec,
            )?;
            blk.bn.update_running(&mean, &var)?;
            Ok(ys)
        } else {
            let (scale, shift) = blk.bn.eval_scale_shift()?;
            ops::separable_bn_pool_infer(
                xs,
                dw.weight(),
                pw.weight(),
                pw.bias(),
                &scale,
                &shift,
                &spec,
            )
        }
    }
}

/// A fused block of either kind, for [`train_stack`]: consecutive blocks of a network train as one op.
#[derive(Debug, Clone)]
pub enum FusedBlock {
    /// `pool?(BatchNorm(conv(x)))`.
    Conv(ConvBnPool),
    /// `pool?(BatchNorm(pointwise(depthwise(x))))`.
    Separable(SeparableBnPool),
}

impl From<ConvBnPool> for FusedBlock {
    fn from(b: ConvBnPool) -> Self {
        FusedBlock::Conv(b)
    }
}

impl From<SeparableBnPool> for FusedBlock {
    fn from(b: SeparableBnPool) -> Self {
        FusedBlock::Separable(b)
    }
}

impl FusedBlock {
    /// The convolution (the pointwise one of a separable block), BatchNorm and pool.
    fn block(&self) -> &ConvBnPool {
        match self {
            FusedBlock::Conv(b) => b,
            FusedBlock::Separable(s) => &s.block,
        }
    }

    /// The op's view of this block on `h x w` inputs, and its output size.
    fn stack_part(&self, (h, w): (usize, usize)) -> Result<(ops::StackBlock<'_>, (usize, usize))> {
        let blk = self.block();
        let (depthwise, (spec, out)) = match self {
            FusedBlock::Conv(b) => (None, b.spec(h, w)?),
            FusedBlock::Separable(s) => (Some(s.depthwise.weight()), s.spec(h, w)?),
        };
        let part = ops::StackBlock {
            depthwise,
            w: blk.conv.weight(),
            bias: blk.conv.bias(),
            gamma: blk.bn.gamma(),
            beta: blk.bn.beta(),
            spec,
        };
        Ok((part, out))
    }
}

impl FusedBlock {
    /// The inference op's view of this block on `h x w` inputs (BatchNorm as its running statistics'
    /// scale and shift), and its output size.
    fn infer_part(
        &self,
        (h, w): (usize, usize),
    ) -> Result<(ops::InferStackBlock<'_>, (usize, usize))> {
        let (part, out) = self.stack_part((h, w))?;
        let (scale, shift) = self.block().bn.eval_scale_shift()?;
        let part = ops::InferStackBlock {
            depthwise: part.depthwise,
            w: part.w,
            bias: part.bias,
            scale,
            shift,
            spec: part.spec,
        };
        Ok((part, out))
    }
}

impl ModuleT for FusedBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            FusedBlock::Conv(b) => b.forward_t(xs, train),
            FusedBlock::Separable(b) => b.forward_t(xs, train),
        }
    }
}

/// `blocks` one after the other on `xs` in training mode (batch statistics, running statistics
/// updated), as ONE op ([`ops::block_stack_train`]) when every block runs on the fast kernels: the
/// activations' gradients then pass from block to block without candle's gradient store. The same
/// outputs, gradients and running statistics as calling each block's `forward_t(xs, true)` in turn,
/// which is what happens otherwise (other kernels, devices or dtypes).
pub fn train_stack(blocks: &[&FusedBlock], xs: &Tensor) -> Result<Tensor> {
    let Some(parts) = stack_parts(blocks, xs, "train_stack", FusedBlock::stack_part)? else {
        return blocks
            .iter()
            .try_fold(xs.clone(), |ys, b| b.forward_t(&ys, true));
    };
    let (ys, stats) = ops::block_stack_train(xs, &parts)?;
    for (b, (mean, var)) in blocks.iter().zip(&stats) {
        b.block().bn.update_running(mean, var)?;
    }
    Ok(ys)
}

/// `blocks` one after the other on `xs` in inference mode, each image through all of them in cache
/// ([`ops::block_stack_infer`]) when every block runs on the fast kernels: the activations between the
/// blocks never go to memory for the whole batch. The same output, bit for bit, as calling each block's
/// `forward_t(xs, false)` in turn, which is what happens otherwise (other kernels, devices or dtypes).
pub fn infer_stack(blocks: &[&FusedBlock], xs: &Tensor) -> Result<Tensor> {
    let Some(parts) = stack_parts(blocks, xs, "infer_stack", FusedBlock::infer_part)? else {
        return blocks
            .iter()
            .try_fold(xs.clone(), |ys, b| b.forward_t(&ys, false));
    };
    ops::block_stack_infer(xs, &parts)
}

/// Each block's part of a stack op on `xs` (`part` gives a block's view on its input size, and its
/// output size), or `None` where the blocks run one by one: fewer than two, or not all on the fast
/// kernels for `xs`.
fn stack_parts<'b, P>(
    blocks: &[&'b FusedBlock],
    xs: &Tensor,
    op: &'static str,
    part: impl Fn(&'b FusedBlock, (usize, usize)) -> Result<(P, (usize, usize))>,
) -> Result<Option<Vec<P>>> {
    let mut hw = match xs.dims() {
        &[_, _, h, w] => (h, w),
        d => return Err(shape_err(op, "[b, c, h, w]", d)),
    };
    if blocks.len() < 2 || !blocks.iter().all(|b| b.block().kernels.use_fast(xs)) {
        return Ok(None);
    }
    let mut parts = Vec::with_capacity(blocks.len());
    for b in blocks {
        let (p, out) = part(b, hw)?;
        parts.push(p);
        hw = out;
    }
    Ok(Some(parts))
}

/// An inception module with its BatchNorm `bn` and then `blocks` on `xs` in training mode, as ONE op
/// ([`ops::inception_stack_train`]) when the module can train fused
/// ([`InceptionModule::train_with_bn`]) and every block runs on the fast kernels: the gradient at the
/// module's output then skips candle's gradient store too. Otherwise the module and then
/// [`train_stack`]. The same outputs, gradients and running statistics either way.
pub fn train_inception_stack(
    module: &InceptionModule,
    bn: &BatchNorm,
    blocks: &[&FusedBlock],
    xs: &Tensor,
) -> Result<Tensor> {
    let fast = !blocks.is_empty() && blocks.iter().all(|b| b.block().kernels.use_fast(xs));
    let head = match fast {
        true => module.fused_parts(xs, Some(bn))?,
        false => None,
    };
    let Some(FusedParts {
        branches,
        bn: module_bn,
        mut hw,
    }) = head
    else {
        return train_stack(blocks, &module.train_with_bn(bn, xs)?);
    };
    let mut parts = Vec::with_capacity(blocks.len());
    for b in blocks {
        let (part, out) = b.stack_part(hw)?;
        parts.push(part);
        hw = out;
    }
    let ops::StackTrained {
        y: ys,
        head_stats,
        stats,
    } = ops::inception_stack_train(xs, &branches, module_bn, &parts)?;
    if let Some((mean, var)) = head_stats {
        bn.update_running(&mean, &var)?;
    }
    for (b, (mean, var)) in blocks.iter().zip(&stats) {
        b.block().bn.update_running(mean, var)?;
    }
    Ok(ys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededVarMap;
    use crate::ops::test_util::{assert_close, rand_t};
    use crate::{Activation, Padding};
    use candle_core::{DType, Device};

    fn cfg() -> ConvBnPoolConfig {
        ConvBnPoolConfig {
            conv: Conv2dConfig {
                padding: Padding::Same,
                activation: Activation::Relu,
                ..Default::default()
            },
            bn: BatchNormConfig::default(),
            pool: Some(MaxPool2dConfig::default()),
        }
    }

    /// SiLU is applied after the convolution by candle's op (the values `y * sigmoid(y)` of the
    /// convolution without activation, on both kernel choices), and a fused block refuses it, naming it,
    /// rather than running it as no activation.
    #[test]
    fn silu_runs_after_the_convolution_and_the_fused_block_refuses_it() {
        let silu = Conv2dConfig {
            activation: Activation::Silu,
            ..cfg().conv
        };
        let none = Conv2dConfig {
            activation: Activation::None,
            ..cfg().conv
        };
        let x = rand_t(&[2, 3, 9, 9], 7);
        let vars = SeededVarMap::new(2);
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        let conv = conv2d(3, 4, 3, silu, vb.pp("c")).unwrap();
        let plain = conv2d(3, 4, 3, none, vb.pp("c")).unwrap();
        let y = plain.forward(&x).unwrap();
        let want = (&y * candle_nn::ops::sigmoid(&y).unwrap()).unwrap();
        for kernels in [Kernels::Auto, Kernels::Reference] {
            let got = conv.clone().with_kernels(kernels).forward(&x).unwrap();
            assert_close(&got, &want, 1e-5, &format!("silu {kernels:?}"));
        }
        let bn = batch_norm(4, BatchNormConfig::default(), vb.pp("bn")).unwrap();
        let err = ConvBnPool::new(conv, bn, None).unwrap_err().to_string();
        assert!(err.contains("silu"), "{err}");
    }

    #[test]
    fn fused_block_matches_separate_layers() {
        let mf = SeededVarMap::new(3);
        let mr = SeededVarMap::new(3);
        let dev = Device::Cpu;
        let vf = mf.var_builder(DType::F32, &dev);
        let vr = mr.var_builder(DType::F32, &dev);
        let fast = conv_bn_pool(2, 6, 3, cfg(), vf.pp("c"), vf.pp("bn")).unwrap();
        let refr = conv_bn_pool(2, 6, 3, cfg(), vr.pp("c"), vr.pp("bn"))
            .unwrap()
            .with_kernels(Kernels::Reference);
        // Same variables as separate layers would have.
        let mut names: Vec<String> = mf
            .var_map()
            .data()
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "bn.beta",
                "bn.gamma",
                "bn.running_mean",
                "bn.running_var",
                "c.bias",
                "c.weight"
            ]
        );
        for step in 0..2 {
            let x = rand_t(&[4, 2, 9, 9], 10 + step);
            let yf = fast.forward_t(&x, true).unwrap();
            let yr = refr.forward_t(&x, true).unwrap();
            assert_eq!(yf.dims(), &[4, 6, 4, 4]);
            assert_close(&yf, &yr, 1e-4, "train fwd");
        }
        assert_close(
            fast.bn().running_mean(),
            refr.bn().running_mean(),
            1e-5,
            "running mean",
        );
        assert_close(
            fast.bn().running_var(),
            refr.bn().running_var(),
            1e-5,
            "running var",
        );
        let x = rand_t(&[3, 2, 9, 9], 20);
        let ye = fast.forward_t(&x, false).unwrap();
        assert_close(&ye, &refr.forward_t(&x, false).unwrap(), 1e-4, "eval fwd");
        assert!(fast.forward_t(&rand_t(&[1, 3, 9, 9], 1), true).is_err());
    }

    #[test]
    fn separable_block_matches_separate_layers() {
        let valid = ConvBnPoolConfig {
            conv: Conv2dConfig {
                padding: Padding::Valid,
                ..cfg().conv
            },
            ..cfg()
        };
        let mf = SeededVarMap::new(4);
        let mr = SeededVarMap::new(4);
        let dev = Device::Cpu;
        let vf = mf.var_builder(DType::F32, &dev);
        let vr = mr.var_builder(DType::F32, &dev);
        let fast = separable_bn_pool(3, 5, 3, valid, vf.pp("s"), vf.pp("bn")).unwrap();
        let refr = separable_bn_pool(3, 5, 3, valid, vr.pp("s"), vr.pp("bn"))
            .unwrap()
            .with_kernels(Kernels::Reference);
        let mut names: Vec<String> = mf
            .var_map()
            .data()
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "bn.beta",
                "bn.gamma",
                "bn.running_mean",
                "bn.running_var",
                "s.depthwise.weight",
                "s.pointwise.bias",
                "s.pointwise.weight"
            ]
        );
        let x = rand_t(&[4, 3, 12, 12], 30);
        let yf = fast.forward_t(&x, true).unwrap();
        assert_eq!(yf.dims(), &[4, 5, 5, 5]);
        assert_close(&yf, &refr.forward_t(&x, true).unwrap(), 1e-4, "train fwd");
        let ye = fast.forward_t(&x, false).unwrap();
        assert_close(&ye, &refr.forward_t(&x, false).unwrap(), 1e-4, "eval fwd");
    }
}

//! Our improved variants: > 99% within 10 epochs, each within its solution's original parameter budget.
//!
//! Shared recipe: every convolution is followed by ReLU then BatchNorm (as in the originals), two
//! max-pooling steps, global average pooling and a tiny dense head instead of a big flatten + dense.
//! BatchNorm keeps its running statistics with momentum 0.9 (PyTorch's default) rather than Keras's 0.99:
//! with 0.99 the statistics lag the weights so far in the fast one-cycle warm-up (and in short runs) that
//! inference-mode accuracy collapses while training accuracy is fine.

/// Running-statistics momentum of the improved variants' BatchNorm layers (Keras convention).
const BN_MOMENTUM: f64 = 0.9;

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use mnist_layers::{
    batch_norm, conv2d, inception_module, linear, separable_conv2d, Activation, BatchNorm,
    BatchNormConfig, BranchLayer, Conv2dConfig, InceptionConfig, Kernels, MaxPool2d,
    MaxPool2dConfig, Padding, SharedRng,
};

use crate::net::{GlobalAvgPool, Stage};

fn bn_cfg(kernels: Kernels) -> BatchNormConfig {
    BatchNormConfig {
        kernels,
        momentum: BN_MOMENTUM,
        ..Default::default()
    }
}

/// A convolution (ReLU fused) followed by BatchNorm: `[b, in, h, w] -> [b, out, h', w']`.
struct ConvBn {
    conv: Box<dyn Module + Send + Sync>,
    bn: BatchNorm,
}

impl ModuleT for ConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.conv.forward(xs)?.apply_t(&self.bn, train)
    }
}

#[derive(Clone, Copy)]
enum ConvKind {
    Plain,
    Separable,
}

struct Builder<'a> {
    vb: VarBuilder<'a>,
    kernels: Kernels,
    stages: Vec<Stage>,
    block: usize,
    pool: usize,
}

impl<'a> Builder<'a> {
    fn new(vb: VarBuilder<'a>, kernels: Kernels) -> Self {
        Self {
            vb,
            kernels,
            stages: Vec::new(),
            block: 0,
            pool: 0,
        }
    }

    fn bn_cfg(&self) -> BatchNormConfig {
        bn_cfg(self.kernels)
    }

    fn conv_bn(mut self, kind: ConvKind, c_in: usize, c_out: usize, k: usize, padding: Padding) -> Result<Self> {
        self.block += 1;
        let name = format!("block{}", self.block);
        let vb = self.vb.pp(&name);
        let cfg = Conv2dConfig {
            stride: 1,
            padding,
            activation: Activation::Relu,
            bias: true,
            kernels: self.kernels,
        };
        let (conv, kind_name): (Box<dyn Module + Send + Sync>, _) = match kind {
            ConvKind::Plain => (Box::new(conv2d(c_in, c_out, k, cfg, vb.pp("conv"))?), "Conv2D+BN"),
            ConvKind::Separable => (
                Box::new(separable_conv2d(c_in, c_out, k, cfg, vb.pp("conv"))?),
                "SeparableConv2D+BN",
            ),
        };
        let bn = batch_norm(c_out, self.bn_cfg(), vb.pp("bn"))?;
        self.stages.push(Stage::train(&name, kind_name, ConvBn { conv, bn }));
        Ok(self)
    }

    fn pool(mut self) -> Self {
        self.pool += 1;
        let pool = MaxPool2d(MaxPool2dConfig {
            kernel: 2,
            stride: 2,
            padding: Padding::Valid,
            kernels: self.kernels,
        });
        self.stages.push(Stage::plain(&format!("pool{}", self.pool), "MaxPooling2D", pool));
        self
    }

    fn head(mut self, c_in: usize) -> Result<Vec<Stage>> {
        self.stages.push(Stage::plain("gap", "GlobalAveragePooling2D", GlobalAvgPool));
        self.stages.push(Stage::plain("dense", "Dense", linear(c_in, 10, self.vb.pp("dense"))?));
        Ok(self.stages)
    }
}

/// Conv, improved: plain 3x3 convolutions 8-16 channels wide; 8,030 params.
pub(crate) fn conv<'a>(vb: VarBuilder<'a>, _rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    use ConvKind::Plain;
    Builder::new(vb, k)
        .conv_bn(Plain, 1, 8, 3, Padding::Same)? // [b, 8, 28, 28]
        .conv_bn(Plain, 8, 16, 3, Padding::Same)? // [b, 16, 28, 28]
        .pool() // [b, 16, 14, 14]
        .conv_bn(Plain, 16, 16, 3, Padding::Same)? // [b, 16, 14, 14]
        .conv_bn(Plain, 16, 16, 3, Padding::Same)? // [b, 16, 14, 14]
        .pool() // [b, 16, 7, 7]
        .conv_bn(Plain, 16, 12, 3, Padding::Valid)? // [b, 12, 5, 5]
        .head(12) // [b, 12] -> [b, 10]
}

/// Separable, improved: five 3x3 separable convolutions 16-32 channels wide; 4,795 params.
pub(crate) fn separable<'a>(vb: VarBuilder<'a>, _rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    use ConvKind::Separable;
    Builder::new(vb, k)
        .conv_bn(Separable, 1, 16, 3, Padding::Same)? // [b, 16, 28, 28]
        .conv_bn(Separable, 16, 24, 3, Padding::Same)? // [b, 24, 28, 28]
        .pool() // [b, 24, 14, 14]
        .conv_bn(Separable, 24, 32, 3, Padding::Same)? // [b, 32, 14, 14]
        .conv_bn(Separable, 32, 32, 3, Padding::Same)? // [b, 32, 14, 14]
        .pool() // [b, 32, 7, 7]
        .conv_bn(Separable, 32, 24, 3, Padding::Same)? // [b, 24, 7, 7]
        .head(24) // [b, 24] -> [b, 10]
}

/// Inception, improved: an inception module (1x1, 3x3, 5x5 and pool branches) then separable
/// convolutions; 2,958 params.
pub(crate) fn inception<'a>(vb: VarBuilder<'a>, rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    use BranchLayer::{Conv, MaxPool};
    use ConvKind::Separable;
    let module = InceptionConfig {
        branches: vec![
            vec![Conv { out: 4, k: 1 }],
            vec![Conv { out: 4, k: 3 }],
            vec![Conv { out: 4, k: 5 }],
            vec![MaxPool { k: 3 }, Conv { out: 4, k: 1 }],
        ],
        activation: Activation::Relu,
        batch_norm: bn_cfg(k),
        kernels: k,
    };
    let c0 = module.out_channels(1);
    let inception = inception_module(1, &module, vb.pp("inception"), rng)?;
    let bn = batch_norm(c0, bn_cfg(k), vb.pp("inception_bn"))?;
    let mut b = Builder::new(vb, k);
    // [b, 1, 28, 28] -> [b, 16, 28, 28]
    b.stages.push(Stage::train("inception", "Inception", inception));
    b.stages.push(Stage::train("inception_bn", "BatchNormalization", bn));
    b.conv_bn(Separable, c0, 16, 3, Padding::Same)? // [b, 16, 28, 28]
        .pool() // [b, 16, 14, 14]
        .conv_bn(Separable, 16, 24, 3, Padding::Same)? // [b, 24, 14, 14]
        .conv_bn(Separable, 24, 24, 3, Padding::Same)? // [b, 24, 14, 14]
        .pool() // [b, 24, 7, 7]
        .conv_bn(Separable, 24, 12, 3, Padding::Same)? // [b, 12, 7, 7]
        .head(12) // [b, 12] -> [b, 10]
}

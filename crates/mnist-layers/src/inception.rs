//! The inception module: parallel branches over the same input, concatenated along channels.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::{
    batch_norm, conv2d, dropout, separable_conv2d, Activation, BatchNormConfig, Conv2dConfig,
    Dropout, Kernels, MaxPool2d, MaxPool2dConfig, Padding, SharedRng,
};

/// One layer of an inception branch. Convolutions keep the spatial size ('same' padding, stride 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchLayer {
    /// A k x k convolution with bias to `out` channels, followed by the module's activation.
    Conv { out: usize, k: usize },
    /// A k x k separable convolution (depthwise, then pointwise with bias) to `out` channels + activation.
    SepConv { out: usize, k: usize },
    /// k x k max-pooling with stride 1 and 'same' padding.
    MaxPool { k: usize },
    /// BatchNorm over the current channels.
    BatchNorm,
    /// Dropout with this rate.
    Dropout(f32),
}

/// Configuration of an [`InceptionModule`]: the branches, each a list of layers applied to the input.
#[derive(Debug, Clone, PartialEq)]
pub struct InceptionConfig {
    /// The branches, in the order their outputs are concatenated.
    pub branches: Vec<Vec<BranchLayer>>,
    /// Activation after every convolution.
    pub activation: Activation,
    /// BatchNorm settings for `BranchLayer::BatchNorm`.
    pub batch_norm: BatchNormConfig,
    /// Which kernels the layers use.
    pub kernels: Kernels,
}

impl InceptionConfig {
    /// The number of channels the module outputs for an input of `in_c` channels.
    pub fn out_channels(&self, in_c: usize) -> usize {
        self.branches
            .iter()
            .map(|branch| {
                branch.iter().fold(in_c, |c, layer| match layer {
                    BranchLayer::Conv { out, .. } | BranchLayer::SepConv { out, .. } => *out,
                    _ => c,
                })
            })
            .sum()
    }
}

enum BranchOp {
    Layer(Box<dyn Module + Send + Sync>),
    LayerT(Box<dyn ModuleT + Send + Sync>),
}

impl BranchOp {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            BranchOp::Layer(m) => m.forward(xs),
            BranchOp::LayerT(m) => m.forward_t(xs, train),
        }
    }
}

/// Parallel branches over one input, concatenated along the channel axis: `[b, c, h, w] -> [b, sum(out_i), h, w]`.
pub struct InceptionModule {
    branches: Vec<Vec<BranchOp>>,
    out_channels: usize,
}

impl InceptionModule {
    /// The number of output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }
}

/// Builds an inception module over `in_c` input channels. Variables live under `vb.pp("branch{i}").pp("{j}")`.
pub fn inception_module(
    in_c: usize,
    cfg: &InceptionConfig,
    vb: VarBuilder,
    rng: SharedRng,
) -> Result<InceptionModule> {
    if cfg.branches.is_empty() {
        candle_core::bail!("inception module needs at least one branch");
    }
    let conv_cfg = Conv2dConfig {
        padding: Padding::Same,
        activation: cfg.activation,
        kernels: cfg.kernels,
        ..Default::default()
    };
    let mut branches = Vec::with_capacity(cfg.branches.len());
    for (i, spec) in cfg.branches.iter().enumerate() {
        let vb_b = vb.pp(format!("branch{i}"));
        let mut c = in_c;
        let mut ops = Vec::with_capacity(spec.len());
        for (j, layer) in spec.iter().enumerate() {
            let vb_l = vb_b.pp(j.to_string());
            let op = match *layer {
                BranchLayer::Conv { out, k } => {
                    let m = conv2d(c, out, k, conv_cfg, vb_l)?;
                    c = out;
                    BranchOp::Layer(Box::new(m))
                }
                BranchLayer::SepConv { out, k } => {
                    let m = separable_conv2d(c, out, k, conv_cfg, vb_l)?;
                    c = out;
                    BranchOp::Layer(Box::new(m))
                }
                BranchLayer::MaxPool { k } => {
                    BranchOp::Layer(Box::new(MaxPool2d(MaxPool2dConfig {
                        kernel: k,
                        stride: 1,
                        padding: Padding::Same,
                        kernels: cfg.kernels,
                    })))
                }
                BranchLayer::BatchNorm => {
                    BranchOp::LayerT(Box::new(batch_norm(c, cfg.batch_norm, vb_l)?))
                }
                BranchLayer::Dropout(p) => {
                    let d: Dropout = dropout(p, rng.clone());
                    BranchOp::LayerT(Box::new(d))
                }
            };
            ops.push(op);
        }
        branches.push(ops);
    }
    Ok(InceptionModule {
        branches,
        out_channels: cfg.out_channels(in_c),
    })
}

impl ModuleT for InceptionModule {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
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
}

//! The one lowering from an [`ArchSpec`] to a [`Net`]: it alone decides the variable names (from the
//! plan), the Keras-style labels, which layers run fused and on which kernels.

use candle_core::Result;
use candle_nn::VarBuilder;
use mnist_layers::{
    batch_norm, conv2d, dropout, linear_with_init, separable_conv2d, squeeze_excite, Activation,
    BatchNorm, BatchNormConfig, BranchLayer, Conv2d, Conv2dConfig, ConvBnPool, FusedBlock,
    InceptionModule, Kernels, MaxPool2d, MaxPool2dConfig, RunningStats, SeparableBnPool,
    SeparableConv2d, SharedRng, WeightInit,
};

use crate::net::{Flatten, GlobalAvgPool, Stage};
use crate::plan::{branch_layer_name, inception_bn_name, plan, BlockNames, Planned};
use crate::spec::{ArchSpec, BnPlace, ConvSpec, InceptionSpec, LayerSpec, PoolSpec};
use crate::{ModelError, Net};

fn pool_cfg(p: &PoolSpec) -> MaxPool2dConfig {
    MaxPool2dConfig {
        kernel: p.kernel,
        stride: p.stride(),
        padding: p.padding,
    }
}

/// The convolution's own config (its activation: [`ConvSpec::conv_activation`]; its weights drawn by
/// `init`, the model's).
fn conv_cfg(c: &ConvSpec, init: WeightInit) -> Conv2dConfig {
    Conv2dConfig {
        stride: c.stride,
        padding: c.padding,
        activation: c.conv_activation(),
        bias: c.bias,
        init,
    }
}

/// Builds the model `spec` describes, creating (or loading) its variables through `vb` in layer order,
/// on `kernels`; dropout masks are drawn from `rng`. With [`Kernels::Auto`] a conv block with a
/// BatchNorm after its activation trains as one fused op.
pub fn build(
    spec: &ArchSpec,
    vb: VarBuilder,
    kernels: Kernels,
    rng: SharedRng,
) -> std::result::Result<Net, ModelError> {
    let plan = plan(spec)?;
    let bn_cfg = BatchNormConfig {
        eps: spec.batch_norm.eps,
        momentum: spec.batch_norm.momentum,
        ..Default::default()
    };
    let lower = Lower {
        vb,
        kernels,
        rng,
        bn_cfg,
        bn_stats: RunningStats::default(),
        init: spec.init,
    };
    let mut stages = Vec::new();
    // The layers whose input a residual shortcut adds later keep it (a stage of no work).
    let kept: Vec<usize> = plan
        .layers
        .iter()
        .filter_map(|l| l.spec.shortcut())
        .collect();
    for (i, layer) in plan.layers.iter().enumerate() {
        if kept.contains(&i) {
            stages.push(Stage::keep_input(i));
        }
        lower.layer(layer, &mut stages)?;
    }
    Ok(Net::new(spec.clone(), stages, lower.bn_stats))
}

struct Lower<'a> {
    vb: VarBuilder<'a>,
    kernels: Kernels,
    rng: SharedRng,
    bn_cfg: BatchNormConfig,
    /// Shared by every BatchNorm of the model ([`Net::recalibrate_batch_norm`]).
    bn_stats: RunningStats,
    /// How convolution and dense weights are drawn.
    init: WeightInit,
}

impl Lower<'_> {
    fn fast(&self) -> bool {
        self.kernels == Kernels::Auto
    }

    /// A BatchNorm over `c` channels with the spec's settings, its variables under `vb`.
    fn batch_norm(&self, c: usize, vb: VarBuilder) -> Result<BatchNorm> {
        Ok(batch_norm(c, self.bn_cfg, vb)?.with_running_stats(self.bn_stats.clone()))
    }

    fn layer(&self, l: &Planned, stages: &mut Vec<Stage>) -> Result<()> {
        let k = self.kernels;
        let c_in = l.input.channels();
        let flat_in = match l.input {
            crate::plan::Dims::Flat(n) => n,
            crate::plan::Dims::Map { c, h, w } => c * h * w,
        };
        match l.spec {
            LayerSpec::Conv(c) | LayerSpec::SeparableConv(c) => {
                let separable = matches!(l.spec, LayerSpec::SeparableConv(_));
                let names = l.block.as_ref().ok_or_else(|| {
                    candle_core::Error::msg(format!("{}: a conv block without part names", l.name))
                })?;
                self.conv_block(c, separable, c_in.unwrap_or(0), names, stages)?;
                if let Some(n) = c.shortcut {
                    stages.push(Stage::add_input_of(&names.add, n));
                }
            }
            LayerSpec::MaxPool(p) => stages.push(Stage::plain(
                &l.name,
                "MaxPooling2D",
                MaxPool2d::new(pool_cfg(p)).with_kernels(k),
            )),
            LayerSpec::BatchNorm => {
                let bn = self.batch_norm(c_in.unwrap_or(0), self.vb.pp(&l.name))?;
                stages.push(Stage::train(
                    &l.name,
                    "BatchNormalization",
                    bn.with_kernels(k),
                ));
            }
            LayerSpec::Dropout(d) => stages.push(Stage::train(
                &l.name,
                "Dropout",
                dropout(d.rate, self.rng.clone()),
            )),
            LayerSpec::Flatten => stages.push(Stage::plain(&l.name, "Flatten", Flatten)),
            LayerSpec::GlobalAvgPool => stages.push(Stage::plain(
                &l.name,
                "GlobalAveragePooling2D",
                GlobalAvgPool,
            )),
            LayerSpec::Dense(d) => {
                let m = linear_with_init(flat_in, d.units, self.init, self.vb.pp(&l.name))?;
                stages.push(Stage::plain(&l.name, "Dense", m));
                if d.activation != Activation::None {
                    stages.push(Stage::plain(
                        &format!("{}.{}", l.name, d.activation.name()),
                        d.activation.keras_layer(),
                        d.activation,
                    ));
                }
            }
            LayerSpec::Inception(m) => self.inception(m, c_in.unwrap_or(0), &l.name, stages)?,
            LayerSpec::SqueezeExcite(se) => {
                let m =
                    squeeze_excite(c_in.unwrap_or(0), se.units, self.init, self.vb.pp(&l.name))?;
                stages.push(Stage::plain(&l.name, "SqueezeExcite", m));
            }
        }
        Ok(())
    }

    fn conv_block(
        &self,
        c: &ConvSpec,
        separable: bool,
        c_in: usize,
        names: &BlockNames,
        stages: &mut Vec<Stage>,
    ) -> Result<()> {
        let k = self.kernels;
        let (kind, cfg) = (
            if separable {
                "SeparableConv2D"
            } else {
                "Conv2D"
            },
            conv_cfg(c, self.init),
        );
        // A tied convolution (`weights_of`) gets the owner's variables: the var map hands out the same
        // variable for a name it holds, so both blocks train one set of weights.
        let vc = self.vb.pp(&names.weights);
        let pool = c.pool.as_ref().map(pool_cfg);
        let fused = self.fast() && c.batch_norm == BnPlace::After && c.activation.fuses();
        if fused {
            let bn = self.batch_norm(c.filters, self.vb.pp(&names.bn))?;
            let label = match (separable, pool.is_some()) {
                (false, false) => "Conv2D+BN",
                (false, true) => "Conv2D+BN+MaxPool",
                (true, false) => "SeparableConv2D+BN",
                (true, true) => "SeparableConv2D+BN+MaxPool",
            };
            let prefixes = [names.weights.as_str(), names.bn.as_str()];
            let block: FusedBlock = if separable {
                let sep = separable_conv2d(c_in, c.filters, c.kernel, cfg, vc)?;
                SeparableBnPool::new(&sep, bn, pool)?.into()
            } else {
                let conv = conv2d(c_in, c.filters, c.kernel, cfg, vc)?;
                ConvBnPool::new(conv, bn, pool)?.into()
            };
            let stage = Stage::block(&names.conv, label, &prefixes, block);
            stages.push(stage);
            return Ok(());
        }
        stages.push(if separable {
            let m: SeparableConv2d = separable_conv2d(c_in, c.filters, c.kernel, cfg, vc)?;
            Stage::plain(&names.conv, kind, m.with_kernels(k))
        } else {
            let m: Conv2d = conv2d(c_in, c.filters, c.kernel, cfg, vc)?;
            Stage::plain(&names.conv, kind, m.with_kernels(k))
        });
        if c.batch_norm != BnPlace::None {
            let bn = self.batch_norm(c.filters, self.vb.pp(&names.bn))?;
            stages.push(Stage::train(
                &names.bn,
                "BatchNormalization",
                bn.with_kernels(k),
            ));
            if let Some(act) = c.activation_after_bn() {
                stages.push(Stage::plain(&names.act, act.keras_layer(), act));
            }
        }
        if let Some(p) = pool {
            stages.push(Stage::plain(
                &names.pool,
                "MaxPooling2D",
                MaxPool2d::new(p).with_kernels(k),
            ));
        }
        Ok(())
    }

    fn inception(
        &self,
        m: &InceptionSpec,
        c_in: usize,
        name: &str,
        stages: &mut Vec<Stage>,
    ) -> Result<()> {
        let mut branches = Vec::with_capacity(m.branches.len());
        for (i, spec) in m.branches.iter().enumerate() {
            let mut c = c_in;
            let mut layers = Vec::with_capacity(spec.len());
            for (j, layer) in spec.iter().enumerate() {
                let vb = self.vb.pp(branch_layer_name(name, i, j));
                layers.push(match layer {
                    LayerSpec::Conv(s) => {
                        let m = conv2d(c, s.filters, s.kernel, conv_cfg(s, self.init), vb)?;
                        c = s.filters;
                        BranchLayer::Conv(m)
                    }
                    LayerSpec::SeparableConv(s) => {
                        let m =
                            separable_conv2d(c, s.filters, s.kernel, conv_cfg(s, self.init), vb)?;
                        c = s.filters;
                        BranchLayer::SepConv(m)
                    }
                    LayerSpec::MaxPool(p) => BranchLayer::MaxPool(MaxPool2d::new(pool_cfg(p))),
                    LayerSpec::BatchNorm => BranchLayer::BatchNorm(self.batch_norm(c, vb)?),
                    LayerSpec::Dropout(d) => {
                        BranchLayer::Dropout(dropout(d.rate, self.rng.clone()))
                    }
                    other => candle_core::bail!(
                        "{name}: a {} layer in an inception branch",
                        other.type_name()
                    ),
                });
            }
            branches.push(layers);
        }
        let module = InceptionModule::new(c_in, branches)?.with_kernels(self.kernels);
        let out_c = module.out_channels();
        stages.push(Stage::inception(name, module));
        if m.batch_norm {
            let bn_name = inception_bn_name(name);
            let bn = self.batch_norm(out_c, self.vb.pp(&bn_name))?;
            stages.push(Stage::norm(&bn_name, bn.with_kernels(self.kernels)));
        }
        Ok(())
    }
}

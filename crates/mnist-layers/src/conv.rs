//! Convolution layers: dense [`Conv2d`], [`DepthwiseConv2d`] and Keras-style [`SeparableConv2d`].

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::error::shape_err;
use crate::init::WeightInit;
use crate::{ops, Activation, Kernels, LayerError, Padding};

/// Configuration shared by the convolution layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Stride in both spatial dims (default 1).
    pub stride: usize,
    /// Keras padding mode (default [`Padding::Valid`]).
    pub padding: Padding,
    /// Activation applied after the bias (default none).
    pub activation: Activation,
    /// Whether the layer has a bias (default true).
    pub bias: bool,
    /// How the weights are drawn (default glorot-uniform, as Keras).
    pub init: WeightInit,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: Padding::Valid,
            activation: Activation::None,
            bias: true,
            init: WeightInit::GlorotUniform,
        }
    }
}

fn check_config(layer: &str, dims: &[(&str, usize)], cfg: &Conv2dConfig) -> Result<()> {
    for (name, v) in dims.iter().copied().chain([("stride", cfg.stride)]) {
        if v == 0 {
            return Err(LayerError::Config(format!("{layer}: {name} must be positive")).into());
        }
    }
    Ok(())
}

/// Checks `xs` is `[b, c, h, w]` with `c == in_c` and returns `(h, w)`.
fn check_input(layer: &'static str, xs: &Tensor, in_c: usize) -> Result<(usize, usize)> {
    match xs.dims() {
        &[_, c, h, w] if c == in_c => Ok((h, w)),
        d => Err(shape_err(layer, format!("[b, {in_c}, h, w]"), d)),
    }
}

/// A dense 2-D convolution `activation(conv(x, weight) + bias)` with Keras padding.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    in_c: usize,
    k: usize,
    config: Conv2dConfig,
    kernels: Kernels,
}

/// Builds a [`Conv2d`]: `"weight" [out_c, in_c, k, k]` drawn by `cfg.init` (fan_in = in_c*k*k,
/// fan_out = out_c*k*k), `"bias" [out_c]` zeros when `cfg.bias`. It runs on the fast kernels where it
/// can ([`Conv2d::with_kernels`] chooses otherwise).
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    check_config(
        "conv2d",
        &[("in_c", in_c), ("out_c", out_c), ("kernel", k)],
        &cfg,
    )?;
    let weight = vb.get_with_hints(
        (out_c, in_c, k, k),
        "weight",
        cfg.init.init(in_c * k * k, out_c * k * k),
    )?;
    let bias = if cfg.bias {
        Some(vb.get_with_hints(out_c, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Conv2d {
        weight,
        bias,
        in_c,
        k,
        config: cfg,
        kernels: Kernels::Auto,
    })
}

impl Conv2d {
    /// The same layer running on `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }
    /// The implementation the layer uses.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }
    /// The weight `[out_c, in_c, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias `[out_c]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The configuration.
    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (h, w) = check_input("conv2d", xs, self.in_c)?;
        let cfg = self.config;
        let (pad, _) = cfg.padding.resolve2d(h, w, self.k, cfg.stride)?;
        let relu = cfg.activation.is_relu();
        let ys = if self.kernels.use_fast(xs) {
            ops::conv2d_fused(xs, &self.weight, self.bias.as_ref(), cfg.stride, pad, relu)?
        } else {
            ops::conv2d_fused_reference(
                xs,
                &self.weight,
                self.bias.as_ref(),
                cfg.stride,
                pad,
                relu,
            )?
        };
        if cfg.activation.fuses() {
            Ok(ys)
        } else {
            cfg.activation.forward(&ys)
        }
    }
}

/// A depthwise 2-D convolution (one `k x k` filter per channel, depth multiplier 1), optional bias and
/// activation.
#[derive(Debug, Clone)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    c: usize,
    k: usize,
    config: Conv2dConfig,
    kernels: Kernels,
}

/// Builds a [`DepthwiseConv2d`]: `"weight" [c, 1, k, k]` drawn by `cfg.init` with fan_in = fan_out = k*k
/// (Keras depthwise, multiplier 1), `"bias" [c]` zeros when `cfg.bias`.
pub fn depthwise_conv2d(
    c: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<DepthwiseConv2d> {
    check_config("depthwise_conv2d", &[("channels", c), ("kernel", k)], &cfg)?;
    let weight = vb.get_with_hints((c, 1, k, k), "weight", cfg.init.init(k * k, k * k))?;
    let bias = if cfg.bias {
        Some(vb.get_with_hints(c, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(DepthwiseConv2d {
        weight,
        bias,
        c,
        k,
        config: cfg,
        kernels: Kernels::Auto,
    })
}

impl DepthwiseConv2d {
    /// The same layer running on `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }
    /// The implementation the layer uses.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }
    /// The weight `[c, 1, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias `[c]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The configuration.
    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }
}

impl Module for DepthwiseConv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (h, w) = check_input("depthwise_conv2d", xs, self.c)?;
        let cfg = self.config;
        let (pad, _) = cfg.padding.resolve2d(h, w, self.k, cfg.stride)?;
        let mut ys = if self.kernels.use_fast(xs) {
            ops::depthwise_conv2d(xs, &self.weight, cfg.stride, pad)?
        } else {
            ops::depthwise_conv2d_reference(xs, &self.weight, cfg.stride, pad)?
        };
        if let Some(b) = &self.bias {
            ys = ys.broadcast_add(&b.reshape((1, self.c, 1, 1))?)?;
        }
        cfg.activation.forward(&ys)
    }
}

/// Keras `SeparableConv2D`: a depthwise convolution (no bias, stride and padding from the config)
/// followed by a 1x1 pointwise convolution with the bias and the activation.
#[derive(Debug, Clone)]
pub struct SeparableConv2d {
    depthwise: DepthwiseConv2d,
    pointwise: Conv2d,
}

/// Builds a [`SeparableConv2d`]: `vb.pp("depthwise")` holds the depthwise `"weight" [in_c, 1, k, k]`,
/// `vb.pp("pointwise")` the pointwise `"weight" [out_c, in_c, 1, 1]` and `"bias" [out_c]`.
pub fn separable_conv2d(
    in_c: usize,
    out_c: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<SeparableConv2d> {
    let dw_cfg = Conv2dConfig {
        activation: Activation::None,
        bias: false,
        ..cfg
    };
    let pw_cfg = Conv2dConfig {
        stride: 1,
        padding: Padding::Valid,
        ..cfg
    };
    let depthwise = depthwise_conv2d(in_c, k, dw_cfg, vb.pp("depthwise"))?;
    let pointwise = conv2d(in_c, out_c, 1, pw_cfg, vb.pp("pointwise"))?;
    Ok(SeparableConv2d {
        depthwise,
        pointwise,
    })
}

impl SeparableConv2d {
    /// The same layer running on `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            depthwise: self.depthwise.with_kernels(kernels),
            pointwise: self.pointwise.with_kernels(kernels),
        }
    }
    /// The depthwise stage.
    pub fn depthwise(&self) -> &DepthwiseConv2d {
        &self.depthwise
    }
    /// The pointwise stage.
    pub fn pointwise(&self) -> &Conv2d {
        &self.pointwise
    }
}

impl Module for SeparableConv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.depthwise)?.apply(&self.pointwise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededVarMap;
    use crate::ops::test_util::{assert_close, rand_t};
    use candle_core::{DType, Device};

    #[test]
    fn conv_layer_shapes_and_params() {
        let m = SeededVarMap::new(0);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let cfg = Conv2dConfig {
            padding: Padding::Same,
            activation: Activation::Relu,
            ..Default::default()
        };
        let c1 = conv2d(1, 20, 7, cfg, vb.pp("c1")).unwrap();
        let x = rand_t(&[2, 1, 28, 28], 1);
        assert_eq!(x.apply(&c1).unwrap().dims(), &[2, 20, 28, 28]);
        let s = separable_conv2d(1, 28, 3, Conv2dConfig::default(), vb.pp("s1")).unwrap();
        assert_eq!(x.apply(&s).unwrap().dims(), &[2, 28, 26, 26]);
        let s2 = separable_conv2d(
            7,
            2,
            3,
            Conv2dConfig {
                stride: 2,
                ..Default::default()
            },
            vb.pp("s2"),
        )
        .unwrap();
        assert_eq!(
            rand_t(&[2, 7, 28, 28], 2).apply(&s2).unwrap().dims(),
            &[2, 2, 13, 13]
        );
        // 1000 conv + 65 + 79 parameters
        let n: usize = m.var_map().all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(n, 1000 + 65 + 79);
        assert!(
            x.apply(&s2).is_err(),
            "wrong channel count must be rejected"
        );
        assert!(conv2d(1, 2, 0, cfg, vb.pp("bad")).is_err());
    }

    #[test]
    fn fast_and_reference_layers_agree() {
        let m = SeededVarMap::new(1);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let cfg = Conv2dConfig {
            padding: Padding::Same,
            activation: Activation::Relu,
            ..Default::default()
        };
        let fast = separable_conv2d(3, 5, 5, cfg, vb.pp("s")).unwrap();
        let refr = separable_conv2d(3, 5, 5, cfg, vb.pp("s"))
            .unwrap()
            .with_kernels(Kernels::Reference);
        let x = rand_t(&[3, 3, 12, 11], 3);
        assert_close(
            &x.apply(&fast).unwrap(),
            &x.apply(&refr).unwrap(),
            1e-5,
            "separable",
        );
    }
}

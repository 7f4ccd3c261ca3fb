//! Pooling layers: max pooling with a correct gradient and global average pooling.

use candle_core::{Module, Result, Tensor};

use crate::error::shape_err;
use crate::{ops, Kernels, Padding};

/// Max-pool hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2dConfig {
    /// Square window size (default 2).
    pub kernel: usize,
    /// Stride (default 2).
    pub stride: usize,
    /// Keras padding; padded cells count as `-inf` (default [`Padding::Valid`]).
    pub padding: Padding,
}

impl Default for MaxPool2dConfig {
    fn default() -> Self {
        Self {
            kernel: 2,
            stride: 2,
            padding: Padding::Valid,
        }
    }
}

/// Max pooling of `xs [b, c, h, w]` with any kernel / stride / padding, on the fast kernels where they
/// apply.
///
/// Unlike candle's own `max_pool2d`, the gradient is correct: each output's gradient goes to its window's
/// argmax (first maximum wins on the fast path).
pub fn max_pool2d(xs: &Tensor, cfg: MaxPool2dConfig) -> Result<Tensor> {
    MaxPool2d::new(cfg).forward(xs)
}

/// [`max_pool2d`] as a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaxPool2d {
    config: MaxPool2dConfig,
    kernels: Kernels,
}

impl MaxPool2d {
    /// A pool on the fast kernels where they apply.
    pub fn new(config: MaxPool2dConfig) -> Self {
        Self {
            config,
            kernels: Kernels::Auto,
        }
    }
    /// The same layer running on `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }
    /// The configuration.
    pub fn config(&self) -> &MaxPool2dConfig {
        &self.config
    }
}

impl Module for MaxPool2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = self.config;
        let (h, w) = match xs.dims() {
            &[_, _, h, w] => (h, w),
            d => return Err(shape_err("max_pool2d", "[b, c, h, w]", d)),
        };
        let (pad, _) = cfg.padding.resolve2d(h, w, cfg.kernel, cfg.stride)?;
        if self.kernels.use_fast(xs) {
            ops::max_pool2d(xs, cfg.kernel, cfg.stride, pad)
        } else {
            ops::max_pool2d_reference(xs, cfg.kernel, cfg.stride, pad)
        }
    }
}

/// Global average pooling `[b, c, h, w] -> [b, c]`.
pub fn global_avg_pool(xs: &Tensor) -> Result<Tensor> {
    if xs.rank() != 4 {
        return Err(shape_err("global_avg_pool", "[b, c, h, w]", xs.dims()));
    }
    xs.mean((2, 3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};

    #[test]
    fn same_padding_stride_one_keeps_size() {
        let x = rand_t(&[2, 2, 28, 28], 1);
        let cfg = MaxPool2dConfig {
            stride: 1,
            padding: Padding::Same,
            ..Default::default()
        };
        let y = max_pool2d(&x, cfg).unwrap();
        assert_eq!(y.dims(), &[2, 2, 28, 28]);
        let yr = MaxPool2d::new(cfg)
            .with_kernels(Kernels::Reference)
            .forward(&x)
            .unwrap();
        assert_close(&y, &yr, 0.0, "same pool");
        let y = x.apply(&MaxPool2d::default()).unwrap();
        assert_eq!(y.dims(), &[2, 2, 14, 14]);
    }

    #[test]
    fn gap() {
        let x = rand_t(&[2, 3, 4, 5], 2);
        let y = global_avg_pool(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3]);
        assert_close(&y, &x.mean(3).unwrap().mean(2).unwrap(), 1e-6, "gap");
    }
}

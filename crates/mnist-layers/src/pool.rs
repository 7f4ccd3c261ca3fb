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
    /// Implementation choice (default [`Kernels::Auto`]).
    pub kernels: Kernels,
}

impl Default for MaxPool2dConfig {
    fn default() -> Self {
        Self {
            kernel: 2,
            stride: 2,
            padding: Padding::Valid,
            kernels: Kernels::Auto,
        }
    }
}

/// Max pooling of `xs [b, c, h, w]` with any kernel / stride / padding.
///
/// Unlike candle's own `max_pool2d`, the gradient is correct: each output's gradient goes to its window's
/// argmax (first maximum wins on the fast path).
pub fn max_pool2d(xs: &Tensor, cfg: MaxPool2dConfig) -> Result<Tensor> {
    let (h, w) = match xs.dims() {
        &[_, _, h, w] => (h, w),
        d => return Err(shape_err("max_pool2d", "[b, c, h, w]", d)),
    };
    let (pad, _) = cfg.padding.resolve2d(h, w, cfg.kernel, cfg.stride)?;
    if cfg.kernels.use_fast(xs) {
        ops::max_pool2d(xs, cfg.kernel, cfg.stride, pad)
    } else {
        ops::max_pool2d_reference(xs, cfg.kernel, cfg.stride, pad)
    }
}

/// [`max_pool2d`] as a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaxPool2d(pub MaxPool2dConfig);

impl Module for MaxPool2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        max_pool2d(xs, self.0)
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
        let yr = max_pool2d(
            &x,
            MaxPool2dConfig {
                kernels: Kernels::Reference,
                ..cfg
            },
        )
        .unwrap();
        assert_close(&y, &yr, 0.0, "same pool");
        let y = x.apply(&MaxPool2d(MaxPool2dConfig::default())).unwrap();
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

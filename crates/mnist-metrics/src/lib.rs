//! Metric state for the MNIST models, kept apart from how it is shown: [`Accuracy`], [`MeanLoss`],
//! [`ConfusionMatrix`] (with per-class precision / recall / F1), and the [`argmax_rows`] /
//! [`softmax_rows`] helpers that turn logits `[b, k]` into predictions.
//!
//! Every ratio whose denominator is zero (no samples, a class never predicted, ...) is reported
//! as `0.0`, never `NaN`.
//!
//! ```
//! # fn main() -> Result<(), mnist_metrics::MetricsError> {
//! use mnist_metrics::{Accuracy, ConfusionMatrix};
//! let (pred, labels) = ([0u8, 1, 1, 2], [0u8, 1, 2, 2]);
//! let mut acc = Accuracy::default();
//! acc.update_from_predictions(&pred, &labels)?;
//! let mut cm = ConfusionMatrix::new(3);
//! cm.update(&pred, &labels)?;
//! assert_eq!(acc.value(), 0.75);
//! assert_eq!(cm.recall(2), 0.5);
//! # Ok(())
//! # }
//! ```

mod confusion;
mod error;
mod running;
mod tensor;

pub use confusion::{ClassStats, ConfusionMatrix};
pub use error::{MetricsError, Result};
pub use running::{Accuracy, MeanLoss};
pub use tensor::{argmax_rows, softmax_rows};

/// `num / den`, or `0.0` when `den` is zero.
pub(crate) fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

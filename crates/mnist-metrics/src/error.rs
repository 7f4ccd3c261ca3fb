//! The error type of the crate.

/// Errors raised while updating metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A candle tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Logits are not a `[b, k]` tensor with `1 <= k <= 256`.
    #[error("expected logits of shape [b, k] with 1 <= k <= 256, got {dims:?}")]
    LogitsShape {
        /// The shape received.
        dims: Vec<usize>,
    },

    /// Two inputs that must be as long as each other are not.
    #[error("{left_name} has {left} entries but {right_name} has {right}")]
    LengthMismatch {
        /// Name of the first input (e.g. `predictions`).
        left_name: &'static str,
        /// Its length.
        left: usize,
        /// Name of the second input (e.g. `labels`).
        right_name: &'static str,
        /// Its length.
        right: usize,
    },

    /// A class index is not below the number of classes.
    #[error("{what} {value} at position {index} is out of range for {num_classes} classes")]
    ClassOutOfRange {
        /// `label` or `prediction`.
        what: &'static str,
        /// The offending class.
        value: u8,
        /// Its position in the batch.
        index: usize,
        /// Number of classes of the metric.
        num_classes: usize,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, MetricsError>;

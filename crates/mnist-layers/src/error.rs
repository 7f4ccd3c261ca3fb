//! The error type of this crate. Layer constructors and ops return `candle_core::Result` (the
//! `Module` traits require it); a [`LayerError`] travels inside it as `candle_core::Error::Wrapped`.

/// What can go wrong when building or running a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// An invalid hyper-parameter (kernel 0, dropout p outside [0,1), ...).
    #[error("invalid layer configuration: {0}")]
    Config(String),
    /// An input whose shape does not fit the op.
    #[error("{op}: expected {expected}, got {got:?}")]
    Shape {
        /// The op or layer that rejected the input.
        op: &'static str,
        /// The expected shape, in words (`[b, 20, h, w]`).
        expected: String,
        /// The dims that were given.
        got: Vec<usize>,
    },
    /// A shared RNG whose mutex was poisoned by a panicking thread.
    #[error("the shared rng mutex is poisoned")]
    RngPoisoned,
}

impl From<LayerError> for candle_core::Error {
    fn from(e: LayerError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// Shorthand to build a [`LayerError::Shape`] wrapped in a candle error.
pub(crate) fn shape_err(
    op: &'static str,
    expected: impl Into<String>,
    got: &[usize],
) -> candle_core::Error {
    LayerError::Shape {
        op,
        expected: expected.into(),
        got: got.to_vec(),
    }
    .into()
}

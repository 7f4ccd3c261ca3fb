//! The error type of the crate.

/// Errors raised by the optimiser and the schedules.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A candle tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A hyper-parameter is out of its valid range.
    #[error("invalid {what} = {value}: {reason}")]
    InvalidConfig {
        /// Which parameter (e.g. `adam.lr`).
        what: &'static str,
        /// The rejected value.
        value: f64,
        /// The accepted range.
        reason: &'static str,
    },

    /// Two variables were given the same name.
    #[error("duplicate variable name `{name}` given to the optimiser")]
    DuplicateVar {
        /// The repeated name.
        name: String,
    },

    /// A gradient does not match the shape of its variable.
    #[error("gradient of `{name}` has shape {grad:?}, the variable has shape {var:?}")]
    GradShape {
        /// The variable name.
        name: String,
        /// Shape of the gradient.
        grad: Vec<usize>,
        /// Shape of the variable.
        var: Vec<usize>,
    },

    /// A saved optimiser or scheduler state does not fit the current one.
    #[error("state mismatch for `{name}`: {reason}")]
    StateMismatch {
        /// The variable (or scheduler field) concerned.
        name: String,
        /// What differs.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, OptimError>;

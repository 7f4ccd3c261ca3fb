//! Optimisation for the MNIST models: a Keras-exact [`Adam`] (no hidden weight decay) with a fast
//! in-place CPU path, and per-step learning-rate schedules ([`Scheduler`]).
//!
//! The crate sees only candle `Var`s and gradients; it knows nothing of models or data.
//!
//! ```no_run
//! # fn main() -> Result<(), mnist_optim::OptimError> {
//! use candle_core::{DType, Device, Var};
//! use mnist_optim::{Adam, AdamConfig};
//! let w = Var::zeros((4, 3), DType::F32, &Device::Cpu)?;
//! let mut opt = Adam::new(vec![("w".to_string(), w.clone())], AdamConfig::default())?;
//! let loss = w.as_tensor().sqr()?.sum_all()?;
//! opt.backward_step(&loss)?;
//! # Ok(())
//! # }
//! ```

mod adam;
mod error;
mod schedule;

pub use adam::{Adam, AdamConfig, AdamState, MomentState};
pub use error::{OptimError, Result};
pub use schedule::{ScheduleConfig, Scheduler, SchedulerState};

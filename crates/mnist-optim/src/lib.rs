//! Optimisation for the MNIST models: a Keras-exact [`Adam`] (no hidden weight decay) and a
//! PyTorch-exact [`Sgd`] with Nesterov momentum, each with a fast in-place CPU path and chosen by an
//! [`OptimizerConfig`]; per-step learning-rate schedules ([`Scheduler`]); and an exponential moving
//! average of the weights ([`Ema`]); the weight perturbation of sharpness-aware minimisation ([`Sam`]);
//! the slow weights of Lookahead ([`Lookahead`]).
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
mod ema;
mod error;
mod lookahead;
mod optimizer;
mod sam;
mod schedule;
mod sgd;
mod slots;

pub use adam::{Adam, AdamConfig, AdamState, MomentState};
pub use ema::{Ema, EmaConfig, EmaState};
pub use error::{OptimError, Result};
pub use lookahead::{Lookahead, LookaheadConfig};
pub use optimizer::{Optimizer, OptimizerConfig, OptimizerState};
pub use sam::{Sam, SamConfig};
pub use schedule::{MomentumRange, ScheduleConfig, Scheduler, SchedulerState};
pub use sgd::{Sgd, SgdConfig, SgdState};

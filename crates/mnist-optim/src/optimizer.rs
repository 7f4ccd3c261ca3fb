//! The choice of optimiser: [`Adam`] or [`Sgd`] behind one type, so a training loop, its configuration
//! and its checkpoints name one.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adam::{Adam, AdamConfig, AdamState};
use crate::error::Result;
use crate::sgd::{Sgd, SgdConfig, SgdState};

/// Which optimiser, with its hyper-parameters. Serialised externally tagged, `{"adam": {..}}` or
/// `{"sgd": {..}}`, so a configuration that embeds it with `#[serde(flatten)]` keeps the `"adam"` key
/// that configurations written before the choice existed hold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// Adam, Keras form.
    Adam(AdamConfig),
    /// SGD with (Nesterov) momentum, PyTorch form.
    Sgd(SgdConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::Adam(AdamConfig::default())
    }
}

impl OptimizerConfig {
    /// `adam` or `sgd`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Adam(_) => "adam",
            Self::Sgd(_) => "sgd",
        }
    }

    /// The (base) learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Adam(c) => c.lr,
            Self::Sgd(c) => c.lr,
        }
    }

    /// Sets the (base) learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Adam(c) => c.lr = lr,
            Self::Sgd(c) => c.lr = lr,
        }
    }

    /// The weight decay: decoupled for Adam (AdamW), coupled L2 for SGD.
    pub fn weight_decay(&self) -> f64 {
        match self {
            Self::Adam(c) => c.weight_decay,
            Self::Sgd(c) => c.weight_decay,
        }
    }

    /// Sets the weight decay (see [`OptimizerConfig::weight_decay`]).
    pub fn set_weight_decay(&mut self, wd: f64) {
        match self {
            Self::Adam(c) => c.weight_decay = wd,
            Self::Sgd(c) => c.weight_decay = wd,
        }
    }

    /// Whether gradients of weights of rank 2 and up are centralized before each step (the gradient of
    /// the loss, before any weight decay; see [`crate::AdamConfig::grad_centralization`]).
    pub fn grad_centralization(&self) -> bool {
        match self {
            Self::Adam(c) => c.grad_centralization,
            Self::Sgd(c) => c.grad_centralization,
        }
    }

    /// Sets [`OptimizerConfig::grad_centralization`].
    pub fn set_grad_centralization(&mut self, on: bool) {
        match self {
            Self::Adam(c) => c.grad_centralization = on,
            Self::Sgd(c) => c.grad_centralization = on,
        }
    }

    /// Checks every hyper-parameter, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Adam(c) => c.validate(),
            Self::Sgd(c) => c.validate(),
        }
    }
}

/// A snapshot of an [`Optimizer`], for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerState {
    /// Adam's step, learning rate and moments.
    Adam(AdamState),
    /// SGD's step, learning rate and momentum buffers.
    Sgd(SgdState),
}

impl OptimizerState {
    /// `adam` or `sgd`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Adam(_) => "adam",
            Self::Sgd(_) => "sgd",
        }
    }
}

/// An optimiser chosen by an [`OptimizerConfig`].
#[derive(Debug)]
pub enum Optimizer {
    /// Adam.
    Adam(Adam),
    /// SGD with momentum.
    Sgd(Sgd),
}

impl Optimizer {
    /// Builds the optimiser `cfg` names over named variables (see [`Adam::new`], [`Sgd::new`]).
    pub fn new(vars: Vec<(String, Var)>, cfg: &OptimizerConfig) -> Result<Self> {
        Ok(match cfg {
            OptimizerConfig::Adam(c) => Self::Adam(Adam::new(vars, *c)?),
            OptimizerConfig::Sgd(c) => Self::Sgd(Sgd::new(vars, *c)?),
        })
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Adam(o) => o.lr(),
            Self::Sgd(o) => o.lr(),
        }
    }

    /// Sets the learning rate used by the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Adam(o) => o.set_lr(lr),
            Self::Sgd(o) => o.set_lr(lr),
        }
    }

    /// Sets the momentum for the next steps: Adam's `beta1`, SGD's momentum (a schedule's cyclical
    /// momentum, [`crate::Scheduler::momentum_at`]).
    pub fn set_momentum(&mut self, momentum: f64) {
        match self {
            Self::Adam(o) => o.set_beta1(momentum),
            Self::Sgd(o) => o.set_momentum(momentum),
        }
    }

    /// Number of steps taken so far.
    pub fn step_count(&self) -> u64 {
        match self {
            Self::Adam(o) => o.step_count(),
            Self::Sgd(o) => o.step_count(),
        }
    }

    /// Computes the gradients of `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        match self {
            Self::Adam(o) => o.backward_step(loss),
            Self::Sgd(o) => o.backward_step(loss),
        }
    }

    /// Takes one step with the given gradients.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Self::Adam(o) => o.step(grads),
            Self::Sgd(o) => o.step(grads),
        }
    }

    /// A snapshot for a checkpoint.
    pub fn state(&self) -> Result<OptimizerState> {
        Ok(match self {
            Self::Adam(o) => OptimizerState::Adam(o.state()?),
            Self::Sgd(o) => OptimizerState::Sgd(o.state()?),
        })
    }

    /// Restores a snapshot of the same kind of optimiser; on error nothing is changed.
    pub fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        match (self, state) {
            (Self::Adam(o), OptimizerState::Adam(s)) => o.load_state(s),
            (Self::Sgd(o), OptimizerState::Sgd(s)) => o.load_state(s),
            (me, s) => Err(crate::OptimError::StateMismatch {
                name: "optimizer".into(),
                reason: format!(
                    "the saved state is {}'s, this optimiser is {}",
                    s.name(),
                    me.name()
                ),
            }),
        }
    }

    /// `adam` or `sgd`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Adam(_) => "adam",
            Self::Sgd(_) => "sgd",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Holder {
        epochs: usize,
        #[serde(flatten)]
        optimizer: OptimizerConfig,
    }

    #[test]
    fn flattened_config_keeps_the_adam_key() {
        let adam = Holder {
            epochs: 3,
            optimizer: OptimizerConfig::default(),
        };
        let json = serde_json::to_value(&adam).unwrap();
        assert_eq!(json["adam"]["lr"], 1e-3);
        // A config written before the choice existed reads as Adam.
        let old: Holder = serde_json::from_str(r#"{"epochs": 3, "adam": {"lr": 0.001}}"#).unwrap();
        assert_eq!(old, adam);
        let sgd: Holder =
            serde_json::from_str(r#"{"epochs": 3, "sgd": {"lr": 0.1, "nesterov": false}}"#)
                .unwrap();
        assert_eq!(
            sgd.optimizer,
            OptimizerConfig::Sgd(SgdConfig {
                nesterov: false,
                ..SgdConfig::default()
            })
        );
        assert_eq!(sgd.optimizer.name(), "sgd");
        assert!(serde_json::from_str::<Holder>(r#"{"epochs": 3}"#).is_err());
    }

    #[test]
    fn lr_and_decay_accessors_and_state_kinds() {
        let mut cfg = OptimizerConfig::Sgd(SgdConfig::default());
        cfg.set_lr(0.3);
        cfg.set_weight_decay(5e-4);
        assert_eq!((cfg.lr(), cfg.weight_decay()), (0.3, 5e-4));
        let w = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
        let mut sgd = Optimizer::new(vec![("w".into(), w.clone())], &cfg).unwrap();
        let mut adam = Optimizer::new(vec![("w".into(), w)], &OptimizerConfig::default()).unwrap();
        let err = adam
            .load_state(sgd.state().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sgd") && err.contains("adam"), "{err}");
        sgd.set_lr(0.2);
        assert_eq!(sgd.lr(), 0.2);
    }
}

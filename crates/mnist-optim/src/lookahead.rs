//! Lookahead (Zhang, Lucas, Hinton and Ba, "Lookahead Optimizer: k steps forward, 1 step back",
//! NeurIPS 2019): a set of slow weights follows the optimizer's (fast) weights; every `k` optimizer
//! steps the slow weights move a fraction `alpha` of the way to the fast ones, and the fast weights start
//! again from there:
//! ```text
//! slow = slow + alpha * (fast - slow)
//! fast = slow
//! ```
//! The inner optimizer's state (Adam's moments) is kept across the syncs, as in the paper's experiments.
//!
//! [`Lookahead::sync`] may also be called between the `k`-step cycles (the training loop calls it at the
//! end of every epoch, so that what is validated, tested and saved are the slow weights, and a checkpoint
//! needs nothing beyond the model: the slow weights then equal the weights, and a resumed run starts a
//! fresh [`Lookahead`] from them).

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};
use crate::slots::unique_names;

fn default_alpha() -> f64 {
    0.5
}

/// Settings of [`Lookahead`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LookaheadConfig {
    /// Optimizer steps between syncs (the paper's `k`, e.g. 5), `>= 1`.
    pub k: usize,
    /// The fraction of the way the slow weights move at a sync, in `(0, 1]` (the paper's `alpha`,
    /// default 0.5).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

impl LookaheadConfig {
    /// `k` steps between syncs with `alpha` 0.5.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            alpha: default_alpha(),
        }
    }

    /// Rejects `k = 0` and an `alpha` outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(OptimError::InvalidConfig {
                what: "lookahead.k",
                value: 0.0,
                reason: "must be at least 1",
            });
        }
        if self.alpha > 0.0 && self.alpha <= 1.0 {
            Ok(())
        } else {
            Err(OptimError::InvalidConfig {
                what: "lookahead.alpha",
                value: self.alpha,
                reason: "must lie in (0, 1]",
            })
        }
    }
}

/// The slow weights of Lookahead over a set of variables, see the [module docs](self).
#[derive(Debug)]
pub struct Lookahead {
    vars: Vec<(String, Var)>,
    slow: Vec<Tensor>,
    cfg: LookaheadConfig,
    /// Optimizer steps since the last sync.
    since_sync: usize,
}

impl Lookahead {
    /// Starts the slow weights at the named variables' current values (names must be unique: the
    /// trained ones, not BatchNorm statistics).
    pub fn new(vars: Vec<(String, Var)>, cfg: LookaheadConfig) -> Result<Self> {
        cfg.validate()?;
        let vars = unique_names(vars)?;
        let slow = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            slow,
            cfg,
            since_sync: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LookaheadConfig {
        &self.cfg
    }

    /// Call after every optimizer step: syncs after the `k`-th since the last sync.
    pub fn step(&mut self) -> Result<()> {
        self.since_sync += 1;
        if self.since_sync >= self.cfg.k {
            self.sync()?;
        }
        Ok(())
    }

    /// Moves the slow weights `alpha` of the way to the variables and sets the variables to them; nothing
    /// when no step was taken since the last sync.
    pub fn sync(&mut self) -> Result<()> {
        if self.since_sync == 0 {
            return Ok(());
        }
        for ((_, var), slow) in self.vars.iter().zip(self.slow.iter_mut()) {
            let moved = ((var.as_tensor() - &*slow)? * self.cfg.alpha)?;
            *slow = (&*slow + moved)?;
            var.set(slow)?;
        }
        self.since_sync = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1().unwrap()
    }

    /// Two syncs by hand: the slow weights move half way, the variables jump to them, and between syncs
    /// the variables are the optimizer's.
    #[test]
    fn every_k_steps_the_weights_go_back_alpha_of_the_way() {
        let w = var(&[0.0, 4.0]);
        let mut la =
            Lookahead::new(vec![("w".into(), w.clone())], LookaheadConfig::new(2)).unwrap();
        // Two "optimizer steps" of +2 each: fast = [4, 8], slow = [0, 4] -> [2, 6].
        w.set(&Tensor::new(&[2f32, 6.0], &Device::Cpu).unwrap())
            .unwrap();
        la.step().unwrap();
        assert_eq!(values(&w), [2.0, 6.0], "no sync after one step");
        w.set(&Tensor::new(&[4f32, 8.0], &Device::Cpu).unwrap())
            .unwrap();
        la.step().unwrap();
        assert_eq!(values(&w), [2.0, 6.0]);
        // One step and a forced sync (the end of an epoch): fast = [6, 2], slow = [2, 6] -> [4, 4].
        w.set(&Tensor::new(&[6f32, 2.0], &Device::Cpu).unwrap())
            .unwrap();
        la.step().unwrap();
        la.sync().unwrap();
        assert_eq!(values(&w), [4.0, 4.0]);
        // A sync with no step since the last one changes nothing.
        w.set(&Tensor::new(&[9f32, 9.0], &Device::Cpu).unwrap())
            .unwrap();
        la.sync().unwrap();
        assert_eq!(values(&w), [9.0, 9.0]);
    }

    #[test]
    fn alpha_one_and_k_one_is_the_optimizer_alone() {
        let w = var(&[1.0, -1.0]);
        let cfg = LookaheadConfig { k: 1, alpha: 1.0 };
        let mut la = Lookahead::new(vec![("w".into(), w.clone())], cfg).unwrap();
        for step in 1..4 {
            let v = [step as f32, -3.0 * step as f32];
            w.set(&Tensor::new(&v, &Device::Cpu).unwrap()).unwrap();
            la.step().unwrap();
            assert_eq!(values(&w), v);
        }
    }

    #[test]
    fn bad_settings_are_refused_naming_them() {
        let w = var(&[1.0]);
        for (cfg, what) in [
            (LookaheadConfig { k: 0, alpha: 0.5 }, "lookahead.k"),
            (LookaheadConfig { k: 5, alpha: 0.0 }, "lookahead.alpha"),
            (LookaheadConfig { k: 5, alpha: 1.5 }, "lookahead.alpha"),
            (
                LookaheadConfig {
                    k: 5,
                    alpha: f64::NAN,
                },
                "lookahead.alpha",
            ),
        ] {
            let err = Lookahead::new(vec![("w".into(), w.clone())], cfg).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
    }
}

//! Learning-rate schedules: constant, the original plateau rule (per epoch), PyTorch's one-cycle
//! and linear warm-up + cosine (per optimizer step).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use crate::adam::check_lr;
use crate::error::{OptimError, Result};

fn default_pct_start() -> f64 {
    0.3
}
fn default_div_factor() -> f64 {
    25.0
}
fn default_final_div_factor() -> f64 {
    1e4
}

/// Which schedule to follow. Serialised with a `"kind"` tag, e.g.
/// `{"kind": "plateau", "factor": 2.0}` or `{"kind": "one_cycle", "max_lr": 0.01}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScheduleConfig {
    /// The base learning rate throughout (the default).
    #[default]
    Constant,
    /// The original rule, checked after each epoch `t` (1-based, `t >= 4`): if
    /// `val_acc[t] - val_acc[t-2] < 0.01` and `t - t_last_reduce > 2`, the learning rate is divided
    /// by `factor` for the next epoch and `t_last_reduce = t` (it starts at 0).
    /// `factor` must be `>= 1`; `1` turns the rule off.
    Plateau {
        /// Divisor applied when the rule fires.
        factor: f64,
    },
    /// PyTorch `OneCycleLR` (cosine annealing, two phases), stepped per optimizer step over
    /// `steps_per_epoch * epochs` steps: from `max_lr / div_factor` up to `max_lr` at step
    /// `pct_start * total - 1`, then down to `max_lr / (div_factor * final_div_factor)` at the last step.
    /// The base learning rate is not used.
    OneCycle {
        /// Peak learning rate.
        max_lr: f64,
        /// Fraction of the steps spent rising, in `(0, 1)`. Default `0.3`.
        #[serde(default = "default_pct_start")]
        pct_start: f64,
        /// `initial_lr = max_lr / div_factor`. Default `25`.
        #[serde(default = "default_div_factor")]
        div_factor: f64,
        /// `min_lr = initial_lr / final_div_factor`. Default `1e4`.
        #[serde(default = "default_final_div_factor")]
        final_div_factor: f64,
        /// Cyclical momentum (PyTorch's `cycle_momentum`): the optimizer's momentum (Adam's `beta1`, SGD's
        /// momentum) falls from `max` to `base` while the learning rate rises and climbs back while it
        /// falls, by the same cosine. `None` (the default; not written) leaves the momentum alone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cycle_momentum: Option<MomentumRange>,
    },
    /// Linear warm-up over `round(warmup_epochs * steps_per_epoch)` steps from `peak_lr / W`
    /// (step 0) to `peak_lr` (step `W - 1`), then cosine down to `final_lr` at the last step.
    /// The base learning rate is not used.
    WarmupCosine {
        /// Learning rate at the end of the warm-up.
        peak_lr: f64,
        /// Length of the warm-up in epochs (may be fractional, `>= 0`).
        warmup_epochs: f64,
        /// Learning rate at the last step (`>= 0`).
        final_lr: f64,
    },
}

/// The range of a one-cycle schedule's cyclical momentum; the default is PyTorch's (0.85 to 0.95).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MomentumRange {
    /// The momentum at the learning rate's peak.
    pub base: f64,
    /// The momentum at the first and the last step.
    pub max: f64,
}

impl Default for MomentumRange {
    fn default() -> Self {
        Self {
            base: 0.85,
            max: 0.95,
        }
    }
}

fn invalid(what: &'static str, value: f64, reason: &'static str) -> OptimError {
    OptimError::InvalidConfig {
        what,
        value,
        reason,
    }
}

impl ScheduleConfig {
    /// The schedule's kind as its serialised tag (`constant`, `plateau`, `one_cycle`, `warmup_cosine`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Plateau { .. } => "plateau",
            Self::OneCycle { .. } => "one_cycle",
            Self::WarmupCosine { .. } => "warmup_cosine",
        }
    }

    /// Checks the parameters of the schedule, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Constant => Ok(()),
            Self::Plateau { factor } => {
                if factor.is_finite() && factor >= 1.0 {
                    Ok(())
                } else {
                    Err(invalid(
                        "plateau.factor",
                        factor,
                        "must be finite and >= 1 (1 = off)",
                    ))
                }
            }
            Self::OneCycle {
                max_lr,
                pct_start,
                div_factor,
                final_div_factor,
                cycle_momentum,
            } => {
                check_lr("one_cycle.max_lr", max_lr)?;
                if !(pct_start > 0.0 && pct_start < 1.0) {
                    return Err(invalid(
                        "one_cycle.pct_start",
                        pct_start,
                        "must lie in (0, 1)",
                    ));
                }
                if !(div_factor.is_finite() && div_factor > 0.0) {
                    return Err(invalid(
                        "one_cycle.div_factor",
                        div_factor,
                        "must be finite and > 0",
                    ));
                }
                if !(final_div_factor.is_finite() && final_div_factor > 0.0) {
                    return Err(invalid(
                        "one_cycle.final_div_factor",
                        final_div_factor,
                        "must be finite and > 0",
                    ));
                }
                if let Some(MomentumRange { base, max }) = cycle_momentum {
                    if !(0.0..1.0).contains(&base) {
                        return Err(invalid(
                            "one_cycle.cycle_momentum.base",
                            base,
                            "must lie in [0, 1)",
                        ));
                    }
                    if !(base..1.0).contains(&max) {
                        return Err(invalid(
                            "one_cycle.cycle_momentum.max",
                            max,
                            "must lie in [base, 1)",
                        ));
                    }
                }
                Ok(())
            }
            Self::WarmupCosine {
                peak_lr,
                warmup_epochs,
                final_lr,
            } => {
                check_lr("warmup_cosine.peak_lr", peak_lr)?;
                if !(warmup_epochs.is_finite() && warmup_epochs >= 0.0) {
                    return Err(invalid(
                        "warmup_cosine.warmup_epochs",
                        warmup_epochs,
                        "must be finite and >= 0",
                    ));
                }
                if !(final_lr.is_finite() && final_lr >= 0.0) {
                    return Err(invalid(
                        "warmup_cosine.final_lr",
                        final_lr,
                        "must be finite and >= 0",
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The mutable part of a [`Scheduler`], saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    /// Current learning rate of the per-epoch schedules (constant, plateau).
    pub lr: f64,
    /// Epoch (1-based) of the last plateau reduction, 0 if none.
    pub last_reduce: usize,
    /// Validation accuracy per epoch (`val_acc[t - 1]` for epoch `t`; `None` if not reported).
    pub val_acc: Vec<Option<f64>>,
}

/// Cosine interpolation from `start` (pct 0) to `end` (pct 1), as PyTorch's `_annealing_cos`.
fn anneal_cos(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0)
}

/// Gives the learning rate of each optimizer step and applies the per-epoch plateau rule.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: ScheduleConfig,
    steps_per_epoch: usize,
    epochs: usize,
    state: SchedulerState,
}

impl Scheduler {
    /// Builds a scheduler for `epochs` epochs of `steps_per_epoch` optimizer steps each.
    /// `base_lr` is the rate of the constant and plateau schedules.
    pub fn new(
        cfg: ScheduleConfig,
        base_lr: f64,
        steps_per_epoch: usize,
        epochs: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        check_lr("scheduler base_lr", base_lr)?;
        if steps_per_epoch == 0 || epochs == 0 {
            return Err(invalid(
                if steps_per_epoch == 0 {
                    "scheduler steps_per_epoch"
                } else {
                    "scheduler epochs"
                },
                0.0,
                "must be >= 1",
            ));
        }
        Ok(Self {
            cfg,
            steps_per_epoch,
            epochs,
            state: SchedulerState {
                lr: base_lr,
                last_reduce: 0,
                val_acc: Vec::new(),
            },
        })
    }

    /// The schedule followed.
    pub fn config(&self) -> &ScheduleConfig {
        &self.cfg
    }

    /// Total number of optimizer steps, `steps_per_epoch * epochs`.
    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch.saturating_mul(self.epochs)
    }

    /// The learning rate of the optimizer step `step_in_epoch` (0-based) of epoch `epoch0` (0-based).
    /// Steps past the end are clamped to the last step.
    pub fn lr_at(&self, epoch0: usize, step_in_epoch: usize) -> f64 {
        let total = self.total_steps();
        let step = self.step(epoch0, step_in_epoch);
        match self.cfg {
            ScheduleConfig::Constant | ScheduleConfig::Plateau { .. } => self.state.lr,
            ScheduleConfig::OneCycle {
                max_lr,
                div_factor,
                final_div_factor,
                ..
            } => {
                let initial = max_lr / div_factor;
                let min = initial / final_div_factor;
                match self.one_cycle_phase(step) {
                    (true, pct) => anneal_cos(initial, max_lr, pct),
                    (false, pct) => anneal_cos(max_lr, min, pct),
                }
            }
            ScheduleConfig::WarmupCosine {
                peak_lr,
                warmup_epochs,
                final_lr,
            } => {
                let warmup =
                    ((warmup_epochs * self.steps_per_epoch as f64).round() as usize).min(total);
                if step < warmup {
                    return peak_lr * (step + 1) as f64 / warmup as f64;
                }
                // Cosine from peak (at step warmup - 1, or 0 without warm-up) to final (last step).
                let anchor = warmup.saturating_sub(1);
                let span = (total - 1).saturating_sub(anchor);
                let pct = if span > 0 {
                    (step - anchor) as f64 / span as f64
                } else {
                    1.0
                };
                anneal_cos(peak_lr, final_lr, pct)
            }
        }
    }

    /// The optimizer's momentum at that step when the schedule cycles it (a one-cycle schedule with
    /// `cycle_momentum`), else `None`. Steps past the end are clamped to the last step.
    pub fn momentum_at(&self, epoch0: usize, step_in_epoch: usize) -> Option<f64> {
        let ScheduleConfig::OneCycle {
            cycle_momentum: Some(MomentumRange { base, max }),
            ..
        } = self.cfg
        else {
            return None;
        };
        Some(
            match self.one_cycle_phase(self.step(epoch0, step_in_epoch)) {
                (true, pct) => anneal_cos(max, base, pct),
                (false, pct) => anneal_cos(base, max, pct),
            },
        )
    }

    /// The global step (0-based) of step `step_in_epoch` of epoch `epoch0`, clamped to the last.
    fn step(&self, epoch0: usize, step_in_epoch: usize) -> usize {
        epoch0
            .saturating_mul(self.steps_per_epoch)
            .saturating_add(step_in_epoch)
            .min(self.total_steps() - 1)
    }

    /// Where a one-cycle schedule is at `step`: rising (`true`) or falling, and the fraction of that
    /// phase done (PyTorch's `OneCycleLR`: the peak at step `pct_start * total - 1`).
    fn one_cycle_phase(&self, step: usize) -> (bool, f64) {
        let pct_start = match self.cfg {
            ScheduleConfig::OneCycle { pct_start, .. } => pct_start,
            _ => 0.0,
        };
        let total = self.total_steps();
        let s = step as f64;
        let peak_step = pct_start * total as f64 - 1.0;
        if s <= peak_step {
            (true, if peak_step > 0.0 { s / peak_step } else { 1.0 })
        } else {
            let span = (total - 1) as f64 - peak_step;
            (
                false,
                if span > 0.0 {
                    (s - peak_step) / span
                } else {
                    1.0
                },
            )
        }
    }

    /// Records the validation accuracy of epoch `epoch1` (1-based) and applies the plateau rule.
    /// Returns the new learning rate when the rule fires (and logs it), `None` otherwise.
    /// Epochs are expected in order; re-reporting an epoch forgets the later ones.
    pub fn on_epoch_end(&mut self, epoch1: usize, val_acc: f64) -> Option<f64> {
        if epoch1 == 0 {
            tracing::warn!("scheduler: epoch numbers are 1-based, ignoring epoch 0");
            return None;
        }
        let hist = &mut self.state.val_acc;
        hist.resize(epoch1 - 1, None);
        hist.push(Some(val_acc));
        let ScheduleConfig::Plateau { factor } = self.cfg else {
            return None;
        };
        if factor == 1.0 || epoch1 < 4 {
            return None;
        }
        let (Some(now), Some(before)) = (hist[epoch1 - 1], hist[epoch1 - 3]) else {
            return None;
        };
        if now - before < 0.01 && epoch1 - self.state.last_reduce > 2 {
            let old = self.state.lr;
            self.state.lr = old / factor;
            self.state.last_reduce = epoch1;
            tracing::info!(
                epoch = epoch1,
                val_acc = now,
                val_acc_two_epochs_before = before,
                old_lr = old,
                new_lr = self.state.lr,
                "plateau: learning rate divided by {factor}"
            );
            Some(self.state.lr)
        } else {
            None
        }
    }

    /// A snapshot for a checkpoint.
    pub fn state(&self) -> SchedulerState {
        self.state.clone()
    }

    /// Restores a snapshot taken by [`Scheduler::state`].
    pub fn load_state(&mut self, state: SchedulerState) -> Result<()> {
        check_lr("scheduler state lr", state.lr)?;
        if state.last_reduce > state.val_acc.len() {
            return Err(OptimError::StateMismatch {
                name: "scheduler.last_reduce".into(),
                reason: format!(
                    "last reduction at epoch {} but only {} epochs recorded",
                    state.last_reduce,
                    state.val_acc.len()
                ),
            });
        }
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cyclical momentum follows PyTorch's OneCycleLR: max at the first step, base at the learning
    /// rate's peak, max again at the last step, by the same cosine; without it, none.
    #[test]
    fn one_cycle_momentum_mirrors_the_learning_rate() {
        let range = MomentumRange::default();
        let one_cycle = |cycle_momentum| ScheduleConfig::OneCycle {
            max_lr: 0.01,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            cycle_momentum,
        };
        let cfg = one_cycle(Some(range));
        // 10 epochs x 100 steps; the peak at step 299.
        let s = Scheduler::new(cfg, 1e-3, 100, 10).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12;
        let m = |e, k| s.momentum_at(e, k).unwrap();
        assert!(close(m(0, 0), 0.95) && close(m(2, 99), 0.85) && close(m(9, 99), 0.95));
        // Halfway up and halfway down: the middle of the range.
        assert!(close(m(1, 49) + 0.0, anneal_cos(0.95, 0.85, 149.0 / 299.0)));
        let mid_down = 299 + (999 - 299) / 2;
        assert!(close(m(mid_down / 100, mid_down % 100), 0.90));
        // Where the learning rate rises the momentum falls, and the other way round.
        for step in 1..1000 {
            let (e, k, pe, pk) = (step / 100, step % 100, (step - 1) / 100, (step - 1) % 100);
            let (dl, dm) = (s.lr_at(e, k) - s.lr_at(pe, pk), m(e, k) - m(pe, pk));
            assert!(dl * dm <= 1e-18, "step {step}: lr {dl}, momentum {dm}");
        }
        // The learning rate does not depend on it.
        let plain = one_cycle(None);
        let p = Scheduler::new(plain, 1e-3, 100, 10).unwrap();
        assert_eq!(p.momentum_at(3, 7), None);
        for (e, k) in [(0, 0), (2, 99), (5, 50), (9, 99)] {
            assert_eq!(p.lr_at(e, k).to_bits(), s.lr_at(e, k).to_bits());
        }
        // Out of range: named.
        for (base, max, what) in [(0.95, 0.85, "max"), (-0.1, 0.9, "base"), (0.85, 1.0, "max")] {
            let bad = one_cycle(Some(MomentumRange { base, max }));
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("cycle_momentum.{what}")), "{err}");
        }
        // Off is not written, so configs from before read the same.
        assert!(!serde_json::to_string(&plain).unwrap().contains("momentum"));
    }

    fn plateau(factor: f64) -> Scheduler {
        Scheduler::new(ScheduleConfig::Plateau { factor }, 1e-3, 10, 30).unwrap()
    }

    /// Feeds the accuracies (epoch 1, 2, ...) and returns the epochs at which the rule fired.
    fn fire_epochs(s: &mut Scheduler, accs: &[f64]) -> Vec<usize> {
        accs.iter()
            .enumerate()
            .filter_map(|(i, &a)| s.on_epoch_end(i + 1, a).map(|_| i + 1))
            .collect()
    }

    #[test]
    fn plateau_fires_at_the_right_epochs() {
        // Rising by >= 0.01 every two epochs until epoch 5, then flat.
        let accs = [
            0.90, 0.93, 0.95, 0.97, 0.98, 0.985, 0.986, 0.987, 0.988, 0.989, 0.99,
        ];
        let mut s = plateau(2.0);
        // t=4: 0.97-0.93 = .04 no; t=5: .03 no; t=6: .985-.97=.015 no; t=7: .986-.98=.006 fire;
        // t=8,9: gap (8-7, 9-7 <= 2) no; t=10: fire; t=11: gap.
        assert_eq!(fire_epochs(&mut s, &accs), vec![7, 10]);
        assert!((s.lr_at(11, 0) - 1e-3 / 4.0).abs() < 1e-15);
        assert_eq!(s.state().last_reduce, 10);
    }

    #[test]
    fn plateau_never_before_epoch_4_and_respects_gap() {
        // Completely flat: would fire at 3 without the t >= 4 rule; fires at 4, 7, 10.
        let flat = [0.5; 10];
        let mut s = plateau(3.0);
        let mut lrs = vec![];
        for (i, &a) in flat.iter().enumerate() {
            if let Some(lr) = s.on_epoch_end(i + 1, a) {
                lrs.push((i + 1, lr));
            }
        }
        let fired: Vec<usize> = lrs.iter().map(|(e, _)| *e).collect();
        assert_eq!(fired, vec![4, 7, 10]);
        assert!((lrs[0].1 - 1e-3 / 3.0).abs() < 1e-15);
        assert!((lrs[2].1 - 1e-3 / 27.0).abs() < 1e-15);
        // Exactly +0.01 over two epochs does not fire (strict <), just below does.
        let mut s = plateau(2.0);
        assert!(fire_epochs(&mut s, &[0.5, 0.5, 0.5, 0.5 + 0.010_001]).is_empty());
        let mut s = plateau(2.0);
        assert_eq!(fire_epochs(&mut s, &[0.5, 0.5, 0.5, 0.509]), vec![4]);
    }

    #[test]
    fn plateau_factor_one_never_changes_lr() {
        let mut s = plateau(1.0);
        assert!(fire_epochs(&mut s, &[0.5; 20]).is_empty());
        assert_eq!(s.lr_at(19, 9), 1e-3);
        let mut c = Scheduler::new(ScheduleConfig::Constant, 2e-3, 10, 20).unwrap();
        assert!(fire_epochs(&mut c, &[0.5; 20]).is_empty());
        assert_eq!(c.lr_at(0, 0), 2e-3);
        assert_eq!(c.lr_at(19, 9), 2e-3);
    }

    #[test]
    fn plateau_state_round_trip() {
        let mut a = plateau(2.0);
        fire_epochs(&mut a, &[0.5; 5]); // fires at 4
        let json = serde_json::to_string(&a.state()).unwrap();
        let mut b = plateau(2.0);
        b.load_state(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(b.lr_at(5, 0), a.lr_at(5, 0));
        // Epoch 6: 6 - 4 = 2, gap not met; epoch 7 fires, in both.
        for (e, acc) in [(6, 0.5), (7, 0.5)] {
            assert_eq!(a.on_epoch_end(e, acc), b.on_epoch_end(e, acc));
        }
        assert_eq!(b.state().last_reduce, 7);
        let bad = SchedulerState {
            lr: 1e-3,
            last_reduce: 9,
            val_acc: vec![],
        };
        assert!(b.load_state(bad).is_err());
    }

    #[test]
    fn one_cycle_matches_pytorch_endpoints() {
        let (max_lr, div, fdiv) = (0.01, 25.0, 1e4);
        let cfg = ScheduleConfig::OneCycle {
            max_lr,
            pct_start: 0.3,
            div_factor: div,
            final_div_factor: fdiv,
            cycle_momentum: None,
        };
        // 10 epochs x 100 steps = 1000 steps; peak at step 0.3*1000 - 1 = 299.
        let s = Scheduler::new(cfg, 1e-3, 100, 10).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-12);
        assert!(close(s.lr_at(0, 0), max_lr / div), "{}", s.lr_at(0, 0));
        assert!(close(s.lr_at(2, 99), max_lr), "{}", s.lr_at(2, 99));
        assert!(
            close(s.lr_at(9, 99), max_lr / (div * fdiv)),
            "{}",
            s.lr_at(9, 99)
        );
        // PyTorch's rising phase: step 100 of the 299 rising steps is pct 100/299 of the cosine.
        let mid_up = anneal_cos(max_lr / div, max_lr, 100.0 / 299.0);
        assert!(close(s.lr_at(1, 0), mid_up));
        // Rising then falling, strictly.
        let lrs: Vec<f64> = (0..1000).map(|i| s.lr_at(i / 100, i % 100)).collect();
        assert!(lrs[..300].windows(2).all(|w| w[0] < w[1]));
        assert!(lrs[299..].windows(2).all(|w| w[0] > w[1]));
        // Past the end: clamped.
        assert_eq!(s.lr_at(10, 5), lrs[999]);
        // serde: defaults fill in.
        let cfg2: ScheduleConfig =
            serde_json::from_str(r#"{"kind": "one_cycle", "max_lr": 0.01}"#).unwrap();
        assert_eq!(cfg2, cfg);
    }

    /// Each schedule's name is its serialised tag.
    #[test]
    fn names_are_the_serde_tags() {
        for cfg in [
            ScheduleConfig::Constant,
            ScheduleConfig::Plateau { factor: 2.0 },
            ScheduleConfig::OneCycle {
                max_lr: 0.01,
                pct_start: 0.3,
                div_factor: 25.0,
                final_div_factor: 1e4,
                cycle_momentum: None,
            },
            ScheduleConfig::WarmupCosine {
                peak_lr: 0.01,
                warmup_epochs: 1.0,
                final_lr: 0.0,
            },
        ] {
            let v = serde_json::to_value(cfg).unwrap();
            assert_eq!(v["kind"], cfg.name());
        }
    }

    /// PyTorch's exact values for a small case, computed from its algorithm by hand:
    /// total_steps = 10, pct_start = 0.3 -> phase 1 ends at step 2.0.
    #[test]
    fn one_cycle_small_case() {
        let cfg = ScheduleConfig::OneCycle {
            max_lr: 1.0,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            cycle_momentum: None,
        };
        let s = Scheduler::new(cfg, 1.0, 5, 2).unwrap();
        let init = 1.0 / 25.0;
        let min = init / 1e4;
        let expected = [
            init,
            anneal_cos(init, 1.0, 0.5), // (0.04 + 1) / 2 = 0.52
            1.0,
            anneal_cos(1.0, min, 1.0 / 7.0),
            anneal_cos(1.0, min, 2.0 / 7.0),
        ];
        assert!((expected[1] - 0.52).abs() < 1e-12);
        for (i, e) in expected.iter().enumerate() {
            assert!(
                (s.lr_at(0, i) - e).abs() < 1e-12,
                "step {i}: {} vs {e}",
                s.lr_at(0, i)
            );
        }
        assert!((s.lr_at(1, 4) - min).abs() < 1e-15);
    }

    #[test]
    fn warmup_cosine_endpoints_and_monotonic_pieces() {
        let cfg = ScheduleConfig::WarmupCosine {
            peak_lr: 0.01,
            warmup_epochs: 1.5,
            final_lr: 1e-5,
        };
        // 20 steps per epoch, 10 epochs: warm-up 30 steps, 200 in all.
        let s = Scheduler::new(cfg, 1e-3, 20, 10).unwrap();
        let lrs: Vec<f64> = (0..200).map(|i| s.lr_at(i / 20, i % 20)).collect();
        assert!(
            (lrs[0] - 0.01 / 30.0).abs() < 1e-15,
            "starts near 0: {}",
            lrs[0]
        );
        assert!((lrs[29] - 0.01).abs() < 1e-15, "peak at the end of warm-up");
        assert!(
            (lrs[199] - 1e-5).abs() < 1e-15,
            "final at last step: {}",
            lrs[199]
        );
        assert!(lrs[..30].windows(2).all(|w| w[0] < w[1]), "warm-up rises");
        assert!(lrs[29..].windows(2).all(|w| w[0] > w[1]), "cosine falls");
        // Linear warm-up: equal increments.
        let d0 = lrs[1] - lrs[0];
        assert!(lrs[..30]
            .windows(2)
            .all(|w| ((w[1] - w[0]) - d0).abs() < 1e-12));
        // Cosine: halfway through the decay is the mean of peak and final.
        let mid = 29 + 85; // span = 199 - 29 = 170
        assert!((lrs[mid] - (0.01 + 1e-5) / 2.0).abs() < 1e-12);

        // Without warm-up: starts at peak.
        let cfg = ScheduleConfig::WarmupCosine {
            peak_lr: 0.01,
            warmup_epochs: 0.0,
            final_lr: 0.0,
        };
        let s = Scheduler::new(cfg, 1e-3, 20, 10).unwrap();
        assert_eq!(s.lr_at(0, 0), 0.01);
        assert!(s.lr_at(9, 19).abs() < 1e-15);
    }

    #[test]
    fn config_validation() {
        let bad = [
            ScheduleConfig::Plateau { factor: 0.5 },
            ScheduleConfig::Plateau { factor: f64::NAN },
            ScheduleConfig::OneCycle {
                max_lr: 0.0,
                pct_start: 0.3,
                div_factor: 25.0,
                final_div_factor: 1e4,
                cycle_momentum: None,
            },
            ScheduleConfig::OneCycle {
                max_lr: 0.01,
                pct_start: 1.0,
                div_factor: 25.0,
                final_div_factor: 1e4,
                cycle_momentum: None,
            },
            ScheduleConfig::WarmupCosine {
                peak_lr: 0.01,
                warmup_epochs: -1.0,
                final_lr: 0.0,
            },
            ScheduleConfig::WarmupCosine {
                peak_lr: 0.01,
                warmup_epochs: 1.0,
                final_lr: -1.0,
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
            assert!(Scheduler::new(cfg, 1e-3, 10, 10).is_err());
        }
        assert!(Scheduler::new(ScheduleConfig::Constant, 1e-3, 0, 10).is_err());
        assert!(Scheduler::new(ScheduleConfig::Constant, 0.0, 10, 10).is_err());
        let msg = ScheduleConfig::Plateau { factor: 0.5 }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("plateau.factor") && msg.contains("0.5"),
            "{msg}"
        );
        let json = serde_json::to_string(&ScheduleConfig::Plateau { factor: 2.0 }).unwrap();
        assert_eq!(json, r#"{"kind":"plateau","factor":2.0}"#);
    }
}

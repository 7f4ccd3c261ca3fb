//! An exponential moving average of a model's variables (Polyak averaging, as timm's `ModelEmaV2`),
//! with a fast in-place CPU path.
//!
//! The average starts as a copy of the variables. After the `t`-th optimizer step (1-based),
//! [`Ema::update`] sets, for every variable `w` and its average `s`:
//! ```text
//! d = min(decay, (1 + t) / (10 + t))   with warm-up (TensorFlow's ExponentialMovingAverage(num_updates=t))
//! d = decay                            without (timm's ModelEmaV2)
//! s = d s + (1 - d) w
//! ```
//! The warm-up lets the average forget the random initial weights within the first few hundred steps
//! (`d` is 0.18 at step 1, 0.9 at step 80, 0.99 at step 890) instead of the `1 / (1 - decay)` steps a
//! plain average needs.
//!
//! Which variables are averaged is the caller's choice; the training loop passes every variable of the
//! model, BatchNorm running statistics included, as `ModelEmaV2` averages the whole `state_dict`.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};
use crate::slots::{is_fast, take_in_order, tensor_like, unique_names};

fn default_warmup() -> bool {
    true
}

/// Settings of [`Ema`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmaConfig {
    /// The decay per optimizer step, in `(0, 1)` (e.g. `0.999`: an average over about 1,000 steps).
    pub decay: f64,
    /// Ramp the decay up as `min(decay, (1 + t) / (10 + t))` (default `true`).
    #[serde(default = "default_warmup")]
    pub warmup: bool,
}

impl EmaConfig {
    /// An average with `decay` and the warm-up.
    pub fn new(decay: f64) -> Self {
        Self {
            decay,
            warmup: true,
        }
    }

    /// Rejects a decay outside `(0, 1)`.
    pub fn validate(&self) -> Result<()> {
        if self.decay > 0.0 && self.decay < 1.0 {
            Ok(())
        } else {
            Err(OptimError::InvalidConfig {
                what: "ema.decay",
                value: self.decay,
                reason: "must lie in (0, 1)",
            })
        }
    }

    /// The decay of the `t`-th update (1-based).
    pub fn decay_at(&self, t: u64) -> f64 {
        if self.warmup {
            let t = t as f64;
            self.decay.min((1.0 + t) / (10.0 + t))
        } else {
            self.decay
        }
    }
}

/// A serialisable snapshot of an [`Ema`], for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmaState {
    /// Number of updates so far.
    pub updates: u64,
    /// The average of each variable, flattened in row-major order.
    pub shadow: BTreeMap<String, Vec<f32>>,
}

/// Where the average of a variable lives.
enum Shadow {
    /// CPU, f32, contiguous variable: a plain vector updated in one pass over the variable.
    Host(Vec<f32>),
    /// Any other variable: a tensor of the variable's dtype and device.
    Tensor(Tensor),
}

struct Slot {
    name: String,
    var: Var,
    shadow: Shadow,
}

/// The moving average of a set of variables, see the [module docs](self).
pub struct Ema {
    slots: Vec<Slot>,
    cfg: EmaConfig,
    updates: u64,
}

impl std::fmt::Debug for Ema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("Ema")
            .field("cfg", &self.cfg)
            .field("updates", &self.updates)
            .field("vars", &names)
            .finish()
    }
}

impl Ema {
    /// Starts the average of named variables at their current values (names must be unique).
    pub fn new(vars: Vec<(String, Var)>, cfg: EmaConfig) -> Result<Self> {
        Self::build(vars, cfg, true)
    }

    /// The slow twin of [`Ema::new`]: the same average kept with plain tensor ops. Used to test the
    /// fast CPU path.
    pub fn new_reference(vars: Vec<(String, Var)>, cfg: EmaConfig) -> Result<Self> {
        Self::build(vars, cfg, false)
    }

    fn build(vars: Vec<(String, Var)>, cfg: EmaConfig, allow_fast: bool) -> Result<Self> {
        cfg.validate()?;
        let vars = unique_names(vars)?;
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let shadow = if allow_fast && is_fast(&var) {
                Shadow::Host(var.flatten_all()?.to_vec1()?)
            } else {
                Shadow::Tensor(var.as_tensor().copy()?)
            };
            slots.push(Slot { name, var, shadow });
        }
        Ok(Self {
            slots,
            cfg,
            updates: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &EmaConfig {
        &self.cfg
    }

    /// Number of updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Folds the variables' current values into the average (call once after every optimizer step).
    pub fn update(&mut self) -> Result<()> {
        self.updates += 1;
        let d = self.cfg.decay_at(self.updates);
        for slot in &mut self.slots {
            match &mut slot.shadow {
                Shadow::Host(s) => {
                    let op = EmaCpuOp {
                        shadow: RefCell::new(s.as_mut_slice()),
                        kind: CpuKind::Update {
                            decay: d as f32,
                            one_minus_decay: (1.0 - d) as f32,
                        },
                    };
                    slot.var.inplace_op1(&op)?;
                }
                Shadow::Tensor(s) => {
                    *s = (s.affine(d, 0.0)? + slot.var.as_tensor().affine(1.0 - d, 0.0)?)?;
                }
            }
        }
        Ok(())
    }

    /// Exchanges the variables' values with their averages, exactly: after one call the variables hold
    /// the average (e.g. to evaluate or save it), after a second one they hold their own values again.
    /// Do not [`Ema::update`] or take a [`Ema::state`] in between.
    pub fn swap(&mut self) -> Result<()> {
        for slot in &mut self.slots {
            match &mut slot.shadow {
                Shadow::Host(s) => {
                    let op = EmaCpuOp {
                        shadow: RefCell::new(s.as_mut_slice()),
                        kind: CpuKind::Swap,
                    };
                    slot.var.inplace_op1(&op)?;
                }
                Shadow::Tensor(s) => {
                    let live = slot.var.as_tensor().copy()?;
                    slot.var.set(s)?;
                    *s = live;
                }
            }
        }
        Ok(())
    }

    /// A snapshot for a checkpoint (averages copied to the host as f32).
    pub fn state(&self) -> Result<EmaState> {
        let mut shadow = BTreeMap::new();
        for slot in &self.slots {
            let s = match &slot.shadow {
                Shadow::Host(s) => s.clone(),
                Shadow::Tensor(s) => s.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            };
            shadow.insert(slot.name.clone(), s);
        }
        Ok(EmaState {
            updates: self.updates,
            shadow,
        })
    }

    /// Restores a snapshot taken by [`Ema::state`]. The names and sizes must match the variables
    /// exactly; on error nothing is changed.
    pub fn load_state(&mut self, state: EmaState) -> Result<()> {
        let saved = take_in_order(
            self.slots.iter().map(|s| (s.name.as_str(), &s.var)),
            state.shadow,
            |s| vec![s.len()],
            "average",
            "moving average",
        )?;
        let mut new = Vec::with_capacity(self.slots.len());
        for (slot, s) in self.slots.iter().zip(saved) {
            new.push(match &slot.shadow {
                Shadow::Host(_) => Shadow::Host(s),
                Shadow::Tensor(_) => Shadow::Tensor(tensor_like(s, &slot.var)?),
            });
        }
        for (slot, shadow) in self.slots.iter_mut().zip(new) {
            slot.shadow = shadow;
        }
        self.updates = state.updates;
        Ok(())
    }
}

enum CpuKind {
    /// `s = d s + (1 - d) w`; the variable is only read.
    Update { decay: f32, one_minus_decay: f32 },
    /// Exchange `s` and `w`.
    Swap,
}

/// One pass over a contiguous f32 CPU variable and its host-side average.
struct EmaCpuOp<'a> {
    shadow: RefCell<&'a mut [f32]>,
    kind: CpuKind,
}

impl InplaceOp1 for EmaCpuOp<'_> {
    fn name(&self) -> &'static str {
        "ema-cpu"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((w0, w1)) = layout.contiguous_offsets() else {
            bail!(
                "ema: variable must be contiguous, got strides {:?}",
                layout.stride()
            )
        };
        let w = match storage {
            CpuStorage::F32(w) => &mut w[w0..w1],
            other => bail!(
                "ema: fast path expects an f32 variable, got {:?}",
                other.dtype()
            ),
        };
        let mut shadow = self.shadow.borrow_mut();
        let s = &mut **shadow;
        if s.len() != w.len() {
            bail!(
                "ema: sizes differ: variable {}, average {}",
                w.len(),
                s.len()
            )
        }
        match self.kind {
            CpuKind::Update {
                decay,
                one_minus_decay,
            } => {
                // Same operation order as the tensor path, so both round alike.
                for (s, &w) in s.iter_mut().zip(w.iter()) {
                    *s = *s * decay + w * one_minus_decay;
                }
            }
            CpuKind::Swap => s.swap_with_slice(w),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(values: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn decay_warms_up_and_is_validated() {
        let cfg = EmaConfig::new(0.999);
        assert!((cfg.decay_at(1) - 2.0 / 11.0).abs() < 1e-15);
        assert!((cfg.decay_at(80) - 81.0 / 90.0).abs() < 1e-15);
        assert_eq!(cfg.decay_at(100_000), 0.999);
        let plain = EmaConfig {
            decay: 0.99,
            warmup: false,
        };
        assert_eq!(plain.decay_at(1), 0.99);
        for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
            let msg = EmaConfig::new(bad).validate().unwrap_err().to_string();
            assert!(msg.contains("ema.decay"), "{bad}: {msg}");
        }
        // The warm-up is on unless a saved config says otherwise.
        let cfg: EmaConfig = serde_json::from_str(r#"{"decay": 0.99}"#).unwrap();
        assert_eq!(cfg, EmaConfig::new(0.99));
    }

    /// Three updates computed by hand, on the fast and the reference path.
    #[test]
    fn hand_computed_average() {
        // w starts at 1 and is then set to 3, 5, 7 before each update; decay 0.5 without warm-up:
        //   s = 1 -> 0.5 * 1 + 0.5 * 3 = 2 -> 0.5 * 2 + 0.5 * 5 = 3.5 -> 0.5 * 3.5 + 0.5 * 7 = 5.25
        // With warm-up (decay 0.9): d1 = 2/11, d2 = 3/12, d3 = 4/13.
        let warm = {
            let mut s = 1.0f64;
            for (t, w) in [(1.0, 3.0), (2.0, 5.0), (3.0, 7.0)] {
                let d = (1.0f64 + t) / (10.0 + t);
                s = d * s + (1.0 - d) * w;
            }
            s
        };
        for reference in [false, true] {
            for (cfg, want) in [
                (
                    EmaConfig {
                        decay: 0.5,
                        warmup: false,
                    },
                    5.25,
                ),
                (EmaConfig::new(0.9), warm),
            ] {
                let w = var(&[1.0]);
                let vars = vec![("w".to_string(), w.clone())];
                let mut ema = if reference {
                    Ema::new_reference(vars, cfg).unwrap()
                } else {
                    Ema::new(vars, cfg).unwrap()
                };
                for x in [3.0f32, 5.0, 7.0] {
                    w.set(&Tensor::new(&[x], &Device::Cpu).unwrap()).unwrap();
                    ema.update().unwrap();
                }
                assert_eq!(ema.updates(), 3);
                let got = ema.state().unwrap().shadow["w"][0] as f64;
                assert!(
                    (got - want).abs() < 1e-6,
                    "reference={reference} {cfg:?}: {got} vs {want}"
                );
                assert_eq!(values(&w), vec![7.0], "update only reads the variable");
            }
        }
    }

    #[test]
    fn fast_path_matches_reference_and_swap_is_exact() {
        let init: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let (wf, wr) = (var(&init), var(&init));
        let cfg = EmaConfig::new(0.95);
        let mut fast = Ema::new(vec![("w".into(), wf.clone())], cfg).unwrap();
        let mut slow = Ema::new_reference(vec![("w".into(), wr.clone())], cfg).unwrap();
        for step in 0..30 {
            let next: Vec<f32> = (0..50)
                .map(|i| ((i + step) as f32 * 0.11).cos() * 2.0)
                .collect();
            for w in [&wf, &wr] {
                w.set(&Tensor::new(next.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
            }
            fast.update().unwrap();
            slow.update().unwrap();
        }
        let (a, b) = (fast.state().unwrap(), slow.state().unwrap());
        assert_eq!(a, b, "both paths round alike");

        // Swapping twice restores the variable bit for bit; once, it holds the average.
        let live = values(&wf);
        fast.swap().unwrap();
        assert_eq!(values(&wf), a.shadow["w"]);
        fast.swap().unwrap();
        assert_eq!(values(&wf), live);
        assert_eq!(fast.state().unwrap(), a);
        slow.swap().unwrap();
        assert_eq!(values(&wr), b.shadow["w"]);
        slow.swap().unwrap();
        assert_eq!(values(&wr), live);
    }

    #[test]
    fn state_round_trip_continues_bit_for_bit_and_mismatches_are_refused() {
        let w = var(&[1.0, 2.0, 3.0]);
        let mut a = Ema::new(vec![("w".into(), w.clone())], EmaConfig::new(0.9)).unwrap();
        let set = |x: f32| {
            w.set(&Tensor::new(&[x, -x, 2.0 * x], &Device::Cpu).unwrap())
                .unwrap()
        };
        for x in [0.5, 0.25] {
            set(x);
            a.update().unwrap();
        }
        let json = serde_json::to_string(&a.state().unwrap()).unwrap();
        let mut b = Ema::new(vec![("w".into(), w.clone())], EmaConfig::new(0.9)).unwrap();
        b.load_state(serde_json::from_str(&json).unwrap()).unwrap();
        for x in [4.0, -1.5] {
            set(x);
            a.update().unwrap();
            b.update().unwrap();
        }
        assert_eq!(a.state().unwrap(), b.state().unwrap());
        assert_eq!(b.updates(), 4);

        let mut short = a.state().unwrap();
        short.shadow.get_mut("w").unwrap().pop();
        let err = b.load_state(short).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("2 values"), "{err}");
        let mut missing = a.state().unwrap();
        missing.shadow.clear();
        assert!(b
            .load_state(missing)
            .unwrap_err()
            .to_string()
            .contains("`w`"));
        let mut extra = a.state().unwrap();
        extra.shadow.insert("v".into(), vec![]);
        assert!(b.load_state(extra).unwrap_err().to_string().contains("`v`"));
        assert_eq!(b.state().unwrap(), a.state().unwrap(), "nothing changed");
        let dup = Ema::new(
            vec![("w".into(), w.clone()), ("w".into(), w.clone())],
            EmaConfig::new(0.9),
        );
        assert!(matches!(dup, Err(OptimError::DuplicateVar { .. })));
    }
}

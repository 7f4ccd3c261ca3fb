//! Sharpness-aware minimisation (Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for
//! Efficiently Improving Generalization", ICLR 2021; the reference implementation's `SAM` optimizer
//! wrapper): each step takes its gradient at weights moved uphill along the normalised gradient, and
//! applies it at the weights it started from.
//!
//! ```text
//! g  = grad L(w)                       first pass over the batch
//! e  = rho * g / (||g|| + 1e-12)       ||g||: the L2 norm over every variable together
//! g' = grad L(w + e)                   second pass over the same batch
//! w  <- the optimizer's step from w with g'
//! ```
//! With `adaptive` (ASAM: Kwon, Kim, Park and Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
//! Scale-Invariant Learning of Deep Neural Networks", ICML 2021) the move is measured relative to each
//! weight's size, `t = |w| + 0.01` elementwise: `e = rho * t^2 g / ||t g||`, so layers whose scale does
//! not matter (those before a BatchNorm) are moved in proportion to their weights; its radius is
//! larger (the paper uses 0.5 to 2).
//!
//! [`Sam::step`] takes the whole step: [`Sam::ascend`] moves the variables to `w + e` and keeps `w`, the
//! caller's closure computes `g'`, [`Sam::restore`] puts `w` back, bit for bit, and the optimizer takes
//! its step with `g'`. The optimizer's own state (moments,
//! momentum) sees only `g'`, as with the reference wrapper. A step costs two forward and two backward
//! passes.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};
use crate::optimizer::Optimizer;
use crate::slots::unique_names;

/// Settings of [`Sam`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamConfig {
    /// The radius of the uphill move, in the weights' units (the paper's `rho`, e.g. `0.05`), `> 0`.
    pub rho: f64,
    /// ASAM's move relative to each weight's size (default `false`: plain SAM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adaptive: bool,
}

/// ASAM's `eta`: the part of `t = |w| + eta` that lets a zero weight move.
const ASAM_ETA: f64 = 0.01;

impl SamConfig {
    /// Plain SAM with radius `rho`.
    pub fn new(rho: f64) -> Self {
        Self {
            rho,
            adaptive: false,
        }
    }

    /// Rejects a radius that is not a positive finite number.
    pub fn validate(&self) -> Result<()> {
        if self.rho.is_finite() && self.rho > 0.0 {
            Ok(())
        } else {
            Err(OptimError::InvalidConfig {
                what: "sam.rho",
                value: self.rho,
                reason: "must be a positive finite number",
            })
        }
    }
}

/// The weight perturbation of sharpness-aware minimisation over a set of variables, see the
/// [module docs](self).
#[derive(Debug)]
pub struct Sam {
    vars: Vec<(String, Var)>,
    cfg: SamConfig,
    /// The weights before [`Sam::ascend`], until [`Sam::restore`].
    saved: Option<Vec<Tensor>>,
}

impl Sam {
    /// Perturbs the named variables (names must be unique: the trained ones, not BatchNorm statistics).
    pub fn new(vars: Vec<(String, Var)>, cfg: SamConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            vars: unique_names(vars)?,
            cfg,
            saved: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SamConfig {
        &self.cfg
    }

    /// Moves every variable to `w + rho * g / (||g|| + 1e-12)` with `g` its gradient in `grads` (a
    /// variable without one stays where it is and counts as zero in the norm), keeping `w` for
    /// [`Sam::restore`]; adaptive: `w + rho * t^2 g / (||t g|| + 1e-12)`, `t = |w| + 0.01`. Returns the
    /// norm (`||g||`, or `||t g||`). A non-finite norm is an error and moves nothing; calling it
    /// twice without a restore is an error.
    pub fn ascend(&mut self, grads: &GradStore) -> Result<f64> {
        if self.saved.is_some() {
            return Err(OptimError::StateMismatch {
                name: "sam".into(),
                reason: "ascend called twice without a restore".into(),
            });
        }
        let mut moves = Vec::with_capacity(self.vars.len());
        let mut sum_sq = 0f64;
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            if g.dims() != var.dims() {
                return Err(OptimError::GradShape {
                    name: name.clone(),
                    grad: g.dims().to_vec(),
                    var: var.dims().to_vec(),
                });
            }
            // Adaptive: the gradient scaled by `t`, whose norm the move is measured in, and the
            // direction `t^2 g = t (t g)`.
            let (scaled, dir) = if self.cfg.adaptive {
                let t = (var.as_tensor().abs()? + ASAM_ETA)?;
                let tg = (g * &t)?;
                let dir = (&t * &tg)?;
                (tg, dir)
            } else {
                (g.clone(), g.clone())
            };
            sum_sq += scaled
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            moves.push((var, dir));
        }
        let norm = sum_sq.sqrt();
        if !norm.is_finite() {
            return Err(OptimError::InvalidConfig {
                what: "sam gradient norm",
                value: norm,
                reason: "must be finite",
            });
        }
        let saved = self
            .vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let scale = self.cfg.rho / (norm + 1e-12);
        for (var, dir) in moves {
            var.set(&(var.as_tensor() + (dir * scale)?)?)?;
        }
        self.saved = Some(saved);
        Ok(norm)
    }

    /// One sharpness-aware step: [`Sam::ascend`] with `grads` (the gradient at the weights `w`),
    /// `regrad()` for the gradient at the moved weights, [`Sam::restore`] (also when `regrad` fails), and
    /// `opt`'s step from `w` with that gradient.
    pub fn step(
        &mut self,
        opt: &mut Optimizer,
        grads: &GradStore,
        regrad: impl FnOnce() -> candle_core::Result<GradStore>,
    ) -> Result<()> {
        self.ascend(grads)?;
        let moved = regrad();
        self.restore()?;
        opt.step(&moved?)
    }

    /// Puts back the weights [`Sam::ascend`] kept (nothing to do when none are kept).
    pub fn restore(&mut self) -> Result<()> {
        if let Some(saved) = self.saved.take() {
            for ((_, var), w) in self.vars.iter().zip(&saved) {
                var.set(w)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vars() -> Vec<(String, Var)> {
        let dev = Device::Cpu;
        vec![
            ("a".into(), Var::new(&[1.0f32, -2.0, 0.5], &dev).unwrap()),
            (
                "b".into(),
                Var::new(&[[3.0f32, 0.25], [-1.0, 2.0]], &dev).unwrap(),
            ),
            // Not in the loss: no gradient.
            ("c".into(), Var::new(&[7.0f32], &dev).unwrap()),
        ]
    }

    fn values(vars: &[(String, Var)]) -> Vec<Vec<f32>> {
        vars.iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    /// L = sum(k_i w_i^2) over a and b, so g_i = 2 k_i w_i.
    fn loss(vars: &[(String, Var)]) -> Tensor {
        let a = vars[0].1.as_tensor();
        let b = vars[1].1.as_tensor();
        let ka = Tensor::new(&[1.0f32, 2.0, 3.0], a.device()).unwrap();
        let la = (a.sqr().unwrap() * ka).unwrap().sum_all().unwrap();
        let lb = (b.sqr().unwrap() * 0.5).unwrap().sum_all().unwrap();
        (la + lb).unwrap()
    }

    fn grads_of(w: &[Vec<f32>]) -> Vec<Vec<f64>> {
        let ka = [1.0, 2.0, 3.0];
        vec![
            w[0].iter()
                .zip(ka)
                .map(|(&w, k)| 2.0 * k * w as f64)
                .collect(),
            w[1].iter().map(|&w| w as f64).collect(),
            vec![0.0],
        ]
    }

    #[test]
    fn ascend_moves_rho_along_the_normalised_gradient_and_restore_undoes_it() {
        let vs = vars();
        let w0 = values(&vs);
        let mut sam = Sam::new(vs.clone(), SamConfig::new(0.05)).unwrap();
        let grads = loss(&vs).backward().unwrap();
        let norm = sam.ascend(&grads).unwrap();
        let g = grads_of(&w0);
        let want_norm = g.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        assert!(
            (norm - want_norm).abs() < 1e-4 * want_norm,
            "{norm} vs {want_norm}"
        );
        let moved = values(&vs);
        let mut step_sq = 0f64;
        for ((m, w), g) in moved.iter().zip(&w0).zip(&g) {
            for ((&m, &w), &g) in m.iter().zip(w).zip(g) {
                let want = w as f64 + 0.05 * g / want_norm;
                assert!((m as f64 - want).abs() < 1e-6, "{m} vs {want}");
                step_sq += (m as f64 - w as f64).powi(2);
            }
        }
        assert!(
            (step_sq.sqrt() - 0.05).abs() < 1e-5,
            "the move has length rho"
        );
        assert_eq!(moved[2], w0[2], "no gradient, no move");
        // The second gradient is taken at the moved weights.
        let g2 = loss(&vs).backward().unwrap();
        let got = g2
            .get(vs[0].1.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (got, want) in got.iter().zip(&grads_of(&moved)[0]) {
            assert!((*got as f64 - want).abs() < 1e-5);
        }
        assert!(sam.ascend(&g2).is_err(), "twice without a restore");
        sam.restore().unwrap();
        assert_eq!(values(&vs), w0, "restored bit for bit");
        sam.restore().unwrap();
        assert_eq!(values(&vs), w0, "a second restore changes nothing");
    }

    /// The step applies the gradient taken at the moved weights to the weights themselves (plain SGD:
    /// `w - lr g'`); a failing second pass leaves the weights as they were.
    #[test]
    fn a_step_applies_the_moved_gradient_at_the_weights() {
        let vs = vars();
        let w0 = values(&vs);
        let sgd = crate::SgdConfig {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            grad_centralization: false,
        };
        let mut opt = Optimizer::new(vs.clone(), &crate::OptimizerConfig::Sgd(sgd)).unwrap();
        let mut sam = Sam::new(vs.clone(), SamConfig::new(0.05)).unwrap();
        let failed = sam.step(&mut opt, &loss(&vs).backward().unwrap(), || {
            candle_core::bail!("no second pass")
        });
        assert!(failed.unwrap_err().to_string().contains("no second pass"));
        assert_eq!(values(&vs), w0, "restored after the failure");
        let mut moved = Vec::new();
        sam.step(&mut opt, &loss(&vs).backward().unwrap(), || {
            moved = values(&vs);
            loss(&vs).backward()
        })
        .unwrap();
        assert_ne!(moved, w0, "the second gradient is taken at moved weights");
        for ((now, w), g) in values(&vs).iter().zip(&w0).zip(&grads_of(&moved)) {
            for ((&now, &w), &g) in now.iter().zip(w).zip(g) {
                let want = w as f64 - 0.1 * g;
                assert!((now as f64 - want).abs() < 1e-6, "{now} vs {want}");
            }
        }
    }

    #[test]
    fn the_adaptive_move_is_relative_to_each_weight() {
        let vs = vars();
        let w0 = values(&vs);
        let rho = 0.5;
        let mut sam = Sam::new(
            vs.clone(),
            SamConfig {
                rho,
                adaptive: true,
            },
        )
        .unwrap();
        let norm = sam.ascend(&loss(&vs).backward().unwrap()).unwrap();
        let g = grads_of(&w0);
        let t = |w: f32| w.abs() as f64 + ASAM_ETA;
        let want_norm = w0
            .iter()
            .zip(&g)
            .flat_map(|(w, g)| w.iter().zip(g).map(|(&w, g)| (t(w) * g).powi(2)))
            .sum::<f64>()
            .sqrt();
        assert!(
            (norm - want_norm).abs() < 1e-4 * want_norm,
            "{norm} vs {want_norm}"
        );
        let mut scaled_sq = 0f64;
        for ((m, w), g) in values(&vs).iter().zip(&w0).zip(&g) {
            for ((&m, &w), &g) in m.iter().zip(w).zip(g) {
                let want = w as f64 + rho * t(w).powi(2) * g / want_norm;
                assert!((m as f64 - want).abs() < 1e-5, "{m} vs {want}");
                scaled_sq += ((m as f64 - w as f64) / t(w)).powi(2);
            }
        }
        assert!(
            (scaled_sq.sqrt() - rho).abs() < 1e-4,
            "the move has length rho in t's units"
        );
        sam.restore().unwrap();
        assert_eq!(values(&vs), w0);
    }

    #[test]
    fn a_zero_gradient_moves_nothing_and_a_non_finite_one_is_refused() {
        let vs = vars();
        let w0 = values(&vs);
        let mut sam = Sam::new(vs.clone(), SamConfig::new(0.1)).unwrap();
        let zero = (loss(&vs) * 0.0).unwrap().backward().unwrap();
        assert_eq!(sam.ascend(&zero).unwrap(), 0.0);
        assert_eq!(values(&vs), w0);
        sam.restore().unwrap();
        let inf = (loss(&vs) * f64::INFINITY).unwrap().backward().unwrap();
        assert!(sam.ascend(&inf).is_err());
        assert_eq!(values(&vs), w0, "nothing moved");
        sam.restore().unwrap();
        assert_eq!(values(&vs), w0);
    }

    #[test]
    fn a_radius_must_be_positive_and_finite() {
        for rho in [0.0, -0.05, f64::NAN, f64::INFINITY] {
            let err = Sam::new(vars(), SamConfig::new(rho))
                .unwrap_err()
                .to_string();
            assert!(err.contains("sam.rho"), "{err}");
        }
        let v = vars();
        let dup = vec![v[0].clone(), ("a".into(), v[1].1.clone())];
        assert!(Sam::new(dup, SamConfig::new(0.05)).is_err());
    }
}

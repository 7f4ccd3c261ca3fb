//! Keras-style BatchNorm over the channel dim of `[b, c, h, w]`.

use std::sync::{Arc, Mutex};

use candle_core::{ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::error::shape_err;
use crate::{ops, Kernels, LayerError};

/// BatchNorm hyper-parameters, Keras defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance (default 1e-3).
    pub eps: f64,
    /// Keras momentum: `running = momentum * running + (1 - momentum) * batch` (default 0.99).
    pub momentum: f64,
    /// Learnable `gamma`/`beta` (default true); without them gamma = 1, beta = 0.
    pub affine: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-3,
            momentum: 0.99,
            affine: true,
        }
    }
}

/// How training-mode BatchNorm layers fold each batch's statistics into their running statistics. Clones
/// share one state, so a model can switch all its layers at once (see [`BatchNorm::with_running_stats`]).
///
/// By default each layer uses its momentum (Keras's formula). After [`RunningStats::average_batch`]`(k)`,
/// the next batch enters with weight 1/k, so announcing batches 1, 2, ..., n one by one leaves the plain
/// mean of their statistics ("precise BatchNorm": Wu and Johnson 2021, "Rethinking 'Batch' in
/// BatchNorm", section 3, where a moving average of a few recent batches is shown to be a noisy estimate
/// of the population statistics). After [`RunningStats::ghost_part`]`(i, n)` for i = 1, ..., n, the n
/// parts of one batch together move the running statistics as that batch would with the layer's
/// momentum, toward the plain mean of the parts' statistics ("ghost BatchNorm", where every part is
/// normalised by its own statistics). After [`RunningStats::freeze`], batches leave the running
/// statistics as they are (a second pass over the same batch, as sharpness-aware minimisation takes).
#[derive(Debug, Clone, Default)]
pub struct RunningStats(Arc<Mutex<StatsMode>>);

/// What the next training-mode batch does to the running statistics (see [`RunningStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum StatsMode {
    /// `running = momentum * running + (1 - momentum) * batch`.
    #[default]
    Momentum,
    /// The batch is the k-th (from 1) of a plain mean.
    Average(usize),
    /// The batch is part `i` (from 1) of `n` parts of one batch.
    Ghost { i: usize, n: usize },
    /// Left as they are.
    Frozen,
}

impl RunningStats {
    fn set(&self, mode: StatsMode) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// The next batch is the `k`-th (from 1) of a plain mean; `k = 1` replaces the running statistics.
    pub fn average_batch(&self, k: usize) {
        self.set(StatsMode::Average(k.max(1)));
    }

    /// The next batch is part `i` (from 1) of `n` parts of one batch: after parts 1 to n, the running
    /// statistics are `momentum * before + (1 - momentum) * (plain mean of the n parts' statistics)`.
    /// Part i enters with weight `w / R_i`, where `w = (1 - momentum) / n` and `R_i = momentum + i w`
    /// (the weight of everything folded in so far), so every part ends with weight `w`.
    pub fn ghost_part(&self, i: usize, n: usize) {
        let n = n.max(1);
        self.set(StatsMode::Ghost {
            i: i.clamp(1, n),
            n,
        });
    }

    /// Back to each layer's momentum.
    pub fn use_momentum(&self) {
        self.set(StatsMode::Momentum);
    }

    /// Training-mode batches no longer change the running statistics (until [`Self::use_momentum`] or
    /// [`Self::average_batch`]).
    pub fn freeze(&self) {
        self.set(StatsMode::Frozen);
    }

    /// The weight of the previous running statistics for a layer of momentum `momentum`; `None` when
    /// frozen.
    fn keep(&self, momentum: f64) -> Option<f64> {
        match *self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            StatsMode::Momentum => Some(momentum),
            StatsMode::Frozen => None,
            StatsMode::Average(k) => Some((k - 1) as f64 / k as f64),
            StatsMode::Ghost { i, n } => {
                let w = (1.0 - momentum) / n as f64;
                Some((momentum + (i - 1) as f64 * w) / (momentum + i as f64 * w))
            }
        }
    }
}

/// BatchNorm with running statistics.
///
/// Training mode normalises with the batch mean and biased variance and updates the running statistics
/// (no gradient flows through that update); eval mode uses the running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    running_mean: Var,
    running_var: Var,
    c: usize,
    config: BatchNormConfig,
    kernels: Kernels,
    stats: RunningStats,
}

/// Builds a [`BatchNorm`] over `c` channels: `"gamma"` ones, `"beta"` zeros (only when `cfg.affine`),
/// `"running_mean"` zeros and `"running_var"` ones (non-trainable: optimisers must skip vars whose names
/// end with `running_mean` / `running_var`).
pub fn batch_norm(c: usize, cfg: BatchNormConfig, vb: VarBuilder) -> Result<BatchNorm> {
    if c == 0 {
        return Err(LayerError::Config("batch_norm: channels must be positive".into()).into());
    }
    if cfg.eps.is_nan() || cfg.eps <= 0.0 || !(0.0..=1.0).contains(&cfg.momentum) {
        return Err(LayerError::Config(format!(
            "batch_norm: eps ({}) must be > 0 and momentum ({}) in [0, 1]",
            cfg.eps, cfg.momentum
        ))
        .into());
    }
    let (gamma, beta) = if cfg.affine {
        (
            vb.get_with_hints(c, "gamma", Init::Const(1.0))?,
            vb.get_with_hints(c, "beta", Init::Const(0.0))?,
        )
    } else {
        (
            Tensor::ones(c, vb.dtype(), vb.device())?,
            Tensor::zeros(c, vb.dtype(), vb.device())?,
        )
    };
    let running_mean =
        Var::from_tensor(&vb.get_with_hints(c, "running_mean", Init::Const(0.0))?)?;
    let running_var = Var::from_tensor(&vb.get_with_hints(c, "running_var", Init::Const(1.0))?)?;
    Ok(BatchNorm {
        gamma,
        beta,
        running_mean,
        running_var,
        c,
        config: cfg,
        kernels: Kernels::Auto,
        stats: RunningStats::default(),
    })
}

impl BatchNorm {
    /// The same layer running on `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }
    /// The same layer updating its running statistics as `stats` says (shared with other layers).
    pub fn with_running_stats(self, stats: RunningStats) -> Self {
        Self { stats, ..self }
    }
    /// The implementation the layer uses.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }
    /// Scale `[c]` (ones when not affine).
    pub fn gamma(&self) -> &Tensor {
        &self.gamma
    }
    /// Shift `[c]` (zeros when not affine).
    pub fn beta(&self) -> &Tensor {
        &self.beta
    }
    /// Running mean `[c]`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }
    /// Running (biased) variance `[c]`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }
    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The inference-mode affine `(scale, shift)` `[c]`: `scale = gamma / sqrt(running_var + eps)`,
    /// `shift = beta - running_mean * scale` (differentiable in gamma and beta only).
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let rm = self.running_mean.as_tensor().detach();
        let rv = self.running_var.as_tensor().detach();
        let scale = self.gamma.div(&(rv + self.config.eps)?.sqrt()?)?;
        let shift = self.beta.sub(&(rm * &scale)?)?;
        Ok((scale, shift))
    }

    pub(crate) fn update_running(&self, mean: &Tensor, var: &Tensor) -> Result<()> {
        let Some(m) = self.stats.keep(self.config.momentum) else {
            return Ok(());
        };
        let dt = self.running_mean.dtype();
        let upd = |run: &Var, batch: &Tensor| -> Result<()> {
            let new =
                ((run.as_tensor().detach() * m)? + (batch.detach().to_dtype(dt)? * (1.0 - m))?)?;
            run.set(&new)
        };
        upd(&self.running_mean, mean)?;
        upd(&self.running_var, var)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if xs.rank() != 4 || xs.dim(1)? != self.c {
            return Err(shape_err(
                "batch_norm",
                format!("[b, {}, h, w]", self.c),
                xs.dims(),
            ));
        }
        let fast = self.kernels.use_fast(xs);
        if train {
            let (ys, mean, var) = if fast {
                ops::batch_norm_train(xs, &self.gamma, &self.beta, self.config.eps)?
            } else {
                ops::batch_norm_train_reference(xs, &self.gamma, &self.beta, self.config.eps)?
            };
            self.update_running(&mean, &var)?;
            Ok(ys)
        } else {
            let (scale, shift) = self.eval_scale_shift()?;
            if fast {
                ops::batch_norm_eval(xs, &scale, &shift)
            } else {
                ops::batch_norm_eval_reference(xs, &scale, &shift)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededVarMap;
    use crate::ops::test_util::{assert_close, rand_t};
    use candle_core::{DType, Device};

    /// The per-channel mean and biased variance `[c]` of `x [b, c, h, w]`.
    fn batch_stats(x: &Tensor) -> (Tensor, Tensor) {
        let mean = x.mean_keepdim((0, 2, 3)).unwrap();
        let var = x
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .mean((0, 2, 3))
            .unwrap();
        (mean.flatten_all().unwrap(), var)
    }

    #[test]
    fn running_stats_follow_keras_formula() {
        for kernels in [Kernels::Auto, Kernels::Reference] {
            let m = SeededVarMap::new(0);
            let vb = m.var_builder(DType::F32, &Device::Cpu);
            let bn = batch_norm(3, BatchNormConfig::default(), vb.pp("bn"))
                .unwrap()
                .with_kernels(kernels);
            let x1 = rand_t(&[4, 3, 5, 5], 1).affine(3.0, 1.0).unwrap();
            let x2 = (rand_t(&[4, 3, 5, 5], 2) - 2.0).unwrap();
            let (m1, v1) = batch_stats(&x1);
            let (m2, v2) = batch_stats(&x2);
            let mut rm = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
            let mut rv = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
            for (mb, vb_) in [(&m1, &v1), (&m2, &v2)] {
                rm = ((rm * 0.99).unwrap() + (mb * 0.01).unwrap()).unwrap();
                rv = ((rv * 0.99).unwrap() + (vb_ * 0.01).unwrap()).unwrap();
            }
            bn.forward_t(&x1, true).unwrap();
            bn.forward_t(&x2, true).unwrap();
            assert_close(bn.running_mean(), &rm, 1e-6, "running mean");
            assert_close(bn.running_var(), &rv, 1e-6, "running var");
            // The VarMap sees the update (it is what gets saved).
            let data = m.var_map().data().lock().unwrap();
            assert_close(
                data["bn.running_mean"].as_tensor(),
                &rm,
                1e-6,
                "varmap running mean",
            );
            drop(data);
            // Eval uses the running statistics.
            let y = bn.forward_t(&x1, false).unwrap();
            let expect = x1
                .broadcast_sub(&rm.reshape((1, 3, 1, 1)).unwrap())
                .unwrap()
                .broadcast_div(
                    &(rv + 1e-3)
                        .unwrap()
                        .sqrt()
                        .unwrap()
                        .reshape((1, 3, 1, 1))
                        .unwrap(),
                )
                .unwrap();
            assert_close(&y, &expect, 1e-5, "eval");
        }
    }

    #[test]
    fn averaging_mode_leaves_the_mean_of_the_batch_statistics() {
        for kernels in [Kernels::Auto, Kernels::Reference] {
            let m = SeededVarMap::new(0);
            let vb = m.var_builder(DType::F32, &Device::Cpu);
            let stats = RunningStats::default();
            let bn = batch_norm(3, BatchNormConfig::default(), vb.pp("bn"))
                .unwrap()
                .with_kernels(kernels)
                .with_running_stats(stats.clone());
            let xs: Vec<Tensor> = (0..3)
                .map(|i| {
                    rand_t(&[4, 3, 5, 5], 10 + i)
                        .affine(1.0 + i as f64, i as f64)
                        .unwrap()
                })
                .collect();
            // Momentum first, so there is something to replace.
            bn.forward_t(&xs[2], true).unwrap();
            let (mut sum_m, mut sum_v) = (vec![0f64; 3], vec![0f64; 3]);
            for (k, x) in xs.iter().enumerate() {
                stats.average_batch(k + 1);
                bn.forward_t(x, true).unwrap();
                let (mean, var) = batch_stats(x);
                let (mean, var) = (
                    mean.to_vec1::<f32>().unwrap(),
                    var.to_vec1::<f32>().unwrap(),
                );
                for c in 0..3 {
                    sum_m[c] += mean[c] as f64;
                    sum_v[c] += var[c] as f64;
                }
            }
            let expect = |s: &[f64]| {
                Tensor::new(
                    s.iter().map(|v| (v / 3.0) as f32).collect::<Vec<_>>(),
                    &Device::Cpu,
                )
                .unwrap()
            };
            assert_close(bn.running_mean(), &expect(&sum_m), 1e-5, "averaged mean");
            assert_close(bn.running_var(), &expect(&sum_v), 1e-5, "averaged var");
            // Back to momentum: the Keras formula again.
            stats.use_momentum();
            let before = bn.running_mean().to_vec1::<f32>().unwrap();
            bn.forward_t(&xs[0], true).unwrap();
            let batch = xs[0].mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
            let after = bn.running_mean().to_vec1::<f32>().unwrap();
            for c in 0..3 {
                let want = 0.99 * before[c] + 0.01 * batch[c];
                assert!(
                    (after[c] - want).abs() < 1e-5,
                    "{c}: {} vs {want}",
                    after[c]
                );
            }
            // Frozen: training-mode batches are normalised with their own statistics but leave the
            // running ones as they were, bit for bit.
            stats.freeze();
            let (mean, var) = (
                bn.running_mean().copy().unwrap(),
                bn.running_var().copy().unwrap(),
            );
            let y = bn.forward_t(&xs[1], true).unwrap();
            let (bmean, _) = batch_stats(&xs[1]);
            assert_close(
                &y.mean((0, 2, 3)).unwrap(),
                &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
                1e-4,
                "frozen output",
            );
            assert!(bmean
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .any(|m| m.abs() > 0.1));
            for (a, b) in [(bn.running_mean(), &mean), (bn.running_var(), &var)] {
                assert_eq!(
                    a.to_vec1::<f32>().unwrap(),
                    b.to_vec1::<f32>().unwrap(),
                    "frozen statistics"
                );
            }
            stats.use_momentum();
            bn.forward_t(&xs[1], true).unwrap();
            assert_ne!(
                bn.running_mean().to_vec1::<f32>().unwrap(),
                mean.to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn ghost_parts_move_the_statistics_once_toward_their_mean() {
        for (momentum, n) in [(0.9, 4), (0.99, 3), (0.5, 2)] {
            let m = SeededVarMap::new(0);
            let vb = m.var_builder(DType::F32, &Device::Cpu);
            let stats = RunningStats::default();
            let cfg = BatchNormConfig {
                momentum,
                ..BatchNormConfig::default()
            };
            let bn = batch_norm(3, cfg, vb.pp("bn"))
                .unwrap()
                .with_running_stats(stats.clone());
            // Something other than the initial statistics to start from.
            bn.forward_t(&rand_t(&[4, 3, 5, 5], 3).affine(2.0, 1.0).unwrap(), true)
                .unwrap();
            let before = (
                bn.running_mean().to_vec1::<f32>().unwrap(),
                bn.running_var().to_vec1::<f32>().unwrap(),
            );
            let (mut sum_m, mut sum_v) = (vec![0f64; 3], vec![0f64; 3]);
            for i in 1..=n {
                let x = rand_t(&[2 + i, 3, 4, 4], 20 + i as u64)
                    .affine(1.0 + i as f64, -(i as f64))
                    .unwrap();
                stats.ghost_part(i, n);
                bn.forward_t(&x, true).unwrap();
                let (mean, var) = batch_stats(&x);
                for (c, (mv, vv)) in mean
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .zip(var.to_vec1::<f32>().unwrap())
                    .enumerate()
                {
                    sum_m[c] += mv as f64;
                    sum_v[c] += vv as f64;
                }
            }
            stats.use_momentum();
            let want = |before: &[f32], sum: &[f64]| -> Vec<f64> {
                (0..3)
                    .map(|c| momentum * before[c] as f64 + (1.0 - momentum) * sum[c] / n as f64)
                    .collect()
            };
            for (got, want, what) in [
                (bn.running_mean(), want(&before.0, &sum_m), "mean"),
                (bn.running_var(), want(&before.1, &sum_v), "var"),
            ] {
                for (g, w) in got.to_vec1::<f32>().unwrap().iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                        "momentum {momentum}, {n} parts, {what}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn training_output_is_normalised() {
        let m = SeededVarMap::new(0);
        let bn = batch_norm(
            2,
            BatchNormConfig::default(),
            m.var_builder(DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = rand_t(&[8, 2, 4, 4], 9).affine(5.0, 3.0).unwrap();
        let y = bn.forward_t(&x, true).unwrap();
        let mean = y.mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
        assert!(mean.iter().all(|m| m.abs() < 1e-5), "{mean:?}");
        assert!(bn.forward_t(&rand_t(&[1, 3, 2, 2], 1), true).is_err());
    }
}

//! The training loop and evaluation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::distill::{soft_kl_divergence, Teachers};
use crate::loss::training_loss;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::loss::cross_entropy;
use mnist_data::{batches, epoch_rng, to_tensor, with_prefetch, BatcherConfig, Mnist, Split};
use mnist_layers::init::SeededVarMap;
use mnist_layers::SharedRng;
use mnist_metrics::{argmax_rows, Accuracy, ConfusionMatrix, MeanLoss};
use mnist_models::{is_trainable, Net};
use mnist_optim::{
    Ema, EmaState, Lookahead, Optimizer, OptimizerState, Sam, Scheduler, SchedulerState,
};
use serde::{Deserialize, Serialize};

use crate::{Reporter, TrainConfig, TrainError};

/// Random streams derived from the run's seed, one per purpose.
pub(crate) const STREAM_SHUFFLE: u64 = 1;
pub(crate) const STREAM_DROPOUT: u64 = 2;

/// Batch size used for evaluation (no gradients, so larger is faster).
pub const EVAL_BATCH: usize = 1_000;

/// One line of `history.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Mean training loss over the epoch (training mode: dropout on).
    pub loss: f64,
    /// Training accuracy over the epoch.
    pub accuracy: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation accuracy.
    pub val_accuracy: f64,
    /// Wall-clock seconds of the epoch's training steps (validation excluded).
    pub seconds: f64,
}

/// A model with its variables.
pub struct Trained {
    /// The model.
    pub net: Net,
    /// Its variables (weights and BatchNorm statistics).
    pub vars: SeededVarMap,
    /// The dropout generator of the model.
    pub(crate) dropout: SharedRng,
}

impl Trained {
    /// Builds a freshly initialised model for `cfg` on `device`.
    pub fn init(cfg: &TrainConfig, device: &Device) -> Result<Self, TrainError> {
        let vars = SeededVarMap::new(cfg.seed);
        let dropout = mnist_models::dropout_rng(cfg.seed);
        let net = cfg
            .model
            .build(vars.var_builder(DType::F32, device), dropout.clone())?;
        Ok(Self { net, vars, dropout })
    }

    /// The trainable variables with their names, sorted by name (a stable order for the optimizer).
    pub fn trainable_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.named_vars(is_trainable)
    }

    /// Every variable (BatchNorm statistics included) with its name, sorted by name.
    pub fn all_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.named_vars(|_| true)
    }

    /// The BatchNorm running statistics, by name.
    pub fn running_stats(&self) -> Vec<(String, candle_core::Var)> {
        self.named_vars(|name| !is_trainable(name))
    }

    fn named_vars(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, candle_core::Var)> {
        let map = self.vars.var_map();
        let data = match map.data().lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut vars: Vec<_> = data
            .iter()
            .filter(|(name, _)| keep(name))
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }
}

/// The result of evaluating a model on a split.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction correct.
    pub accuracy: f64,
    /// Confusion matrix (rows: true class).
    pub confusion: ConfusionMatrix,
    /// The predicted class of every image, in order.
    pub predictions: Vec<u8>,
}

/// Evaluates `net` in inference mode on every image of `split`.
pub fn evaluate(net: &Net, split: &Split, device: &Device) -> Result<Evaluation, TrainError> {
    let n = split.len();
    let px = mnist_data::IMAGE_SIDE * mnist_data::IMAGE_SIDE;
    let mut loss = MeanLoss::default();
    let mut confusion = ConfusionMatrix::new(mnist_data::NUM_CLASSES);
    let mut predictions = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + EVAL_BATCH).min(n);
        let images = to_tensor(&split.images()[start * px..end * px], end - start, device)?;
        let labels_u8 = &split.labels()[start..end];
        let labels = Tensor::from_iter(labels_u8.iter().map(|&l| l as u32), device)?;
        let logits = net.forward_t(&images, false)?;
        let batch_loss = cross_entropy(&logits, &labels)?.to_scalar::<f32>()? as f64;
        loss.update(batch_loss, end - start);
        let pred = argmax_rows(&logits)?;
        confusion.update(&pred, labels_u8)?;
        predictions.extend_from_slice(&pred);
        start = end;
    }
    Ok(Evaluation {
        loss: loss.value(),
        accuracy: confusion.accuracy(),
        confusion,
        predictions,
    })
}

/// A copy of each variable's value.
fn copies(vars: &[(String, candle_core::Var)]) -> candle_core::Result<Vec<Tensor>> {
    vars.iter().map(|(_, v)| v.as_tensor().copy()).collect()
}

/// Sets each variable to its value in `values` (as [`copies`] made them).
fn set_all(vars: &[(String, candle_core::Var)], values: &[Tensor]) -> candle_core::Result<()> {
    vars.iter().zip(values).try_for_each(|((_, v), t)| v.set(t))
}

/// Every BatchNorm's running statistics become the mean of its batch statistics over `train`'s plain
/// images, in order, in full batches of `batch_size` (the one short batch only when there is no full
/// one), as [`Net::recalibrate_batch_norm`] computes them.
fn recalibrate_batch_norm(
    net: &Net,
    train: &Split,
    batch_size: usize,
    device: &Device,
) -> Result<(), TrainError> {
    let plain = BatcherConfig {
        batch_size,
        shuffle: false,
        augment: None,
        drop_last: train.len() >= batch_size,
    };
    let started = Instant::now();
    let n =
        net.recalibrate_batch_norm(batches(train, &plain, None, device)?.map(|b| Ok(b?.images)))?;
    tracing::info!(
        "precise BatchNorm: running statistics recomputed over {n} batches of {batch_size} plain training images in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where a resumed run starts: the state after its last complete epoch (see [`crate::Checkpoint`]).
///
/// The random generators need no state of their own: the shuffle and dropout generators are derived
/// from `(seed, stream, epoch)` at each epoch start, so `epoch` is their state.
#[derive(Debug, Clone)]
pub struct ResumeState {
    /// Epochs completed so far (the 1-based number of the last one; 0 = none).
    pub epoch: usize,
    /// The optimizer's moments (or momentum buffers), step count and learning rate.
    pub optimizer: OptimizerState,
    /// The moving average of the variables, for a run with `ema` (`None` otherwise).
    pub ema: Option<EmaState>,
    /// The scheduler's state (plateau learning rate, validation history).
    pub scheduler: SchedulerState,
    /// One record per completed epoch.
    pub history: Vec<EpochRecord>,
}

/// The state at the end of an epoch (validation included), handed to [`FitControl::on_epoch`].
pub struct EpochEnd<'a> {
    /// One record per completed epoch; the last is the epoch just finished.
    pub history: &'a [EpochRecord],
    /// The optimizer after the epoch's last step.
    pub optimizer: &'a Optimizer,
    /// The moving average of the variables after the epoch's last step (a run with `ema`).
    pub ema: Option<&'a Ema>,
    /// The scheduler after the epoch's plateau rule.
    pub scheduler: &'a Scheduler,
}

/// A callback run after every epoch (e.g. to write a checkpoint); an error stops training.
pub type OnEpoch<'a> = &'a mut dyn FnMut(&EpochEnd<'_>) -> Result<(), TrainError>;

/// How [`fit_with`] starts and stops, and what it does after each epoch. The default trains from scratch,
/// never stops early and does nothing between epochs.
#[derive(Default)]
pub struct FitControl<'a> {
    /// Continue after this state instead of starting at epoch 1.
    pub resume: Option<ResumeState>,
    /// Polled before every batch: once true, training stops with [`TrainError::Interrupted`], leaving the
    /// epoch in progress unfinished (and not reported to `on_epoch`).
    pub stop: Option<&'a AtomicBool>,
    /// Called after every completed epoch.
    pub on_epoch: Option<OnEpoch<'a>>,
}

/// Trains `trained` for the epochs of `cfg` on `data.train`, validating on `data.val` after each epoch.
///
/// Call it on a rayon worker thread (`mnist_layers::on_pool(|| fit(..))`, as the solution binaries do):
/// the step's parallel loops then start without putting the caller to sleep, and the other workers stay
/// awake between them (`mnist_layers::keep_workers_awake`). The results are the same either way.
pub fn fit(
    cfg: &TrainConfig,
    trained: &Trained,
    data: &Mnist,
    device: &Device,
    reporter: &mut dyn Reporter,
) -> Result<Vec<EpochRecord>, TrainError> {
    fit_with(cfg, trained, data, device, reporter, FitControl::default())
}

/// [`fit`] with a start state, a stop flag and a per-epoch callback (see [`FitControl`]).
///
/// Resuming from the state after epoch `k` and training to epoch `n` gives the same weights and history
/// (bit for bit, `seconds` aside) as training to `n` in one go, provided the weights were restored too
/// and the schedule does not depend on the total number of epochs (or `cfg.epochs` is unchanged). With
/// `cfg.precise_bn`, a shorter run's last validation was of recalibrated statistics, so extending it
/// gives the same weights and history but for that one epoch's validation figures.
///
/// With `cfg.ema`, every variable's moving average is updated after each optimizer step, each epoch
/// validates the average, and `trained` ends holding the average (the raw weights are what `on_epoch`
/// sees in `trained` and what a checkpoint keeps for resuming).
pub fn fit_with(
    cfg: &TrainConfig,
    trained: &Trained,
    data: &Mnist,
    device: &Device,
    reporter: &mut dyn Reporter,
    control: FitControl<'_>,
) -> Result<Vec<EpochRecord>, TrainError> {
    let FitControl {
        resume,
        stop,
        mut on_epoch,
    } = control;
    cfg.validate()?;
    let train = match cfg.limit_train {
        Some(n) if n > data.train.len() => {
            return Err(TrainError::Config(format!(
                "--limit-train {n} is larger than the {} training images",
                data.train.len()
            )))
        }
        Some(n) => data.train.take(n),
        None => data.train.clone(),
    };
    if train.is_empty() {
        return Err(TrainError::Config(
            "the training split is empty: nothing to train on".into(),
        ));
    }
    let mut batcher = BatcherConfig {
        batch_size: cfg.batch_size,
        shuffle: true,
        augment: cfg.augment,
        drop_last: false,
    };
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let mut opt = Optimizer::new(trained.trainable_vars(), &cfg.optimizer)?;
    let mut scheduler = Scheduler::new(
        cfg.schedule,
        cfg.optimizer.lr(),
        steps_per_epoch,
        cfg.epochs,
    )?;
    let mut ema = match cfg.ema {
        Some(c) => Some(Ema::new(trained.all_vars(), c)?),
        None => None,
    };
    let mut sam = match cfg.sam {
        Some(c) => Some(Sam::new(trained.trainable_vars(), c)?),
        None => None,
    };
    let teachers = match &cfg.distill {
        Some(d) => {
            let teachers = Teachers::load(d, cfg.dataset, device)?;
            tracing::info!(
                "distilling from {} teacher(s) at temperature {}, weight {}",
                teachers.len(),
                d.temperature,
                d.weight
            );
            Some((teachers, d))
        }
        None => None,
    };
    let mut history = Vec::with_capacity(cfg.epochs);
    let mut first_epoch0 = 0;
    if let Some(state) = resume {
        if state.epoch > cfg.epochs {
            return Err(TrainError::Config(format!(
                "{} epochs were asked for, but the run has already completed {}",
                cfg.epochs, state.epoch
            )));
        }
        if state.history.len() != state.epoch {
            return Err(TrainError::Config(format!(
                "the resume state is at epoch {} but holds {} history records",
                state.epoch,
                state.history.len()
            )));
        }
        opt.load_state(state.optimizer)?;
        match (ema.as_mut(), state.ema) {
            (Some(ema), Some(saved)) => ema.load_state(saved)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(TrainError::Config(
                    "the run averages its weights (ema) but the resume state holds no average"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(TrainError::Config(
                    "the resume state holds a moving average but the run has no ema".into(),
                ))
            }
        }
        scheduler.load_state(state.scheduler)?;
        history = state.history;
        first_epoch0 = state.epoch;
    }
    // The slow weights are the weights at every epoch's end (synced there), so a resumed run starts
    // them from the weights it loaded, where the uninterrupted run has them.
    let mut lookahead = match cfg.lookahead {
        Some(c) => Some(Lookahead::new(trained.trainable_vars(), c)?),
        None => None,
    };
    let stop_requested = || stop.is_some_and(|s| s.load(Ordering::SeqCst));
    // The last epoch's recalibrated BatchNorm statistics (`precise_bn`), for the model at the end.
    let mut precise_stats = None;

    let _awake = mnist_layers::keep_workers_awake();
    for epoch0 in first_epoch0..cfg.epochs {
        let epoch = epoch0 + 1;
        batcher.augment = if epoch0 + cfg.clean_epochs >= cfg.epochs {
            None
        } else {
            cfg.augment
        };
        reporter.epoch_start(epoch, cfg.epochs, steps_per_epoch);
        {
            let mut rng = trained
                .dropout
                .lock()
                .map_err(|_| TrainError::Config("dropout generator lock poisoned".into()))?;
            *rng = epoch_rng(cfg.seed, STREAM_DROPOUT, epoch0 as u64);
        }
        let mut shuffle_rng = epoch_rng(cfg.seed, STREAM_SHUFFLE, epoch0 as u64);
        let mut loss_sum = MeanLoss::default();
        let mut acc = Accuracy::default();
        let started = Instant::now();
        // The next batches are made (augmented, and given the teachers' soft targets) on another thread
        // while this one trains.
        let epoch_batches = batches(&train, &batcher, Some(&mut shuffle_rng), device)?
            .map(|batch| -> Result<_, TrainError> {
                let batch = batch?;
                let soft = match &teachers {
                    Some((t, _)) => Some(t.soft_targets(&batch.images)?),
                    None => None,
                };
                Ok((batch, soft))
            })
            .enumerate();
        let res = with_prefetch(epoch_batches, 2, |(step, batch)| {
            if stop_requested() {
                return Err(TrainError::Interrupted {
                    completed: epoch0,
                    epochs: cfg.epochs,
                });
            }
            let (batch, soft) = batch?;
            opt.set_lr(scheduler.lr_at(epoch0, step));
            if let Some(m) = scheduler.momentum_at(epoch0, step) {
                opt.set_momentum(m);
            }
            // A mixed batch's target is `lam` of each image's own label and `1 - lam` of its partner's.
            let mixed = batch
                .partner_labels()?
                .zip(batch.mix.as_ref().map(|m| m.lam as f64));
            let loss_of = |logits: &Tensor| -> candle_core::Result<Tensor> {
                let of = |labels| training_loss(logits, labels, cfg.label_smoothing, cfg.poly_loss);
                let mut loss = of(&batch.labels)?;
                if let Some((partner, lam)) = &mixed {
                    let other = of(partner)?;
                    loss = ((loss * *lam)? + (other * (1.0 - lam))?)?;
                }
                if let (Some(soft), Some((_, d))) = (&soft, &teachers) {
                    let distill = soft_kl_divergence(logits, soft, d.temperature)?;
                    loss = ((loss * (1.0 - d.weight))? + (distill * d.weight)?)?;
                }
                Ok(loss)
            };
            let logits = match cfg.ghost_batch {
                Some(g) => trained.net.forward_train_ghost(&batch.images, g, false)?,
                None => trained.net.forward_t(&batch.images, true)?,
            };
            let loss = loss_of(&logits)?;
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                return Err(TrainError::NonFinite {
                    epoch,
                    batch: step + 1,
                    value: loss_value,
                });
            }
            match sam.as_mut() {
                None => opt.backward_step(&loss)?,
                // The second pass leaves the BatchNorm statistics as the first left them.
                Some(sam) => sam.step(&mut opt, &loss.backward()?, || {
                    let logits = match cfg.ghost_batch {
                        Some(g) => trained.net.forward_train_ghost(&batch.images, g, true)?,
                        None => trained
                            .net
                            .forward_train_keeping_statistics(&batch.images)?,
                    };
                    loss_of(&logits)?.backward()
                })?,
            }
            if let Some(la) = lookahead.as_mut() {
                la.step()?;
            }
            if let Some(ema) = ema.as_mut() {
                ema.update()?;
            }
            let n = batch.labels_u8.len();
            loss_sum.update(loss_value, n);
            acc.update(&logits, &batch.majority_labels())?;
            reporter.step(step + 1, loss_sum.value(), acc.value());
            Ok(())
        });
        res?;
        // The epoch ends on the slow weights: they are validated, tested, saved and checkpointed.
        if let Some(la) = lookahead.as_mut() {
            la.sync()?;
        }
        let seconds = started.elapsed().as_secs_f64();
        // With `precise_bn`, the last validation sees recalibrated statistics; the model keeps them
        // only at the end, so that the checkpoint holds the moving averages training left (extending
        // the run continues from those, as an uninterrupted longer run would).
        let finish_and_validate = || -> Result<(Evaluation, Option<Vec<Tensor>>), TrainError> {
            if epoch < cfg.epochs || !cfg.precise_bn {
                return Ok((evaluate(&trained.net, &data.val, device)?, None));
            }
            let stats = trained.running_stats();
            let kept = copies(&stats)?;
            recalibrate_batch_norm(&trained.net, &train, cfg.normalization_batch(), device)?;
            let val = evaluate(&trained.net, &data.val, device)?;
            let recalibrated = copies(&stats)?;
            set_all(&stats, &kept)?;
            Ok((val, Some(recalibrated)))
        };
        let (val, recalibrated) = match ema.as_mut() {
            // The average is swapped into the model for validation and back out, exactly.
            Some(ema) => {
                ema.swap()?;
                let val = finish_and_validate();
                ema.swap()?;
                val?
            }
            None => finish_and_validate()?,
        };
        if recalibrated.is_some() {
            precise_stats = recalibrated;
        }
        let record = EpochRecord {
            epoch,
            lr: opt.lr(),
            loss: loss_sum.value(),
            accuracy: acc.value(),
            val_loss: val.loss,
            val_accuracy: val.accuracy,
            seconds,
        };
        scheduler.on_epoch_end(epoch, val.accuracy);
        reporter.epoch_end(&record);
        history.push(record);
        if let Some(callback) = on_epoch.as_mut() {
            callback(&EpochEnd {
                history: &history,
                optimizer: &opt,
                ema: ema.as_ref(),
                scheduler: &scheduler,
            })?;
        }
    }
    if let Some(ema) = ema.as_mut() {
        // The model leaves holding the average: it is what is tested and saved.
        ema.swap()?;
    }
    match (cfg.precise_bn, precise_stats) {
        (true, Some(stats)) => set_all(&trained.running_stats(), &stats)?,
        // Resumed after its last epoch: the same recalibration, on the same weights, now.
        (true, None) => {
            recalibrate_batch_norm(&trained.net, &train, cfg.normalization_batch(), device)?
        }
        (false, _) => {}
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load_checkpoint, save_checkpoint, LogReporter};
    use mnist_data::Split;
    use mnist_models::{Solution, Variant};
    use mnist_optim::ScheduleConfig;

    /// A tiny synthetic data set: each image is bright in a band that depends on its label.
    fn tiny_data(n: usize) -> Mnist {
        let split = |n: usize, offset: usize| {
            let mut images = Vec::with_capacity(n * 784);
            let mut labels = Vec::with_capacity(n);
            for i in 0..n {
                let label = ((i + offset) % 10) as u8;
                for p in 0..784 {
                    let row = p / 28;
                    let on = row / 3 == label as usize;
                    images.push(if on { 200 } else { ((p * 7 + i) % 31) as u8 });
                }
                labels.push(label);
            }
            Split::from_parts(images, labels).unwrap()
        };
        Mnist {
            train: split(n, 0),
            val: split(40, 3),
            test: split(20, 5),
        }
    }

    fn cfg(epochs: usize) -> TrainConfig {
        let mut cfg = TrainConfig::recipe(Solution::Conv, Variant::Improved);
        cfg.epochs = epochs;
        cfg.batch_size = 16;
        cfg
    }

    fn weights(t: &Trained) -> Vec<(String, Vec<u32>)> {
        let data = t.vars.var_map().data().lock().unwrap();
        let mut out: Vec<_> = data
            .iter()
            .map(|(name, var)| {
                let v: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                (name.clone(), v.iter().map(|x| x.to_bits()).collect())
            })
            .collect();
        out.sort();
        out
    }

    /// Trains a fresh model with `cfg` on `data` (CPU): its final weights and its history.
    fn train(cfg: &TrainConfig, data: &Mnist) -> (Vec<(String, Vec<u32>)>, Vec<EpochRecord>) {
        let device = Device::Cpu;
        let t = Trained::init(cfg, &device).unwrap();
        let history = fit(cfg, &t, data, &device, &mut LogReporter::default()).unwrap();
        (weights(&t), history)
    }

    #[test]
    fn clean_epochs_train_on_the_plain_images() {
        let data = tiny_data(48);
        let run = |cfg: &TrainConfig| train(cfg, &data).0;
        let mut plain = cfg(2);
        plain.augment = None;
        let mut clean = cfg(2);
        clean.clean_epochs = 2;
        assert!(clean.augment.is_some());
        assert_eq!(
            run(&clean),
            run(&plain),
            "all epochs clean = no augmentation"
        );
        let mut last = cfg(2);
        last.clean_epochs = 1;
        let last = run(&last);
        assert_ne!(last, run(&plain), "epoch 1 is augmented");
        assert_ne!(last, run(&cfg(2)), "epoch 2 is not");
        let mut too_many = cfg(2);
        too_many.clean_epochs = 3;
        assert!(too_many.validate().is_err());
    }

    #[test]
    fn label_smoothing_changes_training_and_is_validated() {
        let data = tiny_data(48);
        let plain = cfg(1);
        let mut smooth = cfg(1);
        smooth.label_smoothing = 0.1;
        let (w_plain, h_plain) = train(&plain, &data);
        let (w_smooth, h_smooth) = train(&smooth, &data);
        assert_ne!(w_plain, w_smooth, "the smoothed loss has other gradients");
        assert!(h_smooth[0].loss.is_finite() && h_plain[0].loss.is_finite());
        for bad in [-0.1, 1.0, 1.5, f64::NAN] {
            let mut c = cfg(1);
            c.label_smoothing = bad;
            assert!(
                c.validate().is_err(),
                "label smoothing {bad} must be rejected"
            );
        }
    }

    #[test]
    fn poly_loss_changes_training_and_is_validated() {
        let data = tiny_data(48);
        let mut poly = cfg(1);
        poly.poly_loss = 1.0;
        let (w_plain, _) = train(&cfg(1), &data);
        let (w_poly, h_poly) = train(&poly, &data);
        assert_ne!(w_plain, w_poly, "the Poly-1 term has a gradient");
        assert!(h_poly[0].loss.is_finite());
        for bad in [-1.5, f64::NAN, f64::INFINITY] {
            let mut c = cfg(1);
            c.poly_loss = bad;
            assert!(c.validate().is_err(), "poly loss {bad} must be rejected");
        }
    }

    #[test]
    fn stop_flag_interrupts_before_the_next_batch() {
        let data = tiny_data(64);
        let cfg = cfg(2);
        let trained = Trained::init(&cfg, &Device::Cpu).unwrap();
        let before = weights(&trained);
        let stop = AtomicBool::new(true);
        let mut calls = 0;
        let mut on_epoch = |_: &EpochEnd<'_>| {
            calls += 1;
            Ok(())
        };
        let control = FitControl {
            stop: Some(&stop),
            on_epoch: Some(&mut on_epoch),
            ..FitControl::default()
        };
        let err = fit_with(
            &cfg,
            &trained,
            &data,
            &Device::Cpu,
            &mut LogReporter::default(),
            control,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                TrainError::Interrupted {
                    completed: 0,
                    epochs: 2
                }
            ),
            "{err}"
        );
        assert_eq!(calls, 0, "no epoch completed");
        assert_eq!(
            weights(&trained),
            before,
            "no step may run after the stop request"
        );
    }

    #[test]
    fn resuming_from_a_checkpoint_matches_an_uninterrupted_fit() {
        // The improved recipe: one-cycle schedule, augmentation and BatchNorm all carry state.
        assert_resume_matches_uninterrupted(&cfg(3));
    }

    /// SGD's momentum buffers and the moving average are state too; the elastic distortion is drawn from
    /// the per-epoch generator.
    #[test]
    fn sgd_ema_and_elastic_runs_resume_bit_for_bit() {
        let mut sgd = cfg(3);
        sgd.optimizer = mnist_optim::OptimizerConfig::Sgd(mnist_optim::SgdConfig {
            lr: 0.05,
            ..Default::default()
        });
        assert_resume_matches_uninterrupted(&sgd);
        let mut ema = cfg(3);
        ema.ema = Some(mnist_optim::EmaConfig::new(0.9));
        assert_resume_matches_uninterrupted(&ema);
        let mut all = sgd.clone();
        all.ema = Some(mnist_optim::EmaConfig {
            decay: 0.95,
            warmup: false,
        });
        if let Some(aug) = all.augment.as_mut() {
            aug.elastic = Some(mnist_data::ElasticConfig::new(4.0));
        }
        assert_resume_matches_uninterrupted(&all);
    }

    /// Random erasing and mixup / CutMix draw from per-epoch generators of their own: each changes
    /// training and resumes bit for bit.
    #[test]
    fn erasing_and_mixing_change_training_and_resume_bit_for_bit() {
        let data = tiny_data(48);
        let (plain, _) = train(&cfg(2), &data);
        let with = |erase: Option<f32>, mix: Option<(mnist_data::MixKind, f32)>| {
            let mut c = cfg(3);
            let aug = c.augment.as_mut().expect("the improved recipe augments");
            aug.erase = erase.map(mnist_data::EraseConfig::new);
            aug.mix = mix.map(|(kind, alpha)| mnist_data::MixConfig { kind, alpha });
            c
        };
        for c in [
            with(Some(0.5), None),
            with(None, Some((mnist_data::MixKind::Mixup, 0.4))),
            with(Some(0.5), Some((mnist_data::MixKind::Cutmix, 1.0))),
        ] {
            let mut two = c.clone();
            two.epochs = 2;
            assert_ne!(train(&two, &data).0, plain, "{:?}", c.augment);
            assert_resume_matches_uninterrupted(&c);
        }
    }

    /// Ghost BatchNorm changes training, runs alone and under sharpness-aware minimisation (whose second
    /// pass keeps the statistics), and resumes bit for bit; a ghost batch as large as the batch is refused.
    #[test]
    fn ghost_batch_norm_changes_training_and_resumes_bit_for_bit() {
        let data = tiny_data(64);
        let mut ghost = cfg(2);
        ghost.ghost_batch = Some(6);
        let (w_plain, _) = train(&cfg(2), &data);
        let (w_ghost, _) = train(&ghost, &data);
        assert_ne!(w_plain, w_ghost);
        ghost.epochs = 3;
        assert_resume_matches_uninterrupted(&ghost);
        ghost.sam = Some(mnist_optim::SamConfig::new(0.05));
        assert_resume_matches_uninterrupted(&ghost);
        for g in [1, 16, 40] {
            ghost.ghost_batch = Some(g);
            let err = ghost.validate().unwrap_err().to_string();
            assert!(err.contains("ghost_batch"), "{err}");
        }
    }

    /// Cyclical momentum is a function of the step: a resumed run sets it again before its first step,
    /// and it trains otherwise than the plain one-cycle recipe.
    #[test]
    fn cyclical_momentum_resumes_bit_for_bit_and_changes_training() {
        let mut cycled = cfg(3);
        let mnist_optim::ScheduleConfig::OneCycle { cycle_momentum, .. } = &mut cycled.schedule
        else {
            panic!("the improved recipe is one-cycle");
        };
        *cycle_momentum = Some(mnist_optim::MomentumRange::default());
        assert_resume_matches_uninterrupted(&cycled);
        for optimizer in [
            cycled.optimizer,
            mnist_optim::OptimizerConfig::Sgd(mnist_optim::SgdConfig {
                lr: 0.05,
                ..Default::default()
            }),
        ] {
            let data = tiny_data(64);
            let (a, b) = (
                TrainConfig {
                    optimizer,
                    ..cfg(2)
                },
                TrainConfig {
                    optimizer,
                    ..cycled.clone()
                },
            );
            let (w_plain, _) = train(&a, &data);
            let (w_cycled, _) = train(&TrainConfig { epochs: 2, ..b }, &data);
            assert_ne!(w_plain, w_cycled, "{}", optimizer.name());
        }
    }

    #[test]
    fn ema_changes_what_is_validated_and_kept_not_how_it_trains() {
        let data = tiny_data(64);
        let plain = cfg(2);
        let mut ema = cfg(2);
        ema.ema = Some(mnist_optim::EmaConfig::new(0.9));
        let (w_plain, h_plain) = train(&plain, &data);
        let (w_ema, h_ema) = train(&ema, &data);
        for (a, b) in h_plain.iter().zip(&h_ema) {
            assert_eq!(
                (a.lr, a.loss, a.accuracy),
                (b.lr, b.loss, b.accuracy),
                "training itself is unchanged"
            );
        }
        assert_ne!(
            h_plain.iter().map(|r| r.val_loss).collect::<Vec<_>>(),
            h_ema.iter().map(|r| r.val_loss).collect::<Vec<_>>(),
            "validation sees the average"
        );
        assert_ne!(w_plain, w_ema, "the model ends holding the average");
        // Every variable is averaged: the BatchNorm statistics differ too.
        let stats = |w: &[(String, Vec<u32>)]| -> Vec<Vec<u32>> {
            w.iter()
                .filter(|(n, _)| n.ends_with("running_mean"))
                .map(|(_, v)| v.clone())
                .collect()
        };
        assert!(!stats(&w_plain).is_empty());
        assert_ne!(stats(&w_plain), stats(&w_ema));
        let mut bad = cfg(1);
        bad.ema = Some(mnist_optim::EmaConfig::new(1.0));
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ema.decay"));
    }

    /// A SAM step counts its batch once in the BatchNorm statistics (the first pass, at the weights
    /// themselves) and moves the weights by the gradient of the second; runs resume bit for bit.
    #[test]
    fn sam_steps_from_the_perturbed_gradient_and_counts_each_batch_once() {
        let data = tiny_data(48);
        let one_step = |sam: Option<f64>| {
            let mut c = cfg(1);
            c.batch_size = 48;
            c.augment = None;
            c.sam = sam.map(mnist_optim::SamConfig::new);
            train(&c, &data)
        };
        let (plain, h_plain) = one_step(None);
        let (sam, h_sam) = one_step(Some(0.05));
        let part = |w: &[(String, Vec<u32>)], stats: bool| -> Vec<(String, Vec<u32>)> {
            w.iter()
                .filter(|(n, _)| is_trainable(n) != stats)
                .cloned()
                .collect()
        };
        assert!(!part(&plain, true).is_empty());
        assert_eq!(
            part(&plain, true),
            part(&sam, true),
            "one update, from the first pass"
        );
        assert_ne!(part(&plain, false), part(&sam, false), "another gradient");
        assert_eq!(
            (h_plain[0].loss, h_plain[0].accuracy),
            (h_sam[0].loss, h_sam[0].accuracy),
            "the step reports the first pass"
        );
        let mut c = cfg(3);
        c.sam = Some(mnist_optim::SamConfig::new(0.05));
        assert_resume_matches_uninterrupted(&c);
        c.sam = Some(mnist_optim::SamConfig::new(0.0));
        assert!(c.validate().unwrap_err().to_string().contains("sam.rho"));
    }

    #[test]
    fn precise_bn_changes_the_statistics_not_the_training() {
        let data = tiny_data(64);
        let split = |w: &[(String, Vec<u32>)], stats: bool| -> Vec<(String, Vec<u32>)> {
            w.iter()
                .filter(|(n, _)| is_trainable(n) != stats)
                .cloned()
                .collect()
        };
        for ema in [None, Some(mnist_optim::EmaConfig::new(0.9))] {
            let mut plain = cfg(2);
            plain.ema = ema;
            let mut precise = plain.clone();
            precise.precise_bn = true;
            let (w_plain, h_plain) = train(&plain, &data);
            let (w_precise, h_precise) = train(&precise, &data);
            assert_eq!(
                split(&w_plain, false),
                split(&w_precise, false),
                "same weights"
            );
            assert_ne!(
                split(&w_plain, true),
                split(&w_precise, true),
                "other statistics"
            );
            let figures = |r: &EpochRecord| (r.lr, r.loss, r.accuracy, r.val_loss, r.val_accuracy);
            assert_eq!(
                figures(&h_plain[0]),
                figures(&h_precise[0]),
                "only the last epoch is recalibrated"
            );
            assert_eq!(
                (h_plain[1].loss, h_plain[1].accuracy),
                (h_precise[1].loss, h_precise[1].accuracy)
            );
            assert_ne!(h_plain[1].val_loss, h_precise[1].val_loss);
            // The statistics are the mean over the plain training images' full batches.
            let device = Device::Cpu;
            let t = Trained::init(&plain, &device).unwrap();
            fit(&plain, &t, &data, &device, &mut LogReporter::default()).unwrap();
            recalibrate_batch_norm(&t.net, &data.train, plain.batch_size, &device).unwrap();
            assert_eq!(split(&weights(&t), true), split(&w_precise, true));
            // A run resumed after its last epoch (checkpoint written, model not) ends the same.
            let dir = tempfile::tempdir().unwrap();
            let first = Trained::init(&precise, &device).unwrap();
            let mut on_epoch = |end: &EpochEnd<'_>| {
                save_checkpoint(dir.path(), &precise, first.vars.var_map(), end)
            };
            let control = FitControl {
                on_epoch: Some(&mut on_epoch),
                ..FitControl::default()
            };
            let mut log = LogReporter::default();
            fit_with(&precise, &first, &data, &device, &mut log, control).unwrap();
            let ckpt = load_checkpoint(dir.path(), &device).unwrap();
            let resumed = Trained::init(&precise, &device).unwrap();
            ckpt.restore_weights(&precise, resumed.vars.var_map())
                .unwrap();
            let control = FitControl {
                resume: Some(ckpt.state),
                ..FitControl::default()
            };
            fit_with(&precise, &resumed, &data, &device, &mut log, control).unwrap();
            assert_eq!(weights(&resumed), w_precise);
        }
    }

    #[test]
    fn sgd_trains_and_differs_from_adam() {
        let data = tiny_data(64);
        let mut sgd = cfg(2);
        sgd.optimizer = mnist_optim::OptimizerConfig::Sgd(mnist_optim::SgdConfig {
            lr: 0.1,
            ..Default::default()
        });
        if let ScheduleConfig::OneCycle { max_lr, .. } = &mut sgd.schedule {
            *max_lr = 0.1;
        }
        let (w_sgd, h_sgd) = train(&sgd, &data);
        let (w_adam, _) = train(&cfg(2), &data);
        assert_ne!(w_sgd, w_adam);
        assert!(h_sgd.iter().all(|r| r.loss.is_finite()));
        assert!(h_sgd[1].loss < h_sgd[0].loss, "{h_sgd:?}");
    }

    /// A finished run folder to teach with: a model trained for one epoch on `data`, its config.json beside.
    fn teacher_run(data: &Mnist, seed: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut teacher_cfg = cfg(1);
        teacher_cfg.seed = seed;
        let device = Device::Cpu;
        let t = Trained::init(&teacher_cfg, &device).unwrap();
        fit(&teacher_cfg, &t, data, &device, &mut LogReporter::default()).unwrap();
        crate::outputs::write_config(dir.path(), &teacher_cfg).unwrap();
        crate::save_weights(&dir.path().join(crate::WEIGHTS_FILE), t.vars.var_map()).unwrap();
        dir
    }

    #[test]
    fn distillation_changes_training_resumes_bit_for_bit_and_refuses_a_changed_teacher() {
        let data = tiny_data(64);
        let (a, b) = (teacher_run(&data, 7), teacher_run(&data, 8));
        let files = [a.path(), b.path()].map(|d| d.join(crate::WEIGHTS_FILE));
        let mut distilled = cfg(2);
        distilled.distill = Some(crate::DistillConfig {
            teachers: files
                .iter()
                .map(|f| crate::TeacherRef::of_file(f).unwrap())
                .collect(),
            temperature: 3.0,
            weight: 0.7,
        });
        let (w_plain, _) = train(&cfg(2), &data);
        let (w_kd, h_kd) = train(&distilled, &data);
        assert_ne!(w_plain, w_kd, "the teachers' term changes the gradients");
        assert!(h_kd.iter().all(|r| r.loss.is_finite() && r.loss >= 0.0));
        assert_resume_matches_uninterrupted(&distilled);

        // A teacher retrained (or replaced) after the run was configured is refused, by name.
        let other = teacher_run(&data, 9);
        std::fs::copy(other.path().join(crate::WEIGHTS_FILE), &files[1]).unwrap();
        let device = Device::Cpu;
        let t = Trained::init(&distilled, &device).unwrap();
        let err = fit(&distilled, &t, &data, &device, &mut LogReporter::default())
            .expect_err("changed teacher")
            .to_string();
        assert!(
            err.contains(&files[1].display().to_string()) && err.contains("changed"),
            "{err}"
        );
        // So is a teacher of another data set.
        let mut fashion = distilled.clone();
        fashion.dataset = mnist_data::Dataset::Fashion;
        fashion.distill.as_mut().unwrap().teachers.truncate(1);
        let err = fit(&fashion, &t, &data, &device, &mut LogReporter::default())
            .expect_err("other data set")
            .to_string();
        assert!(err.contains("trained on mnist"), "{err}");
    }

    /// Trains `cfg` straight, and again stopped after epoch 1, checkpointed and resumed in a new model:
    /// the weights and history must agree bit for bit.
    fn assert_resume_matches_uninterrupted(cfg: &TrainConfig) {
        let data = tiny_data(64);
        let cfg = cfg.clone();
        let device = Device::Cpu;

        let straight = Trained::init(&cfg, &device).unwrap();
        let full = fit(&cfg, &straight, &data, &device, &mut LogReporter::default()).unwrap();

        // The same run, stopped after epoch 1 by the callback, checkpointed, and resumed in a new model.
        let dir = tempfile::tempdir().unwrap();
        let first = Trained::init(&cfg, &device).unwrap();
        let stop = AtomicBool::new(false);
        let mut on_epoch = |end: &EpochEnd<'_>| {
            save_checkpoint(dir.path(), &cfg, first.vars.var_map(), end)?;
            stop.store(true, Ordering::SeqCst);
            Ok(())
        };
        let control = FitControl {
            stop: Some(&stop),
            on_epoch: Some(&mut on_epoch),
            ..FitControl::default()
        };
        let err = fit_with(
            &cfg,
            &first,
            &data,
            &device,
            &mut LogReporter::default(),
            control,
        )
        .unwrap_err();
        assert!(
            matches!(err, TrainError::Interrupted { completed: 1, .. }),
            "{err}"
        );

        let ckpt = load_checkpoint(dir.path(), &device).unwrap();
        let resumed = Trained::init(&cfg, &device).unwrap();
        ckpt.restore_weights(&cfg, resumed.vars.var_map()).unwrap();
        let control = FitControl {
            resume: Some(ckpt.state),
            ..FitControl::default()
        };
        let rest = fit_with(
            &cfg,
            &resumed,
            &data,
            &device,
            &mut LogReporter::default(),
            control,
        )
        .unwrap();

        assert_eq!(weights(&resumed), weights(&straight));
        assert_eq!(rest.len(), full.len());
        for (a, b) in rest.iter().zip(&full) {
            assert_eq!(
                (
                    a.epoch,
                    a.lr,
                    a.loss,
                    a.accuracy,
                    a.val_loss,
                    a.val_accuracy
                ),
                (
                    b.epoch,
                    b.lr,
                    b.loss,
                    b.accuracy,
                    b.val_loss,
                    b.val_accuracy
                )
            );
        }
    }

    #[test]
    fn resume_state_past_the_last_epoch_is_refused() {
        let data = tiny_data(32);
        let cfg1 = cfg(1);
        let trained = Trained::init(&cfg1, &Device::Cpu).unwrap();
        let history = fit(
            &cfg1,
            &trained,
            &data,
            &Device::Cpu,
            &mut LogReporter::default(),
        )
        .unwrap();
        let opt = Optimizer::new(trained.trainable_vars(), &cfg1.optimizer).unwrap();
        let state = ResumeState {
            epoch: 2,
            optimizer: opt.state().unwrap(),
            ema: None,
            scheduler: Scheduler::new(cfg1.schedule, cfg1.optimizer.lr(), 2, 1)
                .unwrap()
                .state(),
            history: vec![history[0].clone(), history[0].clone()],
        };
        let control = FitControl {
            resume: Some(state),
            ..FitControl::default()
        };
        let err = fit_with(
            &cfg1,
            &trained,
            &data,
            &Device::Cpu,
            &mut LogReporter::default(),
            control,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("already completed 2"), "{err}");
    }
}

//! The training loop and evaluation.

use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::loss::cross_entropy;
use mnist_data::{batches, epoch_rng, to_tensor, BatcherConfig, Mnist, Split};
use mnist_layers::init::SeededVarMap;
use mnist_layers::SharedRng;
use mnist_metrics::{argmax_rows, Accuracy, ConfusionMatrix, MeanLoss};
use mnist_models::{build, is_trainable, Net};
use mnist_optim::{Adam, Scheduler};
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
        let net = build(&cfg.model, vars.var_builder(DType::F32, device), dropout.clone())?;
        Ok(Self { net, vars, dropout })
    }

    /// The trainable variables with their names, sorted by name (a stable order for the optimizer).
    pub fn trainable_vars(&self) -> Vec<(String, candle_core::Var)> {
        let map = self.vars.var_map();
        let data = match map.data().lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut vars: Vec<_> = data
            .iter()
            .filter(|(name, _)| is_trainable(name))
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

/// Trains `trained` for the epochs of `cfg` on `data.train`, validating on `data.val` after each epoch.
/// Calls `on_epoch` after every epoch (e.g. to checkpoint) with the history so far.
pub fn fit(
    cfg: &TrainConfig,
    trained: &Trained,
    data: &Mnist,
    device: &Device,
    reporter: &mut dyn Reporter,
) -> Result<Vec<EpochRecord>, TrainError> {
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
    let batcher = BatcherConfig {
        batch_size: cfg.batch_size,
        shuffle: true,
        augment: cfg.augment,
        drop_last: false,
    };
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let mut opt = Adam::new(trained.trainable_vars(), cfg.adam)?;
    let mut scheduler = Scheduler::new(cfg.schedule.clone(), cfg.adam.lr, steps_per_epoch, cfg.epochs)?;
    let mut history = Vec::with_capacity(cfg.epochs);

    for epoch0 in 0..cfg.epochs {
        let epoch = epoch0 + 1;
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
        for (step, batch) in batches(&train, &batcher, Some(&mut shuffle_rng), device)?.enumerate() {
            let batch = batch?;
            opt.set_lr(scheduler.lr_at(epoch0, step));
            let logits = trained.net.forward_t(&batch.images, true)?;
            let loss = cross_entropy(&logits, &batch.labels)?;
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                return Err(TrainError::NonFinite {
                    epoch,
                    batch: step + 1,
                    value: loss_value,
                });
            }
            opt.backward_step(&loss)?;
            let n = batch.labels_u8.len();
            loss_sum.update(loss_value, n);
            acc.update(&logits, &batch.labels_u8)?;
            reporter.step(step + 1, loss_sum.value(), acc.value());
        }
        let seconds = started.elapsed().as_secs_f64();
        let val = evaluate(&trained.net, &data.val, device)?;
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
    }
    Ok(history)
}

//! Training, evaluation, run outputs and the command line shared by the three solution binaries.
//!
//! A binary is one call: `mnist_train::cli::main(Solution::Conv)`.

mod checkpoint;
pub mod cli;
pub mod compare;
mod config;
pub mod distill;
mod fit;
pub mod frontier;
mod interrupt;
pub mod loss;
mod outputs;
pub mod plots;
mod report;
pub mod sweep;
mod tta;

use std::path::{Path, PathBuf};

use candle_core::Device;
use mnist_data::Mnist;

pub use checkpoint::{
    load_checkpoint, save_checkpoint, Checkpoint, RngState, RunOptions, CHECKPOINT_FILE,
};
pub use config::{default_run_dir, TrainConfig, MIN_POLY_LOSS};
pub use distill::{DistillConfig, TeacherRef, Teachers};
pub use fit::{
    evaluate, fit, fit_with, EpochEnd, EpochRecord, Evaluation, FitControl, OnEpoch, ResumeState,
    Trained, EVAL_BATCH,
};
pub use interrupt::{Interrupt, INTERRUPTED_EXIT_CODE};
pub use outputs::{
    history_csv, read_json, save_weights, write_atomic, write_bytes_atomic, write_json, RunResults,
    CONFIG_FILE, HISTORY_FILE, RESULTS_FILE, WEIGHTS_FILE,
};
pub use report::{LogReporter, ProgressReporter, Reporter};
pub use tta::{evaluate_tta, shift_image, TtaEvaluation, TTA_LABEL, TTA_SHIFTS};

/// Errors of training and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An invalid setting, rejected before work starts.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The loss became NaN or infinite.
    #[error("loss became {value} at epoch {epoch}, batch {batch}: training stopped (lower the learning rate?)")]
    NonFinite {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based batch within the epoch.
        batch: usize,
        /// The loss value.
        value: f64,
    },
    /// SIGINT or SIGTERM stopped training at a batch boundary.
    #[error("interrupted after {completed} of {epochs} complete epochs (the unfinished epoch was dropped)")]
    Interrupted {
        /// Epochs completed (and checkpointed) before the signal.
        completed: usize,
        /// Epochs asked for.
        epochs: usize,
    },
    /// A checkpoint is missing, corrupt or of another run.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file could not be read or written.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A weights file is missing, corrupt or of another model.
    #[error("weights {}: {reason}", path.display())]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Loading the data failed.
    #[error(transparent)]
    Data(#[from] mnist_data::DataError),
    /// The optimizer or scheduler failed.
    #[error(transparent)]
    Optim(#[from] mnist_optim::OptimError),
    /// A metrics computation failed.
    #[error(transparent)]
    Metrics(#[from] mnist_metrics::MetricsError),
    /// A model could not be built (its architecture, or candle).
    #[error(transparent)]
    Model(#[from] mnist_models::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Trains a model as `cfg` says, evaluates it on the test split once, and writes the run folder
/// (`model.safetensors`, `config.json`, `history.csv`, `results.json`, and `checkpoint.safetensors`
/// after every epoch), then the pictures of [`plots::write_run_plots`] (a picture that cannot be made is
/// logged as a warning; it never fails the run).
pub fn run_training(
    cfg: &TrainConfig,
    data: &Mnist,
    out_dir: &Path,
    device: &Device,
    reporter: &mut dyn Reporter,
) -> Result<RunResults, TrainError> {
    run_training_with(cfg, data, out_dir, device, reporter, RunOptions::default())
}

/// [`run_training`] that may resume from a checkpoint and stop on request (see [`RunOptions`]).
/// A stop returns [`TrainError::Interrupted`] with the last complete epoch's checkpoint in `out_dir`.
pub fn run_training_with(
    cfg: &TrainConfig,
    data: &Mnist,
    out_dir: &Path,
    device: &Device,
    reporter: &mut dyn Reporter,
    options: RunOptions<'_>,
) -> Result<RunResults, TrainError> {
    cfg.validate()?;
    if let Some(distill) = &cfg.distill {
        // A teacher that cannot be used is reported before the run folder is touched.
        Teachers::load(distill, cfg.dataset, device)?;
    }
    outputs::prepare_run_dir(out_dir)?;
    outputs::write_config(out_dir, cfg)?;
    let trained = Trained::init(cfg, device)?;
    let resume = match options.resume {
        Some(ckpt) => {
            ckpt.restore_weights(cfg, trained.vars.var_map())?;
            tracing::info!(
                "resuming from {} after epoch {} of {}",
                ckpt.path.display(),
                ckpt.state.epoch,
                cfg.epochs
            );
            Some(ckpt.state)
        }
        None => None,
    };
    let summary = mnist_models::summary(&cfg.model.arch).map_err(mnist_models::ModelError::from)?;
    tracing::info!(
        "{} ({}): {} params ({} trainable), {} training images, writing to {}",
        cfg.model.solution,
        cfg.model.label(),
        summary.params_total,
        summary.params_trainable,
        cfg.limit_train
            .unwrap_or(data.train.len())
            .min(data.train.len()),
        out_dir.display()
    );
    let mut on_epoch = |end: &EpochEnd<'_>| {
        checkpoint::save_epoch(out_dir, cfg, &trained, end)?;
        if let (Some(n), Some(stop)) = (options.pause_after_epoch, options.stop) {
            if end.history.len() == n {
                eprintln!("paused after epoch {n}");
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
        Ok(())
    };
    let control = FitControl {
        resume,
        stop: options.stop,
        on_epoch: Some(&mut on_epoch),
    };
    let history = fit_with(cfg, &trained, data, device, reporter, control)?;
    save_weights(&out_dir.join(WEIGHTS_FILE), trained.vars.var_map())?;
    write_bytes_atomic(
        &out_dir.join(HISTORY_FILE),
        history_csv(&history).as_bytes(),
    )?;
    // A `no_test` run never evaluates the test split (its data holds none).
    let test = match cfg.no_test {
        true => None,
        false => Some(evaluate(&trained.net, &data.test, device)?),
    };
    let results = RunResults {
        solution: cfg.model.solution.to_string(),
        variant: cfg.model.label(),
        dataset: cfg.dataset.to_string(),
        params_total: summary.params_total,
        params_trainable: summary.params_trainable,
        params_non_trainable: summary.params_non_trainable,
        epochs: history.len(),
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        test_accuracy: test.as_ref().map(|t| t.accuracy),
        test_loss: test.as_ref().map(|t| t.loss),
        best_val_accuracy: history.iter().map(|r| r.val_accuracy).fold(0.0, f64::max),
        final_val_accuracy: history.last().map(|r| r.val_accuracy).unwrap_or(0.0),
        epoch_seconds: history.iter().map(|r| r.seconds).collect(),
        confusion: test
            .as_ref()
            .map(|t| t.confusion.counts().to_vec())
            .unwrap_or_default(),
        threads: rayon::current_num_threads(),
    };
    write_json(&out_dir.join(RESULTS_FILE), &results)?;
    // Pictures are a by-product: a failure is logged, never fatal.
    let failed = match &test {
        Some(test) => plots::write_run_plots(out_dir, &history, &data.test, test, cfg.dataset).1,
        None => plots::write_curves(out_dir, &history)
            .err()
            .into_iter()
            .collect(),
    };
    for e in failed {
        tracing::warn!("plot not written: {e}");
    }
    Ok(results)
}

//! How training progress is shown, kept apart from the metrics themselves.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::EpochRecord;

/// Receives training progress. Implementations decide how (or whether) to show it.
pub trait Reporter {
    /// An epoch with `steps` optimizer steps begins.
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize);
    /// After an optimizer step: running mean loss and accuracy of the epoch so far.
    fn step(&mut self, step: usize, loss: f64, accuracy: f64);
    /// An epoch ended (validation included).
    fn epoch_end(&mut self, record: &EpochRecord);
}

fn log_epoch(r: &EpochRecord, epochs: usize) {
    tracing::info!(
        "epoch {}/{}: loss {:.4} accuracy {:.4} val_loss {:.4} val_accuracy {:.4} lr {:.2e} ({:.1} s)",
        r.epoch,
        epochs,
        r.loss,
        r.accuracy,
        r.val_loss,
        r.val_accuracy,
        r.lr,
        r.seconds
    );
}

/// A Keras `verbose=1`-like progress bar per epoch (on stderr, only when it is a terminal), plus the
/// one-line epoch summary through `tracing`.
pub struct ProgressReporter {
    bar: Option<ProgressBar>,
    epochs: usize,
}

impl ProgressReporter {
    /// A reporter that draws bars when stderr is a terminal.
    pub fn new() -> Self {
        Self {
            bar: None,
            epochs: 0,
        }
    }
}

impl Default for ProgressReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for ProgressReporter {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize) {
        self.epochs = epochs;
        let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "Epoch {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(format!("{epoch}/{epochs}"));
        bar.enable_steady_tick(Duration::from_millis(200));
        self.bar = Some(bar);
    }

    fn step(&mut self, step: usize, loss: f64, accuracy: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            if step.is_multiple_of(16) {
                bar.set_message(format!("loss {loss:.4} accuracy {accuracy:.4}"));
            }
        }
    }

    fn epoch_end(&mut self, record: &EpochRecord) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        log_epoch(record, self.epochs);
    }
}

/// Logs only the per-epoch summary line.
#[derive(Default)]
pub struct LogReporter {
    epochs: usize,
}

impl Reporter for LogReporter {
    fn epoch_start(&mut self, _epoch: usize, epochs: usize, _steps: usize) {
        self.epochs = epochs;
    }

    fn step(&mut self, _step: usize, _loss: f64, _accuracy: f64) {}

    fn epoch_end(&mut self, record: &EpochRecord) {
        log_epoch(record, self.epochs);
    }
}

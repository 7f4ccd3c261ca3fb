//! Files a run writes: weights, config, history, results. Every file is written to a temporary file in the
//! same folder and renamed into place, so a crash never leaves a half-written file behind.

use std::fs;
use std::path::Path;

use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::{EpochRecord, TrainConfig, TrainError};

/// File names inside a run folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The training configuration.
pub const CONFIG_FILE: &str = "config.json";
/// Per-epoch metrics.
pub const HISTORY_FILE: &str = "history.csv";
/// Final figures.
pub const RESULTS_FILE: &str = "results.json";

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `path` atomically (see [`mnist_fs::write_atomic`]): `write` fills a temporary file beside it,
/// which is synced and renamed into place; on any error nothing is left behind and an existing `path` is
/// untouched.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    mnist_fs::write_atomic(path, write, io_err)
}

/// Writes bytes atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    write_atomic(path, |tmp| {
        fs::write(tmp, bytes).map_err(|e| io_err(tmp, e))
    })
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    write_bytes_atomic(path, format!("{text}\n").as_bytes())
}

/// Reads a JSON file, naming the file in any error.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TrainError> {
    let text = fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Saves the variables as safetensors, atomically.
pub fn save_weights(path: &Path, vars: &VarMap) -> Result<(), TrainError> {
    write_atomic(path, |tmp| {
        vars.save(tmp).map_err(|e| TrainError::Weights {
            path: tmp.to_path_buf(),
            reason: e.to_string(),
        })
    })
}

/// `history.csv`: epoch, lr, loss, accuracy, val_loss, val_accuracy, seconds.
pub fn history_csv(history: &[EpochRecord]) -> String {
    let mut out = String::from("epoch,lr,loss,accuracy,val_loss,val_accuracy,seconds\n");
    for r in history {
        out.push_str(&format!(
            "{},{:.6e},{:.6},{:.6},{:.6},{:.6},{:.3}\n",
            r.epoch, r.lr, r.loss, r.accuracy, r.val_loss, r.val_accuracy, r.seconds
        ));
    }
    out
}

/// `results.json`: the figures of a finished run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResults {
    /// conv, separable or inception.
    pub solution: String,
    /// seed or improved.
    pub variant: String,
    /// mnist or fashion.
    pub dataset: String,
    /// All parameters (BatchNorm statistics included).
    pub params_total: usize,
    /// Trainable parameters.
    pub params_trainable: usize,
    /// BatchNorm statistics.
    pub params_non_trainable: usize,
    /// Epochs trained.
    pub epochs: usize,
    /// The run's seed.
    pub seed: u64,
    /// Batch size.
    pub batch_size: usize,
    /// Test accuracy as a fraction (`None` for a run trained with `--no-test`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// Mean test cross-entropy (`None` for a run trained with `--no-test`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    /// Best validation accuracy over the epochs.
    pub best_val_accuracy: f64,
    /// Validation accuracy after the last epoch.
    pub final_val_accuracy: f64,
    /// Seconds of training per epoch.
    pub epoch_seconds: Vec<f64>,
    /// Test confusion matrix (rows: true class, columns: predicted); empty for a `--no-test` run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
    /// Rayon threads used.
    pub threads: usize,
}

/// Writes the config of a run before training starts.
pub fn write_config(dir: &Path, cfg: &TrainConfig) -> Result<(), TrainError> {
    write_json(&dir.join(CONFIG_FILE), cfg)
}

/// Creates the run folder, failing early with a clear error when it cannot be written.
pub fn prepare_run_dir(dir: &Path) -> Result<(), TrainError> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let probe = dir.join(format!(".write-test{}", std::process::id()));
    fs::write(&probe, b"ok").map_err(|e| io_err(dir, e))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_has_header_and_rows() {
        let h = vec![EpochRecord {
            epoch: 1,
            lr: 1e-3,
            loss: 0.5,
            accuracy: 0.9,
            val_loss: 0.4,
            val_accuracy: 0.95,
            seconds: 3.0,
        }];
        let csv = history_csv(&h);
        let lines: Vec<_> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "epoch,lr,loss,accuracy,val_loss,val_accuracy,seconds"
        );
        assert!(lines[1].starts_with("1,1.000000e-3,0.500000,0.900000,0.400000,0.950000,3.000"));
    }
}

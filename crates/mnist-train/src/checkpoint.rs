//! Checkpoints: the complete training state after an epoch, in one file written atomically.
//!
//! `checkpoint.safetensors` holds the model's variables (`model/<name>`, BatchNorm statistics
//! included) and the optimizer's state (Adam's moments `adam_m/<name>`, `adam_v/<name>`, or SGD's
//! momentum buffers `sgd_momentum/<name>`, flat f32) as tensors, with a run that averages its weights
//! also the averages (`ema/<name>`), and in its metadata (key `mnist_checkpoint`) a JSON record of
//! everything else: the epoch, the optimizer's step and learning rate, the number of average updates,
//! the scheduler's state, the random state and the history. Being one file renamed into
//! place, the tensors and the record always belong to the same epoch, and a kill at any moment leaves
//! the previous checkpoint intact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use mnist_optim::{AdamState, EmaState, MomentState, OptimizerState, SchedulerState, SgdState};
use serde::{Deserialize, Serialize};

use crate::fit::{EpochEnd, ResumeState, STREAM_DROPOUT, STREAM_SHUFFLE};
use crate::{history_csv, write_atomic, write_bytes_atomic, EpochRecord, TrainConfig, TrainError};
use crate::{Trained, HISTORY_FILE};

/// The checkpoint's file name inside a run folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The safetensors metadata key of the JSON record.
const META_KEY: &str = "mnist_checkpoint";
/// Version of the record's layout.
const FORMAT: u32 = 1;
const MODEL_PREFIX: &str = "model/";
const ADAM_M_PREFIX: &str = "adam_m/";
const ADAM_V_PREFIX: &str = "adam_v/";
const SGD_PREFIX: &str = "sgd_momentum/";
const EMA_PREFIX: &str = "ema/";

/// The state of the random generators. They are re-derived from `(seed, stream, epoch)` with
/// `mnist_data::epoch_rng` at each epoch start, so this is all there is to restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// The 0-based epoch whose generators come next (= completed epochs).
    pub next_epoch: u64,
    /// Stream of the shuffle (and augmentation) generator.
    pub shuffle_stream: u64,
    /// Stream of the dropout generator.
    pub dropout_stream: u64,
}

/// An `f64` stored as its shortest round-trip decimal string: serde_json's default float parser may be
/// one unit in the last place off, and a resumed run must see exactly the numbers it saved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
struct Exact(f64);

impl From<Exact> for String {
    fn from(x: Exact) -> String {
        format!("{:?}", x.0)
    }
}

impl TryFrom<String> for Exact {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse::<f64>()
            .map(Exact)
            .map_err(|e| format!("'{s}' is not a number: {e}"))
    }
}

/// [`EpochRecord`] with exact floats.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExactEpoch {
    epoch: usize,
    lr: Exact,
    loss: Exact,
    accuracy: Exact,
    val_loss: Exact,
    val_accuracy: Exact,
    seconds: Exact,
}

impl From<&EpochRecord> for ExactEpoch {
    fn from(r: &EpochRecord) -> Self {
        Self {
            epoch: r.epoch,
            lr: Exact(r.lr),
            loss: Exact(r.loss),
            accuracy: Exact(r.accuracy),
            val_loss: Exact(r.val_loss),
            val_accuracy: Exact(r.val_accuracy),
            seconds: Exact(r.seconds),
        }
    }
}

impl From<ExactEpoch> for EpochRecord {
    fn from(r: ExactEpoch) -> Self {
        Self {
            epoch: r.epoch,
            lr: r.lr.0,
            loss: r.loss.0,
            accuracy: r.accuracy.0,
            val_loss: r.val_loss.0,
            val_accuracy: r.val_accuracy.0,
            seconds: r.seconds.0,
        }
    }
}

/// [`SchedulerState`] with exact floats.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExactScheduler {
    lr: Exact,
    last_reduce: usize,
    val_acc: Vec<Option<Exact>>,
}

impl From<SchedulerState> for ExactScheduler {
    fn from(s: SchedulerState) -> Self {
        Self {
            lr: Exact(s.lr),
            last_reduce: s.last_reduce,
            val_acc: s.val_acc.into_iter().map(|v| v.map(Exact)).collect(),
        }
    }
}

impl From<ExactScheduler> for SchedulerState {
    fn from(s: ExactScheduler) -> Self {
        Self {
            lr: s.lr.0,
            last_reduce: s.last_reduce,
            val_acc: s.val_acc.into_iter().map(|v| v.map(|x| x.0)).collect(),
        }
    }
}

/// The JSON record stored in the checkpoint's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    format: u32,
    solution: String,
    variant: String,
    epoch: usize,
    /// The optimizer's step count and learning rate (named so since the checkpoints written before SGD
    /// existed, which are all Adam's).
    adam_step: u64,
    adam_lr: Exact,
    /// `sgd` for SGD; absent for Adam.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    optimizer: Option<String>,
    /// Updates of the moving average, for a run with `ema`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ema_updates: Option<u64>,
    scheduler: ExactScheduler,
    rng: RngState,
    history: Vec<ExactEpoch>,
}

/// A checkpoint read back from a run folder.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file it was read from.
    pub path: PathBuf,
    /// conv, separable or inception.
    pub solution: String,
    /// seed or improved.
    pub variant: String,
    /// The random state.
    pub rng: RngState,
    /// The model's variables by name.
    pub weights: HashMap<String, Tensor>,
    /// Optimizer, scheduler and history after the last complete epoch.
    pub state: ResumeState,
}

/// How [`crate::run_training_with`] starts and stops.
#[derive(Debug, Default)]
pub struct RunOptions<'a> {
    /// Continue from this checkpoint (its weights are loaded into the fresh model).
    pub resume: Option<Checkpoint>,
    /// Stop at the next batch boundary once this is true (see [`crate::Interrupt`]).
    pub stop: Option<&'a AtomicBool>,
    /// A test hook: after the checkpoint of this epoch is written, print `paused after epoch N` on
    /// stderr and wait until `stop` is set (so a test can interrupt a run at a known point, no race).
    pub pause_after_epoch: Option<usize>,
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes `dir/checkpoint.safetensors` for the epoch that just ended, atomically.
pub fn save_checkpoint(
    dir: &Path,
    cfg: &TrainConfig,
    vars: &VarMap,
    end: &EpochEnd<'_>,
) -> Result<(), TrainError> {
    let path = dir.join(CHECKPOINT_FILE);
    let epoch = end.history.len();
    let state = end.optimizer.state()?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    {
        let data = match vars.data().lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (name, var) in data.iter() {
            tensors.push((format!("{MODEL_PREFIX}{name}"), var.as_tensor().copy()?));
        }
    }
    let flat = |x: &[f32]| Tensor::from_slice(x, x.len(), &Device::Cpu);
    let (step, lr, optimizer) = match &state {
        OptimizerState::Adam(adam) => {
            for (name, ms) in &adam.moments {
                tensors.push((format!("{ADAM_M_PREFIX}{name}"), flat(&ms.m)?));
                tensors.push((format!("{ADAM_V_PREFIX}{name}"), flat(&ms.v)?));
            }
            (adam.step, adam.lr, None)
        }
        OptimizerState::Sgd(sgd) => {
            for (name, b) in &sgd.momentum {
                tensors.push((format!("{SGD_PREFIX}{name}"), flat(b)?));
            }
            (sgd.step, sgd.lr, Some("sgd".to_string()))
        }
    };
    let ema_updates = match end.ema {
        Some(ema) => {
            let ema = ema.state()?;
            for (name, s) in &ema.shadow {
                tensors.push((format!("{EMA_PREFIX}{name}"), flat(s)?));
            }
            Some(ema.updates)
        }
        None => None,
    };
    let record = Record {
        format: FORMAT,
        solution: cfg.model.solution.to_string(),
        variant: cfg.model.label(),
        epoch,
        adam_step: step,
        adam_lr: Exact(lr),
        optimizer,
        ema_updates,
        scheduler: end.scheduler.state().into(),
        rng: RngState {
            seed: cfg.seed,
            next_epoch: epoch as u64,
            shuffle_stream: STREAM_SHUFFLE,
            dropout_stream: STREAM_DROPOUT,
        },
        history: end.history.iter().map(ExactEpoch::from).collect(),
    };
    let json = serde_json::to_string(&record).map_err(|e| TrainError::Json {
        path: path.clone(),
        source: e,
    })?;
    let meta = HashMap::from([(META_KEY.to_string(), json)]);
    write_atomic(&path, |tmp| {
        safetensors::serialize_to_file(tensors, Some(meta), tmp)
            .map_err(|e| ckpt_err(tmp, e.to_string()))
    })?;
    tracing::debug!(path = %path.display(), epoch, "checkpoint written");
    Ok(())
}

/// The per-epoch work of a run: the checkpoint, then `history.csv` so far.
pub(crate) fn save_epoch(
    dir: &Path,
    cfg: &TrainConfig,
    trained: &Trained,
    end: &EpochEnd<'_>,
) -> Result<(), TrainError> {
    save_checkpoint(dir, cfg, trained.vars.var_map(), end)?;
    write_bytes_atomic(&dir.join(HISTORY_FILE), history_csv(end.history).as_bytes())
}

/// Reads `dir/checkpoint.safetensors`, checking that its tensors and record fit together.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Checkpoint, TrainError> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ckpt_err(
                &path,
                "no such file: nothing to resume (a run writes it after each complete epoch)",
            )
        } else {
            TrainError::Io {
                path: path.clone(),
                source: e,
            }
        }
    })?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| ckpt_err(&path, format!("not a safetensors file: {e}")))?;
    let json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| ckpt_err(&path, format!("no '{META_KEY}' record: not a checkpoint")))?;
    let record: Record = serde_json::from_str(json)
        .map_err(|e| ckpt_err(&path, format!("invalid '{META_KEY}' record: {e}")))?;
    if record.format != FORMAT {
        return Err(ckpt_err(
            &path,
            format!("format {} is not the supported {FORMAT}", record.format),
        ));
    }
    if record.history.len() != record.epoch || record.rng.next_epoch != record.epoch as u64 {
        return Err(ckpt_err(
            &path,
            format!(
                "the record is at epoch {} but holds {} history rows and the random state of epoch {}",
                record.epoch,
                record.history.len(),
                record.rng.next_epoch
            ),
        ));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| ckpt_err(&path, format!("unreadable tensors: {e}")))?;
    let mut weights = HashMap::new();
    let mut m = HashMap::new();
    let mut v = HashMap::new();
    let mut sgd = HashMap::new();
    let mut ema = HashMap::new();
    for (name, tensor) in tensors {
        if let Some(n) = name.strip_prefix(MODEL_PREFIX) {
            weights.insert(n.to_string(), tensor);
        } else if let Some(n) = name.strip_prefix(ADAM_M_PREFIX) {
            m.insert(n.to_string(), tensor);
        } else if let Some(n) = name.strip_prefix(ADAM_V_PREFIX) {
            v.insert(n.to_string(), tensor);
        } else if let Some(n) = name.strip_prefix(SGD_PREFIX) {
            sgd.insert(n.to_string(), tensor);
        } else if let Some(n) = name.strip_prefix(EMA_PREFIX) {
            ema.insert(n.to_string(), tensor);
        } else {
            return Err(ckpt_err(&path, format!("unexpected tensor '{name}'")));
        }
    }
    let flat = |t: Tensor, what: &str, name: &str| -> Result<Vec<f32>, TrainError> {
        t.to_vec1::<f32>()
            .map_err(|e| ckpt_err(&path, format!("{what} of '{name}': {e}")))
    };
    let is_sgd = match record.optimizer.as_deref() {
        None => false,
        Some("sgd") => true,
        Some(other) => {
            return Err(ckpt_err(
                &path,
                format!("unknown optimizer '{other}' (adam or sgd)"),
            ))
        }
    };
    let has_adam = !(m.is_empty() && v.is_empty());
    if (is_sgd && has_adam) || (!is_sgd && !sgd.is_empty()) {
        return Err(ckpt_err(
            &path,
            format!(
                "holds both Adam moments and SGD momentum buffers (the record says {})",
                if is_sgd { "sgd" } else { "adam" }
            ),
        ));
    }
    let ema = match record.ema_updates {
        Some(updates) => {
            let mut shadow = std::collections::BTreeMap::new();
            for (name, t) in ema {
                shadow.insert(name.clone(), flat(t, "moving average", &name)?);
            }
            Some(EmaState { updates, shadow })
        }
        None if ema.is_empty() => None,
        None => {
            return Err(ckpt_err(
                &path,
                "holds moving averages ('ema/' tensors) but no 'ema_updates' in its record",
            ))
        }
    };
    let mut momentum = std::collections::BTreeMap::new();
    for (name, b) in sgd {
        momentum.insert(name.clone(), flat(b, "SGD momentum", &name)?);
    }
    let mut moments = std::collections::BTreeMap::new();
    for (name, m) in m {
        let v = v.remove(&name).ok_or_else(|| {
            ckpt_err(
                &path,
                format!("Adam moment m of '{name}' has no matching v"),
            )
        })?;
        moments.insert(
            name.clone(),
            MomentState {
                m: flat(m, "Adam moment m", &name)?,
                v: flat(v, "Adam moment v", &name)?,
            },
        );
    }
    if let Some(name) = v.keys().next() {
        return Err(ckpt_err(
            &path,
            format!("Adam moment v of '{name}' has no matching m"),
        ));
    }
    Ok(Checkpoint {
        path,
        solution: record.solution,
        variant: record.variant,
        rng: record.rng,
        weights,
        state: ResumeState {
            epoch: record.epoch,
            optimizer: match is_sgd {
                true => OptimizerState::Sgd(SgdState {
                    step: record.adam_step,
                    lr: record.adam_lr.0,
                    momentum,
                }),
                false => OptimizerState::Adam(AdamState {
                    step: record.adam_step,
                    lr: record.adam_lr.0,
                    moments,
                }),
            },
            ema,
            scheduler: record.scheduler.into(),
            history: record.history.into_iter().map(EpochRecord::from).collect(),
        },
    })
}

impl Checkpoint {
    /// Checks that the checkpoint belongs to a run of `cfg` and copies its weights into `vars`
    /// (every variable must be present with its shape; nothing is changed on error).
    pub fn restore_weights(&self, cfg: &TrainConfig, vars: &VarMap) -> Result<(), TrainError> {
        let (solution, variant) = (cfg.model.solution.to_string(), cfg.model.label());
        if self.solution != solution || self.variant != variant {
            return Err(ckpt_err(
                &self.path,
                format!(
                    "holds a {} ({}) model, the run's config says {solution} ({variant})",
                    self.solution, self.variant
                ),
            ));
        }
        if self.rng.seed != cfg.seed {
            return Err(ckpt_err(
                &self.path,
                format!(
                    "was written with seed {}, the run's config says {}",
                    self.rng.seed, cfg.seed
                ),
            ));
        }
        let data = match vars.data().lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(extra) = self.weights.keys().find(|k| !data.contains_key(*k)) {
            return Err(ckpt_err(
                &self.path,
                format!("has a tensor '{extra}' the model does not"),
            ));
        }
        let mut pairs = Vec::with_capacity(data.len());
        for (name, var) in data.iter() {
            let t = self
                .weights
                .get(name)
                .ok_or_else(|| ckpt_err(&self.path, format!("tensor '{name}' is missing")))?;
            if t.dims() != var.dims() || t.dtype() != var.dtype() {
                return Err(ckpt_err(
                    &self.path,
                    format!(
                        "tensor '{name}' is {:?} {:?}, the model's is {:?} {:?}",
                        t.dtype(),
                        t.dims(),
                        var.dtype(),
                        var.dims()
                    ),
                ));
            }
            pairs.push((var, t));
        }
        for (var, t) in pairs {
            var.set(t)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mnist_models::{Solution, Variant};
    use mnist_optim::{Optimizer, Scheduler};

    fn setup() -> (TrainConfig, Trained, Optimizer, Scheduler, Vec<EpochRecord>) {
        let cfg = TrainConfig::recipe(Solution::Conv, Variant::Seed);
        let trained = Trained::init(&cfg, &Device::Cpu).unwrap();
        let mut adam = Optimizer::new(trained.trainable_vars(), &cfg.optimizer).unwrap();
        // One real step so the moments are not all zero.
        let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
        let logits = candle_core::ModuleT::forward_t(&trained.net, &x, true).unwrap();
        let labels = Tensor::new(&[3u32, 7], &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        adam.backward_step(&loss).unwrap();
        let mut sched = Scheduler::new(cfg.schedule, cfg.optimizer.lr(), 10, 3).unwrap();
        sched.on_epoch_end(1, 0.5);
        let history = vec![EpochRecord {
            epoch: 1,
            lr: 1e-3,
            loss: 0.7,
            accuracy: 0.8,
            val_loss: 0.6,
            val_accuracy: 0.5,
            seconds: 1.5,
        }];
        (cfg, trained, adam, sched, history)
    }

    #[test]
    fn round_trip_restores_weights_moments_and_record() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, trained, adam, sched, history) = setup();
        let end = EpochEnd {
            history: &history,
            optimizer: &adam,
            ema: None,
            scheduler: &sched,
        };
        save_checkpoint(dir.path(), &cfg, trained.vars.var_map(), &end).unwrap();
        let ckpt = load_checkpoint(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(ckpt.state.epoch, 1);
        assert_eq!(ckpt.state.history, history);
        assert_eq!(ckpt.state.optimizer, adam.state().unwrap());
        assert_eq!(ckpt.state.ema, None);
        assert_eq!(ckpt.state.scheduler, sched.state());
        assert_eq!(ckpt.rng.seed, cfg.seed);
        assert_eq!(ckpt.rng.next_epoch, 1);

        // Restoring into a model with other weights makes them equal, bit for bit.
        let mut other_cfg = cfg.clone();
        other_cfg.seed += 1;
        let other = Trained::init(&other_cfg, &Device::Cpu).unwrap();
        assert!(
            ckpt.restore_weights(&other_cfg, other.vars.var_map())
                .is_err(),
            "seed differs"
        );
        ckpt.restore_weights(&cfg, other.vars.var_map()).unwrap();
        let a = trained.vars.var_map().data().lock().unwrap();
        let b = other.vars.var_map().data().lock().unwrap();
        assert_eq!(a.len(), b.len());
        for (name, va) in a.iter() {
            let x: Vec<f32> = va.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(x, y, "{name}");
        }
    }

    #[test]
    fn sgd_buffers_and_moving_averages_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, trained, _, sched, history) = setup();
        cfg.optimizer = mnist_optim::OptimizerConfig::Sgd(mnist_optim::SgdConfig::default());
        let mut sgd = Optimizer::new(trained.trainable_vars(), &cfg.optimizer).unwrap();
        let mut ema =
            mnist_optim::Ema::new(trained.all_vars(), mnist_optim::EmaConfig::new(0.9)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
        let logits = candle_core::ModuleT::forward_t(&trained.net, &x, true).unwrap();
        let labels = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        sgd.backward_step(&candle_nn::loss::cross_entropy(&logits, &labels).unwrap())
            .unwrap();
        ema.update().unwrap();
        let end = EpochEnd {
            history: &history,
            optimizer: &sgd,
            ema: Some(&ema),
            scheduler: &sched,
        };
        save_checkpoint(dir.path(), &cfg, trained.vars.var_map(), &end).unwrap();
        let ckpt = load_checkpoint(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(ckpt.state.optimizer, sgd.state().unwrap());
        assert!(matches!(ckpt.state.optimizer, OptimizerState::Sgd(_)));
        let saved = ckpt.state.ema.clone().unwrap();
        assert_eq!(saved, ema.state().unwrap());
        assert_eq!(saved.updates, 1);
        // Every variable is averaged, BatchNorm statistics included.
        assert!(saved.shadow.keys().any(|k| k.ends_with("running_mean")));
        assert_eq!(saved.shadow.len(), trained.all_vars().len());
    }

    #[test]
    fn floats_survive_the_record_bit_for_bit() {
        for x in [
            0.009698475165405384,
            0.1 + 0.2,
            1e-300,
            5e-324,
            f64::MAX,
            -0.0,
            f64::INFINITY,
        ] {
            let json = serde_json::to_string(&Exact(x)).unwrap();
            let back: Exact = serde_json::from_str(&json).unwrap();
            assert_eq!(back.0.to_bits(), x.to_bits(), "{x:e} via {json}");
        }
        let nan: Exact = serde_json::from_str("\"NaN\"").unwrap();
        assert!(nan.0.is_nan());
        assert!(serde_json::from_str::<Exact>("\"fast\"").is_err());
    }

    #[test]
    fn refuses_other_models_and_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, trained, adam, sched, history) = setup();
        let end = EpochEnd {
            history: &history,
            optimizer: &adam,
            ema: None,
            scheduler: &sched,
        };
        save_checkpoint(dir.path(), &cfg, trained.vars.var_map(), &end).unwrap();
        let ckpt = load_checkpoint(dir.path(), &Device::Cpu).unwrap();

        let sep = TrainConfig::recipe(Solution::Separable, Variant::Seed);
        let sep_model = Trained::init(&sep, &Device::Cpu).unwrap();
        let err = ckpt
            .restore_weights(&sep, sep_model.vars.var_map())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv (seed)") && err.contains("separable"),
            "{err}"
        );

        let mut missing = ckpt.clone();
        let name = missing.weights.keys().next().unwrap().clone();
        missing.weights.remove(&name);
        let err = missing
            .restore_weights(&cfg, trained.vars.var_map())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&name) && err.contains("missing"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let err = load_checkpoint(empty.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nothing to resume"), "{err}");

        let path = dir.path().join(CHECKPOINT_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_checkpoint(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains(CHECKPOINT_FILE), "{err}");

        // A plain weights file is not a checkpoint.
        trained.vars.var_map().save(&path).unwrap();
        let err = load_checkpoint(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a checkpoint"), "{err}");
    }
}

//! Knowledge distillation: the student learns the labels and, beside them, the class probabilities of
//! trained teacher models at a raised temperature (Hinton, Vinyals and Dean, "Distilling the Knowledge in
//! a Neural Network", 2015; an ensemble of teachers as there, its members' probabilities averaged).
//!
//! The teachers are finished runs (`model.safetensors` with its `config.json`): they only run forward,
//! in inference mode, on the same (augmented) batch the student trains on, and get no gradient.

use std::path::{Path, PathBuf};

use candle_core::{Device, ModuleT, Tensor, D};
use candle_nn::ops::softmax_last_dim;
use mnist_data::Dataset;
use mnist_models::Classifier;
use serde::{Deserialize, Serialize};

use crate::outputs::{io_err, read_json, CONFIG_FILE};
use crate::{TrainConfig, TrainError};

/// The default temperature of the soft targets.
pub const DEFAULT_TEMPERATURE: f64 = 4.0;
/// The default share of the distillation term in the loss.
pub const DEFAULT_WEIGHT: f64 = 0.5;

/// Distillation settings, saved in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// The teachers, whose probabilities are averaged.
    pub teachers: Vec<TeacherRef>,
    /// Temperature T of the soft targets and of the student's matching log-probabilities (> 0).
    pub temperature: f64,
    /// Share w of the distillation term: loss = (1 - w) * cross-entropy + w * T^2 * soft cross-entropy,
    /// in (0, 1].
    pub weight: f64,
}

/// One teacher: a weights file and a checksum of its bytes, so a run cannot resume (or be reused by a
/// sweep) against a teacher that changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherRef {
    /// The weights file (`model.safetensors` of a finished run), absolute.
    pub weights: PathBuf,
    /// FNV-1a 64 of the file's bytes, as 16 hex digits.
    pub checksum: String,
}

impl TeacherRef {
    /// Names the weights file at `path` (made absolute) with the checksum of its current bytes.
    pub fn of_file(path: &Path) -> Result<Self, TrainError> {
        let weights = std::path::absolute(path).map_err(|e| io_err(path, e))?;
        let bytes = read_weights(&weights)?;
        Ok(Self {
            weights,
            checksum: checksum(&bytes),
        })
    }
}

impl DistillConfig {
    /// Rejects settings that cannot train, naming the flag.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.teachers.is_empty() {
            return Err(TrainError::Config(
                "distillation needs at least one --teacher".into(),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(TrainError::Config(format!(
                "--distill-temperature {} must be a positive number",
                self.temperature
            )));
        }
        if !(self.weight > 0.0 && self.weight <= 1.0) {
            return Err(TrainError::Config(format!(
                "--distill-weight {} must be in (0, 1]",
                self.weight
            )));
        }
        Ok(())
    }
}

/// The loaded teachers of a run.
pub struct Teachers {
    models: Vec<Classifier>,
    temperature: f64,
}

impl Teachers {
    /// Loads every teacher of `cfg` for a student trained on `dataset`, checking that each file is the
    /// one the run was started with and that its run trained on the same data set.
    pub fn load(
        cfg: &DistillConfig,
        dataset: Dataset,
        device: &Device,
    ) -> Result<Self, TrainError> {
        cfg.validate()?;
        let mut models = Vec::with_capacity(cfg.teachers.len());
        for teacher in &cfg.teachers {
            let path = &teacher.weights;
            let bytes = read_weights(path)?;
            let found = checksum(&bytes);
            if found != teacher.checksum {
                return Err(weights_err(
                    path,
                    format!(
                        "the teacher changed since the run was configured (checksum {found}, expected {})",
                        teacher.checksum
                    ),
                ));
            }
            let config_path = path.with_file_name(CONFIG_FILE);
            if !config_path.is_file() {
                return Err(weights_err(
                    path,
                    format!(
                        "a teacher needs the {CONFIG_FILE} of its run beside it ({} not found)",
                        config_path.display()
                    ),
                ));
            }
            let run: TrainConfig = read_json(&config_path)?;
            if run.dataset != dataset {
                return Err(weights_err(
                    path,
                    format!(
                        "the teacher was trained on {} but the student trains on {}",
                        run.dataset, dataset
                    ),
                ));
            }
            models.push(Classifier::from_safetensors(
                run.model, &bytes, path, device,
            )?);
        }
        Ok(Self {
            models,
            temperature: cfg.temperature,
        })
    }

    /// The soft targets of `images` `[b, 1, 28, 28]`: the mean over the teachers of
    /// softmax(logits / T), `[b, 10]`, outside any gradient graph.
    pub fn soft_targets(&self, images: &Tensor) -> Result<Tensor, TrainError> {
        let mut sum: Option<Tensor> = None;
        for model in &self.models {
            // [b, 10], inference mode (BatchNorm running statistics, no dropout)
            let logits = model.net().forward_t(images, false)?.detach();
            let p = softmax_last_dim(&(logits / self.temperature)?)?;
            sum = Some(match sum {
                Some(s) => (s + p)?,
                None => p,
            });
        }
        let sum = sum.ok_or_else(|| TrainError::Config("no teachers".into()))?;
        Ok((sum / self.models.len() as f64)?.detach())
    }

    /// How many teachers there are.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// True when there are none (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// The distillation term: T^2 times the mean over the batch of KL(soft || softmax(logits / T)), with
/// `logits` and `soft` `[b, k]` (the T^2 keeps its gradient's scale independent of T, as Hinton et al.
/// advise). Zero when the student matches the targets; its gradient is the soft cross-entropy's, since
/// the targets' entropy is a constant. Built from candle ops, so it has a gradient.
pub fn soft_kl_divergence(
    logits: &Tensor,
    soft: &Tensor,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    // log q, with 0 * log 0 taken as 0 (q = 0 gives 0 * log 1e-30 = 0)
    let log_q = soft.clamp(1e-30f32, 1f32)?.log()?.detach();
    // log p: [b, k]
    let log_p = candle_nn::ops::log_softmax(&(logits / temperature)?, D::Minus1)?;
    let kl = (soft * (log_q - log_p)?)?.sum(D::Minus1)?.mean_all()?;
    kl * (temperature * temperature)
}

fn read_weights(path: &Path) -> Result<Vec<u8>, TrainError> {
    if !path.is_file() {
        return Err(weights_err(path, "no such file (--teacher)".into()));
    }
    std::fs::read(path).map_err(|e| io_err(path, e))
}

/// FNV-1a, 64 bits: enough to notice a replaced file, not a security measure.
fn checksum(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn weights_err(path: &Path, reason: String) -> TrainError {
    TrainError::Weights {
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn kl_divergence_and_gradient_match_the_closed_form() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = [[0.3f32, -1.2, 2.0, 0.0], [-0.7, 0.1, 0.4, 1.5]];
        let q = [[0.1f32, 0.2, 0.6, 0.1], [0.25, 0.25, 0.0, 0.5]];
        let logits = Var::from_vec(x.concat(), (2, 4), &dev)?;
        let soft = Tensor::from_vec(q.concat(), (2, 4), &dev)?;
        for t in [1.0, 3.0] {
            let loss = soft_kl_divergence(&logits, &soft, t)?;
            let grads = loss.backward()?;
            let g = grads.get(&logits).expect("gradient").to_vec2::<f32>()?;
            let mut want = 0.0f64;
            for i in 0..2 {
                let z: Vec<f64> = x[i].iter().map(|&v| v as f64 / t).collect();
                let m = z.iter().cloned().fold(f64::MIN, f64::max);
                let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
                for j in 0..4 {
                    let log_p = z[j] - m - s.ln();
                    let q_log_q = match q[i][j] {
                        0.0 => 0.0,
                        v => v as f64 * (v as f64).ln(),
                    };
                    want += t * t * (q_log_q - q[i][j] as f64 * log_p) / 2.0;
                    // d/dx = T^2 / b * (softmax(x/T) - q) / T
                    let want_g = t * (log_p.exp() - q[i][j] as f64) / 2.0;
                    assert!(
                        (g[i][j] as f64 - want_g).abs() < 1e-6,
                        "T {t} grad[{i}][{j}]"
                    );
                }
            }
            let got = loss.to_scalar::<f32>()? as f64;
            assert!((got - want).abs() < 1e-5, "T {t}: {got} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn checksum_tells_files_apart() {
        assert_eq!(checksum(b""), "cbf29ce484222325");
        assert_ne!(checksum(b"ab"), checksum(b"ba"));
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let teacher = TeacherRef {
            weights: PathBuf::from("/x/model.safetensors"),
            checksum: "0".into(),
        };
        let cfg = |t: f64, w: f64, teachers: Vec<TeacherRef>| DistillConfig {
            teachers,
            temperature: t,
            weight: w,
        };
        for (c, flag) in [
            (cfg(4.0, 0.5, vec![]), "--teacher"),
            (
                cfg(0.0, 0.5, vec![teacher.clone()]),
                "--distill-temperature",
            ),
            (
                cfg(f64::NAN, 0.5, vec![teacher.clone()]),
                "--distill-temperature",
            ),
            (cfg(4.0, 0.0, vec![teacher.clone()]), "--distill-weight"),
            (cfg(4.0, 1.5, vec![teacher.clone()]), "--distill-weight"),
        ] {
            let e = c.validate().expect_err("invalid").to_string();
            assert!(e.contains(flag), "{e}");
        }
        assert!(cfg(4.0, 1.0, vec![teacher]).validate().is_ok());
    }

    #[test]
    fn a_missing_teacher_is_named() {
        let e = TeacherRef::of_file(Path::new("/nonexistent/model.safetensors"))
            .expect_err("missing")
            .to_string();
        assert!(
            e.contains("/nonexistent/model.safetensors") && e.contains("no such file"),
            "{e}"
        );
    }
}

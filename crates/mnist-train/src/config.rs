//! The training configuration (saved as `config.json` beside the weights) and each variant's recipe.

use std::path::PathBuf;

use mnist_data::{AugmentConfig, Dataset, Interpolation};
use mnist_models::{ModelConfig, Solution, Variant};
use mnist_optim::{
    AdamConfig, EmaConfig, LookaheadConfig, OptimizerConfig, SamConfig, ScheduleConfig,
};
use serde::{Deserialize, Serialize};

use crate::{DistillConfig, TrainError};

/// Everything that defines a training run. Saved as `config.json` so a run can be rebuilt and resumed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelConfig,
    /// Which data set.
    pub dataset: Dataset,
    /// Number of passes over the training split.
    pub epochs: usize,
    /// Images per optimizer step.
    pub batch_size: usize,
    /// The optimizer and its hyper-parameters (its `lr` is the base learning rate of the schedule),
    /// written as `"adam": {..}` or `"sgd": {..}`: files written before SGD existed hold `"adam"`.
    #[serde(flatten)]
    pub optimizer: OptimizerConfig,
    /// How the learning rate changes over training.
    pub schedule: ScheduleConfig,
    /// On-the-fly augmentation of training images (`None` = off).
    pub augment: Option<AugmentConfig>,
    /// Train the last N epochs on the plain images (augmentation off), so the final weights and the
    /// BatchNorm statistics settle on the distribution the model is tested on. 0 = augment every epoch.
    #[serde(default)]
    pub clean_epochs: usize,
    /// Label smoothing of the training loss: targets are `(1 - eps) * one_hot + eps / 10`. 0 = off.
    /// Validation and test losses are always plain cross-entropy.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Poly-1 loss (Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
    /// Functions", ICLR 2022): the training loss adds `eps * (1 - p_label)`, the first term of
    /// cross-entropy's expansion weighted up (`eps > 0`) or down (`eps < 0`, at least -1). 0 = off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub poly_loss: f64,
    /// An exponential moving average of every model variable (weights and BatchNorm statistics),
    /// updated after each optimizer step; when set, validation, the test and `model.safetensors` use the
    /// average (the checkpoint keeps the raw weights too). `None` (the default) = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<EmaConfig>,
    /// After the last epoch, replace every BatchNorm's running statistics with the mean of its batch
    /// statistics over the plain (unaugmented) training images, in full batches of
    /// [`Self::normalization_batch`] images, in order ("precise BatchNorm", [`mnist_models::Net::recalibrate_batch_norm`]), before the last
    /// validation, the test and the saved model. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub precise_bn: bool,
    /// Sharpness-aware minimisation ([`mnist_optim::Sam`], `--sam RHO`): every step takes its gradient
    /// at weights moved `rho` uphill, in a second forward and backward pass over the same batch that
    /// leaves the BatchNorm running statistics as the first pass left them. `None` (the default) = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sam: Option<SamConfig>,
    /// Lookahead ([`mnist_optim::Lookahead`], `--lookahead K`): slow weights that move `alpha` of the way
    /// to the optimizer's every `k` steps, the optimizer restarting from them; synced also at every
    /// epoch's end, so validation, the test and the saved model see the slow weights. `None` (the
    /// default) = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookahead: Option<LookaheadConfig>,
    /// Ghost BatchNorm (`--ghost-batch N`, [`mnist_models::Net::forward_train_ghost`]): each training
    /// batch runs through the model in parts of this many images, every BatchNorm normalising each part
    /// by its own statistics; the running statistics move once a batch toward the parts' mean, and
    /// precise BatchNorm recalibrates over batches of this size. At least 2 and smaller than
    /// `batch_size`. `None` (the default) = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ghost_batch: Option<usize>,
    /// Knowledge distillation from trained teacher models (`--teacher`). `None` (the default) = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// The seed of every random draw: initial weights, dropout masks, shuffles, augmentation.
    pub seed: u64,
    /// Use only the first N training images (quick trials).
    pub limit_train: Option<usize>,
    /// Never load or evaluate the test split (`--no-test`): the run reports validation figures only, as
    /// runs that choose a recipe must.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_test: bool,
}

impl TrainConfig {
    /// The recipe a variant trains with by default.
    ///
    /// `seed` is the original notebook's: Adam 1e-3, batch 32, plateau scheduler with factor 1 (off), no
    /// augmentation. `improved` was chosen on the validation split (see the README): batch 64, one-cycle
    /// learning rate peaking at `max_lr`, mild rotation/shift/scale augmentation (off in the last epoch
    /// for separable and inception).
    pub fn recipe(solution: Solution, variant: Variant) -> Self {
        let model = ModelConfig::new(solution, variant);
        match variant {
            Variant::Seed => Self {
                model,
                dataset: Dataset::Mnist,
                epochs: 10,
                batch_size: 32,
                optimizer: OptimizerConfig::Adam(AdamConfig::default()),
                schedule: ScheduleConfig::Plateau { factor: 1.0 },
                augment: None,
                clean_epochs: 0,
                label_smoothing: 0.0,
                poly_loss: 0.0,
                ema: None,
                precise_bn: false,
                sam: None,
                lookahead: None,
                ghost_batch: None,
                distill: None,
                seed: 42,
                limit_train: None,
                no_test: false,
            },
            Variant::Improved => {
                let max_lr = match solution {
                    Solution::Conv => 1e-2,
                    Solution::Separable => 1e-2,
                    Solution::Inception => 1e-2,
                };
                Self {
                    model,
                    dataset: Dataset::Mnist,
                    epochs: 10,
                    batch_size: 64,
                    optimizer: OptimizerConfig::Adam(AdamConfig {
                        lr: max_lr,
                        ..AdamConfig::default()
                    }),
                    schedule: ScheduleConfig::OneCycle {
                        max_lr,
                        pct_start: 0.25,
                        div_factor: 25.0,
                        final_div_factor: 1e3,
                        cycle_momentum: None,
                    },
                    augment: Some(AugmentConfig {
                        max_rotation_deg: 10.0,
                        max_shift_px: 2.0,
                        scale_range: (0.9, 1.1),
                        interpolation: Interpolation::Bilinear,
                        ..AugmentConfig::default()
                    }),
                    // Chosen on the validation split (README, "Improved variants"): the separable
                    // and inception models gained from a last epoch on plain images; conv did not.
                    clean_epochs: match solution {
                        Solution::Separable | Solution::Inception => 1,
                        Solution::Conv => 0,
                    },
                    label_smoothing: 0.0,
                    poly_loss: 0.0,
                    ema: None,
                    precise_bn: false,
                    sam: None,
                    lookahead: None,
                    ghost_batch: None,
                    distill: None,
                    seed: 42,
                    limit_train: None,
                    no_test: false,
                }
            }
        }
    }

    /// True when `other` describes the same run: both compared as the JSON of `config.json`, so fields
    /// added since a run was written compare by their defaults and f32 fields compare as written.
    pub fn same_settings(&self, other: &TrainConfig) -> bool {
        let normal = |c: &TrainConfig| {
            serde_json::to_string(c)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        };
        normal(self).zip(normal(other)).is_some_and(|(a, b)| a == b)
    }

    /// The number of images each training-mode BatchNorm sees at once: `ghost_batch`, or else
    /// `batch_size`.
    pub fn normalization_batch(&self) -> usize {
        self.ghost_batch.unwrap_or(self.batch_size)
    }

    /// What is wrong with ghost batches of `g` images in this config's batches, if anything (one rule for
    /// the `--ghost-batch` flag and for [`Self::validate`]).
    pub fn ghost_batch_problem(&self, g: usize) -> Option<String> {
        (g < 2 || g >= self.batch_size).then(|| {
            format!(
                "must be at least 2 and smaller than the batch size {}",
                self.batch_size
            )
        })
    }

    /// Rejects invalid settings once, before any work starts.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.epochs == 0 {
            return Err(TrainError::Config("epochs must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(TrainError::Config("batch size must be at least 1".into()));
        }
        if self.limit_train == Some(0) {
            return Err(TrainError::Config(
                "--limit-train must be at least 1".into(),
            ));
        }
        self.optimizer
            .validate()
            .map_err(|e| TrainError::Config(e.to_string()))?;
        if let Some(ema) = &self.ema {
            ema.validate()
                .map_err(|e| TrainError::Config(e.to_string()))?;
        }
        if let Some(sam) = &self.sam {
            sam.validate()
                .map_err(|e| TrainError::Config(e.to_string()))?;
        }
        if let Some(la) = &self.lookahead {
            la.validate()
                .map_err(|e| TrainError::Config(e.to_string()))?;
        }
        if let Some(g) = self.ghost_batch {
            if let Some(problem) = self.ghost_batch_problem(g) {
                return Err(TrainError::Config(format!(
                    "invalid ghost_batch = {g} (--ghost-batch): {problem}"
                )));
            }
        }
        self.schedule
            .validate()
            .map_err(|e| TrainError::Config(e.to_string()))?;
        if self.clean_epochs > self.epochs {
            return Err(TrainError::Config(format!(
                "--clean-epochs {} is more than the {} epochs",
                self.clean_epochs, self.epochs
            )));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(TrainError::Config(format!(
                "--label-smoothing {} must be in [0, 1)",
                self.label_smoothing
            )));
        }
        if !(self.poly_loss.is_finite() && self.poly_loss >= MIN_POLY_LOSS) {
            return Err(TrainError::Config(format!(
                "--poly-loss {} must be a number of at least {MIN_POLY_LOSS}",
                self.poly_loss
            )));
        }
        if let Some(distill) = &self.distill {
            distill.validate()?;
        }
        if let Some(aug) = &self.augment {
            aug.validate()
                .map_err(|e| TrainError::Config(format!("augmentation: {e}")))?;
        }
        Ok(())
    }
}

/// The least Poly-1 weight (`--poly-loss`): at -1 the loss's first term cancels the linear term of
/// cross-entropy's expansion, below it the loss is no longer bounded below by zero.
pub const MIN_POLY_LOSS: f64 = -1.0;

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Where a run writes its outputs by default: `runs/<solution>-<variant>-seed<seed>`.
pub fn default_run_dir(cfg: &TrainConfig) -> PathBuf {
    PathBuf::from("runs").join(format!(
        "{}-{}-{}seed{}",
        cfg.model.solution,
        cfg.model.label(),
        match cfg.dataset {
            Dataset::Mnist => "",
            Dataset::Fashion => "fashion-",
        },
        cfg.seed
    ))
}

//! Short real training runs on the real MNIST files: every model must clearly learn (chance is 10%).
//!
//! The seed variants keep Keras's BatchNorm momentum of 0.99, so their inference-mode statistics need a
//! few hundred steps to catch up: the seed runs use 12,800 images (400 steps).

mod common;

use candle_core::Device;
use mnist_challenge::data::{load_dir, VALIDATION_SIZE};
use mnist_challenge::models::{Solution, Variant};
use mnist_challenge::train::{run_training, LogReporter, TrainConfig};

fn short_run(solution: Solution, variant: Variant, limit: usize, epochs: usize) -> f64 {
    let data = load_dir(&common::mnist_dir(), VALIDATION_SIZE).expect("real MNIST files");
    let mut cfg = TrainConfig::recipe(solution, variant);
    cfg.limit_train = Some(limit);
    cfg.epochs = epochs;
    let out = tempfile::tempdir().unwrap();
    let results = run_training(
        &cfg,
        &data,
        out.path(),
        &Device::Cpu,
        &mut LogReporter::default(),
    )
    .unwrap();
    for f in [
        "model.safetensors",
        "config.json",
        "history.csv",
        "results.json",
    ] {
        assert!(out.path().join(f).is_file(), "{f} missing");
    }
    assert_eq!(results.epochs, epochs);
    results.final_val_accuracy
}

#[test]
fn seed_conv_learns_in_one_short_epoch() {
    let acc = short_run(Solution::Conv, Variant::Seed, 12_800, 1);
    assert!(acc > 0.85, "validation accuracy {acc}");
}

#[test]
fn seed_separable_learns_in_one_short_epoch() {
    let acc = short_run(Solution::Separable, Variant::Seed, 12_800, 1);
    assert!(acc > 0.5, "validation accuracy {acc}");
}

#[test]
fn seed_inception_learns_in_one_short_epoch() {
    let acc = short_run(Solution::Inception, Variant::Seed, 12_800, 1);
    assert!(acc > 0.75, "validation accuracy {acc}");
}

#[test]
fn improved_variants_learn_in_two_short_epochs() {
    for solution in Solution::ALL {
        let acc = short_run(solution, Variant::Improved, 6_400, 2);
        assert!(acc > 0.85, "{solution}: validation accuracy {acc}");
    }
}

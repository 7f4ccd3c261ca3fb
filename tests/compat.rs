//! Run folders written before architectures were data (`tests/fixtures/v0`, see its README) still work:
//! their weights load into the architecture their old `config.json` names and give the same logits,
//! `evaluate` rebuilds them from the folder alone, and their checkpoint resumes to the same weights.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, ModuleT};
use common::{mnist_dir_if_present, run};
use mnist_challenge::data::{load_dir, to_tensor, VALIDATION_SIZE};
use mnist_challenge::models::Classifier;
use mnist_challenge::train::{read_json, TrainConfig};

const MODELS: [(&str, &str); 6] = [
    ("conv", "seed"),
    ("conv", "improved"),
    ("separable", "seed"),
    ("separable", "improved"),
    ("inception", "seed"),
    ("inception", "improved"),
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v0")
        .join(name)
}

#[test]
fn old_run_folders_load_and_give_the_same_logits() {
    let Some(dir) = mnist_dir_if_present() else {
        return;
    };
    let data = load_dir(&dir, VALIDATION_SIZE).unwrap();
    let x = to_tensor(&data.test.images()[..32 * 784], 32, &Device::Cpu).unwrap();
    for (s, v) in MODELS {
        let run_dir = fixture(&format!("{s}-{v}"));
        let cfg: TrainConfig = read_json(&run_dir.join("config.json")).unwrap();
        assert_eq!(cfg.model.label(), v, "{s}-{v}");
        let predictor = Classifier::load(
            cfg.model.clone(),
            &run_dir.join("model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let logits: Vec<Vec<f32>> = predictor
            .net()
            .forward_t(&x, false)
            .unwrap()
            .to_vec2()
            .unwrap();
        let expected: Vec<Vec<f32>> =
            serde_json::from_value(common::read_json(&run_dir.join("logits.json"))).unwrap();
        let worst = logits
            .iter()
            .flatten()
            .zip(expected.iter().flatten())
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        // Kernel changes may reorder sums; anything beyond rounding is a different model.
        assert!(worst <= 1e-5, "{s}-{v}: logits differ by {worst:e}");
    }
}

#[test]
fn evaluate_rebuilds_an_old_run_from_its_folder() {
    let Some(dir) = mnist_dir_if_present() else {
        return;
    };
    let weights = fixture("inception-improved/model.safetensors");
    let out = run(
        "solution-inception",
        &[
            "evaluate",
            "--weights",
            weights.to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["variant"], "improved");
    assert!(json["test_accuracy"].as_f64().unwrap() > 0.1);
}

#[test]
fn an_old_checkpoint_resumes_to_the_same_weights() {
    let Some(dir) = mnist_dir_if_present() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    for f in [
        "config.json",
        "checkpoint.safetensors",
        "history.csv",
        "model.safetensors",
    ] {
        std::fs::copy(fixture("separable-improved").join(f), run_dir.join(f)).unwrap();
    }
    let out = run(
        "solution-separable",
        &[
            "train",
            "--resume",
            run_dir.to_str().unwrap(),
            "--epochs",
            "2",
            "--quiet",
            "--data-dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Equal to the old build's weights within float rounding: bit-exact until the fused separable block
    // (depthwise + pointwise in one op) changed the order of some sums; a misread checkpoint (moments,
    // step, scheduler or RNG state) would be off by far more than 1e-5.
    let load = |p: &Path| -> Vec<(String, Vec<f32>)> {
        let mut t: Vec<_> = candle_core::safetensors::load(p, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let ours = load(&run_dir.join("model.safetensors"));
    let old = load(&fixture(
        "separable-improved/resumed-to-2-epochs.safetensors",
    ));
    assert_eq!(
        ours.iter().map(|t| &t.0).collect::<Vec<_>>(),
        old.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((name, a), (_, b)) in ours.iter().zip(&old) {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-5,
            "{name}: the resumed run's weights differ from those the old build wrote by {diff}"
        );
    }
}

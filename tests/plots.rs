//! The pictures a training run leaves in its folder, a run whose picture cannot be written, and `compare`
//! over the run folders.

mod common;

use std::path::Path;

use common::{run, run_owned, train_args};

fn train(bin: &str, out: &Path, seed: &str) -> std::process::Output {
    run_owned(
        bin,
        &train_args("seed", "1", "2000", out, &["--seed", seed]),
    )
}

/// Decodes `path` as PNG (by content, not by name) and returns its size.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Something was drawn: not a blank canvas.
    let rgb = img.to_rgb8();
    let non_white = rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(
        non_white > 1000,
        "{} is nearly blank ({non_white} drawn pixels)",
        path.display()
    );
    (img.width(), img.height())
}

#[test]
fn training_leaves_curves_confusion_and_mistakes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let out = train("solution-conv", &dir, "1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(png_size(&dir.join("curves.png")), (1000, 420));
    let (w, h) = png_size(&dir.join("confusion.png"));
    assert!(
        (400..=1200).contains(&w) && (400..=1200).contains(&h),
        "confusion.png is {w}x{h}"
    );
    let (w, h) = png_size(&dir.join("mistakes.png"));
    assert!(
        (600..=1200).contains(&w) && (150..=1200).contains(&h),
        "mistakes.png is {w}x{h}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("plot not written"));
}

#[test]
fn a_plot_that_cannot_be_written_does_not_fail_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    // A folder where curves.png should go: the picture cannot be written.
    std::fs::create_dir_all(dir.join("curves.png")).unwrap();
    let out = train("solution-inception", &dir, "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("plot not written") && stderr.contains("curves.png"),
        "no warning: {stderr}"
    );
    assert!(dir.join("model.safetensors").is_file());
    let results = common::read_json(&dir.join("results.json"));
    assert!(
        results["test_accuracy"].as_f64().unwrap() > 0.2,
        "{results}"
    );
    // The other pictures are still made.
    png_size(&dir.join("confusion.png"));
    png_size(&dir.join("mistakes.png"));
}

#[test]
fn compare_summarises_runs_of_several_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    for seed in ["1", "2"] {
        let out = train(
            "solution-inception",
            &runs.join(format!("inception-s{seed}")),
            seed,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let other = tmp.path().join("conv-s1");
    let out = train("solution-conv", &other, "1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A parent folder and a single run, compared by a third binary.
    let args = [
        "compare",
        runs.to_str().unwrap(),
        other.to_str().unwrap(),
        "--json",
    ];
    let out = run("solution-separable", &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["runs"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{v}");
    let accs: Vec<f64> = rows[..2]
        .iter()
        .map(|r| r["test_accuracy"].as_f64().unwrap())
        .collect();
    for r in rows {
        for key in [
            "solution",
            "variant",
            "params",
            "epochs",
            "seed",
            "test_accuracy",
            "seconds_per_epoch",
        ] {
            assert!(r.get(key).is_some(), "row lacks {key}: {r}");
        }
    }
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "only inception ran with two seeds: {v}");
    let g = &groups[0];
    assert_eq!(g["solution"], "inception");
    assert_eq!(g["runs"], 2);
    let mean = (accs[0] + accs[1]) / 2.0;
    let sd = (accs[0] - accs[1]).abs() / 2f64.sqrt();
    assert!((g["mean"].as_f64().unwrap() - mean).abs() < 1e-12, "{g}");
    assert!((g["std"].as_f64().unwrap() - sd).abs() < 1e-12, "{g}");
    assert_eq!(g["min"].as_f64().unwrap(), accs[0].min(accs[1]));

    let out = run("solution-conv", &["compare", runs.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("inception") && text.contains("mean") && text.contains("2 runs"),
        "{text}"
    );

    // A folder without runs is a clear error.
    let out = run(
        "solution-conv",
        &[
            "compare",
            tmp.path().join("conv-s1").join("missing").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
}

//! Fashion-MNIST end to end: each solution trains briefly with `--dataset fashion` (the data found the
//! usual way: `$FASHION_MNIST_DIR`, else Debian's `dataset-fashion-mnist` folder) and learns; `evaluate`
//! reports per-class precision and recall. Skipped with a notice when the files are absent, except under
//! CI (`CI=true`), where their absence is a failure (`.ci/run` installs the package).

mod common;

use std::path::PathBuf;

use common::run;
use mnist_challenge::data::DEBIAN_FASHION_DIR;

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// The folder with the four Fashion-MNIST files, if any.
fn fashion_dir() -> Option<PathBuf> {
    let candidates = std::env::var_os("FASHION_MNIST_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(DEBIAN_FASHION_DIR)]);
    candidates.into_iter().find(|dir| {
        FILES
            .iter()
            .all(|f| dir.join(f).is_file() || dir.join(format!("{f}.gz")).is_file())
    })
}

#[test]
fn all_three_solutions_learn_fashion_mnist() {
    let Some(dir) = fashion_dir() else {
        let msg = format!(
            "Fashion-MNIST files not found in $FASHION_MNIST_DIR or {DEBIAN_FASHION_DIR} \
             (apt-get install dataset-fashion-mnist)"
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("SKIPPED all_three_solutions_learn_fashion_mnist: {msg}");
        return;
    };
    eprintln!("Fashion-MNIST from {}", dir.display());
    let tmp = tempfile::tempdir().unwrap();
    for solution in ["conv", "separable", "inception"] {
        let bin = format!("solution-{solution}");
        let out_dir = tmp.path().join(solution);
        // No --data-dir: the data set is found the way a user's run finds it.
        let out = run(
            &bin,
            &[
                "train",
                "--dataset",
                "fashion",
                "--variant",
                "seed",
                "--epochs",
                "1",
                "--limit-train",
                "6000",
                "--quiet",
                "--out",
                out_dir.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results = common::read_json(&out_dir.join("results.json"));
        assert_eq!(results["dataset"], "fashion", "{bin}");
        let val = results["final_val_accuracy"].as_f64().unwrap();
        let test = results["test_accuracy"].as_f64().unwrap();
        eprintln!("{bin}: fashion val accuracy {val:.4}, test accuracy {test:.4}");
        // Chance is 10%; one short epoch already does far better.
        assert!(
            val > 0.3 && test > 0.3,
            "{bin} did not learn: val {val}, test {test}"
        );
        for png in ["curves.png", "confusion.png", "mistakes.png"] {
            assert!(out_dir.join(png).is_file(), "{bin}: no {png}");
        }

        // evaluate on the Fashion test split agrees with the run, and reports per-class precision/recall.
        let weights = out_dir.join("model.safetensors");
        let out = run(
            &bin,
            &[
                "evaluate",
                "--weights",
                weights.to_str().unwrap(),
                "--dataset",
                "fashion",
                "--json",
            ],
        );
        assert!(
            out.status.success(),
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            (v["test_accuracy"].as_f64().unwrap() - test).abs() < 1e-9,
            "{v}"
        );
        let per_class = v["per_class"].as_array().unwrap();
        assert_eq!(per_class.len(), 10);
        for c in per_class {
            assert!(c["precision"].is_number() && c["recall"].is_number(), "{c}");
        }
        assert_eq!(
            per_class
                .iter()
                .map(|c| c["support"].as_u64().unwrap())
                .sum::<u64>(),
            10_000
        );
    }
}

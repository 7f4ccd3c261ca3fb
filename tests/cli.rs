//! The three binaries end to end: summary, a tiny training run, evaluate, and clear errors.

mod common;

use common::{mnist_dir, run, run_owned, train_args};

fn json(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn summary_json_reports_the_original_parameter_counts() {
    for (bin, total, trainable, non_trainable) in [
        ("solution-conv", 8_640, 8_580, 60),
        ("solution-separable", 4_967, 4_879, 88),
        ("solution-inception", 3_077, 3_077, 0),
    ] {
        let out = run(bin, &["summary", "--variant", "seed", "--json"]);
        assert!(
            out.status.success(),
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json(&out);
        assert_eq!(v["params_total"], total, "{bin}");
        assert_eq!(v["params_trainable"], trainable, "{bin}");
        assert_eq!(v["params_non_trainable"], non_trainable, "{bin}");
    }
    let out = run("solution-conv", &["summary", "--variant", "seed"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Total params: 8,640"), "{text}");
    assert!(text.contains("Non-trainable params: 60"), "{text}");
}

/// Output into a pipe whose reader is gone (`summary --spec | head -1`) ends the command quietly: no
/// panic message from `println!` on the broken pipe.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = std::process::Command::new(common::bin("solution-conv"))
        .args(["summary", "--spec"])
        .stdout(writer)
        .output()
        .expect("run binary");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && err.trim().is_empty(), "{err}");
    assert!(!out.status.success(), "nothing could be written");
}

#[test]
fn train_then_evaluate_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let data = mnist_dir();
    let out = run_owned(
        "solution-conv",
        &train_args(
            "seed",
            "1",
            "2000",
            &run_dir,
            &[
                "--label-smoothing",
                "0.05",
                "--interpolation",
                "nearest",
                "--weight-decay",
                "0.01",
                "--schedule",
                "one-cycle",
                "--warmup-fraction",
                "0.1",
                "--cycle-momentum",
                "--beta2",
                "0.99",
            ],
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("test accuracy"), "{stdout}");
    let config = common::read_json(&run_dir.join("config.json"));
    assert_eq!(config["label_smoothing"].as_f64(), Some(0.05), "{config}");
    assert_eq!(
        config["adam"]["weight_decay"].as_f64(),
        Some(0.01),
        "{config}"
    );
    assert_eq!(config["adam"]["beta2"].as_f64(), Some(0.99), "{config}");
    assert_eq!(config["schedule"]["kind"], "one_cycle", "{config}");
    assert_eq!(
        config["schedule"]["pct_start"].as_f64(),
        Some(0.1),
        "{config}"
    );
    assert_eq!(
        (
            config["schedule"]["cycle_momentum"]["base"].as_f64(),
            config["schedule"]["cycle_momentum"]["max"].as_f64()
        ),
        (Some(0.85), Some(0.95)),
        "{config}"
    );
    // --interpolation turns augmentation on (with the improved recipe's ranges).
    assert_eq!(config["augment"]["interpolation"], "nearest", "{config}");
    assert_eq!(config["augment"]["max_rotation_deg"], 10.0, "{config}");

    let results = common::read_json(&run_dir.join("results.json"));
    for key in [
        "solution",
        "params_total",
        "params_trainable",
        "params_non_trainable",
        "epochs",
        "seed",
        "test_accuracy",
        "test_loss",
        "best_val_accuracy",
        "epoch_seconds",
    ] {
        assert!(results.get(key).is_some(), "results.json lacks {key}");
    }
    let history = std::fs::read_to_string(run_dir.join("history.csv")).unwrap();
    assert!(history.starts_with("epoch,lr,loss,accuracy,val_loss,val_accuracy,seconds\n"));
    assert_eq!(history.lines().count(), 2);

    let weights = run_dir.join("model.safetensors");
    let out = run(
        "solution-conv",
        &[
            "evaluate",
            "--weights",
            weights.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(
        (acc - results["test_accuracy"].as_f64().unwrap()).abs() < 1e-9,
        "{v}"
    );
    assert!(v["test_loss"].as_f64().unwrap() > 0.0);

    // The weights of one solution are refused by another.
    let out = run(
        "solution-separable",
        &[
            "evaluate",
            "--weights",
            weights.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'conv' model"), "{err}");
}

#[test]
fn bad_input_gives_one_clear_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let out = run(
        "solution-conv",
        &["--data-dir", missing.to_str().unwrap(), "--quiet"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nowhere"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    for (flag, value) in [
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--label-smoothing", "1"),
        ("--label-smoothing", "-0.1"),
        ("--interpolation", "cubic"),
        ("--weight-decay", "-0.1"),
        ("--weight-decay", "inf"),
        ("--warmup-fraction", "0"),
        ("--warmup-fraction", "1"),
    ] {
        let out = run("solution-conv", &[flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }

    // The one-cycle schedule's flags without it (the original's plateau rule) are refused by name.
    for flag in [&["--warmup-fraction", "0.1"][..], &["--cycle-momentum"]] {
        let mut args = vec!["--variant", "seed", "--quiet"];
        args.extend_from_slice(flag);
        let out = run("solution-conv", &args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag[0]) && err.contains("plateau"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    let bogus = dir.path().join("model.safetensors");
    std::fs::write(&bogus, b"not a safetensors file").unwrap();
    let data = mnist_dir();
    let out = run(
        "solution-conv",
        &[
            "evaluate",
            "--weights",
            bogus.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

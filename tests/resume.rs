//! Checkpoints and `train --resume`: a run stopped after an epoch (by its own end or by Ctrl-C) and
//! resumed ends with the same weights, bit for bit, and the same history (seconds aside) as a run that
//! was never stopped.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{bin, history, mnist_dir, ok, run, run_owned, tensors, train_args};

const BIN: &str = "solution-conv";
const LIMIT: &str = "2000";

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn train(variant: &str, epochs: &str, out: &Path) -> Output {
    run_owned(BIN, &train_args(variant, epochs, LIMIT, out, &[]))
}

fn resume(dir: &Path, extra: &[&str]) -> Output {
    let data = mnist_dir();
    let mut args = vec![
        "train",
        "--resume",
        path_str(dir),
        "--quiet",
        "--data-dir",
        path_str(&data),
    ];
    args.extend_from_slice(extra);
    run(BIN, &args)
}

fn assert_same_run(a: &Path, b: &Path, epochs: usize) {
    let (ta, tb) = (
        tensors(&a.join("model.safetensors")),
        tensors(&b.join("model.safetensors")),
    );
    assert!(!ta.is_empty());
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, bits) in &ta {
        assert!(
            bits == &tb[name],
            "tensor {name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
    let (ha, hb) = (history(a), history(b));
    assert_eq!(ha.len(), epochs + 1, "{ha:?}");
    assert_eq!(ha, hb);
}

/// Starts a training run that pauses after the checkpoint of its first epoch (the hidden
/// `--pause-after-epoch` hook), sends SIGINT once it says so, and waits for the exit: the signal always
/// arrives between epoch 1 and epoch 2, however fast the machine.
fn train_and_interrupt(variant: &str, epochs: &str, out: &Path) -> Output {
    let mut child = Command::new(bin(BIN))
        .args(train_args(
            variant,
            epochs,
            LIMIT,
            out,
            &["--pause-after-epoch", "1"],
        ))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "the run ended before pausing: {seen}");
        seen.push_str(&line);
        if line.trim() == "paused after epoch 1" {
            break;
        }
    }
    assert!(out.join("checkpoint.safetensors").is_file());
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let mut output = child.wait_with_output().unwrap();
    output.stderr = format!("{seen}{rest}").into_bytes();
    output
}

#[test]
fn one_epoch_then_resume_to_two_matches_two_straight_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let split = tmp.path().join("split");
    // The seed recipe's learning rate does not depend on the number of epochs, so extending is exact.
    ok(&train("seed", "2", &straight), "2 epochs");
    ok(&train("seed", "1", &split), "1 epoch");
    assert_eq!(history(&split).len(), 2);
    let out = resume(&split, &["--epochs", "2"]);
    ok(&out, "resume to 2 epochs");
    assert_same_run(&straight, &split, 2);
    // The run folder now says 2 epochs, so resuming again trains nothing and keeps the weights.
    let config = common::read_json(&split.join("config.json"));
    assert_eq!(config["epochs"], 2);
    let before = tensors(&split.join("model.safetensors"));
    ok(&resume(&split, &[]), "resume a finished run");
    assert_eq!(tensors(&split.join("model.safetensors")), before);
}

#[test]
fn ctrl_c_keeps_the_last_epoch_and_resume_finishes_like_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let killed = tmp.path().join("killed");
    // The improved recipe: one-cycle learning rate per step, augmentation, dropout and BatchNorm.
    ok(&train("improved", "2", &straight), "2 epochs");

    let out = train_and_interrupt("improved", "2", &killed);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let hint = format!("solution-conv train --resume {}", killed.display());
    assert!(err.contains(&hint), "no resume hint in: {err}");
    assert!(err.contains("after 1 of 2 complete epochs"), "{err}");
    assert!(killed.join("checkpoint.safetensors").is_file());
    assert!(
        !killed.join("model.safetensors").exists(),
        "an interrupted run has no final weights"
    );
    assert_eq!(
        history(&killed).len(),
        2,
        "history of the one complete epoch"
    );
    let leftovers: Vec<PathBuf> = std::fs::read_dir(&killed)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let out = resume(&killed, &[]);
    ok(&out, "resume after Ctrl-C");
    assert!(String::from_utf8_lossy(&out.stdout).contains("after 2 epochs"));
    assert_same_run(&straight, &killed, 2);
}

#[test]
fn resume_refuses_changed_settings_and_broken_run_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    ok(&train("seed", "1", &dir), "1 epoch");

    // Flags that change the architecture or the recipe conflict with --resume.
    for flag in [
        &["--variant", "improved"][..],
        &["--lr", "0.1"],
        &["--batch-size", "8"],
        &["--seed", "1"],
        &["--no-augment"],
    ] {
        let out = resume(&dir, flag);
        assert_eq!(out.status.code(), Some(2), "{flag:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot be used with") && err.contains(flag[0]),
            "{flag:?}: {err}"
        );
    }

    // Another solution's binary.
    let data = mnist_dir();
    let out = run(
        "solution-separable",
        &[
            "train",
            "--resume",
            path_str(&dir),
            "--data-dir",
            path_str(&data),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'conv' run") && err.contains("solution-conv train --resume"),
        "{err}"
    );

    // A folder that is no run.
    let out = resume(tmp.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a run folder") && err.contains("config.json"),
        "{err}"
    );

    // A corrupt checkpoint, then none at all.
    let ckpt = dir.join("checkpoint.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 3]).unwrap();
    let out = resume(&dir, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checkpoint.safetensors") && !err.contains("panicked"),
        "{err}"
    );
    std::fs::remove_file(&ckpt).unwrap();
    let out = resume(&dir, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to resume"), "{err}");
}

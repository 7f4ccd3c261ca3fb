//! Bad input of every kind ends the binaries with a clear error and a non-zero exit, never a panic.
//! Broken data folders are built small in a temporary folder.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{Device, Tensor};
use common::{mnist_dir, run};
use mnist_challenge::data::{write_idx_images, write_idx_labels};

const N_TRAIN: usize = 100;
const N_TEST: usize = 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a failed run: the exit code, no panic or backtrace, one `error:` line, and every needle in it.
fn fails(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    if code != 2 {
        let lines: Vec<_> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "expected one error line: {err}");
    }
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    err
}

/// A valid, small data folder (`.gz` files): 100 training and 20 test images.
fn data_folder(root: &Path) -> PathBuf {
    let dir = root.join("data");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, n) in [("train", N_TRAIN), ("t10k", N_TEST)] {
        let images: Vec<u8> = (0..n * 784).map(|i| (i % 251) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        write_idx_images(
            &dir.join(format!("{name}-images-idx3-ubyte.gz")),
            &images,
            28,
            28,
        )
        .unwrap();
        write_idx_labels(&dir.join(format!("{name}-labels-idx1-ubyte.gz")), &labels).unwrap();
    }
    dir
}

fn train_on(dir: &Path, out: &Path) -> Output {
    run(
        "solution-conv",
        &[
            "train",
            "--quiet",
            "--epochs",
            "1",
            "--data-dir",
            s(dir),
            "--out",
            s(out),
        ],
    )
}

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";

#[test]
fn missing_or_unusable_data_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let missing = tmp.path().join("nowhere");
    fails(&train_on(&missing, &out), 1, &["nowhere"]);

    // A regular file where the folder should be (as root, permissions cannot make a folder unreadable).
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    fails(&train_on(&file, &out), 1, &["a-file", "must be a folder"]);

    // A folder with one of the four files missing.
    let dir = data_folder(tmp.path());
    std::fs::remove_file(dir.join(TRAIN_LABELS)).unwrap();
    fails(
        &train_on(&dir, &out),
        1,
        &["train-labels-idx1-ubyte not found"],
    );
}

#[test]
fn truncated_empty_and_corrupt_gzip() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dir = data_folder(tmp.path());
    let path = dir.join(TRAIN_IMAGES);
    let good = std::fs::read(&path).unwrap();

    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    fails(&train_on(&dir, &out), 1, &[TRAIN_IMAGES]);

    std::fs::write(&path, b"").unwrap();
    fails(&train_on(&dir, &out), 1, &[TRAIN_IMAGES, "is empty"]);

    let mut corrupt = good[..10].to_vec();
    corrupt.extend_from_slice(b"this is not a deflate stream at all, just text");
    std::fs::write(&path, &corrupt).unwrap();
    fails(&train_on(&dir, &out), 1, &[TRAIN_IMAGES, "corrupt gzip"]);

    // A valid gzip stream of nothing.
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::fs::write(&path, enc.finish().unwrap()).unwrap();
    fails(&train_on(&dir, &out), 1, &[TRAIN_IMAGES, "is empty"]);

    // A truncated IDX payload inside a valid gzip stream.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 100, 0, 0, 0, 28, 0, 0, 0, 28];
    idx.extend(std::iter::repeat_n(7u8, 784 * 3));
    enc.write_all(&idx).unwrap();
    std::fs::write(&path, enc.finish().unwrap()).unwrap();
    fails(&train_on(&dir, &out), 1, &[TRAIN_IMAGES, "truncated"]);
    assert!(
        !out.join("config.json").exists(),
        "nothing is written before the data is valid"
    );
}

#[test]
fn wrong_magic_counts_labels_and_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dir = data_folder(tmp.path());
    let images: Vec<u8> = vec![0; N_TRAIN * 784];
    let labels: Vec<u8> = (0..N_TRAIN).map(|i| (i % 10) as u8).collect();

    // A label file where the images should be.
    write_idx_labels(&dir.join(TRAIN_IMAGES), &labels).unwrap();
    fails(
        &train_on(&dir, &out),
        1,
        &[TRAIN_IMAGES, "bad IDX magic", "0x00000803", "0x00000801"],
    );
    write_idx_images(&dir.join(TRAIN_IMAGES), &images, 28, 28).unwrap();

    write_idx_labels(&dir.join(TRAIN_LABELS), &labels[..N_TRAIN - 1]).unwrap();
    fails(&train_on(&dir, &out), 1, &["holds 100 images", "99 labels"]);

    let mut bad = labels.clone();
    bad[17] = 12;
    write_idx_labels(&dir.join(TRAIN_LABELS), &bad).unwrap();
    fails(
        &train_on(&dir, &out),
        1,
        &[TRAIN_LABELS, "label #17 is 12", "0..=9"],
    );
    write_idx_labels(&dir.join(TRAIN_LABELS), &labels).unwrap();

    write_idx_images(&dir.join(TRAIN_IMAGES), &vec![0; N_TRAIN * 27 * 27], 27, 27).unwrap();
    fails(&train_on(&dir, &out), 1, &[TRAIN_IMAGES, "27x27", "28x28"]);
    write_idx_images(&dir.join(TRAIN_IMAGES), &images, 28, 28).unwrap();

    // Valid files, but fewer training images than the 6,000 held out for validation.
    fails(
        &train_on(&dir, &out),
        1,
        &["validation size 6000", "100 training examples"],
    );
}

#[test]
fn bad_weights_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_dir();
    let eval = |bin: &str, weights: &Path, extra: &[&str]| {
        let mut args = vec!["evaluate", "--weights", s(weights), "--data-dir", s(&data)];
        args.extend_from_slice(extra);
        run(bin, &args)
    };

    let missing = tmp.path().join("missing.safetensors");
    fails(
        &eval("solution-conv", &missing, &[]),
        1,
        &["missing.safetensors", "no such file"],
    );

    let corrupt = tmp.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage").unwrap();
    fails(
        &eval("solution-conv", &corrupt, &[]),
        1,
        &["corrupt.safetensors"],
    );

    // Only one of the model's tensors.
    let partial = tmp.path().join("partial.safetensors");
    let one = std::collections::HashMap::from([(
        "conv1.weight".to_string(),
        Tensor::zeros((8, 1, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&one, &partial).unwrap();
    fails(
        &eval("solution-conv", &partial, &[]),
        1,
        &["partial.safetensors", "this solution and variant"],
    );

    // Real weights of the conv seed model, refused by another solution and by another variant.
    let run_dir = tmp.path().join("run");
    let out = run(
        "solution-conv",
        &[
            "train",
            "--variant",
            "seed",
            "--epochs",
            "1",
            "--limit-train",
            "300",
            "--quiet",
            "--data-dir",
            s(&data),
            "--out",
            s(&run_dir),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weights = run_dir.join("model.safetensors");
    fails(
        &eval("solution-separable", &weights, &[]),
        1,
        &["'conv' model", "use solution-conv"],
    );
    fails(
        &eval("solution-conv", &weights, &["--variant", "improved"]),
        1,
        &["the model is 'seed'", "--variant improved"],
    );
    // Without config.json beside it, the file itself is checked against the model.
    let lone = tmp.path().join("lone.safetensors");
    std::fs::copy(&weights, &lone).unwrap();
    fails(
        &eval("solution-conv", &lone, &["--variant", "improved"]),
        1,
        &["lone.safetensors"],
    );
    fails(
        &eval("solution-inception", &lone, &["--variant", "seed"]),
        1,
        &["lone.safetensors"],
    );
    // Weights with a NaN or an infinity are refused, naming the tensor (evaluate and predict).
    for (bad, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let dir = tmp.path().join(format!("broken-{what}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(run_dir.join("config.json"), dir.join("config.json")).unwrap();
        let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        let dense = tensors.get("dense.bias").unwrap();
        let mut v: Vec<f32> = dense.to_vec1().unwrap();
        v[3] = bad;
        tensors.insert("dense.bias".into(), Tensor::new(v, &Device::Cpu).unwrap());
        let broken = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &broken).unwrap();
        fails(
            &eval("solution-conv", &broken, &[]),
            1,
            &["model.safetensors", "tensor 'dense.bias'", what],
        );
        let png = tmp.path().join("digit.png");
        image::GrayImage::from_fn(28, 28, |x, y| {
            image::Luma([if (10..18).contains(&x) && y > 4 {
                255
            } else {
                0
            }])
        })
        .save(&png)
        .unwrap();
        fails(
            &run(
                "solution-conv",
                &["predict", "--weights", s(&broken), s(&png)],
            ),
            1,
            &["tensor 'dense.bias'", what],
        );
    }
}

#[test]
fn invalid_flag_values() {
    for (args, needle) in [
        (&["--epochs", "0"][..], "--epochs"),
        (&["--epochs=-1"], "--epochs"),
        (&["--epochs", "-1"], "--epochs"),
        (&["--batch-size", "-4"], "--batch-size"),
        (&["--lr", "-0.1"], "--lr"),
        (&["--limit-train", "-5"], "--limit-train"),
        (&["--epochs", "ten"], "--epochs"),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--lr", "0"], "--lr"),
        (&["--lr=-1"], "--lr"),
        (&["--lr", "nan"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--lr", "fast"], "--lr"),
        (&["--limit-train", "0"], "--limit-train"),
        (&["--plateau-factor", "0"], "--plateau-factor"),
        (&["--variant", "best"], "--variant"),
        (&["--dataset", "cifar"], "--dataset"),
    ] {
        let mut full = vec!["train"];
        full.extend_from_slice(args);
        let out = run("solution-conv", &full);
        fails(&out, 2, &[needle]);
    }
    // --plateau-factor below 1 parses but is refused before any work.
    let out = run(
        "solution-conv",
        &[
            "train",
            "--plateau-factor",
            "0.5",
            "--data-dir",
            "/nonexistent",
        ],
    );
    fails(&out, 1, &["--plateau-factor must be at least 1"]);

    // More training images than the data has.
    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_dir();
    let out = run(
        "solution-conv",
        &[
            "train",
            "--quiet",
            "--limit-train",
            "100000",
            "--data-dir",
            s(&data),
            "--out",
            s(&tmp.path().join("out")),
        ],
    );
    fails(&out, 1, &["--limit-train 100000", "54000 training images"]);
}

#[test]
fn output_folder_that_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("somefile");
    std::fs::write(&file, b"x").unwrap();
    let data = mnist_dir();
    let out = run(
        "solution-conv",
        &[
            "train",
            "--quiet",
            "--epochs",
            "1",
            "--limit-train",
            "100",
            "--data-dir",
            s(&data),
            "--out",
            s(&file.join("sub")),
        ],
    );
    fails(&out, 1, &["somefile"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn diverging_loss_stops_with_epoch_and_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let data = mnist_dir();
    let out = run(
        "solution-conv",
        &[
            "train",
            "--variant",
            "seed",
            "--quiet",
            "--epochs",
            "2",
            "--limit-train",
            "500",
            "--lr",
            "1e30",
            "--data-dir",
            s(&data),
            "--out",
            s(&dir),
        ],
    );
    let err = fails(
        &out,
        1,
        &[
            "loss became",
            "at epoch 1, batch",
            "lower the learning rate",
        ],
    );
    assert!(!err.contains("interrupted"), "{err}");
    // Nothing good was reached: no checkpoint and no final weights.
    assert!(!dir.join("checkpoint.safetensors").exists());
    assert!(!dir.join("model.safetensors").exists());
}

#[test]
fn output_folder_holding_another_run_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let args = |epochs: &str, extra: &[&str]| common::train_args("seed", epochs, "64", &dir, extra);
    let first = common::run_owned("solution-conv", &args("1", &[]));
    assert!(first.status.success(), "{first:?}");
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();

    // The same settings again: allowed (training is deterministic), the same weights come out.
    let again = common::run_owned("solution-conv", &args("1", &[]));
    assert!(again.status.success(), "{again:?}");
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );

    // Other settings: refused, nothing touched.
    let other = common::run_owned("solution-conv", &args("2", &[]));
    fails(
        &other,
        1,
        &["holds a run with other settings", "--overwrite", "--resume"],
    );
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );

    // An unfinished run (checkpoint, no results): refused, the checkpoint kept for --resume.
    std::fs::remove_file(dir.join("results.json")).unwrap();
    let checkpoint = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    let unfinished = common::run_owned("solution-conv", &args("1", &[]));
    fails(
        &unfinished,
        1,
        &["holds an unfinished run", "train --resume"],
    );
    assert_eq!(
        std::fs::read(dir.join("checkpoint.safetensors")).unwrap(),
        checkpoint
    );

    // --overwrite starts again there.
    let forced = common::run_owned("solution-conv", &args("2", &["--overwrite"]));
    assert!(forced.status.success(), "{forced:?}");
    assert!(dir.join("results.json").exists());
}

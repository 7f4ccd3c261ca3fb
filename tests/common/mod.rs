//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The real MNIST folder: `$MNIST_DIR`, else `../shared/data/mnist` beside the checkout.
pub fn mnist_dir() -> PathBuf {
    match std::env::var_os("MNIST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist"),
    }
}

/// The real MNIST folder if it is there. Absent, the caller skips its test with a notice, except under
/// CI (`CI=true`), where a missing data folder fails the test.
pub fn mnist_dir_if_present() -> Option<PathBuf> {
    let dir = mnist_dir();
    if dir.is_dir() {
        return Some(dir);
    }
    let msg = format!("no MNIST files at {} (set MNIST_DIR)", dir.display());
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
    eprintln!("SKIPPED: {msg}");
    None
}

/// The path of a workspace binary (built by `cargo test --workspace`), next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build --release --workspace` before `cargo test --release --workspace`",
        path.display()
    );
    path
}

/// A JSON file a run wrote (`config.json`, `results.json`), parsed; panics naming the file otherwise.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Runs a solution binary with arguments, without a terminal.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run binary")
}

/// The arguments of a short `train` run on the real MNIST files: `variant`, `epochs` epochs on the first
/// `limit` training images, no progress bar, into `out`; `extra` flags are appended.
pub fn train_args(
    variant: &str,
    epochs: &str,
    limit: &str,
    out: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--variant",
        variant,
        "--epochs",
        epochs,
        "--limit-train",
        limit,
        "--quiet",
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(mnist_dir().to_string_lossy().into_owned());
    args.push("--out".into());
    args.push(out.to_string_lossy().into_owned());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs a solution binary with owned arguments (see [`train_args`]).
pub fn run_owned(name: &str, args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(name, &refs)
}

/// Asserts that a command succeeded, with its stderr in the message.
pub fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every tensor of a safetensors file as raw bits.
pub fn tensors(path: &Path) -> BTreeMap<String, Vec<u32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (name, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// history.csv without its last column (seconds).
pub fn history(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("history.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The real MNIST folder: `$MNIST_DIR`, else `../shared/data/mnist` beside the checkout.
pub fn mnist_dir() -> PathBuf {
    match std::env::var_os("MNIST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist"),
    }
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

/// Runs a solution binary with arguments, without a terminal.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run binary")
}

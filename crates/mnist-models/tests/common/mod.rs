//! Helpers shared by this crate's integration tests.

use std::path::PathBuf;

/// The real MNIST files from `$MNIST_DIR` (54,000 / 6,000 / 10,000). Without `MNIST_DIR` the test is
/// skipped with a notice (`None`), except under CI, where it fails.
pub fn mnist() -> Option<mnist_data::Mnist> {
    let Some(dir) = std::env::var_os("MNIST_DIR") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "MNIST_DIR is not set (CI needs the MNIST files)"
        );
        eprintln!("SKIPPED: set MNIST_DIR to the folder of the MNIST files");
        return None;
    };
    Some(mnist_data::load_dir(&PathBuf::from(dir), mnist_data::VALIDATION_SIZE).expect("MNIST"))
}

//! Runs `examples/classify.rs` (built by `cargo test` beside the tests) on real MNIST test digits saved
//! as PNG files, as a user of this crate would.

mod common;

use std::path::PathBuf;
use std::process::Command;

use mnist_data::IMAGE_SIDE;

/// The example's executable: `target/<profile>/examples/classify`, beside this test's `deps` folder.
fn example_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    profile_dir
        .join("examples")
        .join(format!("classify{}", std::env::consts::EXE_SUFFIX))
}

#[test]
fn the_example_classifies_png_files() {
    let Some(data) = common::mnist() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let n = 20;
    let mut files = Vec::new();
    for i in 0..n {
        let side = IMAGE_SIDE as u32;
        let img = image::GrayImage::from_raw(side, side, data.test.image(i).to_vec()).unwrap();
        // A bigger picture, as a photo or drawing would be: the example's preprocessing fits it back.
        let big = image::imageops::resize(&img, 112, 112, image::imageops::FilterType::Triangle);
        let path = tmp.path().join(format!("digit-{i}.png"));
        big.save(&path).unwrap();
        files.push(path);
    }
    let exe = example_exe();
    assert!(
        exe.is_file(),
        "{} is missing (cargo test builds the examples)",
        exe.display()
    );
    let out = Command::new(&exe).args(&files).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), n, "{stdout}");
    let right = lines
        .iter()
        .enumerate()
        .filter(|(i, line)| {
            let digit = line.rsplit(": ").next().and_then(|r| r.split(' ').next());
            digit == Some(data.test.label(*i).to_string().as_str())
        })
        .count();
    assert!(right >= n - 1, "{right} of {n} right:\n{stdout}");
}

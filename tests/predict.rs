//! `predict` end to end: a short training run, real test digits saved as image files of other sizes,
//! inverted, and as colour JPEG, classified through the binary; broken files give per-file errors.

mod common;

use std::path::{Path, PathBuf};

use common::{mnist_dir, run, run_owned, train_args};
use image::imageops::FilterType;
use image::{GrayImage, Luma, Rgb, RgbImage};
use mnist_challenge::data::DataSource;

/// The 28x28 test digit `i` as a grey image (light ink on black, like MNIST).
fn digit(images: &[u8], i: usize) -> GrayImage {
    GrayImage::from_raw(28, 28, images[i * 784..(i + 1) * 784].to_vec()).unwrap()
}

/// Saves test digit `i` in one of four forms, chosen by `i % 4`:
/// 56x56 PNG; 100x80 PNG (the digit at 70x70 on a wider black canvas); 84x84 PNG dark on light;
/// 112x112 RGB JPEG, dark blue ink on a cream page.
fn save_form(img: &GrayImage, i: usize, dir: &Path) -> PathBuf {
    match i % 4 {
        0 => {
            let path = dir.join(format!("d{i}-56.png"));
            image::imageops::resize(img, 56, 56, FilterType::Triangle)
                .save(&path)
                .unwrap();
            path
        }
        1 => {
            let path = dir.join(format!("d{i}-100x80.png"));
            let big = image::imageops::resize(img, 70, 70, FilterType::Triangle);
            let mut canvas = GrayImage::new(100, 80);
            image::imageops::overlay(&mut canvas, &big, 20, 5);
            canvas.save(&path).unwrap();
            path
        }
        2 => {
            let path = dir.join(format!("d{i}-inverted.png"));
            let mut big = image::imageops::resize(img, 84, 84, FilterType::Triangle);
            image::imageops::invert(&mut big);
            big.save(&path).unwrap();
            path
        }
        _ => {
            let path = dir.join(format!("d{i}-colour.jpg"));
            let big = image::imageops::resize(img, 112, 112, FilterType::Triangle);
            let page = [250.0, 240.0, 210.0];
            let ink = [20.0, 30.0, 120.0];
            let rgb = RgbImage::from_fn(112, 112, |x, y| {
                let a = big.get_pixel(x, y).0[0] as f32 / 255.0;
                Rgb(std::array::from_fn(|c| {
                    (page[c] * (1.0 - a) + ink[c] * a).round() as u8
                }))
            });
            rgb.save(&path).unwrap();
            path
        }
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn predict_classifies_image_files_and_reports_broken_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_dir();
    let run_dir = tmp.path().join("run");
    let out = run_owned(
        "solution-conv",
        &train_args("seed", "2", "8000", &run_dir, &[]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weights = run_dir.join("model.safetensors");

    let mnist = DataSource {
        dir: Some(data.clone()),
        ..DataSource::default()
    }
    .load()
    .unwrap();
    let n = 32;
    let images_dir = tmp.path().join("images");
    std::fs::create_dir_all(&images_dir).unwrap();
    let mut files: Vec<PathBuf> = (0..n)
        .map(|i| save_form(&digit(mnist.test.images(), i), i, &images_dir))
        .collect();
    let labels: Vec<u8> = mnist.test.labels()[..n].to_vec();

    // A text file named like an image, and a PNG cut in half.
    let text = images_dir.join("notes.png");
    std::fs::write(&text, "this is not an image\n").unwrap();
    let whole = std::fs::read(&files[0]).unwrap();
    let truncated = images_dir.join("truncated.png");
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    files.insert(5, text.clone());
    files.push(truncated.clone());

    let mut args = vec!["predict", "--weights", weights.to_str().unwrap(), "--json"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    let out = run("solution-conv", &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "any failed file means exit 1: {stderr}"
    );
    assert!(
        stderr.contains("2 of 34 files could not be classified"),
        "{stderr}"
    );

    let list = json(&out);
    let list = list.as_array().expect("a JSON list");
    assert_eq!(list.len(), files.len(), "one object per file, in order");
    let mut right = 0;
    let mut wrong = Vec::new();
    let mut k = 0;
    for (entry, file) in list.iter().zip(&files) {
        assert_eq!(entry["file"], file.to_str().unwrap());
        if *file == text || *file == truncated {
            let err = entry["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error for {file:?}: {entry}"));
            assert!(err.contains("not a readable PNG or JPEG"), "{err}");
            assert!(entry.get("digit").is_none());
            continue;
        }
        let digit = entry["digit"]
            .as_u64()
            .unwrap_or_else(|| panic!("no digit: {entry}"));
        let probs: Vec<f64> = entry["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap())
            .collect();
        assert_eq!(probs.len(), 10);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{probs:?}");
        let best = (0..10)
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
            .unwrap();
        assert_eq!(best as u64, digit);
        if digit == labels[k] as u64 {
            right += 1;
        } else {
            wrong.push(format!(
                "{} (true {}, predicted {digit})",
                file.display(),
                labels[k]
            ));
        }
        k += 1;
    }
    assert_eq!(k, n);
    eprintln!("{right} of {n} converted image files classified right");
    // The model reaches about 95% on the test split; the converted files should do about as well.
    assert!(
        right * 100 >= n * 80,
        "only {right} of {n} files classified right; wrong: {wrong:#?}"
    );

    // Text output, all files good: exit 0 and one line per file with the top classes.
    let good: Vec<&str> = files[..4].iter().map(|f| f.to_str().unwrap()).collect();
    let mut args = vec![
        "predict",
        "--weights",
        weights.to_str().unwrap(),
        "--top",
        "2",
    ];
    args.extend(&good);
    let out = run("solution-conv", &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for (line, file) in lines.iter().zip(&good) {
        assert!(line.starts_with(&format!("{file}: ")), "{line}");
        assert_eq!(line.matches('%').count(), 2, "top 2: {line}");
    }

    // The weights of one solution are refused by another.
    let out = run(
        "solution-inception",
        &["predict", "--weights", weights.to_str().unwrap(), good[0]],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'conv' model"));
}

#[test]
fn preprocessing_keeps_real_digits_recognisable() {
    // The library conversion of a real digit blown up to 3x is close to the original 28x28 digit.
    let mnist = DataSource {
        dir: Some(mnist_dir()),
        ..DataSource::default()
    }
    .load()
    .unwrap();
    let mut total = 0.0;
    for i in 0..50 {
        let img = digit(mnist.test.images(), i);
        let big = image::imageops::resize(&img, 84, 84, FilterType::Triangle);
        let back = mnist_challenge::data::to_mnist(&image::DynamicImage::ImageLuma8(big)).unwrap();
        let orig = mnist.test.image(i);
        let diff: f64 = orig
            .iter()
            .zip(&back)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum::<f64>()
            / 784.0;
        total += diff;
        assert!(
            diff < 40.0,
            "digit {i}: mean |difference| {diff:.1} grey levels"
        );
    }
    let mean = total / 50.0;
    assert!(
        mean < 20.0,
        "mean |difference| {mean:.1} grey levels over 50 digits"
    );
    // A blank picture is refused, not classified.
    let blank = image::DynamicImage::ImageLuma8(GrayImage::from_pixel(40, 40, Luma([30])));
    assert!(mnist_challenge::data::to_mnist(&blank).is_err());
}

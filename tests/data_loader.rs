//! The data crate end to end: the real MNIST files, and broken files through `load_dir`.

mod common;

use std::path::Path;

use candle_core::Device;
use mnist_challenge::data::{
    batches, epoch_rng, load_dir, write_idx_images, write_idx_labels, AugmentConfig, BatcherConfig,
    DataError, DataSource, Dataset, Mnist, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS,
    VALIDATION_SIZE,
};

fn load_real() -> Option<Mnist> {
    let dir = common::mnist_dir_if_present()?;
    let src = DataSource {
        dir: Some(dir),
        dataset: Dataset::Mnist,
    };
    Some(src.load().unwrap())
}

#[test]
fn real_mnist_counts_splits_and_labels() {
    let Some(m) = load_real() else { return };
    assert_eq!(m.train.len() + m.val.len(), 60_000);
    assert_eq!(m.train.len(), 54_000);
    assert_eq!(m.val.len(), VALIDATION_SIZE);
    assert_eq!(m.test.len(), 10_000);
    assert_eq!(m.train.images().len(), 54_000 * 784);
    // The well-known first examples.
    assert_eq!(m.train.label(0), 5);
    assert_eq!(m.test.label(0), 7);
    // Pixels span the full range and digits are mostly background.
    let first = m.train.image(0);
    assert_eq!(first.iter().max(), Some(&255));
    let ink = first.iter().filter(|&&p| p > 0).count();
    assert!(
        (50..400).contains(&ink),
        "first image has {ink} non-zero pixels"
    );
    for (name, split) in [("train", &m.train), ("val", &m.val), ("test", &m.test)] {
        let counts = split.class_counts();
        for (class, &c) in counts.iter().enumerate() {
            let share = c as f64 / split.len() as f64;
            assert!(
                (0.05..=0.15).contains(&share),
                "{name}: class {class} is {:.1}% of the split",
                share * 100.0
            );
        }
    }
    // load_dir with another validation size agrees with the default split.
    let dir = common::mnist_dir_if_present().unwrap();
    let all = load_dir(&dir, 0).unwrap();
    assert_eq!(all.train.len(), 60_000);
    assert_eq!(&all.train.images()[54_000 * 784..], m.val.images());
    assert_eq!(all.test, m.test);
}

#[test]
fn real_mnist_augmented_epoch_is_fast_and_complete() {
    let Some(m) = load_real() else { return };
    let cfg = BatcherConfig {
        batch_size: 128,
        shuffle: true,
        augment: Some(AugmentConfig {
            max_rotation_deg: 10.0,
            max_shift_px: 2.0,
            scale_range: (0.9, 1.1),
            ..Default::default()
        }),
        drop_last: false,
    };
    let mut rng = epoch_rng(1, 1, 0);
    let it = batches(&m.train, &cfg, Some(&mut rng), &Device::Cpu).unwrap();
    assert_eq!(it.num_batches(), 54_000usize.div_ceil(128));
    let mut seen = 0;
    let mut histogram = [0usize; 10];
    for b in it {
        let b = b.unwrap();
        assert_eq!(b.images.dims()[1..], [1, 28, 28]);
        seen += b.len();
        for &l in &b.labels_u8 {
            histogram[l as usize] += 1;
        }
    }
    assert_eq!(seen, 54_000);
    assert_eq!(histogram, m.train.class_counts());
}

/// Writes a small valid set (train 12, test 5), gzipped or raw.
fn write_valid(dir: &Path, gz: bool) {
    let ext = if gz { ".gz" } else { "" };
    for (img, lab, n) in [
        (TRAIN_IMAGES, TRAIN_LABELS, 12),
        (TEST_IMAGES, TEST_LABELS, 5),
    ] {
        let images: Vec<u8> = (0..n * 784).map(|i| (i % 251) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        write_idx_images(&dir.join(format!("{img}{ext}")), &images, 28, 28).unwrap();
        write_idx_labels(&dir.join(format!("{lab}{ext}")), &labels).unwrap();
    }
}

/// Runs `load_dir` on a fresh valid set broken by `breaker`, returning the error.
fn broken(gz: bool, breaker: impl FnOnce(&Path)) -> DataError {
    let tmp = tempfile::tempdir().unwrap();
    write_valid(tmp.path(), gz);
    assert!(load_dir(tmp.path(), 2).is_ok());
    breaker(tmp.path());
    let err = load_dir(tmp.path(), 2).unwrap_err();
    eprintln!("{err}");
    err
}

fn assert_names(err: &DataError, file: &str) {
    let msg = err.to_string();
    assert!(msg.contains(file), "error does not name {file}: {msg}");
}

#[test]
fn broken_files_end_to_end() {
    // Truncated raw images.
    let err = broken(false, |d| {
        let p = d.join(TRAIN_IMAGES);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    });
    assert!(
        matches!(err, DataError::Truncated { expected, found, .. } if expected == 16 + 12 * 784 && found == expected - 100)
    );
    assert_names(&err, TRAIN_IMAGES);

    // Count mismatch between gzipped images and labels (a valid label file of 6 for 5 images).
    let err = broken(true, |d| {
        write_idx_labels(&d.join("tmp.gz"), &[1; 6]).unwrap();
        std::fs::rename(d.join("tmp.gz"), d.join(format!("{TEST_LABELS}.gz"))).unwrap();
    });
    assert!(
        matches!(
            err,
            DataError::CountMismatch {
                images: 5,
                labels: 6,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, TEST_LABELS);
    assert_names(&err, TEST_IMAGES);
    let err = broken(false, |d| {
        let p = d.join(TEST_LABELS);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.push(3);
        std::fs::write(&p, bytes).unwrap();
    });
    assert!(
        matches!(err, DataError::TrailingBytes { extra: 1, .. }),
        "{err}"
    );
    assert_names(&err, TEST_LABELS);

    // Trailing bytes inside a gzip stream.
    let err = broken(true, |d| {
        let p = d.join(format!("{TRAIN_LABELS}.gz"));
        let mut raw = 0x801u32.to_be_bytes().to_vec();
        raw.extend_from_slice(&12u32.to_be_bytes());
        raw.extend_from_slice(&[1; 12 + 3]);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &raw).unwrap();
        std::fs::write(&p, enc.finish().unwrap()).unwrap();
    });
    assert!(
        matches!(
            err,
            DataError::TrailingBytes {
                expected: 20,
                extra: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, TRAIN_LABELS);

    // Wrong magic: labels where images should be.
    let err = broken(false, |d| {
        std::fs::copy(d.join(TRAIN_LABELS), d.join(TRAIN_IMAGES)).unwrap();
    });
    assert!(
        matches!(
            err,
            DataError::BadMagic {
                expected: 0x803,
                found: 0x801,
                ..
            }
        ),
        "{err}"
    );

    // Label 10 in the training labels.
    let err = broken(true, |d| {
        let mut labels = vec![0u8; 12];
        labels[7] = 10;
        write_idx_labels(&d.join(format!("{TRAIN_LABELS}.gz")), &labels).unwrap();
    });
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                index: 7,
                label: 10,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, TRAIN_LABELS);

    // 27x28 images.
    let err = broken(true, |d| {
        write_idx_images(
            &d.join(format!("{TEST_IMAGES}.gz")),
            &vec![0; 5 * 27 * 28],
            27,
            28,
        )
        .unwrap();
    });
    assert!(
        matches!(
            err,
            DataError::BadDims {
                rows: 27,
                cols: 28,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("27x28"));

    // Empty file.
    let err = broken(false, |d| std::fs::write(d.join(TEST_IMAGES), b"").unwrap());
    assert!(matches!(err, DataError::Empty { .. }), "{err}");
    assert_names(&err, TEST_IMAGES);

    // Corrupt gzip (cut in half).
    let err = broken(true, |d| {
        let p = d.join(format!("{TRAIN_IMAGES}.gz"));
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(matches!(err, DataError::Gzip { .. }), "{err}");
    assert_names(&err, TRAIN_IMAGES);

    // Missing file.
    let err = broken(true, |d| {
        std::fs::remove_file(d.join(format!("{TRAIN_LABELS}.gz"))).unwrap()
    });
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert_names(&err, TRAIN_LABELS);

    // An explicit --data-dir that is unusable is an error, not a fallback.
    let tmp = tempfile::tempdir().unwrap();
    let src = DataSource {
        dir: Some(tmp.path().to_path_buf()),
        dataset: Dataset::Mnist,
    };
    assert!(matches!(src.resolve(), Err(DataError::Missing { .. })));
}

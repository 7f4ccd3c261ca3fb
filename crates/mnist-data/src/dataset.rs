//! Validated in-memory data: [`Split`], [`Mnist`] and [`load_dir`], which finds and checks the four files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::idx::{read_idx_images, read_idx_labels};
use crate::{IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES};

/// Which data set: the digits, or Zalando's drop-in Fashion-MNIST (same file names and format).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    /// The hand-written digits.
    #[default]
    Mnist,
    /// Fashion-MNIST (clothing, 10 classes).
    Fashion,
}

impl Dataset {
    /// The lowercase name, used on the command line, in serde and for the cache folder.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Mnist => "mnist",
            Dataset::Fashion => "fashion",
        }
    }

    /// The environment variable naming a folder with this data set's four files.
    pub fn env_var(self) -> &'static str {
        match self {
            Dataset::Mnist => "MNIST_DIR",
            Dataset::Fashion => "FASHION_MNIST_DIR",
        }
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dataset {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mnist" => Ok(Dataset::Mnist),
            "fashion" | "fashion-mnist" | "fashion_mnist" => Ok(Dataset::Fashion),
            _ => Err(DataError::UnknownDataset(s.to_string())),
        }
    }
}

/// One split of the data: `n` images of 28x28 `u8` pixels (row-major, 0..=255) and `n` labels in 0..=9.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl Split {
    /// Builds a split from raw parts, checking `images.len() == labels.len() * 784` and every label <= 9.
    pub fn from_parts(images: Vec<u8>, labels: Vec<u8>) -> Result<Split> {
        let expected = labels.len().checked_mul(IMAGE_PIXELS);
        if expected != Some(images.len()) {
            return Err(DataError::SplitMismatch {
                image_bytes: images.len(),
                labels: labels.len(),
                expected: expected.unwrap_or(usize::MAX),
            });
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= NUM_CLASSES)
        {
            return Err(DataError::LabelOutOfRange {
                path: PathBuf::from("<memory>"),
                index,
                label,
            });
        }
        Ok(Split { images, labels })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the split holds no example.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 784 pixels of image `i`. Panics if `i >= self.len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
    }

    /// The label of example `i`. Panics if `i >= self.len()`, like slice indexing.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// All pixels, `len() * 784` bytes.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// All labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// A copy of the first `n` examples (all of them when `n >= len()`).
    pub fn take(&self, n: usize) -> Split {
        self.range(0, n)
    }

    /// A copy of examples `start..end`, both clamped to `len()`.
    pub fn range(&self, start: usize, end: usize) -> Split {
        let end = end.min(self.len());
        let start = start.min(end);
        Split {
            images: self.images[start * IMAGE_PIXELS..end * IMAGE_PIXELS].to_vec(),
            labels: self.labels[start..end].to_vec(),
        }
    }

    /// Number of examples of each class.
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut counts = [0; NUM_CLASSES];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// The three splits: `train` is the first `60_000 - validation` examples of the training file, `val` the
/// last `validation` of it (Keras' `validation_split` convention), `test` the 10,000 test examples.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mnist {
    /// Training examples.
    pub train: Split,
    /// Held-out examples from the end of the training file.
    pub val: Split,
    /// The official test set.
    pub test: Split,
}

/// The canonical (hyphenated, uncompressed) names of the four files.
pub const FILE_NAMES: [&str; 4] = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];
/// The two training files: all that a run which never sees the test split reads.
pub const TRAIN_FILE_NAMES: [&str; 2] = [TRAIN_IMAGES, TRAIN_LABELS];
/// Training images file name.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// Training labels file name.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// Test images file name.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// Test labels file name.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// The names a file may have on disk, most preferred first: `.gz` before raw, and the mirror spelling
/// with `.` instead of `-` before `idx`.
pub(crate) fn candidates(dir: &Path, name: &str) -> Vec<PathBuf> {
    let dotted = name.replacen("-idx", ".idx", 1);
    vec![
        dir.join(format!("{name}.gz")),
        dir.join(format!("{dotted}.gz")),
        dir.join(name),
        dir.join(dotted),
    ]
}

/// Finds one of the four files in `dir` (see [`candidates`]).
pub(crate) fn find_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let tried = candidates(dir, name);
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| DataError::Missing {
            dir: dir.to_path_buf(),
            file: name.to_string(),
            tried,
            hint: format!(
                "a data folder must hold the four MNIST files {FILE_NAMES:?} (each gzipped or raw)"
            ),
        })
}

/// True when `dir` holds every one of `files`.
pub(crate) fn dir_has(dir: &Path, files: &[&str]) -> bool {
    files.iter().all(|n| find_file(dir, n).is_ok())
}

fn load_pair(dir: &Path, images_name: &str, labels_name: &str) -> Result<Split> {
    let images_path = find_file(dir, images_name)?;
    let labels_path = find_file(dir, labels_name)?;
    let (images, n, rows, cols) = read_idx_images(&images_path)?;
    if rows != IMAGE_SIDE || cols != IMAGE_SIDE {
        return Err(DataError::BadDims {
            path: images_path,
            rows,
            cols,
        });
    }
    let labels = read_idx_labels(&labels_path)?;
    if labels.len() != n {
        return Err(DataError::CountMismatch {
            images_path,
            images: n,
            labels_path,
            labels: labels.len(),
        });
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= NUM_CLASSES)
    {
        return Err(DataError::LabelOutOfRange {
            path: labels_path,
            index,
            label,
        });
    }
    Ok(Split { images, labels })
}

/// Reads and validates the four files in `dir` (each `NAME.gz` or raw `NAME`), keeping the last
/// `validation` training examples apart as `val`.
pub fn load_dir(dir: &Path, validation: usize) -> Result<Mnist> {
    load_splits(dir, validation, true)
}

/// [`load_dir`] without the test split: `test` is empty and the test files are never opened (they need
/// not exist), for runs that must not see the test split (choosing recipes on the validation split).
pub fn load_dir_without_test(dir: &Path, validation: usize) -> Result<Mnist> {
    load_splits(dir, validation, false)
}

fn load_splits(dir: &Path, validation: usize, with_test: bool) -> Result<Mnist> {
    let full = load_pair(dir, TRAIN_IMAGES, TRAIN_LABELS)?;
    let test = if with_test {
        load_pair(dir, TEST_IMAGES, TEST_LABELS)?
    } else {
        Split::default()
    };
    if validation > full.len() {
        return Err(DataError::BadValidation {
            validation,
            train: full.len(),
        });
    }
    let cut = full.len() - validation;
    let Split {
        mut images,
        mut labels,
    } = full;
    let val = Split {
        images: images.split_off(cut * IMAGE_PIXELS),
        labels: labels.split_off(cut),
    };
    let train = Split { images, labels };
    tracing::info!(
        dir = %dir.display(),
        train = train.len(),
        val = val.len(),
        test = test.len(),
        "loaded MNIST files"
    );
    Ok(Mnist { train, val, test })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idx::{write_idx_images, write_idx_labels};

    /// Writes a small valid data set (`n_train` + `n_test`) into `dir`, labels `i % 10`.
    fn write_set(dir: &Path, n_train: usize, n_test: usize, gz: bool) {
        let ext = if gz { ".gz" } else { "" };
        for (img, lab, n) in [
            (TRAIN_IMAGES, TRAIN_LABELS, n_train),
            (TEST_IMAGES, TEST_LABELS, n_test),
        ] {
            let images: Vec<u8> = (0..n * 784).map(|i| (i / 784) as u8).collect();
            let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
            write_idx_images(&dir.join(format!("{img}{ext}")), &images, 28, 28).unwrap();
            write_idx_labels(&dir.join(format!("{lab}{ext}")), &labels).unwrap();
        }
    }

    #[test]
    fn dataset_names() {
        assert_eq!("mnist".parse::<Dataset>().unwrap(), Dataset::Mnist);
        assert_eq!("Fashion".parse::<Dataset>().unwrap(), Dataset::Fashion);
        assert!(matches!(
            "cifar".parse::<Dataset>(),
            Err(DataError::UnknownDataset(_))
        ));
        assert_eq!(Dataset::Fashion.to_string(), "fashion");
        assert_eq!(serde_json::to_string(&Dataset::Mnist).unwrap(), "\"mnist\"");
        assert_eq!(
            serde_json::from_str::<Dataset>("\"fashion\"").unwrap(),
            Dataset::Fashion
        );
    }

    #[test]
    fn split_accessors_and_from_parts() {
        let images: Vec<u8> = (0..3 * 784).map(|i| (i / 784) as u8).collect();
        let s = Split::from_parts(images, vec![4, 5, 6]).unwrap();
        assert_eq!(s.len(), 3);
        assert!(!s.is_empty());
        assert_eq!(s.label(1), 5);
        assert!(s.image(2).iter().all(|&p| p == 2));
        let t = s.take(2);
        assert_eq!(t.labels(), &[4, 5]);
        assert_eq!(t.images().len(), 2 * 784);
        assert_eq!(s.take(99), s);
        assert_eq!(s.range(1, 3).labels(), &[5, 6]);
        assert_eq!(s.class_counts()[4..7], [1, 1, 1]);
        assert!(matches!(
            Split::from_parts(vec![0; 784], vec![1, 2]),
            Err(DataError::SplitMismatch {
                image_bytes: 784,
                labels: 2,
                expected: 1568
            })
        ));
        assert!(matches!(
            Split::from_parts(vec![0; 784 * 2], vec![1, 12]),
            Err(DataError::LabelOutOfRange {
                index: 1,
                label: 12,
                ..
            })
        ));
    }

    #[test]
    fn without_test_the_test_files_are_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 20, 7, true);
        let full = load_dir(dir.path(), 5).unwrap();
        // Corrupt test files: loading without the test split does not notice, a full load does.
        for name in [TEST_IMAGES, TEST_LABELS] {
            std::fs::write(dir.path().join(format!("{name}.gz")), b"not gzip").unwrap();
        }
        assert!(load_dir(dir.path(), 5).is_err());
        let m = load_dir_without_test(dir.path(), 5).unwrap();
        assert_eq!((m.train.len(), m.val.len(), m.test.len()), (15, 5, 0));
        assert_eq!((&m.train, &m.val), (&full.train, &full.val));
        // Or absent altogether.
        for name in [TEST_IMAGES, TEST_LABELS] {
            std::fs::remove_file(dir.path().join(format!("{name}.gz"))).unwrap();
        }
        assert_eq!(load_dir_without_test(dir.path(), 5).unwrap(), m);
        assert!(dir_has(dir.path(), &TRAIN_FILE_NAMES) && !dir_has(dir.path(), &FILE_NAMES));
    }

    #[test]
    fn load_dir_splits_gz_and_raw() {
        for gz in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            write_set(dir.path(), 20, 7, gz);
            let m = load_dir(dir.path(), 5).unwrap();
            assert_eq!((m.train.len(), m.val.len(), m.test.len()), (15, 5, 7));
            // val is the tail of the training file.
            assert_eq!(m.val.label(0), 15 % 10);
            assert!(m.val.image(4).iter().all(|&p| p == 19));
            assert!(m.train.image(14).iter().all(|&p| p == 14));
            assert!(matches!(
                load_dir(dir.path(), 21),
                Err(DataError::BadValidation {
                    validation: 21,
                    train: 20
                })
            ));
        }
    }

    #[test]
    fn dotted_mirror_names_and_gz_preference() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 4, 2, false);
        for name in FILE_NAMES {
            std::fs::rename(
                dir.path().join(name),
                dir.path().join(name.replacen("-idx", ".idx", 1)),
            )
            .unwrap();
        }
        assert_eq!(load_dir(dir.path(), 0).unwrap().train.len(), 4);
        // A .gz beside the raw file wins.
        write_set(dir.path(), 6, 2, true);
        assert_eq!(load_dir(dir.path(), 0).unwrap().train.len(), 6);
    }

    #[test]
    fn load_dir_validation_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_set(d, 10, 3, false);

        // 27x28 images.
        write_idx_images(&d.join(TEST_IMAGES), &vec![0; 3 * 27 * 28], 27, 28).unwrap();
        let err = load_dir(d, 0).unwrap_err();
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
        assert!(err.to_string().contains("27x28"), "{err}");
        write_set(d, 10, 3, false);

        // Count mismatch names both files and both counts.
        write_idx_labels(&d.join(TRAIN_LABELS), &[0; 9]).unwrap();
        let err = load_dir(d, 0).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::CountMismatch {
                    images: 10,
                    labels: 9,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(TRAIN_IMAGES) && msg.contains(TRAIN_LABELS),
            "{msg}"
        );
        write_set(d, 10, 3, false);

        // Label 10.
        write_idx_labels(&d.join(TEST_LABELS), &[0, 10, 3]).unwrap();
        let err = load_dir(d, 0).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    index: 1,
                    label: 10,
                    ..
                }
            ),
            "{err}"
        );
        write_set(d, 10, 3, false);

        // Missing file.
        std::fs::remove_file(d.join(TEST_LABELS)).unwrap();
        let err = load_dir(d, 0).unwrap_err();
        match &err {
            DataError::Missing { file, tried, .. } => {
                assert_eq!(file, TEST_LABELS);
                assert_eq!(tried.len(), 4);
            }
            other => panic!("expected Missing, got {other:?}"),
        }
    }
}

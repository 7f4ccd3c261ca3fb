//! The error type of the crate: every variant names the file (or value) that is wrong and how.

use std::path::PathBuf;

/// Everything that can go wrong while finding, reading, validating or batching MNIST data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading, writing or listing a path failed at the OS level.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder being accessed.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file starts like a gzip stream but does not decompress.
    #[error("corrupt gzip data in {path}: {source}")]
    Gzip {
        /// The compressed file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// The file (after decompression) has no bytes at all.
    #[error("{path} is empty (expected an IDX file)")]
    Empty {
        /// The empty file.
        path: PathBuf,
    },
    /// The first four bytes are not the IDX magic number for this kind of file.
    #[error("{path}: bad IDX magic number: expected {expected:#010x}, found {found:#010x}")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// 0x00000803 for images, 0x00000801 for labels.
        expected: u32,
        /// What the file holds.
        found: u32,
    },
    /// The file is shorter than its header says (header and payload, decompressed bytes).
    #[error("{path} is truncated: expected {expected} bytes (header + payload), found {found}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header promises, header included.
        expected: u64,
        /// Bytes actually present.
        found: u64,
    },
    /// The file is longer than its header says.
    #[error("{path} has {extra} trailing bytes after the {expected} bytes its header declares")]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Bytes the header promises, header included.
        expected: u64,
        /// Bytes past that.
        extra: u64,
    },
    /// Images are not 28x28.
    #[error("{path}: images are {rows}x{cols}, expected 28x28")]
    BadDims {
        /// The image file.
        path: PathBuf,
        /// Rows declared in the header.
        rows: usize,
        /// Columns declared in the header.
        cols: usize,
    },
    /// An image file and its label file disagree on the number of examples.
    #[error("{images_path} holds {images} images but {labels_path} holds {labels} labels")]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// Number of images.
        images: usize,
        /// The label file.
        labels_path: PathBuf,
        /// Number of labels.
        labels: usize,
    },
    /// A label is not a digit class 0..=9.
    #[error("{path}: label #{index} is {label}, expected 0..=9")]
    LabelOutOfRange {
        /// The label file (or `<memory>` for [`crate::Split::from_parts`]).
        path: PathBuf,
        /// Position of the bad label.
        index: usize,
        /// Its value.
        label: u8,
    },
    /// In-memory images and labels do not fit together.
    #[error("split has {image_bytes} image bytes for {labels} labels (expected {expected} = labels * 784)")]
    SplitMismatch {
        /// Length of the image buffer.
        image_bytes: usize,
        /// Number of labels.
        labels: usize,
        /// `labels * 28 * 28`.
        expected: usize,
    },
    /// The validation split asked for is larger than the training file.
    #[error("validation size {validation} exceeds the {train} training examples")]
    BadValidation {
        /// Examples asked for.
        validation: usize,
        /// Examples in the training file.
        train: usize,
    },
    /// One of the four files is not in a folder that should hold them.
    #[error("{file} not found in {dir} (tried {tried:?}); {hint}")]
    Missing {
        /// The folder searched.
        dir: PathBuf,
        /// The canonical file name (e.g. `train-images-idx3-ubyte`).
        file: String,
        /// Every path looked at.
        tried: Vec<PathBuf>,
        /// What to do about it.
        hint: String,
    },
    /// No place holds the data and it could not be downloaded.
    #[error("no {dataset} data found; tried {tried:?}{}; {hint}", download.as_ref().map(|d| format!(", then download: {d}")).unwrap_or_default())]
    NotFound {
        /// Which data set (`mnist` or `fashion`).
        dataset: String,
        /// Every folder looked at, in order.
        tried: Vec<PathBuf>,
        /// Why the download failed, if one was attempted.
        download: Option<String>,
        /// Where to put the four files.
        hint: String,
    },
    /// The hub download or its conversion failed.
    #[error("download failed: {0}")]
    Download(String),
    /// A batching or augmentation setting is invalid (checked once, before any work).
    #[error("invalid config: {0}")]
    Config(String),
    /// An unknown data set name was given.
    #[error("unknown data set {0:?}: expected \"mnist\" or \"fashion\"")]
    UnknownDataset(String),
    /// Building a tensor failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for this crate's results.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

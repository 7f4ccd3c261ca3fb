//! MNIST data for the workspace: IDX files (gzipped or raw) -> validated `u8` splits -> seeded batches.
//!
//! ```no_run
//! use mnist_data::{batches, epoch_rng, BatcherConfig, DataSource, Dataset};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let data = DataSource::new(Dataset::Mnist).load()?; // train 54,000 / val 6,000 / test 10,000
//! let cfg = BatcherConfig { batch_size: 128, ..BatcherConfig::default() };
//! let mut rng = epoch_rng(42, 1, 0);
//! for batch in batches(&data.train, &cfg, Some(&mut rng), &candle_core::Device::Cpu)? {
//!     let batch = batch?; // images f32 [b, 1, 28, 28], labels u32 [b]
//! #   let _ = batch;
//! }
//! # Ok(()) }
//! ```

mod augment;
mod batcher;
mod dataset;
mod deskew;
mod elastic;
mod error;
mod idx;
mod mix;
pub mod preprocess;
mod source;
mod stroke;

pub use augment::{
    augment_into, warp_field_into, warp_into, warp_into_with, Affine, AugmentConfig, Interpolation,
};
pub use batcher::{
    batches, epoch_rng, labels_to_tensor, permutation, to_tensor, with_prefetch, Batch, Batcher,
    BatcherConfig,
};
pub use dataset::{
    load_dir, load_dir_without_test, Dataset, Mnist, Split, FILE_NAMES, TEST_IMAGES, TEST_LABELS,
    TRAIN_FILE_NAMES, TRAIN_IMAGES, TRAIN_LABELS,
};
pub use deskew::{deskew_into, slant, DESKEW_CENTRE, FLAT_SHAPE, MAX_SLANT};
pub use elastic::{Displacement, ElasticConfig, DEFAULT_ELASTIC_SIGMA};
pub use error::{DataError, Result};
pub use idx::{
    parse_idx_images, parse_idx_labels, read_idx_images, read_idx_labels, write_idx_images,
    write_idx_labels, IMAGES_MAGIC, LABELS_MAGIC,
};
pub use mix::{BatchMix, EraseConfig, MixConfig, MixKind, Rect, ERASE_AREA};
pub use preprocess::{decode_mnist_image, load_mnist_image, to_mnist, ImageError, FIT_SIDE};
pub use source::{save_tensors, DataSource, DEBIAN_FASHION_DIR};
pub use stroke::{thicken, ThicknessConfig};

/// Side of an MNIST image, in pixels.
pub const IMAGE_SIDE: usize = 28;
/// Pixels per image (28 * 28).
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;

/// Pixel `(x, y)` of a 28x28 image, or the background (0) outside it.
pub(crate) fn pixel_or_zero(image: &[f32], x: i32, y: i32) -> f32 {
    let n = IMAGE_SIDE as i32;
    if (0..n).contains(&x) && (0..n).contains(&y) {
        image[y as usize * IMAGE_SIDE + x as usize]
    } else {
        0.0
    }
}
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// Examples held out from the end of the 60,000-example training file for validation.
pub const VALIDATION_SIZE: usize = 6_000;

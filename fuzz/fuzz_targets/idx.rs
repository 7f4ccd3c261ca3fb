//! Feeds arbitrary bytes to the IDX readers of mnist-data, raw and behind gzip.
//!
//! The readers must return `Ok` or a `DataError` for every input, never panic, and never allocate
//! what a corrupt header asks for; a successful parse must be self-consistent.
#![no_main]

use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;
use mnist_data::{parse_idx_images, parse_idx_labels};

fn check(bytes: &[u8]) {
    let name = Path::new("fuzz-input");
    if let Ok((pixels, n, rows, cols)) = parse_idx_images(bytes, name) {
        assert_eq!(pixels.len(), n * rows * cols, "pixel count disagrees with the header");
    }
    if let Ok(labels) = parse_idx_labels(bytes, name) {
        assert!(labels.len() + 8 <= bytes.len() || bytes.starts_with(&[0x1f, 0x8b]));
    }
}

fuzz_target!(|data: &[u8]| {
    // The bytes as they are (gzip is detected by its magic bytes, so corrupt gzip streams get here too).
    check(data);
    // The same bytes as the payload of a valid gzip stream, so the IDX parser behind the decoder is
    // reached with arbitrary headers as well.
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    if enc.write_all(data).is_ok() {
        if let Ok(gz) = enc.finish() {
            check(&gz);
        }
    }
});

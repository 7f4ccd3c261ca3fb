//! Reading and writing IDX files (the format of the original MNIST distribution), gzipped or raw.
//!
//! A reader detects gzip by its magic bytes (`1f 8b`), not by the file name, checks the header before
//! allocating the payload (so a corrupt count cannot ask for gigabytes), and rejects truncated files and
//! trailing bytes alike.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::error::{DataError, Result};

/// Magic number of an IDX file of unsigned bytes with three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Largest allocation made up front for a payload; past this the buffer grows with the data actually read.
const MAX_PREALLOC: usize = 64 << 20;

/// An open IDX stream that maps read errors to the right [`DataError`] variant.
struct IdxReader<'a> {
    path: PathBuf,
    gz: bool,
    inner: Box<dyn Read + 'a>,
}

impl<'a> IdxReader<'a> {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_buf(path, BufReader::with_capacity(1 << 16, file))
    }

    /// Wraps an already open stream; `path` only names it in errors.
    fn from_buf(path: &Path, mut buf: impl BufRead + 'a) -> Result<Self> {
        let head = buf.fill_buf().map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let gz = head.starts_with(&[0x1f, 0x8b]);
        let inner: Box<dyn Read + 'a> = if gz {
            Box::new(MultiGzDecoder::new(buf))
        } else {
            Box::new(buf)
        };
        Ok(Self {
            path: path.to_path_buf(),
            gz,
            inner,
        })
    }

    fn err(&self, source: io::Error) -> DataError {
        if self.gz {
            DataError::Gzip {
                path: self.path.clone(),
                source,
            }
        } else {
            DataError::Io {
                path: self.path.clone(),
                source,
            }
        }
    }

    /// Reads up to `buf.len()` bytes, stopping early only at end of stream; returns the count.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(done)
    }

    /// Reads the header: magic then `ndims` big-endian u32 sizes.
    fn header(&mut self, magic: u32, ndims: usize) -> Result<Vec<usize>> {
        let header_len = 4 * (1 + ndims);
        let mut head = vec![0u8; header_len];
        let got = self.read_full(&mut head)?;
        if got == 0 {
            return Err(DataError::Empty {
                path: self.path.clone(),
            });
        }
        if got >= 4 {
            let found = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            if found != magic {
                return Err(DataError::BadMagic {
                    path: self.path.clone(),
                    expected: magic,
                    found,
                });
            }
        }
        if got < header_len {
            return Err(DataError::Truncated {
                path: self.path.clone(),
                expected: header_len as u64,
                found: got as u64,
            });
        }
        Ok(head[4..]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect())
    }

    /// Reads exactly `len` payload bytes after a header of `header_len` bytes, then checks nothing follows.
    fn payload(&mut self, header_len: u64, len: Option<u64>) -> Result<Vec<u8>> {
        // A declared size that overflows cannot be backed by any real file: read what is there to report it.
        let want = len.unwrap_or(u64::MAX);
        let mut data = Vec::with_capacity(
            usize::try_from(want)
                .unwrap_or(usize::MAX)
                .min(MAX_PREALLOC),
        );
        let got = (&mut self.inner)
            .take(want)
            .read_to_end(&mut data)
            .map_err(|e| self.err(e))? as u64;
        if got < want {
            return Err(DataError::Truncated {
                path: self.path.clone(),
                expected: header_len.saturating_add(want),
                found: header_len + got,
            });
        }
        let extra = io::copy(&mut self.inner, &mut io::sink()).map_err(|e| self.err(e))?;
        if extra > 0 {
            return Err(DataError::TrailingBytes {
                path: self.path.clone(),
                expected: header_len + want,
                extra,
            });
        }
        Ok(data)
    }
}

/// Reads an IDX image file (magic 0x00000803), gzipped or raw.
///
/// Returns `(pixels, n, rows, cols)` with `pixels.len() == n * rows * cols`, row-major. The dimensions are
/// not checked against 28x28 here ([`crate::load_dir`] does that); the file length is checked exactly.
pub fn read_idx_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    images_from(IdxReader::open(path)?, path)
}

/// Parses the bytes of an IDX image file (gzipped or raw) like [`read_idx_images`]; `name` only names
/// the data in errors.
pub fn parse_idx_images(bytes: &[u8], name: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    images_from(IdxReader::from_buf(name, bytes)?, name)
}

fn images_from(mut r: IdxReader<'_>, path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let dims = r.header(IMAGES_MAGIC, 3)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    let len = (n as u64)
        .checked_mul(rows as u64)
        .and_then(|v| v.checked_mul(cols as u64));
    let data = r.payload(16, len)?;
    tracing::debug!(path = %path.display(), n, rows, cols, gz = r.gz, "read IDX images");
    Ok((data, n, rows, cols))
}

/// Reads an IDX label file (magic 0x00000801), gzipped or raw. Values are not range-checked here.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    labels_from(IdxReader::open(path)?, path)
}

/// Parses the bytes of an IDX label file (gzipped or raw) like [`read_idx_labels`]; `name` only names
/// the data in errors.
pub fn parse_idx_labels(bytes: &[u8], name: &Path) -> Result<Vec<u8>> {
    labels_from(IdxReader::from_buf(name, bytes)?, name)
}

fn labels_from(mut r: IdxReader<'_>, path: &Path) -> Result<Vec<u8>> {
    let n = r.header(LABELS_MAGIC, 1)?[0];
    let data = r.payload(8, Some(n as u64))?;
    tracing::debug!(path = %path.display(), n, gz = r.gz, "read IDX labels");
    Ok(data)
}

/// Writes an IDX image file of `images.len() / (rows * cols)` images; gzipped when `path` ends in `.gz`.
///
/// The file is written to a temporary name beside `path` and renamed into place, so readers never see a
/// half-written file.
pub fn write_idx_images(path: &Path, images: &[u8], rows: usize, cols: usize) -> Result<()> {
    let size = rows.checked_mul(cols).filter(|&s| s > 0).ok_or_else(|| {
        DataError::Config(format!(
            "{}: image size {rows}x{cols} is empty",
            path.display()
        ))
    })?;
    if !images.len().is_multiple_of(size) {
        return Err(DataError::Config(format!(
            "{}: {} pixel bytes is not a whole number of {rows}x{cols} images",
            path.display(),
            images.len()
        )));
    }
    let n = images.len() / size;
    let mut header = Vec::with_capacity(16);
    for v in [IMAGES_MAGIC as usize, n, rows, cols] {
        header.extend_from_slice(&to_u32(path, v)?.to_be_bytes());
    }
    write_atomic(path, &header, images)
}

/// Writes an IDX label file; gzipped when `path` ends in `.gz`. Written atomically like [`write_idx_images`].
pub fn write_idx_labels(path: &Path, labels: &[u8]) -> Result<()> {
    let mut header = Vec::with_capacity(8);
    header.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    header.extend_from_slice(&to_u32(path, labels.len())?.to_be_bytes());
    write_atomic(path, &header, labels)
}

fn to_u32(path: &Path, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        DataError::Config(format!(
            "{}: dimension {v} does not fit an IDX u32",
            path.display()
        ))
    })
}

fn write_atomic(path: &Path, header: &[u8], payload: &[u8]) -> Result<()> {
    let gz = path.extension().is_some_and(|e| e == "gz");
    let io_err = |p: &Path, source| DataError::Io {
        path: p.to_path_buf(),
        source,
    };
    let write = |tmp: &Path| -> io::Result<()> {
        let file = io::BufWriter::new(File::create(tmp)?);
        if gz {
            let mut enc = GzEncoder::new(file, Compression::default());
            enc.write_all(header)?;
            enc.write_all(payload)?;
            enc.finish()?.flush()
        } else {
            let mut file = file;
            file.write_all(header)?;
            file.write_all(payload)?;
            file.flush()
        }
    };
    mnist_fs::write_atomic(path, |tmp| write(tmp).map_err(|e| io_err(tmp, e)), io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> (Vec<u8>, Vec<u8>) {
        let images: Vec<u8> = (0..n * 784).map(|i| (i * 7 % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        (images, labels)
    }

    #[test]
    fn parse_from_bytes_matches_the_file_readers() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels) = sample(3);
        let name = Path::new("in-memory");
        for file in ["x-idx3-ubyte", "x-idx3-ubyte.gz"] {
            let p = dir.path().join(file);
            write_idx_images(&p, &images, 28, 28).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(
                parse_idx_images(&bytes, name).unwrap(),
                read_idx_images(&p).unwrap()
            );
            let err = parse_idx_images(&bytes[..bytes.len() - 1], name).unwrap_err();
            assert!(err.to_string().contains("in-memory"), "{err}");
            assert!(
                parse_idx_labels(&bytes, name).is_err(),
                "image bytes are no labels"
            );
        }
        let p = dir.path().join("y-idx1-ubyte.gz");
        write_idx_labels(&p, &labels).unwrap();
        assert_eq!(
            parse_idx_labels(&std::fs::read(&p).unwrap(), name).unwrap(),
            labels
        );
        assert!(matches!(
            parse_idx_labels(&[], name),
            Err(DataError::Empty { .. })
        ));
    }

    #[test]
    fn round_trip_gz_and_raw() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels) = sample(5);
        for name in ["x-idx3-ubyte", "x-idx3-ubyte.gz"] {
            let p = dir.path().join(name);
            write_idx_images(&p, &images, 28, 28).unwrap();
            let (got, n, r, c) = read_idx_images(&p).unwrap();
            assert_eq!((n, r, c), (5, 28, 28));
            assert_eq!(got, images);
        }
        for name in ["y-idx1-ubyte", "y-idx1-ubyte.gz"] {
            let p = dir.path().join(name);
            write_idx_labels(&p, &labels).unwrap();
            assert_eq!(read_idx_labels(&p).unwrap(), labels);
        }
        // The .gz file really is gzip, the raw file really is raw.
        let raw = std::fs::read(dir.path().join("y-idx1-ubyte")).unwrap();
        assert_eq!(&raw[..4], &LABELS_MAGIC.to_be_bytes());
        assert_eq!(raw.len(), 8 + 5);
        let gz = std::fs::read(dir.path().join("y-idx1-ubyte.gz")).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 4);
    }

    #[test]
    fn gzip_detected_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("a.gz");
        write_idx_labels(&gz, &[1, 2, 3]).unwrap();
        let renamed = dir.path().join("labels-no-ext");
        std::fs::rename(&gz, &renamed).unwrap();
        assert_eq!(read_idx_labels(&renamed).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn truncated_and_trailing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let mut bytes = LABELS_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&10u32.to_be_bytes());
        bytes.extend_from_slice(&[1; 7]);
        std::fs::write(&p, &bytes).unwrap();
        match read_idx_labels(&p) {
            Err(DataError::Truncated {
                expected, found, ..
            }) => assert_eq!((expected, found), (18, 15)),
            other => panic!("expected Truncated, got {other:?}"),
        }
        bytes.extend_from_slice(&[1; 5]);
        std::fs::write(&p, &bytes).unwrap();
        match read_idx_labels(&p) {
            Err(DataError::TrailingBytes {
                expected, extra, ..
            }) => assert_eq!((expected, extra), (18, 2)),
            other => panic!("expected TrailingBytes, got {other:?}"),
        }
        // Truncated inside the header.
        std::fs::write(&p, &bytes[..6]).unwrap();
        assert!(matches!(
            read_idx_labels(&p),
            Err(DataError::Truncated {
                expected: 8,
                found: 6,
                ..
            })
        ));
    }

    #[test]
    fn huge_declared_count_does_not_allocate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i");
        let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
        for v in [u32::MAX, u32::MAX, u32::MAX] {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        bytes.extend_from_slice(&[0; 100]);
        std::fs::write(&p, &bytes).unwrap();
        // Declared size overflows u64: reported as truncated, not an allocation failure.
        assert!(matches!(
            read_idx_images(&p),
            Err(DataError::Truncated { found: 116, .. })
        ));
        let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
        for v in [u32::MAX, 28, 28] {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        std::fs::write(&p, &bytes).unwrap();
        match read_idx_images(&p) {
            Err(DataError::Truncated {
                expected, found, ..
            }) => assert_eq!((expected, found), (16 + u32::MAX as u64 * 784, 16)),
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn wrong_magic_names_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("labels-as-images");
        write_idx_labels(&p, &[1, 2]).unwrap();
        let err = read_idx_images(&p).unwrap_err();
        assert!(matches!(
            err,
            DataError::BadMagic {
                expected: IMAGES_MAGIC,
                found: LABELS_MAGIC,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("labels-as-images") && msg.contains("0x00000803"),
            "{msg}"
        );
    }

    #[test]
    fn empty_missing_and_corrupt_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(read_idx_labels(&p), Err(DataError::Empty { .. })));
        // An empty gzip stream is also empty.
        let pg = dir.path().join("empty.gz");
        let enc = GzEncoder::new(File::create(&pg).unwrap(), Compression::default());
        enc.finish().unwrap();
        assert!(matches!(read_idx_labels(&pg), Err(DataError::Empty { .. })));

        let missing = dir.path().join("nope");
        assert!(matches!(
            read_idx_labels(&missing),
            Err(DataError::Io { .. })
        ));

        let gz = dir.path().join("c.gz");
        let (images, _) = sample(3);
        write_idx_images(&gz, &images, 28, 28).unwrap();
        let mut bytes = std::fs::read(&gz).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[12..mid] {
            *b ^= 0x5a;
        }
        std::fs::write(&gz, &bytes).unwrap();
        assert!(
            matches!(read_idx_images(&gz), Err(DataError::Gzip { .. })),
            "{:?}",
            read_idx_images(&gz)
        );
        // A gzip stream cut in half.
        write_idx_images(&gz, &images, 28, 28).unwrap();
        let bytes = std::fs::read(&gz).unwrap();
        std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(read_idx_images(&gz), Err(DataError::Gzip { .. })));
    }

    #[test]
    fn write_rejects_ragged_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad");
        assert!(matches!(
            write_idx_images(&p, &[0; 785], 28, 28),
            Err(DataError::Config(_))
        ));
        assert!(matches!(
            write_idx_images(&p, &[0; 4], 0, 28),
            Err(DataError::Config(_))
        ));
        assert!(!p.exists());
    }
}

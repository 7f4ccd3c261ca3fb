//! Where the data comes from: an explicit folder, an environment variable, a system folder, the user
//! cache, or (feature `hub`) a download through candle-datasets, saved into the cache as IDX files.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::dataset::{
    dir_has, find_file, load_dir, load_dir_without_test, Dataset, Mnist, FILE_NAMES, TEST_IMAGES,
    TEST_LABELS, TRAIN_FILE_NAMES, TRAIN_IMAGES, TRAIN_LABELS,
};
use crate::error::{DataError, Result};
use crate::idx::{write_idx_images, write_idx_labels};
use crate::{IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES, VALIDATION_SIZE};

/// Folder where Debian's `dataset-fashion-mnist` package installs the four Fashion-MNIST files.
pub const DEBIAN_FASHION_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Where to find a data set: an explicit folder (the `--data-dir` flag), else the usual places.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataSource {
    /// An explicit folder; when set, nothing else is tried.
    pub dir: Option<PathBuf>,
    /// Which data set.
    pub dataset: Dataset,
}

/// A downloader: fetch `Dataset` and write the four IDX files into the given folder.
type Downloader<'a> = &'a dyn Fn(Dataset, &Path) -> Result<()>;

/// The outside world `resolve` looks at, injectable for tests.
struct Lookup<'a> {
    env: &'a dyn Fn(&str) -> Option<OsString>,
    system_dirs: Vec<PathBuf>,
    download: Option<Downloader<'a>>,
}

impl DataSource {
    /// A source for `dataset` found in the usual places.
    pub fn new(dataset: Dataset) -> Self {
        Self { dir: None, dataset }
    }

    /// The folder holding the four files, looked for in this order:
    /// 1. `dir` (if set and unusable: an error, no fallback);
    /// 2. `$MNIST_DIR` (Fashion: `$FASHION_MNIST_DIR`, then [`DEBIAN_FASHION_DIR`]);
    /// 3. the cache folder ([`DataSource::cache_dir`]);
    /// 4. with feature `hub`, a download into the cache folder.
    ///
    /// If all fail, the error lists every place tried and says where to put the files.
    pub fn resolve(&self) -> Result<PathBuf> {
        self.resolve_files(&FILE_NAMES)
    }

    /// [`DataSource::resolve`] for a folder that holds `files` (e.g. [`TRAIN_FILE_NAMES`]).
    fn resolve_files(&self, files: &[&str]) -> Result<PathBuf> {
        let env = |k: &str| std::env::var_os(k);
        let system_dirs = match self.dataset {
            Dataset::Mnist => vec![],
            Dataset::Fashion => vec![PathBuf::from(DEBIAN_FASHION_DIR)],
        };
        #[cfg(feature = "hub")]
        let download: Option<Downloader> = Some(&hub_download);
        #[cfg(not(feature = "hub"))]
        let download: Option<Downloader> = None;
        self.resolve_files_with(
            &Lookup {
                env: &env,
                system_dirs,
                download,
            },
            files,
        )
    }

    /// Resolves the folder and loads it with the standard 6,000-example validation split.
    pub fn load(&self) -> Result<Mnist> {
        self.load_with_validation(VALIDATION_SIZE)
    }

    /// Resolves the folder and loads it, keeping the last `validation` training examples as `val`.
    pub fn load_with_validation(&self, validation: usize) -> Result<Mnist> {
        load_dir(&self.resolve()?, validation)
    }

    /// Resolves a folder holding the two training files and loads them with the standard validation
    /// split; `test` is empty and the test files are never opened (they need not exist).
    pub fn load_without_test(&self) -> Result<Mnist> {
        load_dir_without_test(&self.resolve_files(&TRAIN_FILE_NAMES)?, VALIDATION_SIZE)
    }

    /// `$XDG_CACHE_HOME/mnist-challenge/<dataset>`, else `~/.cache/mnist-challenge/<dataset>`
    /// (`None` when neither variable is set).
    pub fn cache_dir(&self) -> Option<PathBuf> {
        cache_dir_with(self.dataset, &|k| std::env::var_os(k))
    }

    #[cfg(test)]
    fn resolve_with(&self, look: &Lookup) -> Result<PathBuf> {
        self.resolve_files_with(look, &FILE_NAMES)
    }

    fn resolve_files_with(&self, look: &Lookup, files: &[&str]) -> Result<PathBuf> {
        let name = self.dataset.name();
        if let Some(dir) = &self.dir {
            if !dir.is_dir() {
                let (kind, what) = if dir.exists() {
                    (
                        std::io::ErrorKind::NotADirectory,
                        "--data-dir must be a folder holding the four IDX files, not a file",
                    )
                } else {
                    (
                        std::io::ErrorKind::NotFound,
                        "the --data-dir folder does not exist",
                    )
                };
                return Err(DataError::Io {
                    path: dir.clone(),
                    source: std::io::Error::new(kind, what),
                });
            }
            // Name the first missing file.
            for file in files {
                find_file(dir, file)?;
            }
            tracing::info!(dir = %dir.display(), "using {name} data from the given folder");
            return Ok(dir.clone());
        }
        let mut tried = Vec::new();
        let var = self.dataset.env_var();
        let from_env = (look.env)(var).filter(|v| !v.is_empty()).map(PathBuf::from);
        let cache = cache_dir_with(self.dataset, look.env);
        let places = from_env
            .iter()
            .map(|d| (d, "environment"))
            .chain(look.system_dirs.iter().map(|d| (d, "system folder")))
            .chain(cache.iter().map(|d| (d, "cache")));
        for (dir, what) in places {
            if dir_has(dir, files) {
                tracing::info!(dir = %dir.display(), "using {name} data from the {what}");
                return Ok(dir.clone());
            }
            if what == "environment" {
                tracing::warn!(dir = %dir.display(), "${var} does not hold the four {name} files; looking elsewhere");
            } else {
                tracing::debug!(dir = %dir.display(), "no complete {name} data in the {what}");
            }
            tried.push(dir.clone());
        }
        let mut download_error = None;
        if let (Some(download), Some(cache)) = (look.download, &cache) {
            tracing::info!(dir = %cache.display(), "no local {name} data; downloading into the cache");
            match download(self.dataset, cache) {
                Ok(()) => return Ok(cache.clone()),
                Err(e) => {
                    tracing::warn!("download of {name} failed: {e}");
                    download_error = Some(e.to_string());
                }
            }
        }
        let cache_hint = cache
            .as_ref()
            .map(|c| format!(", or into {}", c.display()))
            .unwrap_or_default();
        Err(DataError::NotFound {
            dataset: name.to_string(),
            tried,
            download: download_error,
            hint: format!(
                "put the four files {FILE_NAMES:?} (each .gz or raw) in a folder and pass --data-dir DIR or set {var}=DIR{cache_hint}"
            ),
        })
    }
}

fn cache_dir_with(dataset: Dataset, env: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let xdg = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        env("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache"))
    })?;
    Some(base.join("mnist-challenge").join(dataset.name()))
}

/// Converts one split of candle-datasets tensors (`f32 [n, 784]` pixels / 255, integer labels `[n]`)
/// back to `u8` images and labels, checking shapes and label range.
fn tensors_to_u8(images: &Tensor, labels: &Tensor, what: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let bad = |msg: String| DataError::Download(format!("{what}: {msg}"));
    let (n, d) = images.dims2().map_err(|_| {
        bad(format!(
            "images have shape {:?}, expected [n, 784]",
            images.dims()
        ))
    })?;
    if d != IMAGE_PIXELS {
        return Err(bad(format!(
            "images have shape [{n}, {d}], expected [n, 784]"
        )));
    }
    let pixels = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let pixels: Vec<u8> = pixels
        .iter()
        .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect();
    let labels = labels
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    if labels.len() != n {
        return Err(bad(format!("{n} images but {} labels", labels.len())));
    }
    if let Some((i, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= NUM_CLASSES)
    {
        return Err(bad(format!("label #{i} is {l}, expected 0..=9")));
    }
    Ok((pixels, labels.into_iter().map(|l| l as u8).collect()))
}

/// Saves train and test `(images, labels)` tensors in candle-datasets' layout (`f32 [n, 784]` pixels
/// / 255, integer labels `[n]`) as the four gzipped IDX files in `dir` (created if needed; each file is
/// written to a temporary name and renamed). Pixels are rounded back to `u8` exactly.
pub fn save_tensors(dir: &Path, train: (&Tensor, &Tensor), test: (&Tensor, &Tensor)) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for ((images, labels), (img_name, lab_name), what) in [
        (train, (TRAIN_IMAGES, TRAIN_LABELS), "train"),
        (test, (TEST_IMAGES, TEST_LABELS), "test"),
    ] {
        let (pixels, labels) = tensors_to_u8(images, labels, what)?;
        write_idx_images(
            &dir.join(format!("{img_name}.gz")),
            &pixels,
            IMAGE_SIDE,
            IMAGE_SIDE,
        )?;
        write_idx_labels(&dir.join(format!("{lab_name}.gz")), &labels)?;
    }
    tracing::info!(dir = %dir.display(), "saved the four IDX files");
    Ok(())
}

/// Downloads through candle-datasets' hub loader and saves the result as IDX files in `dir`.
#[cfg(feature = "hub")]
fn hub_download(dataset: Dataset, dir: &Path) -> Result<()> {
    let loaded = match dataset {
        Dataset::Mnist => candle_datasets::vision::mnist::load(),
        Dataset::Fashion => candle_datasets::vision::fashion_mnist::load(),
    }
    .map_err(|e| DataError::Download(format!("Hugging Face hub ({dataset}): {e}")))?;
    save_tensors(
        dir,
        (&loaded.train_images, &loaded.train_labels),
        (&loaded.test_images, &loaded.test_labels),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// Writes a complete tiny data set (train n, test 3) into `dir` through `save_tensors`.
    fn fill(dir: &Path, n: usize) {
        let dev = Device::Cpu;
        let imgs = |n: usize| {
            let v: Vec<f32> = (0..n * 784).map(|i| (i % 256) as f32 / 255.0).collect();
            Tensor::from_vec(v, (n, 784), &dev).unwrap()
        };
        let labs = |n: usize| {
            let v: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
            Tensor::from_vec(v, n, &dev).unwrap()
        };
        save_tensors(dir, (&imgs(n), &labs(n)), (&imgs(3), &labs(3))).unwrap();
    }

    struct World {
        vars: HashMap<&'static str, OsString>,
        system: Vec<PathBuf>,
    }

    impl World {
        fn resolve(&self, src: &DataSource, download: Option<Downloader>) -> Result<PathBuf> {
            let env = |k: &str| self.vars.get(k).cloned();
            src.resolve_with(&Lookup {
                env: &env,
                system_dirs: self.system.clone(),
                download,
            })
        }
    }

    #[test]
    fn save_tensors_round_trips_exact_pixels() {
        let tmp = tempfile::tempdir().unwrap();
        fill(tmp.path(), 12);
        let m = load_dir(tmp.path(), 2).unwrap();
        assert_eq!((m.train.len(), m.val.len(), m.test.len()), (10, 2, 3));
        let expect: Vec<u8> = (0..784).map(|i| (i % 256) as u8).collect();
        assert_eq!(m.train.image(0), &expect[..]);
        assert_eq!(m.val.labels(), &[0, 1]);
        for f in FILE_NAMES {
            assert!(tmp.path().join(format!("{f}.gz")).is_file());
        }
    }

    #[test]
    fn tensors_to_u8_rejects_bad_shapes_and_labels() {
        let dev = Device::Cpu;
        let img = Tensor::zeros((2, 783), DType::F32, &dev).unwrap();
        let lab = Tensor::zeros(2, DType::U8, &dev).unwrap();
        assert!(matches!(
            tensors_to_u8(&img, &lab, "t"),
            Err(DataError::Download(_))
        ));
        let img = Tensor::zeros((2, 784), DType::F32, &dev).unwrap();
        let lab3 = Tensor::zeros(3, DType::U8, &dev).unwrap();
        assert!(matches!(
            tensors_to_u8(&img, &lab3, "t"),
            Err(DataError::Download(_))
        ));
        let bad = Tensor::from_vec(vec![1u8, 11], 2, &dev).unwrap();
        let err = tensors_to_u8(&img, &bad, "t").unwrap_err();
        assert!(err.to_string().contains("label #1 is 11"), "{err}");
    }

    #[test]
    fn resolve_order() {
        let root = tempfile::tempdir().unwrap();
        let p = |s: &str| root.path().join(s);
        let (given, env_dir, empty, xdg, home) =
            (p("given"), p("env"), p("empty"), p("xdg"), p("home"));
        fill(&given, 4);
        fill(&env_dir, 5);
        std::fs::create_dir_all(&empty).unwrap();
        let xdg_cache = xdg.join("mnist-challenge").join("mnist");
        let home_cache = home.join(".cache").join("mnist-challenge").join("mnist");
        let mut w = World {
            vars: HashMap::from([
                ("MNIST_DIR", env_dir.clone().into_os_string()),
                ("HOME", home.clone().into_os_string()),
            ]),
            system: vec![],
        };
        let mnist = DataSource::new(Dataset::Mnist);
        let never: Downloader = &|_, _| panic!("must not download");

        // 1. An explicit folder wins, and an unusable one is an error even though others exist.
        let explicit = DataSource {
            dir: Some(given.clone()),
            ..mnist.clone()
        };
        assert_eq!(w.resolve(&explicit, Some(never)).unwrap(), given);
        let bad = DataSource {
            dir: Some(empty.clone()),
            ..mnist.clone()
        };
        assert!(matches!(
            w.resolve(&bad, Some(never)),
            Err(DataError::Missing { .. })
        ));
        let gone = DataSource {
            dir: Some(p("nope")),
            ..mnist.clone()
        };
        assert!(matches!(
            w.resolve(&gone, Some(never)),
            Err(DataError::Io { .. })
        ));

        // 2. The environment variable.
        assert_eq!(w.resolve(&mnist, Some(never)).unwrap(), env_dir);

        // 3. An unusable variable falls through to the cache: ~/.cache, or $XDG_CACHE_HOME when set.
        w.vars.insert("MNIST_DIR", empty.clone().into_os_string());
        fill(&home_cache, 6);
        assert_eq!(w.resolve(&mnist, Some(never)).unwrap(), home_cache);
        w.vars
            .insert("XDG_CACHE_HOME", xdg.clone().into_os_string());
        fill(&xdg_cache, 7);
        assert_eq!(w.resolve(&mnist, Some(never)).unwrap(), xdg_cache);

        // 4. Nothing local: download into the cache (here a fake that writes the files).
        std::fs::remove_dir_all(&xdg_cache).unwrap();
        let fake: Downloader = &|d, dir| {
            assert_eq!(d, Dataset::Mnist);
            fill(dir, 8);
            Ok(())
        };
        assert_eq!(w.resolve(&mnist, Some(fake)).unwrap(), xdg_cache);
        assert_eq!(load_dir(&xdg_cache, 0).unwrap().train.len(), 8);

        // 5. Nothing anywhere and the download fails: the error lists every place and the fix.
        std::fs::remove_dir_all(&xdg_cache).unwrap();
        let failing: Downloader = &|_, _| Err(DataError::Download("offline".into()));
        let err = w.resolve(&mnist, Some(failing)).unwrap_err();
        match &err {
            DataError::NotFound {
                tried, download, ..
            } => {
                assert_eq!(tried, &vec![empty.clone(), xdg_cache.clone()]);
                assert!(download.as_deref().unwrap().contains("offline"));
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        let msg = err.to_string();
        for needle in [
            "--data-dir",
            "MNIST_DIR",
            "train-images-idx3-ubyte",
            "offline",
        ] {
            assert!(msg.contains(needle), "{needle} missing from: {msg}");
        }
        assert!(msg.contains(&*xdg_cache.to_string_lossy()), "{msg}");
        // Without a downloader (feature `hub` off) there is no download line.
        match w.resolve(&mnist, None) {
            Err(DataError::NotFound { download: None, .. }) => {}
            other => panic!("expected NotFound without download, got {other:?}"),
        }
    }

    #[test]
    fn resolve_fashion_uses_its_own_variable_and_system_folder() {
        let root = tempfile::tempdir().unwrap();
        let (mnist_dir, fashion_env, system) = (
            root.path().join("m"),
            root.path().join("f"),
            root.path().join("sys"),
        );
        fill(&mnist_dir, 4);
        fill(&system, 5);
        let mut w = World {
            vars: HashMap::from([
                ("MNIST_DIR", mnist_dir.clone().into_os_string()),
                ("HOME", root.path().join("home").into_os_string()),
            ]),
            system: vec![system.clone()],
        };
        let fashion = DataSource::new(Dataset::Fashion);
        assert_eq!(w.resolve(&fashion, None).unwrap(), system);
        fill(&fashion_env, 6);
        w.vars
            .insert("FASHION_MNIST_DIR", fashion_env.clone().into_os_string());
        assert_eq!(w.resolve(&fashion, None).unwrap(), fashion_env);
        // The cache folder is per data set.
        let cache = cache_dir_with(Dataset::Fashion, &|k| w.vars.get(k).cloned()).unwrap();
        assert!(
            cache.ends_with("mnist-challenge/fashion"),
            "{}",
            cache.display()
        );
    }

    #[test]
    fn a_folder_of_training_files_serves_runs_without_the_test_split() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("train-only");
        fill(&dir, 4);
        for name in [TEST_IMAGES, TEST_LABELS] {
            std::fs::remove_file(dir.join(format!("{name}.gz"))).unwrap();
        }
        let w = World {
            vars: HashMap::from([("MNIST_DIR", dir.clone().into_os_string())]),
            system: vec![],
        };
        let env = |k: &str| w.vars.get(k).cloned();
        let look = Lookup {
            env: &env,
            system_dirs: vec![],
            download: None,
        };
        let given = DataSource {
            dir: Some(dir.clone()),
            dataset: Dataset::Mnist,
        };
        assert_eq!(
            given.resolve_files_with(&look, &TRAIN_FILE_NAMES).unwrap(),
            dir
        );
        assert!(matches!(
            given.resolve_files_with(&look, &FILE_NAMES),
            Err(DataError::Missing { .. })
        ));
        let from_env = DataSource::new(Dataset::Mnist);
        assert_eq!(
            from_env
                .resolve_files_with(&look, &TRAIN_FILE_NAMES)
                .unwrap(),
            dir
        );
        assert!(from_env.resolve_files_with(&look, &FILE_NAMES).is_err());
        let m = given.load_without_test();
        assert!(
            m.is_err(),
            "4 training images cannot hold the 6,000 of validation"
        );
    }

    /// The only test that touches the process environment (env vars are process-global).
    #[test]
    fn resolve_reads_the_process_environment() {
        let root = tempfile::tempdir().unwrap();
        fill(root.path(), 4);
        let before = std::env::var_os("MNIST_DIR");
        std::env::set_var("MNIST_DIR", root.path());
        let got = DataSource::new(Dataset::Mnist).resolve();
        match before {
            Some(v) => std::env::set_var("MNIST_DIR", v),
            None => std::env::remove_var("MNIST_DIR"),
        }
        assert_eq!(got.unwrap(), root.path());
    }
}

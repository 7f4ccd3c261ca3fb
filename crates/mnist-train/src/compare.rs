//! Comparing finished runs: one row per run folder (from its `results.json`, plus `limit_train` from its
//! `config.json`), and for each configuration trained with several seeds the mean, sample standard
//! deviation, min and max of the test accuracy.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{read_json, RunResults, TrainError, CONFIG_FILE, RESULTS_FILE};

/// One finished run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    /// The run folder.
    pub dir: PathBuf,
    /// conv, separable or inception.
    pub solution: String,
    /// seed or improved.
    pub variant: String,
    /// mnist or fashion.
    pub dataset: String,
    /// All parameters.
    pub params: usize,
    /// Epochs trained.
    pub epochs: usize,
    /// The run's seed.
    pub seed: u64,
    /// Training images used, when limited (`--limit-train`).
    pub limit_train: Option<usize>,
    /// Test accuracy as a fraction.
    pub test_accuracy: f64,
    /// Mean seconds of training per epoch.
    pub seconds_per_epoch: f64,
}

/// What makes runs comparable: the same solution, variant, data set, epochs and training-set size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ConfigKey {
    /// conv, separable or inception.
    pub solution: String,
    /// seed or improved.
    pub variant: String,
    /// mnist or fashion.
    pub dataset: String,
    /// Epochs trained.
    pub epochs: usize,
    /// Training images used, when limited.
    pub limit_train: Option<usize>,
}

/// Test-accuracy statistics of the runs of one configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupStats {
    /// The configuration.
    #[serde(flatten)]
    pub key: ConfigKey,
    /// Number of runs.
    pub runs: usize,
    /// Their seeds, in row order.
    pub seeds: Vec<u64>,
    /// Mean test accuracy.
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator); `None` for a single run.
    pub std: Option<f64>,
    /// Lowest test accuracy.
    pub min: f64,
    /// Highest test accuracy.
    pub max: f64,
}

/// The rows and the per-configuration statistics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// One row per run, in the order found.
    pub runs: Vec<RunRow>,
    /// One entry per configuration with at least two runs, in configuration order.
    pub groups: Vec<GroupStats>,
}

fn is_run(dir: &Path) -> bool {
    dir.join(RESULTS_FILE).is_file()
}

/// The sub-folders of `dir`, sorted by name (entries that cannot be read are skipped).
pub(crate) fn sorted_subfolders(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subs.sort();
    Ok(subs)
}

/// Expands `paths` into run folders: a folder holding `results.json` is a run; any other folder stands for
/// its sub-folders that are runs (sorted by name; unfinished ones are skipped with a warning). Duplicates
/// are dropped. Errors: a path that does not exist, or a folder with no finished run in it.
pub fn find_runs(paths: &[PathBuf]) -> Result<Vec<PathBuf>, TrainError> {
    let mut runs: Vec<PathBuf> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut push = |dir: PathBuf, runs: &mut Vec<PathBuf>| {
        let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        if seen.insert(canonical) {
            runs.push(dir);
        }
    };
    for path in paths {
        if !path.is_dir() {
            return Err(TrainError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a run folder (no such folder)",
                ),
            });
        }
        if is_run(path) {
            push(path.clone(), &mut runs);
            continue;
        }
        let subs = sorted_subfolders(path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let mut found = 0;
        for sub in subs {
            if is_run(&sub) {
                push(sub, &mut runs);
                found += 1;
            } else if sub.join(CONFIG_FILE).is_file() {
                tracing::warn!(dir = %sub.display(), "skipping an unfinished run (no {RESULTS_FILE})");
            }
        }
        if found == 0 {
            return Err(TrainError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no {RESULTS_FILE} in this folder or its sub-folders: not a finished run"
                    ),
                ),
            });
        }
    }
    Ok(runs)
}

/// Reads the row of one run folder.
pub fn load_run(dir: &Path) -> Result<RunRow, TrainError> {
    let results: RunResults = read_json(&dir.join(RESULTS_FILE))?;
    let config = dir.join(CONFIG_FILE);
    let limit_train = if config.is_file() {
        let value: serde_json::Value = read_json(&config)?;
        value
            .get("limit_train")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    } else {
        None
    };
    let secs = &results.epoch_seconds;
    let seconds_per_epoch = if secs.is_empty() {
        0.0
    } else {
        secs.iter().sum::<f64>() / secs.len() as f64
    };
    Ok(RunRow {
        dir: dir.to_path_buf(),
        solution: results.solution,
        variant: results.variant,
        dataset: results.dataset,
        params: results.params_total,
        epochs: results.epochs,
        seed: results.seed,
        limit_train,
        test_accuracy: results.test_accuracy.ok_or_else(|| {
            TrainError::Config(format!(
                "{} was trained with --no-test and has no test accuracy to compare (`evaluate --weights {}` \
                 tests it)",
                dir.display(),
                dir.join(crate::WEIGHTS_FILE).display()
            ))
        })?,
        seconds_per_epoch,
    })
}

/// Mean, sample standard deviation (`None` below two values), min and max.
pub fn stats(values: &[f64]) -> Option<(f64, Option<f64>, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.len() >= 2)
        .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((mean, std, min, max))
}

/// Groups `runs` by configuration and summarises each group of two or more runs.
pub fn group_runs(runs: &[RunRow]) -> Vec<GroupStats> {
    let mut groups: BTreeMap<ConfigKey, Vec<&RunRow>> = BTreeMap::new();
    for r in runs {
        let key = ConfigKey {
            solution: r.solution.clone(),
            variant: r.variant.clone(),
            dataset: r.dataset.clone(),
            epochs: r.epochs,
            limit_train: r.limit_train,
        };
        groups.entry(key).or_default().push(r);
    }
    groups
        .into_iter()
        .filter(|(_, rows)| rows.len() >= 2)
        .filter_map(|(key, rows)| {
            let accs: Vec<f64> = rows.iter().map(|r| r.test_accuracy).collect();
            let (mean, std, min, max) = stats(&accs)?;
            Some(GroupStats {
                key,
                runs: rows.len(),
                seeds: rows.iter().map(|r| r.seed).collect(),
                mean,
                std,
                min,
                max,
            })
        })
        .collect()
}

/// Finds, reads and groups the runs of `paths` (see [`find_runs`]).
pub fn compare(paths: &[PathBuf]) -> Result<Comparison, TrainError> {
    let runs = find_runs(paths)?
        .iter()
        .map(|d| load_run(d))
        .collect::<Result<Vec<_>, _>>()?;
    let groups = group_runs(&runs);
    Ok(Comparison { runs, groups })
}

impl std::fmt::Display for Comparison {
    /// An aligned table of the runs, then one line per configuration with several seeds.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dirs: Vec<String> = self
            .runs
            .iter()
            .map(|r| r.dir.display().to_string())
            .collect();
        let dw = dirs.iter().map(String::len).max().unwrap_or(3).max(3);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<dw$}  {:<10} {:<8} {:<7} {:>6} {:>6} {:>6} {:>7} {:>9} {:>7}",
            "run",
            "solution",
            "variant",
            "dataset",
            "params",
            "epochs",
            "seed",
            "images",
            "test acc",
            "s/epoch"
        );
        for (r, dir) in self.runs.iter().zip(&dirs) {
            let images = r
                .limit_train
                .map(|n| n.to_string())
                .unwrap_or_else(|| "all".into());
            let _ = writeln!(
                out,
                "{dir:<dw$}  {:<10} {:<8} {:<7} {:>6} {:>6} {:>6} {:>7} {:>8.2}% {:>7.1}",
                r.solution,
                r.variant,
                r.dataset,
                r.params,
                r.epochs,
                r.seed,
                images,
                100.0 * r.test_accuracy,
                r.seconds_per_epoch
            );
        }
        if self.groups.is_empty() {
            let _ = write!(out, "\nno configuration was run with more than one seed");
        } else {
            let _ = writeln!(out, "\nsame configuration, several seeds (test accuracy):");
            for (i, g) in self.groups.iter().enumerate() {
                let k = &g.key;
                let images = k
                    .limit_train
                    .map(|n| format!(", {n} images"))
                    .unwrap_or_default();
                let std = g
                    .std
                    .map(|s| format!("{:.2}", 100.0 * s))
                    .unwrap_or_else(|| "-".into());
                let _ = write!(
                    out,
                    "  {} {} on {}, {} epochs{images}: {} runs (seeds {:?}): mean {:.2}% sd {std} min {:.2}% max {:.2}%",
                    k.solution,
                    k.variant,
                    k.dataset,
                    k.epochs,
                    g.runs,
                    g.seeds,
                    100.0 * g.mean,
                    100.0 * g.min,
                    100.0 * g.max
                );
                if i + 1 < self.groups.len() {
                    let _ = writeln!(out);
                }
            }
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(dir: &Path, solution: &str, seed: u64, acc: f64, epochs: usize) {
        std::fs::create_dir_all(dir).unwrap();
        let results = RunResults {
            solution: solution.into(),
            variant: "seed".into(),
            dataset: "mnist".into(),
            params_total: 8640,
            params_trainable: 8580,
            params_non_trainable: 60,
            epochs,
            seed,
            batch_size: 32,
            test_accuracy: Some(acc),
            test_loss: Some(0.1),
            best_val_accuracy: acc,
            final_val_accuracy: acc,
            epoch_seconds: vec![2.0, 4.0],
            confusion: vec![],
            threads: 2,
        };
        crate::write_json(&dir.join(RESULTS_FILE), &results).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), r#"{"limit_train": null}"#).unwrap();
    }

    #[test]
    fn sample_statistics() {
        let (mean, std, min, max) = stats(&[0.98, 0.99, 1.0]).unwrap();
        assert!((mean - 0.99).abs() < 1e-12);
        assert!((std.unwrap() - 0.01).abs() < 1e-12, "sample sd uses n - 1");
        assert_eq!((min, max), (0.98, 1.0));
        assert_eq!(stats(&[0.5]).unwrap().1, None);
        assert!(stats(&[]).is_none());
    }

    #[test]
    fn expands_a_parent_folder_and_groups_by_configuration() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write_run(&root.join("conv-s1"), "conv", 1, 0.98, 2);
        write_run(&root.join("conv-s2"), "conv", 2, 0.99, 2);
        write_run(&root.join("conv-s3-3ep"), "conv", 3, 0.995, 3);
        write_run(&root.join("incep-s1"), "inception", 1, 0.97, 2);
        // An unfinished run is skipped.
        std::fs::create_dir_all(root.join("unfinished")).unwrap();
        std::fs::write(root.join("unfinished").join(CONFIG_FILE), "{}").unwrap();

        // The parent and one of its runs again: duplicates are dropped.
        let cmp = compare(&[root.to_path_buf(), root.join("conv-s1")]).unwrap();
        assert_eq!(cmp.runs.len(), 4);
        assert_eq!(cmp.runs[0].seconds_per_epoch, 3.0);
        assert_eq!(cmp.groups.len(), 1, "{:?}", cmp.groups);
        let g = &cmp.groups[0];
        assert_eq!(
            (g.key.solution.as_str(), g.key.epochs, g.runs),
            ("conv", 2, 2)
        );
        assert_eq!(g.seeds, vec![1, 2]);
        assert!((g.mean - 0.985).abs() < 1e-12);
        assert!((g.std.unwrap() - 0.01 / 2f64.sqrt()).abs() < 1e-12);
        let text = cmp.to_string();
        assert!(text.contains("mean 98.50%"), "{text}");
        assert!(text.contains("min 98.00%"), "{text}");
        let json = serde_json::to_value(&cmp).unwrap();
        assert_eq!(json["groups"][0]["solution"], "conv");
        assert_eq!(json["runs"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn missing_or_empty_folders_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let err = compare(&[tmp.path().join("nope")]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = compare(&[tmp.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("no results.json"), "{err}");
        // A corrupt results.json names the file.
        let run = tmp.path().join("bad");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join(RESULTS_FILE), "{").unwrap();
        let err = compare(&[run]).unwrap_err();
        assert!(err.to_string().contains("results.json"), "{err}");
    }
}

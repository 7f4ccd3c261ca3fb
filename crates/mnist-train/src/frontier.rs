//! `frontier FINAL...`: test accuracy against model size.
//!
//! Reads the `final.json` of final runs (`sweep PLAN --final NAME`, each run tested once) and makes one
//! point per recipe: its parameter count and its test accuracy's mean, standard deviation and minimum over
//! the runs. Writes `frontier.json`, `frontier.txt` (the table, also printed) and `frontier.png` (accuracy
//! against parameters on a log scale, error bars of one standard deviation, the original Keras notebook's
//! three models beside them), and names per solution the smallest recipe whose mean reaches a threshold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mnist_models::{thousands, Solution};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::compare::sorted_subfolders;
use crate::plots::{render, write_png, PlotError, FONT};
use crate::sweep::report::{aligned, Spread, FINAL_JSON};
use crate::{write_bytes_atomic, write_json, TrainError};

/// The figures.
pub const FRONTIER_JSON: &str = "frontier.json";
/// The table.
pub const FRONTIER_TXT: &str = "frontier.txt";
/// The picture.
pub const FRONTIER_PNG: &str = "frontier.png";
/// How deep below a folder `final.json` files are looked for.
const MAX_DEPTH: usize = 4;

/// The command line of `frontier`.
#[derive(clap::Args, Debug, Clone)]
pub struct FrontierArgs {
    /// `final.json` files of final runs, or folders to search for them (e.g. a sweep's `OUT/final`).
    #[arg(value_name = "FINAL", required = true)]
    pub paths: Vec<PathBuf>,
    /// Output folder for frontier.json, frontier.txt and frontier.png.
    #[arg(long, value_name = "DIR", default_value = "runs/frontier")]
    pub out: PathBuf,
    /// The mean test accuracy (percent) a model must reach to count as "smallest reaching".
    #[arg(long, value_name = "PERCENT", default_value = "99.0", value_parser = percent_arg)]
    pub threshold: f64,
}

fn percent_arg(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("must be a percentage from 0 to 100, got {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// Why there is no frontier.
#[derive(Debug, thiserror::Error)]
pub enum FrontierError {
    /// A path given does not exist, or a folder holds no `final.json`.
    #[error("{}: {reason}", path.display())]
    Input {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// The part of `final.json` a point needs.
#[derive(Debug, Deserialize)]
struct FinalFile {
    solution: String,
    recipe: String,
    #[serde(default)]
    args: String,
    runs: Vec<FinalRun>,
}

#[derive(Debug, Deserialize)]
struct FinalRun {
    seed: u64,
    params: usize,
    final_val_accuracy: f64,
    test_accuracy: Option<f64>,
}

/// One recipe of one solution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// conv, separable or inception.
    pub solution: Solution,
    /// The recipe's name.
    pub recipe: String,
    /// Its train flags in words.
    pub args: String,
    /// All parameters (BatchNorm statistics included).
    pub params: usize,
    /// The runs' seeds.
    pub seeds: Vec<u64>,
    /// Test accuracy over the runs.
    pub test: Spread,
    /// Final validation accuracy over the runs.
    pub val: Spread,
    /// The `final.json` it came from.
    pub source: PathBuf,
}

/// The original notebook's model of a solution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Original {
    /// The solution.
    pub solution: Solution,
    /// Its parameters.
    pub params: usize,
    /// The notebook's test accuracy (one run).
    pub test_accuracy: f64,
}

/// `frontier.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Frontier {
    /// Every point, by solution, then parameters.
    pub points: Vec<Point>,
    /// The threshold of `smallest`, as a fraction.
    pub threshold: f64,
    /// Per solution measured, the recipe with the fewest parameters whose mean reaches the threshold
    /// (`None`: none does).
    pub smallest: BTreeMap<String, Option<String>>,
    /// The original notebook's models.
    pub originals: Vec<Original>,
}

/// The `final.json` files that `paths` name: a file itself, or every `final.json` in a folder and its
/// sub-folders (sorted). Errors: a path that does not exist, or a folder without any.
pub fn find_finals(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FrontierError> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), FrontierError> {
        let here = dir.join(FINAL_JSON);
        if here.is_file() {
            out.push(here);
            return Ok(());
        }
        if depth == 0 {
            return Ok(());
        }
        let subs = sorted_subfolders(dir).map_err(|e| FrontierError::Input {
            path: dir.to_path_buf(),
            reason: format!("cannot read the folder: {e}"),
        })?;
        for sub in subs {
            walk(&sub, depth - 1, out)?;
        }
        Ok(())
    }
    let mut found = Vec::new();
    for path in paths {
        if path.is_file() {
            found.push(path.clone());
        } else if path.is_dir() {
            let before = found.len();
            walk(path, MAX_DEPTH, &mut found)?;
            if found.len() == before {
                return Err(FrontierError::Input {
                    path: path.clone(),
                    reason: format!("no {FINAL_JSON} in this folder or below (run `sweep PLAN --final NAME` first)"),
                });
            }
        } else {
            return Err(FrontierError::Input {
                path: path.clone(),
                reason: "no such file or folder".into(),
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    found.retain(|p| seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())));
    Ok(found)
}

fn point_of(path: &Path) -> Result<Point, FrontierError> {
    let bad = |reason: String| FrontierError::Input {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let file: FinalFile = serde_json::from_str(&text)
        .map_err(|e| bad(format!("not the final.json of final runs: {e}")))?;
    let solution: Solution = file
        .solution
        .parse()
        .map_err(|_| bad(format!("solution: unknown solution '{}'", file.solution)))?;
    let Some(first) = file.runs.first() else {
        return Err(bad("runs: no finished run".into()));
    };
    if let Some(r) = file.runs.iter().find(|r| r.params != first.params) {
        return Err(bad(format!(
            "runs: seed {} has {} parameters, seed {} has {}: not one model",
            r.seed, r.params, first.seed, first.params
        )));
    }
    let mut tests = Vec::with_capacity(file.runs.len());
    for r in &file.runs {
        match r.test_accuracy {
            Some(t) if (0.0..=1.0).contains(&t) => tests.push(t),
            Some(t) => {
                return Err(bad(format!(
                    "runs: seed {}: test accuracy {t} is not a fraction",
                    r.seed
                )))
            }
            None => {
                return Err(bad(format!(
                    "runs: seed {} has no test accuracy (not a final run?)",
                    r.seed
                )))
            }
        }
    }
    let vals: Vec<f64> = file.runs.iter().map(|r| r.final_val_accuracy).collect();
    let spread = |v: &[f64]| Spread::of(v).ok_or_else(|| bad("runs: no finished run".into()));
    Ok(Point {
        solution,
        recipe: file.recipe,
        args: file.args,
        params: first.params,
        seeds: file.runs.iter().map(|r| r.seed).collect(),
        test: spread(&tests)?,
        val: spread(&vals)?,
        source: path.to_path_buf(),
    })
}

impl Frontier {
    /// The frontier of the final runs that `paths` name (see [`find_finals`]); `threshold` is a fraction.
    pub fn from_paths(paths: &[PathBuf], threshold: f64) -> Result<Self, FrontierError> {
        let mut points = Vec::new();
        for file in find_finals(paths)? {
            let p = point_of(&file)?;
            if let Some(q) = points
                .iter()
                .find(|q: &&Point| q.solution == p.solution && q.recipe == p.recipe)
            {
                return Err(FrontierError::Input {
                    path: file,
                    reason: format!(
                        "{} '{}' is also in {}: one final.json per recipe",
                        p.solution,
                        p.recipe,
                        q.source.display()
                    ),
                });
            }
            points.push(p);
        }
        Ok(Self::new(points, threshold))
    }

    /// The frontier of `points`.
    pub fn new(mut points: Vec<Point>, threshold: f64) -> Self {
        let order = |s: Solution| Solution::ALL.iter().position(|&x| x == s);
        points.sort_by(|a, b| {
            (order(a.solution), a.params, &a.recipe).cmp(&(order(b.solution), b.params, &b.recipe))
        });
        let mut smallest = BTreeMap::new();
        for s in Solution::ALL {
            let mine: Vec<&Point> = points.iter().filter(|p| p.solution == s).collect();
            if mine.is_empty() {
                continue;
            }
            // Points are sorted by parameters: the first that reaches is the smallest.
            let hit = mine.iter().find(|p| p.test.mean >= threshold - 1e-12);
            smallest.insert(s.to_string(), hit.map(|p| p.recipe.clone()));
        }
        let originals = Solution::ALL
            .iter()
            .map(|&s| Original {
                solution: s,
                params: s.param_budget(),
                test_accuracy: s.original_test_accuracy(),
            })
            .collect();
        Self {
            points,
            threshold,
            smallest,
            originals,
        }
    }

    /// The table, the smallest recipes reaching the threshold and the originals.
    pub fn table(&self) -> String {
        let mut rows = vec![vec![
            "solution".to_string(),
            "recipe".into(),
            "params".into(),
            "runs".into(),
            "test acc (mean ± sd)".into(),
            "min".into(),
            "max".into(),
            "val acc (mean)".into(),
        ]];
        for p in &self.points {
            let sd = p
                .test
                .sd
                .map(|s| format!(" ± {:.2}", 100.0 * s))
                .unwrap_or_default();
            rows.push(vec![
                p.solution.to_string(),
                p.recipe.clone(),
                thousands(p.params),
                p.test.n.to_string(),
                format!("{:.2}%{sd}", 100.0 * p.test.mean),
                format!("{:.2}%", 100.0 * p.test.min),
                format!("{:.2}%", 100.0 * p.test.max),
                format!("{:.2}%", 100.0 * p.val.mean),
            ]);
        }
        let mut out = aligned(&rows);
        out.push_str(&format!(
            "\nsmallest with a mean test accuracy of at least {:.2}%:\n",
            100.0 * self.threshold
        ));
        for (solution, hit) in &self.smallest {
            let line = match hit {
                Some(name) => {
                    let p = self
                        .points
                        .iter()
                        .find(|p| p.solution.name() == solution && &p.recipe == name)
                        .expect("smallest names a point");
                    format!(
                        "{name} ({} params, {:.2}%)",
                        thousands(p.params),
                        100.0 * p.test.mean
                    )
                }
                None => "none of those measured".into(),
            };
            out.push_str(&format!("  {solution}: {line}\n"));
        }
        out.push_str("original Keras notebook (one run each):");
        for o in &self.originals {
            out.push_str(&format!(
                " {} {} params {:.2}%;",
                o.solution,
                thousands(o.params),
                100.0 * o.test_accuracy
            ));
        }
        out.pop();
        out.push('\n');
        out
    }

    /// Writes `frontier.json` and `frontier.txt` into `out`, then `frontier.png` (a picture that cannot be
    /// made is returned, not fatal).
    pub fn write(&self, out: &Path) -> Result<Option<PlotError>, FrontierError> {
        std::fs::create_dir_all(out).map_err(|source| TrainError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        write_json(&out.join(FRONTIER_JSON), self)?;
        write_bytes_atomic(&out.join(FRONTIER_TXT), self.table().as_bytes())?;
        Ok(write_png(out, FRONTIER_PNG, frontier_png(self)).err())
    }
}

fn colour(s: Solution) -> RGBColor {
    match s {
        Solution::Conv => RGBColor(31, 119, 180),
        Solution::Separable => RGBColor(255, 127, 14),
        Solution::Inception => RGBColor(44, 160, 44),
    }
}

/// `frontier.png`: per solution, test accuracy (mean, error bar of one sd) against parameters on a log
/// scale, joined by a line; the originals as hollow triangles; the threshold as a dashed line.
pub fn frontier_png(f: &Frontier) -> Result<Vec<u8>, PlotError> {
    let file = FRONTIER_PNG;
    if f.points.is_empty() {
        return Err(PlotError::Input {
            file,
            reason: "no points".into(),
        });
    }
    let pct = |v: f64| 100.0 * v;
    let sd = |p: &Point| p.test.sd.unwrap_or(0.0);
    let mut lo = pct(f.threshold);
    let mut hi = pct(f.threshold);
    let mut xmin = f64::MAX;
    let mut xmax = f64::MIN;
    for p in &f.points {
        lo = lo.min(pct(p.test.mean - sd(p)));
        hi = hi.max(pct(p.test.mean + sd(p)));
        xmin = xmin.min(p.params as f64);
        xmax = xmax.max(p.params as f64);
    }
    for o in &f.originals {
        lo = lo.min(pct(o.test_accuracy));
        hi = hi.max(pct(o.test_accuracy));
        xmin = xmin.min(o.params as f64);
        xmax = xmax.max(o.params as f64);
    }
    let pad = ((hi - lo) * 0.08).max(0.05);
    let (lo, hi) = (lo - pad, hi + pad);
    let (xmin, xmax) = (xmin / 1.25, xmax * 1.25);
    render(file, (900, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "MNIST test accuracy after 10 epochs against parameters (mean ± sd over seeds)",
                (FONT, 18),
            )
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d((xmin..xmax).log_scale(), lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("parameters (log scale)")
            .y_desc("test accuracy (%)")
            .x_label_formatter(&|x| thousands(x.round() as usize))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .label_style((FONT, 13))
            .draw()?;
        let grey = RGBColor(120, 120, 120);
        let t = pct(f.threshold);
        let dashes: Vec<(f64, f64)> = {
            let (a, b) = (xmin.ln(), xmax.ln());
            (0..=60)
                .map(|i| ((a + (b - a) * i as f64 / 60.0).exp(), t))
                .collect()
        };
        chart
            .draw_series(
                dashes
                    .chunks(2)
                    .map(|seg| PathElement::new(seg.to_vec(), grey.stroke_width(1))),
            )?
            .label(format!("{t:.2}%"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], grey.stroke_width(1))
            });
        for s in Solution::ALL {
            let mine: Vec<&Point> = f.points.iter().filter(|p| p.solution == s).collect();
            if mine.is_empty() {
                continue;
            }
            let c = colour(s);
            chart
                .draw_series(LineSeries::new(
                    mine.iter().map(|p| (p.params as f64, pct(p.test.mean))),
                    c.stroke_width(2),
                ))?
                .label(s.to_string())
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
            chart.draw_series(mine.iter().map(|p| {
                ErrorBar::new_vertical(
                    p.params as f64,
                    pct(p.test.mean - sd(p)),
                    pct(p.test.mean),
                    pct(p.test.mean + sd(p)),
                    c.stroke_width(2),
                    10,
                )
            }))?;
            chart.draw_series(
                mine.iter()
                    .map(|p| Circle::new((p.params as f64, pct(p.test.mean)), 4, c.filled())),
            )?;
        }
        chart
            .draw_series(f.originals.iter().map(|o| {
                TriangleMarker::new(
                    (o.params as f64, pct(o.test_accuracy)),
                    7,
                    colour(o.solution).stroke_width(2),
                )
            }))?
            .label("original Keras notebook (1 run)")
            .legend(|(x, y)| TriangleMarker::new((x + 8, y), 6, BLACK.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font((FONT, 13))
            .draw()?;
        Ok(())
    })
}

/// Runs `frontier` as `args` say: prints the table and where the files went.
pub fn run(args: &FrontierArgs) -> Result<(), FrontierError> {
    let frontier = Frontier::from_paths(&args.paths, args.threshold / 100.0)?;
    let plot = frontier.write(&args.out)?;
    print!("{}", frontier.table());
    if let Some(e) = plot {
        tracing::warn!("{e}");
    }
    println!("saved {}", args.out.join(FRONTIER_JSON).display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn final_json(
        dir: &Path,
        solution: &str,
        recipe: &str,
        params: usize,
        tests: &[f64],
    ) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let runs: Vec<String> = tests
            .iter()
            .enumerate()
            .map(|(i, t)| {
                format!(
                    r#"{{"recipe": "{recipe}", "seed": {}, "dir": "x", "final_val_accuracy": 0.99,
                    "best_val_accuracy": 0.99, "test_accuracy": {t}, "params": {params}, "epochs": 10,
                    "seconds_per_epoch": 1.0}}"#,
                    i + 1
                )
            })
            .collect();
        let path = dir.join(FINAL_JSON);
        std::fs::write(
            &path,
            format!(
                r#"{{"solution": "{solution}", "recipe": "{recipe}", "args": "--arch a.json", "runs": [{}]}}"#,
                runs.join(",")
            ),
        )
        .unwrap();
        path
    }

    #[test]
    fn points_sorted_smallest_reaching_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("final");
        final_json(&root.join("big"), "conv", "big", 8000, &[0.995, 0.993]);
        final_json(&root.join("small"), "conv", "small", 1000, &[0.985, 0.987]);
        final_json(&root.join("mid"), "conv", "mid", 2000, &[0.990, 0.992]);
        let sep = final_json(&tmp.path().join("s"), "separable", "tiny", 900, &[0.97]);
        let f = Frontier::from_paths(&[root, sep], 0.99).unwrap();
        let names: Vec<&str> = f.points.iter().map(|p| p.recipe.as_str()).collect();
        assert_eq!(names, ["small", "mid", "big", "tiny"]);
        assert_eq!(f.smallest["conv"].as_deref(), Some("mid"));
        assert_eq!(f.smallest["separable"], None);
        assert!(!f.smallest.contains_key("inception"));
        let mid = &f.points[1];
        assert!((mid.test.mean - 0.991).abs() < 1e-12);
        assert_eq!((mid.test.n, mid.params), (2, 2000));
        assert_eq!(f.points[3].test.sd, None, "one run has no sd");
        let table = f.table();
        assert!(
            table.contains("conv: mid (2,000 params, 99.10%)"),
            "{table}"
        );
        assert!(
            table.contains("separable: none of those measured"),
            "{table}"
        );
        assert!(table.contains("conv 8,640 params 99.20%"), "{table}");
        let out = tmp.path().join("out");
        assert!(f.write(&out).unwrap().is_none(), "the picture is drawn");
        for file in [FRONTIER_JSON, FRONTIER_TXT, FRONTIER_PNG] {
            assert!(out.join(file).is_file(), "{file}");
        }
        let png = image::open(out.join(FRONTIER_PNG)).unwrap();
        assert_eq!((png.width(), png.height()), (900, 560));
    }

    #[test]
    fn bad_inputs_name_the_file_and_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let err = |paths: &[PathBuf]| Frontier::from_paths(paths, 0.99).unwrap_err().to_string();
        let missing = tmp.path().join("nope");
        assert!(err(&[missing]).contains("no such file or folder"));
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(err(&[empty]).contains("no final.json"));
        let junk = tmp.path().join("junk.json");
        std::fs::write(&junk, "{\"solution\": \"conv\"").unwrap();
        let e = err(&[junk]);
        assert!(
            e.contains("junk.json") && e.contains("not the final.json"),
            "{e}"
        );
        let a = final_json(&tmp.path().join("a"), "conv", "x", 100, &[0.9]);
        let b = final_json(&tmp.path().join("b"), "conv", "x", 100, &[0.9]);
        assert!(err(&[a, b]).contains("one final.json per recipe"));
        let odd = final_json(&tmp.path().join("odd"), "mlp", "x", 100, &[0.9]);
        assert!(err(&[odd]).contains("unknown solution 'mlp'"));
        let untested = tmp.path().join("untested").join(FINAL_JSON);
        std::fs::create_dir_all(untested.parent().unwrap()).unwrap();
        std::fs::write(
            &untested,
            r#"{"solution": "conv", "recipe": "x", "runs": [{"seed": 3, "params": 5,
               "final_val_accuracy": 0.9}]}"#,
        )
        .unwrap();
        assert!(err(&[untested]).contains("seed 3 has no test accuracy"));
    }
}

//! What a sweep reports: `sweep.json` (every run, every candidate's statistics and verdict), the same as
//! a table (`sweep.txt`, also printed) and `sweep.png` (the paired differences with their intervals); for
//! final runs, `final/<name>/final.json` and `final.txt`.

use std::path::{Path, PathBuf};

use mnist_models::{thousands, Solution};
use plotters::prelude::*;
use serde::Serialize;

use super::plan::{Candidate, Plan};
use super::stats::{PairedStats, Verdict};
use super::SweepError;
use crate::compare;
use crate::plots::{render, write_png, PlotError, FONT};
use crate::{write_bytes_atomic, write_json, RunResults};

/// The sweep's figures.
pub const SWEEP_JSON: &str = "sweep.json";
/// The sweep's table.
pub const SWEEP_TXT: &str = "sweep.txt";
/// The paired differences with error bars.
pub const SWEEP_PNG: &str = "sweep.png";
/// The final runs' figures.
pub const FINAL_JSON: &str = "final.json";
/// The final runs' table.
pub const FINAL_TXT: &str = "final.txt";

/// One finished run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Its recipe.
    pub recipe: String,
    /// Its seed.
    pub seed: u64,
    /// Its run folder.
    pub dir: PathBuf,
    /// Validation accuracy after the last epoch (what the sweep compares).
    pub final_val_accuracy: f64,
    /// Best validation accuracy over the epochs.
    pub best_val_accuracy: f64,
    /// Test accuracy: only final runs have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// All parameters.
    pub params: usize,
    /// Epochs trained.
    pub epochs: usize,
    /// Mean seconds of training per epoch.
    pub seconds_per_epoch: f64,
}

impl RunReport {
    /// The row of a finished run in `dir`.
    pub fn new(recipe: &str, dir: PathBuf, r: &RunResults) -> Self {
        let secs = &r.epoch_seconds;
        Self {
            recipe: recipe.to_string(),
            seed: r.seed,
            dir,
            final_val_accuracy: r.final_val_accuracy,
            best_val_accuracy: r.best_val_accuracy,
            test_accuracy: r.test_accuracy,
            params: r.params_total,
            epochs: r.epochs,
            seconds_per_epoch: secs.iter().sum::<f64>() / secs.len().max(1) as f64,
        }
    }
}

/// Where a candidate stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The verdict of its latest look.
    pub verdict: Verdict,
    /// True once it has stopped (its verdict is final).
    pub decided: bool,
    /// True when it stopped before the plan's last seed.
    pub stopped_early: bool,
    /// In words.
    pub note: String,
}

impl Status {
    /// Stopped with `verdict` at look `k` (0-based) after `n` seeds.
    pub fn decided(verdict: Verdict, k: usize, plan: &Plan, n: usize) -> Self {
        let looks = plan.looks.len();
        let stopped_early = k + 1 < looks;
        let note = if stopped_early {
            format!("stopped after {n} seeds (look {} of {looks})", k + 1)
        } else {
            format!("all {n} seeds")
        };
        Self {
            verdict,
            decided: true,
            stopped_early,
            note,
        }
    }

    /// Still running, at `stats` so far.
    pub fn running(stats: &PairedStats) -> Self {
        Self {
            verdict: stats.verdict,
            decided: false,
            stopped_early: false,
            note: format!("continues ({} seeds so far)", stats.n),
        }
    }
}

/// The baseline or a candidate, with its runs and (candidates) its paired statistics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecipeReport {
    /// Its name.
    pub name: String,
    /// Its train flags in words.
    pub args: String,
    /// Parameters of its model (from its runs).
    pub params: Option<usize>,
    /// Mean final validation accuracy over its runs.
    pub mean_val_accuracy: Option<f64>,
    /// Its runs (for a candidate, those its statistics use).
    pub runs: Vec<RunReport>,
    /// Candidate minus baseline on each seed of `runs`, in the same order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diffs: Vec<f64>,
    /// The paired statistics at its latest look (candidates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<PairedStats>,
    /// Its verdict and whether it stopped (candidates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl RecipeReport {
    /// The entry of `recipe`.
    pub fn new(
        recipe: &Candidate,
        runs: Vec<RunReport>,
        diffs: Vec<f64>,
        stats: Option<PairedStats>,
        status: Option<Status>,
    ) -> Self {
        let vals: Vec<f64> = runs.iter().map(|r| r.final_val_accuracy).collect();
        Self {
            name: recipe.name.clone(),
            args: recipe.describe(),
            params: runs.first().map(|r| r.params),
            mean_val_accuracy: compare::stats(&vals).map(|s| s.0),
            runs,
            diffs,
            stats,
            status,
        }
    }
}

/// `sweep.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepReport {
    /// The plan file.
    pub plan: PathBuf,
    /// conv, separable or inception.
    pub solution: String,
    /// The baseline.
    pub baseline: RecipeReport,
    /// The candidates, in plan order.
    pub candidates: Vec<RecipeReport>,
    /// The plan's seeds.
    pub seeds: Vec<u64>,
    /// The seed counts of the looks.
    pub looks: Vec<usize>,
    /// Looks taken so far.
    pub looks_done: usize,
    /// The confidence the verdicts hold at, over all looks.
    pub confidence: f64,
    /// The confidence of each look's interval.
    pub look_confidence: f64,
    /// The sequential rule in words.
    pub rule: String,
    /// True once every candidate has its final verdict.
    pub complete: bool,
}

/// `0.95` as `95%`, `0.98333` as `98.33%`.
pub fn percent(c: f64) -> String {
    let s = format!("{:.2}", 100.0 * c);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Seeds in words: `101-108` for a run of consecutive seeds, else `1, 5, 9`.
pub fn seed_list(seeds: &[u64]) -> String {
    let consecutive = seeds.windows(2).all(|w| w[1] == w[0] + 1);
    match (seeds.first(), seeds.last()) {
        (Some(a), Some(b)) if consecutive && seeds.len() > 2 => format!("{a}-{b}"),
        _ => seeds
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The sequential rule, stated for a report.
pub fn rule(confidence: f64, looks: usize, level: f64) -> String {
    format!(
        "verdicts hold at {} confidence over all {looks} look(s): each look uses the two-sided {} Student-t \
         interval of the paired difference (Bonferroni: 1 - {}/{looks}); a candidate whose interval lies \
         below zero is worse and stops, above zero better (and stops unless the plan says \
         \"stop_when_better\": false)",
        percent(confidence),
        percent(level),
        format!("{:.4}", 1.0 - confidence)
            .trim_end_matches('0')
            .trim_end_matches('.')
    )
}

/// The lines a sweep starts with.
pub fn header(solution: Solution, plan: &Plan, level: f64) -> String {
    let looks: Vec<String> = plan.looks.iter().map(|n| n.to_string()).collect();
    format!(
        "sweep {} ({solution}): baseline '{}' ({}) against {} candidate(s) on seeds {}; looks after {} seeds\n{}",
        plan.path.display(),
        plan.baseline.name,
        plan.baseline.describe(),
        plan.candidates.len(),
        seed_list(&plan.seeds),
        looks.join(", "),
        rule(plan.confidence, plan.looks.len(), level)
    )
}

/// Left-aligned first column, right-aligned numbers, two spaces apart; the last column free.
pub(crate) fn aligned(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width = |c: usize| {
        rows.iter()
            .filter_map(|r| r.get(c))
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..cols).map(width).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let w = widths[c];
            if c == 0 || c + 1 == cols {
                line.push_str(&format!("{cell:<w$}"));
            } else {
                line.push_str(&format!("{cell:>w$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn pp(v: f64) -> String {
    format!("{:+.3}", 100.0 * v)
}

impl SweepReport {
    /// The table: one row per recipe (the baseline first), differences in percentage points.
    pub fn table(&self) -> String {
        let level = percent(self.look_confidence);
        let mut rows = vec![vec![
            "recipe".to_string(),
            "params".into(),
            "seeds".into(),
            "val acc".into(),
            "diff (pp)".into(),
            "se (pp)".into(),
            format!("{level} interval (pp)"),
            "verdict".into(),
        ]];
        let num =
            |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "-".into());
        let b = &self.baseline;
        rows.push(vec![
            b.name.clone(),
            b.params.map(thousands).unwrap_or_else(|| "-".into()),
            b.runs.len().to_string(),
            num(b.mean_val_accuracy, &|v| format!("{:.3}%", 100.0 * v)),
            "-".into(),
            "-".into(),
            "-".into(),
            "baseline".into(),
        ]);
        for c in &self.candidates {
            let s = c.stats.as_ref();
            let verdict = match &c.status {
                Some(st) => format!("{}: {}", st.verdict, st.note),
                None => "not yet compared".into(),
            };
            rows.push(vec![
                c.name.clone(),
                c.params.map(thousands).unwrap_or_else(|| "-".into()),
                c.runs.len().to_string(),
                num(c.mean_val_accuracy, &|v| format!("{:.3}%", 100.0 * v)),
                num(s.map(|s| s.mean), &pp),
                num(s.map(|s| s.se), &|v| format!("{:.3}", 100.0 * v)),
                s.map(|s| format!("[{}, {}]", pp(s.interval.0), pp(s.interval.1)))
                    .unwrap_or_else(|| "-".into()),
                verdict,
            ]);
        }
        let mut out = aligned(&rows);
        out.push_str("\nrecipes:\n");
        for r in std::iter::once(&self.baseline).chain(&self.candidates) {
            out.push_str(&format!("  {}: {}\n", r.name, r.args));
        }
        if !self.complete {
            out.push_str(&format!(
                "\nnot complete: {} of {} looks taken; run the same command again to go on\n",
                self.looks_done,
                self.looks.len()
            ));
        }
        out
    }

    /// Writes `sweep.json` and `sweep.txt` into `out`, then `sweep.png` (a picture that cannot be made is
    /// returned, not fatal).
    pub fn write(&self, out: &Path) -> Result<Option<PlotError>, SweepError> {
        std::fs::create_dir_all(out).map_err(|source| SweepError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        write_json(&out.join(SWEEP_JSON), self)?;
        let text = format!(
            "sweep {} ({})\n{}\n\n{}",
            self.plan.display(),
            self.solution,
            self.rule,
            self.table()
        );
        write_bytes_atomic(&out.join(SWEEP_TXT), text.as_bytes())?;
        Ok(write_png(out, SWEEP_PNG, sweep_png(self)).err())
    }
}

/// `sweep.png`: per candidate, its paired differences (percentage points; small grey dots, one per seed),
/// their mean and its interval at the look confidence (an error bar: green when better, red when worse,
/// blue when undecided), and the zero line.
pub fn sweep_png(report: &SweepReport) -> Result<Vec<u8>, PlotError> {
    let file = SWEEP_PNG;
    let compared: Vec<&RecipeReport> = report
        .candidates
        .iter()
        .filter(|c| c.stats.is_some())
        .collect();
    if compared.is_empty() {
        return Err(PlotError::Input {
            file,
            reason: "no candidate has been compared yet".into(),
        });
    }
    let pp = |v: f64| 100.0 * v;
    let mut lo = 0.0f64;
    let mut hi = 0.0f64;
    for c in &compared {
        for &d in &c.diffs {
            lo = lo.min(pp(d));
            hi = hi.max(pp(d));
        }
        if let Some(s) = c.stats {
            lo = lo.min(pp(s.interval.0));
            hi = hi.max(pp(s.interval.1));
        }
    }
    let pad = ((hi - lo) * 0.1).max(0.01);
    let (lo, hi) = (lo - pad, hi + pad);
    let k = compared.len() as i32;
    let width = (160 + 120 * compared.len() as u32).max(520);
    let names: Vec<String> = compared.iter().map(|c| c.name.clone()).collect();
    let caption = format!(
        "{} vs '{}': final val accuracy difference, {} intervals",
        report.solution,
        report.baseline.name,
        percent(report.look_confidence)
    );
    render(file, (width, 440), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, (FONT, 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(70)
            // `a..b` segments hold a to b inclusive: one segment per candidate.
            .build_cartesian_2d((0..k - 1).into_segmented(), lo..hi)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("candidate - baseline (percentage points)")
            .x_labels(compared.len() + 1)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .label_style((FONT, 13))
            .draw()?;
        chart.draw_series(LineSeries::new(
            [(SegmentValue::Exact(0), 0.0), (SegmentValue::Last, 0.0)],
            BLACK.stroke_width(1),
        ))?;
        for (i, c) in compared.iter().enumerate() {
            let x = SegmentValue::CenterOf(i as i32);
            let grey = RGBColor(150, 150, 150);
            chart.draw_series(
                c.diffs
                    .iter()
                    .map(|&d| Circle::new((x.clone(), pp(d)), 3, grey.filled())),
            )?;
            let Some(s) = c.stats else { continue };
            let colour = match s.verdict {
                Verdict::Better => RGBColor(44, 160, 44),
                Verdict::Worse => RGBColor(214, 39, 40),
                Verdict::Undecided => RGBColor(31, 119, 180),
            };
            chart.draw_series(std::iter::once(ErrorBar::new_vertical(
                x.clone(),
                pp(s.interval.0),
                pp(s.mean),
                pp(s.interval.1),
                colour.stroke_width(2),
                16,
            )))?;
            chart.draw_series(std::iter::once(Circle::new(
                (x, pp(s.mean)),
                5,
                colour.filled(),
            )))?;
        }
        Ok(())
    })
}

/// Mean, sample standard deviation, min and max of some accuracies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Number of runs.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (`None` for one run).
    pub sd: Option<f64>,
    /// Lowest.
    pub min: f64,
    /// Highest.
    pub max: f64,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Option<Self> {
        compare::stats(values).map(|(mean, sd, min, max)| Spread {
            n: values.len(),
            mean,
            sd,
            min,
            max,
        })
    }

    pub(crate) fn describe(&self) -> String {
        let sd = self
            .sd
            .map(|s| format!(" ± {:.2} (sd)", 100.0 * s))
            .unwrap_or_default();
        format!(
            "mean {:.2}%{sd}, min {:.2}%, max {:.2}% over {} run(s)",
            100.0 * self.mean,
            100.0 * self.min,
            100.0 * self.max,
            self.n
        )
    }
}

/// `final/<name>/final.json`: the chosen recipe on fresh seeds, each run tested once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FinalReport {
    /// conv, separable or inception.
    pub solution: String,
    /// The recipe's name.
    pub recipe: String,
    /// Its train flags in words.
    pub args: String,
    /// The runs, in seed order.
    pub runs: Vec<RunReport>,
    /// Test accuracy over the runs.
    pub test: Option<Spread>,
    /// Final validation accuracy over the runs.
    pub val: Option<Spread>,
}

impl FinalReport {
    /// The report of `recipe`'s final `runs`.
    pub fn new(solution: Solution, recipe: &Candidate, runs: Vec<RunReport>) -> Self {
        let tests: Vec<f64> = runs.iter().filter_map(|r| r.test_accuracy).collect();
        let vals: Vec<f64> = runs.iter().map(|r| r.final_val_accuracy).collect();
        Self {
            solution: solution.to_string(),
            recipe: recipe.name.clone(),
            args: recipe.describe(),
            test: Spread::of(&tests),
            val: Spread::of(&vals),
            runs,
        }
    }

    /// One row per run, then the test accuracy's mean, standard deviation, min and max.
    pub fn table(&self) -> String {
        let mut rows = vec![vec![
            "seed".to_string(),
            "params".into(),
            "val acc".into(),
            "test acc".into(),
            "run folder".into(),
        ]];
        for r in &self.runs {
            rows.push(vec![
                r.seed.to_string(),
                thousands(r.params),
                format!("{:.2}%", 100.0 * r.final_val_accuracy),
                r.test_accuracy
                    .map(|t| format!("{:.2}%", 100.0 * t))
                    .unwrap_or_else(|| "-".into()),
                r.dir.display().to_string(),
            ]);
        }
        let mut out = format!(
            "final runs of {} '{}' ({})\n",
            self.solution, self.recipe, self.args
        );
        out.push_str(&aligned(&rows));
        if let Some(t) = &self.test {
            out.push_str(&format!("test accuracy: {}\n", t.describe()));
        }
        if let Some(v) = &self.val {
            out.push_str(&format!("val accuracy: {}\n", v.describe()));
        }
        out
    }

    /// Writes `final.json` and `final.txt` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), SweepError> {
        std::fs::create_dir_all(dir).map_err(|source| SweepError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_json(&dir.join(FINAL_JSON), self)?;
        write_bytes_atomic(&dir.join(FINAL_TXT), self.table().as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::stats::paired_stats;

    fn run(recipe: &str, seed: u64, val: f64) -> RunReport {
        RunReport {
            recipe: recipe.into(),
            seed,
            dir: PathBuf::from(format!("out/{recipe}/seed-{seed}")),
            final_val_accuracy: val,
            best_val_accuracy: val,
            test_accuracy: None,
            params: 8030,
            epochs: 10,
            seconds_per_epoch: 10.0,
        }
    }

    fn report() -> SweepReport {
        let plan = Plan::parse(
            Path::new("p.json"),
            r#"{"baseline": {"name": "base"}, "candidates": [{"name": "lr", "args": {"lr": 0.02}},
                {"name": "bad", "args": ["--no-augment"]}], "seeds": [1, 2, 3, 4], "rounds": [3]}"#,
        )
        .unwrap();
        let base: Vec<RunReport> = (1..=4)
            .map(|s| run("base", s, 0.99 + 0.0005 * s as f64))
            .collect();
        let lr: Vec<RunReport> = (1..=4)
            .map(|s| {
                run(
                    "lr",
                    s,
                    0.9905 + 0.0005 * s as f64 + 0.0001 * (s % 2) as f64,
                )
            })
            .collect();
        let bad: Vec<RunReport> = (1..=3)
            .map(|s| run("bad", s, 0.985 + 0.0001 * s as f64))
            .collect();
        let diffs = |c: &[RunReport]| -> Vec<f64> {
            c.iter()
                .zip(&base)
                .map(|(c, b)| c.final_val_accuracy - b.final_val_accuracy)
                .collect()
        };
        let (d_lr, d_bad) = (diffs(&lr), diffs(&bad));
        let s_lr = paired_stats(&d_lr, 0.975).unwrap();
        let s_bad = paired_stats(&d_bad, 0.975).unwrap();
        SweepReport {
            plan: plan.path.clone(),
            solution: "conv".into(),
            baseline: RecipeReport::new(&plan.baseline, base.clone(), vec![], None, None),
            candidates: vec![
                RecipeReport::new(
                    &plan.candidates[0],
                    lr,
                    d_lr,
                    Some(s_lr),
                    Some(Status::decided(s_lr.verdict, 1, &plan, 4)),
                ),
                RecipeReport::new(
                    &plan.candidates[1],
                    bad,
                    d_bad,
                    Some(s_bad),
                    Some(Status::decided(s_bad.verdict, 0, &plan, 3)),
                ),
            ],
            seeds: plan.seeds.clone(),
            looks: plan.looks.clone(),
            looks_done: 2,
            confidence: 0.95,
            look_confidence: 0.975,
            rule: rule(0.95, 2, 0.975),
            complete: true,
        }
    }

    #[test]
    fn the_table_shows_every_recipe_with_its_verdict() {
        let r = report();
        let table = r.table();
        assert!(table.contains("97.5% interval (pp)"), "{table}");
        let bad = table.lines().find(|l| l.starts_with("bad")).unwrap();
        assert!(
            bad.contains("worse: stopped after 3 seeds (look 1 of 2)"),
            "{table}"
        );
        assert!(bad.contains("-0.5"), "{table}");
        let lr = table.lines().find(|l| l.starts_with("lr ")).unwrap();
        assert!(lr.contains("all 4 seeds"), "{table}");
        assert!(table.contains("lr: --lr 0.02"), "{table}");
        assert!(table.contains("base: (recipe)"), "{table}");
        assert!(r.rule.contains("Bonferroni: 1 - 0.05/2"), "{}", r.rule);
    }

    #[test]
    fn outputs_are_written_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let r = report();
        assert!(
            r.write(dir.path()).unwrap().is_none(),
            "the picture is made"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(SWEEP_JSON)).unwrap())
                .unwrap();
        assert_eq!(json["candidates"][1]["status"]["verdict"], "worse");
        assert_eq!(json["candidates"][1]["runs"].as_array().unwrap().len(), 3);
        assert!(json["candidates"][0]["stats"]["interval"][0].is_f64());
        let png = std::fs::read(dir.path().join(SWEEP_PNG)).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert!(img.width() >= 520);
        assert!(std::fs::read_to_string(dir.path().join(SWEEP_TXT))
            .unwrap()
            .contains("baseline"));
    }

    #[test]
    fn words() {
        assert_eq!(percent(0.95), "95%");
        assert_eq!(percent(0.983_333), "98.33%");
        assert_eq!(seed_list(&[101, 102, 103]), "101-103");
        assert_eq!(seed_list(&[1, 5]), "1, 5");
    }
}

//! `sweep PLAN.json`: a paired-seed comparison of recipes as a command.
//!
//! A plan ([`plan`]) names a baseline, candidates and seeds. Every (recipe, seed) is an ordinary run
//! folder `OUT/<recipe>/seed-<n>`, trained by a child process of this program (`train --quiet --no-test
//! --seed n --out ...` plus the recipe's flags), `--jobs` at once ([`runner`]); the test split is never
//! loaded. Seeds run in rounds; after each, every candidate's paired differences of final validation
//! accuracy against the baseline give an interval and a verdict, and decided candidates stop
//! ([`stats`] states the rule). The results are `sweep.json`, `sweep.txt` and `sweep.png` in OUT
//! ([`report`]). A sweep that was stopped resumes where it stopped: finished runs are reused, unfinished
//! ones resumed from their checkpoints.
//!
//! `sweep PLAN.json --final NAME[,NAME...] --seeds ...` trains the chosen recipes on fresh seeds (never the sweep's)
//! into `OUT/final/<name>/seed-<n>`, testing each finished run once, and reports the test accuracy's
//! mean, standard deviation and minimum.

pub mod plan;
pub mod report;
pub mod runner;
pub mod stats;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use mnist_models::Solution;

use crate::{
    read_json, RunResults, TrainConfig, TrainError, CHECKPOINT_FILE, CONFIG_FILE, RESULTS_FILE,
};
use plan::{Candidate, Plan};
use report::{FinalReport, RecipeReport, RunReport, SweepReport};
use runner::{Job, Launcher};
use stats::{decide, paired_stats, per_look_confidence, Decision, PairedStats, Verdict};

/// The command line of `sweep`.
#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// The plan (JSON): {"baseline": {"name", "arch"?, "args"?}, "candidates": [...], "seeds": [..] or
    /// {"first", "count"}, "rounds"?, "confidence"?, "args"? (shared train flags), "final"?}.
    #[arg(value_name = "PLAN.json")]
    pub plan: PathBuf,
    /// Training runs at once, each a process with (cores / N) threads.
    #[arg(long, default_value = "1", value_name = "N")]
    pub jobs: NonZeroUsize,
    /// Output folder [default: runs/sweep-<plan file name>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Final-run mode: train CANDIDATE (several: comma-separated, one pool of runs; without a name: the
    /// plan's "final" section) on fresh seeds, then test each finished run once.
    #[arg(long = "final", value_name = "CANDIDATE[,CANDIDATE...]", num_args = 0..=1)]
    pub final_run: Option<Option<String>>,
    /// The fresh seeds of the final runs, comma-separated [default: the plan's "final" seeds].
    #[arg(
        long,
        value_delimiter = ',',
        requires = "final_run",
        value_name = "SEEDS"
    )]
    pub seeds: Vec<u64>,
    /// Folder with the IDX files, passed to every run (a sweep needs only the two training files).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// The settings `train` would run with, given its arguments (`train ...`, as the child gets them), or why
/// it refuses them. The command line supplies it, so the sweep knows no flag of `train`.
pub type Settings<'a> = &'a dyn Fn(&[String]) -> Result<TrainConfig, String>;

/// Errors of a sweep.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The plan file cannot be read.
    #[error("{}: {source}", path.display())]
    PlanIo {
        /// The plan file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The plan is malformed, or `train` refuses a recipe's settings.
    #[error("{}: {field}: {reason}", path.display())]
    Plan {
        /// The plan file.
        path: PathBuf,
        /// Where in the plan (`candidates[1].args`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A bad flag of `sweep` itself.
    #[error("{0}")]
    Usage(String),
    /// A run folder holds a run with other settings than the plan gives it.
    #[error(
        "{} holds a run with other settings than the plan's '{recipe}' (its config.json differs): the \
         plan changed since it was trained? Move or delete the folder, or use another --out", dir.display()
    )]
    Conflict {
        /// The run folder.
        dir: PathBuf,
        /// The recipe the plan trains there.
        recipe: String,
    },
    /// A training run failed.
    #[error("run '{recipe}' seed {seed} failed ({status}); its log {}: {tail}", log.display())]
    RunFailed {
        /// The recipe.
        recipe: String,
        /// The seed.
        seed: u64,
        /// How the process ended.
        status: String,
        /// Its log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// The program could not be started.
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Ctrl-C (or SIGTERM) stopped the sweep.
    #[error(
        "the sweep was stopped by a signal with {unfinished} run(s) unfinished (each keeps its last complete \
         epoch): run the same command again to go on from there"
    )]
    Interrupted {
        /// Runs stopped or not started.
        unfinished: usize,
    },
    /// Reading or writing run files failed.
    #[error(transparent)]
    Train(#[from] TrainError),
}

impl SweepError {
    /// True for errors of the plan or the flags (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            SweepError::PlanIo { .. } | SweepError::Plan { .. } | SweepError::Usage(_)
        )
    }

    /// True when a signal stopped the sweep.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, SweepError::Interrupted { .. })
    }
}

/// The default output folder of a plan: `runs/sweep-<plan file name without .json>`.
pub fn default_out(plan: &Path) -> PathBuf {
    let stem = plan.file_stem().unwrap_or_default().to_string_lossy();
    PathBuf::from("runs").join(format!("sweep-{stem}"))
}

/// The folder of a sweep run.
pub fn run_dir(out: &Path, recipe: &str, seed: u64) -> PathBuf {
    out.join(recipe).join(format!("seed-{seed}"))
}

/// The folder of a final run.
pub fn final_dir(out: &Path, recipe: &str, seed: u64) -> PathBuf {
    run_dir(&out.join("final"), recipe, seed)
}

/// What a sweep needs besides the plan.
struct Ctx<'a> {
    solution: Solution,
    plan: Plan,
    out: PathBuf,
    data_dir: Option<PathBuf>,
    settings: Settings<'a>,
    launcher: Launcher<'a>,
}

/// What a run folder holds, for the run the plan wants there.
enum Found {
    /// A finished run with the plan's settings.
    Finished(Box<RunResults>),
    /// An unfinished run with the plan's settings and a checkpoint.
    Resume,
    /// Nothing to keep (no run, or a run that stopped before its first checkpoint).
    Fresh,
}

impl Ctx<'_> {
    /// `train` arguments of `recipe`'s run with `seed` in `dir` (`test`: evaluate the test split at the end).
    fn train_args(&self, recipe: &Candidate, seed: u64, dir: &Path, test: bool) -> Vec<String> {
        let mut args: Vec<String> = ["train", "--quiet", "--seed"].map(String::from).into();
        args.push(seed.to_string());
        args.push("--out".into());
        args.push(dir.to_string_lossy().into_owned());
        if !test {
            args.push("--no-test".into());
        }
        args.extend(self.data_args());
        args.extend(recipe.train_args());
        args
    }

    fn data_args(&self) -> Vec<String> {
        match &self.data_dir {
            Some(d) => vec!["--data-dir".into(), d.to_string_lossy().into_owned()],
            None => vec![],
        }
    }

    /// The settings `train` gives `args`; a refusal is a plan error at the recipe.
    fn settings_of(&self, recipe: &Candidate, args: &[String]) -> Result<TrainConfig, SweepError> {
        (self.settings)(args).map_err(|reason| SweepError::Plan {
            path: self.plan.path.clone(),
            field: self.plan.field_of(&recipe.name),
            reason: format!("train refuses its settings: {reason}"),
        })
    }

    /// The job for `recipe`'s run with `seed` in `dir`, or its results when the folder holds it finished.
    fn job_or_results(
        &self,
        recipe: &Candidate,
        seed: u64,
        dir: PathBuf,
        test: bool,
    ) -> Result<Result<RunResults, Job>, SweepError> {
        let mut args = self.train_args(recipe, seed, &dir, test);
        let expected = self.settings_of(recipe, &args)?;
        match inspect(&dir, &expected, &recipe.name)? {
            Found::Finished(results) => return Ok(Ok(*results)),
            Found::Resume => {
                args = ["train", "--resume"].map(String::from).into();
                args.push(dir.to_string_lossy().into_owned());
                args.push("--quiet".into());
                args.extend(self.data_args());
            }
            Found::Fresh => {
                if dir.exists() {
                    args.push("--overwrite".into());
                }
            }
        }
        Ok(Err(Job {
            recipe: recipe.name.clone(),
            seed,
            dir,
            args,
        }))
    }
}

/// What `dir` holds of the run with settings `expected`.
fn inspect(dir: &Path, expected: &TrainConfig, recipe: &str) -> Result<Found, SweepError> {
    let config = dir.join(CONFIG_FILE);
    if !config.is_file() {
        return Ok(Found::Fresh);
    }
    let same = read_json::<TrainConfig>(&config)
        .map(|old| old.same_settings(expected))
        .unwrap_or(false);
    if !same {
        return Err(SweepError::Conflict {
            dir: dir.to_path_buf(),
            recipe: recipe.to_string(),
        });
    }
    if dir.join(RESULTS_FILE).is_file() {
        return Ok(Found::Finished(Box::new(read_json(
            &dir.join(RESULTS_FILE),
        )?)));
    }
    if dir.join(CHECKPOINT_FILE).is_file() {
        return Ok(Found::Resume);
    }
    Ok(Found::Fresh)
}

/// Runs `sweep` as `args` say: the comparison, or with `--final` the final runs. `settings` is how
/// `train` reads its flags; `stop` is set by Ctrl-C.
pub fn run(
    solution: Solution,
    args: &SweepArgs,
    settings: Settings<'_>,
    stop: &AtomicBool,
) -> Result<(), SweepError> {
    let plan = Plan::load(&args.plan)?;
    let out = args.out.clone().unwrap_or_else(|| default_out(&plan.path));
    let program = std::env::current_exe().map_err(|source| SweepError::Io {
        path: PathBuf::from("(this program)"),
        source,
    })?;
    let jobs = args.jobs.get();
    let ctx = Ctx {
        solution,
        out,
        data_dir: args.data_dir.clone(),
        settings,
        launcher: Launcher {
            program,
            jobs,
            threads: Launcher::threads_for(jobs),
            stop,
        },
        plan,
    };
    // Every recipe's flags are checked before anything runs.
    for recipe in ctx.plan.recipes() {
        let seed = ctx.plan.seeds[0];
        let dir = run_dir(&ctx.out, &recipe.name, seed);
        ctx.settings_of(recipe, &ctx.train_args(recipe, seed, &dir, false))?;
    }
    match &args.final_run {
        None => sweep(&ctx),
        Some(name) => final_runs(&ctx, name.as_deref(), &args.seeds),
    }
}

/// The runs of one look: every recipe in `recipes` on `seeds`, reusing finished ones.
fn train_all(
    ctx: &Ctx<'_>,
    recipes: &[&Candidate],
    seeds: &[u64],
    dir_of: &dyn Fn(&str, u64) -> PathBuf,
    test: bool,
    runs: &mut BTreeMap<(String, u64), RunReport>,
) -> Result<(), SweepError> {
    let mut jobs = Vec::new();
    for &seed in seeds {
        for recipe in recipes {
            let key = (recipe.name.clone(), seed);
            if runs.contains_key(&key) {
                continue;
            }
            let dir = dir_of(&recipe.name, seed);
            match ctx.job_or_results(recipe, seed, dir.clone(), test)? {
                Ok(results) => {
                    runs.insert(key, RunReport::new(&recipe.name, dir, &results));
                }
                Err(job) => jobs.push(job),
            }
        }
    }
    if jobs.is_empty() {
        return Ok(());
    }
    let total = jobs.len();
    println!(
        "training {total} run(s), {} at a time, {} thread(s) each (logs beside the run folders)",
        ctx.launcher.jobs.min(total),
        ctx.launcher.threads
    );
    let mut finished = 0;
    ctx.launcher.run(jobs, &mut |job: &Job,
                                 results: &RunResults,
                                 seconds: f64| {
        finished += 1;
        let test = results
            .test_accuracy
            .map(|t| format!(", test {:.2}%", 100.0 * t))
            .unwrap_or_default();
        println!(
            "  [{finished}/{total}] {} seed {}: val {:.2}%{test} ({seconds:.0} s)",
            job.recipe,
            job.seed,
            100.0 * results.final_val_accuracy
        );
        runs.insert(
            (job.recipe.clone(), job.seed),
            RunReport::new(&job.recipe, job.dir.clone(), results),
        );
    })
}

/// Where a candidate stands.
#[derive(Clone, Copy, Default)]
struct Track {
    /// Its statistics at its latest look.
    stats: Option<PairedStats>,
    /// The look (0-based) at which it stopped, and its verdict.
    decided: Option<(usize, Verdict)>,
}

fn sweep(ctx: &Ctx<'_>) -> Result<(), SweepError> {
    let plan = &ctx.plan;
    let looks = plan.looks.len();
    let level = per_look_confidence(plan.confidence, looks);
    println!("{}", report::header(ctx.solution, plan, level));
    let mut runs: BTreeMap<(String, u64), RunReport> = BTreeMap::new();
    let mut tracks = vec![Track::default(); plan.candidates.len()];
    let mut looks_done = 0;
    for (k, &n) in plan.looks.iter().enumerate() {
        let active: Vec<usize> = (0..plan.candidates.len())
            .filter(|&i| tracks[i].decided.is_none())
            .collect();
        if active.is_empty() {
            break;
        }
        let seeds = &plan.seeds[..n];
        println!(
            "\nround {} of {looks}: seeds {} for {} and {} candidate(s)",
            k + 1,
            report::seed_list(seeds),
            plan.baseline.name,
            active.len()
        );
        let recipes: Vec<&Candidate> = std::iter::once(&plan.baseline)
            .chain(active.iter().map(|&i| &plan.candidates[i]))
            .collect();
        let dir_of = |name: &str, seed: u64| run_dir(&ctx.out, name, seed);
        let trained = train_all(ctx, &recipes, seeds, &dir_of, false, &mut runs);
        if let Err(e) = trained {
            // What is finished is reported before the error.
            let _ = write_sweep(ctx, &runs, &tracks, looks_done, level, false);
            return Err(e);
        }
        looks_done = k + 1;
        let last = k + 1 == looks;
        for &i in &active {
            let name = &plan.candidates[i].name;
            let diffs = paired_diffs(&runs, &plan.baseline.name, name, seeds);
            let Some(stats) = paired_stats(&diffs, level) else {
                continue;
            };
            tracks[i].stats = Some(stats);
            if let Decision::Stop(v) = decide(&stats, last, plan.stop_when_better) {
                tracks[i].decided = Some((k, v));
            }
        }
        let all_decided = tracks.iter().all(|t| t.decided.is_some());
        let done = last || all_decided;
        let report = write_sweep(ctx, &runs, &tracks, looks_done, level, done)?;
        println!(
            "\nafter look {} of {looks} ({n} seeds):\n{}",
            k + 1,
            report.table()
        );
        if done {
            break;
        }
    }
    println!("saved {}", ctx.out.join(report::SWEEP_JSON).display());
    Ok(())
}

/// Candidate minus baseline final validation accuracy on each of `seeds`.
fn paired_diffs(
    runs: &BTreeMap<(String, u64), RunReport>,
    baseline: &str,
    candidate: &str,
    seeds: &[u64],
) -> Vec<f64> {
    seeds
        .iter()
        .filter_map(|&s| {
            let b = runs.get(&(baseline.to_string(), s))?;
            let c = runs.get(&(candidate.to_string(), s))?;
            Some(c.final_val_accuracy - b.final_val_accuracy)
        })
        .collect()
}

/// Builds the sweep's report from what is known and writes it (JSON, text, picture; a picture that cannot
/// be made is logged, never fatal).
fn write_sweep(
    ctx: &Ctx<'_>,
    runs: &BTreeMap<(String, u64), RunReport>,
    tracks: &[Track],
    looks_done: usize,
    level: f64,
    complete: bool,
) -> Result<SweepReport, SweepError> {
    let plan = &ctx.plan;
    let recipe_runs = |name: &str, seeds: &[u64]| -> Vec<RunReport> {
        seeds
            .iter()
            .filter_map(|&s| runs.get(&(name.to_string(), s)).cloned())
            .collect()
    };
    let base = &plan.baseline.name;
    let baseline = RecipeReport::new(
        &plan.baseline,
        recipe_runs(base, &plan.seeds),
        vec![],
        None,
        None,
    );
    let candidates = plan
        .candidates
        .iter()
        .zip(tracks)
        .map(|(c, t)| {
            let status = match (t.decided, t.stats) {
                (Some((k, v)), Some(s)) => Some(report::Status::decided(v, k, plan, s.n)),
                (None, Some(s)) => Some(report::Status::running(&s)),
                _ => None,
            };
            // Only the seeds its statistics used (a later plan may have trained more).
            let used = &plan.seeds[..t.stats.map_or(0, |s| s.n)];
            let diffs = paired_diffs(runs, base, &c.name, used);
            RecipeReport::new(c, recipe_runs(&c.name, used), diffs, t.stats, status)
        })
        .collect();
    let report = SweepReport {
        plan: plan.path.clone(),
        solution: ctx.solution.to_string(),
        baseline,
        candidates,
        seeds: plan.seeds.clone(),
        looks: plan.looks.clone(),
        looks_done,
        confidence: plan.confidence,
        look_confidence: level,
        rule: report::rule(plan.confidence, plan.looks.len(), level),
        complete,
    };
    if let Some(e) = report.write(&ctx.out)? {
        tracing::warn!("{e}");
    }
    Ok(report)
}

fn final_runs(ctx: &Ctx<'_>, names: Option<&str>, flag_seeds: &[u64]) -> Result<(), SweepError> {
    let plan = &ctx.plan;
    let names: Vec<String> = match (names, &plan.final_run) {
        (Some(n), _) => n.split(',').map(|s| s.trim().to_string()).collect(),
        (None, Some(f)) => vec![f.candidate.clone()],
        (None, None) => {
            return Err(SweepError::Usage(format!(
                "--final without a candidate needs a \"final\" section in {}: name one with --final CANDIDATE",
                plan.path.display()
            )))
        }
    };
    let mut recipes: Vec<&Candidate> = Vec::with_capacity(names.len());
    for name in &names {
        let Some(recipe) = plan.recipe(name) else {
            let known: Vec<&str> = plan.recipes().map(|c| c.name.as_str()).collect();
            return Err(SweepError::Usage(format!(
                "--final {name:?}: {} has no such recipe (one of: {})",
                plan.path.display(),
                known.join(", ")
            )));
        };
        if recipes.iter().any(|r| r.name == recipe.name) {
            return Err(SweepError::Usage(format!(
                "--final: '{name}' is listed twice"
            )));
        }
        recipes.push(recipe);
    }
    let listed = names.join(", ");
    let seeds: Vec<u64> = if !flag_seeds.is_empty() {
        flag_seeds.to_vec()
    } else if let Some(f) = &plan.final_run {
        f.seeds.clone()
    } else {
        return Err(SweepError::Usage(format!(
            "--final {listed} needs --seeds (fresh ones), or a \"final\" section in {}",
            plan.path.display()
        )));
    };
    let mut unique = seeds.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != seeds.len() {
        return Err(SweepError::Usage("--seeds: a seed is listed twice".into()));
    }
    plan::check_fresh(&seeds, &plan.seeds)
        .map_err(|e| SweepError::Usage(format!("--seeds: {e}")))?;
    for recipe in &recipes {
        println!(
            "final runs of '{}' ({}) on seeds {}, each tested once when it has finished",
            recipe.name,
            recipe.describe(),
            report::seed_list(&seeds)
        );
    }
    let mut runs = BTreeMap::new();
    let dir_of = |name: &str, seed: u64| final_dir(&ctx.out, name, seed);
    train_all(ctx, &recipes, &seeds, &dir_of, true, &mut runs)?;
    for recipe in recipes {
        let name = &recipe.name;
        let mine: Vec<RunReport> = seeds
            .iter()
            .filter_map(|&s| runs.get(&(name.clone(), s)).cloned())
            .collect();
        let report = FinalReport::new(ctx.solution, recipe, mine);
        let dir = ctx.out.join("final").join(name);
        report.write(&dir)?;
        println!("\n{}", report.table());
        println!("saved {}", dir.join(report::FINAL_JSON).display());
    }
    Ok(())
}

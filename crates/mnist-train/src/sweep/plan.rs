//! The sweep plan: a JSON file naming a baseline, candidates (each a set of `train` flags and/or an
//! architecture file) and the seeds. Read once, checked whole, before any run starts.
//!
//! ```json
//! {
//!   "baseline": { "name": "base" },
//!   "candidates": [
//!     { "name": "lr-2e-2", "args": { "lr": 0.02 } },
//!     { "name": "wide", "arch": "wide.json", "args": ["--clean-epochs", "1"] }
//!   ],
//!   "args": { "epochs": 10 },
//!   "seeds": { "first": 101, "count": 8 },
//!   "rounds": [3, 6, 8],
//!   "confidence": 0.95,
//!   "final": { "candidate": "wide", "seeds": [1, 2, 3, 4, 5] }
//! }
//! ```
//!
//! `args` are `train` flags, as an object (`"flag": value`; `true` = the flag alone, `false` = left out)
//! or a list of command-line words. The top-level `args` go to every run; a candidate's own replace them
//! flag by flag. Paths (`arch`, and the files of [`PATH_FLAGS`] such as `"teacher": "a.safetensors,b.safetensors"`)
//! are relative to the plan file. The sweep never lets train parse what it
//! sets itself (seed, output folder, resume, test split).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::SweepError;

/// `train` flags a plan may not set: the sweep sets them for every run (`arch` is a candidate's field).
pub const RESERVED_FLAGS: [&str; 11] = [
    "seed",
    "out",
    "resume",
    "overwrite",
    "quiet",
    "no-test",
    "data-dir",
    "pause-after-epoch",
    "arch",
    "help",
    "h",
];

/// `train` flags whose value is a comma-separated list of files: a plan gives them relative to itself.
pub const PATH_FLAGS: [&str; 1] = ["teacher"];

/// One `train` flag with its value (`None` for a switch such as `--no-augment`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// The flag's name without the leading `--`.
    pub name: String,
    /// Its value, as written on a command line.
    pub value: Option<String>,
}

/// A recipe to train: the baseline or a candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its name (also its folder in the sweep's output).
    pub name: String,
    /// Its architecture file, resolved against the plan's folder.
    pub arch: Option<PathBuf>,
    /// The `train` flags of its runs: the plan's shared flags, then its own.
    pub flags: Vec<Flag>,
}

impl Candidate {
    /// The `train` arguments the candidate adds to every run (`--arch FILE` first).
    pub fn train_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(arch) = &self.arch {
            args.push("--arch".to_string());
            args.push(arch.to_string_lossy().into_owned());
        }
        for flag in &self.flags {
            args.push(format!("--{}", flag.name));
            args.extend(flag.value.clone());
        }
        args
    }

    /// The flags as one line, for tables (`--lr 0.02 --no-augment`, or `(recipe)` when none).
    pub fn describe(&self) -> String {
        let args = self.train_args();
        if args.is_empty() {
            "(recipe)".to_string()
        } else {
            args.join(" ")
        }
    }
}

/// The final-run section: which candidate, on which fresh seeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalPlan {
    /// The chosen candidate (or the baseline), by name.
    pub candidate: String,
    /// Fresh seeds, none of them in the plan's `seeds`.
    pub seeds: Vec<u64>,
}

/// A checked plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The plan file.
    pub path: PathBuf,
    /// What every candidate is compared against.
    pub baseline: Candidate,
    /// The recipes compared with the baseline.
    pub candidates: Vec<Candidate>,
    /// Every seed a candidate may be trained on, in the order they are used.
    pub seeds: Vec<u64>,
    /// The seed counts after which the differences are looked at (increasing, the last = all seeds).
    pub looks: Vec<usize>,
    /// The confidence every verdict holds at (over all looks).
    pub confidence: f64,
    /// Stop a candidate as soon as it is clearly better (else it runs on to the last seed).
    pub stop_when_better: bool,
    /// The final-run section, if the plan has one.
    pub final_run: Option<FinalPlan>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    baseline: RawCandidate,
    candidates: Vec<RawCandidate>,
    seeds: Value,
    #[serde(default)]
    rounds: Option<Vec<usize>>,
    #[serde(default)]
    confidence: Option<f64>,
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    stop_when_better: Option<bool>,
    #[serde(default, rename = "final")]
    final_run: Option<RawFinal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCandidate {
    name: String,
    #[serde(default)]
    arch: Option<PathBuf>,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFinal {
    candidate: String,
    seeds: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedRange {
    first: u64,
    count: usize,
}

impl Plan {
    /// Reads and checks the plan in `path`.
    pub fn load(path: &Path) -> Result<Plan, SweepError> {
        let text = std::fs::read_to_string(path).map_err(|source| SweepError::PlanIo {
            path: path.to_path_buf(),
            source,
        })?;
        Plan::parse(path, &text)
    }

    /// Checks the plan `text` read from `path` (paths in it are relative to `path`'s folder).
    pub fn parse(path: &Path, text: &str) -> Result<Plan, SweepError> {
        let err = |field: &str, reason: String| SweepError::Plan {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let raw: RawPlan = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "(top level)".to_string()
            } else {
                field
            };
            err(&field, e.into_inner().to_string())
        })?;
        de.end()
            .map_err(|e| err("(top level)", format!("text after the plan: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new(""));

        let shared = match &raw.args {
            Some(v) => flags_of(v).map_err(|reason| err("args", reason))?,
            None => Vec::new(),
        };
        let candidate = |raw: &RawCandidate, field: &str| -> Result<Candidate, SweepError> {
            check_name(&raw.name).map_err(|reason| err(&format!("{field}.name"), reason))?;
            let own = match &raw.args {
                Some(v) => flags_of(v).map_err(|reason| err(&format!("{field}.args"), reason))?,
                None => Vec::new(),
            };
            let mut flags: Vec<Flag> = shared
                .iter()
                .filter(|f| f.value.as_deref() != Some(OFF))
                .filter(|f| !own.iter().any(|o| o.name == f.name))
                .cloned()
                .collect();
            flags.extend(own.into_iter().filter(|f| f.value.as_deref() != Some(OFF)));
            for flag in flags.iter_mut() {
                if let (true, Some(value)) = (PATH_FLAGS.contains(&flag.name.as_str()), &flag.value)
                {
                    let joined: Vec<String> = value
                        .split(',')
                        .map(|p| dir.join(p).to_string_lossy().into_owned())
                        .collect();
                    flag.value = Some(joined.join(","));
                }
            }
            Ok(Candidate {
                name: raw.name.clone(),
                arch: raw.arch.as_ref().map(|a| dir.join(a)),
                flags,
            })
        };
        let baseline = candidate(&raw.baseline, "baseline")?;
        let mut names = BTreeSet::from([baseline.name.clone()]);
        let mut candidates = Vec::with_capacity(raw.candidates.len());
        for (i, c) in raw.candidates.iter().enumerate() {
            let field = format!("candidates[{i}]");
            let c = candidate(c, &field)?;
            if !names.insert(c.name.clone()) {
                return Err(err(
                    &format!("{field}.name"),
                    format!("'{}' names two recipes: names must be unique", c.name),
                ));
            }
            candidates.push(c);
        }
        if candidates.is_empty() {
            return Err(err(
                "candidates",
                "no candidates: name at least one recipe to compare with the baseline".into(),
            ));
        }

        let seeds = seeds_of(&raw.seeds).map_err(|reason| err("seeds", reason))?;
        if seeds.len() < 2 {
            return Err(err(
                "seeds",
                "a comparison needs at least 2 seeds (a standard error needs two differences)"
                    .into(),
            ));
        }
        let looks = match raw.rounds {
            None => super::stats::default_looks(seeds.len()),
            Some(rounds) => {
                check_rounds(&rounds, seeds.len()).map_err(|reason| err("rounds", reason))?;
                let mut looks = rounds;
                if looks.last() != Some(&seeds.len()) {
                    looks.push(seeds.len());
                }
                looks
            }
        };
        let confidence = raw.confidence.unwrap_or(0.95);
        if !(confidence > 0.0 && confidence < 1.0) {
            return Err(err(
                "confidence",
                format!("must be between 0 and 1 (e.g. 0.95), got {confidence}"),
            ));
        }
        let final_run = match raw.final_run {
            None => None,
            Some(f) => {
                if !names.contains(&f.candidate) {
                    return Err(err(
                        "final.candidate",
                        format!(
                            "'{}' is not a recipe of this plan (one of: {})",
                            f.candidate,
                            join(&names)
                        ),
                    ));
                }
                let fresh = seeds_of(&f.seeds).map_err(|reason| err("final.seeds", reason))?;
                check_fresh(&fresh, &seeds).map_err(|reason| err("final.seeds", reason))?;
                Some(FinalPlan {
                    candidate: f.candidate,
                    seeds: fresh,
                })
            }
        };
        Ok(Plan {
            path: path.to_path_buf(),
            baseline,
            candidates,
            seeds,
            looks,
            confidence,
            stop_when_better: raw.stop_when_better.unwrap_or(true),
            final_run,
        })
    }

    /// The baseline, then the candidates.
    pub fn recipes(&self) -> impl Iterator<Item = &Candidate> {
        std::iter::once(&self.baseline).chain(&self.candidates)
    }

    /// The baseline or candidate called `name`.
    pub fn recipe(&self, name: &str) -> Option<&Candidate> {
        self.recipes().find(|c| c.name == name)
    }

    /// Where a recipe is described in the plan, for errors: `baseline` or `candidates[i]`, with its name.
    pub fn field_of(&self, name: &str) -> String {
        match self.candidates.iter().position(|c| c.name == name) {
            Some(i) => format!("candidates[{i}] ({name})"),
            None => format!("baseline ({name})"),
        }
    }
}

/// Marks a flag that an object's `false` leaves out (it still replaces a shared flag of that name).
const OFF: &str = "\u{0}off";

fn join(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// A name that is safe as a folder name: letters, digits, `.`, `_` and `-`, not starting with `.`, and
/// not `final` (the folder of the final runs).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "'{name}' holds '{c}': a name may hold letters, digits, '.', '_' and '-' only (it is a folder name)"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("'{name}' starts with '.'"));
    }
    if name == "final" {
        return Err("'final' is the folder of the final runs: choose another name".into());
    }
    Ok(())
}

fn check_flag_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(format!(
            "'{name}' is not a flag name (lower-case words joined by '-', as `train --help` lists them)"
        ));
    }
    if RESERVED_FLAGS.contains(&name) {
        let why = if name == "arch" {
            "give the architecture as the recipe's \"arch\" field (a path relative to the plan)"
        } else {
            "the sweep sets it for every run"
        };
        return Err(format!("--{name} may not be set in a plan: {why}"));
    }
    Ok(())
}

/// The flags of an `args` value: an object `{"lr": 0.02, "no-augment": true}` or a list of words
/// `["--lr", "0.02", "--no-augment"]`.
fn flags_of(value: &Value) -> Result<Vec<Flag>, String> {
    let mut flags: Vec<Flag> = Vec::new();
    let push = |flag: Flag, flags: &mut Vec<Flag>| -> Result<(), String> {
        check_flag_name(&flag.name)?;
        if flags.iter().any(|f| f.name == flag.name) {
            return Err(format!("--{} is given twice", flag.name));
        }
        flags.push(flag);
        Ok(())
    };
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let name = key.strip_prefix("--").unwrap_or(key).to_string();
                let value = match v {
                    Value::Bool(true) => None,
                    Value::Bool(false) => Some(OFF.to_string()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::String(s) => Some(s.clone()),
                    other => {
                        return Err(format!(
                            "\"{key}\": {other} is not a flag value (use a number, a string, or true for a switch)"
                        ))
                    }
                };
                push(Flag { name, value }, &mut flags).map_err(|e| format!("\"{key}\": {e}"))?;
            }
        }
        Value::Array(words) => {
            let mut words = words.iter().enumerate().peekable();
            while let Some((i, word)) = words.next() {
                let Value::String(word) = word else {
                    return Err(format!("[{i}]: {word} is not a string (a list holds command-line words)"));
                };
                let Some(flag) = word.strip_prefix("--") else {
                    return Err(format!("[{i}]: '{word}' is not a flag (flags start with --)"));
                };
                let (name, value) = match flag.split_once('=') {
                    Some((name, value)) => (name.to_string(), Some(value.to_string())),
                    None => {
                        let value = match words.peek() {
                            Some((_, Value::String(next))) if !next.starts_with("--") => {
                                let next = next.clone();
                                words.next();
                                Some(next)
                            }
                            _ => None,
                        };
                        (flag.to_string(), value)
                    }
                };
                push(Flag { name, value }, &mut flags).map_err(|e| format!("[{i}]: {e}"))?;
            }
        }
        other => {
            return Err(format!(
                "{other} is neither an object of flags ({{\"lr\": 0.02}}) nor a list of words ([\"--lr\", \"0.02\"])"
            ))
        }
    }
    Ok(flags)
}

/// Seeds: a list `[1, 2, 3]` or a range `{"first": 101, "count": 8}`; no seed twice.
fn seeds_of(value: &Value) -> Result<Vec<u64>, String> {
    let seeds: Vec<u64> = match value {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .ok_or_else(|| format!("[{i}]: {v} is not a seed (a whole number of at least 0)"))
            })
            .collect::<Result<_, _>>()?,
        Value::Object(_) => {
            let range: SeedRange = serde_json::from_value(value.clone())
                .map_err(|e| format!("{e} (a range is {{\"first\": 101, \"count\": 8}})"))?;
            if range.count == 0 {
                return Err("count must be at least 1".into());
            }
            (0..range.count as u64)
                .map(|i| range.first.checked_add(i))
                .collect::<Option<_>>()
                .ok_or("the range runs past the largest seed")?
        }
        other => {
            return Err(format!(
                "{other} is neither a list of seeds ([1, 2, 3]) nor a range ({{\"first\": 101, \"count\": 8}})"
            ))
        }
    };
    let mut seen = BTreeSet::new();
    if let Some(s) = seeds.iter().find(|s| !seen.insert(**s)) {
        return Err(format!("seed {s} is listed twice"));
    }
    if seeds.is_empty() {
        return Err("no seeds".into());
    }
    Ok(seeds)
}

fn check_rounds(rounds: &[usize], seeds: usize) -> Result<(), String> {
    if rounds.is_empty() {
        return Err("no rounds: list the seed counts to look at, e.g. [3, 6]".into());
    }
    if rounds[0] < 2 {
        return Err(format!(
            "the first look is after {} seed(s): it needs at least 2 (a standard error needs two differences)",
            rounds[0]
        ));
    }
    if let Some(w) = rounds.windows(2).find(|w| w[1] <= w[0]) {
        return Err(format!("must increase: {} then {}", w[0], w[1]));
    }
    if let Some(&last) = rounds.last().filter(|&&l| l > seeds) {
        return Err(format!(
            "looks after {last} seeds, but the plan has {seeds}"
        ));
    }
    Ok(())
}

/// Refuses final seeds that the sweep used for choosing.
pub fn check_fresh(fresh: &[u64], used: &[u64]) -> Result<(), String> {
    let reused: Vec<String> = fresh
        .iter()
        .filter(|s| used.contains(s))
        .map(|s| s.to_string())
        .collect();
    if !reused.is_empty() {
        return Err(format!(
            "seed(s) {} were used by the sweep to choose the recipe: the final runs need fresh seeds",
            reused.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Plan, SweepError> {
        Plan::parse(Path::new("plans/p.json"), text)
    }

    fn error(text: &str) -> String {
        let e = parse(text).unwrap_err();
        assert!(e.is_usage(), "{e}");
        e.to_string()
    }

    const GOOD: &str = r#"{
        "baseline": {"name": "base"},
        "candidates": [
            {"name": "lr", "args": {"lr": 0.02, "no-augment": true, "epochs": false}},
            {"name": "wide", "arch": "specs/wide.json", "args": ["--clean-epochs", "1", "--schedule=constant"]}
        ],
        "args": {"epochs": 3, "limit-train": "1000"},
        "seeds": {"first": 101, "count": 5},
        "final": {"candidate": "wide", "seeds": [1, 2]}
    }"#;

    #[test]
    fn a_good_plan_merges_shared_flags_and_resolves_paths() {
        let plan = parse(GOOD).unwrap();
        assert_eq!(plan.seeds, vec![101, 102, 103, 104, 105]);
        assert_eq!(plan.looks, vec![3, 5]);
        assert_eq!(plan.confidence, 0.95);
        assert!(plan.stop_when_better);
        assert_eq!(
            plan.baseline.train_args(),
            ["--epochs", "3", "--limit-train", "1000"]
        );
        // "epochs": false removes the shared --epochs.
        assert_eq!(
            plan.candidates[0].train_args(),
            ["--limit-train", "1000", "--lr", "0.02", "--no-augment"]
        );
        assert_eq!(
            plan.candidates[1].train_args(),
            [
                "--arch",
                "plans/specs/wide.json",
                "--epochs",
                "3",
                "--limit-train",
                "1000",
                "--clean-epochs",
                "1",
                "--schedule",
                "constant"
            ]
        );
        assert_eq!(
            plan.final_run,
            Some(FinalPlan {
                candidate: "wide".into(),
                seeds: vec![1, 2]
            })
        );
        assert_eq!(plan.field_of("wide"), "candidates[1] (wide)");
        assert_eq!(plan.recipes().count(), 3);
    }

    #[test]
    fn teacher_files_are_relative_to_the_plan() {
        let plan = parse(
            r#"{"baseline": {"name": "a"}, "args": {"teacher": "t/1.safetensors,t/2.safetensors"},
                "candidates": [{"name": "b", "args": ["--teacher", "u.safetensors", "--distill-weight", "1"]}],
                "seeds": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!(
            plan.baseline.train_args(),
            ["--teacher", "plans/t/1.safetensors,plans/t/2.safetensors"]
        );
        assert_eq!(
            plan.candidates[0].train_args(),
            ["--teacher", "plans/u.safetensors", "--distill-weight", "1"]
        );
    }

    #[test]
    fn rounds_end_at_the_last_seed() {
        let plan = parse(
            r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [5, 6, 7, 8, 9, 10],
                "rounds": [2, 4], "confidence": 0.9, "stop_when_better": false}"#,
        )
        .unwrap();
        assert_eq!(plan.looks, vec![2, 4, 6]);
        assert_eq!(plan.confidence, 0.9);
        assert!(!plan.stop_when_better);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let cases: &[(&str, &[&str])] = &[
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "argz": {}}], "seeds": [1, 2]}"#,
                &["plans/p.json", "candidates[0]", "unknown field `argz`"],
            ),
            (
                r#"{"candidates": [{"name": "b"}], "seeds": [1, 2]}"#,
                &["plans/p.json", "missing field `baseline`"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 2], "confidence": "high"}"#,
                &["confidence", "invalid type"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 2], "confidence": 1.5}"#,
                &["confidence: must be between 0 and 1"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "a"}], "seeds": [1, 2]}"#,
                &["candidates[0].name", "unique"],
            ),
            (
                r#"{"baseline": {"name": "a/b"}, "candidates": [{"name": "b"}], "seeds": [1, 2]}"#,
                &["baseline.name", "'/'"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [], "seeds": [1, 2]}"#,
                &["candidates: no candidates"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1]}"#,
                &["seeds", "at least 2"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 1]}"#,
                &["seeds", "twice"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, -2]}"#,
                &["seeds: [1]"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": {"first": 1, "cnt": 3}}"#,
                &["seeds", "unknown field `cnt`"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 2, 3], "rounds": [1, 3]}"#,
                &["rounds", "at least 2"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 2, 3], "rounds": [3, 2]}"#,
                &["rounds: must increase"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 2, 3], "rounds": [4]}"#,
                &["rounds", "has 3"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": {"seed": 3}}], "seeds": [1, 2]}"#,
                &["candidates[0].args", "--seed may not be set"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": {"arch": "x.json"}}], "seeds": [1, 2]}"#,
                &["candidates[0].args", "\"arch\" field"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": ["0.1"]}], "seeds": [1, 2]}"#,
                &["candidates[0].args: [0]: '0.1' is not a flag"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": ["--lr", "1", "--lr", "2"]}], "seeds": [1, 2]}"#,
                &["candidates[0].args", "--lr is given twice"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": {"lr": [1]}}], "seeds": [1, 2]}"#,
                &["candidates[0].args", "not a flag value"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": {"Batch_Size": 3}}], "seeds": [1, 2]}"#,
                &["candidates[0].args", "not a flag name"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "args": 3, "seeds": [1, 2]}"#,
                &["args: 3 is neither"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 2], "final": {"candidate": "c", "seeds": [3]}}"#,
                &["final.candidate", "'c' is not a recipe", "a, b"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 2], "final": {"candidate": "b", "seeds": [2, 3]}}"#,
                &["final.seeds", "seed(s) 2 were used"],
            ),
            (
                "{\"baseline\": {\"name\": \"a\"}, ",
                &["plans/p.json", "EOF"],
            ),
            (
                r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b"}], "seeds": [1, 2]} x"#,
                &["text after the plan"],
            ),
        ];
        for (text, needles) in cases {
            let msg = error(text);
            for needle in *needles {
                assert!(
                    msg.contains(needle),
                    "'{needle}' missing from: {msg}\nplan: {text}"
                );
            }
        }
    }

    #[test]
    fn a_missing_plan_file_is_an_error_naming_it() {
        let e = Plan::load(Path::new("/nonexistent/plan.json")).unwrap_err();
        assert!(e.is_usage());
        assert!(e.to_string().contains("/nonexistent/plan.json"), "{e}");
    }
}

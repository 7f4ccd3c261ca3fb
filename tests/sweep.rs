//! `sweep`: a tiny real paired-seed comparison end to end (baseline and one candidate, 3 seeds, 2 runs at
//! once) on a data folder that holds only the two training files, so a read of the test split would fail;
//! re-running it reuses every run; an unfinished run is resumed; a changed plan, a bad plan and reused
//! final seeds are refused; the final runs test each run once; Ctrl-C stops the runs cleanly.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{bin, mnist_dir_if_present, read_json};

const BIN: &str = "solution-conv";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A folder holding only the training files of the real MNIST folder (symbolic links).
fn train_only(mnist: &Path, root: &Path) -> PathBuf {
    let dir = root.join("train-only");
    std::fs::create_dir_all(&dir).unwrap();
    let mut linked = 0;
    for entry in std::fs::read_dir(mnist).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.starts_with("train-") {
            std::os::unix::fs::symlink(&path, dir.join(&name)).unwrap();
            linked += 1;
        }
    }
    assert_eq!(
        linked,
        2,
        "expected two training files in {}",
        mnist.display()
    );
    dir
}

fn sweep(args: &[&str]) -> Output {
    Command::new(bin(BIN))
        .arg("sweep")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sweep")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

const PLAN: &str = r#"{
    "baseline": {"name": "base"},
    "candidates": [{"name": "lr-high", "args": {"lr": 0.03}}],
    "args": {"epochs": 1, "limit-train": 1000},
    "seeds": [1, 2, 3],
    "final": {"candidate": "lr-high", "seeds": [11]}
}"#;

/// Modification times of every file of every run folder under `out`.
fn stamps(out: &Path) -> BTreeMap<PathBuf, SystemTime> {
    let mut all = BTreeMap::new();
    for recipe in ["base", "lr-high"] {
        for seed in 1..=3 {
            let dir = out.join(recipe).join(format!("seed-{seed}"));
            for entry in std::fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                all.insert(entry.path(), entry.metadata().unwrap().modified().unwrap());
            }
        }
    }
    all
}

#[test]
fn a_tiny_sweep_end_to_end_without_the_test_split() {
    let Some(mnist) = mnist_dir_if_present() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let data = train_only(&mnist, root.path());
    let plan = root.path().join("plan.json");
    std::fs::write(&plan, PLAN).unwrap();
    let out = root.path().join("out");
    let args = ["--jobs", "2", "--out", s(&out), "--data-dir", s(&data)];
    let mut full_args = vec![s(&plan)];
    full_args.extend(args);

    let stdout = ok(&sweep(&full_args), "first sweep");
    assert!(
        stdout.contains("training 6 run(s), 2 at a time"),
        "{stdout}"
    );
    assert!(stdout.contains("95% interval"), "{stdout}");

    // sweep.json: every run's validation accuracy, the candidate's paired statistics and verdict.
    let report = read_json(&out.join("sweep.json"));
    assert_eq!(report["complete"], true);
    assert_eq!(report["baseline"]["runs"].as_array().unwrap().len(), 3);
    let cand = &report["candidates"][0];
    assert_eq!(cand["name"], "lr-high");
    assert_eq!(cand["stats"]["n"], 3);
    let verdict = cand["status"]["verdict"].as_str().unwrap();
    assert!(
        ["better", "worse", "undecided"].contains(&verdict),
        "{verdict}"
    );
    let diffs: Vec<f64> = cand["diffs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_f64().unwrap())
        .collect();
    let mean = diffs.iter().sum::<f64>() / 3.0;
    assert!((cand["stats"]["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
    let (lo, hi) = (
        cand["stats"]["interval"][0].as_f64().unwrap(),
        cand["stats"]["interval"][1].as_f64().unwrap(),
    );
    assert!(lo <= mean && mean <= hi);
    for (i, run) in cand["runs"].as_array().unwrap().iter().enumerate() {
        let base = &report["baseline"]["runs"][i];
        assert_eq!(run["seed"], base["seed"]);
        let d = run["final_val_accuracy"].as_f64().unwrap()
            - base["final_val_accuracy"].as_f64().unwrap();
        assert!((d - diffs[i]).abs() < 1e-12, "paired on the same seed");
    }
    let table = std::fs::read_to_string(out.join("sweep.txt")).unwrap();
    assert!(
        table.contains("lr-high") && table.contains("Bonferroni"),
        "{table}"
    );
    let png = std::fs::read(out.join("sweep.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    // Every run is an ordinary run folder with validation figures only.
    for recipe in ["base", "lr-high"] {
        for seed in 1..=3u64 {
            let dir = out.join(recipe).join(format!("seed-{seed}"));
            let results = read_json(&dir.join("results.json"));
            assert_eq!(results["seed"], seed);
            // (16 steps of the improved recipe: the figures are real, but not yet good ones.)
            let val = results["final_val_accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&val), "{results}");
            for test_field in ["test_accuracy", "test_loss", "confusion"] {
                assert!(
                    results.get(test_field).is_none(),
                    "{test_field} in {results}"
                );
            }
            let config = read_json(&dir.join("config.json"));
            assert_eq!(config["no_test"], true);
            assert_eq!(config["epochs"], 1);
            assert!(!dir.join("confusion.png").exists());
        }
    }
    // The candidate's flag reached its runs (wherever the optimizer keeps its learning rate).
    let config = |recipe: &str| {
        std::fs::read_to_string(out.join(recipe).join("seed-1/config.json")).unwrap()
    };
    assert!(config("lr-high").contains("0.03"), "{}", config("lr-high"));
    assert!(!config("base").contains("0.03"), "{}", config("base"));

    // Again: every run is reused, nothing is retrained or rewritten.
    let before = stamps(&out);
    let again = ok(&sweep(&full_args), "second sweep");
    assert!(!again.contains("training "), "{again}");
    assert_eq!(stamps(&out), before, "run folders must be untouched");
    assert_eq!(
        read_json(&out.join("sweep.json"))["candidates"],
        report["candidates"]
    );

    // An unfinished run (its checkpoint kept, no results) is resumed, and ends where it would have.
    let unfinished = out.join("lr-high/seed-2");
    let results = read_json(&unfinished.join("results.json"));
    std::fs::remove_file(unfinished.join("results.json")).unwrap();
    let resumed = ok(&sweep(&full_args), "resumed sweep");
    assert!(resumed.contains("training 1 run(s)"), "{resumed}");
    let log = std::fs::read_to_string(out.join("lr-high/seed-2.log")).unwrap();
    assert!(log.contains("resuming from"), "{log}");
    let again = read_json(&unfinished.join("results.json"));
    assert_eq!(again["final_val_accuracy"], results["final_val_accuracy"]);

    // A changed plan does not silently reuse (or replace) the runs of the old one.
    let changed = root.path().join("changed.json");
    std::fs::write(&changed, PLAN.replace("0.03", "0.04")).unwrap();
    let mut changed_args = vec![s(&changed)];
    changed_args.extend(args);
    fails(
        &sweep(&changed_args),
        1,
        &["lr-high/seed-1", "other settings", "lr-high"],
    );

    // Final runs: fresh seeds only, and each finished run is tested once.
    let mut reused = full_args.clone();
    reused.extend(["--final", "lr-high", "--seeds", "3,12"]);
    fails(&sweep(&reused), 2, &["--seeds", "seed(s) 3", "fresh"]);
    let final_args = [
        s(&plan),
        "--final",
        "--out",
        s(&out),
        "--data-dir",
        s(&mnist),
    ];
    let stdout = ok(&sweep(&final_args), "final runs");
    assert!(stdout.contains("test accuracy: mean"), "{stdout}");
    let report = read_json(&out.join("final/lr-high/final.json"));
    assert_eq!(report["runs"][0]["seed"], 11);
    let test = report["test"]["mean"].as_f64().unwrap();
    let results = read_json(&out.join("final/lr-high/seed-11/results.json"));
    assert_eq!(results["test_accuracy"].as_f64().unwrap(), test);
    assert!((0.0..=1.0).contains(&test));
    assert_eq!(report["test"]["n"], 1);

    // Several recipes' final runs in one pool: lr-high's finished run is reused, base's is trained.
    let full_data = ["--out", s(&out), "--data-dir", s(&mnist)];
    let mut both = vec![s(&plan), "--final", "base,lr-high", "--seeds", "11"];
    both.extend(full_data);
    let stdout = ok(&sweep(&both), "final runs of two recipes");
    assert!(stdout.contains("training 1 run(s)"), "{stdout}");
    assert_eq!(
        read_json(&out.join("final/base/final.json"))["recipe"],
        "base"
    );
    assert_eq!(
        read_json(&out.join("final/lr-high/final.json"))["test"]["mean"].as_f64(),
        Some(test)
    );
    for (names, needles) in [
        (
            "base,nope",
            &["--final \"nope\"", "no such recipe", "base, lr-high"][..],
        ),
        ("base,base", &["'base' is listed twice"][..]),
    ] {
        let mut bad = vec![s(&plan), "--final", names, "--seeds", "11"];
        bad.extend(full_data);
        fails(&sweep(&bad), 2, needles);
    }

    // The frontier of those final runs: one point per recipe, the files written.
    let frontier = root.path().join("frontier");
    let out_final = out.join("final");
    let made = Command::new(bin(BIN))
        .args(["frontier", s(&out_final), "--out", s(&frontier)])
        .output()
        .unwrap();
    let table = ok(&made, "frontier");
    assert!(
        table.contains("base") && table.contains("lr-high"),
        "{table}"
    );
    let points = read_json(&frontier.join("frontier.json"))["points"].clone();
    assert_eq!(points.as_array().unwrap().len(), 2, "{points}");
    assert!(frontier.join("frontier.png").is_file());
    let missing = root.path().join("no-such-folder");
    let refused = Command::new(bin(BIN))
        .args(["frontier", s(&missing), "--out", s(&frontier)])
        .output()
        .unwrap();
    fails(&refused, 2, &["no-such-folder", "no such file or folder"]);
}

#[test]
fn bad_plans_are_refused_before_any_run() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let plan = root.path().join("plan.json");
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "argz": {}}], "seeds": [1, 2]}"#,
            &["plan.json", "candidates[0]", "unknown field `argz`"],
        ),
        (
            r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": {"lrr": 0.1}}], "seeds": [1, 2]}"#,
            &[
                "plan.json",
                "candidates[0] (b)",
                "train refuses its settings",
                "--lrr",
            ],
        ),
        (
            r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": {"lr": -1}}], "seeds": [1, 2]}"#,
            &["candidates[0] (b)", "--lr"],
        ),
        (
            r#"{"baseline": {"name": "a", "arch": "missing.json"}, "candidates": [{"name": "b"}], "seeds": [1, 2]}"#,
            &["baseline (a)", "missing.json"],
        ),
        (
            r#"{"baseline": {"name": "a"}, "candidates": [{"name": "b", "args": {"seed": 4}}], "seeds": [1, 2]}"#,
            &["candidates[0].args", "--seed may not be set"],
        ),
    ];
    for (text, needles) in cases {
        std::fs::write(&plan, text).unwrap();
        fails(&sweep(&[s(&plan), "--out", s(&out)]), 2, needles);
        assert!(
            !out.exists(),
            "nothing may be written for a bad plan: {text}"
        );
    }
    fails(
        &sweep(&[s(&root.path().join("none.json"))]),
        2,
        &["none.json"],
    );
}

#[test]
fn no_test_reads_only_the_training_files() {
    let Some(mnist) = mnist_dir_if_present() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let data = train_only(&mnist, root.path());
    let run = |out: &Path, extra: &[&str]| {
        let mut cmd = Command::new(bin(BIN));
        cmd.args([
            "train",
            "--epochs",
            "1",
            "--limit-train",
            "500",
            "--quiet",
            "--data-dir",
            s(&data),
        ])
        .args(["--out", s(out)])
        .args(extra)
        .env("RUST_LOG", "warn");
        cmd.output().unwrap()
    };
    let out = root.path().join("run");
    let stdout = ok(&run(&out, &["--no-test"]), "train --no-test");
    assert!(stdout.contains("test split not read"), "{stdout}");
    let results = read_json(&out.join("results.json"));
    assert!(results.get("test_accuracy").is_none(), "{results}");
    assert!(out.join("curves.png").is_file());
    // Without the flag the same folder is refused: the test files are missing.
    fails(
        &run(&root.path().join("other"), &[]),
        1,
        &["t10k-images-idx3-ubyte"],
    );
}

#[test]
fn ctrl_c_stops_the_runs_and_keeps_what_is_done() {
    let Some(mnist) = mnist_dir_if_present() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let plan = root.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"baseline": {"name": "base"}, "candidates": [{"name": "c", "args": {"lr": 0.02}}],
            "args": {"epochs": 3, "limit-train": 30000}, "seeds": [1, 2]}"#,
    )
    .unwrap();
    let out = root.path().join("out");
    let mut child = Command::new(bin(BIN))
        .args([
            "sweep",
            s(&plan),
            "--jobs",
            "2",
            "--out",
            s(&out),
            "--data-dir",
            s(&mnist),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.starts_with("training 4 run(s)"));
    assert!(started, "the sweep did not start training");
    // The runs are under way (data loaded, training); the signal reaches the sweep alone.
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the runs took too long to stop"
    );
    // The runs it stopped wrote no results; their processes have ended (their logs say so).
    let log = std::fs::read_to_string(out.join("base/seed-1.log")).unwrap();
    assert!(log.contains("stopped by a signal"), "{log}");
    assert!(!out.join("base/seed-1/results.json").exists());
}

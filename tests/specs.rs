//! Architectures as files: `summary --spec` prints a built-in variant as the JSON `--arch` reads back,
//! `summary` does not depend on the kernels, a hand-written spec trains with `train --arch` and
//! `evaluate` rebuilds it from the run folder alone, and every kind of bad spec is refused with one line
//! naming the file, the layer and the problem (exit code 2).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{bin, mnist_dir_if_present, run, run_owned, train_args};

const SOLUTIONS: [&str; 3] = ["conv", "separable", "inception"];

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `solution-{s} summary ARGS`, with `stdin` fed to it.
fn summary_with_stdin(s: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(bin(&format!("solution-{s}")))
        .arg("summary")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    stdout(&child.wait_with_output().unwrap())
}

#[test]
fn builtin_specs_round_trip_and_summaries_ignore_the_kernels() {
    for s in SOLUTIONS {
        let bin = format!("solution-{s}");
        for v in ["seed", "improved"] {
            let spec = stdout(&run(&bin, &["summary", "--variant", v, "--spec"]));
            let table = stdout(&run(&bin, &["summary", "--variant", v]));
            let json = stdout(&run(&bin, &["summary", "--variant", v, "--json"]));
            // The printed spec read back gives the same model: same rows, same parameters.
            assert_eq!(
                summary_with_stdin(s, &["--arch", "/dev/stdin"], &spec),
                table,
                "{s} {v}"
            );
            assert_eq!(
                summary_with_stdin(s, &["--arch", "/dev/stdin", "--json"], &spec),
                json,
                "{s} {v}"
            );
            assert_eq!(
                summary_with_stdin(s, &["--arch", "/dev/stdin", "--spec"], &spec),
                spec,
                "{s} {v}: the spec printed back differs"
            );
            let reference = stdout(&run(
                &bin,
                &["summary", "--variant", v, "--kernels", "reference"],
            ));
            assert_eq!(
                reference, table,
                "{s} {v}: the summary depends on the kernels"
            );
            assert!(table.lines().count() > 8, "{table}");
        }
    }
}

/// A small conv net that is none of the built-in variants (a tied convolution among its layers).
const HAND_WRITTEN: &str = r#"{
  "name": "tiny",
  "batch_norm": { "momentum": 0.9 },
  "layers": [
    { "type": "conv", "filters": 4, "kernel": 5, "padding": "same", "batch_norm": "before", "bias": false,
      "pool": { "kernel": 2 } },
    { "type": "separable_conv", "filters": 8, "kernel": 3, "batch_norm": "after", "pool": { "kernel": 2 } },
    { "type": "conv", "filters": 8, "kernel": 3, "padding": "same", "batch_norm": "after" },
    { "type": "conv", "filters": 8, "kernel": 3, "padding": "same", "batch_norm": "after", "weights_of": 2,
      "shortcut": 2 },
    { "type": "squeeze_excite", "units": 2 },
    { "type": "dropout", "rate": 0.1 },
    { "type": "global_avg_pool" },
    { "type": "dense", "units": 16, "activation": "relu" },
    { "type": "dense", "units": 10 }
  ]
}"#;

#[test]
fn a_hand_written_spec_trains_and_evaluates_from_its_run_folder() {
    let Some(data) = mnist_dir_if_present() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("tiny.json");
    std::fs::write(&spec, HAND_WRITTEN).unwrap();
    let out_dir = tmp.path().join("run");
    let out = run_owned(
        "solution-conv",
        &train_args(
            "improved",
            "1",
            "1000",
            &out_dir,
            &["--arch", spec.to_str().unwrap()],
        ),
    );
    stdout(&out);
    let config = common::read_json(&out_dir.join("config.json"));
    assert_eq!(config["model"]["arch"]["name"], "tiny");
    assert!(config["model"].get("variant").is_none(), "{config}");
    let results = common::read_json(&out_dir.join("results.json"));
    assert_eq!(results["variant"], "tiny");
    let weights = out_dir.join("model.safetensors");
    let eval = stdout(&run(
        "solution-conv",
        &[
            "evaluate",
            "--weights",
            weights.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--json",
        ],
    ));
    let eval: serde_json::Value = serde_json::from_str(&eval).unwrap();
    assert_eq!(eval["variant"], "tiny");
    assert_eq!(eval["test_accuracy"], results["test_accuracy"]);
    // Without its config.json the same weights need the architecture again.
    let lone = tmp.path().join("lone.safetensors");
    std::fs::copy(&weights, &lone).unwrap();
    let lone = lone.to_str().unwrap();
    let args = [
        "evaluate",
        "--weights",
        lone,
        "--data-dir",
        data.to_str().unwrap(),
    ];
    assert!(!run("solution-conv", &args).status.success());
    let with_arch = [&args[..], &["--arch", spec.to_str().unwrap()]].concat();
    stdout(&run("solution-conv", &with_arch));
    // Resume rebuilds it from the folder too (one more epoch).
    let resume = [
        "train",
        "--resume",
        out_dir.to_str().unwrap(),
        "--epochs",
        "2",
        "--quiet",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    stdout(&run("solution-conv", &resume));
    assert_eq!(
        common::read_json(&out_dir.join("results.json"))["epochs"],
        2
    );
}

/// Writes `text` as a spec file and runs `summary --arch` and `train --arch` on it: both must exit
/// with 2 and one `error:` line naming the file and containing every needle.
fn refused(tmp: &Path, name: &str, text: &str, needles: &[&str]) {
    let path = tmp.join(format!("{name}.json"));
    std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap();
    for args in [
        vec!["summary", "--arch", p],
        vec![
            "train",
            "--arch",
            p,
            "--epochs",
            "1",
            "--out",
            "/nonexistent/never-written",
        ],
    ] {
        let out = run("solution-conv", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{name}: {err}");
        assert!(lines[0].starts_with("error: --arch "), "{name}: {err}");
        for needle in [p].iter().chain(needles) {
            assert!(err.contains(needle), "{name}: {needle:?} not in: {err}");
        }
    }
}

fn layers(body: &str) -> String {
    format!("{{ \"layers\": [{body}] }}")
}

const GAP_DENSE: &str = r#"{ "type": "global_avg_pool" }, { "type": "dense", "units": 10 }"#;

#[test]
fn unknown_layer_type() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        "unknown-type",
        &layers(&format!(
            r#"{{ "type": "conv", "filters": 4, "kernel": 3 }}, {{ "type": "convolution", "filters": 4 }}, {GAP_DENSE}"#
        )),
        &[
            "layers[1]",
            "unknown layer type 'convolution'",
            "separable_conv",
        ],
    );
    refused(
        tmp.path(),
        "no-type",
        &layers(r#"{ "filters": 4, "kernel": 3 }"#),
        &["layers[0]", "no \"type\""],
    );
}

#[test]
fn unknown_field() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        "unknown-field",
        &layers(&format!(
            r#"{{ "type": "conv", "filtres": 4, "kernel": 3 }}, {GAP_DENSE}"#
        )),
        &["layers[0] (conv)", "unknown field `filtres`"],
    );
    refused(
        tmp.path(),
        "unknown-top-field",
        &format!("{{ \"layer\": [], \"layers\": [{GAP_DENSE}] }}"),
        &["unknown field `layer`"],
    );
    refused(
        tmp.path(),
        "unknown-init",
        &format!("{{ \"init\": \"xavier\", \"layers\": [{GAP_DENSE}] }}"),
        &[
            "unknown variant `xavier`",
            "glorot_uniform",
            "he_uniform",
            "pytorch",
        ],
    );
    refused(
        tmp.path(),
        "field-on-flatten",
        &layers(r#"{ "type": "flatten", "size": 3 }, { "type": "dense", "units": 10 }"#),
        &["layers[0] (flatten)", "unknown field `size`"],
    );
    refused(
        tmp.path(),
        "branch-field",
        &layers(&format!(
            r#"{{ "type": "inception", "branches": [[{{ "type": "conv", "filters": 2, "kernel": 1, "paddin": "same" }}]] }}, {GAP_DENSE}"#
        )),
        &[
            "layers[0] (inception): branches[0][0] (conv)",
            "unknown field `paddin`",
        ],
    );
}

#[test]
fn zero_and_negative_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        "zero-filters",
        &layers(&format!(
            r#"{{ "type": "conv", "filters": 0, "kernel": 3 }}, {GAP_DENSE}"#
        )),
        &["layers[0] (conv)", "filters must be at least 1"],
    );
    refused(
        tmp.path(),
        "negative-kernel",
        &layers(&format!(
            r#"{{ "type": "conv", "filters": 4, "kernel": -3 }}, {GAP_DENSE}"#
        )),
        &["layers[0] (conv)", "kernel: invalid value", "-3"],
    );
    // A wrong value is named by its field, nested ones by their path.
    refused(
        tmp.path(),
        "negative-pool-kernel",
        &layers(&format!(
            r#"{{ "type": "conv", "filters": 4, "kernel": 3, "pool": {{ "kernel": -2 }} }}, {GAP_DENSE}"#
        )),
        &["layers[0] (conv)", "pool.kernel: invalid value", "-2"],
    );
    refused(
        tmp.path(),
        "shortcut-type",
        &layers(&format!(
            r#"{{ "type": "conv", "filters": 4, "kernel": 3, "shortcut": "a" }}, {GAP_DENSE}"#
        )),
        &["layers[0] (conv)", "shortcut: invalid type: string \"a\""],
    );
    refused(
        tmp.path(),
        "zero-units",
        &layers(r#"{ "type": "flatten" }, { "type": "dense", "units": 0 }"#),
        &["layers[1] (dense)", "units must be at least 1"],
    );
    refused(
        tmp.path(),
        "zero-pool-stride",
        &layers(&format!(
            r#"{{ "type": "max_pool", "kernel": 2, "stride": 0 }}, {GAP_DENSE}"#
        )),
        &["layers[0] (max_pool)", "pool stride must be at least 1"],
    );
    refused(
        tmp.path(),
        "dropout-rate",
        &layers(&format!(
            r#"{{ "type": "dropout", "rate": 1.0 }}, {GAP_DENSE}"#
        )),
        &["layers[0] (dropout)", "rate must be in [0, 1)"],
    );
    refused(
        tmp.path(),
        "zero-excite-units",
        &layers(&format!(
            r#"{{ "type": "conv", "filters": 4, "kernel": 3 }}, {{ "type": "squeeze_excite", "units": 0 }}, {GAP_DENSE}"#
        )),
        &["layers[1] (squeeze_excite)", "units must be at least 1"],
    );
    refused(
        tmp.path(),
        "excite-on-flat",
        &layers(
            r#"{ "type": "global_avg_pool" }, { "type": "squeeze_excite", "units": 2 }, { "type": "dense", "units": 10 }"#,
        ),
        &["layers[1] (squeeze_excite)"],
    );
    refused(
        tmp.path(),
        "excite-without-units",
        &layers(&format!(r#"{{ "type": "squeeze_excite" }}, {GAP_DENSE}"#)),
        &["layers[0] (squeeze_excite)", "units"],
    );
}

#[test]
fn kernel_or_pool_larger_than_its_input() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        "big-kernel",
        &layers(&format!(
            r#"{{ "type": "conv", "filters": 4, "kernel": 3, "pool": {{ "kernel": 5 }} }}, {{ "type": "conv", "filters": 4, "kernel": 7 }}, {GAP_DENSE}"#
        )),
        &["layers[1] (conv)", "kernel 7 is larger than its 5x5 input"],
    );
    refused(
        tmp.path(),
        "big-pool",
        &layers(&format!(
            r#"{{ "type": "conv", "filters": 4, "kernel": 3, "pool": {{ "kernel": 2 }} }}, {{ "type": "max_pool", "kernel": 16 }}, {GAP_DENSE}"#
        )),
        &[
            "layers[1] (max_pool)",
            "pool 16 is larger than its 13x13 input",
        ],
    );
}

#[test]
fn dense_on_feature_maps() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        "dense-4d",
        &layers(
            r#"{ "type": "conv", "filters": 4, "kernel": 3 }, { "type": "dense", "units": 10 }"#,
        ),
        &[
            "layers[1] (dense)",
            "needs a flat input",
            "4x26x26",
            "flatten",
        ],
    );
}

#[test]
fn a_model_that_does_not_end_in_ten_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        "twelve",
        &layers(
            r#"{ "type": "conv", "filters": 4, "kernel": 3 }, { "type": "global_avg_pool" }, { "type": "dense", "units": 12 }"#,
        ),
        &["ends in 12 values, not 10 outputs"],
    );
    refused(
        tmp.path(),
        "maps",
        &layers(r#"{ "type": "conv", "filters": 10, "kernel": 3 }"#),
        &["ends in 10x26x26, not 10 outputs"],
    );
    refused(tmp.path(), "empty", &layers(""), &["\"layers\" is empty"]);
}

#[test]
fn malformed_json() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        "malformed",
        "{ \"layers\": [\n  { \"type\": \"flatten\" },\n  { \"type\": \"dense\" \"units\": 10 }\n] }",
        &["malformed JSON", "line 3"],
    );
    refused(tmp.path(), "not-an-object", "[1, 2]", &["JSON object"]);
    let missing = tmp.path().join("missing.json");
    let out = run(
        "solution-conv",
        &["summary", "--arch", missing.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("missing.json") && err.contains("No such file"),
        "{err}"
    );
}

/// A 4-filter 3x3 `same`-padded conv layer with the fields `extra` (`, "shortcut": 1`).
fn same_conv(extra: &str) -> String {
    format!(r#"{{ "type": "conv", "filters": 4, "kernel": 3, "padding": "same"{extra} }}"#)
}

/// The layers `parts`, then global average pooling and the dense head.
fn with_head(parts: &[String]) -> String {
    format!("{}, {GAP_DENSE}", parts.join(", "))
}

#[test]
fn weight_ties_that_do_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let (conv, model) = (same_conv, with_head);
    let tie = |n: usize| conv(&format!(r#", "weights_of": {n}"#));
    let cases = [
        (
            "tie-forward",
            model(&[tie(1), conv("")]),
            vec!["layers[0] (conv)", "weights_of 1", "not an earlier layer"],
        ),
        (
            "tie-self",
            model(&[conv(""), tie(1)]),
            vec!["layers[1] (conv)", "weights_of 1", "not an earlier layer"],
        ),
        (
            // layers[0] takes 1 channel, layers[1] 4.
            "tie-shape",
            model(&[conv(""), tie(0)]),
            vec!["layers[1] (conv)", "1 -> 4 channels", "4 -> 4 channels"],
        ),
        (
            "tie-bias",
            model(&[conv(""), conv(""), conv(r#", "bias": false, "weights_of": 1"#)]),
            vec!["layers[2] (conv)", "bias false", "bias true"],
        ),
        (
            "tie-kind",
            model(&[
                conv(""),
                conv(""),
                r#"{ "type": "separable_conv", "filters": 4, "kernel": 3, "padding": "same", "weights_of": 1 }"#.into(),
            ]),
            vec!["layers[2] (separable_conv)", "layers[1] is a conv layer"],
        ),
        (
            "tie-pool",
            model(&[conv(""), r#"{ "type": "max_pool", "kernel": 2 }"#.into(), tie(1)]),
            vec!["layers[2] (conv)", "layers[1] is a max_pool layer"],
        ),
        (
            "tie-chain",
            model(&[conv(""), conv(""), tie(1), tie(2)]),
            vec!["layers[3] (conv)", "ties its own weights to layers[1]"],
        ),
        (
            "tie-branch",
            model(&[
                conv(""),
                format!(r#"{{ "type": "inception", "branches": [[{}]] }}"#, tie(0)),
            ]),
            vec!["branches[0][0] (conv)", "weights_of ties top-level layers only"],
        ),
    ];
    for (name, body, needles) in cases {
        refused(tmp.path(), name, &layers(&body), &needles);
    }
}

#[test]
fn shortcuts_that_do_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let (conv, model) = (same_conv, with_head);
    let from = |n: usize| conv(&format!(r#", "shortcut": {n}"#));
    let cases = [
        (
            "shortcut-forward",
            model(&[conv(""), from(2), conv("")]),
            vec![
                "layers[1] (conv)",
                "shortcut 2",
                "not this layer or an earlier one",
            ],
        ),
        (
            // layers[0] takes the 1-channel image.
            "shortcut-channels",
            model(&[conv(""), from(0)]),
            vec!["layers[1] (conv)", "shortcut 0", "1x28x28", "4x28x28"],
        ),
        (
            "shortcut-size",
            model(&[conv(""), conv(r#", "padding": "valid", "shortcut": 1"#)]),
            vec!["layers[1] (conv)", "4x28x28", "4x26x26"],
        ),
        (
            "shortcut-pool",
            model(&[
                conv(""),
                conv(r#", "pool": { "kernel": 2 }, "shortcut": 1"#),
            ]),
            vec!["layers[1] (conv)", "4x28x28", "4x14x14"],
        ),
        (
            "shortcut-branch",
            model(&[
                conv(""),
                format!(r#"{{ "type": "inception", "branches": [[{}]] }}"#, from(0)),
            ]),
            vec![
                "branches[0][0] (conv)",
                "a shortcut joins top-level layers only",
            ],
        ),
    ];
    for (name, body, needles) in cases {
        refused(tmp.path(), name, &layers(&body), &needles);
    }
}

#[test]
fn inception_branches_that_do_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        "branch-sizes",
        &layers(&format!(
            r#"{{ "type": "inception", "branches": [[{{ "type": "conv", "filters": 2, "kernel": 3 }}], [{{ "type": "conv", "filters": 2, "kernel": 1 }}]] }}, {GAP_DENSE}"#
        )),
        &[
            "layers[0] (inception)",
            "branch 0 ends at 26x26, branch 1 at 28x28",
        ],
    );
    refused(
        tmp.path(),
        "branch-dense",
        &layers(&format!(
            r#"{{ "type": "inception", "branches": [[{{ "type": "dense", "units": 2 }}]] }}, {GAP_DENSE}"#
        )),
        &["branches[0][0] (dense)", "not dense"],
    );
    refused(
        tmp.path(),
        "branch-excite",
        &layers(&format!(
            r#"{{ "type": "inception", "branches": [[{{ "type": "squeeze_excite", "units": 2 }}]] }}, {GAP_DENSE}"#
        )),
        &["branches[0][0] (squeeze_excite)", "not squeeze_excite"],
    );
}

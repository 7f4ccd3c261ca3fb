//! The recipe options of issue 14 Part B end to end: weight averaging (`--ema`), SGD with Nesterov
//! momentum (`--optimizer sgd`), elastic distortion (`--elastic`), precise BatchNorm (`--precise-bn`),
//! sharpness-aware minimisation (`--sam`), gradient centralization (`--grad-centralization`), Lookahead
//! (`--lookahead`), ghost BatchNorm (`--ghost-batch`), random erasing (`--erase`), mixup and CutMix
//! (`--mixup`, `--cutmix`), stroke thickness (`--thickness`), the Poly-1 loss (`--poly-loss`) and
//! test-time augmentation (`evaluate --tta`). Each flag is accepted, lands in config.json, survives `train --resume` bit for bit,
//! and bad values are refused with exit code 2 naming the flag.

mod common;

use std::path::Path;

use common::{history, mnist_dir_if_present, ok, read_json, run, run_owned, tensors, train_args};

const BIN: &str = "solution-conv";
const LIMIT: &str = "1000";

/// Trains the seed recipe (its learning rate does not depend on the number of epochs, so extending a
/// run is exact) with `extra` flags for 2 epochs straight, and for 1 epoch then `--resume --epochs 2`;
/// both must end with the same weights, checkpoint tensors and history. Returns the straight run's
/// config.json.
fn straight_and_resumed_agree(tmp: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    straight_and_resumed_agree_but(tmp, name, extra, false)
}

/// [`straight_and_resumed_agree`]; with `last_validation_differs`, epoch 1's validation figures may
/// differ (the 1-epoch run validated its last epoch differently, as `--precise-bn` does).
fn straight_and_resumed_agree_but(
    tmp: &Path,
    name: &str,
    extra: &[&str],
    last_validation_differs: bool,
) -> serde_json::Value {
    let data = mnist_dir_if_present().unwrap();
    let (straight, split) = (
        tmp.join(format!("{name}-2")),
        tmp.join(format!("{name}-1+1")),
    );
    ok(
        &run_owned(BIN, &train_args("seed", "2", LIMIT, &straight, extra)),
        name,
    );
    ok(
        &run_owned(BIN, &train_args("seed", "1", LIMIT, &split, extra)),
        name,
    );
    let args = [
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--epochs",
        "2",
        "--quiet",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    ok(&run(BIN, &args), &format!("{name}: resume"));
    for file in ["model.safetensors", "checkpoint.safetensors"] {
        let (a, b) = (tensors(&straight.join(file)), tensors(&split.join(file)));
        assert!(!a.is_empty());
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (tensor, bits) in &a {
            assert!(bits == &b[tensor], "{name}: {file} tensor {tensor} differs");
        }
    }
    let (mut a, mut b) = (history(&straight), history(&split));
    assert_eq!(a.len(), 3);
    if last_validation_differs {
        // Columns epoch, lr, loss, accuracy of epoch 1 only.
        let training = |row: &str| row.split(',').take(4).collect::<Vec<_>>().join(",");
        assert_eq!(training(&a[1]), training(&b[1]), "{name}");
        assert_ne!(a[1], b[1], "{name}: the 1-epoch run validated differently");
        (a[1], b[1]) = (String::new(), String::new());
    }
    assert_eq!(a, b, "{name}");
    read_json(&straight.join("config.json"))
}

/// Trains the seed recipe with `flags` for one epoch of 200 images into `tmp/name`; returns its
/// config.json.
fn short_run(tmp: &Path, name: &str, flags: &[&str]) -> serde_json::Value {
    let dir = tmp.join(name);
    ok(
        &run_owned(BIN, &train_args("seed", "1", "200", &dir, flags)),
        name,
    );
    read_json(&dir.join("config.json"))
}

/// Trains the seed recipe plainly for 2 epochs beside the `{name}-2` run of [`straight_and_resumed_agree`]
/// and checks that the flag changed the trained weights; returns the plain run's config.json.
fn plain_run_trains_otherwise(tmp: &Path, name: &str) -> serde_json::Value {
    let plain = tmp.join("plain");
    ok(
        &run_owned(BIN, &train_args("seed", "2", LIMIT, &plain, &[])),
        "plain",
    );
    trained_otherwise(tmp, name);
    read_json(&plain.join("config.json"))
}

/// Checks that the `{name}-2` run's weights differ from those of the plain run of
/// [`plain_run_trains_otherwise`] in `tmp`.
fn trained_otherwise(tmp: &Path, name: &str) {
    let (a, b) = (
        tensors(&tmp.join("plain").join("model.safetensors")),
        tensors(&tmp.join(format!("{name}-2")).join("model.safetensors")),
    );
    assert!(
        a.iter().any(|(tensor, bits)| bits != &b[tensor]),
        "{name} trains otherwise"
    );
}

#[test]
fn ema_is_stored_saved_as_the_model_and_resumes_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = straight_and_resumed_agree(tmp.path(), "ema", &["--ema", "0.99"]);
    assert_eq!(config["ema"]["decay"], 0.99);
    assert_eq!(config["ema"]["warmup"], true);
    // The saved model is the average; the checkpoint keeps the raw weights (model/) and the average
    // (ema/) of every variable, BatchNorm statistics included.
    let dir = tmp.path().join("ema-2");
    let model = tensors(&dir.join("model.safetensors"));
    let ckpt = tensors(&dir.join("checkpoint.safetensors"));
    for (name, bits) in &model {
        assert_eq!(bits, &ckpt[&format!("ema/{name}")], "{name}");
    }
    assert!(model.keys().any(|k| k.ends_with("running_var")));
    assert!(model
        .iter()
        .any(|(name, bits)| bits != &ckpt[&format!("model/{name}")]));

    let config = straight_and_resumed_agree(
        tmp.path(),
        "ema-plain",
        &["--ema", "0.9", "--no-ema-warmup"],
    );
    assert_eq!(config["ema"]["warmup"], false);
}

#[test]
fn sgd_is_stored_and_resumes_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--momentum",
        "0.8",
        "--weight-decay",
        "0.0005",
    ];
    let config = straight_and_resumed_agree(tmp.path(), "sgd", &extra);
    assert!(config.get("adam").is_none(), "{config}");
    let sgd = &config["sgd"];
    assert_eq!(
        (&sgd["lr"], &sgd["momentum"], &sgd["nesterov"]),
        (&0.05.into(), &0.8.into(), &true.into())
    );
    assert_eq!(sgd["weight_decay"], 0.0005);
    let ckpt = tensors(&tmp.path().join("sgd-2/checkpoint.safetensors"));
    assert!(ckpt.keys().any(|k| k.starts_with("sgd_momentum/")));
    assert!(!ckpt.keys().any(|k| k.starts_with("adam_")));

    let config = straight_and_resumed_agree(
        tmp.path(),
        "sgd-classical",
        &["--optimizer", "sgd", "--lr", "0.05", "--no-nesterov"],
    );
    assert_eq!(config["sgd"]["nesterov"], false);
    assert_eq!(config["sgd"]["momentum"], 0.9);
}

#[test]
fn precise_bn_is_stored_saved_as_the_model_and_resumes_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = straight_and_resumed_agree_but(tmp.path(), "precise-bn", &["--precise-bn"], true);
    assert_eq!(config["precise_bn"], true);
    // The saved model has the recalibrated statistics and the trained weights; the checkpoint keeps
    // the moving averages, which an extended run continues from.
    let dir = tmp.path().join("precise-bn-2");
    let model = tensors(&dir.join("model.safetensors"));
    let ckpt = tensors(&dir.join("checkpoint.safetensors"));
    for (name, bits) in &model {
        let stat = name.ends_with("running_mean") || name.ends_with("running_var");
        let kept = &ckpt[&format!("model/{name}")];
        assert_eq!(bits != kept, stat, "{name}");
    }
}

#[test]
fn sam_is_stored_changes_training_and_resumes_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = straight_and_resumed_agree(tmp.path(), "sam", &["--sam", "0.05"]);
    assert_eq!(config["sam"]["rho"], 0.05);
    let plain = plain_run_trains_otherwise(tmp.path(), "sam");
    assert!(plain.get("sam").is_none());
    let config = short_run(tmp.path(), "asam", &["--sam", "0.5", "--sam-adaptive"]);
    assert_eq!(
        (
            config["sam"]["rho"].as_f64(),
            config["sam"]["adaptive"].as_bool()
        ),
        (Some(0.5), Some(true))
    );
}

#[test]
fn grad_centralization_is_stored_changes_training_and_resumes_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = straight_and_resumed_agree(tmp.path(), "gc", &["--grad-centralization"]);
    assert_eq!(config["adam"]["grad_centralization"], true);
    let plain = plain_run_trains_otherwise(tmp.path(), "gc");
    // Off is not written: configs (and sweeps' baseline runs) from before the flag read the same.
    assert!(plain["adam"].get("grad_centralization").is_none());
    // It stays on when the optimizer changes to SGD.
    let config = short_run(
        tmp.path(),
        "gc-sgd",
        &[
            "--grad-centralization",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
        ],
    );
    assert_eq!(config["sgd"]["grad_centralization"], true);
}

#[test]
fn lookahead_is_stored_changes_training_and_resumes_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // k = 7 does not divide the 32 steps of an epoch: the resumed run must start its slow weights where
    // the straight run synced them at the epoch's end.
    let config = straight_and_resumed_agree(
        tmp.path(),
        "lookahead",
        &["--lookahead", "7", "--lookahead-alpha", "0.6"],
    );
    assert_eq!(config["lookahead"]["k"], 7);
    assert_eq!(config["lookahead"]["alpha"], 0.6);
    let plain = plain_run_trains_otherwise(tmp.path(), "lookahead");
    // Off is not written: configs (and sweeps' baseline runs) from before the flag read the same.
    assert!(plain.get("lookahead").is_none(), "{plain}");
    // The paper's alpha by default.
    let config = short_run(tmp.path(), "lookahead-default", &["--lookahead", "5"]);
    assert_eq!(config["lookahead"]["alpha"], 0.5);
}

#[test]
fn ghost_batch_is_stored_changes_training_and_resumes_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The seed recipe's batch of 32 in parts of 12: 12, 12 and 8 images (and the epoch's last, short
    // batch in parts too).
    let config = straight_and_resumed_agree(tmp.path(), "ghost", &["--ghost-batch", "12"]);
    assert_eq!(config["ghost_batch"], 12);
    let plain = plain_run_trains_otherwise(tmp.path(), "ghost");
    assert!(plain.get("ghost_batch").is_none(), "{plain}");
    // With precise BatchNorm: straight and resumed agree, recalibrated over batches of 12.
    straight_and_resumed_agree_but(
        tmp.path(),
        "ghost-precise",
        &["--ghost-batch", "12", "--precise-bn"],
        true,
    );
}

#[test]
fn elastic_is_stored_and_resumes_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = straight_and_resumed_agree(
        tmp.path(),
        "elastic",
        &["--elastic", "6", "--elastic-sigma", "3"],
    );
    // --elastic turns augmentation on, as --rotate does: the improved recipe's affine ranges plus it.
    let aug = &config["augment"];
    assert_eq!(aug["elastic"]["alpha"], 6.0);
    assert_eq!(aug["elastic"]["sigma"], 3.0);
    assert_eq!(aug["max_rotation_deg"], 10.0);
    // Zero alpha is no distortion: nothing is stored.
    let dir = tmp.path().join("zero");
    ok(
        &run_owned(
            BIN,
            &train_args("improved", "1", "200", &dir, &["--elastic", "0"]),
        ),
        "elastic 0",
    );
    let config = read_json(&dir.join("config.json"));
    assert!(config["augment"].get("elastic").is_none(), "{config}");
}

#[test]
fn erasing_and_mixing_are_stored_and_resume_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = straight_and_resumed_agree(
        tmp.path(),
        "erase-cutmix",
        &["--erase", "0.5", "--erase-max-area", "0.2", "--cutmix", "1"],
    );
    // Like --elastic, they turn augmentation on: the improved recipe's affine ranges plus them.
    let aug = &config["augment"];
    assert_eq!(aug["max_rotation_deg"], 10.0);
    assert_eq!(aug["erase"]["probability"], 0.5);
    assert_eq!(aug["erase"]["area"][0], 0.02);
    assert_eq!(aug["erase"]["area"][1], 0.2);
    assert_eq!(aug["mix"]["kind"], "cutmix");
    assert_eq!(aug["mix"]["alpha"], 1.0);
    let config = straight_and_resumed_agree(tmp.path(), "mixup", &["--mixup", "0.4"]);
    assert_eq!(config["augment"]["mix"]["kind"], "mixup");
    assert_eq!(config["augment"]["mix"]["alpha"], 0.4);
    // Zero probability erases nothing: nothing is stored.
    let dir = tmp.path().join("zero");
    ok(
        &run_owned(
            BIN,
            &train_args("improved", "1", "200", &dir, &["--erase", "0"]),
        ),
        "erase 0",
    );
    let config = read_json(&dir.join("config.json"));
    assert!(config["augment"].get("erase").is_none(), "{config}");
    assert!(config["augment"].get("mix").is_none(), "{config}");
}

#[test]
fn thickness_and_poly_loss_are_stored_change_training_and_resume_bit_for_bit() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = straight_and_resumed_agree(tmp.path(), "thick", &["--thickness", "0.5"]);
    // Like --erase, it turns augmentation on: the improved recipe's affine ranges plus it.
    assert_eq!(config["augment"]["max_rotation_deg"], 10.0);
    assert_eq!(config["augment"]["thickness"]["max"], 0.5);
    let config = straight_and_resumed_agree(tmp.path(), "poly", &["--poly-loss", "1"]);
    assert_eq!(config["poly_loss"], 1.0);
    let plain = plain_run_trains_otherwise(tmp.path(), "poly");
    assert!(plain.get("poly_loss").is_none(), "{plain}");
    trained_otherwise(tmp.path(), "thick");
    // Zero changes nothing: nothing is stored.
    let config = short_run(
        tmp.path(),
        "zero",
        &["--thickness", "0", "--poly-loss", "0"],
    );
    assert!(config["augment"].get("thickness").is_none(), "{config}");
    assert!(config.get("poly_loss").is_none(), "{config}");
}

/// Distillation runs the teacher's forward pass on the prefetch thread while training runs on the rayon
/// pool: with one thread (`RAYON_NUM_THREADS=1`, what `sweep --jobs` gives each run on a machine with as
/// many cores as jobs) the teacher's parallel loops need the training thread's worker, which must not
/// sit blocked waiting for the teacher's batch (a run once hung there for good).
#[test]
fn distillation_finishes_on_one_thread() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    ok(
        &run_owned(
            BIN,
            &train_args("improved", "1", "300", &teacher, &["--no-test"]),
        ),
        "teacher",
    );
    let student = tmp.path().join("student");
    let weights = teacher.join("model.safetensors");
    let args = train_args(
        "improved",
        "1",
        "300",
        &student,
        &["--no-test", "--teacher", weights.to_str().unwrap()],
    );
    let mut child = std::process::Command::new(common::bin(BIN))
        .args(&args)
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(240) {
            child.kill().unwrap();
            panic!("a distilled run on one thread did not finish in 240 s (deadlocked)");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(student.join("model.safetensors").is_file());
}

#[test]
fn bad_values_are_refused_with_exit_2_naming_the_flag() {
    let Some(data) = mnist_dir_if_present() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("never");
    for (args, flag) in [
        (&["--ema", "1"][..], "--ema"),
        (&["--ema", "0"], "--ema"),
        (&["--ema", "-0.5"], "--ema"),
        (&["--ema", "fast"], "--ema"),
        (&["--no-ema-warmup"], "--ema"),
        (&["--optimizer", "rmsprop"], "--optimizer"),
        (&["--optimizer", "sgd", "--momentum", "1"], "--momentum"),
        (&["--optimizer", "sgd", "--momentum", "-0.1"], "--momentum"),
        (&["--momentum", "0.5"], "--momentum"),
        (&["--no-nesterov"], "--no-nesterov"),
        (&["--beta2", "1"], "--beta2"),
        (&["--beta2", "-0.1"], "--beta2"),
        (&["--optimizer", "sgd", "--beta2", "0.99"], "--beta2"),
        (&["--elastic", "-1"], "--elastic"),
        (&["--elastic", "nan"], "--elastic"),
        (
            &["--elastic", "4", "--elastic-sigma", "0"],
            "--elastic-sigma",
        ),
        (&["--elastic-sigma", "4"], "--elastic"),
        (&["--elastic", "4", "--no-augment"], "--elastic"),
        (&["--sam", "0"], "--sam"),
        (&["--sam", "-0.05"], "--sam"),
        (&["--sam", "inf"], "--sam"),
        (&["--sam", "wide"], "--sam"),
        (&["--sam-adaptive"], "--sam"),
        (&["--lookahead", "0"], "--lookahead"),
        (&["--lookahead", "-5"], "--lookahead"),
        (&["--lookahead", "2.5"], "--lookahead"),
        (
            &["--lookahead", "5", "--lookahead-alpha", "0"],
            "--lookahead-alpha",
        ),
        (
            &["--lookahead", "5", "--lookahead-alpha", "1.5"],
            "--lookahead-alpha",
        ),
        (&["--lookahead-alpha", "0.5"], "--lookahead"),
        (&["--ghost-batch", "0"], "--ghost-batch"),
        (&["--ghost-batch", "1"], "--ghost-batch"),
        (&["--ghost-batch", "64"], "--ghost-batch"),
        (
            &["--ghost-batch", "16", "--batch-size", "16"],
            "--ghost-batch",
        ),
        (&["--ghost-batch", "-16"], "--ghost-batch"),
        (&["--ghost-batch", "many"], "--ghost-batch"),
        (&["--erase", "1.5"], "--erase"),
        (&["--erase", "-0.1"], "--erase"),
        (&["--erase", "nan"], "--erase"),
        (&["--erase", "0.5", "--no-augment"], "--erase"),
        (&["--erase-max-area", "0.2"], "--erase"),
        (
            &["--erase", "0.5", "--erase-max-area", "0.01"],
            "--erase-max-area",
        ),
        (
            &["--erase", "0.5", "--erase-max-area", "1.5"],
            "--erase-max-area",
        ),
        (&["--mixup", "0"], "--mixup"),
        (&["--mixup", "-1"], "--mixup"),
        (&["--mixup", "inf"], "--mixup"),
        (&["--mixup", "0.2", "--cutmix", "1"], "--mixup"),
        (&["--cutmix", "0"], "--cutmix"),
        (&["--cutmix", "1", "--no-augment"], "--cutmix"),
        (&["--thickness", "1.5"], "--thickness"),
        (&["--thickness", "-0.5"], "--thickness"),
        (&["--thickness", "nan"], "--thickness"),
        (&["--thickness", "0.5", "--no-augment"], "--thickness"),
        (&["--poly-loss", "-2"], "--poly-loss"),
        (&["--poly-loss", "inf"], "--poly-loss"),
        (&["--poly-loss", "much"], "--poly-loss"),
    ] {
        let out = run_owned(BIN, &train_args("improved", "1", "100", &out_dir, args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!out_dir.exists(), "a refused run writes nothing");
    // A resumed run takes every setting from its config.json.
    for flag in [
        &["--ema", "0.99"][..],
        &["--optimizer", "sgd"],
        &["--elastic", "2"],
        &["--erase", "0.5"],
        &["--mixup", "0.2"],
        &["--cutmix", "1"],
        &["--thickness", "0.5"],
        &["--poly-loss", "1"],
        &["--precise-bn"],
        &["--sam", "0.05"],
        &["--grad-centralization"],
        &["--cycle-momentum"],
        &["--beta2", "0.99"],
        &["--lookahead", "5"],
        &["--ghost-batch", "16"],
    ] {
        let mut args = vec!["train", "--resume", "somewhere", "--data-dir"];
        args.push(data.to_str().unwrap());
        args.extend_from_slice(flag);
        let out = run(BIN, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag:?}: {err}");
        assert!(
            err.contains("cannot be used with") && err.contains(flag[0]),
            "{flag:?}: {err}"
        );
    }
}

#[test]
fn evaluate_tta_reports_a_separate_labelled_figure() {
    let Some(data) = mnist_dir_if_present() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    ok(
        // 2 epochs on 2,000 images: well above chance (about 87%), so the views matter.
        &run_owned(BIN, &train_args("improved", "2", "2000", &dir, &[])),
        "train",
    );
    let weights = dir.join("model.safetensors");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "evaluate",
            "--weights",
            weights.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = run(BIN, &args);
        ok(&out, &format!("evaluate {extra:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plain: serde_json::Value = serde_json::from_str(&eval(&["--json"])).unwrap();
    assert!(plain.get("tta_accuracy").is_none());
    let tta: serde_json::Value = serde_json::from_str(&eval(&["--json", "--tta"])).unwrap();
    // The plain figure is unchanged; the TTA figure stands beside it, with its views named.
    assert_eq!(tta["test_accuracy"], plain["test_accuracy"]);
    assert_eq!(
        tta["test_accuracy"],
        read_json(&dir.join("results.json"))["test_accuracy"]
    );
    let acc = tta["tta_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5 && acc <= 1.0, "{tta}");
    assert!(tta["tta_loss"].as_f64().unwrap().is_finite());
    assert!(tta["tta_views"].as_str().unwrap().contains("1-px shifts"));
    let text = eval(&["--tta"]);
    assert!(
        text.contains("test accuracy") && text.contains("tta_accuracy"),
        "{text}"
    );
}

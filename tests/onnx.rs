//! ONNX export checked by an independent runtime: each of the six shipped models is exported, loaded
//! with tract (a Rust ONNX runtime that shares no code with candle) and run on the real MNIST test
//! images; its logits must match ours and its test accuracy must be the same. Then the `export`
//! command end to end, and its bad inputs.

mod common;

use std::path::Path;

use mnist_models::{pretrained, Classifier, Solution, Variant};
use tract_onnx::prelude::{
    tvec, Framework, InferenceModelExt, IntoRunnable, Tensor as TractTensor,
};

/// How far tract's logits may be from ours on the first [`CHECKED`] test images.
const TOLERANCE: f32 = 1e-4;
/// Test images whose logits are compared one by one.
const CHECKED: usize = 1_000;
/// Images per tract run.
const BATCH: usize = 1_000;

/// The index of the largest value.
fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// Runs the ONNX file `bytes` with tract on `images` (784 grey levels each), its batch size left
/// free, in batches of [`BATCH`]: the logits of each image.
fn tract_logits(bytes: &[u8], images: &[Vec<u8>], what: &str) -> Vec<Vec<f32>> {
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap_or_else(|e| panic!("{what}: tract cannot load the exported file: {e:?}"));
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(BATCH) {
        let pixels: Vec<f32> = chunk.concat().iter().map(|&p| p as f32 / 255.0).collect();
        let x = TractTensor::from_shape(&[chunk.len(), 1, 28, 28], &pixels).unwrap(); // [n, 1, 28, 28]
        let result = plan
            .run(tvec!(x.into()))
            .unwrap_or_else(|e| panic!("{what}: tract cannot run the exported file: {e:?}"));
        let logits = result[0].to_plain_array_view::<f32>().unwrap(); // [n, 10]
        assert_eq!(logits.shape(), &[chunk.len(), 10], "{what}: output shape");
        out.extend(
            logits
                .outer_iter()
                .map(|row| row.iter().copied().collect::<Vec<f32>>()),
        );
    }
    out
}

fn test_images() -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
    let dir = common::mnist_dir_if_present()?;
    let mnist = mnist_data::load_dir(&dir, 0).expect("MNIST files");
    let test = &mnist.test;
    let images = (0..test.len()).map(|i| test.image(i).to_vec()).collect();
    Some((images, test.labels().to_vec()))
}

fn correct(logits: &[Vec<f32>], labels: &[u8]) -> usize {
    logits
        .iter()
        .zip(labels)
        .filter(|(l, &y)| argmax(l) == y as usize)
        .count()
}

/// tract's logits of the ONNX file `bytes` on `images` agree with `model`'s (candle's) within
/// [`TOLERANCE`], logit by logit.
fn agrees_with_tract(model: &Classifier, bytes: &[u8], images: &[Vec<u8>], what: &str) {
    let theirs = tract_logits(bytes, images, what);
    let ours = model.logits(images).unwrap();
    assert_eq!(theirs.len(), ours.len(), "{what}");
    for (a, b) in ours.iter().zip(&theirs) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= TOLERANCE,
                "{what}: candle {x} vs tract {y}"
            );
        }
    }
}

fn check_against_tract(model: &Classifier, images: &[Vec<u8>], labels: &[u8], what: &str) {
    let bytes = mnist_onnx::export(model.config(), model.vars()).expect("export");
    let ours = model.logits(images).expect("candle logits");
    let theirs = tract_logits(&bytes, images, what);
    assert_eq!(theirs.len(), ours.len(), "{what}");
    let diff = |range: std::ops::Range<usize>| {
        ours[range.clone()]
            .iter()
            .zip(&theirs[range])
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max)
    };
    let (checked, all) = (diff(0..CHECKED), diff(0..ours.len()));
    let (ours_ok, theirs_ok) = (correct(&ours, labels), correct(&theirs, labels));
    eprintln!(
        "{what}: {} bytes, max |logit difference| {checked:.2e} on the first {CHECKED} test images \
         ({all:.2e} on all {}), test accuracy candle {ours_ok} / tract {theirs_ok} of {}",
        bytes.len(),
        ours.len(),
        labels.len()
    );
    assert!(
        checked <= TOLERANCE,
        "{what}: tract's logits differ from candle's by up to {checked:e} (> {TOLERANCE:e})"
    );
    assert_eq!(
        ours_ok, theirs_ok,
        "{what}: candle classifies {ours_ok} test images right, tract {theirs_ok}"
    );
    // The batch size is free: one image alone gives the same logits.
    let one = tract_logits(&bytes, &images[..1], what);
    let d1 = ours[0]
        .iter()
        .zip(&one[0])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(d1 <= TOLERANCE, "{what}: batch of one differs by {d1:e}");
}

#[test]
fn every_shipped_model_runs_the_same_in_tract() {
    let Some((images, labels)) = test_images() else {
        return;
    };
    for solution in Solution::ALL {
        for variant in Variant::ALL {
            let what = format!("{solution}-{variant}");
            let model = pretrained(solution, variant).expect("shipped model");
            check_against_tract(&model, &images, &labels, &what);
        }
    }
}

/// The conv model of the spec `json` with seeded random weights (seed 5).
fn seeded_model(json: &str) -> Classifier {
    use candle_core::{DType, Device};
    use mnist_models::{dropout_rng, ArchSpec, ModelConfig};
    let arch = ArchSpec::from_json(json).unwrap();
    let config = ModelConfig::custom(Solution::Conv, arch);
    let vars = mnist_layers::init::SeededVarMap::new(5);
    config
        .build(vars.var_builder(DType::F32, &Device::Cpu), dropout_rng(5))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("model.safetensors");
    vars.var_map().save(&weights).unwrap();
    Classifier::load(config, &weights, &Device::Cpu).unwrap()
}

/// Squeeze-and-excitation exports as `GlobalAveragePool`, two 1x1 `Conv`s with `Relu` and `Sigmoid`
/// between, and a broadcast `Mul` (the spec of `tests/fixtures/squeeze-excite.json`: one mid-network,
/// one before the global average pool; seeded random weights), and tract computes the logits candle does.
#[test]
fn squeeze_excite_exports_as_gated_channels() {
    let Some((images, _)) = test_images() else {
        return;
    };
    let model = seeded_model(include_str!("fixtures/squeeze-excite.json"));
    let bytes = mnist_onnx::export(model.config(), model.vars()).unwrap();
    agrees_with_tract(&model, &bytes, &images[..64], "squeeze-excite");
}

/// A deskewing model (`tests/fixtures/deskew.json`: the input deskewed, then two convolutions and a
/// dense layer read every pixel's position; seeded random weights) exports its deskewing as moments,
/// a clamped slant and two hat-weighted `MatMul`s, and tract computes the logits candle does, on real
/// test digits and on a blank image (no mass: nothing moves) alike.
#[test]
fn deskewing_exports_as_moments_and_a_sheared_resampling() {
    let Some((images, _)) = test_images() else {
        return;
    };
    let model = seeded_model(include_str!("fixtures/deskew.json"));
    let bytes = mnist_onnx::export(model.config(), model.vars()).unwrap();
    agrees_with_tract(&model, &bytes, &images[..64], "deskew");
    agrees_with_tract(&model, &bytes, &[vec![0u8; 784]], "deskew, blank");
    // The same weights without deskewing give other logits: the test sees the transform.
    let plain = include_str!("fixtures/deskew.json").replace("\"deskew\": true,", "");
    let plain = seeded_model(&plain);
    let (a, b) = (
        model.logits(&images[..8]).unwrap(),
        plain.logits(&images[..8]).unwrap(),
    );
    assert_ne!(a, b);
}

/// A tied convolution (`weights_of`: the spec of `tests/fixtures/weights-of.json`, a plain and a
/// separable one, seeded random weights) exports its weights once: one initializer per variable, read
/// by both `Conv` nodes; and tract computes the logits candle does.
#[test]
fn tied_weights_export_as_one_initializer_read_twice() {
    let Some((images, _)) = test_images() else {
        return;
    };
    let model = seeded_model(include_str!("fixtures/weights-of.json"));
    let bytes = mnist_onnx::export(model.config(), model.vars()).unwrap();
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .unwrap();
    let graph = proto.graph.as_ref().unwrap();
    let inits: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut unique = inits.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), inits.len(), "{inits:?}");
    assert!(!inits
        .iter()
        .any(|n| n.starts_with("block3.conv") || n.starts_with("block5.conv")));
    let readers = |init: &str| {
        graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == init))
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        readers("block2.conv.weight"),
        ["block2.conv", "block3.conv"]
    );
    assert_eq!(readers("block2.conv.bias"), ["block2.conv", "block3.conv"]);
    assert_eq!(
        readers("block4.conv.pointwise.weight"),
        ["block4.conv.pointwise", "block5.conv.pointwise"]
    );
    agrees_with_tract(&model, &bytes, &images[..64], "weights-of");
}

/// Residual shortcuts (`tests/fixtures/shortcut.json`: one over a plain convolution, one over a separable
/// and a plain one with its BatchNorm before the activation; seeded random weights) export as `Add` nodes
/// of the block's output and the input of the layer the shortcut starts at; tract computes the logits
/// candle does.
#[test]
fn shortcuts_export_as_add_nodes() {
    let Some((images, _)) = test_images() else {
        return;
    };
    let model = seeded_model(include_str!("fixtures/shortcut.json"));
    let bytes = mnist_onnx::export(model.config(), model.vars()).unwrap();
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .unwrap();
    let graph = proto.graph.as_ref().unwrap();
    let adds: Vec<(&str, Vec<&str>)> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Add")
        .map(|n| {
            (
                n.name.as_str(),
                n.input.iter().map(|i| i.as_str()).collect(),
            )
        })
        .collect();
    let output_of = |name: &str| {
        graph
            .node
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.output[0].as_str())
            .unwrap()
    };
    assert_eq!(adds.len(), 2, "{adds:?}");
    // block2 adds its own input (block1's BatchNorm after its pool), block4 the input of block3.
    assert_eq!(adds[0].0, "block2.add");
    assert_eq!(adds[0].1[1], output_of("block1.pool"));
    assert_eq!(adds[1].0, "block4.add");
    assert_eq!(adds[1].1[1], output_of("block2.add"));
    agrees_with_tract(&model, &bytes, &images[..64], "shortcut");
}

/// SiLU exports as `Mul(x, Sigmoid(x))` (opset 13 has no SiLU operator) wherever it goes (the spec of
/// `tests/fixtures/silu.json`, seeded random weights), and tract computes the logits candle does.
#[test]
fn silu_exports_as_the_input_times_its_sigmoid() {
    let Some((images, _)) = test_images() else {
        return;
    };
    let model = seeded_model(include_str!("fixtures/silu.json"));
    let bytes = mnist_onnx::export(model.config(), model.vars()).unwrap();
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .unwrap();
    let ops: Vec<&str> = proto
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type.as_str())
        .collect();
    let count = |op: &str| ops.iter().filter(|&&o| o == op).count();
    // Two conv blocks, the separable convolution, two inception branches and a dense layer.
    assert_eq!(
        (count("Sigmoid"), count("Mul"), count("Relu")),
        (6, 6, 0),
        "{ops:?}"
    );
    agrees_with_tract(&model, &bytes, &images[..64], "silu");
}

/// The exported file's input and output, as tract reads them.
#[test]
fn exported_file_declares_input_and_logits() {
    let model = pretrained(Solution::Inception, Variant::Seed).unwrap();
    let bytes = mnist_onnx::export(model.config(), model.vars()).unwrap();
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .unwrap();
    assert_eq!(proto.opset_import[0].version, mnist_onnx::OPSET);
    let graph = proto.graph.unwrap();
    assert_eq!(graph.input.len(), 1);
    assert_eq!(graph.input[0].name, mnist_onnx::INPUT_NAME);
    assert_eq!(graph.output.len(), 1);
    assert_eq!(graph.output[0].name, mnist_onnx::OUTPUT_NAME);
    let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(ops.contains(&"Concat"), "{ops:?}");
    assert!(!ops.contains(&"Dropout"), "{ops:?}");
    // Separable convolutions: a depthwise Conv (group = channels) then a 1x1 Conv.
    let grouped = graph.node.iter().filter(|n| {
        n.op_type == "Conv" && n.attribute.iter().any(|a| a.name == "group" && a.i > 1)
    });
    assert!(grouped.count() > 0, "{ops:?}");
}

// ---- the command line ----

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The entries of `dir`, hidden temporary files included.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn export_command_writes_a_file_tract_runs() {
    let Some((images, labels)) = test_images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sep.onnx");
    let run = common::run(
        "solution-separable",
        &[
            "export",
            "--variant",
            "seed",
            "--onnx",
            out.to_str().unwrap(),
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("shipped"), "{stdout}");
    assert_eq!(entries(dir.path()), ["sep.onnx"]);
    let bytes = std::fs::read(&out).unwrap();
    let model = pretrained(Solution::Separable, Variant::Seed).unwrap();
    assert_eq!(
        bytes,
        mnist_onnx::export(model.config(), model.vars()).unwrap(),
        "the command writes what the library exports"
    );
    let n = 100;
    let theirs = tract_logits(&bytes, &images[..n], "solution-separable export");
    assert_eq!(
        correct(&theirs, &labels[..n]),
        correct(&model.logits(&images[..n]).unwrap(), &labels[..n])
    );
}

#[test]
fn export_command_exports_trained_weights_from_their_run_folder() {
    let Some((images, _)) = test_images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let train = common::run_owned(
        "solution-inception",
        &common::train_args("improved", "1", "500", &run_dir, &[]),
    );
    assert!(train.status.success(), "{}", stderr(&train));
    let weights = run_dir.join("model.safetensors");
    let out = dir.path().join("inc.onnx");
    let run = common::run(
        "solution-inception",
        &[
            "export",
            "--weights",
            weights.to_str().unwrap(),
            "--onnx",
            out.to_str().unwrap(),
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let config: serde_json::Value = common::read_json(&run_dir.join("config.json"));
    let model_config: mnist_models::ModelConfig =
        serde_json::from_value(config["model"].clone()).unwrap();
    let model = Classifier::load(model_config, &weights, &candle_core::Device::Cpu).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    agrees_with_tract(&model, &bytes, &images[..50], "trained inception");
}

/// Runs `export` with `args`; it must fail with `code`, print an error that contains each of `needles`,
/// and leave `dir` as it was.
fn export_fails(bin: &str, args: &[&str], code: i32, needles: &[&str], dir: &Path) {
    let before = entries(dir);
    let mut all = vec!["export"];
    all.extend_from_slice(args);
    let out = common::run(bin, &all);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{args:?}: '{needle}' not in: {err}");
    }
    assert_eq!(entries(dir), before, "{args:?} left files behind");
}

#[test]
fn export_refuses_bad_input_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let onnx = d.join("out.onnx");
    let onnx = onnx.to_str().unwrap();

    // The output is a folder.
    let folder = d.join("folder.onnx");
    std::fs::create_dir(&folder).unwrap();
    export_fails(
        "solution-conv",
        &["--onnx", folder.to_str().unwrap()],
        2,
        &["--onnx", "folder"],
        d,
    );
    // The output's folder does not exist, or is a file.
    let missing = d.join("no-such-dir").join("out.onnx");
    export_fails(
        "solution-conv",
        &["--onnx", missing.to_str().unwrap()],
        2,
        &["--onnx", "no folder", "no-such-dir"],
        d,
    );
    let file = d.join("file");
    std::fs::write(&file, b"").unwrap();
    let under_file = file.join("out.onnx");
    export_fails(
        "solution-conv",
        &["--onnx", under_file.to_str().unwrap()],
        2,
        &["--onnx", "no folder"],
        d,
    );

    // Weights of another variant (no config.json beside them: --variant says which model).
    let seed_weights = d.join("conv-seed.safetensors");
    let model = pretrained(Solution::Conv, Variant::Seed).unwrap();
    model.vars().save(&seed_weights).unwrap();
    export_fails(
        "solution-conv",
        &[
            "--weights",
            seed_weights.to_str().unwrap(),
            "--variant",
            "improved",
            "--onnx",
            onnx,
        ],
        1,
        &["conv-seed.safetensors"],
        d,
    );
    // Weights of another solution.
    export_fails(
        "solution-separable",
        &[
            "--weights",
            seed_weights.to_str().unwrap(),
            "--variant",
            "seed",
            "--onnx",
            onnx,
        ],
        1,
        &["conv-seed.safetensors"],
        d,
    );
    // A corrupt weights file.
    let corrupt = d.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    export_fails(
        "solution-conv",
        &["--weights", corrupt.to_str().unwrap(), "--onnx", onnx],
        1,
        &["corrupt.safetensors"],
        d,
    );
    // An architecture with a layer that is not one (the exporter writes every layer kind there is).
    let arch = d.join("arch.json");
    std::fs::write(
        &arch,
        r#"{ "layers": [ { "type": "flatten" }, { "type": "lstm", "units": 10 } ] }"#,
    )
    .unwrap();
    export_fails(
        "solution-conv",
        &[
            "--weights",
            seed_weights.to_str().unwrap(),
            "--arch",
            arch.to_str().unwrap(),
            "--onnx",
            onnx,
        ],
        2,
        &["arch.json", "layers[1]", "lstm"],
        d,
    );
    // --arch describes a shipped model only with --weights.
    export_fails(
        "solution-conv",
        &["--arch", arch.to_str().unwrap(), "--onnx", onnx],
        2,
        &["--arch", "--weights"],
        d,
    );
}

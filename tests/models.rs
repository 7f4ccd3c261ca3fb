//! Every built-in architecture, through the public `mnist_models` API: its summary row by row (output
//! shape and parameters after every layer, pinned), the same counts in the built model whatever the
//! kernels, and seeded, deterministic weights.

use candle_core::{DType, Device, ModuleT, Tensor};
use mnist_challenge::layers::init::SeededVarMap;
use mnist_challenge::layers::Kernels;
use mnist_challenge::models::{
    build, builtin, dropout_rng, is_trainable, summary, ArchSpec, Net, Solution, Variant,
};

/// `spec` built on the CPU on `kernels`, its weights and dropout masks drawn from `seed`; the variables
/// stay readable through the returned map.
fn seeded(spec: &ArchSpec, seed: u64, kernels: Kernels) -> (Net, SeededVarMap) {
    let vars = SeededVarMap::new(seed);
    let vb = vars.var_builder(DType::F32, &Device::Cpu);
    let net = build(spec, vb, kernels, dropout_rng(seed)).unwrap();
    (net, vars)
}

/// `n` images of uniform pixels in [0, 1), the same for the same `seed` on every machine.
fn images(n: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * 28 * 28).map(|_| rng.random::<f32>()).collect();
    Tensor::from_vec(v, (n, 1, 28, 28), &Device::Cpu).unwrap()
}

type Rows = &'static [(&'static str, &'static [usize], usize)];
/// A built-in spec's expected summary: (solution, variant, (total, trainable, non-trainable), rows).
type Pinned = (Solution, Variant, (usize, usize, usize), Rows);

/// (solution, variant, (total, trainable, non-trainable), rows). The seed rows are the original Keras
/// notebook's (`shared/reference/seed-architectures.md`); Keras counts BatchNorm statistics as params.
const TABLE: [Pinned; 6] = [
    (
        Solution::Conv,
        Variant::Seed,
        (8640, 8580, 60),
        &[
            ("conv1", &[20, 28, 28], 1000),
            ("bn1", &[20, 28, 28], 80),
            ("pool1", &[20, 14, 14], 0),
            ("conv2", &[10, 10, 10], 5010),
            ("bn2", &[10, 10, 10], 40),
            ("pool2", &[10, 5, 5], 0),
            ("dropout", &[10, 5, 5], 0),
            ("flatten", &[250], 0),
            ("dense", &[10], 2510),
        ],
    ),
    (
        Solution::Conv,
        Variant::Improved,
        (8184, 8012, 172),
        &[
            ("block1.conv", &[10, 26, 26], 90),
            ("block1.bn", &[10, 26, 26], 40),
            ("block2.conv", &[20, 24, 24], 1800),
            ("block2.bn", &[20, 24, 24], 80),
            ("block3.conv", &[10, 24, 24], 200),
            ("block3.bn", &[10, 24, 24], 40),
            ("block3.pool", &[10, 12, 12], 0),
            ("block4.conv", &[14, 10, 10], 1260),
            ("block4.bn", &[14, 10, 10], 56),
            ("block5.conv", &[16, 8, 8], 2016),
            ("block5.bn", &[16, 8, 8], 64),
            ("block6.conv", &[16, 6, 6], 2304),
            ("block6.bn", &[16, 6, 6], 64),
            ("gap", &[16], 0),
            ("dense", &[10], 170),
        ],
    ),
    (
        Solution::Separable,
        Variant::Seed,
        (4967, 4879, 88),
        &[
            ("sepconv1", &[28, 26, 26], 65),
            ("bn1", &[28, 26, 26], 112),
            ("pool1", &[28, 13, 13], 0),
            ("sepconv2", &[16, 11, 11], 716),
            ("bn2", &[16, 11, 11], 64),
            ("pool2", &[16, 5, 5], 0),
            ("dropout", &[16, 5, 5], 0),
            ("flatten", &[400], 0),
            ("dense", &[10], 4010),
        ],
    ),
    (
        Solution::Separable,
        Variant::Improved,
        (4763, 4467, 296),
        &[
            ("block1.conv", &[16, 26, 26], 25),
            ("block1.bn", &[16, 26, 26], 64),
            ("block2.conv", &[28, 24, 24], 592),
            ("block2.bn", &[28, 24, 24], 112),
            ("block3.conv", &[16, 24, 24], 448),
            ("block3.bn", &[16, 24, 24], 64),
            ("block3.pool", &[16, 12, 12], 0),
            ("block4.conv", &[28, 10, 10], 592),
            ("block4.bn", &[28, 10, 10], 112),
            ("block5.conv", &[28, 8, 8], 1036),
            ("block5.bn", &[28, 8, 8], 112),
            ("block6.conv", &[32, 6, 6], 1148),
            ("block6.bn", &[32, 6, 6], 128),
            ("gap", &[32], 0),
            ("dense", &[10], 330),
        ],
    ),
    (
        Solution::Inception,
        Variant::Seed,
        (3077, 3077, 0),
        &[
            ("inception.branch0.0", &[2, 28, 28], 13),
            ("inception.branch0.1", &[2, 28, 28], 0),
            ("inception.branch0.2", &[1, 28, 28], 3),
            ("inception.branch0.3", &[1, 28, 28], 0),
            ("inception.branch1.0", &[2, 28, 28], 4),
            ("inception.branch1.1", &[2, 28, 28], 56),
            ("inception.branch1.2", &[2, 28, 28], 0),
            ("inception.branch2.0", &[2, 28, 28], 4),
            ("inception.branch2.1", &[2, 28, 28], 0),
            ("inception.branch3.0", &[2, 28, 28], 4),
            ("inception.branch3.1", &[2, 28, 28], 24),
            ("inception.branch3.2", &[2, 28, 28], 0),
            ("inception", &[7, 28, 28], 0),
            ("sepconv", &[2, 13, 13], 79),
            ("pool", &[2, 12, 12], 0),
            ("dropout", &[2, 12, 12], 0),
            ("flatten", &[288], 0),
            ("dense", &[10], 2890),
        ],
    ),
    (
        Solution::Inception,
        Variant::Improved,
        (3066, 2842, 224),
        &[
            ("deskew", &[1, 28, 28], 0),
            ("inception.branch0.0", &[4, 28, 28], 8),
            ("inception.branch1.0", &[6, 28, 28], 60),
            ("inception.branch2.0", &[4, 28, 28], 104),
            ("inception.branch3.0", &[1, 28, 28], 0),
            ("inception.branch3.1", &[2, 28, 28], 4),
            ("inception", &[16, 28, 28], 0),
            ("inception_bn", &[16, 28, 28], 64),
            ("block1.conv", &[24, 26, 26], 528),
            ("block1.bn", &[24, 26, 26], 96),
            ("block2.conv", &[12, 26, 26], 288),
            ("block2.bn", &[12, 26, 26], 48),
            ("block2.pool", &[12, 13, 13], 0),
            ("block3.conv", &[20, 11, 11], 348),
            ("block3.bn", &[20, 11, 11], 80),
            ("block4.conv", &[16, 9, 9], 500),
            ("block4.bn", &[16, 9, 9], 64),
            ("block5.conv", &[24, 7, 7], 528),
            ("block5.bn", &[24, 7, 7], 96),
            ("gap", &[24], 0),
            ("dense", &[10], 250),
        ],
    ),
];

#[test]
fn every_builtin_spec_has_its_pinned_summary() {
    for (solution, variant, (total, trainable, non_trainable), rows) in TABLE {
        let s = summary(builtin(solution, variant)).unwrap();
        assert_eq!(
            (s.params_total, s.params_trainable, s.params_non_trainable),
            (total, trainable, non_trainable),
            "{solution} {variant}\n{s}"
        );
        let got: Vec<(&str, &[usize], usize)> = s
            .layers
            .iter()
            .map(|l| (l.name.as_str(), l.output_shape.as_slice(), l.params))
            .collect();
        assert_eq!(got, rows, "{solution} {variant}");
        assert!(total <= solution.param_budget(), "{solution} {variant}");
    }
}

/// The variables a built model creates: every name and count, for both kernel choices, agree with the
/// summary (so a fused block hides no variable and adds none).
#[test]
fn built_models_hold_exactly_the_summarised_variables() {
    for (solution, variant, (total, trainable, _), _) in TABLE {
        let spec = builtin(solution, variant);
        let mut names = Vec::new();
        for kernels in [Kernels::Auto, Kernels::Reference] {
            let (net, vars) = seeded(spec, 1, kernels);
            let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(net.forward_t(&x, false).unwrap().dims(), &[2, 10]);
            let data = vars.var_map().data().lock().unwrap();
            let count = |f: &dyn Fn(&str) -> bool| -> usize {
                data.iter()
                    .filter(|(n, _)| f(n))
                    .map(|(_, v)| v.elem_count())
                    .sum()
            };
            assert_eq!(count(&|_| true), total, "{solution} {variant} {kernels:?}");
            assert_eq!(
                count(&|n| is_trainable(n)),
                trainable,
                "{solution} {variant} {kernels:?}"
            );
            let mut n: Vec<String> = data.keys().cloned().collect();
            n.sort();
            names.push(n);
        }
        assert_eq!(
            names[0], names[1],
            "{solution} {variant}: variable names depend on the kernels"
        );
    }
}

#[test]
fn specs_round_trip_through_json() {
    for (solution, variant, _, _) in TABLE {
        let spec = builtin(solution, variant);
        let back = ArchSpec::from_json(&spec.to_json()).unwrap();
        assert_eq!(&back, spec, "{solution} {variant}");
        assert_eq!(summary(&back).unwrap(), summary(spec).unwrap());
    }
}

#[test]
fn every_model_maps_a_batch_to_ten_logits_and_the_same_seed_gives_the_same_weights() {
    let xs = images(3, 1);
    for (solution, variant, _, _) in TABLE {
        let spec = builtin(solution, variant);
        let run = |seed| {
            let (net, _vars) = seeded(spec, seed, Kernels::Auto);
            net.forward_t(&xs, false).unwrap()
        };
        let a = run(7);
        assert_eq!(a.dims(), &[3, 10], "{solution} {variant}");
        let diff = |x: &Tensor, y: &Tensor| {
            x.sub(y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(
            diff(&a, &run(7)),
            0.0,
            "{solution} {variant}: same seed, different output"
        );
        assert!(
            diff(&a, &run(8)) > 0.0,
            "{solution} {variant}: different seeds, same output"
        );
    }
}

/// Inference over a batch larger than one chunk (`mnist_models::EVAL_CHUNK` images, run through the
/// whole network chunk by chunk, in parallel) gives every image the logits it gets alone: at a batch that
/// is not a multiple of the chunk, on both kernel choices, for every built-in model. Equal up to float
/// rounding, not bit for bit: candle's matmul (the dense layers) sums in an order that depends on the
/// number of rows.
#[test]
fn inference_in_chunks_matches_image_by_image() {
    use mnist_challenge::models::EVAL_CHUNK;
    let b = 2 * EVAL_CHUNK + 7;
    let xs = images(b, 2);
    for (solution, variant, _, _) in TABLE {
        for kernels in [Kernels::Auto, Kernels::Reference] {
            let (net, _vars) = seeded(builtin(solution, variant), 3, kernels);
            let all = net.forward_t(&xs, false).unwrap();
            assert_eq!(all.dims(), &[b, 10]);
            let one_by_one: Vec<Tensor> = (0..b)
                .map(|i| net.forward_t(&xs.narrow(0, i, 1).unwrap(), false).unwrap())
                .collect();
            let alone = Tensor::cat(&one_by_one, 0).unwrap();
            let diff = (all - alone).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{solution} {variant} {kernels:?}: {diff}");
        }
    }
}

/// A spec with SiLU wherever an activation can go: a conv block with its BatchNorm after the activation
/// (the fused block's place), one with the BatchNorm before it, a separable convolution, an inception
/// module's branches and a dense layer.
const SILU_SPEC: &str = include_str!("fixtures/silu.json");

/// SiLU (`"activation": "silu"`) runs on candle's own op after the convolution, on both kernel choices:
/// the same logits in inference and in training and the same gradient of every variable, the fast
/// kernels against the reference twins, and different logits from the same spec with ReLU (so it is
/// applied, not skipped as an activation the fused kernels do not know).
#[test]
fn silu_trains_and_infers_the_same_on_both_kernel_choices() {
    use candle_core::Var;
    let spec = ArchSpec::from_json(SILU_SPEC).unwrap();
    let xs = images(5, 3);
    let run = |spec: &ArchSpec, kernels: Kernels| {
        let (net, vars) = seeded(spec, 4, kernels);
        let eval = net.forward_t(&xs, false).unwrap();
        let train = net.forward_t(&xs, true).unwrap();
        let loss = train.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let data = vars.var_map().data().lock().unwrap();
        let mut g: Vec<(String, Vec<f32>)> = data
            .iter()
            .filter_map(|(n, v): (&String, &Var)| {
                let t = grads.get(v.as_tensor())?;
                Some((
                    n.clone(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ))
            })
            .collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (v(&eval), v(&train), g)
    };
    // Within `rel` of the largest value, or of `floor` where every value is nearly zero: a sum that
    // cancels, such as a BatchNorm shift just before the global average pool, or the bias of a
    // convolution that a BatchNorm follows (zero but for rounding, whose size depends on the order of
    // the sums, so on the machine's vector width).
    let close = |a: &[f32], b: &[f32], rel: f32, floor: f32, what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= rel * scale, "{what}: {x} vs {y}");
        }
    };
    let (fe, ft, fg) = run(&spec, Kernels::Auto);
    let (re, rt, rg) = run(&spec, Kernels::Reference);
    close(&fe, &re, 1e-4, 1e-2, "inference logits");
    close(&ft, &rt, 1e-4, 1e-2, "training logits");
    assert_eq!(fg.len(), rg.len());
    assert!(
        fg.len() >= 15,
        "every trained variable has a gradient: {}",
        fg.len()
    );
    // Gradients sum the logits' rounding over the batch and every layer above: within 1e-3, and on a
    // tenth of the model's largest gradient where a variable's own gradient is all but zero.
    let largest = rg
        .iter()
        .flat_map(|(_, g)| g)
        .fold(0f32, |m, v| m.max(v.abs()));
    for ((n, a), (m, b)) in fg.iter().zip(&rg) {
        assert_eq!(n, m);
        assert!(a.iter().all(|v| v.is_finite()), "{n}");
        close(a, b, 1e-3, 0.1 * largest, n);
    }
    let relu = ArchSpec::from_json(&SILU_SPEC.replace("silu", "relu")).unwrap();
    let (le, _, _) = run(&relu, Kernels::Auto);
    assert!(
        fe.iter().zip(&le).any(|(a, b)| (a - b).abs() > 1e-3),
        "SiLU and ReLU give the same logits"
    );
    let rows = summary(&spec).unwrap();
    assert!(
        rows.layers
            .iter()
            .any(|l| l.kind == "Activation" && l.name.ends_with(".silu")),
        "the BatchNorm-before block's SiLU is a summary row of its own"
    );
}

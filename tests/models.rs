//! Parameter counts and shapes of every architecture, through the public `mnist_models` API.

use candle_core::{DType, Device, ModuleT, Tensor};
use mnist_challenge::layers::init::SeededVarMap;
use mnist_challenge::models::{build, dropout_rng, summary, ModelConfig, Solution, Variant};

#[test]
fn seed_parameter_counts_match_the_original_keras_models() {
    // (solution, total, trainable, non-trainable) from the original notebook.
    let expected = [
        (Solution::Conv, 8_640, 8_580, 60),
        (Solution::Separable, 4_967, 4_879, 88),
        (Solution::Inception, 3_077, 3_077, 0),
    ];
    for (solution, total, trainable, non_trainable) in expected {
        let s = summary(&ModelConfig::new(solution, Variant::Seed)).unwrap();
        assert_eq!(
            (s.params_total, s.params_trainable, s.params_non_trainable),
            (total, trainable, non_trainable),
            "{s}"
        );
    }
}

#[test]
fn seed_layer_output_shapes_match_the_original() {
    let s = summary(&ModelConfig::new(Solution::Conv, Variant::Seed)).unwrap();
    let shapes: Vec<_> = s.layers.iter().map(|l| l.output_shape.clone()).collect();
    assert_eq!(shapes[0], vec![20, 28, 28]);
    assert_eq!(shapes[2], vec![20, 14, 14]);
    assert_eq!(shapes[3], vec![10, 10, 10]);
    assert_eq!(shapes[5], vec![10, 5, 5]);
    let params: Vec<_> = s.layers.iter().map(|l| l.params).collect();
    assert_eq!(params, vec![1_000, 80, 0, 5_010, 40, 0, 0, 0, 2_510]);

    let s = summary(&ModelConfig::new(Solution::Separable, Variant::Seed)).unwrap();
    let params: Vec<_> = s.layers.iter().map(|l| l.params).collect();
    assert_eq!(params, vec![65, 112, 0, 716, 64, 0, 0, 0, 4_010]);
    assert_eq!(s.layers[0].output_shape, vec![28, 26, 26]);
    assert_eq!(s.layers[3].output_shape, vec![16, 11, 11]);

    let s = summary(&ModelConfig::new(Solution::Inception, Variant::Seed)).unwrap();
    assert_eq!(s.layers[0].output_shape, vec![7, 28, 28]);
    assert_eq!(s.layers[1].output_shape, vec![2, 13, 13]);
    assert_eq!(s.layers[1].params, 79);
    assert_eq!(s.layers[2].output_shape, vec![2, 12, 12]);
    assert_eq!(s.layers.last().unwrap().params, 2_890);
}

#[test]
fn improved_variants_stay_within_their_budgets() {
    for solution in Solution::ALL {
        let s = summary(&ModelConfig::new(solution, Variant::Improved)).unwrap();
        assert!(
            s.params_total <= solution.param_budget(),
            "{solution}: {} > {}\n{s}",
            s.params_total,
            solution.param_budget()
        );
        assert!(s.params_total < 10_000);
    }
}

#[test]
fn every_model_maps_a_batch_to_ten_logits_and_the_same_seed_gives_the_same_weights() {
    let device = Device::Cpu;
    let xs = Tensor::rand(0f32, 1f32, (3, 1, 28, 28), &device).unwrap();
    for solution in Solution::ALL {
        for variant in Variant::ALL {
            let cfg = ModelConfig::new(solution, variant);
            let run = |seed| {
                let vars = SeededVarMap::new(seed);
                let net = build(
                    &cfg,
                    vars.var_builder(DType::F32, &device),
                    dropout_rng(seed),
                )
                .unwrap();
                net.forward_t(&xs, false).unwrap()
            };
            let a = run(7);
            assert_eq!(a.dims(), &[3, 10], "{solution} {variant}");
            let b = run(7);
            let c = run(8);
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
                diff(&a, &b),
                0.0,
                "{solution} {variant}: same seed, different output"
            );
            assert!(
                diff(&a, &c) > 0.0,
                "{solution} {variant}: different seeds, same output"
            );
        }
    }
}

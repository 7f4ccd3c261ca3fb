//! What the recipe options of issue 14 Part B cost, measured in one process on each improved model:
//! a training step (forward, backward, update at the recipe's batch 64) with Adam, with SGD and with
//! Adam and sharpness-aware minimisation (`--sam`: a second forward and backward pass), the
//! moving-average update (`--ema`) after a step, the augmentation of one image with and without the
//! elastic distortion (`--elastic`), and the test-time augmentation of `evaluate --tta` against a plain
//! evaluation. Median of several runs after a warm-up (`-- --quick` for shorter runs).
//!
//! The last column estimates the share of one training epoch (844 steps of 64, 54,000 images) each
//! option adds when its work is done on the training thread; the augmentation runs on the prefetch
//! thread, so its share is what it adds when no core is free for it.

mod common;

use common::{median_secs, model};

use candle_core::{Device, ModuleT, Tensor};
use candle_nn::loss::cross_entropy;
use mnist_challenge::data::{augment_into, AugmentConfig, ElasticConfig, Split};
use mnist_challenge::layers::init::SeededVarMap;
use mnist_challenge::models::{is_trainable, ModelConfig, Solution, Variant};
use mnist_challenge::optim::{
    Ema, EmaConfig, Optimizer, OptimizerConfig, Sam, SamConfig, SgdConfig,
};
use mnist_challenge::train::{evaluate, evaluate_tta, TrainConfig};
use rand::SeedableRng;

const IMAGES_PER_EPOCH: f64 = 54_000.0;

fn named(vars: &SeededVarMap, trainable_only: bool) -> Vec<(String, candle_core::Var)> {
    let mut v: Vec<_> = vars
        .var_map()
        .data()
        .lock()
        .expect("vars")
        .iter()
        .filter(|(n, _)| !trainable_only || is_trainable(n))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// ms per training step (forward, backward, update) at batch 64 with `opt_cfg`.
fn step_ms(cfg: &ModelConfig, opt_cfg: &OptimizerConfig, budget: f64) -> f64 {
    let (net, vars) = model(cfg);
    let mut opt = Optimizer::new(named(&vars, true), opt_cfg).expect("optimizer");
    let xs = Tensor::rand(0f32, 1f32, (64, 1, 28, 28), &Device::Cpu).expect("input");
    let ys = Tensor::from_iter((0..64u32).map(|i| i % 10), &Device::Cpu).expect("labels");
    1e3 * median_secs(budget, 3, None, || {
        let logits = net.forward_t(&xs, true).expect("forward");
        let loss = cross_entropy(&logits, &ys).expect("loss");
        opt.backward_step(&loss).expect("step");
    })
}

/// ms per training step with `opt_cfg` and sharpness-aware minimisation (radius 0.05), as `fit` takes
/// it: the gradient, then `Sam::step` with a second pass keeping the BatchNorm statistics.
fn sam_step_ms(cfg: &ModelConfig, opt_cfg: &OptimizerConfig, budget: f64) -> f64 {
    let (net, vars) = model(cfg);
    let mut opt = Optimizer::new(named(&vars, true), opt_cfg).expect("optimizer");
    let mut sam = Sam::new(named(&vars, true), SamConfig::new(0.05)).expect("sam");
    let xs = Tensor::rand(0f32, 1f32, (64, 1, 28, 28), &Device::Cpu).expect("input");
    let ys = Tensor::from_iter((0..64u32).map(|i| i % 10), &Device::Cpu).expect("labels");
    1e3 * median_secs(budget, 3, None, || {
        let logits = net.forward_t(&xs, true).expect("forward");
        let loss = cross_entropy(&logits, &ys).expect("loss");
        let grads = loss.backward().expect("backward");
        sam.step(&mut opt, &grads, || {
            cross_entropy(&net.forward_train_keeping_statistics(&xs)?, &ys)?.backward()
        })
        .expect("sam step");
    })
}

fn ema_us(cfg: &ModelConfig, budget: f64) -> f64 {
    let (_net, vars) = model(cfg);
    let mut ema = Ema::new(named(&vars, false), EmaConfig::new(0.999)).expect("ema");
    1e6 * median_secs(budget, 3, None, || ema.update().expect("update"))
}

/// µs per augmented image (a batch of 64 digits-like images).
fn augment_us(cfg: &AugmentConfig, budget: f64) -> f64 {
    let src: Vec<u8> = (0..784)
        .map(|i| if (i / 28 + i % 28) % 7 < 3 { 200 } else { 0 })
        .collect();
    let mut dst = vec![0f32; 784];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    1e6 * median_secs(budget, 3, None, || {
        for _ in 0..64 {
            augment_into(&src, &mut dst, cfg, &mut rng);
        }
    }) / 64.0
}

fn main() {
    mnist_challenge::layers::init_runtime();
    // As the solution binaries run: on a worker thread of the pool the kernels use.
    mnist_challenge::layers::on_pool(run);
}

fn run() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = if quick { 0.5 } else { 2.0 };
    println!("threads: {}", rayon::current_num_threads());
    let affine = TrainConfig::recipe(Solution::Conv, Variant::Improved)
        .augment
        .expect("the improved recipe augments");
    let elastic = AugmentConfig {
        elastic: Some(ElasticConfig::new(8.0)),
        ..affine
    };
    let (a, e) = (augment_us(&affine, budget), augment_us(&elastic, budget));
    println!(
        "augment one image: affine {a:.2} us, affine + elastic {e:.2} us ({:.1}x); elastic adds {:.2} s per epoch on the prefetch thread",
        e / a,
        (e - a) * 1e-6 * IMAGES_PER_EPOCH
    );
    println!(
        "{:<22}{:>12}{:>12}{:>10}{:>12}{:>10}{:>14}{:>10}{:>14}{:>14}{:>8}",
        "model",
        "adam step",
        "sgd step",
        "sgd/adam",
        "sam step",
        "sam/adam",
        "ema update",
        "ema share",
        "eval 2000",
        "tta 2000",
        "tta/ev"
    );
    let images: Vec<u8> = (0..2000 * 784).map(|i| ((i * 37) % 251) as u8).collect();
    let labels: Vec<u8> = (0..2000).map(|i| (i % 10) as u8).collect();
    let split = Split::from_parts(images, labels).expect("split");
    for solution in Solution::ALL {
        let cfg = ModelConfig::new(solution, Variant::Improved);
        let adam = TrainConfig::recipe(solution, Variant::Improved).optimizer;
        let sgd = OptimizerConfig::Sgd(SgdConfig::default());
        let (ta, ts) = (step_ms(&cfg, &adam, budget), step_ms(&cfg, &sgd, budget));
        let tsam = sam_step_ms(&cfg, &adam, budget);
        let te = ema_us(&cfg, budget);
        let (net, _vars) = model(&cfg);
        let ev = median_secs(budget, 3, None, || {
            evaluate(&net, &split, &Device::Cpu).expect("evaluate");
        });
        let tta = median_secs(budget, 3, None, || {
            evaluate_tta(&net, &split, &Device::Cpu).expect("tta");
        });
        println!(
            "{:<22}{:>12}{:>12}{:>10}{:>12}{:>10}{:>14}{:>10}{:>14}{:>14}{:>8}",
            format!("{solution}/improved"),
            format!("{ta:.2} ms"),
            format!("{ts:.2} ms"),
            format!("{:.3}", ts / ta),
            format!("{tsam:.2} ms"),
            format!("{:.3}", tsam / ta),
            format!("{te:.1} us"),
            format!("{:.2}%", 100.0 * te * 1e-3 / ta),
            format!("{:.0} ms", ev * 1e3),
            format!("{:.0} ms", tta * 1e3),
            format!("{:.1}x", tta / ev)
        );
    }
}

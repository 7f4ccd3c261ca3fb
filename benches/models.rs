//! Forward-pass and training-step timings of every model, fast kernels vs candle's stock ops, in one run.
//!
//! `cargo bench --bench models` (add `-- --quick` for fewer repetitions, `-- --no-reference` to skip the
//! slow stock-op runs, `-- --filter TEXT` to run only the rows whose `model what` contains TEXT, e.g.
//! `"fwd b1000"` or `improved step`, `-- --reps N` for exactly N timed repetitions, so that `time`
//! measures a fixed amount of work). Prints images/s (forward at batch 1, 32 and 1,000) and ms/step (one
//! training step, forward + backward + Adam, at the batch size of the variant's recipe: 32 for seed, 64 for
//! improved), median of several runs after a warm-up, and the fast/stock ratio measured in the same
//! process.

mod common;

use common::{median_secs, model};

use candle_core::{Device, ModuleT, Tensor};
use candle_nn::loss::cross_entropy;
use mnist_challenge::layers::Kernels;
use mnist_challenge::models::{is_trainable, ModelConfig, Solution, Variant};
use mnist_challenge::optim::{Adam, AdamConfig};
use mnist_challenge::train::TrainConfig;

struct Opts {
    quick: bool,
    reference: bool,
    filter: Option<String>,
    reps: Option<usize>,
}

impl Opts {
    fn wants(&self, row: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| row.contains(f))
    }
}

fn forward_ips(cfg: &ModelConfig, batch: usize, opts: &Opts) -> f64 {
    let (net, _vars) = model(cfg);
    let xs = Tensor::rand(0f32, 1f32, (batch, 1, 28, 28), &Device::Cpu).expect("input");
    let budget = if opts.quick { 0.3 } else { 1.5 };
    let secs = median_secs(budget, 3, opts.reps, || {
        net.forward_t(&xs, false).expect("forward");
    });
    batch as f64 / secs
}

fn train_step_ms(cfg: &ModelConfig, batch: usize, opts: &Opts) -> f64 {
    let (net, vars) = model(cfg);
    let mut named: Vec<_> = vars
        .var_map()
        .data()
        .lock()
        .expect("vars")
        .iter()
        .filter(|(n, _)| is_trainable(n))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = Adam::new(named, AdamConfig::default()).expect("adam");
    let xs = Tensor::rand(0f32, 1f32, (batch, 1, 28, 28), &Device::Cpu).expect("input");
    let ys = Tensor::from_iter((0..batch as u32).map(|i| i % 10), &Device::Cpu).expect("labels");
    let budget = if opts.quick { 0.5 } else { 2.0 };
    1e3 * median_secs(budget, 3, opts.reps, || {
        let logits = net.forward_t(&xs, true).expect("forward");
        let loss = cross_entropy(&logits, &ys).expect("loss");
        opt.backward_step(&loss).expect("step");
    })
}

fn main() {
    mnist_challenge::layers::init_runtime();
    // As the solution binaries run: on a worker thread of the pool the kernels use.
    mnist_challenge::layers::on_pool(run);
}

fn run() {
    let args: Vec<String> = std::env::args().collect();
    let opts = Opts {
        quick: args.iter().any(|a| a == "--quick"),
        reference: !args.iter().any(|a| a == "--no-reference"),
        filter: args
            .iter()
            .position(|a| a == "--filter")
            .and_then(|i| args.get(i + 1).cloned()),
        reps: args
            .iter()
            .position(|a| a == "--reps")
            .and_then(|i| args.get(i + 1)?.parse().ok()),
    };
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<22}{:>10}{:>16}{:>16}{:>9}",
        "model", "what", "fast", "stock candle", "ratio"
    );
    for variant in [Variant::Seed, Variant::Improved] {
        for solution in Solution::ALL {
            let name = format!("{solution}/{variant}");
            let fast = ModelConfig::new(solution, variant);
            let stock = fast.clone().with_kernels(Kernels::Reference);
            for batch in [1usize, 32, 1000] {
                if !opts.wants(&format!("{name} fwd b{batch}")) {
                    continue;
                }
                let f = forward_ips(&fast, batch, &opts);
                let (s, ratio) = if opts.reference {
                    let s = forward_ips(&stock, batch, &opts);
                    (format!("{s:.0} img/s"), format!("{:.1}x", f / s))
                } else {
                    ("-".into(), "-".into())
                };
                println!(
                    "{name:<22}{:>10}{:>16}{s:>16}{ratio:>9}",
                    format!("fwd b{batch}"),
                    format!("{f:.0} img/s")
                );
            }
            let batch = TrainConfig::recipe(solution, variant).batch_size;
            let what = format!("step b{batch}");
            if !opts.wants(&format!("{name} {what}")) {
                continue;
            }
            let f = train_step_ms(&fast, batch, &opts);
            let (s, ratio) = if opts.reference {
                let s = train_step_ms(&stock, batch, &opts);
                (format!("{s:.2} ms"), format!("{:.1}x", s / f))
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "{name:<22}{what:>10}{:>16}{s:>16}{ratio:>9}",
                format!("{f:.2} ms")
            );
        }
    }
}

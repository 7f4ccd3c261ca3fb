//! Helpers shared by the benches: repeated timing and a seeded model.

use std::time::Instant;

use candle_core::{DType, Device};
use mnist_challenge::layers::init::SeededVarMap;
use mnist_challenge::models::{dropout_rng, ModelConfig, Net};

/// Median seconds of `f` over repetitions that last about `budget` seconds (at least `min_reps`, at most
/// 2,000), after one warm-up; exactly `reps` repetitions when given (a fixed amount of work, for CPU-time
/// measurements).
pub fn median_secs(budget: f64, min_reps: usize, reps: Option<usize>, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    let more = |n: usize| match reps {
        Some(r) => n < r,
        None => n < min_reps || (start.elapsed().as_secs_f64() < budget && n < 2000),
    };
    while more(times.len()) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// A model of `cfg` with seeded weights (seed 1), and its variables.
pub fn model(cfg: &ModelConfig) -> (Net, SeededVarMap) {
    let vars = SeededVarMap::new(1);
    let net = cfg
        .build(vars.var_builder(DType::F32, &Device::Cpu), dropout_rng(1))
        .expect("build");
    (net, vars)
}

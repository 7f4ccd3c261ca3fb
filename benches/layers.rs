//! Layer-op benchmarks: the fast custom ops of `mnist_layers::ops` against their candle reference twins at
//! the model-1 shapes (batch 32), then a whole model-1-like training step (forward + backward + Adam) and
//! batch-1000 inference, fast kernels vs candle's own ops.
//!
//! Run: `cargo bench --bench layers` (`RAYON_NUM_THREADS` applies). Times are medians after a warm-up.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor, Var, D};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder};
use mnist_challenge::layers::{
    self, conv_bn_pool, dropout, init::SeededVarMap, linear, ops, shared_rng, Activation,
    BatchNormConfig, Conv2dConfig, ConvBnPool, ConvBnPoolConfig, Dropout, Kernels, MaxPool2dConfig,
    Padding,
};
use rand::{Rng, SeedableRng};

/// Median wall time in ms of `f` over `iters` runs after `warm` warm-up runs.
fn median_ms(warm: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn rand_tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn report(name: &str, fast: f64, reference: f64) {
    println!(
        "{name:<44} fast {fast:>8.3} ms   reference {reference:>8.3} ms   speed-up x{:>6.1}",
        reference / fast
    );
}

/// Times `op` forward-only and forward+backward (through `(y * r).sum()`), for the fast and reference twin.
fn bench_op(
    name: &str,
    inputs: &[Var],
    fast: &dyn Fn(&[Var]) -> candle_core::Result<Tensor>,
    reference: &dyn Fn(&[Var]) -> candle_core::Result<Tensor>,
) -> Result<()> {
    if let Ok(filter) = std::env::var("LAYERS_BENCH_FILTER") {
        if !name.contains(&filter) {
            return Ok(());
        }
    }
    let y = fast(inputs)?;
    let r = rand_tensor(y.dims(), 99)?;
    let (warm, n) = (5, 31);
    let ff = median_ms(warm, n, || {
        fast(inputs)?;
        Ok(())
    })?;
    let fr = median_ms(warm, n, || {
        reference(inputs)?;
        Ok(())
    })?;
    report(&format!("{name} fwd"), ff, fr);
    let bf = median_ms(warm, n, || {
        (fast(inputs)? * &r)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let br = median_ms(warm, n, || {
        (reference(inputs)? * &r)?.sum_all()?.backward()?;
        Ok(())
    })?;
    report(&format!("{name} fwd+bwd"), bf, br);
    // What the harness itself costs on this output shape ((v * r).sum().backward() for a Var v).
    let v = Var::from_tensor(&y.detach())?;
    let harness = median_ms(warm, n, || {
        (v.as_tensor() * &r)?.sum_all()?.backward()?;
        Ok(())
    })?;
    println!(
        "{:<44} backward alone ~ fast {:>8.3} ms   reference {:>8.3} ms   (harness {harness:.3} ms subtracted)",
        "",
        bf - ff - harness,
        br - fr - harness
    );
    Ok(())
}

fn var(shape: &[usize], seed: u64) -> Result<Var> {
    Ok(Var::from_tensor(&rand_tensor(shape, seed)?)?)
}

fn op_benches() -> Result<()> {
    let b = 32;
    println!("== ops at model-1 shapes, batch {b} ==");
    // conv1: 1 -> 20, 7x7 same, ReLU. The input needs no gradient (as in the model).
    let x1 = Var::from_tensor(&rand_tensor(&[b, 1, 28, 28], 1)?.detach())?;
    let inputs = [x1, var(&[20, 1, 7, 7], 2)?, var(&[20], 3)?];
    let x_plain = inputs[0].as_tensor().detach();
    bench_op(
        "conv 1->20 7x7 same relu (x no grad)",
        &inputs,
        &|v| ops::conv2d_fused(&x_plain, &v[1], Some(&v[2]), 1, (3, 3, 3, 3), true),
        &|v| ops::conv2d_fused_reference(&x_plain, &v[1], Some(&v[2]), 1, (3, 3, 3, 3), true),
    )?;
    let inputs = [
        var(&[b, 20, 14, 14], 4)?,
        var(&[10, 20, 5, 5], 5)?,
        var(&[10], 6)?,
    ];
    bench_op(
        "conv 20->10 5x5 valid relu",
        &inputs,
        &|v| ops::conv2d_fused(&v[0], &v[1], Some(&v[2]), 1, (0, 0, 0, 0), true),
        &|v| ops::conv2d_fused_reference(&v[0], &v[1], Some(&v[2]), 1, (0, 0, 0, 0), true),
    )?;
    for (c, h) in [(20, 28), (10, 10)] {
        let inputs = [var(&[b, c, h, h], 7)?, var(&[c], 8)?, var(&[c], 9)?];
        bench_op(
            &format!("batch_norm train [{b},{c},{h},{h}]"),
            &inputs,
            &|v| Ok(ops::batch_norm_train(&v[0], &v[1], &v[2], 1e-3)?.0),
            &|v| Ok(ops::batch_norm_train_reference(&v[0], &v[1], &v[2], 1e-3)?.0),
        )?;
        let inputs = [var(&[b, c, h, h], 10)?];
        bench_op(
            &format!("max_pool 2/2 [{b},{c},{h},{h}]"),
            &inputs,
            &|v| ops::max_pool2d(&v[0], 2, 2, (0, 0, 0, 0)),
            &|v| ops::max_pool2d_reference(&v[0], 2, 2, (0, 0, 0, 0)),
        )?;
    }
    let inputs = [var(&[b, 20, 28, 28], 11)?];
    bench_op(
        "max_pool 2/2 fast vs candle's (wrong grad)",
        &inputs,
        &|v| ops::max_pool2d(&v[0], 2, 2, (0, 0, 0, 0)),
        &|v| v[0].max_pool2d(2),
    )?;
    println!("== fused conv -> BN(train) -> pool blocks (model-1 shapes) ==");
    for (c, o, k, h, pad) in [(1, 20, 7, 28, (3, 3, 3, 3)), (20, 10, 5, 14, (0, 0, 0, 0))] {
        let inputs = [
            var(&[b, c, h, h], 17)?,
            var(&[o, c, k, k], 18)?,
            var(&[o], 19)?,
            var(&[o], 20)?,
            var(&[o], 21)?,
        ];
        let spec = ops::BlockSpec {
            pad,
            ..Default::default()
        };
        bench_op(
            &format!("block {c}->{o} {k}x{k} fused vs separate fast"),
            &inputs,
            &|v| {
                let x = if c == 1 {
                    v[0].detach()
                } else {
                    v[0].as_tensor().clone()
                };
                Ok(ops::conv_bn_pool_train(&x, &v[1], Some(&v[2]), &v[3], &v[4], &spec)?.0)
            },
            &|v| {
                let x = if c == 1 {
                    v[0].detach()
                } else {
                    v[0].as_tensor().clone()
                };
                let y = ops::conv2d_fused(&x, &v[1], Some(&v[2]), 1, spec.pad, true)?;
                let (y, _, _) = ops::batch_norm_train(&y, &v[3], &v[4], spec.eps)?;
                ops::max_pool2d(&y, 2, 2, (0, 0, 0, 0))
            },
        )?;
    }
    println!("== depthwise / separable shapes (model 2/3) ==");
    for (c, h, k, s) in [(1, 28, 3, 1), (28, 13, 3, 1), (7, 28, 3, 2)] {
        let inputs = [var(&[b, c, h, h], 12)?, var(&[c, 1, k, k], 13)?];
        bench_op(
            &format!("depthwise c{c} {h}x{h} k{k} s{s}"),
            &inputs,
            &|v| ops::depthwise_conv2d(&v[0], &v[1], s, (0, 0, 0, 0)),
            &|v| ops::depthwise_conv2d_reference(&v[0], &v[1], s, (0, 0, 0, 0)),
        )?;
    }
    let inputs = [
        var(&[b, 28, 13, 13], 14)?,
        var(&[16, 28, 1, 1], 15)?,
        var(&[16], 16)?,
    ];
    bench_op(
        "pointwise 28->16 1x1 relu",
        &inputs,
        &|v| ops::conv2d_fused(&v[0], &v[1], Some(&v[2]), 1, (0, 0, 0, 0), true),
        &|v| ops::conv2d_fused_reference(&v[0], &v[1], Some(&v[2]), 1, (0, 0, 0, 0), true),
    )?;
    Ok(())
}

/// Model 1 built from this crate's layers: two [`ConvBnPool`] blocks (conv -> BN -> pool, one fused op
/// each in training with `Kernels::Auto`).
struct Model1 {
    b1: ConvBnPool,
    b2: ConvBnPool,
    drop: Dropout,
    fc: candle_nn::Linear,
}

impl Model1 {
    fn new(kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let cfg = ConvBnPoolConfig {
            conv: Conv2dConfig {
                activation: Activation::Relu,
                ..Default::default()
            },
            bn: BatchNormConfig::default(),
            pool: Some(MaxPool2dConfig::default()),
        };
        let same = ConvBnPoolConfig {
            conv: Conv2dConfig {
                padding: Padding::Same,
                ..cfg.conv
            },
            ..cfg
        };
        Ok(Self {
            b1: conv_bn_pool(1, 20, 7, same, vb.pp("c1"), vb.pp("bn1"))?.with_kernels(kernels),
            b2: conv_bn_pool(20, 10, 5, cfg, vb.pp("c2"), vb.pp("bn2"))?.with_kernels(kernels),
            drop: dropout(0.5, shared_rng(1)),
            fc: linear(250, 10, vb.pp("fc"))?,
        })
    }
}

impl ModuleT for Model1 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let xs = xs.apply_t(&self.b1, train)?; // [b, 20, 14, 14]
        let xs = xs.apply_t(&self.b2, train)?; // [b, 10, 5, 5]
        let xs = xs.apply_t(&self.drop, train)?.flatten_from(1)?; // [b, 250]
        xs.apply(&self.fc) // [b, 10]
    }
}

/// Model 1 with stock candle-nn layers (candle's conv, BatchNorm, max_pool2d, dropout).
struct StockModel1 {
    c1: candle_nn::Conv2d,
    bn1: candle_nn::BatchNorm,
    c2: candle_nn::Conv2d,
    bn2: candle_nn::BatchNorm,
    fc: candle_nn::Linear,
}

impl StockModel1 {
    fn new(vb: VarBuilder) -> Result<Self> {
        let bn = candle_nn::BatchNormConfig {
            eps: 1e-3,
            momentum: 0.01,
            ..Default::default()
        };
        Ok(Self {
            c1: candle_nn::conv2d(
                1,
                20,
                7,
                candle_nn::Conv2dConfig {
                    padding: 3,
                    ..Default::default()
                },
                vb.pp("c1"),
            )?,
            bn1: candle_nn::batch_norm(20, bn, vb.pp("bn1"))?,
            c2: candle_nn::conv2d(20, 10, 5, Default::default(), vb.pp("c2"))?,
            bn2: candle_nn::batch_norm(10, bn, vb.pp("bn2"))?,
            fc: candle_nn::linear(250, 10, vb.pp("fc"))?,
        })
    }
}

impl ModuleT for StockModel1 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let xs = xs
            .apply(&self.c1)?
            .relu()?
            .apply_t(&self.bn1, train)?
            .max_pool2d(2)?;
        let xs = xs
            .apply(&self.c2)?
            .relu()?
            .apply_t(&self.bn2, train)?
            .max_pool2d(2)?;
        let xs = if train {
            candle_nn::ops::dropout(&xs, 0.5)?
        } else {
            xs
        };
        xs.flatten_from(1)?.apply(&self.fc)
    }
}

fn trainable(map: &candle_nn::VarMap) -> Vec<Var> {
    let data = map.data().lock().expect("varmap lock");
    let mut names: Vec<_> = data
        .keys()
        .filter(|k| !k.contains("running"))
        .cloned()
        .collect();
    names.sort();
    names.iter().map(|k| data[k].clone()).collect()
}

fn step_bench(
    name: &str,
    model: &dyn ModuleT,
    map: &candle_nn::VarMap,
    batch: usize,
) -> Result<(f64, f64)> {
    let x = rand_tensor(&[batch, 1, 28, 28], 3)?.affine(0.5, 0.5)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let y = Tensor::from_vec(labels, batch, &Device::Cpu)?;
    let mut opt = candle_nn::AdamW::new(
        trainable(map),
        ParamsAdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            weight_decay: 0.0,
        },
    )?;
    let step = median_ms(5, 41, || {
        let logits = model.forward_t(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        opt.backward_step(&loss)?;
        Ok(())
    })?;
    let xe = rand_tensor(&[1000, 1, 28, 28], 4)?.affine(0.5, 0.5)?;
    let infer = median_ms(2, 9, || {
        model.forward_t(&xe, false)?.argmax(D::Minus1)?;
        Ok(())
    })?;
    println!(
        "{name:<34} train step b{batch}: {step:>8.2} ms   eval b1000: {infer:>8.2} ms = {:>8.0} img/s",
        1000.0 / (infer / 1e3)
    );
    Ok((step, infer))
}

fn model_benches() -> Result<()> {
    println!(
        "== model 1, full training step (fwd + bwd + Adam) at batch 32, eval at batch 1000 =="
    );
    let m = SeededVarMap::new(0);
    let fast = Model1::new(Kernels::Auto, m.var_builder(DType::F32, &Device::Cpu))?;
    let (sf, ef) = step_bench("mnist-layers, Kernels::Auto", &fast, m.var_map(), 32)?;
    let m = SeededVarMap::new(0);
    let refr = Model1::new(Kernels::Reference, m.var_builder(DType::F32, &Device::Cpu))?;
    let (sr, er) = step_bench("mnist-layers, Kernels::Reference", &refr, m.var_map(), 32)?;
    let map = candle_nn::VarMap::new();
    let stock = StockModel1::new(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    let (ss, es) = step_bench("stock candle-nn", &stock, &map, 32)?;
    println!(
        "speed-up of Auto: train x{:.1} vs Reference, x{:.1} vs stock; eval x{:.1} vs Reference, x{:.1} vs stock",
        sr / sf,
        ss / sf,
        er / ef,
        es / ef
    );
    Ok(())
}

fn main() -> Result<()> {
    let tuned = std::env::var_os("LAYERS_NO_MALLOC_TUNE").is_none() && layers::tune_allocator();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // As `layers::init_runtime` does (called before any thread exists).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    println!("glibc malloc tuned (mnist_layers::tune_allocator): {tuned}");
    println!(
        "rayon threads: {}  (layers crate: {})",
        rayon::current_num_threads(),
        std::any::type_name::<layers::Kernels>()
    );
    // As the solution binaries run: on a worker thread of the pool the kernels use.
    layers::on_pool(run)
}

fn run() -> Result<()> {
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    if only.as_deref().is_none_or(|a| a == "ops") {
        op_benches()?;
    }
    if only.as_deref().is_none_or(|a| a == "model") {
        model_benches()?;
    }
    if only.as_deref() == Some("fast") {
        // Only the fast model, many steps (for profiling).
        let m = SeededVarMap::new(0);
        let fast = Model1::new(Kernels::Auto, m.var_builder(DType::F32, &Device::Cpu))?;
        let x = rand_tensor(&[32, 1, 28, 28], 3)?.affine(0.5, 0.5)?;
        let y = Tensor::from_vec(
            (0..32u32).map(|i| i % 10).collect::<Vec<_>>(),
            32,
            &Device::Cpu,
        )?;
        let mut opt = candle_nn::AdamW::new(
            trainable(m.var_map()),
            ParamsAdamW {
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let mut phase = [0f64; 3];
        let n = 300;
        for _ in 0..n {
            let t0 = Instant::now();
            let logits = fast.forward_t(&x, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            opt.step(&grads)?;
            let t3 = Instant::now();
            phase[0] += (t1 - t0).as_secs_f64();
            phase[1] += (t2 - t1).as_secs_f64();
            phase[2] += (t3 - t2).as_secs_f64();
        }
        println!(
            "mean over {n} steps: forward+loss {:.3} ms, backward {:.3} ms, adam {:.3} ms",
            phase[0] * 1e3 / n as f64,
            phase[1] * 1e3 / n as f64,
            phase[2] * 1e3 / n as f64
        );
    }
    Ok(())
}

//! The fast kernels of `mnist_layers::ops` against their candle reference twins, finite differences, the
//! candle `max_pool2d` gradient bug, BatchNorm running statistics and thread-count independence.

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use mnist_challenge::layers::{
    batch_norm, conv2d, conv_bn_pool, init::SeededVarMap, max_pool2d, ops, ops::Pad4,
    separable_conv2d, Activation, BatchNormConfig, Conv2dConfig, ConvBnPoolConfig, Kernels,
    MaxPool2d, MaxPool2dConfig, Padding,
};
use rand::{seq::SliceRandom, Rng, SeedableRng};

fn rand_t(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&rand_t(shape, seed)).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts max|a - b| <= tol * max(1, max|b|), printing the difference on failure.
fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (to_vec(a), to_vec(b));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let m = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(
        d <= tol * m.max(1.0),
        "{what}: max|diff| = {d:e} (max|ref| = {m:e}, tol {tol:e})"
    );
}

/// Forward and every input gradient (through `(out * r).sum()`) of two implementations must agree.
fn compare(
    what: &str,
    inputs: &[&Var],
    fast: impl Fn() -> Tensor,
    reference: impl Fn() -> Tensor,
    fwd_tol: f32,
    grad_tol: f32,
) {
    let yf = fast();
    let yr = reference();
    assert_close(&yf, &yr, fwd_tol, &format!("forward {what}"));
    let r = rand_t(yf.dims(), 777);
    let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (a, b) = (gf.get(v), gr.get(v));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("{what}: input {i} has no gradient");
        };
        assert_close(a, b, grad_tol, &format!("grad of input {i}, {what}"));
    }
}

const P0: Pad4 = (0, 0, 0, 0);

/// (b, c, h, w, o, k, stride, pad, relu, bias)
type ConvCase = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    Pad4,
    bool,
    bool,
);

#[test]
fn conv2d_fused_matches_reference() {
    let cases: &[ConvCase] = &[
        (5, 1, 28, 28, 20, 7, 1, (3, 3, 3, 3), true, true), // model 1 conv1 ('same')
        (1, 1, 28, 28, 20, 7, 1, (3, 3, 3, 3), true, true),
        (5, 20, 14, 14, 10, 5, 1, P0, true, true), // model 1 conv2 ('valid')
        (1, 3, 13, 11, 4, 3, 2, P0, false, true),  // odd sizes, stride 2
        (5, 4, 9, 10, 3, 3, 2, (0, 0, 1, 1), true, false), // stride 2 'same' (TF puts the extra pad last)
        (5, 7, 28, 28, 2, 1, 1, P0, true, true),           // 1x1 pointwise (direct path)
        (1, 2, 7, 5, 3, 5, 1, (2, 2, 2, 2), false, true),
    ];
    for &(b, c, h, w, o, k, s, pad, relu, bias) in cases {
        let seed = (b * 1000 + c * 100 + k) as u64;
        let x = var(&[b, c, h, w], seed);
        let wt = var(&[o, c, k, k], seed + 1);
        let bt = var(&[o], seed + 2);
        let bo = bias.then_some(bt.as_tensor());
        let what =
            format!("conv b{b} c{c} {h}x{w} o{o} k{k} s{s} pad{pad:?} relu{relu} bias{bias}");
        let mut inputs = vec![&x, &wt];
        if bias {
            inputs.push(&bt);
        }
        compare(
            &what,
            &inputs,
            || ops::conv2d_fused(&x, &wt, bo, s, pad, relu).unwrap(),
            || ops::conv2d_fused_reference(&x, &wt, bo, s, pad, relu).unwrap(),
            1e-5,
            1e-4,
        );
    }
}

#[test]
fn depthwise_matches_reference() {
    let cases: &[(usize, usize, usize, usize, usize, usize, Pad4)] = &[
        (5, 1, 28, 28, 3, 1, P0),
        (1, 28, 13, 13, 3, 1, P0),
        (5, 2, 28, 28, 5, 1, (2, 2, 2, 2)),
        (5, 7, 28, 28, 3, 2, P0),
        (1, 3, 9, 8, 3, 2, (1, 0, 1, 1)),
        (5, 2, 11, 7, 3, 1, (1, 1, 1, 1)),
    ];
    for &(b, c, h, w, k, s, pad) in cases {
        let seed = (b * 100 + c * 10 + k) as u64;
        let x = var(&[b, c, h, w], seed);
        let f = var(&[c, 1, k, k], seed + 1);
        compare(
            &format!("depthwise b{b} c{c} {h}x{w} k{k} s{s} pad{pad:?}"),
            &[&x, &f],
            || ops::depthwise_conv2d(&x, &f, s, pad).unwrap(),
            || ops::depthwise_conv2d_reference(&x, &f, s, pad).unwrap(),
            1e-5,
            1e-4,
        );
    }
}

#[test]
fn batch_norm_matches_reference() {
    for (i, dims) in [
        [5usize, 20, 28, 28],
        [1, 10, 10, 10],
        [5, 3, 7, 5],
        [1, 2, 1, 1],
    ]
    .iter()
    .enumerate()
    {
        let seed = 300 + 10 * i as u64;
        let x = Var::from_tensor(&rand_t(dims, seed).affine(3.0, 1.5).unwrap()).unwrap();
        let g = var(&[dims[1]], seed + 1);
        let bt = var(&[dims[1]], seed + 2);
        compare(
            &format!("batch_norm_train {dims:?}"),
            &[&x, &g, &bt],
            || ops::batch_norm_train(&x, &g, &bt, 1e-3).unwrap().0,
            || {
                ops::batch_norm_train_reference(&x, &g, &bt, 1e-3)
                    .unwrap()
                    .0
            },
            1e-4,
            1e-4,
        );
        let (_, mf, vf) = ops::batch_norm_train(&x, &g, &bt, 1e-3).unwrap();
        let (_, mr, vr) = ops::batch_norm_train_reference(&x, &g, &bt, 1e-3).unwrap();
        assert_close(&mf, &mr, 1e-5, "batch mean");
        assert_close(&vf, &vr, 1e-5, "batch var");
        compare(
            &format!("batch_norm_eval {dims:?}"),
            &[&x, &g, &bt],
            || ops::batch_norm_eval(&x, &g, &bt).unwrap(),
            || ops::batch_norm_eval_reference(&x, &g, &bt).unwrap(),
            1e-6,
            1e-5,
        );
    }
}

#[test]
fn max_pool_matches_reference() {
    let cases: &[([usize; 4], usize, usize, Pad4)] = &[
        ([5, 20, 28, 28], 2, 2, P0),
        ([1, 10, 10, 10], 2, 2, P0),
        ([5, 3, 11, 9], 2, 2, P0), // odd sizes (last row/col dropped)
        ([5, 2, 28, 28], 2, 1, (0, 0, 1, 1)), // inception 'same' stride 1
        ([1, 2, 13, 13], 2, 1, P0),
        ([5, 4, 10, 7], 3, 2, (1, 1, 1, 1)),
    ];
    for &(dims, k, s, pad) in cases {
        let x = var(&dims, 40 + k as u64);
        compare(
            &format!("max_pool {dims:?} k{k} s{s} pad{pad:?}"),
            &[&x],
            || ops::max_pool2d(&x, k, s, pad).unwrap(),
            || ops::max_pool2d_reference(&x, k, s, pad).unwrap(),
            0.0,
            1e-6,
        );
    }
}

/// A tensor of distinct values spaced 0.01 apart, shuffled: finite differences with eps 1e-3 never flip
/// an argmax, so the max-pool derivative is exact.
fn distinct(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - n as f32 * 0.005).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Central finite differences of `sum(f(x) * r)` with respect to every element of `x`.
fn finite_diff(x: &Tensor, r: &Tensor, eps: f32, f: impl Fn(&Tensor) -> Tensor) -> Vec<f32> {
    let base = to_vec(x);
    let loss = |v: &[f32]| -> f64 {
        let t = Tensor::from_vec(v.to_vec(), x.shape(), &Device::Cpu).unwrap();
        let y = f(&t);
        to_vec(&y)
            .iter()
            .zip(to_vec(r))
            .map(|(a, b)| *a as f64 * b as f64)
            .sum()
    };
    (0..base.len())
        .map(|i| {
            let mut p = base.clone();
            p[i] += eps;
            let mut m = base.clone();
            m[i] -= eps;
            ((loss(&p) - loss(&m)) / (2.0 * eps as f64)) as f32
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn max_pool_gradient_matches_finite_differences_and_candle_does_not() {
    // (shape, kernel, stride, pad)
    let cases: &[([usize; 4], usize, usize, Pad4)] = &[
        ([2, 2, 6, 6], 2, 2, P0),
        ([2, 2, 5, 5], 2, 2, P0), // odd size
        ([1, 2, 5, 6], 2, 1, P0), // stride 1
        ([1, 1, 6, 6], 2, 1, (0, 0, 1, 1)),
        ([1, 2, 7, 7], 3, 2, (1, 1, 1, 1)),
    ];
    for &(dims, k, s, pad) in cases {
        let what = format!("{dims:?} k{k} s{s} pad{pad:?}");
        let x = Var::from_tensor(&distinct(&dims, 5)).unwrap();
        let y = ops::max_pool2d(&x, k, s, pad).unwrap();
        let r = rand_t(y.dims(), 6);
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let ours = to_vec(g.get(&x).unwrap());
        let fd = finite_diff(x.as_tensor(), &r, 1e-3, |t| {
            ops::max_pool2d(t, k, s, pad).unwrap()
        });
        let d = max_abs_diff(&ours, &fd);
        assert!(
            d < 2e-2,
            "fast max_pool vs finite differences {what}: max|diff| = {d:e}"
        );
        let fd_ref = finite_diff(x.as_tensor(), &r, 1e-3, |t| {
            ops::max_pool2d_reference(t, k, s, pad).unwrap()
        });
        assert!(
            max_abs_diff(&fd_ref, &fd) < 2e-2,
            "reference forward {what}"
        );
        // Through the layer API with the Auto and Reference kernels alike.
        let yr = ops::max_pool2d_reference(&x, k, s, pad).unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_abs_diff(&to_vec(gr.get(&x).unwrap()), &fd);
        assert!(
            d < 2e-2,
            "reference max_pool vs finite differences {what}: max|diff| = {d:e}"
        );

        // candle 0.11's own max_pool2d (no padding support, so only the unpadded cases).
        if pad == P0 {
            let yc = x.as_tensor().max_pool2d_with_stride(k, s).unwrap();
            let gc = (yc * &r).unwrap().sum_all().unwrap().backward();
            match gc {
                Err(e) => {
                    // candle refuses kernel != stride in backward.
                    assert_ne!(k, s, "candle backward failed for k == stride: {e}");
                }
                Ok(gc) => {
                    let theirs = to_vec(gc.get(&x).unwrap());
                    let d = max_abs_diff(&theirs, &fd);
                    println!(
                        "candle max_pool2d {what}: max|grad - finite diff| = {d:e} (ours {:e})",
                        max_abs_diff(&ours, &fd)
                    );
                    assert!(
                        d > 0.1,
                        "candle's max_pool2d gradient unexpectedly right for {what}"
                    );
                }
            }
        }
    }
}

#[test]
fn conv_gradient_matches_finite_differences() {
    // f32 central differences with a loose tolerance; no ReLU so the loss is linear in each input.
    let x = rand_t(&[2, 2, 6, 5], 61);
    let w = var(&[3, 2, 3, 3], 62);
    let b = var(&[3], 63);
    let pad = (1, 1, 1, 1);
    let xv = Var::from_tensor(&x).unwrap();
    let y = ops::conv2d_fused(&xv, &w, Some(&b), 2, pad, false).unwrap();
    let r = rand_t(y.dims(), 64);
    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let fd_x = finite_diff(&x, &r, 1e-2, |t| {
        ops::conv2d_fused(t, &w, Some(&b), 2, pad, false).unwrap()
    });
    let d = max_abs_diff(&to_vec(g.get(&xv).unwrap()), &fd_x);
    assert!(d < 1e-2, "conv dx vs finite differences: {d:e}");
    let fd_w = finite_diff(w.as_tensor(), &r, 1e-2, |t| {
        ops::conv2d_fused(&x, t, Some(&b), 2, pad, false).unwrap()
    });
    let d = max_abs_diff(&to_vec(g.get(&w).unwrap()), &fd_w);
    assert!(d < 1e-2, "conv dw vs finite differences: {d:e}");
}

#[test]
fn batch_norm_running_stats_follow_keras_after_two_steps() {
    for kernels in [Kernels::Auto, Kernels::Reference] {
        let m = SeededVarMap::new(1);
        let bn = batch_norm(
            4,
            BatchNormConfig::default(),
            m.var_builder(DType::F32, &Device::Cpu),
        )
        .unwrap()
        .with_kernels(kernels);
        let xs = [
            rand_t(&[3, 4, 6, 6], 70).affine(2.0, 1.0).unwrap(),
            rand_t(&[3, 4, 6, 6], 71).affine(0.5, -1.0).unwrap(),
        ];
        let (mut rm, mut rv) = (vec![0f64; 4], vec![1f64; 4]);
        for x in &xs {
            bn.forward_t(x, true).unwrap();
            let v = to_vec(x);
            for ch in 0..4 {
                let vals: Vec<f64> = (0..3)
                    .flat_map(|i| v[(i * 4 + ch) * 36..(i * 4 + ch + 1) * 36].to_vec())
                    .map(f64::from)
                    .collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                rm[ch] = 0.99 * rm[ch] + 0.01 * mean;
                rv[ch] = 0.99 * rv[ch] + 0.01 * var;
            }
        }
        let got_m = to_vec(bn.running_mean());
        let got_v = to_vec(bn.running_var());
        for ch in 0..4 {
            assert!(
                (got_m[ch] as f64 - rm[ch]).abs() < 1e-6,
                "{kernels:?} running mean {ch}: {} vs {}",
                got_m[ch],
                rm[ch]
            );
            assert!(
                (got_v[ch] as f64 - rv[ch]).abs() < 1e-6,
                "{kernels:?} running var {ch}: {} vs {}",
                got_v[ch],
                rv[ch]
            );
        }
    }
}

/// Model-1-like chain through the layer API: `Kernels::Auto` and `Kernels::Reference` share weights and
/// must agree on the output and on every trainable gradient.
#[test]
fn layer_chain_auto_matches_reference() {
    let m = SeededVarMap::new(9);
    let vb = m.var_builder(DType::F32, &Device::Cpu);
    let build = |kernels: Kernels| {
        let relu = Conv2dConfig {
            activation: Activation::Relu,
            ..Default::default()
        };
        // No ReLU before BN + max-pool here: ReLU zeros become ties in the pool windows, where the fast
        // op sends the gradient to the first maximum and candle's `max` to every tied maximum.
        let c1 = conv2d(
            1,
            20,
            7,
            Conv2dConfig {
                padding: Padding::Same,
                activation: Activation::None,
                ..relu
            },
            vb.pp("c1"),
        )
        .unwrap()
        .with_kernels(kernels);
        let bn1 = batch_norm(20, BatchNormConfig::default(), vb.pp("bn1"))
            .unwrap()
            .with_kernels(kernels);
        let s2 = separable_conv2d(20, 10, 5, relu, vb.pp("s2"))
            .unwrap()
            .with_kernels(kernels);
        let pool = MaxPool2d::new(MaxPool2dConfig::default()).with_kernels(kernels);
        let pool_s1 = MaxPool2d::new(MaxPool2dConfig {
            stride: 1,
            padding: Padding::Same,
            ..Default::default()
        })
        .with_kernels(kernels);
        move |x: &Tensor| -> Tensor {
            let x = x.apply(&c1).unwrap().apply_t(&bn1, true).unwrap(); // [b, 20, 28, 28]
            let x = x.apply(&pool).unwrap(); // [b, 20, 14, 14]
            let x = s2.forward(&x).unwrap(); // [b, 10, 10, 10]
            x.apply(&pool_s1).unwrap() // [b, 10, 10, 10]
        }
    };
    let fast = build(Kernels::Auto);
    let refr = build(Kernels::Reference);
    let x = rand_t(&[5, 1, 28, 28], 90).affine(0.5, 0.5).unwrap();
    let vars: Vec<(String, Var)> = {
        let d = m.var_map().data().lock().unwrap();
        let mut v: Vec<_> = d
            .iter()
            .filter(|(k, _)| !k.contains("running"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let yf = fast(&x);
    let yr = refr(&x);
    assert_close(&yf, &yr, 1e-4, "chain forward");
    let r = rand_t(yf.dims(), 91);
    let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in &vars {
        assert_close(
            gf.get(v).unwrap(),
            gr.get(v).unwrap(),
            1e-3,
            &format!("chain grad {name}"),
        );
    }
}

/// Weight gradients are reduced in fixed-size batch chunks summed in order: bit-identical across calls
/// and across rayon pools of 1 and 2 threads.
#[test]
fn gradients_do_not_depend_on_thread_count() {
    let x = var(&[13, 3, 12, 12], 100);
    let w = var(&[5, 3, 3, 3], 101);
    let b = var(&[5], 102);
    let f = var(&[3, 1, 3, 3], 103);
    let g = var(&[5], 104);
    let be = var(&[5], 105);
    let w2 = var(&[4, 5, 3, 3], 106);
    let b2 = var(&[4], 107);
    let g2 = var(&[4], 108);
    let be2 = var(&[4], 109);
    let run = || -> Vec<Vec<u32>> {
        let y = ops::depthwise_conv2d(&x, &f, 1, (1, 1, 1, 1)).unwrap();
        let y = ops::conv2d_fused(&y, &w, Some(&b), 1, (1, 1, 1, 1), true).unwrap();
        let (y, _, _) = ops::batch_norm_train(&y, &g, &be, 1e-3).unwrap();
        let y = ops::max_pool2d(&y, 2, 2, P0).unwrap();
        // The fused block on top.
        let spec = ops::BlockSpec {
            pad: (1, 1, 1, 1),
            ..Default::default()
        };
        let (y, _, _) = ops::conv_bn_pool_train(&y, &w2, Some(&b2), &g2, &be2, &spec).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        [&x, &w, &b, &f, &g, &be, &w2, &b2, &g2, &be2]
            .iter()
            .map(|v| {
                to_vec(grads.get(v).unwrap())
                    .iter()
                    .map(|a| a.to_bits())
                    .collect()
            })
            .collect()
    };
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let a = one.install(run);
    let b2 = two.install(run);
    let c = two.install(run);
    assert_eq!(a, b2, "1 vs 2 threads");
    assert_eq!(b2, c, "two calls");
}

/// Model 1's two conv -> BN -> pool blocks trained with SGD for a few steps: the fused
/// [`ConvBnPool`](mnist_challenge::layers::ConvBnPool) blocks follow the separate fast layers (same
/// variables, same seeds) step for step, running statistics and inference included.
#[test]
fn fused_blocks_train_like_separate_layers() {
    use candle_nn::Optimizer;
    let relu = Conv2dConfig {
        activation: Activation::Relu,
        ..Default::default()
    };
    let same = Conv2dConfig {
        padding: Padding::Same,
        ..relu
    };
    let bn = BatchNormConfig::default();
    let pool = MaxPool2dConfig::default();
    let x = rand_t(&[8, 1, 28, 28], 300).affine(0.5, 0.5).unwrap();
    let t = rand_t(&[8, 10, 5, 5], 301);
    let loss = |y: &Tensor| (y - &t).unwrap().sqr().unwrap().mean_all().unwrap();
    let trainables = |m: &SeededVarMap| -> Vec<Var> {
        let d = m.var_map().data().lock().unwrap();
        let mut v: Vec<_> = d.iter().filter(|(k, _)| !k.contains("running")).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.into_iter().map(|(_, v)| v.clone()).collect()
    };
    let all = |m: &SeededVarMap| -> Vec<(String, Tensor)> {
        let d = m.var_map().data().lock().unwrap();
        let mut v: Vec<_> = d
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };

    let mf = SeededVarMap::new(31);
    let vb = mf.var_builder(DType::F32, &Device::Cpu);
    let cfg = |conv| ConvBnPoolConfig {
        conv,
        bn,
        pool: Some(pool),
    };
    let f1 = conv_bn_pool(1, 20, 7, cfg(same), vb.pp("conv1"), vb.pp("bn1")).unwrap();
    let f2 = conv_bn_pool(20, 10, 5, cfg(relu), vb.pp("conv2"), vb.pp("bn2")).unwrap();
    let fused =
        |x: &Tensor, train: bool| x.apply_t(&f1, train).unwrap().apply_t(&f2, train).unwrap();

    let ms = SeededVarMap::new(31);
    let vb = ms.var_builder(DType::F32, &Device::Cpu);
    let c1 = conv2d(1, 20, 7, same, vb.pp("conv1")).unwrap();
    let bn1 = batch_norm(20, bn, vb.pp("bn1")).unwrap();
    let c2 = conv2d(20, 10, 5, relu, vb.pp("conv2")).unwrap();
    let bn2 = batch_norm(10, bn, vb.pp("bn2")).unwrap();
    let separate = |x: &Tensor, train: bool| {
        let y = max_pool2d(&x.apply(&c1).unwrap().apply_t(&bn1, train).unwrap(), pool).unwrap();
        max_pool2d(&y.apply(&c2).unwrap().apply_t(&bn2, train).unwrap(), pool).unwrap()
    };

    let mut of = candle_nn::SGD::new(trainables(&mf), 0.05).unwrap();
    let mut os = candle_nn::SGD::new(trainables(&ms), 0.05).unwrap();
    for step in 0..3 {
        let (lf, ls) = (loss(&fused(&x, true)), loss(&separate(&x, true)));
        assert_close(&lf, &ls, 1e-5, &format!("loss at step {step}"));
        of.backward_step(&lf).unwrap();
        os.backward_step(&ls).unwrap();
    }
    for ((name, a), (_, b)) in all(&mf).iter().zip(all(&ms).iter()) {
        assert_close(a, b, 1e-4, &format!("{name} after 3 steps"));
    }
    assert_close(&fused(&x, false), &separate(&x, false), 1e-4, "inference");
}

#[test]
fn fast_ops_reject_wrong_inputs() {
    let x = rand_t(&[2, 3, 8, 8], 1);
    assert!(ops::conv2d_fused(&x, &rand_t(&[4, 2, 3, 3], 2), None, 1, P0, false).is_err());
    assert!(ops::depthwise_conv2d(&x, &rand_t(&[3, 2, 3, 3], 2), 1, P0).is_err());
    assert!(ops::batch_norm_train(&x, &rand_t(&[2], 2), &rand_t(&[3], 3), 1e-3).is_err());
    assert!(ops::max_pool2d(&x, 2, 0, P0).is_err());
    assert!(ops::max_pool2d(&x.flatten_all().unwrap(), 2, 2, P0).is_err());
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(
        ops::max_pool2d(&x64, 2, 2, P0).is_err(),
        "the fast ops are f32-only"
    );
    // The layers fall back to the reference path for f64 instead.
    let y = max_pool2d(&x64, MaxPool2dConfig::default()).unwrap();
    assert_eq!(y.dims(), &[2, 3, 4, 4]);
}

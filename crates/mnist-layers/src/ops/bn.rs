//! BatchNorm over `[b, c, h, w]` (statistics per channel over batch and space).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_data, dims4, fwd_slice, multiversion, sum_f32};
use crate::error::shape_err;

const OP_TRAIN: &str = "batch_norm_train";
const OP_EVAL: &str = "batch_norm_eval";

multiversion! {
    /// `sum((x - m)^2)` with 16 f32 lanes, lanes added in f64.
    fn sum_sq_dev(xs: &[f32], m: f32) -> f64 {
        let mut acc = [0f32; 16];
        let chunks = xs.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..16 {
                let d = c[i] - m;
                acc[i] += d * d;
            }
        }
        let mut s: f64 = acc.iter().map(|&v| v as f64).sum();
        for &v in rest {
            s += ((v - m) * (v - m)) as f64;
        }
        s
    }
}

multiversion! {
    /// `sum(a * (b - m))` with 16 f32 lanes, lanes added in f64.
    pub(crate) fn dot_dev(a: &[f32], b: &[f32], m: f32) -> f64 {
        let mut acc = [0f32; 16];
        let ca = a.chunks_exact(16);
        let cb = b.chunks_exact(16);
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..16 {
                acc[i] += x[i] * (y[i] - m);
            }
        }
        finish_dot_dev(&acc, ra, rb, m)
    }
}

/// The end of [`dot_dev`] (and of the one-pass sums that must give its bits): the values past the last
/// whole vector, `a * (b - m)` one by one in f64, then the 16 lane sums added in f64.
#[inline(always)]
pub(crate) fn finish_dot_dev(lanes: &[f32; 16], ra: &[f32], rb: &[f32], m: f32) -> f64 {
    let mut s = 0f64;
    for (x, y) in ra.iter().zip(rb) {
        s += (x * (y - m)) as f64;
    }
    s + lanes.iter().map(|&v| v as f64).sum::<f64>()
}

/// Per-channel `(mean, biased variance)` of `x [b, c, hw]`, two passes, f64 across planes.
pub(crate) fn channel_stats(x: &[f32], b: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let plane = |i: usize, ch: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
    channel_stats_with(x, b, c, hw, |i, ch| sum_f32(plane(i, ch)))
}

/// [`channel_stats`] with the first pass done: `plane_sum(i, ch)` is `sum_f32` of image `i`'s plane of
/// channel `ch` (taken by the kernel that wrote it, while it was in cache). The same bits. Each channel's
/// mean is its planes' sums added in f64 in image order; then each plane's squared deviations from it
/// (images in parallel, so each thread reads the images it wrote), added in f64 in image order.
pub(crate) fn channel_stats_with(
    x: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    plane_sum: impl Fn(usize, usize) -> f64 + Sync,
) -> (Vec<f32>, Vec<f32>) {
    let n = (b * hw) as f64;
    let plane = |i: usize, ch: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
    let mean: Vec<f32> = (0..c)
        .map(|ch| ((0..b).map(|i| plane_sum(i, ch)).sum::<f64>() / n) as f32)
        .collect();
    let ssd = channel_sums(c, b, |i, ch| (sum_sq_dev(plane(i, ch), mean[ch]), 0.0));
    let var = ssd.iter().map(|&(s, _)| (s / n) as f32).collect();
    (mean, var)
}

/// `1 / sqrt(var + eps)`, taken in f64.
fn inv_std(var: f32, eps: f64) -> f32 {
    (1.0 / (var as f64 + eps).sqrt()) as f32
}

/// The per-channel affine `(scale, shift)` that normalises with the batch statistics and applies
/// BatchNorm's `gamma`, `beta`: `scale = gamma * invstd`, `shift = beta - mean * scale`.
fn norm_affine(gamma: f32, beta: f32, mean: f32, invstd: f32) -> (f32, f32) {
    let scale = gamma * invstd;
    (scale, beta - mean * scale)
}

/// BatchNorm's batch statistics over `y [b, c, hw]`: what a training forward pass keeps for its backward
/// pass ([`stats_then_planes`] computes them).
pub(crate) struct BnBatch {
    pub mean: Vec<f32>,
    /// Biased variance.
    pub var: Vec<f32>,
    /// `1 / sqrt(var + eps)`.
    pub invstd: Vec<f32>,
}

/// BatchNorm's training statistics over `y [b, c, hw]`, then `per_plane(p, plane, scale, shift)` for
/// every plane (`p = i * c + ch`) to normalise (and pool) it. Images run in parallel in both passes (each
/// plane's squared deviations from its channel's mean, then the planes), so each thread reads the
/// images it has just written, from its own cache: about 5% off a 2-thread epoch of the improved conv
/// against channels in parallel, which moved every image between the cores. The same bits as the two
/// passes (`channel_stats_with`, which it calls, then `scale = gamma * invstd`, `shift = beta - mean *
/// scale` and [`affine`]). `per_plane` is called once for every plane.
pub(crate) fn stats_then_planes(
    y: &[f32],
    (b, c, hw): (usize, usize, usize),
    plane_sum: impl Fn(usize, usize) -> f64 + Sync,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    per_plane: impl Fn(usize, &[f32], f32, f32) + Sync,
) -> BnBatch {
    let plane = |i: usize, ch: usize| &y[(i * c + ch) * hw..(i * c + ch + 1) * hw];
    let (mean, var) = channel_stats_with(y, b, c, hw, plane_sum);
    let invstd: Vec<f32> = var.iter().map(|&v| inv_std(v, eps)).collect();
    let affine: Vec<(f32, f32)> = (0..c)
        .map(|ch| norm_affine(gamma[ch], beta[ch], mean[ch], invstd[ch]))
        .collect();
    (0..b).into_par_iter().for_each(|i| {
        for (ch, &(scale, shift)) in affine.iter().enumerate() {
            per_plane(i * c + ch, plane(i, ch), scale, shift);
        }
    });
    BnBatch { mean, var, invstd }
}

/// [`stats_then_planes`] normalising every plane into a new `[b, c, hw]`.
pub(crate) fn normalise_by_channel(
    y: &[f32],
    dims: (usize, usize, usize),
    plane_sum: impl Fn(usize, usize) -> f64 + Sync,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> (BnBatch, Vec<f32>) {
    let mut out = super::Uninit::<f32>::new(y.len());
    let planes = super::DisjointPlanes::new(out.as_mut_slice(), dims.2);
    let bn = stats_then_planes(y, dims, plane_sum, gamma, beta, eps, |p, yp, a, s| {
        // SAFETY: `stats_then_planes` hands out every plane `p` exactly once.
        affine_plane(unsafe { planes.plane(p) }, yp, a, s);
    });
    // SAFETY: every plane of `out` was handed out once and written whole by `affine_plane`.
    (bn, unsafe { out.assume_init() })
}

/// The batch statistics `(mean, var)` as tensors on `dev`, for the caller's running-average update.
pub(crate) fn stats_tensors(
    mean: &[f32],
    var: &[f32],
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::from_vec(mean.to_vec(), mean.len(), dev)?,
        Tensor::from_vec(var.to_vec(), var.len(), dev)?,
    ))
}

multiversion! {
    /// `y = x * a + s` over one plane (every value of `y` up to `x.len()` is written).
    fn affine_plane(y: &mut [std::mem::MaybeUninit<f32>], x: &[f32], a: f32, s: f32) {
        for (yv, &xv) in y.iter_mut().zip(x) {
            yv.write(xv * a + s);
        }
    }
}

/// `y = x * scale[c] + shift[c]` over planes of `x [b, c, hw]`.
pub(crate) fn affine(x: &[f32], scale: &[f32], shift: &[f32], c: usize, hw: usize) -> Vec<f32> {
    if hw == 0 {
        return Vec::new();
    }
    let mut y = super::Uninit::new(x.len());
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .with_min_len(8)
        .for_each(|(p, (yp, xp))| {
            affine_plane(yp, xp, scale[p % c], shift[p % c]);
        });
    // SAFETY: `y`'s chunks and `x`'s have the same lengths (both `x.len()` values in chunks of `hw`),
    // and the zip wrote every value of each.
    unsafe { y.assume_init() }
}

/// Per channel the sums of `plane(i, ch)` over the images, added in image order from +0 (thread-count
/// independent): for BatchNorm's backward pass `(sum(dz), sum(dz * (y - mean)))` of image `i`'s plane
/// of channel `ch`, for its variance the plane's squared deviations (and 0).
pub(crate) fn channel_sums(
    c: usize,
    b: usize,
    plane: impl Fn(usize, usize) -> (f64, f64) + Sync,
) -> Vec<(f64, f64)> {
    // Each image's planes in parallel (each thread on the images it has in cache), then the sums of
    // each channel in image order.
    let mut per = vec![(0f64, 0f64); b * c]; // [b, c]
    per.par_chunks_mut(c.max(1)).enumerate().for_each(|(i, s)| {
        for (ch, v) in s.iter_mut().enumerate() {
            *v = plane(i, ch);
        }
    });
    (0..c)
        .map(|ch| {
            (0..b).fold((0f64, 0f64), |(s0, s1), i| {
                let (a, d) = per[i * c + ch];
                (s0 + a, s1 + d)
            })
        })
        .collect()
}

/// The backward pass of BatchNorm `z = gamma * (y - mean) * invstd + beta` over `n` values per channel,
/// from the [`channel_sums`] of its output gradient `dz`. With batch statistics (training) the mean and
/// variance depend on `y`; without (inference: `mean` 0 and `invstd` 1 make `gamma`/`beta` a plain
/// scale/shift) they are constants.
pub(crate) struct BnBackward {
    /// `d gamma` (or `d scale`).
    pub dgamma: Vec<f32>,
    /// `d beta` (or `d shift`).
    pub dbeta: Vec<f32>,
    /// Per channel `[a, mean(dz), q, mean]` of `dy = a * (dz - mean(dz) - (y - mean) * q)`.
    coef: Vec<[f32; 4]>,
}

impl BnBackward {
    pub(crate) fn new(
        sums: &[(f64, f64)],
        gamma: &[f32],
        mean: &[f32],
        invstd: &[f32],
        n: f64,
        batch_stats: bool,
    ) -> Self {
        let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        let dgamma: Vec<f32> = sums
            .iter()
            .zip(invstd)
            .map(|(s, &is)| (s.1 * is as f64) as f32)
            .collect();
        let coef = (0..sums.len())
            .map(|ch| {
                let a = gamma[ch] * invstd[ch];
                if batch_stats {
                    let mdy = (sums[ch].0 / n) as f32;
                    let q = (invstd[ch] as f64 * dgamma[ch] as f64 / n) as f32;
                    [a, mdy, q, mean[ch]]
                } else {
                    [a, 0.0, 0.0, mean[ch]]
                }
            })
            .collect();
        Self {
            dgamma,
            dbeta,
            coef,
        }
    }

    /// One plane of channel `ch`: `g` holds `dz` on entry and the gradient at BatchNorm's input `y` on
    /// return, zero where `y <= 0` when a ReLU produced `y`.
    #[inline]
    pub(crate) fn input_grad(&self, ch: usize, g: &mut [f32], y: &[f32], relu: bool) {
        bn_relu_grad(g, y, self.coef[ch], relu)
    }

    /// [`Self::input_grad`] from `dz` into `g` (all of `g` written, up to the planes' length).
    #[inline]
    pub(crate) fn input_grad_from(
        &self,
        ch: usize,
        dz: &[f32],
        g: &mut [f32],
        y: &[f32],
        relu: bool,
    ) {
        bn_relu_grad_from(g, dz, y, self.coef[ch], relu)
    }
}

/// The BatchNorm (+ ReLU) backward of one value: `a * (dz - mdy - (y - mean) * q)`, zero unless `y > 0`
/// after a ReLU.
#[inline(always)]
fn bn_grad_value(dz: f32, y: f32, coef: [f32; 4], relu: bool) -> f32 {
    let [a, m, q, mean] = coef;
    let v = a * (dz - m - (y - mean) * q);
    if !relu || y > 0.0 {
        v
    } else {
        0.0
    }
}

multiversion! {
    /// One plane of the BatchNorm (+ ReLU) backward ([`bn_grad_value`]); `g` holds `dz` on entry.
    fn bn_relu_grad(g: &mut [f32], y: &[f32], coef: [f32; 4], relu: bool) {
        if relu {
            for (gv, &yv) in g.iter_mut().zip(y) {
                *gv = bn_grad_value(*gv, yv, coef, true);
            }
        } else {
            for (gv, &yv) in g.iter_mut().zip(y) {
                *gv = bn_grad_value(*gv, yv, coef, false);
            }
        }
    }
}

multiversion! {
    /// [`bn_relu_grad`] from `dz` into `g` (no copy of `dz` first).
    fn bn_relu_grad_from(g: &mut [f32], dz: &[f32], y: &[f32], coef: [f32; 4], relu: bool) {
        if relu {
            for ((gv, &d), &yv) in g.iter_mut().zip(dz).zip(y) {
                *gv = bn_grad_value(d, yv, coef, true);
            }
        } else {
            for ((gv, &d), &yv) in g.iter_mut().zip(dz).zip(y) {
                *gv = bn_grad_value(d, yv, coef, false);
            }
        }
    }
}

/// [`channel_sums`] of `dy` against `x` (both `[b, c, hw]`) around `mean`.
pub(crate) fn plane_sums(
    dys: &[f32],
    xs: &[f32],
    mean: &[f32],
    b: usize,
    c: usize,
    hw: usize,
) -> Vec<(f64, f64)> {
    channel_sums(c, b, |i, ch| {
        let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
        dz_sums(&dys[r.clone()], &xs[r], mean[ch])
    })
}

/// One plane's `(sum(dz), sum(dz * (y - mean)))`: `sum_f32(dz)` and `dot_dev(dz, y, mean)`, in one pass
/// where the CPU has AVX-512 (the same bits).
pub(crate) fn dz_sums(dz: &[f32], y: &[f32], mean: f32) -> (f64, f64) {
    super::stream_k512::sum_and_dot_dev(dz, y, mean)
        .unwrap_or_else(|| (sum_f32(dz), dot_dev(dz, y, mean)))
}

/// `dx` of every plane of `[b, c, hw]` from `dy` (see [`BnBackward::input_grad`]).
fn input_grads(bwd: &BnBackward, dys: &[f32], xs: &[f32], c: usize, hw: usize) -> Vec<f32> {
    let mut dx = dys.to_vec();
    dx.par_chunks_mut(hw.max(1))
        .enumerate()
        .with_min_len(8)
        .for_each(|(p, dxp)| bwd.input_grad(p % c, dxp, &xs[p * hw..(p + 1) * hw], false));
    dx
}

struct BnTrainOp {
    b: usize,
    c: usize,
    hw: usize,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

impl CustomOp3 for BnTrainOp {
    fn name(&self) -> &'static str {
        OP_TRAIN
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = fwd_slice(s1, l1, OP_TRAIN)?;
        let gamma = fwd_slice(s2, l2, OP_TRAIN)?;
        let beta = fwd_slice(s3, l3, OP_TRAIN)?;
        let (scale, shift): (Vec<f32>, Vec<f32>) = (0..self.c)
            .map(|ch| norm_affine(gamma[ch], beta[ch], self.mean[ch], self.invstd[ch]))
            .unzip();
        let y = affine(x, &scale, &shift, self.c, self.hw);
        Ok((CpuStorage::F32(y), Shape::from(l1.dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, hw) = (self.b, self.c, self.hw);
        cpu_data!(x, xg, xs, OP_TRAIN);
        cpu_data!(gamma, gg, gs, OP_TRAIN);
        cpu_data!(grad, dyg, dys, OP_TRAIN);
        let sums = plane_sums(dys, xs, &self.mean, b, c, hw);
        let bwd = BnBackward::new(&sums, gs, &self.mean, &self.invstd, (b * hw) as f64, true);
        let dev = x.device();
        let dx = if x.track_op() {
            Some(Tensor::from_vec(
                input_grads(&bwd, dys, xs, c, hw),
                x.shape(),
                dev,
            )?)
        } else {
            None
        };
        Ok((
            dx,
            Some(Tensor::from_vec(bwd.dgamma, c, dev)?),
            Some(Tensor::from_vec(bwd.dbeta, c, dev)?),
        ))
    }
}

pub(crate) fn check_vec(t: &Tensor, c: usize, op: &'static str, name: &str) -> Result<()> {
    if t.dims() != [c] {
        return Err(shape_err(op, format!("{name} [{c}]"), t.dims()));
    }
    if t.dtype() != candle_core::DType::F32 || !t.device().is_cpu() {
        return Err(candle_core::Error::UnsupportedDTypeForOp(t.dtype(), op).bt());
    }
    Ok(())
}

/// Fast training-mode BatchNorm on `f32` CPU tensors: `x [b, c, h, w]`, `gamma`, `beta` `[c]`.
///
/// Returns `(y, batch_mean [c], batch_var [c])`; the variance is the biased one (as Keras) and the two
/// statistics carry no gradient (they are meant for the running-average update). Statistics are computed
/// in two passes with f64 accumulation across planes.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = dims4(x, OP_TRAIN)?;
    check_vec(gamma, c, OP_TRAIN, "gamma")?;
    check_vec(beta, c, OP_TRAIN, "beta")?;
    let x = x.contiguous()?;
    let (mean, var) = {
        cpu_data!(x, xg, xs, OP_TRAIN);
        channel_stats(xs, b, c, h * w)
    };
    let invstd: Vec<f32> = var.iter().map(|&v| inv_std(v, eps)).collect();
    let dev = x.device().clone();
    let mean_t = Tensor::from_vec(mean.clone(), c, &dev)?;
    let var_t = Tensor::from_vec(var, c, &dev)?;
    let op = BnTrainOp {
        b,
        c,
        hw: h * w,
        mean,
        invstd,
    };
    let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    Ok((y, mean_t, var_t))
}

/// The reference twin of [`batch_norm_train`], from candle ops (gradient by autograd).
pub fn batch_norm_train_reference(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim((0, 2, 3))?; // [1, c, 1, 1]
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim((0, 2, 3))?; // [1, c, 1, 1]
    let y = xc
        .broadcast_div(&(var.clone() + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)?;
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}

struct BnEvalOp {
    c: usize,
    hw: usize,
}

impl CustomOp3 for BnEvalOp {
    fn name(&self) -> &'static str {
        OP_EVAL
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = fwd_slice(s1, l1, OP_EVAL)?;
        let scale = fwd_slice(s2, l2, OP_EVAL)?;
        let shift = fwd_slice(s3, l3, OP_EVAL)?;
        Ok((
            CpuStorage::F32(affine(x, scale, shift, self.c, self.hw)),
            Shape::from(l1.dims()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (c, hw) = (self.c, self.hw);
        cpu_data!(x, xg, xs, OP_EVAL);
        cpu_data!(scale, sg, ss, OP_EVAL);
        cpu_data!(grad, dyg, dys, OP_EVAL);
        let b = xs.len() / (c * hw).max(1);
        let zeros = vec![0f32; c];
        let sums = plane_sums(dys, xs, &zeros, b, c, hw);
        let bwd = BnBackward::new(&sums, ss, &zeros, &vec![1.0; c], (b * hw) as f64, false);
        let dx = input_grads(&bwd, dys, xs, c, hw);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(bwd.dgamma, c, dev)?),
            Some(Tensor::from_vec(bwd.dbeta, c, dev)?),
        ))
    }
}

/// Fast inference-mode BatchNorm, a fused per-channel affine `y = x * scale[c] + shift[c]` on `f32` CPU
/// tensors (`scale = gamma / sqrt(running_var + eps)`, `shift = beta - running_mean * scale`).
pub fn batch_norm_eval(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let (_b, c, h, w) = dims4(x, OP_EVAL)?;
    check_vec(scale, c, OP_EVAL, "scale")?;
    check_vec(shift, c, OP_EVAL, "shift")?;
    x.contiguous()?.apply_op3(
        &scale.contiguous()?,
        &shift.contiguous()?,
        BnEvalOp { c, hw: h * w },
    )
}

/// The reference twin of [`batch_norm_eval`].
pub fn batch_norm_eval_reference(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
        .broadcast_add(&shift.reshape((1, c, 1, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};
    use candle_core::Var;

    /// Channel by channel gives the very bits of all statistics first and every plane after, at
    /// sizes that are not multiples of the vector width, with one image and with one channel.
    #[test]
    fn normalise_by_channel_is_stats_then_affine_bit_for_bit() {
        for (seed, (b, c, hw)) in [
            (3usize, 5usize, 7usize),
            (1, 4, 33),
            (6, 1, 16),
            (4, 9, 676),
        ]
        .into_iter()
        .enumerate()
        {
            let t = |len: usize, s: u64| {
                let v = rand_t(&[len], s).to_vec1::<f32>().unwrap();
                v.into_iter().map(|x| x * 3.0 + 0.5).collect::<Vec<f32>>()
            };
            let y = t(b * c * hw, seed as u64);
            let (gamma, beta) = (t(c, 100 + seed as u64), t(c, 200 + seed as u64));
            let plane = |i: usize, ch: usize| &y[(i * c + ch) * hw..(i * c + ch + 1) * hw];
            let sum = |i: usize, ch: usize| sum_f32(plane(i, ch));
            // The two passes: all statistics first, then every plane.
            let (mean, var) = channel_stats_with(&y, b, c, hw, sum);
            let invstd: Vec<f32> = var
                .iter()
                .map(|&v| (1.0 / (v as f64 + 1e-3).sqrt()) as f32)
                .collect();
            let scale: Vec<f32> = (0..c).map(|ch| gamma[ch] * invstd[ch]).collect();
            let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] * scale[ch]).collect();
            let want_out = affine(&y, &scale, &shift, c, hw);
            let (got, got_out) = normalise_by_channel(&y, (b, c, hw), sum, &gamma, &beta, 1e-3);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            let what = format!("b {b}, c {c}, hw {hw}");
            assert_eq!(bits(&got_out), bits(&want_out), "{what}: output");
            for (g, w) in [(&got.mean, &mean), (&got.var, &var), (&got.invstd, &invstd)] {
                assert_eq!(bits(g), bits(w), "{what}: statistics");
            }
        }
    }

    #[test]
    fn bn_train_matches_reference() {
        for (i, dims) in [
            [5usize, 20, 28, 28],
            [1, 3, 5, 7],
            [5, 10, 10, 10],
            [2, 4, 1, 1],
        ]
        .iter()
        .enumerate()
        {
            let seed = 20 + 4 * i as u64;
            // Offset so the mean is not ~0.
            let x = Var::from_tensor(&rand_t(dims, seed).affine(2.0, 0.7).unwrap()).unwrap();
            let gamma = Var::from_tensor(&rand_t(&[dims[1]], seed + 1)).unwrap();
            let beta = Var::from_tensor(&rand_t(&[dims[1]], seed + 2)).unwrap();
            let (yf, mf, vf) = batch_norm_train(&x, &gamma, &beta, 1e-3).unwrap();
            let (yr, mr, vr) = batch_norm_train_reference(&x, &gamma, &beta, 1e-3).unwrap();
            let what = format!("{dims:?}");
            assert_close(&yf, &yr, 1e-4, &format!("y {what}"));
            assert_close(&mf, &mr, 1e-5, &format!("mean {what}"));
            assert_close(&vf, &vr, 1e-5, &format!("var {what}"));
            let r = rand_t(yf.dims(), seed + 3);
            let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("dx", &x), ("dgamma", &gamma), ("dbeta", &beta)] {
                assert_close(
                    gf.get(v).unwrap(),
                    gr.get(v).unwrap(),
                    1e-4,
                    &format!("{name} {what}"),
                );
            }
        }
    }

    #[test]
    fn bn_eval_matches_reference() {
        let x = Var::from_tensor(&rand_t(&[3, 4, 5, 6], 40)).unwrap();
        let s = Var::from_tensor(&rand_t(&[4], 41)).unwrap();
        let t = Var::from_tensor(&rand_t(&[4], 42)).unwrap();
        let yf = batch_norm_eval(&x, &s, &t).unwrap();
        let yr = batch_norm_eval_reference(&x, &s, &t).unwrap();
        assert_close(&yf, &yr, 1e-6, "eval y");
        let r = rand_t(yf.dims(), 43);
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("dx", &x), ("dscale", &s), ("dshift", &t)] {
            assert_close(gf.get(v).unwrap(), gr.get(v).unwrap(), 1e-5, name);
        }
    }
}

//! A fused `conv (+bias, ReLU) -> BatchNorm -> [max-pool]` block as ONE custom op, the convolution dense
//! or separable (depthwise then pointwise, see `separable.rs`).
//!
//! Training mode normalises with the batch statistics; the convolution output and the pool argmax stay
//! inside the op (saved for the backward pass), so candle never allocates, zero-fills and sums the large
//! intermediate gradients, and the backward pass builds each image's convolution gradient in a small
//! per-thread buffer straight from the pooled gradient. Inference mode applies `scale`/`shift`
//! (the running statistics folded in) image by image while the convolution output is still in cache.
//!
//! The weights travel as one flattened parameter vector `[w, bias?, gamma|scale, beta|shift]` (`w` is
//! the depthwise then the pointwise weights for a separable block) built with `Tensor::cat`, whose
//! backward splits the op's parameter gradient again.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bn::{
    channel_sums, check_vec, dz_sums, normalise_by_channel, stats_tensors, stats_then_planes,
    BnBackward, BnBatch,
};
use super::conv::{geometry_of, ConvGeom, ConvGrads};
use super::direct::{DirectConv, Epilogue};
use super::pool::PoolGeom;
use super::separable::{SepGeom, SepKernels};
use super::winograd::Winograd;
use super::AfterDx;
use super::{
    cpu_data, fwd_slice, give_buf, par_zeros, sum_f32, take_buf, with_scratch, with_thread_buf,
    write_row, DisjointPlanes, OpState, Pad4,
};
use crate::error::shape_err;

mod infer;
mod lanes;
mod stack;

use infer::infer_with;
pub use infer::{block_stack_infer, InferStackBlock};

pub use stack::{
    block_stack_train, block_stack_train_reference, inception_stack_train, StackBlock, StackTrained,
};

const OP_TRAIN: &str = "conv_bn_pool_train";
const OP_EVAL: &str = "conv_bn_pool_eval";
const OP_INFER: &str = "conv_bn_pool_infer";

/// The max-pool stage of a fused block: square `kernel`, `stride`, `-inf` padding `(top, left, bottom,
/// right)` (each side smaller than the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    /// Window size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding `(top, left, bottom, right)`.
    pub pad: Pad4,
}

impl Default for PoolSpec {
    /// The 2x2 / stride 2 valid pool.
    fn default() -> Self {
        Self {
            kernel: 2,
            stride: 2,
            pad: (0, 0, 0, 0),
        }
    }
}

/// Hyper-parameters of a fused `conv -> BatchNorm -> [max-pool]` block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSpec {
    /// Convolution stride (default 1).
    pub stride: usize,
    /// Convolution zero padding `(top, left, bottom, right)` (default none).
    pub pad: Pad4,
    /// ReLU after the convolution's bias, before the BatchNorm (default true).
    pub relu: bool,
    /// BatchNorm epsilon (default 1e-3, as Keras).
    pub eps: f64,
    /// Optional max pool after the BatchNorm (default the 2x2 / 2 pool).
    pub pool: Option<PoolSpec>,
}

impl Default for BlockSpec {
    fn default() -> Self {
        Self {
            stride: 1,
            pad: (0, 0, 0, 0),
            relu: true,
            eps: 1e-3,
            pool: Some(PoolSpec::default()),
        }
    }
}

/// What the forward pass leaves for the backward pass.
#[derive(Default)]
struct Saved {
    /// Convolution output after bias / ReLU `[b, o, oh*ow]` (train mode only; eval recomputes it).
    y: Vec<f32>,
    /// Batch mean (train) or 0 (eval), per channel.
    mean: Vec<f32>,
    /// Batch biased variance (train), per channel.
    var: Vec<f32>,
    /// `1/sqrt(var + eps)` (train) or 1 (eval), per channel.
    invstd: Vec<f32>,
    /// Argmax (index within its plane) of every pooled output.
    argmax: Vec<u32>,
}

impl Drop for Saved {
    fn drop(&mut self) {
        give_buf(std::mem::take(&mut self.y));
    }
}

/// The convolution of a fused block.
#[derive(Debug, Clone, Copy)]
enum BlockConv {
    /// A dense convolution.
    Dense(ConvGeom),
    /// A separable convolution: depthwise (no bias), then pointwise.
    Separable(SepGeom),
}

/// What a call prepares once from the weights, for every image.
enum Prepared {
    Dense(Option<DirectConv>),
    Separable(SepKernels),
}

impl BlockConv {
    /// `(b, c, h, w)` of the input.
    fn input(&self) -> (usize, usize, usize, usize) {
        match self {
            BlockConv::Dense(g) => (g.b, g.c, g.h, g.w),
            BlockConv::Separable(s) => (s.dw.b, s.dw.c, s.dw.h, s.dw.w),
        }
    }

    /// `(o, oh, ow)` of the output.
    fn output(&self) -> (usize, usize, usize) {
        match self {
            BlockConv::Dense(g) => (g.o, g.oh, g.ow),
            BlockConv::Separable(s) => (s.o, s.dw.oh, s.dw.ow),
        }
    }

    fn ohw(&self) -> usize {
        let (_, oh, ow) = self.output();
        oh * ow
    }

    fn chw(&self) -> usize {
        let (_, c, h, w) = self.input();
        c * h * w
    }

    /// Number of convolution weights at the start of the parameter vector.
    fn weight_len(&self) -> usize {
        match self {
            BlockConv::Dense(g) => g.o * g.ckk(),
            BlockConv::Separable(s) => s.weight_len(),
        }
    }

    fn prepare(&self, w: &[f32]) -> Result<Prepared> {
        Ok(match self {
            BlockConv::Dense(g) => Prepared::Dense(g.direct_conv(w)?),
            BlockConv::Separable(s) => Prepared::Separable(s.kernels(w)?),
        })
    }

    /// One image: `dst [o, oh*ow] = relu?(conv(xi) + bias)`; `xi` may go on past the image (the
    /// batch's next images, which a direct kernel may read as its padding).
    fn forward_image(
        &self,
        prep: &Prepared,
        xi: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        dst: &mut [f32],
    ) -> Result<()> {
        match (self, prep) {
            (BlockConv::Dense(g), Prepared::Dense(dc)) => {
                g.forward_image(dc.as_ref(), xi, w, bias, relu, dst)
            }
            (BlockConv::Separable(s), Prepared::Separable(k)) => {
                let epi = Epilogue {
                    bias,
                    relu,
                    affine: None,
                };
                s.forward_image(k, &xi[..self.chw()], w, &epi, dst)
            }
            _ => candle_core::bail!("fused block: kernels of another convolution"),
        }
    }

    /// The whole batch into `out [b, o, oh*ow]`.
    fn forward_into(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<()> {
        match self {
            BlockConv::Dense(g) => g.forward_into(x, w, bias, relu, out),
            BlockConv::Separable(s) => s.forward_into(x, w, bias, relu, out),
        }
    }

    fn forward(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>, relu: bool) -> Result<Vec<f32>> {
        let (b, _, _, _) = self.input();
        let (o, _, _) = self.output();
        let mut out = par_zeros(b * o * self.ohw());
        self.forward_into(x, w, bias, relu, &mut out)?;
        Ok(out)
    }

    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        need_dx: bool,
        need_db: bool,
        fill_g: &(dyn Fn(usize, &mut [f32]) + Sync),
        after_dx: Option<&AfterDx<'_>>,
    ) -> Result<ConvGrads> {
        match self {
            BlockConv::Dense(g) => g.backward(x, w, need_dx, need_db, fill_g, after_dx),
            BlockConv::Separable(s) => s.backward(x, w, need_dx, need_db, fill_g, after_dx),
        }
    }
}

struct BlockOp {
    g: BlockConv,
    relu: bool,
    bias: bool,
    /// `Some(eps)`: training mode (batch statistics, params hold gamma/beta); `None`: params hold
    /// scale/shift.
    train_eps: Option<f64>,
    pool: Option<PoolGeom>,
    saved: OpState<Saved>,
}

/// The parameter vector split into `(w, bias, p1, p2)`.
type Params<'a> = (&'a [f32], Option<&'a [f32]>, &'a [f32], &'a [f32]);

impl BlockOp {
    fn op_name(&self) -> &'static str {
        if self.train_eps.is_some() {
            OP_TRAIN
        } else {
            OP_EVAL
        }
    }

    fn split<'a>(&self, p: &'a [f32]) -> Result<Params<'a>> {
        let (o, nw) = (self.g.output().0, self.g.weight_len());
        let need = nw + o * (2 + self.bias as usize);
        if p.len() != need {
            candle_core::bail!(
                "{}: parameter vector has {} values, expected {need}",
                self.op_name(),
                p.len()
            )
        }
        let (w, rest) = p.split_at(nw);
        let (bias, rest) = if self.bias {
            let (b, r) = rest.split_at(o);
            (Some(b), r)
        } else {
            (None, rest)
        };
        let (p1, p2) = rest.split_at(o);
        Ok((w, bias, p1, p2))
    }

    fn pooled_len(&self) -> usize {
        self.pool.map_or(self.g.ohw(), |p| p.oh * p.ow)
    }

    /// `(b, o, oh, ow)` of the output (pooled when the block pools).
    fn out_dims(&self) -> (usize, usize, usize, usize) {
        let (b, _, _, _) = self.g.input();
        let (o, oh, ow) = self.g.output();
        match self.pool {
            Some(p) => (b, o, p.oh, p.ow),
            None => (b, o, oh, ow),
        }
    }

    fn out_shape(&self) -> Shape {
        Shape::from(self.out_dims())
    }

    fn fwd_train(&self, x: &[f32], params: Params, eps: f64) -> Result<Vec<f32>> {
        let g = self.g;
        let (w, bias, gamma, beta) = params;
        let (b, _, _, _) = g.input();
        let (o, ohw, pl) = (g.output().0, g.ohw(), self.pooled_len());
        let chw = g.chw();
        // [b, o, oh*ow], and each image's plane sums (BatchNorm's first pass) while it is in cache.
        let mut y = take_buf(b * o * ohw);
        let mut sums = vec![0f64; b * o]; // [b, o]
        let prep = g.prepare(w)?;
        y.par_chunks_mut(o * ohw)
            .zip(sums.par_chunks_mut(o))
            .enumerate()
            .try_for_each(|(i, (dst, ps))| {
                g.forward_image(&prep, &x[i * chw..], w, bias, self.relu, dst)?;
                for (s, plane) in ps.iter_mut().zip(dst.chunks_exact(ohw)) {
                    *s = sum_f32(plane);
                }
                Ok::<(), candle_core::Error>(())
            })?;
        let plane_sum = |i: usize, ch: usize| sums[i * o + ch];
        let (bn, out, argmax) = match self.pool {
            Some(pg) => {
                let mut out = par_zeros(b * o * pl);
                let mut arg = par_zeros(b * o * pl);
                let (outs, args) = (
                    DisjointPlanes::new(&mut out, pl),
                    DisjointPlanes::new(&mut arg, pl),
                );
                let bn = stats_then_planes(
                    &y,
                    (b, o, ohw),
                    plane_sum,
                    gamma,
                    beta,
                    eps,
                    |p, yp, a, s| {
                        with_scratch([ohw], |[z]| {
                            for (zv, &yv) in z.iter_mut().zip(yp) {
                                *zv = yv * a + s;
                            }
                            // SAFETY: `stats_then_planes` hands out every plane `p` exactly once.
                            pg.plane_fwd(z, unsafe { outs.plane(p) }, unsafe { args.plane(p) });
                        });
                    },
                );
                (bn, out, arg)
            }
            None => {
                let (bn, out) = normalise_by_channel(&y, (b, o, ohw), plane_sum, gamma, beta, eps);
                (bn, out, Vec::new())
            }
        };
        let BnBatch {
            mean, var, invstd, ..
        } = bn;
        self.saved.set(Saved {
            y,
            mean,
            var,
            invstd,
            argmax,
        })?;
        Ok(out)
    }

    fn fwd_eval(&self, x: &[f32], params: Params) -> Result<Vec<f32>> {
        let g = self.g;
        let (w, bias, scale, shift) = params;
        let (b, _, _, _) = g.input();
        let (o, ohw, chw, pl) = (g.output().0, g.ohw(), g.chw(), self.pooled_len());
        let mut out = par_zeros(b * o * pl);
        let mut argmax = par_zeros(if self.pool.is_some() { b * o * pl } else { 0 });
        let alen = if self.pool.is_some() { o * pl } else { 0 };
        let pool = self.pool;
        let prep = g.prepare(w)?;
        let dc = &prep;
        let work = |(i, (op, ap)): (usize, (&mut [f32], &mut [u32]))| -> Result<()> {
            let xi = &x[i * chw..(i + 1) * chw];
            let Some(pg) = pool else {
                g.forward_image(dc, xi, w, bias, self.relu, op)?;
                for (p, zp) in op.chunks_exact_mut(ohw).enumerate() {
                    zp.iter_mut().for_each(|v| *v = *v * scale[p] + shift[p]);
                }
                return Ok(());
            };
            // The image's convolution output lives in a per-thread buffer (cache-resident).
            with_thread_buf(&EVAL_BUF, o * ohw, |y| {
                g.forward_image(dc, xi, w, bias, self.relu, y)?;
                for (p, ((zp, opl), apl)) in y
                    .chunks_exact_mut(ohw)
                    .zip(op.chunks_exact_mut(pl))
                    .zip(ap.chunks_exact_mut(pl))
                    .enumerate()
                {
                    zp.iter_mut().for_each(|v| *v = *v * scale[p] + shift[p]);
                    pg.plane_fwd(zp, opl, apl);
                }
                Ok(())
            })
        };
        if b == 1 {
            work((0, (&mut out, &mut argmax)))?;
        } else if alen == 0 {
            out.par_chunks_mut(o * pl)
                .enumerate()
                .try_for_each(|(i, op)| work((i, (op, &mut []))))?;
        } else {
            out.par_chunks_mut(o * pl)
                .zip(argmax.par_chunks_mut(alen))
                .enumerate()
                .try_for_each(work)?;
        }
        self.saved.set(Saved {
            y: Vec::new(),
            mean: vec![0.0; o],
            var: Vec::new(),
            invstd: vec![1.0; o],
            argmax,
        })?;
        Ok(out)
    }

    fn grads(
        &self,
        x: &Tensor,
        params: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let name = self.op_name();
        let (b, c, h, wd) = self.g.input();
        cpu_data!(x, xg, xs, name);
        cpu_data!(params, pg, ps, name);
        cpu_data!(grad, dyg, dys, name);
        let (dx, dparams) = self.grads_of(xs, ps, dys, x.track_op())?;
        let dev = x.device();
        let dx = match dx {
            Some(v) => Some(Tensor::from_vec(v, (b, c, h, wd), dev)?),
            None => None,
        };
        Ok((dx, Tensor::from_vec(dparams, params.shape(), dev)?))
    }

    /// The backward pass on raw slices: the input `xs`, the parameter vector `ps` and the gradient `dys`
    /// at the output give `(dx if need_dx, d params)`.
    fn grads_of(
        &self,
        xs: &[f32],
        ps: &[f32],
        dys: &[f32],
        need_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        self.grads_with(xs, ps, dys, need_dx, None, None)
    }

    /// Image `i`'s `(sum(dz), sum(dz * (y - mean)))` of channel `ch` for BatchNorm's backward pass, from
    /// its output-gradient plane `dp` (pooled when the block pools) and the saved forward state (`y` the
    /// convolution output).
    fn plane_sums(&self, saved: &Saved, y: &[f32], i: usize, ch: usize, dp: &[f32]) -> (f64, f64) {
        let (o, ohw, pl) = (self.g.output().0, self.g.ohw(), self.pooled_len());
        let p = i * o + ch;
        let yp = &y[p * ohw..(p + 1) * ohw];
        let mean = saved.mean[ch];
        if self.pool.is_none() {
            return dz_sums(dp, yp, mean);
        }
        let mut acc = 0f32;
        for (&d, &a) in dp.iter().zip(&saved.argmax[p * pl..(p + 1) * pl]) {
            if let Some(&yv) = yp.get(a as usize) {
                acc += d * (yv - mean);
            }
        }
        (sum_f32(dp), acc as f64)
    }

    /// [`Self::plane_sums`] of every channel of image `i` from its output gradient `dy [o, pl]`, into
    /// `out [o]` (for the block after this one to take while `dy`, its input gradient, is in cache).
    fn image_sums(&self, saved: &Saved, i: usize, dy: &[f32], out: &mut [(f64, f64)]) {
        let pl = self.pooled_len();
        for (ch, (dp, s)) in dy.chunks_exact(pl).zip(out.iter_mut()).enumerate() {
            *s = self.plane_sums(saved, &saved.y, i, ch, dp);
        }
    }

    /// [`Self::grads_of`] with BatchNorm's per-image sums taken already (`sums [b, o]`, image-major, from
    /// [`Self::image_sums`]; the same bits as taking them here) and `after_dx(i, dx_i)` called with each
    /// image's input gradient once it is written.
    fn grads_with(
        &self,
        xs: &[f32],
        ps: &[f32],
        dys: &[f32],
        need_dx: bool,
        sums: Option<&[(f64, f64)]>,
        after_dx: Option<&AfterDx<'_>>,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let g = self.g;
        let name = self.op_name();
        let (b, _, _, _) = g.input();
        let (o, ohw, pl) = (g.output().0, g.ohw(), self.pooled_len());
        let (w, bias, p1, _) = self.split(ps)?;
        let saved = self.saved.lock()?;
        let recomputed;
        let y: &[f32] = if self.train_eps.is_some() {
            &saved.y
        } else {
            recomputed = g.forward(xs, w, bias, self.relu)?;
            &recomputed
        };
        let (mean, invstd, argmax) = (&saved.mean, &saved.invstd, &saved.argmax);
        if y.len() != b * o * ohw
            || dys.len() != b * o * pl
            || mean.len() != o
            || invstd.len() != o
            || (self.pool.is_some() && argmax.len() != dys.len())
        {
            candle_core::bail!(
                "{name} backward: saved state does not match the gradient of {} values",
                dys.len()
            )
        }
        // Per channel: sum(dz) and sum(dz * (y - mean)), images in order (thread-count independent).
        let pooled = self.pool.is_some();
        let sums = match sums {
            Some(pre) if pre.len() == b * o => channel_sums(o, b, |i, ch| pre[i * o + ch]),
            _ => channel_sums(o, b, |i, ch| {
                let p = i * o + ch;
                self.plane_sums(&saved, y, i, ch, &dys[p * pl..(p + 1) * pl])
            }),
        };
        let n = (b * ohw) as f64;
        let bn = BnBackward::new(&sums, p1, mean, invstd, n, self.train_eps.is_some());
        let relu = self.relu;
        let fill_g = |i: usize, gb: &mut [f32]| {
            for (ch, gp) in gb.chunks_exact_mut(ohw).enumerate() {
                let p = i * o + ch;
                let dp = &dys[p * pl..(p + 1) * pl];
                let yp = &y[p * ohw..(p + 1) * ohw];
                if pooled {
                    gp.fill(0.0);
                    for (&d, &ai) in dp.iter().zip(&argmax[p * pl..(p + 1) * pl]) {
                        if let Some(slot) = gp.get_mut(ai as usize) {
                            *slot += d;
                        }
                    }
                    bn.input_grad(ch, gp, yp, relu);
                } else {
                    bn.input_grad_from(ch, dp, gp, yp, relu);
                }
            }
        };
        let (dx, dw, db) = g.backward(xs, w, need_dx, self.bias, &fill_g, after_dx)?;
        let mut dparams = dw;
        if self.bias {
            dparams.extend_from_slice(&db);
        }
        dparams.extend_from_slice(&bn.dgamma);
        dparams.extend_from_slice(&bn.dbeta);
        Ok((dx, dparams))
    }
}

thread_local! {
    /// One pooled plane of an inference-mode block (`infer::InferBlock`), before it is written out.
    static POOL_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The per-image convolution output of [`BlockOp::fwd_eval`] (separate from [`with_scratch`], which
    /// the convolution uses while this is borrowed).
    static EVAL_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        self.op_name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.op_name();
        let x = fwd_slice(s1, l1, name)?;
        let params = self.split(fwd_slice(s2, l2, name)?)?;
        let out = match self.train_eps {
            Some(eps) => self.fwd_train(x, params, eps)?,
            None => self.fwd_eval(x, params)?,
        };
        Ok((CpuStorage::F32(out), self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = self.grads(x, params, grad)?;
        Ok((dx, Some(dp)))
    }
}

/// The convolution of a block: `w [o, c, k, k]` (dense) or `(depthwise [c, 1, k, k], pointwise
/// [o, c, 1, 1])` (separable).
#[derive(Clone, Copy)]
enum Weights<'a> {
    Dense(&'a Tensor),
    Separable(&'a Tensor, &'a Tensor),
}

impl Weights<'_> {
    /// The geometry of inputs of `dims` through these weights, checked.
    fn geometry(
        &self,
        dims: (usize, usize, usize, usize),
        bias: Option<&Tensor>,
        spec: &BlockSpec,
        op: &'static str,
    ) -> Result<BlockConv> {
        Ok(match *self {
            Weights::Dense(w) => {
                BlockConv::Dense(geometry_of(dims, w, bias, spec.stride, spec.pad)?)
            }
            Weights::Separable(dw, pw) => {
                let (c, one, k, k2) = super::dims4(dw, op)?;
                let (o, pc, p1, p2) = super::dims4(pw, op)?;
                if c != dims.1 || one != 1 || k != k2 {
                    return Err(shape_err(
                        op,
                        format!("depthwise [{}, 1, k, k]", dims.1),
                        dw.dims(),
                    ));
                }
                if pc != c || p1 != 1 || p2 != 1 {
                    return Err(shape_err(
                        op,
                        format!("pointwise [o, {c}, 1, 1]"),
                        pw.dims(),
                    ));
                }
                if let Some(b) = bias {
                    check_vec(b, o, op, "bias")?;
                }
                BlockConv::Separable(SepGeom::new(dims, k, o, spec.stride, spec.pad)?)
            }
        })
    }

    fn flat(&self) -> Result<Vec<Tensor>> {
        Ok(match *self {
            Weights::Dense(w) => vec![w.flatten_all()?],
            Weights::Separable(dw, pw) => vec![dw.flatten_all()?, pw.flatten_all()?],
        })
    }
}

/// Validates the inputs, packs the parameters and runs the op; returns the output and the saved state.
#[allow(clippy::too_many_arguments)]
fn run(
    x: &Tensor,
    w: Weights,
    bias: Option<&Tensor>,
    p1: &Tensor,
    p2: &Tensor,
    spec: &BlockSpec,
    train: bool,
) -> Result<(Tensor, OpState<Saved>)> {
    let name = if train { OP_TRAIN } else { OP_EVAL };
    let (op, parts) = build(super::dims4(x, name)?, w, bias, p1, p2, spec, train)?;
    let params = Tensor::cat(&parts, 0)?;
    let saved = op.saved.clone();
    let y = x.contiguous()?.apply_op2(&params, op)?;
    Ok((y, saved))
}

/// The op of one block on `[b, c, h, w]` inputs of `dims`, after validating its weights, bias, `p1`,
/// `p2` and spec, and the parts of its parameter vector (in [`BlockOp::split`]'s order).
#[allow(clippy::too_many_arguments)]
fn build(
    dims: (usize, usize, usize, usize),
    w: Weights,
    bias: Option<&Tensor>,
    p1: &Tensor,
    p2: &Tensor,
    spec: &BlockSpec,
    train: bool,
) -> Result<(BlockOp, Vec<Tensor>)> {
    let name = if train { OP_TRAIN } else { OP_EVAL };
    let g = w.geometry(dims, bias, spec, name)?;
    let (o, oh, ow) = g.output();
    check_vec(p1, o, name, if train { "gamma" } else { "scale" })?;
    check_vec(p2, o, name, if train { "beta" } else { "shift" })?;
    if train && (spec.eps.is_nan() || spec.eps <= 0.0) {
        candle_core::bail!("{name}: eps must be positive, got {}", spec.eps)
    }
    let pool = match spec.pool {
        Some(p) => Some(PoolGeom::new(oh, ow, p.kernel, p.stride, p.pad)?),
        None => None,
    };
    let mut parts = w.flat()?;
    if let Some(b) = bias {
        parts.push(b.clone());
    }
    parts.push(p1.clone());
    parts.push(p2.clone());
    let op = BlockOp {
        g,
        relu: spec.relu,
        bias: bias.is_some(),
        train_eps: train.then_some(spec.eps),
        pool,
        saved: OpState::new(name),
    };
    Ok((op, parts))
}

/// Fast fused training-mode block `pool?(BatchNorm_train(relu?(conv(x, w) + bias)))` on `f32` CPU
/// tensors: `x [b, c, h, w]`, `w [o, c, k, k]`, `bias`, `gamma`, `beta` `[o]`.
///
/// Returns `(y, batch_mean [o], batch_var [o])`: `y` is `[b, o, oh, ow]` (pooled when `spec.pool`), the
/// statistics (biased variance, as Keras) carry no gradient and are meant for the running-average
/// update. The forward values equal [`super::conv2d_fused`] -> [`super::batch_norm_train`] ->
/// [`super::max_pool2d`] bit for bit; the backward gives dx (skipped when `x` needs no gradient), dw, db,
/// dgamma and dbeta without materialising the intermediate gradients.
pub fn conv_bn_pool_train(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    spec: &BlockSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    train_with(x, Weights::Dense(w), bias, gamma, beta, spec)
}

/// The training-mode block of any convolution: the output and the batch statistics.
fn train_with(
    x: &Tensor,
    w: Weights,
    bias: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    spec: &BlockSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (y, saved) = run(x, w, bias, gamma, beta, spec, true)?;
    let s = saved.lock()?;
    let (mean, var) = stats_tensors(&s.mean, &s.var, x.device())?;
    Ok((y, mean, var))
}

/// The reference twin of [`conv_bn_pool_train`]: [`super::conv2d_fused_reference`] ->
/// [`super::batch_norm_train_reference`] -> [`super::max_pool2d_reference`] (any device / dtype).
pub fn conv_bn_pool_train_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    spec: &BlockSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let y = super::conv2d_fused_reference(x, w, bias, spec.stride, spec.pad, spec.relu)?;
    let (y, mean, var) = super::batch_norm_train_reference(&y, gamma, beta, spec.eps)?;
    let y = match spec.pool {
        Some(p) => super::max_pool2d_reference(&y, p.kernel, p.stride, p.pad)?,
        None => y,
    };
    Ok((y, mean, var))
}

/// Fast fused inference-mode block `pool?(relu?(conv(x, w) + bias) * scale + shift)` on `f32` CPU
/// tensors (`scale`, `shift` `[o]`: BatchNorm with its running statistics folded in, as for
/// [`super::batch_norm_eval`]), done image by image while the convolution output is in cache. It has a
/// backward pass (dx, dw, db, dscale, dshift; the convolution is recomputed).
pub fn conv_bn_pool_eval(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    scale: &Tensor,
    shift: &Tensor,
    spec: &BlockSpec,
) -> Result<Tensor> {
    Ok(run(x, Weights::Dense(w), bias, scale, shift, spec, false)?.0)
}

/// Inference-only twin of [`conv_bn_pool_eval`] (same formula, same reference
/// [`conv_bn_pool_eval_reference`]): the output is a new tensor WITHOUT gradient. Stride-1 convolutions
/// run as a direct convolution (no im2col matrix, see `direct.rs`) with the bias, ReLU and BatchNorm
/// affine fused into its store, then the pool (no argmax), image by image in cache; other strides use
/// [`conv_bn_pool_eval`] (detached).
pub fn conv_bn_pool_infer(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    scale: &Tensor,
    shift: &Tensor,
    spec: &BlockSpec,
) -> Result<Tensor> {
    infer_with(x, Weights::Dense(w), bias, scale, shift, spec)
}

/// Fast fused training-mode separable block `pool?(BatchNorm_train(relu?(pointwise(depthwise(x)) +
/// bias)))` on `f32` CPU tensors: `x [b, c, h, w]`, `depthwise [c, 1, k, k]` (stride and padding from
/// `spec`), `pointwise [o, c, 1, 1]`, `bias`, `gamma`, `beta` `[o]`. Returns `(y, batch_mean [o],
/// batch_var [o])` as [`conv_bn_pool_train`]; the backward gives dx (skipped when `x` needs no
/// gradient), d depthwise, d pointwise, dbias, dgamma and dbeta. The depthwise output is never stored
/// for the batch: each image's is made in cache, and again in the backward pass.
pub fn separable_bn_pool_train(
    x: &Tensor,
    depthwise: &Tensor,
    pointwise: &Tensor,
    bias: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    spec: &BlockSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let w = Weights::Separable(depthwise, pointwise);
    train_with(x, w, bias, gamma, beta, spec)
}

/// The reference twin of [`separable_bn_pool_train`]: [`super::depthwise_conv2d_reference`] ->
/// [`conv_bn_pool_train_reference`] of the 1x1 pointwise convolution (any device / dtype).
pub fn separable_bn_pool_train_reference(
    x: &Tensor,
    depthwise: &Tensor,
    pointwise: &Tensor,
    bias: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    spec: &BlockSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = super::depthwise_conv2d_reference(x, depthwise, spec.stride, spec.pad)?;
    conv_bn_pool_train_reference(&d, pointwise, bias, gamma, beta, &pointwise_spec(spec))
}

/// Inference-only fused separable block `pool?(relu?(pointwise(depthwise(x)) + bias) * scale + shift)`,
/// image by image in cache, WITHOUT gradient (reference: [`separable_bn_pool_eval_reference`]).
pub fn separable_bn_pool_infer(
    x: &Tensor,
    depthwise: &Tensor,
    pointwise: &Tensor,
    bias: Option<&Tensor>,
    scale: &Tensor,
    shift: &Tensor,
    spec: &BlockSpec,
) -> Result<Tensor> {
    infer_with(
        x,
        Weights::Separable(depthwise, pointwise),
        bias,
        scale,
        shift,
        spec,
    )
}

/// The reference twin of [`separable_bn_pool_infer`], from candle ops.
pub fn separable_bn_pool_eval_reference(
    x: &Tensor,
    depthwise: &Tensor,
    pointwise: &Tensor,
    bias: Option<&Tensor>,
    scale: &Tensor,
    shift: &Tensor,
    spec: &BlockSpec,
) -> Result<Tensor> {
    let d = super::depthwise_conv2d_reference(x, depthwise, spec.stride, spec.pad)?;
    conv_bn_pool_eval_reference(&d, pointwise, bias, scale, shift, &pointwise_spec(spec))
}

/// The block spec of the pointwise part of a separable block: stride 1, no padding.
fn pointwise_spec(spec: &BlockSpec) -> BlockSpec {
    BlockSpec {
        stride: 1,
        pad: (0, 0, 0, 0),
        ..*spec
    }
}

/// The reference twin of [`conv_bn_pool_eval`], from candle ops.
pub fn conv_bn_pool_eval_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    scale: &Tensor,
    shift: &Tensor,
    spec: &BlockSpec,
) -> Result<Tensor> {
    let y = super::conv2d_fused_reference(x, w, bias, spec.stride, spec.pad, spec.relu)?;
    let y = super::batch_norm_eval_reference(&y, scale, shift)?;
    match spec.pool {
        Some(p) => super::max_pool2d_reference(&y, p.kernel, p.stride, p.pad),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};
    use candle_core::Var;

    /// Compares the fused op with the composition of the separate fast ops (same semantics, also on
    /// pooling ties; forward bit-equal in train mode) and, when `vs_reference`, with the reference twin
    /// (whose max gives the gradient to every tied maximum: only compared where ties cannot occur).
    #[allow(clippy::too_many_arguments)]
    fn check(
        xd: [usize; 4],
        o: usize,
        k: usize,
        spec: BlockSpec,
        bias_shift: f64,
        x_grad: bool,
        train: bool,
        seed: u64,
    ) {
        let c = xd[1];
        let xt = rand_t(&xd, seed);
        let x = Var::from_tensor(&xt).unwrap();
        let w = Var::from_tensor(&rand_t(&[o, c, k, k], seed + 1)).unwrap();
        let bias = bias_shift.is_finite();
        let shift = if bias { bias_shift } else { 0.0 };
        let b = Var::from_tensor(&rand_t(&[o], seed + 2).affine(0.5, shift).unwrap()).unwrap();
        let p1 = Var::from_tensor(&rand_t(&[o], seed + 3).affine(1.0, 0.3).unwrap()).unwrap();
        let p2 = Var::from_tensor(&rand_t(&[o], seed + 4)).unwrap();
        let xin: Tensor = if x_grad {
            x.as_tensor().clone()
        } else {
            xt.clone()
        };
        let bo = bias.then_some(b.as_tensor());
        let what = format!("{xd:?} o{o} k{k} {spec:?} bias{bias_shift} xgrad{x_grad} train{train}");
        let conv = |xin: &Tensor| {
            crate::ops::conv2d_fused(xin, &w, bo, spec.stride, spec.pad, spec.relu).unwrap()
        };
        let pool = |y: Tensor| match spec.pool {
            Some(p) => crate::ops::max_pool2d(&y, p.kernel, p.stride, p.pad).unwrap(),
            None => y,
        };
        let (yf, yc, yr) = if train {
            let (yf, mf, vf) = conv_bn_pool_train(&xin, &w, bo, &p1, &p2, &spec).unwrap();
            let (yr, mr, vr) = conv_bn_pool_train_reference(&xin, &w, bo, &p1, &p2, &spec).unwrap();
            assert_close(&mf, &mr, 1e-5, &format!("mean {what}"));
            assert_close(&vf, &vr, 1e-4, &format!("var {what}"));
            let (yc, _, _) = crate::ops::batch_norm_train(&conv(&xin), &p1, &p2, spec.eps).unwrap();
            let yc = pool(yc);
            assert_close(&yf, &yc, 0.0, &format!("fused vs separate fast ops {what}"));
            (yf, yc, yr)
        } else {
            let yc = pool(crate::ops::batch_norm_eval(&conv(&xin), &p1, &p2).unwrap());
            (
                conv_bn_pool_eval(&xin, &w, bo, &p1, &p2, &spec).unwrap(),
                yc,
                conv_bn_pool_eval_reference(&xin, &w, bo, &p1, &p2, &spec).unwrap(),
            )
        };
        assert_close(&yf, &yr, 1e-4, &format!("fwd {what}"));
        let r = rand_t(yf.dims(), seed + 5);
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let vs_reference = !(spec.relu && spec.pool.is_some()) || bias_shift > 20.0;
        for (name, v) in [
            ("dx", &x),
            ("dw", &w),
            ("db", &b),
            ("dp1", &p1),
            ("dp2", &p2),
        ] {
            if (name == "dx" && !x_grad) || (name == "db" && !bias) {
                assert!(
                    gf.get(v).is_none(),
                    "{name} should have no gradient: {what}"
                );
                continue;
            }
            let got = gf.get(v).unwrap();
            assert_close(
                got,
                gc.get(v).unwrap(),
                1e-4,
                &format!("{name} vs fast ops {what}"),
            );
            if vs_reference {
                assert_close(
                    got,
                    gr.get(v).unwrap(),
                    1e-3,
                    &format!("{name} vs ref {what}"),
                );
            }
        }
    }

    #[test]
    fn block_matches_reference() {
        let model1_conv1 = BlockSpec {
            pad: (3, 3, 3, 3),
            ..Default::default()
        };
        let no_pool = BlockSpec {
            pool: None,
            relu: false,
            ..Default::default()
        };
        let odd = BlockSpec {
            stride: 2,
            pad: (1, 0, 1, 1),
            pool: Some(PoolSpec {
                kernel: 3,
                stride: 2,
                pad: (1, 1, 1, 1),
            }),
            ..Default::default()
        };
        let pointwise = BlockSpec {
            pool: Some(PoolSpec {
                kernel: 2,
                stride: 1,
                pad: (0, 0, 0, 0),
            }),
            ..Default::default()
        };
        let relu_no_pool = BlockSpec {
            pool: None,
            ..model1_conv1
        };
        for train in [true, false] {
            for shift in [0.2, 30.0] {
                check([5, 1, 28, 28], 20, 7, model1_conv1, shift, false, train, 1);
                check(
                    [5, 20, 14, 14],
                    10,
                    5,
                    BlockSpec::default(),
                    shift,
                    true,
                    train,
                    2,
                );
                check([4, 3, 11, 10], 5, 3, odd, shift, true, train, 4);
                check([3, 7, 6, 6], 4, 1, pointwise, shift, true, train, 5);
                check(
                    [1, 2, 6, 6],
                    3,
                    3,
                    BlockSpec::default(),
                    shift,
                    true,
                    train,
                    6,
                );
            }
            check([3, 4, 9, 8], 6, 3, no_pool, f64::NAN, true, train, 3);
            check([3, 4, 9, 8], 6, 3, relu_no_pool, 0.1, true, train, 7);
        }
    }

    /// The inference-only block against its reference twin on random inputs (odd sizes, every pool
    /// kind, the stride-2 fallback), and bit-identical results on 1 and 3 threads.
    #[test]
    fn block_infer_matches_reference() {
        let same7 = BlockSpec {
            pad: (3, 3, 3, 3),
            ..Default::default()
        };
        let odd_pool = BlockSpec {
            pad: (1, 0, 2, 1),
            pool: Some(PoolSpec {
                kernel: 3,
                stride: 2,
                pad: (1, 1, 1, 1),
            }),
            ..Default::default()
        };
        let pool_s1 = BlockSpec {
            relu: false,
            pool: Some(PoolSpec {
                kernel: 2,
                stride: 1,
                pad: (0, 0, 1, 1),
            }),
            ..Default::default()
        };
        let no_pool = BlockSpec {
            pool: None,
            ..Default::default()
        };
        let stride2 = BlockSpec {
            stride: 2,
            pad: (1, 0, 1, 1),
            ..Default::default()
        };
        let cases: [([usize; 4], usize, usize, BlockSpec, bool); 7] = [
            ([5, 1, 28, 28], 20, 7, same7, true),
            ([5, 20, 14, 14], 10, 5, BlockSpec::default(), true),
            ([3, 3, 11, 10], 5, 3, odd_pool, false),
            ([2, 7, 9, 13], 3, 1, pool_s1, true),
            ([3, 4, 9, 8], 6, 3, no_pool, true),
            ([4, 3, 11, 10], 5, 3, stride2, true),
            ([1, 2, 6, 7], 9, 3, BlockSpec::default(), false),
        ];
        for (seed, (xd, o, k, spec, bias)) in cases.into_iter().enumerate() {
            let seed = 10 * seed as u64;
            let x = rand_t(&xd, seed);
            let w = rand_t(&[o, xd[1], k, k], seed + 1);
            let b = rand_t(&[o], seed + 2);
            let sc = rand_t(&[o], seed + 3);
            let sh = rand_t(&[o], seed + 4);
            let bo = bias.then_some(&b);
            let what = format!("{xd:?} o{o} k{k} {spec:?} bias{bias}");
            let yr = conv_bn_pool_eval_reference(&x, &w, bo, &sc, &sh, &spec).unwrap();
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| conv_bn_pool_infer(&x, &w, bo, &sc, &sh, &spec).unwrap())
            };
            let y1 = run(1);
            assert_close(&y1, &yr, 1e-4, &format!("infer {what}"));
            assert_close(&run(3), &y1, 0.0, &format!("1 vs 3 threads {what}"));
        }
        let x = rand_t(&[2, 2, 6, 6], 1);
        let (w, v3) = (rand_t(&[3, 2, 3, 3], 2), rand_t(&[3], 3));
        let bad = conv_bn_pool_infer(&x, &w, None, &rand_t(&[2], 4), &v3, &BlockSpec::default());
        assert!(bad.is_err());
    }

    /// The fused separable block against its reference twin (depthwise, then the pointwise block, from
    /// candle ops): forward, batch statistics and every gradient in training; the inference kernel;
    /// bit-identical results on 1 and 3 threads.
    fn check_separable(xd: [usize; 4], o: usize, k: usize, spec: BlockSpec, bias: bool, seed: u64) {
        let c = xd[1];
        let x = Var::from_tensor(&rand_t(&xd, seed)).unwrap();
        let dw = Var::from_tensor(&rand_t(&[c, 1, k, k], seed + 1)).unwrap();
        let pw = Var::from_tensor(&rand_t(&[o, c, 1, 1], seed + 2)).unwrap();
        // A large bias keeps every pre-ReLU value positive: no pooling ties, where the reference's
        // `max` gradient (split between tied maxima) differs from the fast op's (first maximum).
        let b = Var::from_tensor(&rand_t(&[o], seed + 3).affine(0.5, 30.0).unwrap()).unwrap();
        let gm = Var::from_tensor(&rand_t(&[o], seed + 4).affine(1.0, 0.3).unwrap()).unwrap();
        let bt = Var::from_tensor(&rand_t(&[o], seed + 5)).unwrap();
        let bo = bias.then_some(b.as_tensor());
        let what = format!("{xd:?} o{o} k{k} {spec:?} bias{bias}");
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| separable_bn_pool_train(&x, &dw, &pw, bo, &gm, &bt, &spec).unwrap())
        };
        let (yf, mf, vf) = run(2);
        let (yr, mr, vr) =
            separable_bn_pool_train_reference(&x, &dw, &pw, bo, &gm, &bt, &spec).unwrap();
        assert_close(&yf, &yr, 1e-4, &format!("fwd {what}"));
        assert_close(&mf, &mr, 1e-5, &format!("mean {what}"));
        assert_close(&vf, &vr, 1e-4, &format!("var {what}"));
        // The same block from the separate fast ops: the depthwise op, then the dense fused block.
        let d = crate::ops::depthwise_conv2d(&x, &dw, spec.stride, spec.pad).unwrap();
        let (yc, _, _) = conv_bn_pool_train(&d, &pw, bo, &gm, &bt, &pointwise_spec(&spec)).unwrap();
        assert_close(&yf, &yc, 1e-5, &format!("fwd vs separate fast ops {what}"));
        let r = rand_t(yf.dims(), seed + 6);
        let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [
            ("dx", &x),
            ("ddepthwise", &dw),
            ("dpointwise", &pw),
            ("dbias", &b),
            ("dgamma", &gm),
            ("dbeta", &bt),
        ] {
            if name == "dbias" && !bias {
                assert!(
                    gf.get(v).is_none(),
                    "{name} should have no gradient: {what}"
                );
                continue;
            }
            let got = gf.get(v).unwrap();
            let fast = gc.get(v).unwrap();
            assert_close(
                got,
                fast,
                1e-4,
                &format!("{name} vs separate fast ops {what}"),
            );
            // With one input channel, BatchNorm cancels any scaling of a pointwise weight: the true
            // gradient is 0 and both sides hold rounding noise of large cancelling sums.
            if name == "dpointwise" && c == 1 {
                continue;
            }
            assert_close(
                got,
                gr.get(v).unwrap(),
                1e-3,
                &format!("{name} vs reference {what}"),
            );
        }
        // The same gradients on 1 and 3 threads, bit for bit.
        let bits = |threads: usize| {
            let (y, _, _) = run(threads);
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [&x, &dw, &pw, &gm, &bt]
                .iter()
                .flat_map(|v| {
                    let t = g.get(v).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f32>().unwrap()
                })
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bits(1),
            bits(3),
            "thread count changes the gradients: {what}"
        );
        let (sc, sh) = (rand_t(&[o], seed + 7), rand_t(&[o], seed + 8));
        let yi = separable_bn_pool_infer(&x, &dw, &pw, bo, &sc, &sh, &spec).unwrap();
        let ye = separable_bn_pool_eval_reference(&x, &dw, &pw, bo, &sc, &sh, &spec).unwrap();
        assert_close(&yi, &ye, 1e-4, &format!("infer {what}"));
    }

    #[test]
    fn separable_block_matches_reference() {
        let same = BlockSpec {
            pad: (1, 1, 1, 1),
            ..Default::default()
        };
        let no_pool = BlockSpec { pool: None, ..same };
        let strided = BlockSpec {
            stride: 2,
            pad: (0, 0, 1, 1),
            relu: false,
            ..Default::default()
        };
        let five = BlockSpec {
            pad: (2, 2, 2, 2),
            pool: Some(PoolSpec {
                kernel: 3,
                stride: 2,
                pad: (1, 1, 1, 1),
            }),
            ..Default::default()
        };
        check_separable([5, 1, 28, 28], 16, 3, no_pool, true, 1);
        check_separable([6, 16, 14, 14], 24, 3, same, true, 2);
        check_separable([3, 7, 9, 11], 5, 3, strided, false, 3);
        check_separable([4, 3, 10, 10], 6, 5, five, true, 4);
        check_separable([2, 24, 7, 7], 12, 3, no_pool, false, 5);
        // Malformed weights are refused with an error.
        let x = rand_t(&[2, 3, 6, 6], 1);
        let v3 = rand_t(&[4], 2);
        let bad_dw = separable_bn_pool_train(
            &x,
            &rand_t(&[2, 1, 3, 3], 3),
            &rand_t(&[4, 3, 1, 1], 4),
            None,
            &v3,
            &v3,
            &same,
        );
        assert!(bad_dw.is_err());
        let bad_pw = separable_bn_pool_train(
            &x,
            &rand_t(&[3, 1, 3, 3], 3),
            &rand_t(&[4, 2, 1, 1], 4),
            None,
            &v3,
            &v3,
            &same,
        );
        assert!(bad_pw.is_err());
    }

    #[test]
    fn block_grads_are_deterministic() {
        let x = rand_t(&[13, 3, 10, 10], 5);
        let w = Var::from_tensor(&rand_t(&[4, 3, 3, 3], 6)).unwrap();
        let gm = Var::from_tensor(&rand_t(&[4], 7)).unwrap();
        let bt = Var::from_tensor(&rand_t(&[4], 8)).unwrap();
        let run = || {
            let (y, _, _) =
                conv_bn_pool_train(&x, &w, None, &gm, &bt, &BlockSpec::default()).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            [&w, &gm, &bt]
                .iter()
                .flat_map(|v| {
                    g.get(v)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn block_rejects_bad_inputs() {
        let x = rand_t(&[2, 2, 6, 6], 1);
        let w = rand_t(&[3, 2, 3, 3], 2);
        let v3 = rand_t(&[3], 3);
        let spec = BlockSpec::default();
        assert!(conv_bn_pool_train(&x, &w, None, &rand_t(&[2], 4), &v3, &spec).is_err());
        assert!(conv_bn_pool_train(&x, &rand_t(&[3, 1, 3, 3], 2), None, &v3, &v3, &spec).is_err());
        let bad_pool = BlockSpec {
            pool: Some(PoolSpec {
                kernel: 2,
                stride: 2,
                pad: (2, 0, 0, 0),
            }),
            ..spec
        };
        assert!(conv_bn_pool_train(&x, &w, None, &v3, &v3, &bad_pool).is_err());
        let bad_eps = BlockSpec { eps: 0.0, ..spec };
        assert!(conv_bn_pool_train(&x, &w, None, &v3, &v3, &bad_eps).is_err());
        assert!(conv_bn_pool_eval(&x, &w, Some(&rand_t(&[4], 5)), &v3, &v3, &spec).is_err());
    }
}

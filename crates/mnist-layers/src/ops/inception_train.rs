//! The inception module in training as ONE op ([`inception_train`]), for a module whose branches are
//! each one stride-1 convolution, optionally after a max pool, on an input that needs no gradient (the
//! images: the module comes first). Every image's branches write straight into their channels of the
//! concatenated output (no `cat`, no per-branch outputs), and the backward pass takes each branch's
//! weight gradient from its channels of the output gradient (no `cat` backward, no per-branch gradient
//! tensors through candle's gradient store). With the module's BatchNorm ([`ModuleBn`]) the op also
//! normalises the concatenation (batch statistics, as [`super::batch_norm_train`]), so the gradient at
//! the module's output goes through the BatchNorm backward and each branch's ReLU in one pass. The same
//! kernels in the same order as the layers one by one ([`super::max_pool2d`], [`super::conv2d_fused`],
//! `cat`, [`super::batch_norm_train`]): the same bits.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bn::{check_vec, normalise_by_channel, plane_sums, stats_tensors, BnBackward, BnBatch};
use super::conv::{geometry_of, ConvGeom};
use super::{cpu_data, dims4, fwd_slice, give_buf, sum_f32, take_buf, OpState, Pad4, PoolGeom};

const OP: &str = "inception_train";

/// A max pool before a branch's convolution: window, stride and padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchPool {
    /// Window size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding `(top, left, bottom, right)` (padded cells count as `-inf`).
    pub pad: Pad4,
}

/// One branch of [`inception_train`]: `relu?(conv(pool?(x), w, pad) + bias)` with stride 1.
#[derive(Debug, Clone, Copy)]
pub struct InceptionBranch<'a> {
    /// The max pool before the convolution, if any.
    pub pool: Option<BranchPool>,
    /// The convolution weight `[o, c, k, k]`.
    pub w: &'a Tensor,
    /// The convolution bias `[o]`, if any.
    pub bias: Option<&'a Tensor>,
    /// The convolution's padding.
    pub pad: Pad4,
    /// ReLU after the bias.
    pub relu: bool,
}

/// The module's BatchNorm over the concatenated channels, in training mode.
#[derive(Debug, Clone, Copy)]
pub struct ModuleBn<'a> {
    /// Scale `[channels]`.
    pub gamma: &'a Tensor,
    /// Shift `[channels]`.
    pub beta: &'a Tensor,
    /// Added to the variance.
    pub eps: f64,
}

/// The training forward pass of an inception module of one-convolution branches over `x [b, c, h, w]`
/// (`f32`, CPU, needing no gradient): the branches' outputs concatenated along channels,
/// `[b, sum o_i, oh, ow]` (every branch must give the same `oh x ow`), then `bn` if given. Returns the
/// output and, with `bn`, the batch statistics `(mean, var)` for the running-average update. Its backward
/// pass gives each branch's weight and bias gradients (and gamma's and beta's), bit for bit those of the
/// layers run one by one; an `x` that needs a gradient is refused (run the layers instead).
pub fn inception_train(
    x: &Tensor,
    branches: &[InceptionBranch],
    bn: Option<ModuleBn>,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let (op, parts) = build(x, branches, bn)?;
    let params = Tensor::cat(&parts, 0)?;
    let saved = op.saved.clone();
    let y = x.contiguous()?.apply_op2(&params, op)?;
    let stats = InceptionOp::stats_of(&saved, x.device())?;
    Ok((y, stats))
}

/// The op of [`inception_train`] and its parameters in the order of its parameter vector (each
/// branch's weight, flattened, and bias, then gamma and beta), checked against `x`.
pub(crate) fn build(
    x: &Tensor,
    branches: &[InceptionBranch],
    bn: Option<ModuleBn>,
) -> Result<(InceptionOp, Vec<Tensor>)> {
    if branches.is_empty() {
        candle_core::bail!("{OP}: no branches")
    }
    if x.track_op() {
        candle_core::bail!(
            "{OP}: the input needs a gradient, which this op does not give (use the layers)"
        )
    }
    let (b, c, h, w) = dims4(x, OP)?;
    let mut built = Vec::with_capacity(branches.len());
    let mut parts = Vec::new();
    let (mut end, mut channels, mut out_hw) = (0, 0, None);
    for (i, br) in branches.iter().enumerate() {
        let pool = match br.pool {
            Some(p) => Some(PoolGeom::new(h, w, p.kernel, p.stride, p.pad)?),
            None => None,
        };
        let (ph, pw) = pool.map_or((h, w), |p| (p.oh, p.ow));
        let g = geometry_of((b, c, ph, pw), br.w, br.bias, 1, br.pad)?;
        if *out_hw.get_or_insert((g.oh, g.ow)) != (g.oh, g.ow) {
            candle_core::bail!(
                "{OP}: branch {i} gives {}x{}, the first branch {:?}",
                g.oh,
                g.ow,
                out_hw
            )
        }
        let start = end;
        end += g.o * g.ckk() + br.bias.map_or(0, |_| g.o);
        parts.push(br.w.flatten_all()?);
        if let Some(bias) = br.bias {
            parts.push(bias.clone());
        }
        built.push(Branch {
            g,
            pool,
            relu: br.relu,
            bias: br.bias.is_some(),
            params: start..end,
            channels: channels..channels + g.o,
        });
        channels += g.o;
    }
    let (oh, ow) = out_hw.unwrap_or((0, 0));
    let bn_eps = match bn {
        Some(m) => {
            check_vec(m.gamma, channels, OP, "gamma")?;
            check_vec(m.beta, channels, OP, "beta")?;
            if m.eps.is_nan() || m.eps <= 0.0 {
                candle_core::bail!("{OP}: eps must be positive, got {}", m.eps)
            }
            parts.push(m.gamma.clone());
            parts.push(m.beta.clone());
            Some(m.eps)
        }
        None => None,
    };
    let op = InceptionOp {
        branches: built,
        out: (b, channels, oh, ow),
        bn: bn_eps.map(|eps| (eps, end..end + 2 * channels)),
        saved: OpState::new(OP),
    };
    Ok((op, parts))
}

/// The reference twin of [`inception_train`]: candle's own ops ([`super::max_pool2d_reference`],
/// [`super::conv2d_fused_reference`], `cat`, [`super::batch_norm_train_reference`]), any device or
/// dtype, gradients through candle's autograd.
pub fn inception_train_reference(
    x: &Tensor,
    branches: &[InceptionBranch],
    bn: Option<ModuleBn>,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let outs = branches
        .iter()
        .map(|br| {
            let xin = match br.pool {
                Some(p) => super::max_pool2d_reference(x, p.kernel, p.stride, p.pad)?,
                None => x.clone(),
            };
            super::conv2d_fused_reference(&xin, br.w, br.bias, 1, br.pad, br.relu)
        })
        .collect::<Result<Vec<_>>>()?;
    let y = Tensor::cat(&outs, 1)?;
    match bn {
        Some(m) => {
            let (z, mean, var) = super::batch_norm_train_reference(&y, m.gamma, m.beta, m.eps)?;
            Ok((z, Some((mean, var))))
        }
        None => Ok((y, None)),
    }
}

struct Branch {
    g: ConvGeom,
    pool: Option<PoolGeom>,
    relu: bool,
    bias: bool,
    /// The branch's weights (then bias) in the parameter vector.
    params: std::ops::Range<usize>,
    /// The branch's channels of the output.
    channels: std::ops::Range<usize>,
}

impl Branch {
    /// `(w, bias)` from the parameter vector.
    fn split<'a>(&self, ps: &'a [f32]) -> Result<(&'a [f32], Option<&'a [f32]>)> {
        let p = ps.get(self.params.clone()).ok_or_else(|| {
            candle_core::Error::msg(format!("{OP}: parameter vector of {} values", ps.len()))
        })?;
        let (w, bias) = p.split_at(self.g.o * self.g.ckk());
        Ok((w, self.bias.then_some(bias)))
    }
}

pub(crate) struct InceptionOp {
    branches: Vec<Branch>,
    /// `(b, channels, oh, ow)` of the output.
    out: (usize, usize, usize, usize),
    /// The BatchNorm's eps and its `(gamma, beta)` in the parameter vector, if the op normalises.
    bn: Option<(f64, std::ops::Range<usize>)>,
    saved: OpState<Saved>,
}

/// What the forward pass keeps for the backward pass (and the batch statistics for the caller).
#[derive(Default)]
pub(crate) struct Saved {
    /// The pooled input of each pooling branch (empty for the others).
    pooled: Vec<Vec<f32>>,
    /// With BatchNorm: the concatenation before it, and its batch statistics.
    y: Vec<f32>,
    bn: Option<BnBatch>,
}

impl Drop for Saved {
    fn drop(&mut self) {
        give_buf(std::mem::take(&mut self.y));
    }
}

impl CustomOp2 for InceptionOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = fwd_slice(s1, l1, OP)?;
        let ps = fwd_slice(s2, l2, OP)?;
        Ok((CpuStorage::F32(self.fwd(x, ps)?), Shape::from(self.out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        cpu_data!(x, xg, xs, OP);
        cpu_data!(params, pg, ps, OP);
        cpu_data!(res, yg, ys, OP);
        cpu_data!(grad, gg, dys, OP);
        let dparams = self.grads(xs, ps, ys, dys)?;
        Ok((
            None,
            Some(Tensor::from_vec(dparams, params.shape(), params.device())?),
        ))
    }
}

impl InceptionOp {
    /// `(b, channels, oh, ow)` of the output.
    pub(crate) fn out_dims(&self) -> (usize, usize, usize, usize) {
        self.out
    }

    /// The batch statistics `(mean, var)` that the last forward pass kept (with BatchNorm), as tensors.
    pub(crate) fn stats_of(
        saved: &OpState<Saved>,
        dev: &candle_core::Device,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match &saved.lock()?.bn {
            Some(st) => Some(stats_tensors(&st.mean, &st.var, dev)?),
            None => None,
        })
    }

    /// What the forward pass keeps (for [`Self::stats_of`]).
    pub(crate) fn saved(&self) -> &OpState<Saved> {
        &self.saved
    }

    /// The training forward pass on raw slices: the output `[b, channels, oh, ow]` from the images `x`
    /// and the parameter vector `ps`.
    pub(crate) fn fwd(&self, x: &[f32], ps: &[f32]) -> Result<Vec<f32>> {
        let (b, ch, oh, ow) = self.out;
        let ohw = oh * ow;
        // The pooled inputs, plane by plane (no argmax: there is no input gradient).
        let pooled: Vec<Vec<f32>> = self
            .branches
            .iter()
            .map(|br| match br.pool {
                None => Vec::new(),
                Some(pg) => {
                    let (hw, phw) = (pg.h * pg.w, pg.oh * pg.ow);
                    let mut out = take_buf(b * br.g.c * phw);
                    out.par_chunks_mut(phw)
                        .zip(x.par_chunks(hw))
                        .for_each(|(o, xp)| pg.plane_max(xp, pg.w, o));
                    out
                }
            })
            .collect();
        let convs = self
            .branches
            .iter()
            .map(|br| {
                let (w, bias) = br.split(ps)?;
                Ok(((w, bias), br.g.direct_conv(w)?))
            })
            .collect::<Result<Vec<_>>>()?;
        // Every value is written: the branches' channel ranges cover all `ch` channels of each image.
        let mut y = take_buf(b * ch * ohw);
        // With BatchNorm, each image's plane sums (its first pass) while the image is in cache.
        let per = if self.bn.is_some() { ch } else { 1 };
        let mut sums = vec![0f64; b * per];
        y.par_chunks_mut(ch * ohw)
            .zip(sums.par_chunks_mut(per))
            .enumerate()
            .try_for_each(|(i, (yi, si))| {
                for ((br, ((w, bias), dc)), p) in self.branches.iter().zip(&convs).zip(&pooled) {
                    let chw = br.g.chw();
                    // The direct kernel may read the next images as its padding (`DirectConv::padded`).
                    let src = if br.pool.is_some() {
                        &p[i * chw..]
                    } else {
                        &x[i * chw..]
                    };
                    let dst = &mut yi[br.channels.start * ohw..br.channels.end * ohw];
                    br.g.forward_image(dc.as_ref(), src, w, *bias, br.relu, dst)?;
                }
                if self.bn.is_some() {
                    for (s, plane) in si.iter_mut().zip(yi.chunks_exact(ohw)) {
                        *s = sum_f32(plane);
                    }
                }
                Ok::<(), candle_core::Error>(())
            })?;
        let Some((eps, range)) = &self.bn else {
            self.saved.set(Saved {
                pooled,
                y: Vec::new(),
                bn: None,
            })?;
            return Ok(y);
        };
        let bn_params = ps
            .get(range.clone())
            .ok_or_else(|| candle_core::Error::msg(format!("{OP}: no BatchNorm parameters")))?;
        let (gamma, beta) = bn_params.split_at(ch);
        let sum = |i: usize, c: usize| sums[i * ch + c];
        let (bn, z) = normalise_by_channel(&y, (b, ch, ohw), sum, gamma, beta, *eps);
        self.saved.set(Saved {
            pooled,
            y,
            bn: Some(bn),
        })?;
        Ok(z)
    }

    /// The backward pass on raw slices: the parameter gradients from the images `xs`, the parameter
    /// vector `ps`, the forward pass's output `ys` and the gradient `dys` at it (no input gradient: the
    /// images need none).
    pub(crate) fn grads(
        &self,
        xs: &[f32],
        ps: &[f32],
        ys: &[f32],
        dys: &[f32],
    ) -> Result<Vec<f32>> {
        let (b, ch, oh, ow) = self.out;
        let ohw = oh * ow;
        let n = ch * ohw;
        if dys.len() != b * n || ys.len() != b * n {
            candle_core::bail!(
                "{OP} backward: a gradient of {} values for {:?}",
                dys.len(),
                self.out
            )
        }
        let saved = self.saved.lock()?;
        let mut dparams = vec![0f32; ps.len()];
        // With BatchNorm: its backward, from the output gradient's plane sums (images in order).
        let bnb = match (&self.bn, &saved.bn) {
            (Some((_, range)), Some(st)) => {
                let y = &saved.y;
                if y.len() != b * n || st.mean.len() != ch || st.invstd.len() != ch {
                    candle_core::bail!("{OP} backward: no forward pass to go back through")
                }
                let sums = plane_sums(dys, y, &st.mean, b, ch, ohw);
                let gamma = &ps[range.start..range.start + ch];
                let n_all = (b * ohw) as f64;
                let bnb = BnBackward::new(&sums, gamma, &st.mean, &st.invstd, n_all, true);
                let dst = &mut dparams[range.clone()];
                dst[..ch].copy_from_slice(&bnb.dgamma);
                dst[ch..].copy_from_slice(&bnb.dbeta);
                Some(bnb)
            }
            (None, _) => None,
            (Some(_), None) => {
                candle_core::bail!("{OP} backward: no forward pass to go back through")
            }
        };
        for (br, p) in self.branches.iter().zip(saved.pooled.iter()) {
            let (w, _) = br.split(ps)?;
            let (c0, c1) = (br.channels.start * ohw, br.channels.end * ohw);
            // The branch's channels of the output gradient, through the BatchNorm (if any) and the
            // branch's ReLU (as `batch_norm_train`'s and `conv2d_fused`'s backward passes).
            let fill_g = |i: usize, gb: &mut [f32]| {
                let dyi = &dys[i * n + c0..i * n + c1];
                if let Some(bnb) = &bnb {
                    let yi = &saved.y[i * n + c0..i * n + c1];
                    let planes = gb.chunks_exact_mut(ohw).zip(dyi.chunks_exact(ohw));
                    for (k, ((gp, dz), yp)) in planes.zip(yi.chunks_exact(ohw)).enumerate() {
                        bnb.input_grad_from(br.channels.start + k, dz, gp, yp, br.relu);
                    }
                } else if br.relu {
                    let yi = &ys[i * n + c0..i * n + c1];
                    for ((gv, &d), &yv) in gb.iter_mut().zip(dyi).zip(yi) {
                        *gv = if yv > 0.0 { d } else { 0.0 };
                    }
                } else {
                    gb.copy_from_slice(dyi);
                }
            };
            let input: &[f32] = if br.pool.is_some() { p } else { xs };
            let (_, dw, db) = br.g.backward(input, w, false, br.bias, &fill_g, None)?;
            let dst = &mut dparams[br.params.clone()];
            let (dst_w, dst_b) = dst.split_at_mut(dw.len());
            dst_w.copy_from_slice(&dw);
            if br.bias {
                dst_b.copy_from_slice(&db);
            }
        }
        Ok(dparams)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};
    use crate::ops::{batch_norm_train, conv2d_fused, max_pool2d};
    use candle_core::Var;

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// `(o, k, pool, bias, relu)` per branch, on `c` input channels: 'same' padding.
    fn vars(
        c: usize,
        spec: &[(usize, usize, bool, bool, bool)],
        seed: u64,
    ) -> Vec<(Var, Option<Var>)> {
        let var = |t: Tensor| Var::from_tensor(&t).unwrap();
        spec.iter()
            .enumerate()
            .map(|(i, &(o, k, _, bias, _))| {
                let s = seed + 10 * i as u64;
                (
                    var(rand_t(&[o, c, k, k], s)),
                    bias.then(|| var(rand_t(&[o], s + 1))),
                )
            })
            .collect()
    }

    /// The op against the fast layers one by one (`max_pool2d`, `conv2d_fused`, `cat`, then
    /// `batch_norm_train`): bit for bit, output, statistics and every weight, bias, gamma and beta
    /// gradient; and against its reference twin (within rounding).
    #[test]
    fn inception_matches_the_layers() {
        let pool = BranchPool {
            kernel: 3,
            stride: 1,
            pad: (1, 1, 1, 1),
        };
        let specs = [
            (
                1,
                vec![
                    (4, 1, false, true, true),
                    (6, 3, false, true, true),
                    (4, 5, false, true, true),
                    (2, 1, true, true, true),
                ],
            ),
            (
                3,
                vec![
                    (2, 3, true, false, false),
                    (5, 1, false, true, false),
                    (3, 5, false, false, true),
                ],
            ),
        ];
        for ((c, spec), with_bn) in specs.iter().flat_map(|s| [(s, false), (s, true)]) {
            let c = *c;
            let v = vars(c, spec, 7 + c as u64);
            let total: usize = spec.iter().map(|s| s.0).sum();
            let gamma =
                Var::from_tensor(&((rand_t(&[total], 5) * 0.3).unwrap() + 1.0).unwrap()).unwrap();
            let beta = Var::from_tensor(&rand_t(&[total], 6)).unwrap();
            let bn = with_bn.then_some(ModuleBn {
                gamma: gamma.as_tensor(),
                beta: beta.as_tensor(),
                eps: 1e-3,
            });
            let branches: Vec<InceptionBranch> = spec
                .iter()
                .zip(&v)
                .map(|(&(_, k, p, _, relu), (w, bias))| InceptionBranch {
                    pool: p.then_some(pool),
                    w: w.as_tensor(),
                    bias: bias.as_ref().map(|b| b.as_tensor()),
                    pad: ((k - 1) / 2, (k - 1) / 2, k / 2, k / 2),
                    relu,
                })
                .collect();
            let x = rand_t(&[5, c, 11, 9], 3);
            let r = rand_t(&[5, total, 11, 9], 4);
            let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let what = format!("c {c}, BatchNorm {with_bn}");

            let (y, stats) = inception_train(&x, &branches, bn).unwrap();
            let g = loss(&y);
            let outs: Vec<Tensor> = branches
                .iter()
                .map(|br| {
                    let xin = match br.pool {
                        Some(p) => max_pool2d(&x, p.kernel, p.stride, p.pad).unwrap(),
                        None => x.clone(),
                    };
                    conv2d_fused(&xin, br.w, br.bias, 1, br.pad, br.relu).unwrap()
                })
                .collect();
            let mut y1 = Tensor::cat(&outs, 1).unwrap();
            let mut stats1 = None;
            if let Some(m) = bn {
                let (z, mean, var) = batch_norm_train(&y1, m.gamma, m.beta, m.eps).unwrap();
                y1 = z;
                stats1 = Some((mean, var));
            }
            let g1 = loss(&y1);
            let (yr, statsr) = inception_train_reference(&x, &branches, bn).unwrap();
            let gr = loss(&yr);

            assert_eq!(y.dims(), &[5, total, 11, 9]);
            assert_eq!(bits(&y), bits(&y1), "output ({what})");
            assert_close(&y, &yr, 1e-4, "output against the reference");
            assert_eq!(stats.is_some(), with_bn);
            if let (Some((m, v)), Some((m1, v1)), Some((mr, vr))) = (&stats, &stats1, &statsr) {
                assert_eq!(
                    (bits(m), bits(v)),
                    (bits(m1), bits(v1)),
                    "statistics ({what})"
                );
                assert_close(m, mr, 1e-5, "mean against the reference");
                assert_close(v, vr, 1e-5, "var against the reference");
            }
            let mut all: Vec<&Var> = v
                .iter()
                .flat_map(|(w, b)| std::iter::once(w).chain(b))
                .collect();
            if with_bn {
                all.extend([&gamma, &beta]);
            }
            for (i, var) in all.into_iter().enumerate() {
                let (a, b, r) = (
                    g.get(var).unwrap(),
                    g1.get(var).unwrap(),
                    gr.get(var).unwrap(),
                );
                assert_eq!(bits(a), bits(b), "gradient of variable {i} ({what})");
                assert_close(
                    a,
                    r,
                    1e-3,
                    &format!("gradient of variable {i} against the reference"),
                );
            }
        }
    }

    #[test]
    fn inception_refuses_what_it_cannot_do() {
        let w = rand_t(&[2, 1, 3, 3], 1);
        let same = InceptionBranch {
            pool: None,
            w: &w,
            bias: None,
            pad: (1, 1, 1, 1),
            relu: true,
        };
        let x = rand_t(&[2, 1, 8, 8], 2);
        assert!(inception_train(&x, &[], None).is_err());
        let tracked = Var::from_tensor(&x).unwrap();
        let err = inception_train(tracked.as_tensor(), &[same], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gradient"), "{err}");
        let valid = InceptionBranch {
            pad: (0, 0, 0, 0),
            ..same
        };
        let err = inception_train(&x, &[same, valid], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("branch 1"), "{err}");
    }
}

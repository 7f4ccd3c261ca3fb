//! The inception module in training as ONE op ([`inception_train`]), for a module whose branches are
//! each one stride-1 convolution, optionally after a max pool, on an input that needs no gradient (the
//! images: the module comes first). Every image's branches write straight into their channels of the
//! concatenated output (no `cat`, no per-branch outputs), and the backward pass takes each branch's
//! weight gradient from its channels of the output gradient (no `cat` backward, no per-branch gradient
//! tensors through candle's gradient store). The same kernels in the same order as the layers one by
//! one ([`super::max_pool2d`], [`super::conv2d_fused`], `cat`): the same bits.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{geometry_of, ConvGeom};
use super::{cpu_data, dims4, fwd_slice, take_buf, OpState, Pad4, PoolGeom};

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

/// The training forward pass of an inception module of one-convolution branches over `x [b, c, h, w]`
/// (`f32`, CPU, needing no gradient): the branches' outputs concatenated along channels,
/// `[b, sum o_i, oh, ow]` (every branch must give the same `oh x ow`). Its backward pass gives each
/// branch's weight and bias gradients, bit for bit those of the layers run one by one; an `x` that needs
/// a gradient is refused (run the layers instead).
pub fn inception_train(x: &Tensor, branches: &[InceptionBranch]) -> Result<Tensor> {
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
    let params = Tensor::cat(&parts, 0)?;
    let op = InceptionOp {
        branches: built,
        out: (b, channels, oh, ow),
        pooled: OpState::new(OP),
    };
    x.contiguous()?.apply_op2(&params, op)
}

/// The reference twin of [`inception_train`]: candle's own ops ([`super::max_pool2d_reference`],
/// [`super::conv2d_fused_reference`], `cat`), any device or dtype, gradients through candle's autograd.
pub fn inception_train_reference(x: &Tensor, branches: &[InceptionBranch]) -> Result<Tensor> {
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
    Tensor::cat(&outs, 1)
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

struct InceptionOp {
    branches: Vec<Branch>,
    /// `(b, channels, oh, ow)` of the output.
    out: (usize, usize, usize, usize),
    /// The pooled input of each pooling branch (empty for the others), from the forward pass.
    pooled: OpState<Vec<Vec<f32>>>,
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
        let (b, ch, oh, ow) = self.out;
        let ohw = oh * ow;
        // The pooled inputs, plane by plane (the argmax is not needed: no input gradient).
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
                        .for_each(|(o, xp)| {
                            let mut arg = vec![0u32; phw];
                            pg.plane_fwd(xp, o, &mut arg);
                        });
                    out
                }
            })
            .collect();
        let convs = self
            .branches
            .iter()
            .map(|br| Ok((br.split(ps)?, br.g.direct_conv(br.split(ps)?.0)?)))
            .collect::<Result<Vec<_>>>()?;
        // Every value is written: the branches' channel ranges cover all `ch` channels of each image.
        let mut y = take_buf(b * ch * ohw);
        y.par_chunks_mut(ch * ohw)
            .enumerate()
            .try_for_each(|(i, yi)| {
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
                Ok::<(), candle_core::Error>(())
            })?;
        self.pooled.set(pooled)?;
        Ok((CpuStorage::F32(y), Shape::from(self.out)))
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
        let (b, ch, oh, ow) = self.out;
        let n = ch * oh * ow;
        if dys.len() != b * n || ys.len() != b * n {
            candle_core::bail!(
                "{OP} backward: a gradient of {} values for {:?}",
                dys.len(),
                self.out
            )
        }
        let pooled = self.pooled.lock()?;
        let mut dparams = vec![0f32; ps.len()];
        for (br, p) in self.branches.iter().zip(pooled.iter()) {
            let (w, _) = br.split(ps)?;
            let ohw = oh * ow;
            let (c0, c1) = (br.channels.start * ohw, br.channels.end * ohw);
            // The branch's channels of the output gradient, through its ReLU (as `conv2d_fused`'s).
            let fill_g = |i: usize, gb: &mut [f32]| {
                let dyi = &dys[i * n + c0..i * n + c1];
                if br.relu {
                    let yi = &ys[i * n + c0..i * n + c1];
                    for ((gv, &d), &yv) in gb.iter_mut().zip(dyi).zip(yi) {
                        *gv = if yv > 0.0 { d } else { 0.0 };
                    }
                } else {
                    gb.copy_from_slice(dyi);
                }
            };
            let input: &[f32] = if br.pool.is_some() { p } else { xs };
            let (_, dw, db) = br.g.backward(input, w, false, &fill_g)?;
            let dst = &mut dparams[br.params.clone()];
            let (dst_w, dst_b) = dst.split_at_mut(dw.len());
            dst_w.copy_from_slice(&dw);
            if br.bias {
                dst_b.copy_from_slice(&db);
            }
        }
        Ok((
            None,
            Some(Tensor::from_vec(dparams, params.shape(), params.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};
    use crate::ops::{conv2d_fused, max_pool2d};
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

    /// The op against the fast layers one by one (`max_pool2d`, `conv2d_fused`, `cat`: bit for bit,
    /// output and every weight and bias gradient) and against its reference twin (within rounding).
    #[test]
    fn inception_matches_the_layers() {
        let pool = BranchPool {
            kernel: 3,
            stride: 1,
            pad: (1, 1, 1, 1),
        };
        for (c, spec) in [
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
        ] {
            let v = vars(c, &spec, 7 + c as u64);
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
            let total: usize = spec.iter().map(|s| s.0).sum();
            let r = rand_t(&[5, total, 11, 9], 4);
            let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();

            let y = inception_train(&x, &branches).unwrap();
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
            let y1 = Tensor::cat(&outs, 1).unwrap();
            let g1 = loss(&y1);
            let yr = inception_train_reference(&x, &branches).unwrap();
            let gr = loss(&yr);

            assert_eq!(y.dims(), &[5, total, 11, 9]);
            assert_eq!(bits(&y), bits(&y1), "output (c {c})");
            assert_close(&y, &yr, 1e-4, "output against the reference");
            for (i, var) in v
                .iter()
                .flat_map(|(w, b)| std::iter::once(w).chain(b))
                .enumerate()
            {
                let (a, b, r) = (
                    g.get(var).unwrap(),
                    g1.get(var).unwrap(),
                    gr.get(var).unwrap(),
                );
                assert_eq!(bits(a), bits(b), "gradient of variable {i} (c {c})");
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
        assert!(inception_train(&x, &[]).is_err());
        let tracked = Var::from_tensor(&x).unwrap();
        let err = inception_train(tracked.as_tensor(), &[same])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gradient"), "{err}");
        let valid = InceptionBranch {
            pad: (0, 0, 0, 0),
            ..same
        };
        let err = inception_train(&x, &[same, valid]).unwrap_err().to_string();
        assert!(err.contains("branch 1"), "{err}");
    }
}

//! Max pooling with any kernel / stride / padding and a correct gradient.
//!
//! candle 0.11's own `max_pool2d` backward is wrong: it scales every gradient by `1/k^2` (it multiplies by
//! the average of the max-mask instead of dividing by the number of maxima), it upsamples the output
//! gradient with `upsample_nearest2d` so on odd input sizes the gradient lands on the wrong pixels, and it
//! refuses `kernel != stride`. The fast op here saves the argmax of every window and routes each output's
//! gradient to it (the first maximum in row-major window order wins); the reference twin unfolds the
//! windows with `narrow`s and takes candle's `max`, whose gradient goes to the maximum.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_data, dims4, fwd_slice, multiversion, out_len, OpState, Pad4};

const OP: &str = "max_pool2d";

/// Geometry of a max pool over one `[h, w]` plane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolGeom {
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    /// Clipped kernel range `[lo, hi)` along one axis for output index `o`.
    #[inline]
    pub(crate) fn window(o: usize, s: usize, pad: usize, k: usize, len: usize) -> (usize, usize) {
        let start = o * s;
        let lo = pad.saturating_sub(start);
        let hi = k.min(len + pad - start.min(len + pad));
        (lo, hi.max(lo))
    }

    /// Validated geometry of a `kernel`/`stride`/`pad` pool over `[h, w]` planes.
    pub(crate) fn new(h: usize, w: usize, kernel: usize, stride: usize, pad: Pad4) -> Result<Self> {
        check_pad(kernel, pad)?;
        let (pt, pl, pb, pr) = pad;
        Ok(Self {
            h,
            w,
            k: kernel,
            stride,
            pt,
            pl,
            oh: out_len(h, pt, pb, kernel, stride, OP)?,
            ow: out_len(w, pl, pr, kernel, stride, OP)?,
        })
    }

    /// True for the 2x2 / stride-2 pool without padding, which every pooled model uses and which has
    /// its own loops (and AVX-512 kernels).
    pub(crate) fn is_unpadded_2x2(&self) -> bool {
        self.k == 2 && self.stride == 2 && self.pt == 0 && self.pl == 0
    }

    /// One plane: output values and argmax (index in the plane).
    pub(crate) fn plane_fwd(&self, x: &[f32], out: &mut [f32], arg: &mut [u32]) {
        let (k, s, w) = (self.k, self.stride, self.w);
        if self.is_unpadded_2x2() {
            if !super::stream_k512::pool2x2(w, (self.oh, self.ow), x, out, arg) {
                pool2x2_portable(w, self.oh, self.ow, x, out, arg);
            }
            return;
        }
        if k == 2 && s == 1 && self.pt == 0 && self.pl == 0 && self.oh < self.h && self.ow < w {
            pool2x2_s1(w, self.oh, self.ow, x, out, arg);
            return;
        }
        if s == 1 {
            pool_s1_argmax(self, x, out, arg);
            return;
        }
        for oy in 0..self.oh {
            let (ky0, ky1) = Self::window(oy, s, self.pt, k, self.h);
            for ox in 0..self.ow {
                let (kx0, kx1) = Self::window(ox, s, self.pl, k, self.w);
                let mut best = f32::NEG_INFINITY;
                let mut bi = usize::MAX;
                for ky in ky0..ky1 {
                    let iy = oy * s + ky - self.pt;
                    for kx in kx0..kx1 {
                        let idx = iy * w + ox * s + kx - self.pl;
                        let v = x[idx];
                        if bi == usize::MAX || v > best {
                            best = v;
                            bi = idx;
                        }
                    }
                }
                out[oy * self.ow + ox] = best;
                arg[oy * self.ow + ox] = if bi == usize::MAX {
                    u32::MAX
                } else {
                    bi as u32
                };
            }
        }
    }
}

impl PoolGeom {
    /// Inference: `out [oh, ow]` = the window maxima of the plane `x` (`h` rows `rs` apart), no argmax.
    pub(crate) fn plane_max(&self, x: &[f32], rs: usize, out: &mut [f32]) {
        if self.is_unpadded_2x2() && super::stream_k512::pool2x2_max(rs, (self.oh, self.ow), x, out)
        {
            return;
        }
        pool_max(self, x, rs, out)
    }
}

multiversion! {
    /// See [`PoolGeom::plane_max`] (the portable twin of its AVX-512 2x2 path); windows entirely in the
    /// padding give `-inf`.
    pub(crate) fn pool_max(g: &PoolGeom, x: &[f32], rs: usize, out: &mut [f32]) {
        let (k, s, ow) = (g.k, g.stride, g.ow);
        let max = |a: f32, b: f32| if b > a { b } else { a };
        if g.is_unpadded_2x2() {
            for (oy, orow) in out.chunks_exact_mut(ow).take(g.oh).enumerate() {
                let top = &x[2 * oy * rs..][..2 * ow];
                let bot = &x[(2 * oy + 1) * rs..][..2 * ow];
                for ((o, t), b) in orow.iter_mut().zip(top.chunks_exact(2)).zip(bot.chunks_exact(2)) {
                    *o = max(max(t[0], t[1]), max(b[0], b[1]));
                }
            }
            return;
        }
        if s == 1 {
            // Row by row: the max of k*k shifted runs of the input rows (each a contiguous slice).
            for (oy, orow) in out.chunks_exact_mut(ow).take(g.oh).enumerate() {
                orow.fill(f32::NEG_INFINITY);
                for ky in 0..k {
                    let Some(iy) = super::tap_row(g.h, g.pt, 1, oy, ky) else {
                        continue;
                    };
                    let row = &x[iy * rs..iy * rs + g.w];
                    for kx in 0..k {
                        let (lo, hi) = super::tap_cols(g.w, g.pl, 1, ow, kx);
                        if lo < hi {
                            let src = &row[lo + kx - g.pl..hi + kx - g.pl];
                            for (o, &v) in orow[lo..hi].iter_mut().zip(src) {
                                *o = max(*o, v);
                            }
                        }
                    }
                }
            }
            return;
        }
        for (oy, orow) in out.chunks_exact_mut(ow).take(g.oh).enumerate() {
            let (ky0, ky1) = PoolGeom::window(oy, s, g.pt, k, g.h);
            for (ox, o) in orow.iter_mut().enumerate() {
                let (kx0, kx1) = PoolGeom::window(ox, s, g.pl, k, g.w);
                let mut best = f32::NEG_INFINITY;
                for ky in ky0..ky1 {
                    let row = &x[(oy * s + ky - g.pt) * rs..];
                    for kx in kx0..kx1 {
                        best = max(best, row[ox * s + kx - g.pl]);
                    }
                }
                *o = best;
            }
        }
    }
}

multiversion! {
    /// A stride-1 pool of any size and padding with its argmax, row by row: the window cells are visited
    /// in row-major order for every output at once (each output sees its own valid cells in the same
    /// order as the general loop of [`PoolGeom::plane_fwd`]: the same maxima and the same ties).
    fn pool_s1_argmax(g: &PoolGeom, x: &[f32], out: &mut [f32], arg: &mut [u32]) {
        let (k, w, ow) = (g.k, g.w, g.ow);
        for (oy, (orow, arow)) in out.chunks_exact_mut(ow).zip(arg.chunks_exact_mut(ow)).take(g.oh).enumerate() {
            orow.fill(f32::NEG_INFINITY);
            arow.fill(u32::MAX);
            for ky in 0..k {
                let Some(iy) = super::tap_row(g.h, g.pt, 1, oy, ky) else {
                    continue;
                };
                for kx in 0..k {
                    let (lo, hi) = super::tap_cols(w, g.pl, 1, ow, kx);
                    if lo >= hi {
                        continue;
                    }
                    // The first input read: column `lo + kx - pl >= 0` of row `iy`.
                    let start = iy * w + lo + kx - g.pl;
                    let src = &x[start..start + hi - lo];
                    for (j, ((o, a), &v)) in orow[lo..hi].iter_mut().zip(&mut arow[lo..hi]).zip(src).enumerate() {
                        if *a == u32::MAX || v > *o {
                            *o = v;
                            *a = (start + j) as u32;
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// The common 2x2 / stride-2 pool of one plane, branch-free: pairwise maxima, the earlier
    /// candidate wins ties (the first maximum in row-major window order).
    pub(crate) fn pool2x2_portable(w: usize, oh: usize, ow: usize, x: &[f32], out: &mut [f32], arg: &mut [u32]) {
        for oy in 0..oh {
            let r0 = 2 * oy * w;
            let r1 = r0 + w;
            let (top, bot) = (&x[r0..r0 + 2 * ow], &x[r1..r1 + 2 * ow]);
            let orow = &mut out[oy * ow..(oy + 1) * ow];
            let arow = &mut arg[oy * ow..(oy + 1) * ow];
            for (ox, ((t, b), (o, a))) in top
                .chunks_exact(2)
                .zip(bot.chunks_exact(2))
                .zip(orow.iter_mut().zip(arow.iter_mut()))
                .enumerate()
            {
                let i = (r0 + 2 * ox) as u32;
                let j = (r1 + 2 * ox) as u32;
                let (v1, i1) = if t[1] > t[0] { (t[1], i + 1) } else { (t[0], i) };
                let (v2, i2) = if b[1] > b[0] { (b[1], j + 1) } else { (b[0], j) };
                (*o, *a) = if v2 > v1 { (v2, i2) } else { (v1, i1) };
            }
        }
    }
}

multiversion! {
    /// The 2x2 / stride-1 pool of one plane whose windows all lie inside it, with the tie rule of
    /// [`pool2x2_portable`].
    fn pool2x2_s1(w: usize, oh: usize, ow: usize, x: &[f32], out: &mut [f32], arg: &mut [u32]) {
        for oy in 0..oh {
            let r0 = oy * w;
            let r1 = r0 + w;
            let (top, bot) = (&x[r0..r0 + ow + 1], &x[r1..r1 + ow + 1]);
            let orow = &mut out[oy * ow..(oy + 1) * ow];
            let arow = &mut arg[oy * ow..(oy + 1) * ow];
            for (ox, ((t, b), (o, a))) in top
                .windows(2)
                .zip(bot.windows(2))
                .zip(orow.iter_mut().zip(arow.iter_mut()))
                .enumerate()
            {
                let i = (r0 + ox) as u32;
                let j = (r1 + ox) as u32;
                let (v1, i1) = if t[1] > t[0] { (t[1], i + 1) } else { (t[0], i) };
                let (v2, i2) = if b[1] > b[0] { (b[1], j + 1) } else { (b[0], j) };
                (*o, *a) = if v2 > v1 { (v2, i2) } else { (v1, i1) };
            }
        }
    }
}

struct MaxPoolOp {
    g: PoolGeom,
    dims: (usize, usize, usize, usize),
    /// Argmax (index within its plane) of every output, filled by the forward pass.
    argmax: OpState<Vec<u32>>,
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = fwd_slice(s, l, OP)?;
        let g = self.g;
        let (b, c, _, _) = self.dims;
        let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
        let mut out = super::par_zeros(b * c * ohw);
        let mut arg = super::par_zeros(b * c * ohw);
        out.par_chunks_mut(ohw)
            .zip(arg.par_chunks_mut(ohw))
            .enumerate()
            .with_min_len(8)
            .for_each(|(p, (o, a))| g.plane_fwd(&x[p * hw..(p + 1) * hw], o, a));
        self.argmax.set(arg)?;
        Ok((CpuStorage::F32(out), Shape::from((b, c, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = self.g;
        let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
        cpu_data!(grad, dyg, dys, OP);
        let arg = self.argmax.lock()?;
        if arg.len() != dys.len() {
            candle_core::bail!(
                "max_pool2d backward: {} saved argmax for {} gradients",
                arg.len(),
                dys.len()
            )
        }
        let mut dx = vec![0f32; x.elem_count()];
        dx.par_chunks_mut(hw)
            .enumerate()
            .with_min_len(8)
            .for_each(|(p, d)| {
                for (&a, &gv) in arg[p * ohw..(p + 1) * ohw]
                    .iter()
                    .zip(&dys[p * ohw..(p + 1) * ohw])
                {
                    if let Some(slot) = d.get_mut(a as usize) {
                        *slot += gv;
                    }
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

pub(crate) fn check_pad(kernel: usize, pad: Pad4) -> Result<()> {
    let (t, l, b, r) = pad;
    if t >= kernel || l >= kernel || b >= kernel || r >= kernel {
        candle_core::bail!(
            "{OP}: padding {pad:?} must be smaller than the kernel {kernel} on every side"
        )
    }
    Ok(())
}

/// Fast max pooling on `f32` CPU tensors: `x [b, c, h, w]`, square `kernel`, `stride`, padding
/// `(top, left, bottom, right)` that counts as `-inf` (each side must be smaller than the kernel).
/// The backward pass sends each output's gradient to its window's argmax (first maximum wins).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    let dims = dims4(x, OP)?;
    let (_, _, h, w) = dims;
    let g = PoolGeom::new(h, w, kernel, stride, pad)?;
    x.contiguous()?.apply_op1(MaxPoolOp {
        g,
        dims,
        argmax: OpState::new(OP),
    })
}

/// Pads dimension `dim` with `-inf` (`before`, `after`).
fn pad_neg_inf(x: &Tensor, dim: usize, before: usize, after: usize) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(3);
    let mk = |n: usize| -> Result<Tensor> {
        let mut d = x.dims().to_vec();
        d[dim] = n;
        Tensor::full(f64::NEG_INFINITY, d, x.device())?.to_dtype(x.dtype())
    };
    if before > 0 {
        parts.push(mk(before)?);
    }
    parts.push(x.clone());
    if after > 0 {
        parts.push(mk(after)?);
    }
    if parts.len() == 1 {
        Ok(x.clone())
    } else {
        Tensor::cat(&parts, dim)
    }
}

/// The reference twin of [`max_pool2d`], from candle ops (any device / float dtype): pad with `-inf`,
/// gather the `k*k` window offsets with `narrow` (plus a reshape to subsample for stride > 1), stack
/// them and take `max`; candle's `max` gradient goes to the maximum (to every tied maximum).
pub fn max_pool2d_reference(x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    check_pad(kernel, pad)?;
    let (b, c, h, w) = x.dims4()?;
    let (pt, pl, pb, pr) = pad;
    let oh = out_len(h, pt, pb, kernel, stride, OP)?;
    let ow = out_len(w, pl, pr, kernel, stride, OP)?;
    // Extra -inf rows/cols at the end so every offset can take oh*stride rows (never inside a window).
    let need_h = kernel - 1 + oh * stride;
    let need_w = kernel - 1 + ow * stride;
    let hp = h + pt + pb;
    let wp = w + pl + pr;
    let xp = pad_neg_inf(x, 2, pt, pb + need_h.saturating_sub(hp))?;
    let xp = pad_neg_inf(&xp, 3, pl, pr + need_w.saturating_sub(wp))?;
    let mut wins = Vec::with_capacity(kernel * kernel);
    for ky in 0..kernel {
        for kx in 0..kernel {
            let t = xp.narrow(2, ky, oh * stride)?.narrow(3, kx, ow * stride)?;
            let t = if stride == 1 {
                t
            } else {
                t.contiguous()?
                    .reshape((b, c, oh, stride, ow, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, c, oh, ow))?
            };
            wins.push(t);
        }
    }
    Tensor::stack(&wins, 4)?.max(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};
    use candle_core::{DType, Var};

    fn check(dims: [usize; 4], k: usize, s: usize, pad: Pad4) {
        let x = Var::from_tensor(&rand_t(&dims, 50)).unwrap();
        let yf = max_pool2d(&x, k, s, pad).unwrap();
        let yr = max_pool2d_reference(&x, k, s, pad).unwrap();
        let what = format!("{dims:?} k{k} s{s} {pad:?}");
        assert_close(&yf, &yr, 0.0, &format!("fwd {what}"));
        let r = rand_t(yf.dims(), 51);
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            gf.get(&x).unwrap(),
            gr.get(&x).unwrap(),
            1e-6,
            &format!("dx {what}"),
        );
    }

    #[test]
    fn pool_matches_reference() {
        check([5, 20, 28, 28], 2, 2, (0, 0, 0, 0));
        check([1, 3, 11, 9], 2, 2, (0, 0, 0, 0));
        check([5, 2, 28, 28], 2, 1, (0, 0, 1, 1));
        check([2, 2, 13, 13], 2, 1, (0, 0, 0, 0));
        check([3, 4, 10, 7], 3, 2, (1, 1, 1, 1));
        check([2, 1, 5, 6], 3, 3, (0, 0, 0, 0));
        check([2, 3, 7, 10], 2, 1, (0, 0, 0, 0));
        check([1, 2, 9, 4], 3, 1, (1, 1, 1, 1));
    }

    #[test]
    fn first_max_wins_on_ties() {
        // The gradient of the sum of the max-pool of an all-ones `[1, 1, n, n]` image.
        let ones_grad = |n: usize, kernel: usize, stride: usize| {
            let x = Var::from_tensor(
                &Tensor::ones((1, 1, n, n), DType::F32, &candle_core::Device::Cpu).unwrap(),
            )
            .unwrap();
            let y = max_pool2d(&x, kernel, stride, (0, 0, 0, 0)).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            g.get(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(ones_grad(2, 2, 2), vec![1.0, 0.0, 0.0, 0.0]);
        // Stride 1: every window's gradient goes to its top-left element.
        assert_eq!(
            ones_grad(3, 2, 1),
            vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn rejects_pad_not_smaller_than_kernel() {
        let x = rand_t(&[1, 1, 4, 4], 1);
        assert!(max_pool2d(&x, 2, 2, (2, 0, 0, 0)).is_err());
        assert!(max_pool2d_reference(&x, 2, 2, (0, 0, 0, 2)).is_err());
    }
}

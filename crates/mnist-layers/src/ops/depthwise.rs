//! Depthwise 2-D convolution (one `k x k` filter per channel, multiplier 1): direct loops, parallel over
//! (image, channel) planes.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_data, dims4, fwd_slice, multiversion, out_len, with_scratch, Pad4};
use crate::error::shape_err;

const OP: &str = "depthwise_conv2d";

#[derive(Debug, Clone, Copy)]
struct DwGeom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pt: usize,
    pl: usize,
    oh: usize,
    ow: usize,
}

impl DwGeom {
    /// Range of output columns whose input column lies inside the image, for kernel column `kx`.
    #[inline]
    fn ox_range(&self, kx: usize) -> (usize, usize) {
        super::tap_cols(self.w, self.pl, self.stride, self.ow, kx)
    }

    #[inline]
    fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        super::tap_row(self.h, self.pt, self.stride, oy, ky)
    }

    /// Length of the de-interleaved plane a strided forward pass needs (0 for stride 1).
    fn split_len(&self) -> usize {
        if self.stride == 1 {
            0
        } else {
            self.stride * self.h * self.w.div_ceil(self.stride)
        }
    }

    /// `out [oh, ow] = conv(x [h, w], f [k, k])` for one plane; `xd` is scratch of
    /// [`Self::split_len`] floats.
    fn plane_fwd(&self, x: &[f32], f: &[f32], out: &mut [f32], xd: &mut [f32]) {
        dw_plane_fwd(self, x, f, out, xd)
    }

    /// For one plane: `dx [h, w] = conv^T(g, f)` (if wanted) and `df [k, k] = sum g * x`.
    fn plane_bwd(&self, x: &[f32], f: &[f32], g: &[f32], dx: Option<&mut [f32]>, df: &mut [f32]) {
        let (k, s, w, ow) = (self.k, self.stride, self.w, self.ow);
        let mut dx = dx;
        if let Some(d) = dx.as_deref_mut() {
            d.fill(0.0);
        }
        for ky in 0..k {
            for kx in 0..k {
                let (lo, hi) = self.ox_range(kx);
                if lo >= hi {
                    df[ky * k + kx] = 0.0;
                    continue;
                }
                let fv = f[ky * k + kx];
                let ix0 = lo * s + kx - self.pl;
                let mut acc = [0f32; 8];
                let mut tail = 0f32;
                for oy in 0..self.oh {
                    let Some(iy) = self.in_row(oy, ky) else {
                        continue;
                    };
                    let gr = &g[oy * ow + lo..oy * ow + hi];
                    if s == 1 {
                        let src = &x[iy * w + ix0..iy * w + ix0 + hi - lo];
                        let cg = gr.chunks_exact(8);
                        let cs = src.chunks_exact(8);
                        for (a, b) in cg.remainder().iter().zip(cs.remainder()) {
                            tail += a * b;
                        }
                        for (a, b) in cg.zip(cs) {
                            for l in 0..8 {
                                acc[l] += a[l] * b[l];
                            }
                        }
                        if let Some(d) = dx.as_deref_mut() {
                            let drow = &mut d[iy * w + ix0..iy * w + ix0 + hi - lo];
                            for (dv, &gv) in drow.iter_mut().zip(gr) {
                                *dv += fv * gv;
                            }
                        }
                    } else {
                        for (j, &gv) in gr.iter().enumerate() {
                            let ix = iy * w + ix0 + j * s;
                            tail += gv * x[ix];
                            if let Some(d) = dx.as_deref_mut() {
                                d[ix] += fv * gv;
                            }
                        }
                    }
                }
                df[ky * k + kx] = acc.iter().sum::<f32>() + tail;
            }
        }
    }
}

multiversion! {
    /// See [`DwGeom::plane_fwd`]. A strided pass first splits every input row into its `s` phases
    /// (`xd[(p*h + iy)*wq + j] = x[iy*w + p + j*s]`), so that every tap reads a contiguous run.
    fn dw_plane_fwd(g: &DwGeom, x: &[f32], f: &[f32], out: &mut [f32], xd: &mut [f32]) {
        out.fill(0.0);
        let (k, s, w, ow) = (g.k, g.stride, g.w, g.ow);
        let wq = w.div_ceil(s);
        let (src, rs): (&[f32], usize) = if s == 1 {
            (x, w)
        } else {
            for iy in 0..g.h {
                let row = &x[iy * w..(iy + 1) * w];
                if s == 2 {
                    let (d0, d1) = xd.split_at_mut(g.h * wq);
                    let d0 = &mut d0[iy * wq..(iy + 1) * wq];
                    let d1 = &mut d1[iy * wq..(iy + 1) * wq];
                    let pairs = row.chunks_exact(2);
                    if let [last] = pairs.remainder() {
                        d0[wq - 1] = *last;
                        d1[wq - 1] = 0.0;
                    }
                    for ((a, b), c) in d0.iter_mut().zip(d1.iter_mut()).zip(pairs) {
                        *a = c[0];
                        *b = c[1];
                    }
                    continue;
                }
                for p in 0..s {
                    let d = &mut xd[(p * g.h + iy) * wq..(p * g.h + iy + 1) * wq];
                    d.fill(0.0);
                    for (dv, &v) in d.iter_mut().zip(row.iter().skip(p).step_by(s)) {
                        *dv = v;
                    }
                }
            }
            (&*xd, wq)
        };
        for kx in 0..k {
            let (lo, hi) = g.ox_range(kx);
            if lo >= hi {
                continue;
            }
            let ix0 = lo * s + kx - g.pl;
            // Phase and first column of this tap's run in the split rows.
            let (p, j0) = (ix0 % s, ix0 / s);
            for oy in 0..g.oh {
                let dst = &mut out[oy * ow + lo..oy * ow + hi];
                for ky in 0..k {
                    let Some(iy) = g.in_row(oy, ky) else {
                        continue;
                    };
                    let fv = f[ky * k + kx];
                    let r = (p * g.h + iy) * rs + j0;
                    for (d, &v) in dst.iter_mut().zip(&src[r..r + hi - lo]) {
                        *d += fv * v;
                    }
                }
            }
        }
    }
}

struct DepthwiseOp {
    g: DwGeom,
}

impl CustomOp2 for DepthwiseOp {
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
        let f = fwd_slice(s2, l2, OP)?;
        let g = self.g;
        let (hw, ohw, kk) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
        let mut out = vec![0f32; g.b * g.c * ohw];
        out.par_chunks_mut(ohw)
            .enumerate()
            .with_min_len(4)
            .for_each(|(p, dst)| {
                let ch = p % g.c;
                with_scratch([g.split_len()], |[xd]| {
                    g.plane_fwd(
                        &x[p * hw..(p + 1) * hw],
                        &f[ch * kk..(ch + 1) * kk],
                        dst,
                        xd,
                    )
                });
            });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.c, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        f: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.g;
        let need_dx = x.track_op();
        cpu_data!(x, xg, xs, OP);
        cpu_data!(f, fg, fs, OP);
        cpu_data!(grad, dyg, dys, OP);
        let (hw, ohw, kk, planes) = (g.h * g.w, g.oh * g.ow, g.k * g.k, g.b * g.c);
        // One filter-gradient partial per plane, summed over the batch in image order below.
        let mut pdf = vec![0f32; planes * kk];
        let mut dx = vec![0f32; if need_dx { planes * hw } else { planes }];
        let dx_chunk = if need_dx { hw } else { 1 };
        pdf.par_chunks_mut(kk)
            .zip(dx.par_chunks_mut(dx_chunk))
            .enumerate()
            .with_min_len(4)
            .for_each(|(p, (df, dxp))| {
                let ch = p % g.c;
                g.plane_bwd(
                    &xs[p * hw..(p + 1) * hw],
                    &fs[ch * kk..(ch + 1) * kk],
                    &dys[p * ohw..(p + 1) * ohw],
                    need_dx.then_some(dxp),
                    df,
                );
            });
        let mut df = vec![0f32; g.c * kk];
        for img in pdf.chunks_exact(g.c * kk) {
            df.iter_mut().zip(img).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        let dx = if need_dx {
            Some(Tensor::from_vec(dx, (g.b, g.c, g.h, g.w), dev)?)
        } else {
            None
        };
        Ok((dx, Some(Tensor::from_vec(df, (g.c, 1, g.k, g.k), dev)?)))
    }
}

/// Fast depthwise convolution on `f32` CPU tensors: `x [b, c, h, w]`, `w [c, 1, k, k]`,
/// zero padding `(top, left, bottom, right)`; returns `[b, c, oh, ow]`.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Pad4) -> Result<Tensor> {
    let (b, c, h, wd) = dims4(x, OP)?;
    let (wc, one, k, k2) = dims4(w, OP)?;
    if wc != c || one != 1 || k != k2 {
        return Err(shape_err(OP, format!("weight [{c}, 1, k, k]"), w.dims()));
    }
    let (pt, pl, pb, pr) = pad;
    let oh = out_len(h, pt, pb, k, stride, OP)?;
    let ow = out_len(wd, pl, pr, k, stride, OP)?;
    let g = DwGeom {
        b,
        c,
        h,
        w: wd,
        k,
        stride,
        pt,
        pl,
        oh,
        ow,
    };
    x.contiguous()?
        .apply_op2(&w.contiguous()?, DepthwiseOp { g })
}

/// The reference twin of [`depthwise_conv2d`]: candle's grouped convolution (`groups = c`).
pub fn depthwise_conv2d_reference(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: Pad4,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let xp = super::pad_for_window(x, w.dim(3)?, stride, pad)?;
    xp.conv2d(w, 0, stride, 1, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};

    fn check(b: usize, c: usize, h: usize, w: usize, k: usize, s: usize, pad: Pad4) {
        let x = candle_core::Var::from_tensor(&rand_t(&[b, c, h, w], 11)).unwrap();
        let f = candle_core::Var::from_tensor(&rand_t(&[c, 1, k, k], 12)).unwrap();
        let yf = depthwise_conv2d(&x, &f, s, pad).unwrap();
        let yr = depthwise_conv2d_reference(&x, &f, s, pad).unwrap();
        let what = format!("b{b} c{c} {h}x{w} k{k} s{s} {pad:?}");
        assert_close(&yf, &yr, 1e-5, &format!("fwd {what}"));
        let r = rand_t(yf.dims(), 13);
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            gf.get(&x).unwrap(),
            gr.get(&x).unwrap(),
            1e-4,
            &format!("dx {what}"),
        );
        assert_close(
            gf.get(&f).unwrap(),
            gr.get(&f).unwrap(),
            1e-4,
            &format!("dw {what}"),
        );
    }

    #[test]
    fn depthwise_matches_reference() {
        check(5, 1, 28, 28, 3, 1, (0, 0, 0, 0));
        check(1, 28, 13, 13, 3, 1, (0, 0, 0, 0));
        check(5, 2, 28, 28, 5, 1, (2, 2, 2, 2));
        check(5, 7, 28, 28, 3, 2, (0, 0, 0, 0));
        check(3, 3, 9, 8, 3, 2, (1, 0, 1, 1));
        check(2, 4, 21, 19, 3, 1, (1, 1, 1, 1));
        // Odd widths with stride 2 (a lone last column), and stride 3.
        check(2, 3, 10, 11, 3, 2, (0, 1, 0, 1));
        check(2, 2, 11, 10, 3, 3, (1, 1, 1, 1));
        check(1, 2, 7, 9, 5, 2, (2, 2, 2, 2));
    }
}

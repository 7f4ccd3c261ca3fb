//! Dense 2-D convolution: im2col + `gemm` per image, bias and ReLU fused; backward with col2im.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::direct_grad::SharedGrad;
use super::AfterDx;
use super::{
    copy_row, cpu_data, dims4, fwd_slice, multiversion, out_len, sum_f32, with_scratch, DirectConv,
    Epilogue, Pad4, Uninit, GRAD_CHUNK,
};
use crate::error::shape_err;
use std::mem::MaybeUninit;

const OP: &str = "conv2d_fused";

/// How [`ConvGeom::backward_direct`] gets the input gradient.
#[derive(Clone, Copy)]
enum DxConv<'a> {
    /// Not asked for.
    None,
    /// From a zero-padded copy of the output gradient ([`DirectConv::input_grad_of`]).
    Padded(&'a DirectConv),
    /// From the output gradient in the shared-padding layout, which the weight gradient reads too
    /// ([`DirectConv::input_grad_shared`]).
    Shared(&'a SharedGrad),
}

/// The gradients of a convolution: `(dx if asked for, dw [o, c*k*k], db [o])`.
pub(crate) type ConvGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Geometry of one convolution call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvGeom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub k: usize,
    pub stride: usize,
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
    /// 1x1, stride 1, no padding: the image itself is the im2col matrix.
    pub direct: bool,
    /// Padded input height / width (`h + pt + pb`, `w + pl + pr`).
    pub hp: usize,
    pub wp: usize,
}

impl ConvGeom {
    pub(crate) fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    pub(crate) fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    pub(crate) fn chw(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Stride 1 and not [`Self::direct`]: the "wide" im2col layout (see [`Self::im2col_wide`]).
    fn wide(&self) -> bool {
        self.stride == 1 && !self.direct
    }
    /// Stride-1 layout with some padding: the image is first copied into a zero-padded buffer.
    fn padded(&self) -> bool {
        self.wide() && (self.hp != self.h || self.wp != self.w)
    }
    /// Columns of the wide im2col matrix: `oh * wp` (the last `wp - ow` of every row are discarded).
    fn wide_len(&self) -> usize {
        self.oh * self.wp
    }
    /// Columns of the im2col matrix in the layout in use.
    fn ncols(&self) -> usize {
        if self.wide() {
            self.wide_len()
        } else {
            self.ohw()
        }
    }
    fn col_len(&self) -> usize {
        if self.direct {
            0
        } else {
            self.ckk() * self.ncols()
        }
    }
    fn pad_len(&self) -> usize {
        if self.padded() {
            self.c * self.hp * self.wp
        } else {
            0
        }
    }

    /// Copies one image `x [c, h, w]` into the zero-padded `xp [c, hp, wp]`.
    fn pad_image(&self, x: &[f32], xp: &mut [f32]) {
        let (h, w, hp, wp) = (self.h, self.w, self.hp, self.wp);
        xp.fill(0.0);
        for ci in 0..self.c {
            let src = &x[ci * h * w..(ci + 1) * h * w];
            let dst = &mut xp[ci * hp * wp..(ci + 1) * hp * wp];
            for (iy, row) in src.chunks_exact(w).enumerate() {
                let o = (iy + self.pt) * wp + self.pl;
                dst[o..o + w].copy_from_slice(row);
            }
        }
    }

    /// The wide im2col of a stride-1 convolution, one `memcpy` per row: with the (padded) image
    /// `xp [c, hp, wp]` flattened, row `(ci, ky, kx)` of `col [c*k*k, oh*wp]` is the contiguous run
    /// `xp[ci*hp*wp + ky*wp + kx ..][.. oh*wp]`. Column `oy*wp + ox` is output pixel `(oy, ox)` for
    /// `ox < ow`; the columns `ox >= ow` hold garbage (zeros past the end of `xp`) and are discarded.
    fn im2col_wide(&self, xp: &[f32], col: &mut [f32]) {
        let (k, l, plane) = (self.k, self.wide_len(), self.hp * self.wp);
        for (r, row) in col.chunks_exact_mut(l).enumerate() {
            let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
            let off = ci * plane + ky * self.wp + kx;
            let n = l.min(xp.len().saturating_sub(off));
            row[..n].copy_from_slice(&xp[off..off + n]);
            row[n..].fill(0.0);
        }
    }

    /// `dxp [c, hp, wp] += col2im_wide(dcol [c*k*k, oh*wp])`, the transpose of [`Self::im2col_wide`]
    /// (the discarded columns of `dcol` must be zero).
    fn col2im_wide(&self, dcol: &[f32], dxp: &mut [f32]) {
        col2im_wide(self, dcol, dxp)
    }

    /// `dst [o, oh*ow] = act(wide [o, oh*wp] + bias)`, dropping the discarded columns.
    fn compact_wide(&self, wide: &[f32], dst: &mut [f32], bias: Option<&[f32]>, relu: bool) {
        compact_wide(self, wide, dst, bias, relu)
    }

    /// `wide [o, oh*wp]` from `g [o, oh*ow]`, zeros in the discarded columns.
    fn spread_wide(&self, g: &[f32], wide: &mut [f32]) {
        let (ow, wp, l, ohw) = (self.ow, self.wp, self.wide_len(), self.ohw());
        for oc in 0..self.o {
            let src = &g[oc * ohw..(oc + 1) * ohw];
            let dst = &mut wide[oc * l..(oc + 1) * l];
            for (drow, srow) in dst.chunks_mut(wp).zip(src.chunks_exact(ow)) {
                drow[..ow].copy_from_slice(srow);
                drow[ow..].fill(0.0);
            }
        }
    }

    /// The padding `(top, left, bottom, right)`.
    fn pad(&self) -> Pad4 {
        (
            self.pt,
            self.pl,
            self.hp - self.h - self.pt,
            self.wp - self.w - self.pl,
        )
    }

    /// The direct convolution with weights `w` (`[o, c, k, k]`) for stride 1, `None` for other strides
    /// (those run as im2col + gemm).
    pub(crate) fn direct_conv(&self, w: &[f32]) -> Result<Option<DirectConv>> {
        if self.stride != 1 {
            return Ok(None);
        }
        DirectConv::new((self.c, self.h, self.w), w, (self.o, self.k), self.pad()).map(Some)
    }

    /// One image: `dst [o, oh*ow] = act(conv(xi [c, h, w], w) + bias)`; `dc` is [`Self::direct_conv`]
    /// of the same weights. `xi` may go on past the image (the batch's next images), which the direct
    /// kernel then reads as its padding ([`DirectConv::padded`]); the other paths take only the image.
    pub(crate) fn forward_image(
        &self,
        dc: Option<&DirectConv>,
        xi: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        dst: &mut [f32],
    ) -> Result<()> {
        if let Some(dc) = dc {
            return with_scratch([dc.xp_len, dc.out_len()], |[xp, wide]| {
                let xp = dc.padded(xi, xp);
                let epi = Epilogue {
                    bias,
                    relu,
                    affine: None,
                };
                dc.run_compact(xp, &epi, wide, dst)
            });
        }
        let (o, ckk, ohw) = (self.o, self.ckk(), self.ohw());
        let xi = &xi[..self.chw()];
        if self.wide() {
            let l = self.wide_len();
            with_scratch([self.pad_len(), self.col_len(), o * l], |[xp, col, wide]| {
                let src: &[f32] = if self.padded() {
                    self.pad_image(xi, xp);
                    xp
                } else {
                    xi
                };
                self.im2col_wide(src, col);
                sgemm((o, l, ckk), wide, (l, 1), false, w, (ckk, 1), col, (l, 1))?;
                self.compact_wide(wide, dst, bias, relu);
                Ok::<(), candle_core::Error>(())
            })?;
            return Ok(());
        }
        with_scratch([self.col_len()], |[col]| {
            let col: &[f32] = if self.direct {
                xi
            } else {
                self.im2col(xi, col);
                col
            };
            sgemm(
                (o, ohw, ckk),
                dst,
                (ohw, 1),
                false,
                w,
                (ckk, 1),
                col,
                (ohw, 1),
            )
        })?;
        for (oc, row) in dst.chunks_exact_mut(ohw).enumerate() {
            let bv = bias.map_or(0.0, |b| b[oc]);
            if relu {
                row.iter_mut().for_each(|v| *v = relu_f32(*v + bv));
            } else if bv != 0.0 {
                row.iter_mut().for_each(|v| *v += bv);
            }
        }
        Ok(())
    }

    /// The whole batch: `[b, o, oh, ow]` from `x [b, c, h, w]` (images in parallel).
    pub(crate) fn forward(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
    ) -> Result<Vec<f32>> {
        let mut out = super::par_zeros(self.b * self.o * self.ohw());
        self.forward_into(x, w, bias, relu, &mut out)?;
        Ok(out)
    }

    /// [`Self::forward`] into `out [b, o, oh*ow]` (every element is overwritten).
    pub(crate) fn forward_into(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<()> {
        let (o, ohw, chw) = (self.o, self.ohw(), self.chw());
        let dc = self.direct_conv(w)?;
        let work = |(i, dst): (usize, &mut [f32])| {
            // The direct kernel may read the next images as its padding (`DirectConv::padded`).
            self.forward_image(dc.as_ref(), &x[i * chw..], w, bias, relu, dst)
        };
        if self.b == 1 {
            work((0, out))
        } else {
            out.par_chunks_mut(o * ohw).enumerate().try_for_each(work)
        }
    }

    /// Backward of the convolution given the gradient at its (pre-activation) output: `fill_g(i, g)`
    /// writes image `i`'s `g [o, oh*ow]`; the direct kernels call `after_dx` with each image's dx once
    /// written (the im2col path does not: a caller counts the calls). Returns `(dx if need_dx,
    /// dw [o, c*k*k], db [o])` (db zeros unless need_db: a convolution without bias skips its sums); dw
    /// and db are reduced over fixed chunks of [`GRAD_CHUNK`] images in chunk order (thread-count
    /// independent).
    pub(crate) fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        need_dx: bool,
        need_db: bool,
        fill_g: &(dyn Fn(usize, &mut [f32]) + Sync),
        after_dx: Option<&AfterDx<'_>>,
    ) -> Result<ConvGrads> {
        if let Some(dc) = self.direct_conv(w)? {
            if !need_dx {
                return self.backward_direct(x, &dc, DxConv::None, need_db, fill_g, None);
            }
            if let Some(shared) = dc.input_grad_shared(w, self.k)? {
                return self.backward_direct(
                    x,
                    &dc,
                    DxConv::Shared(&shared),
                    need_db,
                    fill_g,
                    after_dx,
                );
            }
            let padded = DirectConv::input_grad_of(
                (self.c, self.h, self.w),
                w,
                (self.o, self.k),
                self.pad(),
            )?;
            if let Some(padded) = padded {
                return self.backward_direct(
                    x,
                    &dc,
                    DxConv::Padded(&padded),
                    need_db,
                    fill_g,
                    after_dx,
                );
            }
        }
        let g = *self;
        let (o, ckk, ohw, chw) = (g.o, g.ckk(), g.ohw(), g.chw());
        let (wide, padded, n) = (g.wide(), g.padded(), g.ncols());
        let nchunks = g.b.div_ceil(GRAD_CHUNK);
        let mut pdw = vec![0f32; nchunks * o * ckk];
        let mut pdb = vec![0f32; nchunks * o];
        let dx_chunk = if need_dx { GRAD_CHUNK * chw } else { 1 };
        let mut dx = super::par_zeros(if need_dx { g.b * chw } else { nchunks });
        let lens = [
            o * ohw,
            g.col_len(),
            g.pad_len(),
            if wide { o * n } else { 0 },
            if need_dx && !g.direct { ckk * n } else { 0 },
            if need_dx { g.pad_len() } else { 0 },
        ];

        pdw.par_chunks_mut(o * ckk)
            .zip(pdb.par_chunks_mut(o))
            .zip(dx.par_chunks_mut(dx_chunk))
            .enumerate()
            .try_for_each(|(ch, ((dw, db), dxc))| {
                let i0 = ch * GRAD_CHUNK;
                let i1 = (i0 + GRAD_CHUNK).min(g.b);
                with_scratch(lens, |[gbuf, col, xp, gwide, dcol, dxp]| {
                    for i in i0..i1 {
                        let xi = &x[i * chw..(i + 1) * chw];
                        fill_g(i, gbuf);
                        if need_db {
                            for (oc, row) in gbuf.chunks_exact(ohw).enumerate() {
                                db[oc] += sum_f32(row) as f32;
                            }
                        }
                        // The im2col matrix and the gradient in the same column layout.
                        let (colr, gi): (&[f32], &[f32]) = if g.direct {
                            (xi, gbuf)
                        } else if wide {
                            let src: &[f32] = if padded {
                                g.pad_image(xi, xp);
                                xp
                            } else {
                                xi
                            };
                            g.im2col_wide(src, col);
                            g.spread_wide(gbuf, gwide);
                            (col, gwide)
                        } else {
                            g.im2col(xi, col);
                            (col, gbuf)
                        };
                        // dw[o, ckk] += g[o, n] · col^T[n, ckk], stored transposed (`dw` is
                        // [ckk, o]) so that gemm packs the small g, not the im2col matrix.
                        sgemm((o, ckk, n), dw, (1, o), true, gi, (n, 1), colr, (1, n))?;
                        if !need_dx {
                            continue;
                        }
                        let dxi = &mut dxc[(i - i0) * chw..(i - i0 + 1) * chw];
                        if g.direct {
                            // dx[c, hw] = w^T[c, o] · g[o, hw]
                            sgemm((ckk, n, o), dxi, (n, 1), false, w, (1, ckk), gi, (n, 1))?;
                            continue;
                        }
                        // dcol[ckk, n] = w^T[ckk, o] · g[o, n]
                        sgemm((ckk, n, o), dcol, (n, 1), false, w, (1, ckk), gi, (n, 1))?;
                        if !wide {
                            g.col2im(dcol, dxi);
                        } else if padded {
                            dxp.fill(0.0);
                            g.col2im_wide(dcol, dxp);
                            let (hp, wp) = (g.hp, g.wp);
                            for ci in 0..g.c {
                                for iy in 0..g.h {
                                    let s = ci * hp * wp + (iy + g.pt) * wp + g.pl;
                                    let d = (ci * g.h + iy) * g.w;
                                    dxi[d..d + g.w].copy_from_slice(&dxp[s..s + g.w]);
                                }
                            }
                        } else {
                            g.col2im_wide(dcol, dxi);
                        }
                    }
                    Ok::<(), candle_core::Error>(())
                })
            })?;
        let mut dwt = vec![0f32; o * ckk]; // [ckk, o]
        for part in pdw.chunks_exact(o * ckk) {
            dwt.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        let mut dw = vec![0f32; o * ckk];
        for (r, row) in dwt.chunks_exact(o).enumerate() {
            for (oc, &v) in row.iter().enumerate() {
                dw[oc * ckk + r] = v;
            }
        }
        let mut db = vec![0f32; o];
        for part in pdb.chunks_exact(o) {
            db.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        Ok((need_dx.then_some(dx), dw, db))
    }

    /// [`Self::backward`] of a stride-1 convolution on the direct kernels: the weight gradient image by
    /// image from the padded input and the wide gradient, the input gradient (when `dx_conv` is given) as
    /// the convolution of the padded gradient with the flipped kernel. Same chunked, ordered reduction.
    fn backward_direct(
        &self,
        x: &[f32],
        dc: &DirectConv,
        dx_conv: DxConv,
        need_db: bool,
        fill_g: &(dyn Fn(usize, &mut [f32]) + Sync),
        after_dx: Option<&AfterDx<'_>>,
    ) -> Result<ConvGrads> {
        let g = *self;
        let (o, ckk, ohw, chw) = (g.o, g.ckk(), g.ohw(), g.chw());
        let nchunks = g.b.div_ceil(GRAD_CHUNK);
        let need_dx = !matches!(dx_conv, DxConv::None);
        let mut pdw = vec![0f32; nchunks * o * ckk];
        let mut pdb = vec![0f32; nchunks * o];
        // Every image's dx is written by the input-gradient convolution (`compact_into_uninit` or
        // `run_compact_uninit`); without dx, one unwritten value per chunk keeps the chunks zipped.
        let dx_chunk = if need_dx { GRAD_CHUNK * chw } else { 1 };
        let mut dx = Uninit::new(if need_dx { g.b * chw } else { nchunks });
        let lens = [
            // The output gradient, and what the input-gradient convolution reads past it when it
            // pads nothing (it then reads the gradient in place, `DirectConv::padded`).
            match dx_conv {
                DxConv::Padded(d) => (o * ohw).max(d.xp_len),
                _ => o * ohw,
            },
            dc.xp_len,
            // The wide gradient (the shared layout is its own).
            match dx_conv {
                DxConv::Shared(_) => 0,
                _ => dc.out_len(),
            },
            match dx_conv {
                DxConv::None => 0,
                DxConv::Padded(d) => d.xp_len,
                DxConv::Shared(s) => s.len(),
            },
            match dx_conv {
                DxConv::None => 0,
                DxConv::Padded(d) => d.out_len(),
                DxConv::Shared(s) => s.dx.out_len(),
            },
        ];
        pdw.par_chunks_mut(o * ckk)
            .zip(pdb.par_chunks_mut(o))
            .zip(dx.par_chunks_mut(dx_chunk))
            .enumerate()
            .try_for_each(|(ch, ((dw, db), dxc))| {
                let i0 = ch * GRAD_CHUNK;
                let i1 = (i0 + GRAD_CHUNK).min(g.b);
                with_scratch(lens, |[gfull, xp, gwide, gp, dxwide]| {
                    if let DxConv::Shared(_) = dx_conv {
                        // Only the gradient's rows are written below: the zeros around them stay.
                        gp.fill(0.0);
                    }
                    for i in i0..i1 {
                        let gbuf = &mut gfull[..o * ohw];
                        fill_g(i, gbuf);
                        if need_db {
                            for (oc, row) in gbuf.chunks_exact(ohw).enumerate() {
                                db[oc] += sum_f32(row) as f32;
                            }
                        }
                        let xp = dc.padded(&x[i * chw..], xp);
                        let dst = || (i - i0) * chw..(i - i0 + 1) * chw;
                        match dx_conv {
                            DxConv::None => {
                                dc.weight_grad(xp, dc.wide_grad(gbuf, gwide), dw)?;
                            }
                            DxConv::Padded(dxk) => {
                                dc.weight_grad(xp, dc.wide_grad(gbuf, gwide), dw)?;
                                let gx = dxk.padded(gfull, gp);
                                let dst = &mut dxc[dst()];
                                if dxk.wp == dxk.ow {
                                    // A 1x1 input gradient, say: rows whole, so the kernel writes
                                    // into dx itself (`run_uninit` where the wide layout is the
                                    // compact one, else masked compact stores), no copy out.
                                    dxk.run_compact_uninit(gx, &Epilogue::default(), dxwide, dst)?;
                                } else {
                                    dxk.run(gx, &Epilogue::default(), dxwide)?;
                                    dxk.compact_into_uninit(dxwide, dst);
                                }
                            }
                            DxConv::Shared(sg) => {
                                sg.fill(gbuf, gp);
                                dc.weight_grad_planes(xp, sg.planes(gp), sg.plane, dw)?;
                                let dst = &mut dxc[dst()];
                                sg.dx
                                    .run_compact_uninit(gp, &Epilogue::default(), dxwide, dst)?;
                            }
                        }
                        if let (Some(hook), true) = (after_dx, need_dx) {
                            let dxi = &dxc[dst()];
                            // SAFETY: image `i`'s values were all written just above (the input-gradient
                            // convolution writes every value of its `chw`), so they are initialised.
                            hook(i, unsafe {
                                &*(dxi as *const [MaybeUninit<f32>] as *const [f32])
                            });
                        }
                    }
                    Ok::<(), candle_core::Error>(())
                })
            })?;
        let mut dw = vec![0f32; o * ckk];
        for part in pdw.chunks_exact(o * ckk) {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        let mut db = vec![0f32; o];
        for part in pdb.chunks_exact(o) {
            db.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        // SAFETY: with `need_dx`, the chunks cover the `b * chw` values in `GRAD_CHUNK`-image steps and
        // every image `i` of a chunk had its `chw` values written by `compact_into_uninit` or
        // `run_compact_uninit` (their output is `[c, h, w]`: `dx_conv` maps `[o, oh, ow]` back to the
        // input's shape), or an error returned.
        let dx = need_dx.then(|| unsafe { dx.assume_init() });
        Ok((dx, dw, db))
    }

    /// Range of output columns whose input column `ox*s + kx - pl` lies inside `[0, w)`.
    #[inline]
    fn ox_range(&self, kx: usize) -> (usize, usize) {
        super::tap_cols(self.w, self.pl, self.stride, self.ow, kx)
    }

    /// Input row for output row `oy` and kernel row `ky`, if inside the image.
    #[inline]
    fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        super::tap_row(self.h, self.pt, self.stride, oy, ky)
    }

    /// `col [c*k*k, oh*ow]` from one image `x [c, h, w]`.
    pub(crate) fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (k, s, hw, ohw, ow) = (self.k, self.stride, self.h * self.w, self.ohw(), self.ow);
        for ci in 0..self.c {
            let xc = &x[ci * hw..(ci + 1) * hw];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut col[((ci * k + ky) * k + kx) * ohw..][..ohw];
                    let (lo, hi) = self.ox_range(kx);
                    for oy in 0..self.oh {
                        let dst = &mut row[oy * ow..(oy + 1) * ow];
                        let Some(iy) = self.in_row(oy, ky) else {
                            dst.fill(0.0);
                            continue;
                        };
                        let src = &xc[iy * self.w..(iy + 1) * self.w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        if lo < hi {
                            let ix0 = lo * s + kx - self.pl;
                            if s == 1 {
                                copy_row(&mut dst[lo..hi], &src[ix0..ix0 + hi - lo]);
                            } else {
                                for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                                    *d = src[ix0 + j * s];
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `dx [c, h, w] += col2im(dcol [c*k*k, oh*ow])`.
    pub(crate) fn col2im(&self, dcol: &[f32], dx: &mut [f32]) {
        let (k, s, hw, ohw, ow) = (self.k, self.stride, self.h * self.w, self.ohw(), self.ow);
        for ci in 0..self.c {
            let dxc = &mut dx[ci * hw..(ci + 1) * hw];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &dcol[((ci * k + ky) * k + kx) * ohw..][..ohw];
                    let (lo, hi) = self.ox_range(kx);
                    if lo >= hi {
                        continue;
                    }
                    for oy in 0..self.oh {
                        let Some(iy) = self.in_row(oy, ky) else {
                            continue;
                        };
                        let src = &row[oy * ow + lo..oy * ow + hi];
                        let ix0 = lo * s + kx - self.pl;
                        let dst = &mut dxc[iy * self.w..(iy + 1) * self.w];
                        if s == 1 {
                            for (d, v) in dst[ix0..ix0 + hi - lo].iter_mut().zip(src) {
                                *d += v;
                            }
                        } else {
                            for (j, v) in src.iter().enumerate() {
                                dst[ix0 + j * s] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// See [`ConvGeom::col2im_wide`].
    fn col2im_wide(g: &ConvGeom, dcol: &[f32], dxp: &mut [f32]) {
        let (k, l, plane) = (g.k, g.wide_len(), g.hp * g.wp);
        for (r, row) in dcol.chunks_exact(l).enumerate() {
            let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
            let off = ci * plane + ky * g.wp + kx;
            let n = l.min(dxp.len().saturating_sub(off));
            for (d, v) in dxp[off..off + n].iter_mut().zip(&row[..n]) {
                *d += v;
            }
        }
    }
}

multiversion! {
    /// See [`ConvGeom::compact_wide`].
    fn compact_wide(g: &ConvGeom, wide: &[f32], dst: &mut [f32], bias: Option<&[f32]>, relu: bool) {
        let (ow, wp, l, ohw) = (g.ow, g.wp, g.wide_len(), g.ohw());
        for oc in 0..g.o {
            let bv = bias.map_or(0.0, |b| b[oc]);
            let src = &wide[oc * l..(oc + 1) * l];
            let out = &mut dst[oc * ohw..(oc + 1) * ohw];
            for (drow, srow) in out.chunks_exact_mut(ow).zip(src.chunks(wp)) {
                let srow = &srow[..ow];
                if relu {
                    for (d, &v) in drow.iter_mut().zip(srow) {
                        *d = relu_f32(v + bv);
                    }
                } else {
                    for (d, &v) in drow.iter_mut().zip(srow) {
                        *d = v + bv;
                    }
                }
            }
        }
    }
}

/// `max(v, 0)` as a compare-select, which vectorises to `maxps` (`f32::max`'s NaN rule does not);
/// NaN maps to 0.
#[inline(always)]
pub(crate) fn relu_f32(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with explicit (row, col) strides, single-threaded.
///
/// Every index reached through the strides must lie inside its slice: checked here, an error otherwise
/// (only a bug in this module can cause it; shapes are validated before any call).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    if last(dst_rs, dst_cs, m, n) >= dst.len()
        || last(lhs_rs, lhs_cs, m, k) >= lhs.len()
        || last(rhs_rs, rhs_cs, k, n) >= rhs.len()
    {
        candle_core::bail!(
            "sgemm: a [{m}, {n}] = [{m}, {k}] x [{k}, {n}] product does not fit its buffers ({}, {}, {})",
            dst.len(),
            lhs.len(),
            rhs.len()
        )
    }
    // SAFETY: all strided indices were checked to lie inside the slices above; dst does not alias
    // lhs/rhs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
    Ok(())
}

struct ConvOp {
    g: ConvGeom,
    relu: bool,
}

impl ConvOp {
    fn out_shape(&self) -> Shape {
        Shape::from((self.g.b, self.g.o, self.g.oh, self.g.ow))
    }

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let g = self.g;
        let need_dx = x.track_op();
        cpu_data!(x, xg, xs, OP);
        cpu_data!(w, wg, ws, OP);
        cpu_data!(res, yg, ys, OP);
        cpu_data!(grad, dyg, dys, OP);
        let n = g.o * g.ohw();
        let relu = self.relu;
        let fill_g = |i: usize, gb: &mut [f32]| {
            let dyi = &dys[i * n..(i + 1) * n];
            if relu {
                let yi = &ys[i * n..(i + 1) * n];
                for ((gv, &d), &yv) in gb.iter_mut().zip(dyi).zip(yi) {
                    *gv = if yv > 0.0 { d } else { 0.0 };
                }
            } else {
                gb.copy_from_slice(dyi);
            }
        };
        let (dx, dw, db) = g.backward(xs, ws, need_dx, true, &fill_g, None)?;
        let dev = x.device();
        let dx = match dx {
            Some(v) => Some(Tensor::from_vec(v, (g.b, g.c, g.h, g.w), dev)?),
            None => None,
        };
        Ok((
            dx,
            Tensor::from_vec(dw, (g.o, g.c, g.k, g.k), dev)?,
            Tensor::from_vec(db, g.o, dev)?,
        ))
    }
}

impl CustomOp2 for ConvOp {
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
        let w = fwd_slice(s2, l2, OP)?;
        Ok((
            CpuStorage::F32(self.g.forward(x, w, None, self.relu)?),
            self.out_shape(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, res, grad)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        OP
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
        let x = fwd_slice(s1, l1, OP)?;
        let w = fwd_slice(s2, l2, OP)?;
        let b = fwd_slice(s3, l3, OP)?;
        Ok((
            CpuStorage::F32(self.g.forward(x, w, Some(b), self.relu)?),
            self.out_shape(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, res, grad)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// Validates shapes and builds the geometry of a convolution.
pub(crate) fn geometry(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Pad4,
) -> Result<ConvGeom> {
    geometry_of(dims4(x, OP)?, w, bias, stride, pad)
}

/// [`geometry`] for an input of `dims` (`[b, c, h, w]`, already checked to be an `f32` CPU tensor).
pub(crate) fn geometry_of(
    (b, c, h, wd): (usize, usize, usize, usize),
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Pad4,
) -> Result<ConvGeom> {
    let (o, wc, k, k2) = dims4(w, OP)?;
    if wc != c || k != k2 {
        return Err(shape_err(OP, format!("weight [o, {c}, k, k]"), w.dims()));
    }
    if let Some(bias) = bias {
        if bias.dims() != [o] {
            return Err(shape_err(OP, format!("bias [{o}]"), bias.dims()));
        }
        if bias.dtype() != candle_core::DType::F32 || !bias.device().is_cpu() {
            return Err(candle_core::Error::UnsupportedDTypeForOp(bias.dtype(), OP).bt());
        }
    }
    let (pt, pl, pb, pr) = pad;
    let oh = out_len(h, pt, pb, k, stride, OP)?;
    let ow = out_len(wd, pl, pr, k, stride, OP)?;
    Ok(ConvGeom {
        b,
        c,
        h,
        w: wd,
        o,
        k,
        stride,
        pt,
        pl,
        oh,
        ow,
        direct: k == 1 && stride == 1 && pad == (0, 0, 0, 0),
        hp: h + pt + pb,
        wp: wd + pl + pr,
    })
}

/// Fast fused convolution `relu?(conv(x, w, stride, pad) + bias)` on `f32` CPU tensors.
///
/// `x [b, c, h, w]`, `w [o, c, k, k]`, `bias [o]`, `pad = (top, left, bottom, right)` zero padding;
/// returns `[b, o, oh, ow]`. Backward gives dx (skipped when `x` needs no gradient), dw and db; the
/// ReLU mask comes from the saved output (`y > 0`).
pub fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Pad4,
    relu: bool,
) -> Result<Tensor> {
    let g = geometry(x, w, bias, stride, pad)?;
    let op = ConvOp { g, relu };
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// The reference twin of [`conv2d_fused`], built from candle ops (any device/dtype).
pub fn conv2d_fused_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Pad4,
    relu: bool,
) -> Result<Tensor> {
    let xp = super::pad_for_window(x, w.dim(3)?, stride, pad)?;
    let mut y = xp.conv2d(w, 0, stride, 1, 1)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?;
    }
    if relu {
        y = y.relu()?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};

    #[allow(clippy::too_many_arguments)]
    fn check(
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        o: usize,
        k: usize,
        s: usize,
        pad: Pad4,
        relu: bool,
        bias: bool,
    ) {
        let x = candle_core::Var::from_tensor(&rand_t(&[b, c, h, w], 1)).unwrap();
        let wt = candle_core::Var::from_tensor(&rand_t(&[o, c, k, k], 2)).unwrap();
        let bt = candle_core::Var::from_tensor(&rand_t(&[o], 3)).unwrap();
        let bo = bias.then_some(bt.as_tensor());
        let yf = conv2d_fused(&x, &wt, bo, s, pad, relu).unwrap();
        let yr = conv2d_fused_reference(&x, &wt, bo, s, pad, relu).unwrap();
        let what = format!("b{b} c{c} {h}x{w} o{o} k{k} s{s} {pad:?} relu{relu} bias{bias}");
        assert_close(&yf, &yr, 1e-5, &format!("fwd {what}"));
        let r = rand_t(yf.dims(), 4);
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("dx", &x), ("dw", &wt), ("db", &bt)] {
            if name == "db" && !bias {
                continue;
            }
            assert_close(
                gf.get(v).unwrap(),
                gr.get(v).unwrap(),
                1e-4,
                &format!("{name} {what}"),
            );
        }
    }

    #[test]
    fn conv_matches_reference() {
        check(5, 1, 28, 28, 20, 7, 1, (3, 3, 3, 3), true, true);
        check(1, 3, 9, 7, 4, 3, 2, (0, 0, 0, 0), false, true);
        check(5, 4, 11, 10, 3, 3, 2, (1, 0, 1, 1), true, false);
        check(5, 20, 14, 14, 10, 5, 1, (0, 0, 0, 0), true, true);
        check(3, 7, 6, 5, 2, 1, 1, (0, 0, 0, 0), true, true);
        check(9, 2, 5, 5, 3, 1, 2, (0, 0, 1, 1), false, true);
        // Stride 1 with asymmetric padding and a 1x1 kernel with padding (the wide layout, padded).
        check(6, 3, 7, 9, 4, 3, 1, (1, 0, 2, 1), true, true);
        check(2, 2, 4, 3, 3, 1, 1, (1, 1, 0, 1), false, true);
        check(1, 2, 6, 6, 3, 3, 1, (0, 0, 0, 0), true, false);
    }

    #[test]
    fn weight_grads_are_deterministic() {
        let x = rand_t(&[13, 3, 10, 10], 5);
        let w = candle_core::Var::from_tensor(&rand_t(&[4, 3, 3, 3], 6)).unwrap();
        let run = || {
            let y = conv2d_fused(&x, &w, None, 1, (1, 1, 1, 1), true).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            g.get(&w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let a = run();
        let b = run();
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        let x = rand_t(&[1, 2, 5, 5], 1);
        assert!(conv2d_fused(&x, &rand_t(&[3, 1, 3, 3], 2), None, 1, (0, 0, 0, 0), false).is_err());
        assert!(conv2d_fused(&x, &rand_t(&[3, 2, 7, 7], 2), None, 1, (0, 0, 0, 0), false).is_err());
        assert!(conv2d_fused(
            &x,
            &rand_t(&[3, 2, 3, 3], 2),
            Some(&rand_t(&[2], 3)),
            1,
            (0, 0, 0, 0),
            false
        )
        .is_err());
        let x64 = x.to_dtype(candle_core::DType::F64).unwrap();
        assert!(conv2d_fused(
            &x64,
            &rand_t(&[3, 2, 3, 3], 2),
            None,
            1,
            (0, 0, 0, 0),
            false
        )
        .is_err());
    }
}

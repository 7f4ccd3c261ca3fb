//! Depthwise 2-D convolution (one `k x k` filter per channel, multiplier 1): direct loops, parallel over
//! (image, channel) planes. Stride 1 (forward and input gradient) runs on a zero-padded copy of each plane
//! with register accumulators ([`sum_taps`]), summing in the same order as the general loop.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    copy_row, cpu_data, dims4, fwd_slice, multiversion, multiversion_unsafe, out_len, with_scratch,
    zero_row, Pad4,
};
use crate::error::shape_err;

const OP: &str = "depthwise_conv2d";

/// Geometry of one depthwise convolution call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DwGeom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
}

impl DwGeom {
    /// The geometry of a `k x k` depthwise convolution of `[b, c, h, w]` with `stride` and zero padding
    /// `pad`.
    pub(crate) fn new(
        (b, c, h, w): (usize, usize, usize, usize),
        k: usize,
        stride: usize,
        pad: Pad4,
    ) -> Result<Self> {
        let (pt, pl, pb, pr) = pad;
        let oh = out_len(h, pt, pb, k, stride, OP)?;
        let ow = out_len(w, pl, pr, k, stride, OP)?;
        Ok(Self {
            b,
            c,
            h,
            w,
            k,
            stride,
            pt,
            pl,
            oh,
            ow,
        })
    }

    /// Stride 1 without padding: `oh = h - k + 1 > 0`, `ow = w - k + 1 > 0`, every tap inside the plane.
    pub(crate) fn is_unpadded(&self) -> bool {
        self.stride == 1
            && self.oh > 0
            && self.ow > 0
            && self.pt == 0
            && self.pl == 0
            && self.oh + self.k == self.h + 1
            && self.ow + self.k == self.w + 1
    }

    /// Range of output columns whose input column lies inside the image, for kernel column `kx`.
    #[inline]
    fn ox_range(&self, kx: usize) -> (usize, usize) {
        super::tap_cols(self.w, self.pl, self.stride, self.ow, kx)
    }

    #[inline]
    fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        super::tap_row(self.h, self.pt, self.stride, oy, ky)
    }

    /// Scratch a forward pass needs per plane: the zero-padded plane for stride 1 (see [`Padded`]), the
    /// de-interleaved plane for larger strides.
    pub(crate) fn fwd_scratch_len(&self) -> usize {
        if self.stride == 1 {
            Padded::new(self.oh, self.ow, self.k).len()
        } else {
            self.stride * self.h * self.w.div_ceil(self.stride)
        }
    }

    /// `out [oh, ow] = conv(x [h, w], f [k, k])` for one plane; `xd` is scratch of
    /// [`Self::fwd_scratch_len`] floats; `taps`: this channel's part of [`Self::fwd_taps`] (used for stride 1 only).
    pub(crate) fn plane_fwd(
        &self,
        x: &[f32],
        f: &[f32],
        taps: &[(usize, f32)],
        out: &mut [f32],
        xd: &mut [f32],
    ) -> Result<()> {
        if self.stride != 1 {
            dw_plane_fwd(self, x, f, out, xd);
            return Ok(());
        }
        let pad = Padded::new(self.oh, self.ow, self.k);
        pad.fill(x, self.h, self.w, self.pt as isize, self.pl as isize, xd);
        sum_taps(xd, pad.wp, taps, self.oh, self.ow, out)
    }

    /// Stride 1: the padded planes of one image (see [`Self::pad_image`]).
    pub(crate) fn padded_len(&self) -> usize {
        self.c * Padded::new(self.oh, self.ow, self.k).len()
    }

    /// Stride 1: every plane of `xi [c, h, w]` zero-padded (a [`Padded`] of the output size each, planes
    /// one after the other), for [`Self::image_fwd`] and [`Self::image_df`].
    pub(crate) fn pad_image(&self, xi: &[f32], xp: &mut [f32]) {
        let pad = Padded::new(self.oh, self.ow, self.k);
        pad_planes(
            &pad,
            xi,
            (self.h, self.w),
            (self.pt as isize, self.pl as isize),
            xp,
        )
    }

    /// Stride 1: `out [c, oh, ow]` from the padded image `xp` ([`Self::pad_image`]) and the taps of
    /// [`Self::fwd_taps`].
    pub(crate) fn image_fwd(
        &self,
        xp: &[f32],
        taps: &[(usize, f32)],
        out: &mut [f32],
    ) -> Result<()> {
        let pad = Padded::new(self.oh, self.ow, self.k);
        let (kk, ohw) = (self.k * self.k, self.oh * self.ow);
        for ((xpl, t), o) in xp
            .chunks_exact(pad.len())
            .zip(taps.chunks_exact(kk))
            .zip(out.chunks_exact_mut(ohw))
        {
            sum_taps(xpl, pad.wp, t, self.oh, self.ow, o)?;
        }
        Ok(())
    }

    /// Stride 1: `df [c, k, k]` (written, not added) from the padded image `xp` ([`Self::pad_image`])
    /// and the output gradient `g [c, oh, ow]`; `gq` is scratch of `oh * ceil8(ow)` floats. `None` for a
    /// kernel size without accumulators (see [`Self::plane_df_s1`]).
    pub(crate) fn image_df(
        &self,
        xp: &[f32],
        g: &[f32],
        df: &mut [f32],
        gq: &mut [f32],
    ) -> Option<()> {
        let pad = Padded::new(self.oh, self.ow, self.k);
        let (kk, ohw) = (self.k * self.k, self.oh * self.ow);
        for ((xpl, gpl), d) in xp
            .chunks_exact(pad.len())
            .zip(g.chunks_exact(ohw))
            .zip(df.chunks_exact_mut(kk))
        {
            self.df_from_padded(xpl, gpl, d, gq)?;
        }
        Some(())
    }

    /// True where [`Self::image_df_unpadded`] can take an image whose slice `x` (the image, then what
    /// follows it in the batch) holds `len` floats: stride 1, no padding ("valid"), kernel 1, 3 or 5, an
    /// AVX-512 CPU, and `ceil8(ow) - ow` floats after the image's last plane to read.
    pub(crate) fn df_reads_unpadded(&self, len: usize) -> bool {
        let ow8 = self.ow.div_ceil(8) * 8;
        self.is_unpadded()
            && matches!(self.k, 1 | 3 | 5)
            && len >= self.c * self.h * self.w + (ow8 - self.ow)
            && super::has_avx512()
    }

    /// [`Self::image_df`] read straight from the unpadded image `x` (where [`Self::df_reads_unpadded`]):
    /// the same products in the same order, so the same bits. The 8-column runs of a row's last vector
    /// reach past the row into the next one, where the gradient (padded with zeros to `ceil8(ow)`) is
    /// zero: `0 * x` adds nothing to the sums, as the padded copy's zeros did (for finite `x`). `None`,
    /// nothing written, where it does not apply.
    pub(crate) fn image_df_unpadded(
        &self,
        x: &[f32],
        g: &[f32],
        df: &mut [f32],
        gq: &mut [f32],
    ) -> Option<()> {
        if !self.df_reads_unpadded(x.len()) {
            return None;
        }
        let (k, oh, ow, hw) = (self.k, self.oh, self.ow, self.h * self.w);
        let ow8 = ow.div_ceil(8) * 8;
        for (ch, (gpl, d)) in g
            .chunks_exact(oh * ow)
            .zip(df.chunks_exact_mut(k * k))
            .enumerate()
            .take(self.c)
        {
            for (dst, src) in gq.chunks_exact_mut(ow8).zip(gpl.chunks_exact(ow)) {
                dst[..ow].copy_from_slice(src);
                dst[ow..].fill(0.0);
            }
            if !super::depthwise_k512::df_acc((k, oh, ow8, self.w), &x[ch * hw..], gq, d) {
                return None;
            }
        }
        Some(())
    }

    /// Stride 1: `dx [c, h, w] = conv^T(g, f)` of one image (see [`Self::plane_dx_s1`]); `gp` is scratch
    /// of one padded gradient plane.
    pub(crate) fn image_dx(
        &self,
        taps: &[(usize, f32)],
        g: &[f32],
        dx: &mut [f32],
        gp: &mut [f32],
    ) -> Result<()> {
        let (kk, ohw, hw) = (self.k * self.k, self.oh * self.ow, self.h * self.w);
        for ((t, gpl), d) in taps
            .chunks_exact(kk)
            .zip(g.chunks_exact(ohw))
            .zip(dx.chunks_exact_mut(hw))
        {
            self.plane_dx_s1(t, gpl, d, gp)?;
        }
        Ok(())
    }

    /// The stride-1 forward taps `(offset in the padded plane, weight)` of every channel (`k * k` per
    /// channel; empty for other strides), built once per call so the planes allocate nothing. They run
    /// in the order of the general loop (kx outer, ky inner), so both sum every output in the same
    /// order: the results are bit-identical.
    pub(crate) fn fwd_taps(&self, f: &[f32]) -> Vec<(usize, f32)> {
        let (k, wp) = (self.k, Padded::new(self.oh, self.ow, self.k).wp);
        self.taps(f, |kx, ky| (ky * wp + kx, ky * k + kx))
    }

    /// The stride-1 `dx` taps of every channel (see [`Self::plane_dx_s1`]; empty for other strides): the
    /// flipped filter, in the order of the general loop in [`Self::plane_bwd`] (ky outer, kx inner).
    pub(crate) fn dx_taps(&self, f: &[f32]) -> Vec<(usize, f32)> {
        let (k, wp) = (self.k, Padded::new(self.h, self.w, self.k).wp);
        self.taps(f, |ky, kx| ((k - 1 - ky) * wp + (k - 1 - kx), ky * k + kx))
    }

    /// Stride 1: for each channel's filter in `f`, the `k * k` taps `(offset, filter[i])` where
    /// `(offset, i) = tap(outer, inner)`, visited outer-major; other strides: none.
    fn taps(
        &self,
        f: &[f32],
        tap: impl Fn(usize, usize) -> (usize, usize) + Copy,
    ) -> Vec<(usize, f32)> {
        if self.stride != 1 {
            return Vec::new();
        }
        let k = self.k;
        f.chunks_exact(k * k)
            .flat_map(|fc| {
                (0..k).flat_map(move |a| {
                    (0..k).map(move |b| {
                        let (off, i) = tap(a, b);
                        (off, fc[i])
                    })
                })
            })
            .collect()
    }

    /// Scratch [`Self::plane_bwd`] needs per plane (stride 1 only): the zero-padded gradient for `dx`,
    /// then the forward's padded input and the gradient in rows of whole 8-lane vectors for `df`.
    pub(crate) fn bwd_scratch_len(&self) -> usize {
        if self.stride == 1 {
            Padded::new(self.h, self.w, self.k).len()
                + self.fwd_scratch_len()
                + self.oh * self.ow.div_ceil(8) * 8
        } else {
            0
        }
    }

    /// Stride 1: `df [k, k] = sum g[oy, ox] * x[oy + ky - pt, ox + kx - pl]` in one pass over the plane,
    /// from the forward's zero-padded input `xd` (see [`Self::plane_fwd`]) and `g` copied into rows `gq` of
    /// whole 8-lane vectors (zeros past `ow`): 8-lane accumulators per tap, summed across lanes in a fixed
    /// order. `None` for a kernel size it has no accumulator set for (the general loop then runs).
    fn plane_df_s1(
        &self,
        x: &[f32],
        g: &[f32],
        df: &mut [f32],
        xd: &mut [f32],
        gq: &mut [f32],
    ) -> Option<()> {
        if !matches!(self.k, 1 | 3 | 5) {
            return None;
        }
        let pad = Padded::new(self.oh, self.ow, self.k);
        pad.fill(x, self.h, self.w, self.pt as isize, self.pl as isize, xd);
        self.df_from_padded(xd, g, df, gq)
    }

    /// [`Self::plane_df_s1`] from the plane already padded into `xd`.
    fn df_from_padded(&self, xd: &[f32], g: &[f32], df: &mut [f32], gq: &mut [f32]) -> Option<()> {
        if !matches!(self.k, 1 | 3 | 5) {
            return None;
        }
        let pad = Padded::new(self.oh, self.ow, self.k);
        let ow8 = self.ow.div_ceil(8) * 8;
        for (dst, src) in gq.chunks_exact_mut(ow8).zip(g.chunks_exact(self.ow)) {
            dst[..self.ow].copy_from_slice(src);
            dst[self.ow..].fill(0.0);
        }
        let (oh, wp, k) = (self.oh, pad.wp, self.k);
        match k {
            1 => df_s1::<1>(DfDims { k, oh, ow8, wp }, xd, gq, df),
            3 => df_s1::<9>(DfDims { k, oh, ow8, wp }, xd, gq, df),
            _ => df_s1::<25>(DfDims { k, oh, ow8, wp }, xd, gq, df),
        }
        Some(())
    }

    /// Stride 1: `dx [h, w] = conv^T(g, f)` as a convolution of the zero-padded gradient, taps in the
    /// order of the general loop in [`Self::plane_bwd`] (ky outer, kx inner; bit-identical sums).
    /// `taps`: this channel's part of [`Self::dx_taps`]; `gp`: scratch for the padded gradient.
    /// On an AVX-512 CPU, read straight from the unpadded `g` instead
    /// ([`super::depthwise_k512::plane_dx`]: the same products in the same order, so the same bits).
    fn plane_dx_s1(
        &self,
        taps: &[(usize, f32)],
        g: &[f32],
        dx: &mut [f32],
        gp: &mut [f32],
    ) -> Result<()> {
        // The taps' weights are the filter in its own order (`dx_taps`: `i = ky * k + kx`).
        let mut f = [0f32; 49];
        if taps.len() == self.k * self.k && taps.len() <= f.len() {
            for (fi, t) in f.iter_mut().zip(taps) {
                *fi = t.1;
            }
            if super::depthwise_k512::plane_dx(self, g, &f[..taps.len()], dx) {
                return Ok(());
            }
        }
        self.plane_dx_padded(taps, g, dx, gp)
    }

    /// [`Self::plane_dx_s1`] from the zero-padded gradient in `gp` (on every CPU).
    pub(crate) fn plane_dx_padded(
        &self,
        taps: &[(usize, f32)],
        g: &[f32],
        dx: &mut [f32],
        gp: &mut [f32],
    ) -> Result<()> {
        let k = self.k as isize;
        let pad = Padded::new(self.h, self.w, self.k);
        // gp[r][c] = g[r - (k-1-pt)][c - (k-1-pl)]
        let (top, left) = (k - 1 - self.pt as isize, k - 1 - self.pl as isize);
        pad.fill(g, self.oh, self.ow, top, left, gp);
        sum_taps(gp, pad.wp, taps, self.h, self.w, dx)
    }

    /// For one plane: `dx [h, w] = conv^T(g, f)` (if wanted) and `df [k, k] = sum g * x`.
    /// `gp`: scratch of [`Self::bwd_scratch_len`] floats.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plane_bwd(
        &self,
        x: &[f32],
        f: &[f32],
        dx_taps: &[(usize, f32)],
        g: &[f32],
        dx: Option<&mut [f32]>,
        df: &mut [f32],
        gp: &mut [f32],
    ) -> Result<()> {
        let (k, s, w, ow) = (self.k, self.stride, self.w, self.ow);
        let mut dx = dx;
        if s == 1 {
            let (gp, rest) = gp.split_at_mut(Padded::new(self.h, self.w, self.k).len());
            let (xd, gq) = rest.split_at_mut(self.fwd_scratch_len());
            if let Some(d) = dx.take() {
                self.plane_dx_s1(dx_taps, g, d, gp)?;
            }
            if self.plane_df_s1(x, g, df, xd, gq).is_some() {
                return Ok(());
            }
        }
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
        Ok(())
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

/// The sizes [`DwGeom::plane_df_s1`]'s accumulation walks: kernel side, output rows, output row length
/// rounded up to 8 lanes, and the padded input row length.
#[derive(Clone, Copy)]
struct DfDims {
    k: usize,
    oh: usize,
    ow8: usize,
    wp: usize,
}

multiversion! {
    /// The accumulation of [`DwGeom::plane_df_s1`] for `KK = k * k` taps: per tap, 8 lanes each summing
    /// `g * x` over the rows and 8-column vectors in order (unfused, from +0), then the lanes reduced as
    /// `(a0 + a4 + (a2 + a6)) + (a1 + a5 + (a3 + a7))`. `depthwise_k512::df_acc` does the same on AVX-512.
    fn df_s1_imp(d: DfDims, xd: &[f32], gq: &[f32], df: &mut [f32], kk: usize) {
        match kk {
            1 => df_acc::<1>(d, xd, gq, df),
            9 => df_acc::<9>(d, xd, gq, df),
            _ => df_acc::<25>(d, xd, gq, df),
        }
    }
}

fn df_s1<const KK: usize>(d: DfDims, xd: &[f32], gq: &[f32], df: &mut [f32]) {
    let DfDims { k, oh, ow8, wp } = d;
    if super::depthwise_k512::df_acc((k, oh, ow8, wp), xd, gq, df) {
        return;
    }
    df_s1_imp(d, xd, gq, df, KK)
}

/// [`df_s1`] on the portable kernel only (the reference of the AVX-512 one's bits in the tests).
#[cfg(test)]
pub(crate) fn df_s1_portable(
    (k, oh, ow8, wp): (usize, usize, usize, usize),
    xd: &[f32],
    gq: &[f32],
    df: &mut [f32],
) {
    df_s1_imp(DfDims { k, oh, ow8, wp }, xd, gq, df, k * k)
}

#[inline(always)]
fn df_acc<const KK: usize>(d: DfDims, xd: &[f32], gq: &[f32], df: &mut [f32]) {
    let DfDims { k, oh, ow8, wp } = d;
    let mut acc = [[0f32; 8]; KK];
    for (oy, grow) in gq.chunks_exact(ow8).take(oh).enumerate() {
        for (v, gv) in grow.chunks_exact(8).enumerate() {
            for (t, a) in acc.iter_mut().enumerate() {
                let off = (oy + t / k) * wp + t % k + v * 8;
                let xv = &xd[off..off + 8];
                for l in 0..8 {
                    a[l] += gv[l] * xv[l];
                }
            }
        }
    }
    for (d, a) in df.iter_mut().zip(&acc) {
        let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        *d = (h[0] + h[2]) + (h[1] + h[3]);
    }
}

multiversion! {
    /// Every plane of `x` (`h x w` each) into its [`Padded`] copy in `xp`, shifted by `(top, left)`.
    fn pad_planes(pad: &Padded, x: &[f32], hw: (usize, usize), tl: (isize, isize), xp: &mut [f32]) {
        let (h, w) = hw;
        for (dst, src) in xp.chunks_exact_mut(pad.len()).zip(x.chunks_exact(h * w)) {
            pad.fill(src, h, w, tl.0, tl.1, dst);
        }
    }
}

/// A zero-padded copy of a plane laid out so that a stride-1 `k x k` convolution producing `[oh, ow]`
/// reads every tap as one contiguous run of `chunk(ow)` values that always lies inside it: `oh + k - 1`
/// rows of `wp = ceil(ow / chunk) * chunk + k - 1` values.
#[derive(Debug, Clone, Copy)]
struct Padded {
    rows: usize,
    wp: usize,
}

impl Padded {
    fn new(oh: usize, ow: usize, k: usize) -> Self {
        Self {
            rows: oh + k - 1,
            wp: ow.div_ceil(chunk(ow)) * chunk(ow) + k - 1,
        }
    }

    fn len(&self) -> usize {
        self.rows * self.wp
    }

    /// `dst[r][c] = src[r - top][c - left]` where that lies inside `src [h, w]`, zero elsewhere.
    /// Only the zero border is written besides the copied values, and rows are copied in blocks of 8
    /// (a `memcpy` call per short row costs as much as the convolution).
    #[inline(always)]
    fn fill(&self, src: &[f32], h: usize, w: usize, top: isize, left: isize, dst: &mut [f32]) {
        let c0 = (left.max(0) as usize).min(self.wp);
        let c1 = (left + w as isize).clamp(c0 as isize, self.wp as isize) as usize;
        let s0 = (c0 as isize - left) as usize;
        for (r, row) in dst.chunks_exact_mut(self.wp).take(self.rows).enumerate() {
            let sr = r as isize - top;
            if sr < 0 || sr >= h as isize || c0 == c1 {
                zero_row(row);
                continue;
            }
            let (head, rest) = row.split_at_mut(c0);
            let (mid, tail) = rest.split_at_mut(c1 - c0);
            zero_row(head);
            zero_row(tail);
            copy_row(mid, &src[sr as usize * w + s0..][..c1 - c0]);
        }
    }
}

/// Columns one [`sum_taps`] accumulator covers for output rows `ow` wide.
fn chunk(ow: usize) -> usize {
    match ow {
        0..=8 => 8,
        9..=16 => 16,
        _ => 32,
    }
}

/// `out[oy][x] = sum over taps (off, w), in order, of w * src[oy * wp + x + off]` for an `[oh, ow]`
/// output, from a [`Padded`] source: the accumulators of `chunk(ow)` columns stay in registers. An error
/// when `src` does not hold every tap's run of every chunk or `out` is smaller than `[oh, ow]` ([`Padded`]
/// sizes them: only a bug here can cause it).
fn sum_taps(
    src: &[f32],
    wp: usize,
    taps: &[(usize, f32)],
    oh: usize,
    ow: usize,
    out: &mut [f32],
) -> Result<()> {
    if oh == 0 || ow == 0 {
        return Ok(()); // an empty plane (zero-width input padded to fit the window)
    }
    let c = chunk(ow);
    let max_off = taps.iter().map(|t| t.0).max().unwrap_or(0);
    let need = (oh - 1) * wp + ow.div_ceil(c) * c + max_off;
    if src.len() < need || out.len() < oh * ow {
        candle_core::bail!(
            "{OP}: a padded plane of {} floats for taps reaching {need}, output {} for {oh}x{ow}",
            src.len(),
            out.len()
        )
    }
    // SAFETY: `src` holds every tap's run of every chunk (checked just above).
    unsafe { sum_taps_checked(src, wp, taps, oh, ow, out) };
    Ok(())
}

multiversion_unsafe! {
    /// [`sum_taps`] once its bounds are checked.
    ///
    /// # Safety
    /// `src` must hold `(oh - 1) * wp + ceil(ow / chunk(ow)) * chunk(ow) + max tap offset` floats.
    fn sum_taps_checked(src: &[f32], wp: usize, taps: &[(usize, f32)], oh: usize, ow: usize, out: &mut [f32]) {
        // SAFETY: forwarded contract.
        unsafe {
            match chunk(ow) {
                8 => sum_taps_c::<8>(src, wp, taps, oh, ow, out),
                16 => sum_taps_c::<16>(src, wp, taps, oh, ow, out),
                _ => sum_taps_c::<32>(src, wp, taps, oh, ow, out),
            }
        }
    }
}

/// # Safety
/// As [`sum_taps_checked`].
#[inline(always)]
unsafe fn sum_taps_c<const C: usize>(
    src: &[f32],
    wp: usize,
    taps: &[(usize, f32)],
    oh: usize,
    ow: usize,
    out: &mut [f32],
) {
    let ptr = src.as_ptr();
    for (oy, orow) in out.chunks_exact_mut(ow).take(oh).enumerate() {
        let base = oy * wp;
        for (ci, ochunk) in orow.chunks_mut(C).enumerate() {
            let start = base + ci * C;
            let mut acc = [0f32; C];
            for &(off, w) in taps {
                // SAFETY: `start + off + C <= src.len()` (the caller's contract); plain floats.
                let run = unsafe { ptr.add(start + off).cast::<[f32; C]>().read_unaligned() };
                for (a, &v) in acc.iter_mut().zip(&run) {
                    *a += w * v;
                }
            }
            copy_row(ochunk, &acc);
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
        let mut out = super::par_zeros(g.b * g.c * ohw);
        let taps = g.fwd_taps(f);
        let tk = if g.stride == 1 { kk } else { 0 };
        out.par_chunks_mut(ohw)
            .enumerate()
            .with_min_len(4)
            .try_for_each(|(p, dst)| {
                let ch = p % g.c;
                with_scratch([g.fwd_scratch_len()], |[xd]| {
                    g.plane_fwd(
                        &x[p * hw..(p + 1) * hw],
                        &f[ch * kk..(ch + 1) * kk],
                        &taps[ch * tk..(ch + 1) * tk],
                        dst,
                        xd,
                    )
                })
            })?;
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
        let mut dx = super::par_zeros(if need_dx { planes * hw } else { planes });
        // (hw.max(1): a zero-width input has no dx to write, and chunks must not be empty.)
        let dx_chunk = if need_dx { hw.max(1) } else { 1 };
        let taps = if need_dx { g.dx_taps(fs) } else { Vec::new() };
        let tk = if taps.is_empty() { 0 } else { kk };
        pdf.par_chunks_mut(kk)
            .zip(dx.par_chunks_mut(dx_chunk))
            .enumerate()
            .with_min_len(4)
            .try_for_each(|(p, (df, dxp))| {
                let ch = p % g.c;
                with_scratch([g.bwd_scratch_len()], |[gp]| {
                    g.plane_bwd(
                        &xs[p * hw..(p + 1) * hw],
                        &fs[ch * kk..(ch + 1) * kk],
                        &taps[ch * tk..(ch + 1) * tk],
                        &dys[p * ohw..(p + 1) * ohw],
                        need_dx.then_some(dxp),
                        df,
                        gp,
                    )
                })
            })?;
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
    let g = DwGeom::new((b, c, h, wd), k, stride, pad)?;
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
    use candle_core::{DType, Device};

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
        // Stride 1 runs on zero-padded planes in chunks of 8, 16 or 32 columns: every chunk size, rows
        // wider than one chunk, asymmetric padding, padding wider than the kernel, 1x1 and 5x5.
        check(2, 3, 7, 7, 3, 1, (0, 1, 1, 0));
        check(1, 2, 14, 14, 3, 1, (1, 1, 1, 1));
        check(1, 2, 33, 40, 3, 1, (1, 1, 1, 1));
        check(2, 2, 6, 5, 1, 1, (0, 0, 0, 0));
        check(1, 1, 8, 8, 3, 1, (3, 2, 2, 3));
        check(1, 2, 5, 17, 5, 1, (2, 1, 0, 3));
    }

    #[test]
    fn zero_width_input_padded_to_fit_does_not_panic() {
        let x = candle_core::Var::from_tensor(
            &Tensor::zeros((1, 2, 3, 0), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let f = candle_core::Var::from_tensor(&rand_t(&[2, 1, 3, 3], 12)).unwrap();
        let y = depthwise_conv2d(&x, &f, 1, (1, 1, 1, 2)).unwrap();
        assert_eq!(y.dims(), &[1, 2, 3, 1]);
        assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().dims(), &[1, 2, 3, 0]);
    }

    /// The stride-1 path sums every output in the same order as the general loop: bit-identical.
    #[test]
    fn stride_one_forward_is_bit_identical_to_the_general_loop() {
        for (h, w, k, pad) in [
            (28, 28, 3, (1, 1, 1, 1)),
            (14, 14, 3, (1, 1, 1, 1)),
            (7, 7, 3, (1, 1, 1, 1)),
            (9, 40, 5, (2, 1, 0, 3)),
        ] {
            let (pt, pl, pb, pr) = pad;
            let g = DwGeom {
                b: 1,
                c: 1,
                h,
                w,
                k,
                stride: 1,
                pt,
                pl,
                oh: h + pt + pb - k + 1,
                ow: w + pl + pr - k + 1,
            };
            let x = rand_t(&[h * w], 21).to_vec1::<f32>().unwrap();
            let f = rand_t(&[k * k], 22).to_vec1::<f32>().unwrap();
            let mut fast = vec![f32::NAN; g.oh * g.ow];
            let mut xp = vec![f32::NAN; g.fwd_scratch_len()];
            g.plane_fwd(&x, &f, &g.fwd_taps(&f), &mut fast, &mut xp)
                .unwrap();
            let mut general = vec![0f32; g.oh * g.ow];
            dw_plane_fwd(&g, &x, &f, &mut general, &mut []);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&general), "{h}x{w} k{k} {pad:?}");
        }
    }
}

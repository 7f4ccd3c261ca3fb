//! The separable convolution of a fused block (Keras `SeparableConv2D`: a depthwise `k x k` convolution
//! without bias, then a pointwise 1x1 convolution with the bias and the activation), image by image in
//! cache: the depthwise output of an image goes straight into the pointwise convolution (a direct 1x1
//! convolution, see `direct.rs`) and is never stored for the batch; the backward pass recomputes it, which
//! costs `9` multiply-adds per value, less than storing and reloading it.

use std::mem::MaybeUninit;

use candle_core::Result;
use rayon::prelude::*;

use super::conv::ConvGrads;
use super::depthwise::DwGeom;
use super::{sum_f32, with_scratch, AfterDx, DirectConv, Epilogue, Pad4, GRAD_CHUNK};

/// Geometry of a separable convolution: `[b, c, h, w]` through the depthwise `dw` to `[b, c, oh, ow]`,
/// then the pointwise to `[b, o, oh, ow]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SepGeom {
    pub dw: DwGeom,
    pub o: usize,
}

/// What a call prepares once from the weights for every image.
pub(crate) struct SepKernels {
    /// The depthwise stride-1 taps of every channel (see `DwGeom::fwd_taps`).
    fwd_taps: Vec<(usize, f32)>,
    /// The pointwise convolution `[c, oh, ow] -> [o, oh, ow]`.
    pw: DirectConv,
}

impl SepGeom {
    /// The geometry of `x [b, c, h, w]` through a `k x k` depthwise convolution (`stride`, `pad`) and a
    /// pointwise one to `o` channels.
    pub(crate) fn new(
        dims: (usize, usize, usize, usize),
        k: usize,
        o: usize,
        stride: usize,
        pad: Pad4,
    ) -> Result<Self> {
        if o == 0 {
            candle_core::bail!("separable conv: no output channels")
        }
        Ok(Self {
            dw: DwGeom::new(dims, k, stride, pad)?,
            o,
        })
    }

    pub(crate) fn ohw(&self) -> usize {
        self.dw.oh * self.dw.ow
    }

    pub(crate) fn chw(&self) -> usize {
        self.dw.c * self.dw.h * self.dw.w
    }

    /// Weights of the convolution: the depthwise `[c, 1, k, k]` then the pointwise `[o, c, 1, 1]`.
    pub(crate) fn weight_len(&self) -> usize {
        let d = self.dw;
        d.c * d.k * d.k + self.o * d.c
    }

    /// `w` split into the depthwise and the pointwise weights.
    fn split<'a>(&self, w: &'a [f32]) -> (&'a [f32], &'a [f32]) {
        w.split_at(self.dw.c * self.dw.k * self.dw.k)
    }

    /// The kernels of the weights `w` (depthwise then pointwise, see [`Self::weight_len`]).
    pub(crate) fn kernels(&self, w: &[f32]) -> Result<SepKernels> {
        let d = self.dw;
        let (f, p) = self.split(w);
        Ok(SepKernels {
            fwd_taps: d.fwd_taps(f),
            pw: DirectConv::new((d.c, d.oh, d.ow), p, (self.o, 1), (0, 0, 0, 0))?,
        })
    }

    /// Scratch of [`Self::depthwise_image`]: the padded image for stride 1, one plane's otherwise.
    fn dw_scratch_len(&self) -> usize {
        if self.dw.stride == 1 {
            self.dw.padded_len()
        } else {
            self.dw.fwd_scratch_len()
        }
    }

    /// [`Self::depthwise_image`] straight from the unpadded image where the CPU can
    /// ([`super::depthwise_k512::image_fwd`]: the same bits, no padded copy); `false`, nothing written,
    /// elsewhere.
    fn depthwise_unpadded(&self, xi: &[f32], f: &[f32], dwo: &mut [f32]) -> bool {
        let n = self.dw.c * self.ohw();
        if super::depthwise_k512::image_fwd(&self.dw, xi, f, &mut dwo[..n]) {
            dwo[n..].fill(0.0);
            return true;
        }
        false
    }

    /// The depthwise output of one image `xi [c, h, w]` into `dwo`, which holds the pointwise
    /// convolution's input (`[c, oh, ow]` then slack up to `pw.xp_len`, zeroed). For stride 1, `xd`
    /// holds the padded image afterwards ([`DwGeom::pad_image`]).
    fn depthwise_image(
        &self,
        kern: &SepKernels,
        xi: &[f32],
        f: &[f32],
        dwo: &mut [f32],
        xd: &mut [f32],
    ) -> Result<()> {
        let d = self.dw;
        let (hw, ohw, kk) = (d.h * d.w, self.ohw(), d.k * d.k);
        if d.stride == 1 {
            // The padded image stays in `xd` for the filter gradient; the output is read from the
            // unpadded image where the CPU has AVX-512 (the same bits, `depthwise_k512`).
            d.pad_image(xi, xd);
            if !super::depthwise_k512::image_fwd(&d, xi, f, &mut dwo[..d.c * ohw]) {
                d.image_fwd(xd, &kern.fwd_taps, &mut dwo[..d.c * ohw])?;
            }
            dwo[d.c * ohw..].fill(0.0);
            return Ok(());
        }
        let tk = 0;
        for ch in 0..d.c {
            d.plane_fwd(
                &xi[ch * hw..(ch + 1) * hw],
                &f[ch * kk..(ch + 1) * kk],
                &kern.fwd_taps[ch * tk..(ch + 1) * tk],
                &mut dwo[ch * ohw..(ch + 1) * ohw],
                xd,
            )?;
        }
        dwo[d.c * ohw..].fill(0.0);
        Ok(())
    }

    /// The pointwise convolution of the kernels (its wide layout is that of the output).
    pub(crate) fn pointwise<'a>(&self, kern: &'a SepKernels) -> &'a DirectConv {
        &kern.pw
    }

    /// One image: `wide [o, nwide]` (the wide layout of [`Self::pointwise`]) = the separable
    /// convolution of `xi [c, h, w]` through the epilogue (bias, ReLU, and an affine for inference).
    pub(crate) fn wide_image(
        &self,
        kern: &SepKernels,
        xi: &[f32],
        w: &[f32],
        epi: &Epilogue,
        wide: &mut [f32],
    ) -> Result<()> {
        // SAFETY: `wide_image_uninit` only writes initialised values through it.
        let wide = unsafe { super::uninit_view(wide) };
        self.wide_image_uninit(kern, xi, w, epi, wide)
    }

    /// [`Self::wide_image`] into values not written yet: on `Ok`, the first `pw.out_len()` values of
    /// `wide` are written ([`DirectConv::run_uninit`]).
    pub(crate) fn wide_image_uninit(
        &self,
        kern: &SepKernels,
        xi: &[f32],
        w: &[f32],
        epi: &Epilogue,
        wide: &mut [MaybeUninit<f32>],
    ) -> Result<()> {
        self.with_depthwise(kern, xi, w, |dwo| kern.pw.run_uninit(dwo, epi, wide))
    }

    /// One image straight into the compact `out [o, oh*ow]` (every value written), or `Ok(false)` and
    /// nothing written where the pointwise kernel has no compact stores
    /// ([`DirectConv::run_compact_stores`]).
    pub(crate) fn compact_stores_image(
        &self,
        kern: &SepKernels,
        xi: &[f32],
        w: &[f32],
        epi: &Epilogue,
        out: &mut [MaybeUninit<f32>],
    ) -> Result<bool> {
        if !kern.pw.has_compact_stores() {
            return Ok(false);
        }
        self.with_depthwise(kern, xi, w, |dwo| kern.pw.run_compact_stores(dwo, epi, out))
    }

    /// `then(dwo)` on the depthwise output of one image `xi` (the pointwise convolution's input).
    fn with_depthwise<R>(
        &self,
        kern: &SepKernels,
        xi: &[f32],
        w: &[f32],
        then: impl FnOnce(&[f32]) -> Result<R>,
    ) -> Result<R> {
        let pw = &kern.pw;
        let (f, _) = self.split(w);
        with_scratch([self.dw_scratch_len(), pw.xp_len], |[xd, dwo]| {
            if !self.depthwise_unpadded(xi, f, dwo) {
                self.depthwise_image(kern, xi, f, dwo, xd)?;
            }
            then(dwo)
        })
    }

    /// One image: `dst [o, oh*ow]` = [`Self::wide_image`], compacted (see [`Self::forward_image_uninit`]).
    pub(crate) fn forward_image(
        &self,
        kern: &SepKernels,
        xi: &[f32],
        w: &[f32],
        epi: &Epilogue,
        dst: &mut [f32],
    ) -> Result<()> {
        // SAFETY: `forward_image_uninit` only writes initialised values through it.
        let dst = unsafe { super::uninit_view(dst) };
        self.forward_image_uninit(kern, xi, w, epi, dst)
    }

    /// One image: `dst [o, oh*ow]` = [`Self::wide_image`] compacted, all `o * oh * ow` values written
    /// (on `Ok`): by the pointwise kernel in place where its wide layout is the compact one, else with
    /// its compact stores where the CPU has them ([`Self::compact_stores_image`]), else through a wide
    /// scratch and a copy.
    pub(crate) fn forward_image_uninit(
        &self,
        kern: &SepKernels,
        xi: &[f32],
        w: &[f32],
        epi: &Epilogue,
        dst: &mut [MaybeUninit<f32>],
    ) -> Result<()> {
        let pw = &kern.pw;
        if pw.wide_is_compact() && dst.len() == pw.out_len() {
            return self.wide_image_uninit(kern, xi, w, epi, dst);
        }
        if self.compact_stores_image(kern, xi, w, epi, dst)? {
            return Ok(());
        }
        with_scratch([pw.out_len()], |[wide]| {
            self.wide_image(kern, xi, w, epi, wide)?;
            pw.compact_into_uninit(wide, dst);
            Ok(())
        })
    }

    /// The whole batch into `out [b, o, oh*ow]`, images in parallel.
    pub(crate) fn forward_into(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<()> {
        let kern = self.kernels(w)?;
        let epi = Epilogue {
            bias,
            relu,
            affine: None,
        };
        let (chw, per) = (self.chw(), self.o * self.ohw());
        out.par_chunks_mut(per)
            .enumerate()
            .try_for_each(|(i, dst)| {
                self.forward_image(&kern, &x[i * chw..(i + 1) * chw], w, &epi, dst)
            })
    }

    /// The backward pass given the gradient at the pointwise convolution's (pre-activation) output:
    /// `fill_g(i, g)` writes image `i`'s `g [o, oh*ow]`, `after_dx(i, dx_i)` is called with each image's dx
    /// once written. Returns `(dx if need_dx, dw, db)` with `dw` the
    /// depthwise then the pointwise weights' gradients (db zeros unless need_db); `dw` and `db` are reduced over fixed chunks of
    /// [`GRAD_CHUNK`] images in chunk order (thread-count independent).
    pub(crate) fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        need_dx: bool,
        need_db: bool,
        fill_g: &(dyn Fn(usize, &mut [f32]) + Sync),
        after_dx: Option<&AfterDx<'_>>,
    ) -> Result<ConvGrads> {
        let d = self.dw;
        let (c, o, kk) = (d.c, self.o, d.k * d.k);
        let (ohw, chw, hw) = (self.ohw(), self.chw(), d.h * d.w);
        let (f, p) = self.split(w);
        let kern = self.kernels(w)?;
        let pw = &kern.pw;
        // d(depthwise output) = pointwise^T(g): the 1x1 convolution with the transposed weights.
        let pw_t = DirectConv::input_grad_of((c, d.oh, d.ow), p, (o, 1), (0, 0, 0, 0))?
            .ok_or_else(|| candle_core::Error::msg("separable conv: no transposed pointwise"))?;
        let dx_taps = if need_dx { d.dx_taps(f) } else { Vec::new() };
        let tk = if dx_taps.is_empty() { 0 } else { kk };
        let nw = self.weight_len();
        let nchunks = d.b.div_ceil(GRAD_CHUNK);
        let mut pdw = vec![0f32; nchunks * nw];
        let mut pdb = vec![0f32; nchunks * o];
        let dx_chunk = if need_dx { GRAD_CHUNK * chw } else { 1 };
        // Every value of dx is written below (`image_dx` and `plane_bwd` write whole planes), so it
        // starts as a recycled buffer instead of zeros.
        let mut dx = super::take_buf(if need_dx { d.b * chw } else { nchunks });
        // `gbuf` holds the output gradient and then as much of what follows it as the transposed
        // pointwise convolution reads (`DirectConv::padded`: it pads nothing, so it reads `gbuf` in place
        // where its input is the compact layout; the values past the gradient only meet outputs that
        // are never read).
        let lens = [
            (o * ohw).max(pw_t.xp_len),
            self.dw_scratch_len(),
            pw.xp_len,
            pw.out_len(),
            pw_t.xp_len,
            pw_t.out_len(),
            c * ohw,
            d.bwd_scratch_len(),
        ];
        pdw.par_chunks_mut(nw)
            .zip(pdb.par_chunks_mut(o))
            .zip(dx.par_chunks_mut(dx_chunk))
            .enumerate()
            .try_for_each(|(ch, ((dw, db), dxc))| {
                let i0 = ch * GRAD_CHUNK;
                let i1 = (i0 + GRAD_CHUNK).min(d.b);
                let (ddw, dpw) = dw.split_at_mut(c * kk);
                with_scratch(lens, |[gfull, xd, dwo, gwide, gxp, dwide, ddwo, gp]| {
                    let mut df = vec![0f32; c * kk];
                    for i in i0..i1 {
                        let xi = &x[i * chw..(i + 1) * chw];
                        let gbuf = &mut gfull[..o * ohw];
                        fill_g(i, gbuf);
                        if need_db {
                            for (oc, row) in gbuf.chunks_exact(ohw).enumerate() {
                                db[oc] += sum_f32(row) as f32;
                            }
                        }
                        // The filter gradient reads the unpadded image where it can; otherwise the
                        // recomputation leaves the padded image in `xd` for it.
                        let x_rest = &x[i * chw..];
                        let unpadded_df = d.df_reads_unpadded(x_rest.len());
                        // The pointwise weights' gradient, from the recomputed depthwise output.
                        if !(unpadded_df && self.depthwise_unpadded(xi, f, dwo)) {
                            self.depthwise_image(&kern, xi, f, dwo, xd)?;
                        }
                        let gw = pw.wide_grad(gbuf, gwide);
                        pw.weight_grad(dwo, gw, dpw)?;
                        // The gradient at the depthwise output.
                        let gx = pw_t.padded(gfull, gxp);
                        pw_t.run_compact(gx, &Epilogue::default(), dwide, ddwo)?;
                        if d.stride == 1 {
                            let (gq, gpl) = gp.split_at_mut(d.oh * d.ow.div_ceil(8) * 8);
                            let df_done = if unpadded_df {
                                d.image_df_unpadded(x_rest, ddwo, &mut df, gq)
                            } else {
                                // The padded image of the recomputation is still in `xd`.
                                d.image_df(xd, ddwo, &mut df, gq)
                            };
                            if df_done.is_some() {
                                for (a, b) in ddw.iter_mut().zip(&df) {
                                    *a += b;
                                }
                                if need_dx {
                                    let dxi = &mut dxc[(i - i0) * chw..(i - i0 + 1) * chw];
                                    d.image_dx(&dx_taps, ddwo, dxi, gpl)?;
                                    if let Some(hook) = after_dx {
                                        hook(i, dxi);
                                    }
                                }
                                continue;
                            }
                        }
                        for chn in 0..c {
                            let dfc = &mut df[..kk];
                            let dxp = need_dx.then(|| {
                                &mut dxc[(i - i0) * chw + chn * hw..(i - i0) * chw + (chn + 1) * hw]
                            });
                            d.plane_bwd(
                                &xi[chn * hw..(chn + 1) * hw],
                                &f[chn * kk..(chn + 1) * kk],
                                &dx_taps[chn * tk..(chn + 1) * tk],
                                &ddwo[chn * ohw..(chn + 1) * ohw],
                                dxp,
                                dfc,
                                gp,
                            )?;
                            for (a, b) in ddw[chn * kk..(chn + 1) * kk].iter_mut().zip(dfc.iter()) {
                                *a += b;
                            }
                        }
                        if let (Some(hook), true) = (after_dx, need_dx) {
                            hook(i, &dxc[(i - i0) * chw..(i - i0 + 1) * chw]);
                        }
                    }
                    Ok::<(), candle_core::Error>(())
                })
            })?;
        let mut dw = vec![0f32; nw];
        for part in pdw.chunks_exact(nw) {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        let mut db = vec![0f32; o];
        for part in pdb.chunks_exact(o) {
            db.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        Ok((need_dx.then_some(dx), dw, db))
    }
}

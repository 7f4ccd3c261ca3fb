//! The backward pass of the direct stride-1 convolution of `direct.rs`, for training.
//!
//! - Input gradient: for stride 1, `dx = conv(pad(g), flip(w)^T)`, itself a direct convolution of the
//!   output gradient (padded by `k - 1 - pad` on each side) with the kernel flipped in both spatial axes
//!   and its channel axes swapped ([`DirectConv::input_grad_of`]).
//! - Weight gradient: `dw[o, (c, ky, kx)] = sum_n g[o, n] * xp[toff + n]` in the wide layout (`g` is zero in
//!   the columns that are not outputs), a register-blocked product of `OB` output channels by `TB` taps
//!   with 8-lane accumulators, summed across lanes in a fixed tree ([`DirectConv::weight_grad`]). On
//!   AVX-512 machines a 16-lane register holds two output channels' 8-lane accumulators side by side
//!   (a tile of 4 channels by 12 taps), each lane summing the same products in the same order as the AVX2
//!   tile, so both give the same bits; machines without AVX2 + FMA run a portable copy of it (plain
//!   multiply-add: it differs by rounding).

use std::mem::MaybeUninit;

use candle_core::Result;

use super::direct::{DirectConv, Epilogue};
use super::{copy_row, multiversion, write_row, zero_row, Pad4};

/// Lanes of the weight-gradient accumulators (one AVX2 vector).
const L: usize = 8;
/// Output channels and taps per weight-gradient tile: 2 x 6 accumulators, 2 gradient loads and one input
/// load per step fit the 16 AVX2 registers.
const OB: usize = 2;
const TB: usize = 6;

impl DirectConv {
    /// The convolution that computes the input gradient of the stride-1 convolution of `[c, h, w]` images
    /// with `weight [o, c, k, k]` and padding `pad`: its input is the output gradient `[o, oh, ow]`, its
    /// output `[c, h, w]`. `None` when a side's padding exceeds `k - 1` (no such direct form).
    pub(crate) fn input_grad_of(
        (c, h, w): (usize, usize, usize),
        weight: &[f32],
        (o, k): (usize, usize),
        pad: Pad4,
    ) -> Result<Option<Self>> {
        let (pt, pl, pb, pr) = pad;
        if [pt, pl, pb, pr].iter().any(|&p| p > k - 1) || weight.len() != o * c * k * k {
            return Ok(None);
        }
        let (oh, ow) = (
            (h + pt + pb + 1).saturating_sub(k),
            (w + pl + pr + 1).saturating_sub(k),
        );
        let gpad = (k - 1 - pt, k - 1 - pl, k - 1 - pb, k - 1 - pr);
        let dc = DirectConv::new((o, oh, ow), &flipped(weight, (o, c, k)), (c, k), gpad)?;
        debug_assert_eq!((dc.oh, dc.ow), (h, w));
        Ok(Some(dc))
    }

    /// The input gradient of this convolution (stride 1, unpadded, `weight [o, c, k, k]` with
    /// `k >= 2`) over the output gradient in the shared-padding layout of [`SharedGrad`], which is also
    /// the wide layout that [`Self::weight_grad_planes`] reads: no padded copy of the gradient, no
    /// spread copy, and the input gradient comes out in compact rows. `None` for other geometries (the
    /// padded [`Self::input_grad_of`] serves them).
    pub(crate) fn input_grad_shared(&self, weight: &[f32], k: usize) -> Result<Option<SharedGrad>> {
        let (c, h, w, o, oh, ow) = (self.c, self.h, self.w, self.o, self.oh, self.ow);
        let unpadded = self.pt == 0 && self.pl == 0 && self.hp == h && self.wp == w;
        // The weight gradient reads `nwide` columns from the first row: those past the last row must
        // be the zero rows below it.
        if !unpadded
            || k < 2
            || weight.len() != o * c * k * k
            || ow + k - 1 != w
            || self.nwide > (oh + k - 1) * w
        {
            return Ok(None);
        }
        let lead = k - 1;
        let rows = oh + 2 * (k - 1);
        let dx = DirectConv::new(
            (o, rows, w),
            &flipped(weight, (o, c, k)),
            (c, k),
            (0, 0, 0, 0),
        )?
        .all_columns(lead);
        debug_assert_eq!((dx.oh, dx.ow), (h, w));
        Ok(Some(SharedGrad {
            first: lead + (k - 1) * w,
            plane: rows * w,
            dx,
            rows: (oh, ow, w),
        }))
    }

    /// `dw [o, taps] += sum over the wide columns n of g[oc, n] * xp[toff[t] + n]`: the weight gradient
    /// of this convolution for one image, from its padded input `xp` ([`DirectConv::pad_into`]) and the
    /// gradient at its output in the wide layout `g [o, nwide]`, zero in the columns that are not
    /// outputs (see [`DirectConv::spread_into`]). An error when a buffer is too small (only a bug here
    /// can cause it).
    pub(crate) fn weight_grad(&self, xp: &[f32], g: &[f32], dw: &mut [f32]) -> Result<()> {
        self.weight_grad_planes(xp, g, self.nwide, dw)
    }

    /// [`Self::weight_grad`] with the gradient's planes `stride` floats apart (at least `nwide`): plane
    /// `oc` is `g[oc * stride..][..nwide]`, as in the shared-padding layout of
    /// [`Self::input_grad_shared`].
    pub(crate) fn weight_grad_planes(
        &self,
        xp: &[f32],
        g: &[f32],
        stride: usize,
        dw: &mut [f32],
    ) -> Result<()> {
        let taps = self.toff.len();
        let n = self.nwide;
        if xp.len() < self.xp_len
            || stride < n
            || g.len() < (self.o - 1) * stride + n
            || dw.len() < self.o * taps
            || !n.is_multiple_of(L)
            || self.toff.iter().any(|&off| off + n > self.xp_len)
        {
            candle_core::bail!(
                "direct conv weight gradient: buffers {} / {} (planes {stride} apart) / {} for [{}, \
                 {taps}] over {n} columns",
                xp.len(),
                g.len(),
                dw.len(),
                self.o
            )
        }
        let g = (g, stride);
        #[cfg(target_arch = "x86_64")]
        if super::has_avx512() {
            // SAFETY: AVX-512F, AVX2 and FMA are present (checked just above); the bounds hold.
            unsafe { avx512::weight_grad(self, xp, g, dw) };
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are present (checked just above); the bounds hold (checked above).
            unsafe { avx2::weight_grad(self, xp, g, dw) };
            return Ok(());
        }
        // SAFETY: the bounds hold (checked above).
        unsafe { portable::weight_grad(self, xp, g, dw) };
        Ok(())
    }

    /// `g [o, nwide]` in the wide layout from the compact `src [o, oh*ow]`, zeros elsewhere.
    pub(crate) fn spread_into(&self, src: &[f32], g: &mut [f32]) {
        let (ow, wp, n, ohw) = (self.ow, self.wp, self.nwide, self.oh * self.ow);
        for (dst, s) in g
            .chunks_exact_mut(n)
            .zip(src.chunks_exact(ohw))
            .take(self.o)
        {
            let (rows, rest) = dst.split_at_mut(self.oh * wp);
            if wp == ow {
                copy_row(rows, s);
            } else {
                for (drow, srow) in rows.chunks_exact_mut(wp).zip(s.chunks_exact(ow)) {
                    let (a, b) = drow.split_at_mut(ow);
                    copy_row(a, srow);
                    zero_row(b);
                }
            }
            zero_row(rest);
        }
    }

    /// The gradient `g [o, oh*ow]` in the wide layout that [`Self::weight_grad`] reads: `g` itself where
    /// the wide layout is the compact one ([`Self::wide_is_compact`]), else spread into `buf`
    /// ([`Self::spread_into`], [`Self::out_len`] floats).
    pub(crate) fn wide_grad<'a>(&self, g: &'a [f32], buf: &'a mut [f32]) -> &'a [f32] {
        if self.wide_is_compact() && g.len() == self.out_len() {
            return g;
        }
        self.spread_into(g, buf);
        buf
    }

    /// True when the wide layout is the compact one: no discarded columns (`wp == ow`) and no tail
    /// (`nwide == oh * ow`), as for a 1x1 convolution of 24x24, 12x12 or 8x8 planes.
    pub(crate) fn wide_is_compact(&self) -> bool {
        self.wp == self.ow && self.nwide == self.oh * self.ow
    }

    /// `dst [o, oh*ow] = epilogue(conv(xp))`, see [`Self::run_compact_uninit`].
    pub(crate) fn run_compact(
        &self,
        xp: &[f32],
        epi: &Epilogue,
        wide: &mut [f32],
        dst: &mut [f32],
    ) -> Result<()> {
        // SAFETY: `run_compact_uninit` only writes initialised values through it.
        let dst = unsafe { super::uninit_view(dst) };
        self.run_compact_uninit(xp, epi, wide, dst)
    }

    /// `dst [o, oh*ow] = epilogue(conv(xp))`, all `o * oh * ow` values written (on `Ok`): straight into
    /// `dst` where the wide layout is the compact one ([`Self::wide_is_compact`]), else with compact
    /// stores where the CPU has them ([`Self::run_compact_stores`]), else into the scratch `wide`
    /// ([`Self::out_len`]) and then [`Self::compact_into_uninit`]. The same values every way.
    pub(crate) fn run_compact_uninit(
        &self,
        xp: &[f32],
        epi: &Epilogue,
        wide: &mut [f32],
        dst: &mut [MaybeUninit<f32>],
    ) -> Result<()> {
        if self.wide_is_compact() && dst.len() == self.out_len() {
            return self.run_uninit(xp, epi, dst);
        }
        if self.run_compact_stores(xp, epi, dst)? {
            return Ok(());
        }
        self.run(xp, epi, wide)?;
        self.compact_into_uninit(wide, dst);
        Ok(())
    }

    /// `dst [o, oh*ow]` from the wide output `wide [o, nwide]` of [`DirectConv::run`] (the kernels'
    /// callers go through [`Self::run_compact_uninit`]; the tests compare against this).
    #[cfg(test)]
    pub(crate) fn compact_into(&self, wide: &[f32], dst: &mut [f32]) {
        // SAFETY: `compact_into_uninit` only writes initialised values through it.
        let dst = unsafe { super::uninit_view(dst) };
        self.compact_into_uninit(wide, dst);
    }

    /// [`Self::compact_into`] into values not written yet: when `dst` holds `o * oh * ow` values and
    /// `wide` at least `o * nwide`, every value of `dst` is written.
    pub(crate) fn compact_into_uninit(&self, wide: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let (ohw, ow, wp) = (self.oh * self.ow, self.ow, self.wp);
        debug_assert!(dst.len() == self.o * ohw && wide.len() >= self.o * self.nwide);
        compact_planes(dst, wide, (self.o, ohw, self.nwide), (ow, wp));
    }
}

/// `flipped [c, o, k, k]` with `flipped[ci, oc, ky, kx] = weight[oc, ci, k-1-ky, k-1-kx]`: the weights
/// of a convolution's input-gradient convolution.
fn flipped(weight: &[f32], (o, c, k): (usize, usize, usize)) -> Vec<f32> {
    let kk = k * k;
    let mut flipped = vec![0f32; weight.len()];
    for oc in 0..o {
        for ci in 0..c {
            for t in 0..kk {
                flipped[(ci * o + oc) * kk + t] = weight[(oc * c + ci) * kk + (kk - 1 - t)];
            }
        }
    }
    flipped
}

/// The output gradient `[o, oh, ow]` of an unpadded stride-1 `k x k` convolution of `w`-wide images,
/// laid out for both of its backward convolutions ([`DirectConv::input_grad_shared`]): `k - 1` zeros,
/// then `o` planes of `oh + 2(k-1)` rows of `w` floats: `k - 1` zero rows, the gradient's `oh` rows each
/// followed by `k - 1` zeros (the forward convolution's wide layout), `k - 1` zero rows. Each row's
/// trailing zeros are also the next row's left padding, so the input-gradient convolution `dx` reads
/// its zero-padded input from here with every one of its `w` output columns valid, and the weight
/// gradient reads its wide gradient from the first data row on, planes [`Self::plane`] apart.
#[derive(Debug, Clone)]
pub(crate) struct SharedGrad {
    /// The input-gradient convolution over this layout (`[o, ..] -> [c, h, w]`, compact rows).
    pub dx: DirectConv,
    /// Offset of plane 0's first gradient row.
    pub first: usize,
    /// Distance between planes.
    pub plane: usize,
    /// The gradient's rows, their length and the row stride `(oh, ow, w)`.
    rows: (usize, usize, usize),
}

impl SharedGrad {
    /// Length of the layout's buffer (what `dx` reads).
    pub(crate) fn len(&self) -> usize {
        self.dx.xp_len
    }

    /// Writes one image's compact gradient `g [o, oh*ow]` into its rows of `buf` ([`Self::len`]
    /// floats). Only those values are written: the zeros around them must be there already (`buf`
    /// zeroed once, then only ever written by this).
    pub(crate) fn fill(&self, g: &[f32], buf: &mut [f32]) {
        let (oh, ow, w) = self.rows;
        for (oc, plane) in g.chunks_exact(oh * ow).enumerate() {
            let start = self.first + oc * self.plane;
            let dst = &mut buf[start..start + oh * w];
            for (drow, srow) in dst.chunks_exact_mut(w).zip(plane.chunks_exact(ow)) {
                copy_row(&mut drow[..ow], srow);
            }
        }
    }

    /// The gradient planes as [`DirectConv::weight_grad_planes`] reads them ([`Self::plane`] apart).
    pub(crate) fn planes<'a>(&self, buf: &'a [f32]) -> &'a [f32] {
        &buf[self.first..]
    }
}

multiversion! {
    /// [`DirectConv::compact_into_uninit`]'s copy (vectorised where the CPU can): `o` planes of `ohw`
    /// values in `dst`, each from the rows of `wp` values of a `nwide` plane of `wide`.
    fn compact_planes(
        dst: &mut [MaybeUninit<f32>],
        wide: &[f32],
        planes: (usize, usize, usize),
        rows: (usize, usize),
    ) {
        let ((o, ohw, nwide), (ow, wp)) = (planes, rows);
        for (plane, src) in dst.chunks_exact_mut(ohw).zip(wide.chunks(nwide)).take(o) {
            if wp == ow {
                write_row(plane, src);
                continue;
            }
            // Rows of `wp >= ow` values: `nwide >= oh * wp` gives every one of the `oh` rows its own.
            for (row, srow) in plane.chunks_exact_mut(ow).zip(src.chunks(wp)) {
                write_row(row, srow);
            }
        }
    }
}

/// The sum of the 8 lanes, in a fixed order: `((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`, the order
/// the AVX2 code's shuffles add them in.
#[inline(always)]
fn hsum(v: [f32; L]) -> f32 {
    let a = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

/// The tiles of the output channels from `$from` on: `OB` channels (fewer in the last) by `TB` taps
/// (fewer in the last).
macro_rules! tiles {
    ($dc:expr, $tile:ident, $xp:expr, $g:expr, $dw:expr, $from:expr) => {{
        let (o, taps) = ($dc.o, $dc.toff.len());
        let mut o0 = $from;
        while o0 < o {
            let ob = (o - o0).min($crate::ops::direct_grad::OB);
            let mut t0 = 0;
            while t0 < taps {
                let tb = (taps - t0).min($crate::ops::direct_grad::TB);
                match (ob, tb) {
                    (2, 6) => $tile::<2, 6>($dc, $xp, $g, $dw, o0, t0),
                    (2, 5) => $tile::<2, 5>($dc, $xp, $g, $dw, o0, t0),
                    (2, 4) => $tile::<2, 4>($dc, $xp, $g, $dw, o0, t0),
                    (2, 3) => $tile::<2, 3>($dc, $xp, $g, $dw, o0, t0),
                    (2, 2) => $tile::<2, 2>($dc, $xp, $g, $dw, o0, t0),
                    (2, _) => $tile::<2, 1>($dc, $xp, $g, $dw, o0, t0),
                    (_, 6) => $tile::<1, 6>($dc, $xp, $g, $dw, o0, t0),
                    (_, 5) => $tile::<1, 5>($dc, $xp, $g, $dw, o0, t0),
                    (_, 4) => $tile::<1, 4>($dc, $xp, $g, $dw, o0, t0),
                    (_, 3) => $tile::<1, 3>($dc, $xp, $g, $dw, o0, t0),
                    (_, 2) => $tile::<1, 2>($dc, $xp, $g, $dw, o0, t0),
                    (_, _) => $tile::<1, 1>($dc, $xp, $g, $dw, o0, t0),
                }
                t0 += tb;
            }
            o0 += ob;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{hsum, DirectConv, L};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA must be present; the buffers must be as [`DirectConv::weight_grad`] checks them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weight_grad(
        dc: &DirectConv,
        xp: &[f32],
        g: (&[f32], usize),
        dw: &mut [f32],
    ) {
        // SAFETY: forwarded contract.
        unsafe { weight_grad_from(dc, xp, g, dw, 0) }
    }

    /// [`weight_grad`] of the output channels from `o0` on.
    ///
    /// # Safety
    /// As [`weight_grad`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weight_grad_from(
        dc: &DirectConv,
        xp: &[f32],
        (g, gs): (&[f32], usize),
        dw: &mut [f32],
        o0: usize,
    ) {
        // SAFETY: forwarded contract.
        unsafe { tiles!(dc, tile, xp, (g, gs), dw, o0) }
    }

    /// One tile of `OB2` channels from `o0` by `TB2` taps from `t0`.
    ///
    /// # Safety
    /// As [`weight_grad`], with `o0 + OB2 <= o` and `t0 + TB2 <= taps`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const OB2: usize, const TB2: usize>(
        dc: &DirectConv,
        xp: &[f32],
        (g, gs): (&[f32], usize),
        dw: &mut [f32],
        o0: usize,
        t0: usize,
    ) {
        let n = dc.nwide;
        let taps = dc.toff.len();
        let offs: [usize; TB2] = std::array::from_fn(|t| dc.toff[t0 + t]);
        let (xptr, gptr) = (xp.as_ptr(), g.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); TB2]; OB2];
        for v in (0..n).step_by(L) {
            // SAFETY: `(o0 + j) * gs + v + L <= (o - 1) * gs + n <= g.len()` and `off + v + L <= off + n <= xp.len()`.
            let gv: [__m256; OB2] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(gptr.add((o0 + j) * gs + v)) });
            for (t, &off) in offs.iter().enumerate() {
                // SAFETY: as above.
                let xv = unsafe { _mm256_loadu_ps(xptr.add(off + v)) };
                for (j, a) in acc.iter_mut().enumerate() {
                    a[t] = _mm256_fmadd_ps(gv[j], xv, a[t]);
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (t, &v) in a.iter().enumerate() {
                let mut lanes = [0f32; L];
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                dw[(o0 + j) * taps + t0 + t] += hsum(lanes);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{DirectConv, L};
    use std::arch::x86_64::*;

    /// Taps per AVX-512 tile: 2 x 12 accumulators, 2 gradient registers and one input register fit the
    /// 32 AVX-512 registers.
    const TB: usize = 12;

    /// # Safety
    /// AVX-512F, AVX2 and FMA must be present; the buffers must be as [`DirectConv::weight_grad`] checks
    /// them.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn weight_grad(
        dc: &DirectConv,
        xp: &[f32],
        g: (&[f32], usize),
        dw: &mut [f32],
    ) {
        let (o, taps) = (dc.o, dc.toff.len());
        let mut o0 = 0;
        // Channel pairs, two at a time (four channels per tile) while there are.
        while o0 + 2 <= o {
            let pairs = ((o - o0) / 2).min(2);
            let mut t0 = 0;
            while t0 < taps {
                let tb = (taps - t0).min(TB);
                // SAFETY: forwarded contract; `o0 + 2 * pairs <= o`, `t0 + tb <= taps`.
                unsafe {
                    match pairs {
                        2 => tile_pairs!(2, tb, dc, xp, g, dw, o0, t0),
                        _ => tile_pairs!(1, tb, dc, xp, g, dw, o0, t0),
                    }
                }
                t0 += tb;
            }
            o0 += 2 * pairs;
        }
        // An odd last channel: the AVX2 tiles (the same sums).
        if o0 < o {
            // SAFETY: forwarded contract (AVX2 and FMA are present).
            unsafe { super::avx2::weight_grad_from(dc, xp, g, dw, o0) };
        }
    }

    /// One tile of `P` channel pairs from `o0` by `TB2` taps from `t0`: the accumulator of pair `p` and
    /// tap `t` holds channel `o0 + 2p` in lanes 0-7 and channel `o0 + 2p + 1` in lanes 8-15.
    ///
    /// # Safety
    /// As [`weight_grad`], with `o0 + 2 * P <= o` and `t0 + TB2 <= taps`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile<const P: usize, const TB2: usize>(
        dc: &DirectConv,
        xp: &[f32],
        (g, gs): (&[f32], usize),
        dw: &mut [f32],
        o0: usize,
        t0: usize,
    ) {
        let n = dc.nwide;
        let taps = dc.toff.len();
        let offs: [usize; TB2] = std::array::from_fn(|t| dc.toff[t0 + t]);
        let (xptr, gptr) = (xp.as_ptr(), g.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); TB2]; P];
        for v in (0..n).step_by(L) {
            // SAFETY: `(o0 + 2p + 1) * gs + v + L <= (o - 1) * gs + n <= g.len()`.
            let gv: [__m512; P] = std::array::from_fn(|p| unsafe {
                let lo = _mm256_loadu_ps(gptr.add((o0 + 2 * p) * gs + v));
                let hi = _mm256_loadu_ps(gptr.add((o0 + 2 * p + 1) * gs + v));
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castps_pd(_mm512_castps256_ps512(lo)),
                    _mm256_castps_pd(hi),
                ))
            });
            for (t, &off) in offs.iter().enumerate() {
                // SAFETY: `off + v + L <= off + n <= xp.len()`; the same 8 inputs in both halves.
                let xv = unsafe {
                    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(
                        xptr.add(off + v),
                    ))))
                };
                for (p, a) in acc.iter_mut().enumerate() {
                    a[t] = _mm512_fmadd_ps(gv[p], xv, a[t]);
                }
            }
        }
        // Each half of each accumulator summed as `hsum` sums it, eight accumulators at a time, and
        // added to its channel's row of dw.
        let dwp = dw.as_mut_ptr();
        for (p, a) in acc.iter().enumerate() {
            let rows = [(o0 + 2 * p) * taps + t0, (o0 + 2 * p + 1) * taps + t0];
            for t in (0..TB2).step_by(L) {
                let r = (TB2 - t).min(L);
                let group =
                    std::array::from_fn(|k| a.get(t + k).copied().unwrap_or(_mm512_setzero_ps()));
                let sums = hsum8x2(group);
                if r == L {
                    for (half, &row) in rows.iter().enumerate() {
                        // SAFETY: `row + t + 8 <= row + TB2 <= (channel + 1) * taps <= dw.len()`
                        // (`t0 + TB2 <= taps`).
                        unsafe {
                            let d = dwp.add(row + t);
                            let h = _mm512_castps_pd(sums);
                            let v = _mm256_castpd_ps(if half == 0 {
                                _mm512_castpd512_pd256(h)
                            } else {
                                _mm512_extractf64x4_pd::<1>(h)
                            });
                            _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), v));
                        }
                    }
                } else {
                    let mut halves = [[0f32; L]; 2];
                    // SAFETY: `halves` holds 16 contiguous floats.
                    unsafe { _mm512_storeu_ps(halves.as_mut_ptr().cast(), sums) };
                    for (half, &row) in halves.iter().zip(&rows) {
                        for (k, &v) in half[..r].iter().enumerate() {
                            dw[row + t + k] += v;
                        }
                    }
                }
            }
        }
    }

    /// `hsum` of both 8-lane halves of eight vectors at once: lane `k` of the result is `hsum` of lanes
    /// 0-7 of `a[k]`, lane `8 + k` that of its lanes 8-15, every sum formed with the same additions in
    /// the same order as `hsum` (so the same bits).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn hsum8x2(a: [__m512; 8]) -> __m512 {
        // In this order the sums come out in `a`'s order (see the lanes below).
        let i = [a[0], a[4], a[1], a[5], a[2], a[6], a[3], a[7]];
        // Lanes j + lanes j + 4 of each half: [x lo half | x hi half | y lo half | y hi half], each
        // block [l0+l4, l1+l5, l2+l6, l3+l7].
        let quads = |x, y| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        };
        let (u01, u23, u45, u67) = (
            quads(i[0], i[1]),
            quads(i[2], i[3]),
            quads(i[4], i[5]),
            quads(i[6], i[7]),
        );
        // (l0+l4)+(l2+l6) and (l1+l5)+(l3+l7): per block [P's two, Q's two].
        let pairs = |p, q| {
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(p, q),
                _mm512_shuffle_ps::<0xEE>(p, q),
            )
        };
        let (w0, w1) = (pairs(u01, u23), pairs(u45, u67));
        // The two added: blocks [a0..a3 lo halves | a0..a3 hi halves | a4..a7 lo | a4..a7 hi].
        let r = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(w0, w1),
            _mm512_shuffle_ps::<0xDD>(w0, w1),
        );
        _mm512_shuffle_f32x4::<0b11_01_10_00>(r, r)
    }

    /// `tile::<$p, tb>` for a run-time `tb` in 1..=12.
    macro_rules! tile_pairs {
        ($p:literal, $tb:expr, $($arg:expr),*) => {
            match $tb {
                12 => tile::<$p, 12>($($arg),*),
                11 => tile::<$p, 11>($($arg),*),
                10 => tile::<$p, 10>($($arg),*),
                9 => tile::<$p, 9>($($arg),*),
                8 => tile::<$p, 8>($($arg),*),
                7 => tile::<$p, 7>($($arg),*),
                6 => tile::<$p, 6>($($arg),*),
                5 => tile::<$p, 5>($($arg),*),
                4 => tile::<$p, 4>($($arg),*),
                3 => tile::<$p, 3>($($arg),*),
                2 => tile::<$p, 2>($($arg),*),
                _ => tile::<$p, 1>($($arg),*),
            }
        };
    }
    use tile_pairs;
}

mod portable {
    use super::{hsum, DirectConv, L};

    /// # Safety
    /// The buffers must be as [`DirectConv::weight_grad`] checks them (this copy indexes them checked,
    /// it is `unsafe` only to share the caller's contract with the AVX2 copy).
    pub(super) unsafe fn weight_grad(
        dc: &DirectConv,
        xp: &[f32],
        g: (&[f32], usize),
        dw: &mut [f32],
    ) {
        tiles!(dc, tile, xp, g, dw, 0)
    }

    fn tile<const OB2: usize, const TB2: usize>(
        dc: &DirectConv,
        xp: &[f32],
        (g, gs): (&[f32], usize),
        dw: &mut [f32],
        o0: usize,
        t0: usize,
    ) {
        let n = dc.nwide;
        let taps = dc.toff.len();
        let mut acc = [[[0f32; L]; TB2]; OB2];
        for v in (0..n).step_by(L) {
            for t in 0..TB2 {
                let off = dc.toff[t0 + t] + v;
                let xv = &xp[off..off + L];
                for (j, a) in acc.iter_mut().enumerate() {
                    let gv = &g[(o0 + j) * gs + v..(o0 + j) * gs + v + L];
                    for l in 0..L {
                        a[t][l] += gv[l] * xv[l];
                    }
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (t, &lanes) in a.iter().enumerate() {
                dw[(o0 + j) * taps + t0 + t] += hsum(lanes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};
    use crate::ops::Uninit;
    use candle_core::{Device, Tensor, Var};
    use rayon::prelude::*;

    /// The input gradient through `dx_conv` ([`DirectConv::input_grad_of`]) from the compact output
    /// gradient `g`: a zero-padded copy, the wide output, compacted.
    fn padded_input_grad(dx_conv: &DirectConv, g: &[f32]) -> Vec<f32> {
        let mut gp = vec![f32::NAN; dx_conv.xp_len];
        dx_conv.pad_into(g, &mut gp);
        let mut wide = vec![f32::NAN; dx_conv.out_len()];
        dx_conv.run(&gp, &Default::default(), &mut wide).unwrap();
        let mut dx = vec![f32::NAN; dx_conv.o * dx_conv.oh * dx_conv.ow];
        dx_conv.compact_into(&wide, &mut dx);
        dx
    }

    /// dx and dw of the direct kernels against candle's autograd through the reference convolution.
    fn check(c: usize, (h, w): (usize, usize), o: usize, k: usize, pad: Pad4, seed: u64) {
        let x = Var::from_tensor(&rand_t(&[1, c, h, w], seed)).unwrap();
        let wt = Var::from_tensor(&rand_t(&[o, c, k, k], seed + 1)).unwrap();
        let y = crate::ops::conv2d_fused_reference(&x, &wt, None, 1, pad, false).unwrap();
        let (_, _, oh, ow) = y.dims4().unwrap();
        let gy = rand_t(&[1, o, oh, ow], seed + 2);
        let grads = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (xv, wv, gv) = (v(&x), v(&wt), v(&gy));
        let what = format!("c{c} {h}x{w} o{o} k{k} {pad:?}");

        let dc = DirectConv::new((c, h, w), &wv, (o, k), pad).unwrap();
        let mut xp = vec![f32::NAN; dc.xp_len];
        dc.pad_into(&xv, &mut xp);
        let mut gw = vec![f32::NAN; dc.out_len()];
        dc.spread_into(&gv, &mut gw);
        let mut dw = vec![0f32; o * c * k * k];
        dc.weight_grad(&xp, &gw, &mut dw).unwrap();
        let dw = Tensor::from_vec(dw, (o, c, k, k), &Device::Cpu).unwrap();
        assert_close(&dw, grads.get(&wt).unwrap(), 1e-4, &format!("dw {what}"));

        let Some(dx_conv) = DirectConv::input_grad_of((c, h, w), &wv, (o, k), pad).unwrap() else {
            panic!("no input-gradient convolution for {what}");
        };
        let dx = padded_input_grad(&dx_conv, &gv);
        let dx = Tensor::from_vec(dx, (1, c, h, w), &Device::Cpu).unwrap();
        assert_close(&dx, grads.get(&x).unwrap(), 1e-4, &format!("dx {what}"));

        // The portable copy gives the same weight gradient up to rounding.
        let mut dwp = vec![0f32; o * c * k * k];
        // SAFETY: the buffers are sized by `dc`.
        unsafe { portable::weight_grad(&dc, &xp, (&gw, dc.nwide), &mut dwp) };
        let dwp = Tensor::from_vec(dwp, (o, c, k, k), &Device::Cpu).unwrap();
        assert_close(&dwp, &dw, 1e-5, &format!("portable dw {what}"));
    }

    #[test]
    fn direct_gradients_match_autograd() {
        check(1, (28, 28), 8, 3, (1, 1, 1, 1), 1);
        check(8, (28, 28), 16, 3, (1, 1, 1, 1), 2);
        check(16, (7, 7), 12, 3, (0, 0, 0, 0), 3);
        check(1, (28, 28), 20, 7, (3, 3, 3, 3), 4);
        check(20, (14, 14), 10, 5, (0, 0, 0, 0), 5);
        check(3, (9, 11), 5, 3, (1, 0, 2, 1), 6);
        check(7, (5, 6), 3, 1, (0, 0, 0, 0), 7);
        check(1, (28, 28), 16, 1, (0, 0, 0, 0), 9);
        check(16, (14, 14), 24, 1, (0, 0, 0, 0), 10);
        check(2, (6, 5), 13, 5, (2, 2, 2, 2), 8);
    }

    /// The shared-padding layout gives the input and weight gradients of the padded copies bit for
    /// bit, for every image of a batch through one buffer (only the gradient's rows are rewritten);
    /// other geometries have no such layout.
    #[test]
    fn shared_padding_gives_the_padded_bits() {
        for (i, &(c, h, w, o, k)) in [
            (10, 26, 26, 20, 3),
            (10, 12, 12, 14, 3),
            (16, 8, 8, 16, 3),
            (3, 11, 9, 5, 3),
            (2, 12, 10, 3, 5),
            (4, 9, 17, 6, 2),
        ]
        .iter()
        .enumerate()
        {
            let seed = 300 + 4 * i as u64;
            let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let wt = v(rand_t(&[o, c, k, k], seed));
            let dc = DirectConv::new((c, h, w), &wt, (o, k), (0, 0, 0, 0)).unwrap();
            let padded = DirectConv::input_grad_of((c, h, w), &wt, (o, k), (0, 0, 0, 0))
                .unwrap()
                .unwrap();
            let shared = dc.input_grad_shared(&wt, k).unwrap().unwrap();
            let mut buf = vec![0f32; shared.len()];
            for img in 0..3 {
                let x = v(rand_t(&[c, h, w], seed + 1 + 2 * img));
                let g = v(rand_t(&[o, dc.oh * dc.ow], seed + 2 + 2 * img));
                let mut xp = vec![f32::NAN; dc.xp_len];
                dc.pad_into(&x, &mut xp);
                // The padded copies.
                let mut gw = vec![f32::NAN; dc.out_len()];
                dc.spread_into(&g, &mut gw);
                let mut dw_a = vec![0.25f32; wt.len()];
                dc.weight_grad(&xp, &gw, &mut dw_a).unwrap();
                let dx_a = padded_input_grad(&padded, &g);
                // The shared layout.
                shared.fill(&g, &mut buf);
                let mut dw_b = vec![0.25f32; wt.len()];
                dc.weight_grad_planes(&xp, shared.planes(&buf), shared.plane, &mut dw_b)
                    .unwrap();
                let mut dx_b = vec![MaybeUninit::new(f32::NAN); c * h * w];
                let mut wide = vec![f32::NAN; shared.dx.out_len()];
                shared
                    .dx
                    .run_compact_uninit(&buf, &Default::default(), &mut wide, &mut dx_b)
                    .unwrap();
                // SAFETY: every value was initialised (NaN, then what the kernel wrote).
                let dx_b: Vec<f32> = dx_b.iter().map(|v| unsafe { v.assume_init() }).collect();
                let bits = |d: &[f32]| d.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let what = format!("c{c} {h}x{w} o{o} k{k} image {img}");
                assert_eq!(bits(&dw_a), bits(&dw_b), "dw {what}");
                assert_eq!(bits(&dx_a), bits(&dx_b), "dx {what}");
            }
        }
        let wt = vec![0.5f32; 2 * 3 * 9];
        let same = DirectConv::new((3, 8, 8), &wt, (2, 3), (1, 1, 1, 1)).unwrap();
        assert!(same.input_grad_shared(&wt, 3).unwrap().is_none());
        let wt1 = vec![0.5f32; 2 * 3];
        let one = DirectConv::new((3, 8, 8), &wt1, (2, 1), (0, 0, 0, 0)).unwrap();
        assert!(one.input_grad_shared(&wt1, 1).unwrap().is_none());
    }

    /// The AVX-512 tiles sum the same products in the same order as the AVX2 ones: the same bits, for
    /// every channel count (odd ones end in an AVX2 tile) and tap count (tails of the 12-tap tiles).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_weight_gradient_is_bit_identical_to_avx2() {
        if !crate::ops::has_avx512() {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        for (i, &(c, h, o, k)) in [
            (1, 28, 10, 3),
            (10, 26, 20, 3),
            (20, 24, 10, 1),
            (10, 12, 14, 3),
            (14, 10, 16, 3),
            (3, 9, 1, 3),
            (5, 11, 7, 5),
            (2, 8, 3, 2),
        ]
        .iter()
        .enumerate()
        {
            let seed = 100 + i as u64;
            let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (x, w) = (
                v(rand_t(&[c, h, h], seed)),
                v(rand_t(&[o, c, k, k], seed + 1)),
            );
            let dc = DirectConv::new((c, h, h), &w, (o, k), (1, 0, 0, 1)).unwrap();
            let g = v(rand_t(&[o, dc.oh * dc.ow], seed + 2));
            let mut xp = vec![f32::NAN; dc.xp_len];
            dc.pad_into(&x, &mut xp);
            let mut gw = vec![f32::NAN; dc.out_len()];
            dc.spread_into(&g, &mut gw);
            let (mut a, mut b) = (vec![0.5f32; o * c * k * k], vec![0.5f32; o * c * k * k]);
            // SAFETY: the features are present (checked above); the buffers are sized by `dc`.
            unsafe {
                avx512::weight_grad(&dc, &xp, (&gw, dc.nwide), &mut a);
                avx2::weight_grad(&dc, &xp, (&gw, dc.nwide), &mut b);
            }
            let bits = |d: &[f32]| d.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "c{c} {h}x{h} o{o} k{k}");
        }
    }

    /// An unpadded convolution reads the batch's next image as its padding (`DirectConv::padded`): the
    /// outputs and the weight gradient are bit for bit those from a zero-padded copy, padded ones and
    /// the batch's last image still get the copy, and the compact output written into fresh memory
    /// (`compact_into_uninit`) is the same as into zeros.
    #[test]
    fn next_image_as_padding_gives_the_same_bits() {
        for (i, &(c, h, w, o, k, pad)) in [
            (10, 26, 26, 20, 3, (0, 0, 0, 0)),
            (20, 24, 24, 10, 1, (0, 0, 0, 0)),
            (3, 9, 11, 5, 3, (0, 0, 0, 0)),
            (3, 9, 11, 5, 3, (1, 1, 1, 1)),
        ]
        .iter()
        .enumerate()
        {
            let seed = 200 + 3 * i as u64;
            let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let chw = c * h * w;
            // Two images; the second one's values are large, so reading them anywhere but in the
            // columns that are not outputs would show.
            let mut x = v(rand_t(&[2, c, h, w], seed));
            x[chw..].iter_mut().for_each(|a| *a *= 1e6);
            let wv = v(rand_t(&[o, c, k, k], seed + 1));
            let dc = DirectConv::new((c, h, w), &wv, (o, k), pad).unwrap();
            let g = v(rand_t(&[o, dc.oh * dc.ow], seed + 2));
            let mut gw = vec![f32::NAN; dc.out_len()];
            dc.spread_into(&g, &mut gw);
            let run = |xp: &[f32]| {
                let mut wide = vec![f32::NAN; dc.out_len()];
                dc.run(xp, &Default::default(), &mut wide).unwrap();
                let mut out = vec![0f32; o * dc.oh * dc.ow];
                dc.compact_into(&wide, &mut out);
                let mut dw = vec![0f32; o * c * k * k];
                dc.weight_grad(xp, &gw, &mut dw).unwrap();
                (out, dw, wide)
            };
            let mut copy = vec![f32::NAN; dc.xp_len];
            dc.pad_into(&x[..chw], &mut copy);
            let expected = run(&copy);
            let mut buf = vec![f32::NAN; dc.xp_len];
            let unpadded = pad == (0, 0, 0, 0);
            let view = dc.padded(&x, &mut buf);
            assert_eq!(
                std::ptr::eq(view.as_ptr(), x.as_ptr()),
                unpadded,
                "only unpadded convolutions read the batch in place ({i})"
            );
            let got = run(view);
            let bits = |d: &[f32]| d.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.0), bits(&expected.0), "outputs ({i})");
            assert_eq!(bits(&got.1), bits(&expected.1), "weight gradient ({i})");
            // The last image has nothing after it: it is copied and padded unless the kernel reads
            // no further than its end (a 1x1 convolution whose planes are a multiple of 16 wide).
            let last = dc.padded(&x[chw..], &mut buf);
            assert_eq!(
                std::ptr::eq(last.as_ptr(), x[chw..].as_ptr()),
                unpadded && dc.xp_len == chw,
                "last image ({i})"
            );
            assert_eq!(
                bits(&run(last).0),
                bits(
                    &run(&{
                        let mut c2 = vec![f32::NAN; dc.xp_len];
                        dc.pad_into(&x[chw..], &mut c2);
                        c2
                    })
                    .0
                ),
                "last image's outputs ({i})"
            );

            let mut fresh = Uninit::new(o * dc.oh * dc.ow);
            fresh
                .par_chunks_mut(o * dc.oh * dc.ow)
                .for_each(|d| dc.compact_into_uninit(&expected.2, d));
            // SAFETY: `compact_into_uninit` writes all `o * oh * ow` values (its contract).
            let fresh = unsafe { fresh.assume_init() };
            assert_eq!(
                bits(&fresh),
                bits(&expected.0),
                "compact into fresh memory ({i})"
            );
        }
    }

    #[test]
    fn no_direct_input_gradient_for_padding_beyond_the_kernel() {
        let w = vec![0.1f32; 2 * 3 * 9];
        assert!(
            DirectConv::input_grad_of((3, 5, 5), &w, (2, 3), (3, 0, 0, 0))
                .unwrap()
                .is_none()
        );
        let dc = DirectConv::new((3, 5, 5), &w, (2, 3), (1, 1, 1, 1)).unwrap();
        let (xp, g) = (vec![0.0; dc.xp_len], vec![0.0; dc.out_len()]);
        let mut dw = vec![0.0; w.len()];
        assert!(dc.weight_grad(&xp, &g, &mut dw).is_ok());
        assert!(dc.weight_grad(&xp[1..], &g, &mut dw).is_err());
        assert!(dc.weight_grad(&xp, &g[1..], &mut dw).is_err());
    }
}

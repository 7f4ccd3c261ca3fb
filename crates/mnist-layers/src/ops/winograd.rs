//! Inference-only 3x3 stride-1 convolution with Winograd's minimal filtering along the rows
//! (F(m, 3), m = 2 or 4; Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016),
//! for AVX-512 CPUs; the direct kernel ([`super::direct`]) stays the training path and the fallback.
//!
//! Output rows come in groups of `m`: rows `m*g .. m*g + m` of output channel `oc` are
//! `A^T (U ⊙ V)` with, for each of the `a = m + 2` Winograd points `xi`,
//! `V[xi][ci][g][x] = sum_j B^T[xi][j] * xp[ci][m*g + j][x]` (a transform of `a` consecutive padded input
//! rows, done once per image) and `U[xi][oc][ci][kx] = sum_ky G[xi][ky] * w[oc][ci][ky][kx]` (of the
//! weights, once per call). What is left for each point is a `1 x 3` convolution over the transformed
//! rows `V[xi]`: `3c` taps instead of the `9c` of each of `m` output rows, `3a` against `9m` multiply-adds
//! (2x fewer for m = 4, 1.5x for m = 2), in the same register tiles as the direct kernel (output channels
//! x 16-lane vectors of the groups' rows laid end to end). The output transform and the epilogue (bias,
//! ReLU, per-channel affine) run on the tile's registers before its stores, into the direct kernel's wide
//! layout `[o, nwide]` (rows `wp` apart; the columns `x >= ow` hold values that are never read).
//!
//! The results differ from the direct convolution's by rounding (about 1e-6 relative); the summation
//! order is fixed, so they never depend on the thread count. The portable twin ([`Winograd::run_portable`],
//! for tests and CPUs without AVX-512) gives the same bits as the AVX-512 kernel.

use candle_core::Result;

use super::direct::{pick_ob, DirectConv, Epilogue};
use super::lane;

/// Lanes of a vector (AVX-512).
const L: usize = 16;

/// F(2, 3): input transform `B^T` (4 x 4) and filter transform `G` (4 x 3); the output transform `A^T`
/// (rows `[1, 1, 1, 0]`, `[0, 1, -1, -1]`) is spelled out in [`out_rows_portable`] and `k512::out_rows`.
const G2: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// `G` row `xi` of F(m, 3); F(4, 3)'s is [`lane::G`] (Lavin and Gray's, points 0, ±1, ±2, infinity),
/// rounded to `f32`.
fn g_row(m: usize, xi: usize) -> [f32; 3] {
    if m == 4 {
        lane::G[xi].map(|v| v as f32)
    } else {
        G2[xi]
    }
}

/// `B^T d`: the `m + 2` transformed rows of a group from its `m + 2` input rows, with the sums and
/// differences the rows share (the AVX-512 kernel's `in_rows` does the same operations in the same
/// order): F(4, 3)'s is [`lane::in6`]; F(2, 3): `d0 - d2`, `d1 + d2`, `d2 - d1`, `d1 - d3`.
fn in_rows_portable(m: usize, d: &[f32; 6]) -> [f32; 6] {
    if m == 4 {
        // SAFETY: the one-lane instance has no requirement.
        unsafe { lane::in6(*d) }
    } else {
        [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3], 0.0, 0.0]
    }
}

/// `A^T mm`: the `m` output rows of a group from its `m + 2` points, with the sums and differences the
/// rows share (the AVX-512 kernel's `out_rows` does the same operations in the same order): F(4, 3)'s
/// is [`lane::out4`] (`A^T` rows `[1, 1, 1, 1, 1, 0]`, `[0, 1, -1, 2, -2, 0]`, `[0, 1, 1, 4, 4, 0]`,
/// `[0, 1, -1, 8, -8, 1]`).
fn out_rows_portable(m: usize, mm: &[f32; 6]) -> [f32; 4] {
    if m == 4 {
        // SAFETY: the one-lane instance has no requirement.
        unsafe { lane::out4(*mm) }
    } else {
        [(mm[0] + mm[1]) + mm[2], (mm[1] - mm[2]) - mm[3], 0.0, 0.0]
    }
}

/// Where the 16 lanes of one vector of the transformed rows go: up to three `(group, lane mask,
/// output lane mask)` segments, the lanes of one group each and those of them with an output column
/// (`x < ow`); lanes past the last group are in no segment.
type Segments = [(usize, u16, u16); 3];

/// A prepared 3x3 stride-1 convolution with Winograd's F(m, 3) along the rows, giving the output of
/// the direct convolution `dc` it was made from (same geometry, same wide layout).
#[derive(Debug, Clone)]
pub(crate) struct Winograd {
    /// Output rows per group (2 or 4).
    m: usize,
    c: usize,
    o: usize,
    hp: usize,
    wp: usize,
    oh: usize,
    ow: usize,
    /// Output channels per register tile and `o` rounded up to a multiple of it.
    ob: usize,
    o_pad: usize,
    /// Transformed weights `[a][3c][o_pad]` (tap `ci*3 + kx`; padding channels zero).
    u: Vec<f32>,
    /// Offset of tap `ci*3 + kx` in one point's transformed input: `ci * plane + kx`.
    toff: Vec<usize>,
    /// Length of one point's transformed rows, `ceil(oh / m) * wp`, and of its vectors, rounded up to `L`.
    plane: usize,
    nwide_t: usize,
    /// Floats of one point's transformed input (`c` planes, then zeros that the last tiles read).
    tlen: usize,
    /// The wide output's row stride per channel (the direct convolution's `nwide`).
    nwide: usize,
    segs: Vec<Segments>,
}

impl Winograd {
    /// The Winograd form of `dc` (3x3, stride 1, weights `w [o, c, 3, 3]`) where it needs fewer
    /// multiply-adds than the direct kernel by a margin and this CPU has AVX-512 (or `force` is set:
    /// the tests run the portable twin anywhere); `None` otherwise.
    pub(crate) fn for_conv(dc: &DirectConv, w: &[f32], force: bool) -> Option<Self> {
        if !(force || super::has_avx512()) || dc.k() != 3 || dc.wp < 8 || w.len() != dc.o * dc.c * 9
        {
            return None;
        }
        // Vector operations per image, roughly: the direct kernel's 9c multiply-adds and an epilogue of
        // about 4 per output channel and 16-lane vector of the `oh` rows; F(m, 3)'s 3c(m+2) and an
        // output transform and epilogue of about 12m per vector of the groups' rows, plus the input
        // transform, about 4(m+2) per input channel, group and 16 columns. Winograd only where that is
        // under 4/5 of the direct kernel's: small planes pay for remainder tiles and loop overheads
        // that this leaves out (measured: of the improved conv's 3x3 layers only the 10 -> 20 one at
        // 26x26 gains).
        let (c, o, wp) = (dc.c, dc.o, dc.wp);
        let vecs = |rows: usize| (rows * wp).div_ceil(L);
        let direct = o * vecs(dc.oh) * (9 * c + 4);
        let cost = |m: usize| {
            let groups = dc.oh.div_ceil(m);
            o * vecs(groups) * (3 * c * (m + 2) + 12 * m)
                + c * groups * wp.div_ceil(L) * 4 * (m + 2)
        };
        let m = if cost(4) <= cost(2) { 4 } else { 2 };
        if 5 * cost(m) >= 4 * direct && !force {
            return None;
        }
        Some(Self::new(dc, w, m))
    }

    fn new(dc: &DirectConv, w: &[f32], m: usize) -> Self {
        let (c, o, a) = (dc.c, dc.o, m + 2);
        let groups = dc.oh.div_ceil(m);
        let plane = groups * dc.wp;
        let nwide_t = plane.div_ceil(L) * L;
        let ob = pick_ob(o);
        let o_pad = o.div_ceil(ob) * ob;
        let taps = 3 * c;
        let mut u = vec![0f32; a * taps * o_pad];
        for xi in 0..a {
            let gr = g_row(m, xi);
            for oc in 0..o {
                for ci in 0..c {
                    for kx in 0..3 {
                        let wk = |ky: usize| w[((oc * c + ci) * 3 + ky) * 3 + kx];
                        let v = gr[0] * wk(0) + gr[1] * wk(1) + gr[2] * wk(2);
                        u[(xi * taps + ci * 3 + kx) * o_pad + oc] = v;
                    }
                }
            }
        }
        let toff = (0..taps).map(|t| (t / 3) * plane + t % 3).collect();
        let tlen = (c - 1) * plane + 2 + nwide_t;
        let segs = (0..nwide_t / L)
            .map(|v| {
                let mut s: Segments = [(0, 0, 0); 3];
                let mut k = 0;
                for lane in 0..L {
                    let n = v * L + lane;
                    if n >= plane {
                        break;
                    }
                    let (g, x) = (n / dc.wp, n % dc.wp);
                    if s[k].1 != 0 && s[k].0 != g {
                        k += 1;
                    }
                    let bit = 1u16 << lane;
                    s[k] = (g, s[k].1 | bit, s[k].2 | if x < dc.ow { bit } else { 0 });
                }
                s
            })
            .collect();
        Self {
            m,
            c,
            o,
            hp: dc.hp,
            wp: dc.wp,
            oh: dc.oh,
            ow: dc.ow,
            ob,
            o_pad,
            u,
            toff,
            plane,
            nwide_t,
            tlen,
            nwide: dc.nwide,
            segs,
        }
    }

    /// Rows per group (2 or 4).
    #[cfg(test)]
    pub(crate) fn m(&self) -> usize {
        self.m
    }

    /// Floats of the scratch buffer [`Self::run`] needs.
    pub(crate) fn scratch_len(&self) -> usize {
        (self.m + 2) * self.tlen
    }

    /// `V = B^T xp` for every point: `t [a][tlen]` from the padded image `xp [c, hp, wp]` (rows past
    /// `hp` read as zeros), zeros after the `c` planes of each point; [`in_rows_portable`] per column.
    fn transform_portable(&self, xp: &[f32], t: &mut [f32]) {
        let (m, wp, hp) = (self.m, self.wp, self.hp);
        for xi in 0..m + 2 {
            t[xi * self.tlen + self.c * self.plane..(xi + 1) * self.tlen].fill(0.0);
        }
        for ci in 0..self.c {
            let src = &xp[ci * hp * wp..(ci + 1) * hp * wp];
            for g in 0..self.plane / wp {
                for x in 0..wp {
                    let d: [f32; 6] = std::array::from_fn(|j| {
                        let row = m * g + j;
                        if j < m + 2 && row < hp {
                            src[row * wp + x]
                        } else {
                            0.0
                        }
                    });
                    let v = in_rows_portable(m, &d);
                    for (xi, &vx) in v.iter().enumerate().take(m + 2) {
                        t[xi * self.tlen + ci * self.plane + g * wp + x] = vx;
                    }
                }
            }
        }
    }

    /// Checks the buffers: `xp` the padded image `[c, hp, wp]`, `t` [`Self::scratch_len`] floats, `out`
    /// the wide `[o, nwide]`, the epilogue's vectors `o` long.
    fn check(&self, xp: &[f32], t: &[f32], epi: &Epilogue, out: &[f32]) -> Result<()> {
        if xp.len() < self.c * self.hp * self.wp
            || t.len() < self.scratch_len()
            || out.len() < self.o * self.nwide
            || !epi.fits(self.o)
        {
            candle_core::bail!(
                "winograd conv: buffers of {} / {} / {} floats for [{}, {}, {}] -> [{}, {}]",
                xp.len(),
                t.len(),
                out.len(),
                self.c,
                self.hp,
                self.wp,
                self.o,
                self.nwide
            )
        }
        Ok(())
    }

    /// `out [o, nwide] = epilogue(conv(xp))` in the direct kernel's wide layout (the rows `< oh`,
    /// columns `< wp` of each channel written; the columns `>= ow` with values never read), with the
    /// AVX-512 kernel; `t` is scratch of [`Self::scratch_len`] floats. Falls back to the portable twin
    /// on a CPU without AVX-512.
    pub(crate) fn run(
        &self,
        xp: &[f32],
        t: &mut [f32],
        epi: &Epilogue,
        out: &mut [f32],
    ) -> Result<()> {
        self.check(xp, t, epi, out)?;
        #[cfg(target_arch = "x86_64")]
        if super::has_avx512() {
            // SAFETY: AVX-512F, AVX2 and FMA present; buffers checked above.
            unsafe { k512::run::<false>(self, xp, t, epi, out.as_mut_ptr()) };
            return Ok(());
        }
        self.run_portable(xp, t, epi, out)
    }

    /// `dst [o, oh*ow] = epilogue(conv(xp))`, every value written (on `Ok`), for `dc`, the direct
    /// convolution this was made from: stored straight into `dst` by the AVX-512 kernel, else through
    /// the wide scratch `wide` ([`DirectConv::out_len`]) and [`DirectConv::compact_into_uninit`]. The
    /// same values as [`Self::run`] then compacting.
    pub(crate) fn run_compact_uninit(
        &self,
        dc: &DirectConv,
        xp: &[f32],
        t: &mut [f32],
        epi: &Epilogue,
        wide: &mut [f32],
        dst: &mut [std::mem::MaybeUninit<f32>],
    ) -> Result<()> {
        if dst.len() != self.o * self.oh * self.ow
            || (dc.o, dc.oh, dc.ow) != (self.o, self.oh, self.ow)
        {
            candle_core::bail!(
                "winograd conv: {} floats for a compact [{}, {}, {}] output",
                dst.len(),
                self.o,
                self.oh,
                self.ow
            )
        }
        #[cfg(target_arch = "x86_64")]
        if super::has_avx512() {
            self.check(xp, t, epi, wide)?;
            // SAFETY: AVX-512F, AVX2 and FMA present; buffers checked above; `dst` holds the
            // compact output; every one of its values is stored (the segments' output lanes cover
            // every column `x < ow` of every row `< oh`, for every channel).
            unsafe { k512::run::<true>(self, xp, t, epi, dst.as_mut_ptr().cast::<f32>()) };
            return Ok(());
        }
        self.run(xp, t, epi, wide)?;
        dc.compact_into_uninit(wide, dst);
        Ok(())
    }

    /// The portable twin of [`Self::run`]: the same arithmetic in the same order (fused multiply-adds
    /// where the AVX-512 kernel has them), so the same bits.
    pub(crate) fn run_portable(
        &self,
        xp: &[f32],
        t: &mut [f32],
        epi: &Epilogue,
        out: &mut [f32],
    ) -> Result<()> {
        self.check(xp, t, epi, out)?;
        self.transform_portable(xp, t);
        let (m, a, op, taps) = (self.m, self.m + 2, self.o_pad, 3 * self.c);
        for oc in 0..self.o {
            let b = epi.bias.map_or(0.0, |b| b[oc]);
            let (s, sh) = epi.affine.map_or((1.0, 0.0), |(s, t)| (s[oc], t[oc]));
            for (v, segs) in self.segs.iter().enumerate() {
                for lane in 0..L {
                    let n = v * L + lane;
                    let Some(&(g, _, _)) = segs.iter().find(|(_, mk, _)| mk & (1 << lane) != 0)
                    else {
                        continue;
                    };
                    let mut mm = [0f32; 6];
                    for (xi, mx) in mm.iter_mut().enumerate().take(a) {
                        let tp = &t[xi * self.tlen..];
                        let up = &self.u[xi * taps * op..];
                        let mut acc = 0f32;
                        for (tap, &off) in self.toff.iter().enumerate() {
                            acc = tp[off + n].mul_add(up[tap * op + oc], acc);
                        }
                        *mx = acc;
                    }
                    let rows = out_rows_portable(m, &mm);
                    for (r, &y) in rows.iter().enumerate().take(m) {
                        let row = m * g + r;
                        if row >= self.oh {
                            break;
                        }
                        let mut y = y + b;
                        if epi.relu {
                            y = if y > 0.0 { y } else { 0.0 };
                        }
                        if epi.affine.is_some() {
                            y = y.mul_add(s, sh);
                        }
                        out[oc * self.nwide + n + ((m - 1) * g + r) * self.wp] = y;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
mod k512 {
    use super::{lane, Epilogue, Winograd, L};
    use crate::ops::lane::K512;
    use std::arch::x86_64::*;

    /// [`super::in_rows_portable`] on vectors: the same operations in the same order.
    #[inline(always)]
    fn in_rows<const M: usize>(d: &[__m512; 6]) -> [__m512; 6] {
        // SAFETY (of every intrinsic and of `K512`): only called from the `avx512f` kernels of this
        // module.
        unsafe {
            if M == 4 {
                lane::in6(d.map(K512)).map(|v| v.0)
            } else {
                let z = _mm512_setzero_ps();
                [
                    _mm512_sub_ps(d[0], d[2]),
                    _mm512_add_ps(d[1], d[2]),
                    _mm512_sub_ps(d[2], d[1]),
                    _mm512_sub_ps(d[1], d[3]),
                    z,
                    z,
                ]
            }
        }
    }

    /// [`super::out_rows_portable`] on vectors: the same operations in the same order.
    #[inline(always)]
    fn out_rows<const M: usize>(mm: &[__m512; 6]) -> [__m512; 4] {
        // SAFETY (of every intrinsic and of `K512`): only called from the `avx512f` kernels of this
        // module.
        unsafe {
            if M == 4 {
                lane::out4(mm.map(K512)).map(|v| v.0)
            } else {
                let z = _mm512_setzero_ps();
                [
                    _mm512_add_ps(_mm512_add_ps(mm[0], mm[1]), mm[2]),
                    _mm512_sub_ps(_mm512_sub_ps(mm[1], mm[2]), mm[3]),
                    z,
                    z,
                ]
            }
        }
    }

    /// One tile: channels `o0..o0+OB`, vectors `n0/L..n0/L + NV` of the transformed rows, all `A`
    /// points, then the output transform, the epilogue and the stores of its `M` rows per group.
    ///
    /// # Safety
    /// AVX-512F and FMA present; [`Winograd::check`] passed for the buffers; `o0 + OB <= o_pad`,
    /// `n0 + NV*L <= nwide_t`; `t` holds the transform of the image.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    // The epilogue's loops run over the inner two axes of `mm [point][channel][vector]`.
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<
        const M: usize,
        const A: usize,
        const OB: usize,
        const NV: usize,
        const COMPACT: bool,
    >(
        wg: &Winograd,
        t: &[f32],
        epi: &Epilogue,
        out: *mut f32,
        o0: usize,
        n0: usize,
    ) {
        let (op, taps) = (wg.o_pad, wg.toff.len());
        let mut mm = [[[_mm512_setzero_ps(); NV]; OB]; A];
        for (xi, mxi) in mm.iter_mut().enumerate() {
            // SAFETY: point `xi < A` of `t` (`A * tlen` floats) and of `u` (`A * taps * op`).
            let (tptr, uptr) = unsafe {
                (
                    t.as_ptr().add(xi * wg.tlen + n0),
                    wg.u.as_ptr().add(xi * taps * op + o0),
                )
            };
            let mut acc = [[_mm512_setzero_ps(); NV]; OB];
            for (tap, &off) in wg.toff.iter().enumerate() {
                let mut xv = [_mm512_setzero_ps(); NV];
                for (v, x) in xv.iter_mut().enumerate() {
                    // SAFETY: `off + n0 + NV*L <= (c-1)*plane + 2 + nwide_t = tlen`.
                    *x = unsafe { _mm512_loadu_ps(tptr.add(off + v * L)) };
                }
                for (j, accj) in acc.iter_mut().enumerate() {
                    // SAFETY: `tap * op + o0 + j < taps * op`.
                    let w = _mm512_set1_ps(unsafe { *uptr.add(tap * op + j) });
                    for (a, &x) in accj.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(x, w, *a);
                    }
                }
            }
            *mxi = acc;
        }
        let zero = _mm512_setzero_ps();
        for j in 0..OB {
            let oc = o0 + j;
            if oc >= wg.o {
                break;
            }
            let b = _mm512_set1_ps(epi.bias.map_or(0.0, |b| b[oc]));
            let (s, sh) = epi.affine.map_or((1.0, 0.0), |(s, t)| (s[oc], t[oc]));
            let (s, sh) = (_mm512_set1_ps(s), _mm512_set1_ps(sh));
            for v in 0..NV {
                let n = n0 + v * L;
                let segs = &wg.segs[n / L];
                let p: [__m512; 6] =
                    std::array::from_fn(|xi| if xi < A { mm[xi][j][v] } else { zero });
                let rows = out_rows::<M>(&p);
                for (r, &y) in rows.iter().enumerate().take(M) {
                    let mut y = _mm512_add_ps(y, b);
                    if epi.relu {
                        y = _mm512_max_ps(y, zero);
                    }
                    if epi.affine.is_some() {
                        y = _mm512_fmadd_ps(y, s, sh);
                    }
                    for &(g, mask, valid) in segs {
                        if mask == 0 || M * g + r >= wg.oh {
                            continue;
                        }
                        if COMPACT {
                            // Lane `n + lane` is column `x = n + lane - g*wp` of row `M*g + r`.
                            let at = (oc * wg.oh + M * g + r) * wg.ow + n;
                            let p = out.wrapping_add(at).wrapping_sub(g * wg.wp);
                            // SAFETY: the lanes of `valid` are outputs `(M*g + r, x)`, `x < ow`, of
                            // channel `oc`: inside the compact `[o, oh*ow]` (checked by the caller).
                            unsafe { _mm512_mask_storeu_ps(p, valid, y) };
                        } else {
                            let at = oc * wg.nwide + n + ((M - 1) * g + r) * wg.wp;
                            // SAFETY: the masked lanes are outputs `(M*g + r, x)`, `x < wp`, of
                            // channel `oc`: inside `[o, nwide]` (checked by the caller).
                            unsafe { _mm512_mask_storeu_ps(out.wrapping_add(at), mask, y) };
                        }
                    }
                }
            }
        }
    }

    /// # Safety
    /// As [`tile`], for every tile of output channels `OB` at a time.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn sweep<
        const M: usize,
        const A: usize,
        const OB: usize,
        const NV: usize,
        const C: bool,
    >(
        wg: &Winograd,
        t: &[f32],
        epi: &Epilogue,
        out: *mut f32,
    ) {
        // Columns outermost: a strip of the transformed input (all points and channels) stays in L1
        // while every output-channel block reads it (the whole of it is larger than L1).
        let nv = wg.nwide_t / L;
        let mut v0 = 0;
        while v0 + NV <= nv {
            for o0 in (0..wg.o_pad).step_by(OB) {
                // SAFETY: in bounds (`v0 + NV <= nv`, `o0 + OB <= o_pad`).
                unsafe { tile::<M, A, OB, NV, C>(wg, t, epi, out, o0, v0 * L) };
            }
            v0 += NV;
        }
        let n0 = v0 * L;
        for o0 in (0..wg.o_pad).step_by(OB) {
            // SAFETY: as above, with the remaining `nv - v0` vectors.
            unsafe {
                match nv - v0 {
                    0 => {}
                    1 => tile::<M, A, OB, 1, C>(wg, t, epi, out, o0, n0),
                    2 => tile::<M, A, OB, 2, C>(wg, t, epi, out, o0, n0),
                    3 => tile::<M, A, OB, 3, C>(wg, t, epi, out, o0, n0),
                    4 => tile::<M, A, OB, 4, C>(wg, t, epi, out, o0, n0),
                    5 => tile::<M, A, OB, 5, C>(wg, t, epi, out, o0, n0),
                    6 => tile::<M, A, OB, 6, C>(wg, t, epi, out, o0, n0),
                    _ => tile::<M, A, OB, 7, C>(wg, t, epi, out, o0, n0),
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn sweep_m<const M: usize, const A: usize, const C: bool>(
        wg: &Winograd,
        t: &[f32],
        epi: &Epilogue,
        out: *mut f32,
    ) {
        // SAFETY: forwarded contract; `o_pad` is a multiple of `ob` by construction.
        unsafe {
            match wg.ob {
                5 => sweep::<M, A, 5, 4, C>(wg, t, epi, out),
                4 => sweep::<M, A, 4, 5, C>(wg, t, epi, out),
                2 => sweep::<M, A, 2, 8, C>(wg, t, epi, out),
                _ => sweep::<M, A, 1, 8, C>(wg, t, epi, out),
            }
        }
    }

    /// [`Winograd::transform_portable`] in registers: for each input channel, group and 16 columns,
    /// the group's `A` input rows loaded once (masked at the row's end), the `A` transformed rows stored.
    ///
    /// # Safety
    /// AVX-512F and FMA present; `xp` holds `c * hp * wp` floats and `t` `A * tlen`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn transform<const M: usize, const A: usize>(
        wg: &Winograd,
        xp: &[f32],
        t: &mut [f32],
    ) {
        let (wp, hp, plane) = (wg.wp, wg.hp, wg.plane);
        for xi in 0..A {
            t[xi * wg.tlen + wg.c * plane..(xi + 1) * wg.tlen].fill(0.0);
        }
        let groups = plane / wp;
        let (src, dst) = (xp.as_ptr(), t.as_mut_ptr());
        for ci in 0..wg.c {
            for g in 0..groups {
                for x0 in (0..wp).step_by(L) {
                    let mask = if wp - x0 >= L {
                        u16::MAX
                    } else {
                        ((1u32 << (wp - x0)) - 1) as u16
                    };
                    let mut d = [_mm512_setzero_ps(); 6];
                    for (j, r) in d.iter_mut().enumerate().take(A) {
                        let row = M * g + j;
                        if row < hp {
                            // SAFETY: the masked lanes are columns `< wp` of row `row < hp` of
                            // channel `ci < c`: inside `xp` (the caller's contract).
                            *r = unsafe {
                                _mm512_maskz_loadu_ps(mask, src.add((ci * hp + row) * wp + x0))
                            };
                        }
                    }
                    let v = in_rows::<M>(&d);
                    for (xi, &y) in v.iter().enumerate().take(A) {
                        let at = xi * wg.tlen + ci * plane + g * wp + x0;
                        // SAFETY: the masked lanes are `g*wp + x0 + lane < (g+1)*wp <= plane` of
                        // channel `ci`'s plane of point `xi`: inside `t`.
                        unsafe { _mm512_mask_storeu_ps(dst.add(at), mask, y) };
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F, AVX2 and FMA present; the buffers passed [`Winograd::check`], `out` holds the wide
    /// `[o, nwide]` (`COMPACT` false) or the compact `[o, oh*ow]` (`COMPACT` true).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn run<const COMPACT: bool>(
        wg: &Winograd,
        xp: &[f32],
        t: &mut [f32],
        epi: &Epilogue,
        out: *mut f32,
    ) {
        // SAFETY: forwarded contract.
        unsafe {
            if wg.m == 4 {
                transform::<4, 6>(wg, xp, t);
                sweep_m::<4, 6, COMPACT>(wg, t, epi, out)
            } else {
                transform::<2, 4>(wg, xp, t);
                sweep_m::<2, 4, COMPACT>(wg, t, epi, out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::direct::fixture::ConvCase;
    use crate::ops::test_util::assert_close;
    use candle_core::{Device, Tensor};

    /// The Winograd convolution (AVX-512 where present, and its portable twin) against the direct
    /// kernel and [`crate::ops::conv2d_fused_reference`], every output value of the wide layout's rows.
    fn check(
        c: usize,
        (h, w): (usize, usize),
        o: usize,
        pad: crate::ops::Pad4,
        m: usize,
        seed: u64,
    ) {
        let relu = seed.is_multiple_of(2);
        let case = ConvCase::new(c, (h, w), (o, 3), pad, relu, seed);
        let (dc, xp, yr, epi) = (&case.dc, &case.xp, &case.reference, case.epi());
        let (oh, ow) = (dc.oh, dc.ow);
        let wg = Winograd::new(dc, &case.w, m);
        let compact = |y: &[f32]| case.compact(y);
        let what = format!("c{c} {h}x{w} o{o} {pad:?} F({m},3)");
        let mut t = vec![f32::NAN; wg.scratch_len()];
        let mut yp = vec![f32::NAN; dc.out_len()];
        wg.run_portable(xp, &mut t, &epi, &mut yp).unwrap();
        let yp = compact(&yp);
        assert_close(&yp, yr, 1e-4, &format!("portable {what}"));
        let mut yd = vec![0f32; dc.out_len()];
        dc.run(xp, &epi, &mut yd).unwrap();
        assert_close(
            &yp,
            &compact(&yd),
            1e-4,
            &format!("portable vs direct {what}"),
        );
        let mut t = vec![f32::NAN; wg.scratch_len()];
        let mut y = vec![f32::NAN; dc.out_len()];
        wg.run(xp, &mut t, &epi, &mut y).unwrap();
        assert_close(
            &compact(&y),
            &yp,
            0.0,
            &format!("dispatched vs portable {what}"),
        );
        // The compact output: every value written, the same bits.
        let mut yc = vec![std::mem::MaybeUninit::new(f32::NAN); o * oh * ow];
        let mut wide = vec![0f32; dc.out_len()];
        wg.run_compact_uninit(dc, xp, &mut t, &epi, &mut wide, &mut yc)
            .unwrap();
        // SAFETY: every value was initialised (NaN, then maybe overwritten).
        let yc: Vec<f32> = yc.into_iter().map(|v| unsafe { v.assume_init() }).collect();
        assert!(
            yc.iter().all(|v| v.is_finite()),
            "a value left unwritten: {what}"
        );
        let yc = Tensor::from_vec(yc, (1, o, oh, ow), &Device::Cpu).unwrap();
        assert_close(&yc, &yp, 0.0, &format!("compact vs portable {what}"));
    }

    /// F(2, 3)'s and F(4, 3)'s `B^T` and `A^T` (Lavin and Gray), as matrices.
    const BT2: [[f32; 4]; 4] = [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ];
    const BT4: [[f32; 6]; 6] = [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ];
    const AT2: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
    const AT4: [[f32; 6]; 4] = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ];

    /// F(4, 3)'s filter transform in `f32` is the `f32` matrix of Lavin and Gray (the shared `f64` one
    /// rounded once).
    #[test]
    fn the_filter_transform_is_the_f32_matrix() {
        let g4: [[f32; 3]; 6] = [
            [1.0 / 4.0, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ];
        for (xi, row) in g4.iter().enumerate() {
            assert_eq!(&g_row(4, xi), row);
        }
    }

    /// The transforms with shared sums are the matrices, and F(m, 3) is the 3-tap correlation.
    #[test]
    fn transforms_are_the_matrices_and_correlate() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for m in [2usize, 4] {
            let a = m + 2;
            for _ in 0..50 {
                let d: [f32; 6] = std::array::from_fn(|j| {
                    if j < a {
                        rng.random::<f32>() - 0.5
                    } else {
                        0.0
                    }
                });
                let w: [f32; 3] = std::array::from_fn(|_| rng.random::<f32>() - 0.5);
                let v = in_rows_portable(m, &d);
                let mm: [f32; 6] = std::array::from_fn(|xi| {
                    if xi >= a {
                        return 0.0;
                    }
                    let b: f32 = (0..a)
                        .map(|j| if m == 4 { BT4[xi][j] } else { BT2[xi][j] } * d[j])
                        .sum();
                    assert!((v[xi] - b).abs() < 1e-5, "B^T row {xi} of F({m}, 3)");
                    let gr = g_row(m, xi);
                    v[xi] * (gr[0] * w[0] + gr[1] * w[1] + gr[2] * w[2])
                });
                let y = out_rows_portable(m, &mm);
                for r in 0..m {
                    let at: f32 = (0..a)
                        .map(|xi| if m == 4 { AT4[r][xi] } else { AT2[r][xi] } * mm[xi])
                        .sum();
                    assert!((y[r] - at).abs() < 1e-5, "A^T row {r} of F({m}, 3)");
                    let direct = d[r] * w[0] + d[r + 1] * w[1] + d[r + 2] * w[2];
                    assert!(
                        (y[r] - direct).abs() < 1e-5,
                        "row {r} of F({m}, 3): {} vs {direct}",
                        y[r]
                    );
                }
            }
        }
    }

    #[test]
    fn winograd_matches_direct_and_reference() {
        // The improved conv's layers, both group sizes, ragged last groups, every channel block.
        check(10, (26, 26), 20, (0, 0, 0, 0), 4, 1);
        check(1, (28, 28), 10, (0, 0, 0, 0), 4, 2);
        check(10, (12, 12), 14, (0, 0, 0, 0), 2, 3);
        check(14, (10, 10), 16, (0, 0, 0, 0), 2, 4);
        check(3, (9, 11), 7, (1, 0, 2, 1), 4, 5);
        check(3, (9, 11), 7, (1, 0, 2, 1), 2, 6);
        check(5, (13, 8), 4, (1, 1, 1, 1), 4, 7);
        check(2, (7, 9), 1, (0, 0, 0, 0), 4, 8);
        check(4, (16, 16), 2, (1, 1, 1, 1), 2, 9);
    }

    #[test]
    fn winograd_is_chosen_only_where_it_saves_work() {
        let w = vec![0.5f32; 20 * 10 * 9];
        let dc = DirectConv::new((10, 26, 26), &w, (20, 3), (0, 0, 0, 0)).unwrap();
        let wg = Winograd::for_conv(&dc, &w, true).unwrap();
        assert_eq!(wg.m(), 4);
        // Rows under 8 wide (more than three groups a vector) and other kernels: never.
        let w1 = vec![0.5f32; 9];
        let narrow = DirectConv::new((1, 7, 7), &w1, (1, 3), (0, 0, 0, 0)).unwrap();
        assert!(Winograd::for_conv(&narrow, &w1, true).is_none());
        let w5 = vec![0.5f32; 25];
        let k5 = DirectConv::new((1, 12, 12), &w5, (1, 5), (0, 0, 0, 0)).unwrap();
        assert!(Winograd::for_conv(&k5, &w5, true).is_none());
        // A short weight vector is refused, not read past.
        assert!(Winograd::for_conv(&dc, &w[1..], true).is_none());
    }

    #[test]
    fn winograd_refuses_short_buffers() {
        let w = vec![0.25f32; 2 * 3 * 9];
        let dc = DirectConv::new((3, 12, 12), &w, (2, 3), (0, 0, 0, 0)).unwrap();
        let wg = Winograd::new(&dc, &w, 4);
        let xp = vec![0f32; dc.xp_len];
        let mut t = vec![0f32; wg.scratch_len()];
        let mut out = vec![0f32; dc.out_len()];
        let epi = Epilogue::default();
        assert!(wg.run(&xp[..10], &mut t, &epi, &mut out).is_err());
        assert!(wg.run(&xp, &mut t[1..], &epi, &mut out).is_err());
        assert!(wg.run(&xp, &mut t, &epi, &mut out[1..]).is_err());
        let short = [0f32; 1];
        let bad = Epilogue {
            bias: Some(&short),
            ..Default::default()
        };
        assert!(wg.run(&xp, &mut t, &bad, &mut out).is_err());
        assert!(wg.run(&xp, &mut t, &epi, &mut out).is_ok());
    }
}

//! The stride-1 depthwise forward pass read straight from the unpadded planes (AVX-512): the zero padding
//! and the columns past the plane are masked-out lanes of the loads, and taps whose input row lies outside
//! the plane are skipped. Every output sums the same products in the same order as [`super::sum_taps`] on
//! the zero-padded copy (kx outer, ky inner, `acc + w * x` unfused, from +0): a skipped or masked tap adds
//! `w * 0 = ±0` there, which leaves an accumulator that started at +0 unchanged (a round-to-nearest sum
//! is -0 only when both terms are), so the results are bit-identical for finite weights, without the copy.

use super::depthwise::DwGeom;

/// Output rows per pass (their accumulators are independent, which hides the adds' latency).
const ROWS: usize = 4;
/// Lanes of a vector; two vectors of accumulators per row cover 32 columns.
const L: usize = 16;

/// `out [c, oh, ow]` = the stride-1 depthwise convolution of `xi [c, h, w]` with `f [c, k, k]`, or `false`
/// (nothing written) where the CPU has no AVX-512, the geometry is not stride 1 or the input is empty
/// (the caller pads).
pub(crate) fn image_fwd(g: &DwGeom, xi: &[f32], f: &[f32], out: &mut [f32]) -> bool {
    let (hw, ohw, kk) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
    if g.stride != 1
        || hw == 0
        || xi.len() < g.c * hw
        || f.len() < g.c * kk
        || out.len() < g.c * ohw
        || !super::has_avx512()
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Rows narrower than a vector run flat (see `k512::plane_flat`): on one vCPU, per plane, 12x12
        // inputs -21%, 10x10 -26%, 8x8 -53%; wider rows, where the row kernel fills its lanes, stay.
        let flat = (g.ow < L).then(|| k512::flat_table(g)).flatten();
        for ((x, fc), o) in xi
            .chunks_exact(hw.max(1))
            .zip(f.chunks_exact(kk))
            .zip(out.chunks_exact_mut(ohw.max(1)))
            .take(g.c)
        {
            // SAFETY: AVX-512F is available (`has_avx512`, checked above); `x` holds the `h * w` plane,
            // `fc` the `k * k` filter and `o` the `oh * ow` output plane; `t` is the unpadded
            // geometry's table.
            unsafe {
                match &flat {
                    Some(t) => k512::plane_flat(g, x, fc, o, t),
                    None => k512::plane(g, x, fc, o),
                }
            };
        }
    }
    true
}

/// One plane of the stride-1 depthwise input gradient, read straight from the unpadded output gradient:
/// `dx [h, w]` with `dx[y][x] = sum over (ky, kx), ky outer and kx inner, of f[ky][kx] * g[y + pt - ky][x +
/// pl - kx]` (zero outside `g [oh, ow]`), `acc + w * g` unfused from +0: the products and order of
/// `DwGeom::plane_dx_padded`'s taps on the zero-padded gradient, so the same bits (see the module's note
/// on skipped and masked taps). `false` (nothing written) where the CPU has no AVX-512, the
/// geometry is not stride 1 or a buffer is short.
pub(crate) fn plane_dx(g: &DwGeom, gp: &[f32], f: &[f32], dx: &mut [f32]) -> bool {
    if g.stride != 1
        || g.h == 0
        || g.w == 0
        || g.k > MAX_K
        || gp.len() < g.oh * g.ow
        || f.len() < g.k * g.k
        || dx.len() < g.h * g.w
        || !super::has_avx512()
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX-512F is available (checked above), and the buffers hold the planes (checked above).
        unsafe { k512::plane_dx(g, gp, f, dx) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The depthwise filter gradient's accumulation (`DwGeom::plane_df_s1`) on AVX-512: `df [k*k]` from the
/// image plane `xd` (rows `wp` long: the padded copy, or the unpadded plane of a valid convolution, whose
/// last runs then reach into the next row where `gq` is zero) and the output gradient `gq [oh, ow8]` (rows
/// padded with zeros to a multiple of 8). Each tap keeps the portable kernel's 8 lanes, two taps to a 16-lane register (tap
/// `2p` in the low half, `2p + 1` in the high one), so every lane sums the same products in the same order
/// and the lanes are reduced the same way: the same bits with half the vector operations. `false`
/// (nothing written) without AVX-512 or for kernels other than 1, 3 and 5.
pub(crate) fn df_acc(
    (k, oh, ow8, wp): (usize, usize, usize, usize),
    xd: &[f32],
    gq: &[f32],
    df: &mut [f32],
) -> bool {
    // The last row's last run ends at `(oh - 1 + k - 1) * wp + k - 1 + ow8`.
    if !matches!(k, 1 | 3 | 5)
        || oh == 0
        || !ow8.is_multiple_of(8)
        || xd.len() < (oh + k - 2) * wp + k - 1 + ow8
        || gq.len() < oh * ow8
        || df.len() < k * k
        || !super::has_avx512()
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX-512F is available and the buffers hold what the kernel reads (checked above).
        unsafe {
            match k {
                1 => k512::df_acc::<1, 1>((k, oh, ow8, wp), xd, gq, df),
                3 => k512::df_acc::<9, 5>((k, oh, ow8, wp), xd, gq, df),
                _ => k512::df_acc::<25, 13>((k, oh, ow8, wp), xd, gq, df),
            }
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The largest kernel [`plane_dx`] takes (its column masks are kept per kx).
const MAX_K: usize = 7;

#[cfg(target_arch = "x86_64")]
mod k512 {
    use super::{DwGeom, L, MAX_K, ROWS};
    use std::arch::x86_64::*;

    /// Lanes `[lo, hi)` of a 16-lane mask (empty when `hi <= lo`).
    #[inline(always)]
    fn lanes(lo: isize, hi: isize) -> __mmask16 {
        let (lo, hi) = (lo.clamp(0, L as isize), hi.clamp(0, L as isize));
        if hi <= lo {
            return 0;
        }
        let upto = |n: isize| ((1u32 << n) - 1) as __mmask16;
        upto(hi) & !upto(lo)
    }

    /// One plane: `o [oh, ow]` from `x [h, w]` and the filter `f [k, k]`.
    ///
    /// # Safety
    /// AVX-512F must be available; `x.len() >= h * w`, `f.len() >= k * k`, `o.len() >= oh * ow`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane(g: &DwGeom, x: &[f32], f: &[f32], o: &mut [f32]) {
        let mut x0 = 0;
        while x0 < g.ow {
            let mut oy = 0;
            while oy < g.oh {
                let rows = (g.oh - oy).min(ROWS);
                // Rows whose every tap reads inside the plane skip the row checks.
                let inside = oy >= g.pt && oy + rows + g.k - 1 <= g.h + g.pt;
                // SAFETY: forwarded contract; `oy + rows <= oh`, `x0 < ow`.
                unsafe {
                    macro_rules! go {
                        ($r:literal) => {
                            match (g.ow - x0 > L, inside) {
                                (true, true) => pass::<$r, 2, false>(g, x, f, o, oy, x0),
                                (true, false) => pass::<$r, 2, true>(g, x, f, o, oy, x0),
                                (false, true) => pass::<$r, 1, false>(g, x, f, o, oy, x0),
                                (false, false) => pass::<$r, 1, true>(g, x, f, o, oy, x0),
                            }
                        };
                    }
                    match rows {
                        4 => go!(4),
                        3 => go!(3),
                        2 => go!(2),
                        _ => go!(1),
                    }
                }
                oy += rows;
            }
            x0 += 2 * L;
        }
    }

    /// [`plane_flat`]'s table for `g`: per vector of 16 flat positions, its kept lanes (the columns below
    /// `ow` of the rows it crosses, before the last output) and the index in `o` of its first kept output.
    /// The same for every plane of the geometry; `None` unless it is unpadded (`DwGeom::is_unpadded`).
    pub(super) fn flat_table(g: &DwGeom) -> Option<Vec<(__mmask16, usize)>> {
        if !g.is_unpadded() {
            return None;
        }
        let end = (g.oh - 1) * g.w + g.ow;
        let (mut row, mut col) = (0usize, 0usize);
        let mut out = Vec::with_capacity(end.div_ceil(L));
        for n0 in (0..end).step_by(L) {
            let first = row * g.ow + col.min(g.ow);
            let mut keep: __mmask16 = 0;
            let mut j = 0;
            while j < L {
                let seg = (g.w - col).min(L - j);
                let kept = g.ow.saturating_sub(col).min(seg);
                keep |= lanes(j as isize, (j + kept) as isize);
                j += seg;
                col += seg;
                if col == g.w {
                    (row, col) = (row + 1, 0);
                }
            }
            out.push((keep & lanes(0, (end - n0) as isize), first));
        }
        Some(out)
    }

    /// [`plane`] for an unpadded geometry, the plane read as one flat signal: output `(y, x)` is flat
    /// position `n = y * w + x`, whose taps are `x[n + ky * w + kx]`, so a vector covers 16 consecutive
    /// positions across rows instead of one row's columns (a 6-wide output row fills 6 of [`plane`]'s 16
    /// lanes; its 8-wide flat rows fill 12 of 16). The wrapped positions (`n % w >= ow`) are computed and
    /// dropped: each vector's kept lanes ([`flat_table`]) are packed by a compress and stored at their
    /// place in `o`. Every kept output sums the same products in the same order as [`pass`] (kx outer, ky
    /// inner, `acc + w * x` unfused, from +0), so the same bits.
    ///
    /// # Safety
    /// As [`plane`]; `t` is the geometry's [`flat_table`] (so it is unpadded).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane_flat(
        g: &DwGeom,
        x: &[f32],
        f: &[f32],
        o: &mut [f32],
        t: &[(__mmask16, usize)],
    ) {
        for (i, vecs) in t.chunks(ROWS).enumerate() {
            let n0 = i * ROWS * L;
            // SAFETY: forwarded contract; `vecs` are the table's entries from flat position `n0`.
            unsafe {
                match vecs.len() {
                    4 => flat_pass::<4>(g, x, f, o, vecs, n0),
                    3 => flat_pass::<3>(g, x, f, o, vecs, n0),
                    2 => flat_pass::<2>(g, x, f, o, vecs, n0),
                    _ => flat_pass::<1>(g, x, f, o, vecs, n0),
                }
            }
        }
    }

    /// `R` vectors of [`plane_flat`] from flat position `n0`, `t` their table entries.
    ///
    /// # Safety
    /// As [`plane_flat`], `t.len() >= R` and `n0 + (R - 1) * L` before the last output's position.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn flat_pass<const R: usize>(
        g: &DwGeom,
        x: &[f32],
        f: &[f32],
        o: &mut [f32],
        t: &[(__mmask16, usize)],
        n0: usize,
    ) {
        let (w, k) = (g.w, g.k);
        let end = (g.oh - 1) * w + g.ow;
        let xp = x.as_ptr();
        // The lanes of each vector before `end`: the only ones read.
        let m: [__mmask16; R] =
            std::array::from_fn(|v| lanes(0, end as isize - (n0 + v * L) as isize));
        let mut acc = [_mm512_setzero_ps(); R];
        for kx in 0..k {
            for ky in 0..k {
                let wv = _mm512_set1_ps(f[ky * k + kx]);
                let p = xp.wrapping_add(n0 + ky * w + kx);
                for (v, a) in acc.iter_mut().enumerate() {
                    // SAFETY: a lane before `end` reads below `(end - 1) + (k - 1) * (w + 1) = h * w`,
                    // inside `x`; the others are not accessed.
                    let xv = unsafe { _mm512_maskz_loadu_ps(m[v], p.wrapping_add(v * L)) };
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(wv, xv));
                }
            }
        }
        let op = o.as_mut_ptr();
        for (a, &(keep, first)) in acc.iter().zip(t) {
            let count = keep.count_ones() as isize;
            // SAFETY: the vector's `count` kept outputs are `o[first..first + count]`, inside `o [oh *
            // ow]` (the table counts every output once, in order).
            unsafe {
                _mm512_mask_storeu_ps(
                    op.wrapping_add(first),
                    lanes(0, count),
                    _mm512_maskz_compress_ps(keep, *a),
                )
            };
        }
    }

    /// [`super::df_acc`] for `KK = k * k` taps in `P = ceil(KK / 2)` registers.
    ///
    /// # Safety
    /// AVX-512F must be available; `xd` holds `(oh + k - 2) * wp + k - 1 + ow8` floats, `gq` `oh * ow8`,
    /// `df` `KK`, `ow8` is a multiple of 8.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn df_acc<const KK: usize, const P: usize>(
        (k, oh, ow8, wp): (usize, usize, usize, usize),
        xd: &[f32],
        gq: &[f32],
        df: &mut [f32],
    ) {
        // Both halves of a register from two 8-float runs.
        let pair = |lo: __m256, hi: __m256| {
            _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                _mm256_castps_pd(hi),
                1,
            ))
        };
        let (xp, gp) = (xd.as_ptr(), gq.as_ptr());
        let mut acc = [_mm512_setzero_ps(); P];
        for oy in 0..oh {
            for v in 0..ow8 / 8 {
                // SAFETY: `oy * ow8 + 8v + 8 <= oh * ow8 <= gq.len()`.
                let g = unsafe { _mm256_loadu_ps(gp.add(oy * ow8 + 8 * v)) };
                let g2 = pair(g, g);
                for (p, a) in acc.iter_mut().enumerate() {
                    let x = |t: usize| {
                        if t < KK {
                            let off = (oy + t / k) * wp + t % k + 8 * v;
                            // SAFETY: `off + 8 <= (oh - 1 + k - 1) * wp + k - 1 + ow8 <= xd.len()`.
                            unsafe { _mm256_loadu_ps(xp.add(off)) }
                        } else {
                            _mm256_setzero_ps()
                        }
                    };
                    let xv = pair(x(2 * p), x(2 * p + 1));
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(g2, xv));
                }
            }
        }
        let mut lanes = [0f32; 32];
        for (p, a) in acc.iter().enumerate() {
            // SAFETY: 16 floats into the first half of `lanes`.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
            for half in 0..2 {
                let t = 2 * p + half;
                if t < KK {
                    let a = &lanes[8 * half..8 * half + 8];
                    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
                    df[t] = (h[0] + h[2]) + (h[1] + h[3]);
                }
            }
        }
    }

    /// [`super::plane_dx`]: passes of `ROWS` rows and 32 columns over the `[h, w]` input-gradient plane.
    ///
    /// # Safety
    /// AVX-512F must be available; `gp.len() >= oh * ow`, `f.len() >= k * k`, `dx.len() >= h * w`,
    /// `k <= MAX_K`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane_dx(g: &DwGeom, gp: &[f32], f: &[f32], dx: &mut [f32]) {
        let mut x0 = 0;
        while x0 < g.w {
            let mut y = 0;
            while y < g.h {
                let rows = (g.h - y).min(ROWS);
                // Rows whose every tap reads inside the gradient plane skip the row checks:
                // `y + pt - (k - 1) >= 0` and `y + rows - 1 + pt < oh`.
                let inside = y + g.pt >= g.k - 1 && y + rows + g.pt <= g.oh;
                // SAFETY: forwarded contract; `y + rows <= h`, `x0 < w`.
                unsafe {
                    macro_rules! go {
                        ($r:literal) => {
                            match (g.w - x0 > L, inside) {
                                (true, true) => pass_dx::<$r, 2, false>(g, gp, f, dx, y, x0),
                                (true, false) => pass_dx::<$r, 2, true>(g, gp, f, dx, y, x0),
                                (false, true) => pass_dx::<$r, 1, false>(g, gp, f, dx, y, x0),
                                (false, false) => pass_dx::<$r, 1, true>(g, gp, f, dx, y, x0),
                            }
                        };
                    }
                    match rows {
                        4 => go!(4),
                        3 => go!(3),
                        2 => go!(2),
                        _ => go!(1),
                    }
                }
                y += rows;
            }
            x0 += 2 * L;
        }
    }

    /// Input-gradient rows `y0 .. y0 + R`, columns `x0 .. x0 + NV * 16` (those inside `w`): `R x NV`
    /// accumulators over every tap, ky outer and kx inner (the order of `DwGeom::dx_taps`), each reading
    /// `g[y + pt - ky][x + pl - kx]` with the lanes outside the gradient row masked out. `CHECK`: skip
    /// the taps of rows outside `[0, oh)`.
    ///
    /// # Safety
    /// As [`plane_dx`], and `y0 + R <= h`, `x0 < w`; without `CHECK`, every row read inside `[0, oh)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pass_dx<const R: usize, const NV: usize, const CHECK: bool>(
        g: &DwGeom,
        gp: &[f32],
        f: &[f32],
        dx: &mut [f32],
        y0: usize,
        x0: usize,
    ) {
        let (oh, ow, k) = (g.oh as isize, g.ow as isize, g.k);
        let (pt, pl) = (g.pt as isize, g.pl as isize);
        let gptr = gp.as_ptr();
        // Output lanes of each vector.
        let n: [isize; NV] =
            std::array::from_fn(|v| ((g.w - x0).saturating_sub(v * L)).min(L) as isize);
        // Per kx, the lanes of each vector whose gradient column lies inside the row.
        let mut m = [[0 as __mmask16; NV]; MAX_K];
        for (kx, mk) in m.iter_mut().enumerate().take(k) {
            for (v, mv) in mk.iter_mut().enumerate() {
                let c = x0 as isize + (v * L) as isize + pl - kx as isize;
                *mv = lanes(-c, n[v].min(ow - c));
            }
        }
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for ky in 0..k {
            for (kx, mk) in m.iter().enumerate().take(k) {
                let wv = _mm512_set1_ps(f[ky * k + kx]);
                let c0 = x0 as isize + pl - kx as isize;
                for (r, a) in acc.iter_mut().enumerate() {
                    let sy = (y0 + r) as isize + pt - ky as isize;
                    if CHECK && (sy < 0 || sy >= oh) {
                        continue;
                    }
                    for v in 0..NV {
                        // Only the lanes of `mk[v]` are read: columns inside row `sy` of `g`.
                        let p = gptr.wrapping_offset(sy * ow + c0 + (v * L) as isize);
                        // SAFETY: the masked-out lanes are not accessed; the others lie in `gp`.
                        let gv = unsafe { _mm512_maskz_loadu_ps(mk[v], p) };
                        a[v] = _mm512_add_ps(a[v], _mm512_mul_ps(wv, gv));
                    }
                }
            }
        }
        let op = dx.as_mut_ptr();
        for (r, a) in acc.iter().enumerate() {
            for v in 0..NV {
                let dst = op.wrapping_add((y0 + r) * g.w + x0 + v * L);
                // SAFETY: lanes `[0, n[v])` are columns `x0 + v*L ..` of row `y0 + r` of `dx`.
                unsafe { _mm512_mask_storeu_ps(dst, lanes(0, n[v]), a[v]) };
            }
        }
    }

    /// Output rows `oy .. oy + R`, columns `x0 .. x0 + NV * 16` (those inside `ow`): `R x NV`
    /// accumulators in registers over every tap, kx outer and ky inner (the order of
    /// `DwGeom::fwd_taps`). `CHECK`: skip the taps of rows outside the plane (false only where every
    /// tap's row lies inside it).
    ///
    /// # Safety
    /// As [`plane`], and `oy + R <= oh`, `x0 < ow`; without `CHECK`, rows `oy - pt .. oy + R + k - 1 - pt`
    /// inside `[0, h)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pass<const R: usize, const NV: usize, const CHECK: bool>(
        g: &DwGeom,
        x: &[f32],
        f: &[f32],
        o: &mut [f32],
        oy: usize,
        x0: usize,
    ) {
        let (h, w, k) = (g.h as isize, g.w as isize, g.k);
        let (pt, pl) = (g.pt as isize, g.pl as isize);
        let xp = x.as_ptr();
        // Output lanes of each vector.
        let n: [isize; NV] =
            std::array::from_fn(|v| ((g.ow - x0).saturating_sub(v * L)).min(L) as isize);
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for kx in 0..k {
            let c0 = x0 as isize + kx as isize - pl;
            // The lanes of each vector whose input column lies inside the row.
            let m: [__mmask16; NV] = std::array::from_fn(|v| {
                let c = c0 + (v * L) as isize;
                lanes(-c, n[v].min(w - c))
            });
            for ky in 0..k {
                let wv = _mm512_set1_ps(f[ky * k + kx]);
                for (r, a) in acc.iter_mut().enumerate() {
                    let sy = (oy + r) as isize + ky as isize - pt;
                    if CHECK && (sy < 0 || sy >= h) {
                        continue;
                    }
                    for v in 0..NV {
                        // Only the lanes of `m[v]` are read: columns inside row `sy` of `x`.
                        let p = xp.wrapping_offset(sy * w + c0 + (v * L) as isize);
                        // SAFETY: the masked-out lanes are not accessed; the others lie in `x`.
                        let xv = unsafe { _mm512_maskz_loadu_ps(m[v], p) };
                        a[v] = _mm512_add_ps(a[v], _mm512_mul_ps(wv, xv));
                    }
                }
            }
        }
        let op = o.as_mut_ptr();
        for (r, a) in acc.iter().enumerate() {
            for v in 0..NV {
                let dst = op.wrapping_add((oy + r) * g.ow + x0 + v * L);
                // SAFETY: lanes `[0, n[v])` are output columns `x0 + v*L ..` of row `oy + r`.
                unsafe { _mm512_mask_storeu_ps(dst, lanes(0, n[v]), a[v]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::rand_t;

    /// Bit for bit against the zero-padded path (`DwGeom::pad_image` + `DwGeom::image_fwd`), every padding and width case.
    #[test]
    fn unpadded_forward_gives_the_padded_bits() {
        if !crate::ops::has_avx512() {
            eprintln!(
                "no AVX-512 here: the unpadded depthwise kernel is not used, nothing to compare"
            );
            return;
        }
        for (c, h, w, k, pad) in [
            (3, 28, 28, 3, (0, 0, 0, 0)),
            (2, 26, 26, 3, (0, 0, 0, 0)),
            (4, 12, 12, 3, (0, 0, 0, 0)),
            (2, 28, 28, 3, (1, 1, 1, 1)),
            (2, 28, 28, 5, (2, 2, 2, 2)),
            (1, 9, 40, 5, (2, 1, 0, 3)),
            (2, 7, 7, 3, (0, 1, 1, 0)),
            (1, 8, 8, 3, (3, 2, 2, 3)),
            (2, 5, 17, 5, (2, 1, 0, 3)),
            (2, 6, 5, 1, (0, 0, 0, 0)),
            (1, 33, 70, 3, (1, 1, 1, 1)),
            (1, 3, 3, 3, (0, 0, 0, 0)),
            // Unpadded rows narrower than a vector run flat (`plane_flat`): the separable's 10x10, 8x8
            // and 6x6 outputs, tall and short planes, kernels 1-7, a single output.
            (3, 12, 12, 3, (0, 0, 0, 0)),
            (2, 10, 10, 3, (0, 0, 0, 0)),
            (5, 8, 8, 3, (0, 0, 0, 0)),
            (1, 7, 17, 5, (0, 0, 0, 0)),
            (2, 19, 4, 3, (0, 0, 0, 0)),
            (1, 9, 9, 7, (0, 0, 0, 0)),
            (1, 5, 15, 1, (0, 0, 0, 0)),
            (1, 5, 5, 5, (0, 0, 0, 0)),
        ] {
            let g = DwGeom::new((1, c, h, w), k, 1, pad).unwrap();
            let x = rand_t(&[c * h * w], 31).to_vec1::<f32>().unwrap();
            let f = rand_t(&[c * k * k], 32).to_vec1::<f32>().unwrap();
            let ohw = g.oh * g.ow;
            let mut fast = vec![f32::NAN; c * ohw];
            assert!(image_fwd(&g, &x, &f, &mut fast));
            let mut padded = vec![f32::NAN; c * ohw];
            let mut xd = vec![f32::NAN; g.padded_len()];
            g.pad_image(&x, &mut xd);
            g.image_fwd(&xd, &g.fwd_taps(&f), &mut padded).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&padded), "c{c} {h}x{w} k{k} {pad:?}");
        }
    }

    /// The input gradient bit for bit against the zero-padded path (`DwGeom::plane_dx_padded`), every
    /// padding and width case.
    #[test]
    fn unpadded_input_gradient_gives_the_padded_bits() {
        if !crate::ops::has_avx512() {
            eprintln!("no AVX-512 here: the unpadded input-gradient kernel is not used");
            return;
        }
        for (i, (h, w, k, pad)) in [
            (28, 28, 3, (0, 0, 0, 0)),
            (14, 14, 3, (0, 0, 0, 0)),
            (12, 12, 3, (0, 0, 0, 0)),
            (28, 28, 3, (1, 1, 1, 1)),
            (28, 28, 5, (2, 2, 2, 2)),
            (9, 40, 5, (2, 1, 0, 3)),
            (7, 7, 3, (0, 1, 1, 0)),
            (8, 8, 3, (3, 2, 2, 3)),
            (5, 17, 5, (2, 1, 0, 3)),
            (6, 5, 1, (0, 0, 0, 0)),
            (33, 70, 3, (1, 1, 1, 1)),
            (3, 3, 3, (0, 0, 0, 0)),
            (10, 35, 7, (3, 3, 3, 3)),
        ]
        .into_iter()
        .enumerate()
        {
            let g = DwGeom::new((1, 1, h, w), k, 1, pad).unwrap();
            let seed = 40 + 3 * i as u64;
            let f = rand_t(&[k * k], seed + 1).to_vec1::<f32>().unwrap();
            let gr = rand_t(&[g.oh * g.ow], seed + 2).to_vec1::<f32>().unwrap();
            let mut fast = vec![f32::NAN; h * w];
            assert!(plane_dx(&g, &gr, &f, &mut fast));
            let mut padded = vec![f32::NAN; h * w];
            let mut scratch = vec![f32::NAN; g.bwd_scratch_len()];
            g.plane_dx_padded(&g.dx_taps(&f), &gr, &mut padded, &mut scratch)
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&padded), "{h}x{w} k{k} {pad:?}");
        }
    }

    /// The filter gradient's accumulation bit for bit against the portable kernel, kernels 1, 3 and 5.
    #[test]
    fn filter_gradient_pairs_give_the_portable_bits() {
        if !crate::ops::has_avx512() {
            eprintln!("no AVX-512 here: the paired filter-gradient kernel is not used");
            return;
        }
        for (i, (k, oh, ow)) in [
            (3usize, 26usize, 26usize),
            (3, 12, 12),
            (3, 5, 9),
            (5, 10, 10),
            (5, 24, 17),
            (1, 14, 14),
        ]
        .into_iter()
        .enumerate()
        {
            let ow8 = ow.div_ceil(8) * 8;
            let wp = ow8 + k - 1 + i % 2;
            let seed = 70 + 3 * i as u64;
            let xd = rand_t(&[(oh + k - 1) * wp], seed).to_vec1::<f32>().unwrap();
            let mut gq = rand_t(&[oh * ow8], seed + 1).to_vec1::<f32>().unwrap();
            for row in gq.chunks_exact_mut(ow8) {
                row[ow..].fill(0.0);
            }
            let (mut fast, mut portable) = (vec![f32::NAN; k * k], vec![f32::NAN; k * k]);
            assert!(df_acc((k, oh, ow8, wp), &xd, &gq, &mut fast));
            crate::ops::depthwise::df_s1_portable((k, oh, ow8, wp), &xd, &gq, &mut portable);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&portable), "k{k} {oh}x{ow} wp {wp}");
        }
        assert!(!df_acc(
            (7, 4, 8, 14),
            &[0.0; 200],
            &[0.0; 32],
            &mut [0.0; 49]
        ));
    }

    /// A valid convolution's filter gradient read from the unpadded image: the bits of the padded copy's.
    #[test]
    fn unpadded_filter_gradient_gives_the_padded_bits() {
        if !crate::ops::has_avx512() {
            eprintln!("no AVX-512 here: the unpadded filter gradient is not used");
            return;
        }
        for (i, (c, h, w, k)) in [
            (3usize, 28usize, 28usize, 3usize),
            (2, 14, 14, 3),
            (2, 12, 9, 5),
            (1, 7, 20, 1),
            (4, 10, 10, 3),
        ]
        .into_iter()
        .enumerate()
        {
            let g = DwGeom::new((1, c, h, w), k, 1, (0, 0, 0, 0)).unwrap();
            let seed = 90 + 3 * i as u64;
            let ow8 = g.ow.div_ceil(8) * 8;
            // The image, then as much of "the next image" as the last row's last run reads.
            let x = rand_t(&[c * h * w + ow8 - g.ow], seed)
                .to_vec1::<f32>()
                .unwrap();
            let gr = rand_t(&[c * g.oh * g.ow], seed + 1)
                .to_vec1::<f32>()
                .unwrap();
            let mut gq = vec![f32::NAN; g.oh * ow8];
            let (mut fast, mut padded) = (vec![f32::NAN; c * k * k], vec![f32::NAN; c * k * k]);
            assert!(g.df_reads_unpadded(x.len()));
            assert!(!g.df_reads_unpadded(x.len() - 1) || ow8 == g.ow);
            g.image_df_unpadded(&x, &gr, &mut fast, &mut gq).unwrap();
            let mut xd = vec![f32::NAN; g.padded_len()];
            g.pad_image(&x[..c * h * w], &mut xd);
            g.image_df(&xd, &gr, &mut padded, &mut gq).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&padded), "c{c} {h}x{w} k{k}");
        }
        // Padding or too little to read: not taken.
        let same = DwGeom::new((1, 1, 8, 8), 3, 1, (1, 1, 1, 1)).unwrap();
        assert!(!same.df_reads_unpadded(1 << 20));
        let valid = DwGeom::new((1, 1, 12, 12), 3, 1, (0, 0, 0, 0)).unwrap();
        assert!(!valid.df_reads_unpadded(144));
    }

    #[test]
    fn other_strides_are_left_to_the_caller() {
        let g = DwGeom::new((1, 1, 8, 8), 3, 2, (0, 0, 0, 0)).unwrap();
        let mut out = vec![0f32; g.oh * g.ow];
        assert!(!image_fwd(&g, &[0.0; 64], &[0.0; 9], &mut out));
    }
}

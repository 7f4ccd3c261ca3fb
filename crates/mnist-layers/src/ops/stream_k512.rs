//! Two streaming loops of the training step on AVX-512, each with the same per-value arithmetic as its
//! portable twin, so the same bits:
//!
//! - the 2x2 / stride-2 max pool with its argmax ([`pool2x2`], twin `pool::pool2x2`): 16 outputs a vector,
//!   each window's columns de-interleaved from two loads, the same strict comparisons (`>`, false for
//!   NaN) choosing the same value and index; and without the argmax for inference ([`pool2x2_max`], twin
//!   `pool::pool_max`);
//! - BatchNorm's backward sums of one plane in one pass ([`sum_and_dot_dev`], twins `sum_f32` and
//!   `bn::dot_dev`): both sets of 16 f32 lane accumulators fed from one load of each value (the compiler
//!   left the two-sum loop scalar), the lanes and the remainder added in f64 as the twins add them.

/// Lanes of a vector.
const L: usize = 16;

/// `pool::pool2x2` on AVX-512: `out [oh, ow]` and `arg [oh, ow]` (index in the plane) from the plane `x`
/// with rows `w` long, or `false` (nothing written) where the CPU has no AVX-512 or a buffer is short.
pub(crate) fn pool2x2(
    w: usize,
    (oh, ow): (usize, usize),
    x: &[f32],
    out: &mut [f32],
    arg: &mut [u32],
) -> bool {
    pool2x2_with::<true>(w, (oh, ow), x, out, arg)
}

/// [`pool2x2`] without the argmax: `out [oh, ow]` only, the values of the inference pool's portable
/// loop (`PoolGeom::plane_max`: the later of two equal values never wins, NaN never replaces).
pub(crate) fn pool2x2_max(w: usize, (oh, ow): (usize, usize), x: &[f32], out: &mut [f32]) -> bool {
    pool2x2_with::<false>(w, (oh, ow), x, out, &mut [])
}

fn pool2x2_with<const ARG: bool>(
    w: usize,
    (oh, ow): (usize, usize),
    x: &[f32],
    out: &mut [f32],
    arg: &mut [u32],
) -> bool {
    // The last window row ends at `(2 oh - 1) w + 2 ow`; indices must fit in u32 as the twin's do.
    let need = if oh == 0 {
        0
    } else {
        (2 * oh - 1) * w + 2 * ow
    };
    if 2 * ow > w
        || x.len() < need
        || out.len() < oh * ow
        || (ARG && arg.len() < oh * ow)
        || need > u32::MAX as usize
        || !super::has_avx512()
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX-512F is available and the buffers hold what the kernel reads and writes (checked
        // above).
        unsafe { k512::pool2x2::<ARG>(w, (oh, ow), x, out, arg) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `(sum_f32(a), dot_dev(a, b, m))` in one pass on AVX-512 (the same bits), or `None` where the CPU has no
/// AVX-512 or `b` is shorter than `a`.
pub(crate) fn sum_and_dot_dev(a: &[f32], b: &[f32], m: f32) -> Option<(f64, f64)> {
    if b.len() < a.len() || !super::has_avx512() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX-512F is available and `b` is at least as long as `a` (checked above).
        let (sum, dot) = unsafe { k512::lane_sums(a, b, m) };
        let whole = a.len() - a.len() % L;
        // The twins' own reductions of the lanes and the values past them.
        let (ra, rb) = (&a[whole..], &b[whole..a.len()]);
        Some((
            super::finish_sum(&sum, ra),
            super::bn::finish_dot_dev(&dot, ra, rb, m),
        ))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
mod k512 {
    use super::L;
    use std::arch::x86_64::*;

    /// The first `n` lanes (`n <= 16`).
    #[inline(always)]
    fn first(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// See [`super::pool2x2`].
    ///
    /// # Safety
    /// AVX-512F must be available; `2 ow <= w`, `x.len() >= (2 oh - 1) w + 2 ow` (when `oh > 0`),
    /// `out.len()` and (with `ARG`) `arg.len() >= oh * ow`, and every index below `x.len()` fits in
    /// u32. Without `ARG`, `arg` is not touched.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pool2x2<const ARG: bool>(
        w: usize,
        (oh, ow): (usize, usize),
        x: &[f32],
        out: &mut [f32],
        arg: &mut [u32],
    ) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let one = _mm512_set1_epi32(1);
        let xp = x.as_ptr();
        // Columns `[0, 2n)` of a row from `p`: the windows' left and right columns.
        // SAFETY (both loads): the caller's `p` starts `2n` readable values; masked-out lanes are not
        // read, so `p + 16` is only dereferenced where `2n > 16`.
        let cols = |p: *const f32, n: usize| unsafe {
            let lo = _mm512_maskz_loadu_ps(first((2 * n).min(L)), p);
            let hi = _mm512_maskz_loadu_ps(first((2 * n).saturating_sub(L)), p.wrapping_add(L));
            (
                _mm512_permutex2var_ps(lo, even, hi),
                _mm512_permutex2var_ps(lo, odd, hi),
            )
        };
        // The row's better column of each window and its index (`i0` the left column's): the right
        // one only where it is strictly greater, as the twin.
        let best = |(l, r): (__m512, __m512), i0: __m512i| {
            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(r, l);
            (
                _mm512_mask_blend_ps(gt, l, r),
                _mm512_mask_add_epi32(i0, gt, i0, one),
            )
        };
        for oy in 0..oh {
            let (r0, r1) = (2 * oy * w, (2 * oy + 1) * w);
            let mut ox = 0;
            while ox < ow {
                let n = (ow - ox).min(L);
                let i = _mm512_add_epi32(_mm512_set1_epi32((r0 + 2 * ox) as i32), even);
                let j = _mm512_add_epi32(_mm512_set1_epi32((r1 + 2 * ox) as i32), even);
                // Rows `2 oy` and `2 oy + 1` hold columns `[2 ox, 2 ox + 2n)` (`2 ow <= w`, and the
                // caller's `x` reaches `(2 oh - 1) w + 2 ow`).
                let (v1, i1) = best(cols(xp.wrapping_add(r0 + 2 * ox), n), i);
                let (v2, i2) = best(cols(xp.wrapping_add(r1 + 2 * ox), n), j);
                let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v2, v1);
                let k = first(n);
                let at = oy * ow + ox;
                // SAFETY: outputs `[at, at + n)` lie below `oh * ow <= out.len(), arg.len()`.
                unsafe {
                    _mm512_mask_storeu_ps(
                        out.as_mut_ptr().add(at),
                        k,
                        _mm512_mask_blend_ps(gt, v1, v2),
                    );
                    if ARG {
                        _mm512_mask_storeu_epi32(
                            arg.as_mut_ptr().add(at).cast(),
                            k,
                            _mm512_mask_blend_epi32(gt, i1, i2),
                        );
                    }
                }
                ox += n;
            }
        }
    }

    /// The 16 f32 lane accumulators of `sum_f32(a)` and of `dot_dev(a, b, m)` over `a`'s whole vectors:
    /// `s += a` and `d += a * (b - m)` (multiply and add unfused, as the twins).
    ///
    /// # Safety
    /// AVX-512F must be available and `b.len() >= a.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn lane_sums(a: &[f32], b: &[f32], m: f32) -> ([f32; L], [f32; L]) {
        let mv = _mm512_set1_ps(m);
        let (mut s, mut d) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for v in 0..a.len() / L {
            // SAFETY: values `[16 v, 16 v + 16)` lie inside `a` and `b` (`b.len() >= a.len()`).
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(a.as_ptr().add(v * L)),
                    _mm512_loadu_ps(b.as_ptr().add(v * L)),
                )
            };
            s = _mm512_add_ps(s, x);
            d = _mm512_add_ps(d, _mm512_mul_ps(x, _mm512_sub_ps(y, mv)));
        }
        let (mut so, mut dout) = ([0f32; L], [0f32; L]);
        // SAFETY: both arrays hold 16 values.
        unsafe {
            _mm512_storeu_ps(so.as_mut_ptr(), s);
            _mm512_storeu_ps(dout.as_mut_ptr(), d);
        }
        (so, dout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::rand_t;

    /// Random values with ties, signed zeros, infinities and NaNs mixed in.
    fn awkward(n: usize, seed: u64) -> Vec<f32> {
        let r: Vec<f32> = rand_t(&[n.max(1)], seed)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        r.iter()
            .take(n)
            .enumerate()
            .map(|(i, &v)| match i % 23 {
                3 => 0.0,
                7 => -0.0,
                11 => f32::NAN,
                13 => f32::INFINITY,
                17 => f32::NEG_INFINITY,
                19 | 20 => 0.5, // a tie with its neighbour
                _ => v,
            })
            .collect()
    }

    #[test]
    fn vector_pool_gives_the_scalar_values_and_indices() {
        if !crate::ops::has_avx512() {
            eprintln!("no AVX-512 here: the vector pool is not used, nothing to compare");
            return;
        }
        // The models' 24x24 and 26x26 planes, odd sizes (the last row and column unused), rows wider
        // than a vector, and a plane with a single window.
        for (h, w) in [
            (24, 24),
            (26, 26),
            (12, 12),
            (7, 9),
            (2, 2),
            (3, 3),
            (40, 70),
            (5, 33),
        ] {
            let (oh, ow) = (h / 2, w / 2);
            let x = awkward(h * w, (h * 131 + w) as u64);
            let (mut o1, mut a1) = (vec![f32::NAN; oh * ow], vec![u32::MAX; oh * ow]);
            let (mut o2, mut a2) = (vec![0f32; oh * ow], vec![0u32; oh * ow]);
            crate::ops::pool::pool2x2_portable(w, oh, ow, &x, &mut o2, &mut a2);
            assert!(pool2x2(w, (oh, ow), &x, &mut o1, &mut a1), "{h}x{w}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o1), bits(&o2), "{h}x{w} values");
            assert_eq!(a1, a2, "{h}x{w} indices");
            // Values only, as the inference pool's portable loop computes them, also with rows
            // further apart than the plane is wide (the direct kernel's wide layout).
            for rs in [w, w + 3] {
                let x = awkward(h * rs, (h * 17 + rs) as u64);
                let g = crate::ops::pool::PoolGeom::new(h, w, 2, 2, (0, 0, 0, 0)).unwrap();
                let (mut o3, mut o4) = (vec![f32::NAN; oh * ow], vec![0f32; oh * ow]);
                assert!(pool2x2_max(rs, (oh, ow), &x, &mut o3), "{h}x{w} / {rs}");
                crate::ops::pool::pool_max(&g, &x, rs, &mut o4);
                assert_eq!(bits(&o3), bits(&o4), "{h}x{w} / {rs} values only");
            }
        }
        // A short input is refused, nothing written.
        let mut o = vec![7f32; 4];
        let mut a = vec![7u32; 4];
        assert!(!pool2x2(4, (2, 2), &[0.0; 10], &mut o, &mut a));
        assert_eq!((o, a), (vec![7f32; 4], vec![7u32; 4]));
    }

    #[test]
    fn one_pass_sums_give_the_two_passes_bits() {
        if !crate::ops::has_avx512() {
            eprintln!("no AVX-512 here: the one-pass sums are not used, nothing to compare");
            return;
        }
        for n in [0, 1, 15, 16, 17, 36, 64, 100, 144, 576, 676, 1000] {
            let a: Vec<f32> = awkward(n, n as u64 + 1)
                .into_iter()
                .map(|v| if v.is_finite() { v } else { 0.25 })
                .collect();
            let b: Vec<f32> = rand_t(&[n.max(1)], n as u64 + 99)
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let m = 0.3f32;
            let (s, d) = sum_and_dot_dev(&a, &b[..n], m).unwrap();
            let s2 = crate::ops::sum_f32(&a);
            let d2 = crate::ops::bn::dot_dev(&a, &b[..n], m);
            assert_eq!(
                (s.to_bits(), d.to_bits()),
                (s2.to_bits(), d2.to_bits()),
                "n = {n}"
            );
        }
        assert_eq!(sum_and_dot_dev(&[1.0; 4], &[1.0; 3], 0.0), None);
    }
}

//! One vector of floats as a trait ([`Lane`]), so that a kernel is written once and runs on AVX-512
//! registers, on a portable array of 16 floats or on one `f32`, with the same operations in the same
//! order in every lane (so the same bits), and F(4, 3)'s one-axis Winograd transforms over it (used by
//! the per-image row kernel, `winograd.rs`, and the across-images one, `block/lanes.rs`).

/// Lanes of [`Port`] and [`K512`].
const L: usize = 16;

/// F(4x4, 3x3)'s filter transform `G` (6 x 3) of Lavin and Gray (points 0, ±1, ±2, infinity), exact in
/// `f64`; the weights are transformed once per call and rounded once. Its `B^T` and `A^T` are spelled
/// out with shared sums in [`in6`] and [`out4`].
pub(crate) const G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// One vector of floats: `f32` (one lane), [`Port`] (16 lanes, portable) or [`K512`] (16 lanes of
/// AVX-512), each doing the same operations lane by lane, so the same bits.
///
/// # Safety
/// The AVX-512 instance may only be used where the CPU has AVX-512F (inside a function compiled for
/// it); the pointers of `load` / `store` must address as many floats as the vector has lanes.
pub(crate) trait Lane: Copy {
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    /// `self * b + c`, rounded once.
    unsafe fn fma(self, b: Self, c: Self) -> Self;
    /// `b` where `b > self`, else `self` (the pools' maximum).
    unsafe fn max(self, b: Self) -> Self;
    /// `self` where `self > 0`, else `+0` (a NaN gives 0, as the per-image kernels' `max(y, 0)`).
    unsafe fn relu(self) -> Self;
    /// Lane `i` from `*p.add(i * stride)` for `i < n`, zero for the others.
    unsafe fn gather(p: *const f32, stride: usize, n: usize) -> Self;
    /// Lane `i` to `*p.add(i * stride)` for `i < n`.
    unsafe fn scatter(self, p: *mut f32, stride: usize, n: usize);
}

/// The portable instance of 16 lanes: the same operations lane by lane.
#[derive(Clone, Copy)]
pub(crate) struct Port(pub(crate) [f32; L]);

impl Port {
    #[inline(always)]
    fn map2(self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Port(std::array::from_fn(|i| f(self.0[i], b.0[i])))
    }
}

impl Lane for Port {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Port([0.0; L])
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Port([v; L])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: `p` addresses `L` floats (the trait's contract).
        Port(unsafe { p.cast::<[f32; L]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: as `load`.
        unsafe { p.cast::<[f32; L]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self.map2(b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self.map2(b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        Port(std::array::from_fn(|i| self.0[i].mul_add(b.0[i], c.0[i])))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        self.map2(b, |x, y| if y > x { y } else { x })
    }
    #[inline(always)]
    unsafe fn relu(self) -> Self {
        Port(self.0.map(|x| if x > 0.0 { x } else { 0.0 }))
    }
    #[inline(always)]
    unsafe fn gather(p: *const f32, stride: usize, n: usize) -> Self {
        // SAFETY: the trait's contract.
        Port(std::array::from_fn(|i| {
            if i < n {
                unsafe { *p.add(i * stride) }
            } else {
                0.0
            }
        }))
    }
    #[inline(always)]
    unsafe fn scatter(self, p: *mut f32, stride: usize, n: usize) {
        for (i, &v) in self.0.iter().enumerate().take(n) {
            // SAFETY: the trait's contract.
            unsafe { *p.add(i * stride) = v };
        }
    }
}

/// `B^T d` of F(4, 3) for six values along one axis, with the sums and differences the rows share
/// (the per-image kernel's `in_rows`: `4d0 - 5d2 + d4`, `(d3 + d4) - 4(d1 + d2)`, `(d4 - d3) + 4(d1 -
/// d2)`, `(d4 - d2) +- 2(d3 - d1)`, `4d1 - 5d3 + d5`).
#[inline(always)]
pub(crate) unsafe fn in6<V: Lane>(d: [V; 6]) -> [V; 6] {
    // SAFETY: the caller's (the trait's contract).
    unsafe {
        let c = V::splat;
        let (s12, s34) = (d[1].add(d[2]), d[3].add(d[4]));
        let (d12, e43) = (d[1].sub(d[2]), d[4].sub(d[3]));
        let (f31, e42) = (d[3].sub(d[1]), d[4].sub(d[2]));
        [
            d[0].fma(c(4.0), d[2].fma(c(-5.0), d[4])),
            s12.fma(c(-4.0), s34),
            d12.fma(c(4.0), e43),
            f31.fma(c(2.0), e42),
            f31.fma(c(-2.0), e42),
            d[1].fma(c(4.0), d[3].fma(c(-5.0), d[5])),
        ]
    }
}

/// `A^T m` of F(4, 3) for the six points along one axis (the per-image kernel's `out_rows`).
#[inline(always)]
pub(crate) unsafe fn out4<V: Lane>(m: [V; 6]) -> [V; 4] {
    // SAFETY: the caller's.
    unsafe {
        let (s12, d12) = (m[1].add(m[2]), m[1].sub(m[2]));
        let (s34, d34) = (m[3].add(m[4]), m[3].sub(m[4]));
        [
            m[0].add(s12).add(s34),
            d34.fma(V::splat(2.0), d12),
            s34.fma(V::splat(4.0), s12),
            d34.fma(V::splat(8.0), d12).add(m[5]),
        ]
    }
}

/// The one-lane instance (the per-image Winograd kernel's portable twin).
impl Lane for f32 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the trait's contract.
        unsafe { *p = self }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self - b
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        self.mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        if b > self {
            b
        } else {
            self
        }
    }
    #[inline(always)]
    unsafe fn relu(self) -> Self {
        if self > 0.0 {
            self
        } else {
            0.0
        }
    }
    #[inline(always)]
    unsafe fn gather(p: *const f32, _stride: usize, n: usize) -> Self {
        // SAFETY: the trait's contract.
        if n > 0 {
            unsafe { *p }
        } else {
            0.0
        }
    }
    #[inline(always)]
    unsafe fn scatter(self, p: *mut f32, _stride: usize, n: usize) {
        if n > 0 {
            // SAFETY: the trait's contract.
            unsafe { *p = self }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use k512::K512;

#[cfg(target_arch = "x86_64")]
mod k512 {
    use super::Lane;
    use std::arch::x86_64::*;

    /// The AVX-512 instance of [`Lane`].
    #[derive(Clone, Copy)]
    pub(crate) struct K512(pub(crate) __m512);

    // SAFETY (of every method): only used inside functions compiled for AVX-512F (the trait's contract).
    impl Lane for K512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { K512(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { K512(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { K512(_mm512_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            unsafe { K512(_mm512_add_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            unsafe { K512(_mm512_sub_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            unsafe { K512(_mm512_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            // `vmaxps(b, self)`: `b` where `b > self`, else `self`.
            unsafe { K512(_mm512_max_ps(b.0, self.0)) }
        }
        #[inline(always)]
        unsafe fn relu(self) -> Self {
            // `vmaxps(self, 0)`: `self` where `self > 0`, else 0 (NaN too).
            unsafe { K512(_mm512_max_ps(self.0, _mm512_setzero_ps())) }
        }
        #[inline(always)]
        unsafe fn gather(p: *const f32, stride: usize, n: usize) -> Self {
            unsafe {
                let idx = _mm512_mullo_epi32(lane_ids(), _mm512_set1_epi32(stride as i32));
                let mask = ((1u32 << n) - 1) as __mmask16;
                K512(_mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    mask,
                    idx,
                    p,
                ))
            }
        }
        #[inline(always)]
        unsafe fn scatter(self, p: *mut f32, stride: usize, n: usize) {
            unsafe {
                let idx = _mm512_mullo_epi32(lane_ids(), _mm512_set1_epi32(stride as i32));
                let mask = ((1u32 << n) - 1) as __mmask16;
                _mm512_mask_i32scatter_ps::<4>(p, mask, idx, self.0)
            }
        }
    }

    /// `[0, 1, .., 15]`.
    #[inline(always)]
    unsafe fn lane_ids() -> __m512i {
        unsafe { _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15) }
    }
}

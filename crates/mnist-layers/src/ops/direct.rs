//! Direct stride-1 convolution, one image at a time, no im2col matrix (its backward pass for training is in
//! `direct_grad.rs`).
//!
//! The output is computed in the "wide" layout of [`super::conv`]: with the zero-padded image
//! `xp [c, hp, wp]` flattened, output pixel `(oy, ox)` of channel `oc` is column `n = oy*wp + ox` of
//! `out [o, nwide]` and equals `sum_{ci,ky,kx} w[oc,ci,ky,kx] * xp[ci*hp*wp + ky*wp + kx + n]`; the columns
//! with `ox >= ow` (and `n >= oh*wp`) are garbage and are never read back. Every tap is thus a contiguous
//! run of `xp`, and the kernel is a register-blocked tile of `OB` output channels x `NV` vectors of
//! `L` columns accumulated over all taps (fused multiply-add), with the bias / ReLU / per-channel
//! affine epilogue applied before the single store.
//!
//! Instances: AVX-512 (16 lanes), AVX2 + FMA (8 lanes) and a portable baseline (plain `a * b + c`),
//! chosen at run time. The summation order over the taps is the same everywhere and never depends on the
//! thread count (one image is one call); the AVX-512 and AVX2 kernels give bit-identical results (the same
//! fused multiply-adds per output), the portable one differs by rounding.

use std::mem::MaybeUninit;

use candle_core::Result;

use super::{copy_row, zero_row, Pad4};

/// Columns of `out` are padded to a multiple of this (the widest vector).
const ALIGN: usize = 16;

/// What happens to an accumulated output `v` of channel `oc` before it is stored:
/// `affine(relu?(v + bias[oc]))` with `affine(y) = y * scale[oc] + shift[oc]`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub relu: bool,
    /// `(scale, shift)`, per output channel.
    pub affine: Option<(&'a [f32], &'a [f32])>,
}

impl Epilogue<'_> {
    /// True when its per-channel vectors hold (at least) `o` values.
    pub(crate) fn fits(&self, o: usize) -> bool {
        self.bias.is_none_or(|b| b.len() >= o)
            && self
                .affine
                .is_none_or(|(s, t)| s.len() >= o && t.len() >= o)
    }
}

/// A prepared stride-1 convolution `x [c, h, w] -> out [o, oh, ow]` (kept in the wide layout).
#[derive(Debug, Clone)]
pub(crate) struct DirectConv {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
    pub hp: usize,
    pub wp: usize,
    /// Output channels per register tile (1, 2, 4 or 5).
    ob: usize,
    /// `o` rounded up to a multiple of `ob`.
    o_pad: usize,
    /// Weights `[c*k*k, o_pad]` (transposed; the padding channels are zero).
    wt: Vec<f32>,
    /// Offset in `xp` of every tap `(ci, ky, kx)`.
    pub toff: Vec<usize>,
    /// Row stride of the output planes: `oh*wp` rounded up to [`ALIGN`].
    pub nwide: usize,
    /// Length of the padded input buffer (`c*hp*wp` plus zeros that the last tiles read).
    pub xp_len: usize,
    /// Per 16-lane vector of the wide layout, where its lanes go in the compact `[oh, ow]` plane
    /// ([`Self::compact_segs`]); empty where the rows are too short for three segments a vector.
    segs: Vec<Segments>,
}

/// Up to three `(shift, lane mask)` segments of one 16-lane vector: the lanes of one output row each.
pub(crate) type Segments = [(usize, u16); 3];

/// The output-channel block for `o` channels: few wasted (zero) channels, few weight loads per FMA.
pub(crate) fn pick_ob(o: usize) -> usize {
    [5usize, 4, 2, 1]
        .into_iter()
        .min_by_key(|&ob| {
            let pad = o.div_ceil(ob) * ob;
            pad + pad / ob
        })
        .unwrap_or(1)
}

impl DirectConv {
    /// Prepares the convolution of `[c, h, w]` images with `w [o, c, k, k]` (row-major), stride 1 and
    /// zero padding `pad = (top, left, bottom, right)`.
    pub(crate) fn new(
        (c, h, w): (usize, usize, usize),
        weight: &[f32],
        (o, k): (usize, usize),
        pad: Pad4,
    ) -> Result<Self> {
        let (pt, pl, pb, pr) = pad;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        if c == 0 || o == 0 || k == 0 || hp < k || wp < k || weight.len() != o * c * k * k {
            candle_core::bail!(
                "direct conv: weight of {} values does not fit [o {o}, c {c}, k {k}, k {k}] on \
                 [{c}, {h}, {w}] padded by {pad:?}",
                weight.len()
            )
        }
        let (oh, ow) = (hp - k + 1, wp - k + 1);
        let ob = pick_ob(o);
        let o_pad = o.div_ceil(ob) * ob;
        let taps = c * k * k;
        let mut wt = vec![0f32; taps * o_pad];
        for oc in 0..o {
            for t in 0..taps {
                wt[t * o_pad + oc] = weight[oc * taps + t];
            }
        }
        let toff: Vec<usize> = (0..taps)
            .map(|t| {
                let (ci, ky, kx) = (t / (k * k), t / k % k, t % k);
                ci * hp * wp + ky * wp + kx
            })
            .collect();
        let nwide = (oh * wp).div_ceil(ALIGN) * ALIGN;
        let max_off = toff.iter().copied().max().unwrap_or(0);
        let xp_len = (c * hp * wp).max(max_off + nwide);
        let segs = Self::compact_segs(oh, ow, wp, nwide).unwrap_or_default();
        Ok(Self {
            c,
            h,
            w,
            o,
            pt,
            pl,
            oh,
            ow,
            hp,
            wp,
            ob,
            o_pad,
            wt,
            toff,
            nwide,
            xp_len,
            segs,
        })
    }

    /// This convolution with every column of its `wp`-wide rows an output (`ow = wp`), for an input
    /// laid out so that the taps past a row's end read zeros, after `lead` floats before the first
    /// plane that the taps at its start read (the input-gradient layout of
    /// [`DirectConv::input_grad_shared`]).
    pub(crate) fn all_columns(mut self, lead: usize) -> Self {
        self.ow = self.wp;
        self.segs = Self::compact_segs(self.oh, self.ow, self.wp, self.nwide).unwrap_or_default();
        self.xp_len = self.xp_len.max(lead + self.c * self.hp * self.wp);
        self
    }

    /// For each 16-lane vector of the wide layout (`nwide / 16` of them), its output lanes grouped by
    /// row: lane `j` of vector `v` is wide column `n = 16v + j`, output `(n / wp, n % wp)` when
    /// `n / wp < oh` and `n % wp < ow`, compact index `n - (n / wp) * (wp - ow)`; one `(shift, mask)` per
    /// row. `None` where a vector would need more than three (rows under 8 wide). Row by row, so the
    /// cost is that of the rows and vectors (it runs for every prepared convolution), not of each lane.
    fn compact_segs(oh: usize, ow: usize, wp: usize, nwide: usize) -> Option<Vec<Segments>> {
        let nv = nwide / 16;
        let mut segs: Vec<Segments> = vec![[(0, 0); 3]; nv];
        let mut used = vec![0usize; nv];
        for r in 0..oh {
            // Row `r`'s outputs are wide columns `a..b`, all with the same shift.
            let (a, b, shift) = (r * wp, (r * wp + ow).min(nv * 16), r * (wp - ow));
            let mut n = a;
            while n < b {
                let (v, lo) = (n / 16, n % 16);
                let hi = (b - v * 16).min(16);
                let mask = ((1u32 << hi) - (1u32 << lo)) as u16;
                // Rows come in order, so a shift seen before in this vector is its last segment's
                // (`wp == ow`: every row's shift is 0, one segment).
                let k = used[v];
                if k > 0 && segs[v][k - 1].0 == shift {
                    segs[v][k - 1].1 |= mask;
                } else if k < 3 {
                    segs[v][k] = (shift, mask);
                    used[v] += 1;
                } else {
                    return None;
                }
                n = v * 16 + hi;
            }
        }
        Some(segs)
    }

    /// True where [`Self::run_compact_stores`] runs (this CPU has AVX-512, the rows are 8 or more wide).
    pub(crate) fn has_compact_stores(&self) -> bool {
        !self.segs.is_empty() && super::has_avx512()
    }

    /// [`Self::run_uninit`] with the outputs stored straight into the compact `out [o, oh*ow]` (every
    /// value written) instead of the wide layout: `Ok(false)`, nothing written, where this CPU or
    /// geometry has no compact stores (no AVX-512, rows under 8 wide). The same values as `run` then
    /// [`Self::compact_into`].
    pub(crate) fn run_compact_stores(
        &self,
        xp: &[f32],
        epi: &Epilogue,
        out: &mut [MaybeUninit<f32>],
    ) -> Result<bool> {
        #[cfg(target_arch = "x86_64")]
        {
            if !self.has_compact_stores() {
                return Ok(false);
            }
            let epi_ok = epi.fits(self.o);
            // `tile_in_bounds` without its output check: the output is the compact `[o, oh*ow]`.
            if !tile_in_bounds(self, xp, self.out_len())
                || !epi_ok
                || out.len() < self.o * self.oh * self.ow
                || self.segs.len() != self.nwide / 16
            {
                candle_core::bail!(
                    "direct conv: buffers of {} / {} floats for a compact [{}, {}] output needing {} / {}",
                    xp.len(),
                    out.len(),
                    self.o,
                    self.oh * self.ow,
                    self.xp_len,
                    self.o * self.oh * self.ow
                )
            }
            // SAFETY: AVX-512F, AVX2 and FMA are present; the input, weights and epilogue fit (checked
            // above) and every segment addresses an output inside its `oh * ow` plane of `out`.
            unsafe { k512::run::<true>(self, xp, epi, out) };
            Ok(true)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (xp, epi, out);
            Ok(false)
        }
    }

    /// The kernel size `k` (of `k x k`).
    pub(crate) fn k(&self) -> usize {
        self.hp - self.oh + 1
    }

    /// Length of the output buffer `[o, nwide]`.
    pub(crate) fn out_len(&self) -> usize {
        self.o * self.nwide
    }

    /// Copies `x [c, h, w]` into the zero-padded `xp` (length [`Self::xp_len`]): only the border and the
    /// tail are zeroed, rows are copied without `memcpy` calls.
    pub(crate) fn pad_into(&self, x: &[f32], xp: &mut [f32]) {
        let (h, w, hp, wp) = (self.h, self.w, self.hp, self.wp);
        let plane = hp * wp;
        let (planes, tail) = xp.split_at_mut(self.c * plane);
        for (dst, src) in planes.chunks_exact_mut(plane).zip(x.chunks_exact(h * w)) {
            let (top, rest) = dst.split_at_mut(self.pt * wp);
            zero_row(top);
            let (rows, bottom) = rest.split_at_mut(h * wp);
            zero_row(bottom);
            if self.pl == 0 && wp == w {
                copy_row(rows, src);
                continue;
            }
            for (drow, srow) in rows.chunks_exact_mut(wp).zip(src.chunks_exact(w)) {
                let (left, rest) = drow.split_at_mut(self.pl);
                zero_row(left);
                let (mid, right) = rest.split_at_mut(w);
                copy_row(mid, srow);
                zero_row(right);
            }
        }
        zero_row(tail);
    }

    /// The padded image that [`Self::run`] and [`DirectConv::weight_grad`] read, for the image at the
    /// start of `x`: `x` itself when the convolution pads nothing and `x` holds [`Self::xp_len`] values
    /// (the image, then what follows it in the batch), else the image padded into `buf`
    /// ([`Self::pad_into`]). Values past the image only ever meet the wide layout's columns that are not
    /// outputs: `run` writes garbage there that is never read back, and the weight gradient multiplies
    /// them by the gradient's zeros. Saves a copy of every image for the unpadded ("valid") convolutions.
    pub(crate) fn padded<'a>(&self, x: &'a [f32], buf: &'a mut [f32]) -> &'a [f32] {
        let unpadded = self.pt == 0 && self.pl == 0 && self.hp == self.h && self.wp == self.w;
        if unpadded && x.len() >= self.xp_len {
            return &x[..self.xp_len];
        }
        self.pad_into(x, buf);
        buf
    }

    /// `out [o, nwide] = epilogue(conv(xp))` (wide layout) from the padded image `xp`. An error when
    /// the buffers are smaller than [`Self::xp_len`] and [`Self::out_len`] or the epilogue's vectors
    /// shorter than `o` (the callers size them: only a bug here can cause it).
    pub(crate) fn run(&self, xp: &[f32], epi: &Epilogue, out: &mut [f32]) -> Result<()> {
        // SAFETY: `run_uninit` only writes initialised values through it.
        let out = unsafe { super::uninit_view(out) };
        self.run_uninit(xp, epi, out)
    }

    /// [`Self::run`] into values not written yet (a result built without zero-filling it): when it
    /// returns `Ok`, every one of the first [`Self::out_len`] values of `out` is written (each tile
    /// stores all of its `L`-lane vectors, and the tiles cover every channel and all `nwide` columns).
    pub(crate) fn run_uninit(
        &self,
        xp: &[f32],
        epi: &Epilogue,
        out: &mut [MaybeUninit<f32>],
    ) -> Result<()> {
        let epi_ok = epi.fits(self.o);
        if !tile_in_bounds(self, xp, out.len()) || !epi_ok {
            candle_core::bail!(
                "direct conv: buffers of {} / {} floats for a [{}, {}] convolution needing {} / {}",
                xp.len(),
                out.len(),
                self.o,
                self.nwide,
                self.xp_len,
                self.out_len()
            )
        }
        #[cfg(target_arch = "x86_64")]
        {
            if super::has_avx512() {
                // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked just above) and the
                // buffers fit (checked above).
                unsafe { k512::run::<false>(self, xp, epi, out) };
                return Ok(());
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above) and the buffers fit.
                unsafe { k256::run::<false>(self, xp, epi, out) };
                return Ok(());
            }
        }
        // SAFETY: the buffers fit (checked above).
        unsafe { run_generic(self, xp, epi, out) };
        Ok(())
    }

    /// Output row `oy` of channel `oc` (`ow` values) in a wide buffer from [`Self::run`].
    #[inline]
    pub(crate) fn row<'a>(&self, out: &'a [f32], oc: usize, oy: usize) -> &'a [f32] {
        debug_assert!(oc < self.o && oy < self.oh);
        let s = oc * self.nwide + oy * self.wp;
        &out[s..s + self.ow]
    }
}

/// The buffers fit: `xp` holds every tap's run of `nwide` floats (so any tile with `n0 + NV*L <= nwide`
/// reads inside it), `wt` is `[taps, o_pad]` and `out` holds `[o, nwide]`.
fn tile_in_bounds(dc: &DirectConv, xp: &[f32], out_len: usize) -> bool {
    xp.len() >= dc.xp_len
        && out_len >= dc.out_len()
        && dc.o_pad.is_multiple_of(dc.ob)
        && dc.wt.len() == dc.toff.len() * dc.o_pad
        && dc.toff.iter().all(|&off| off + dc.nwide <= dc.xp_len)
}

/// One tile: channels `o0..o0+OB`, columns `n0..n0 + NV*L`.
///
/// # Safety
/// [`tile_in_bounds`] holds for `dc`, `xp` and `out`, `n0 + NV*L <= dc.nwide` and `o0 + OB <= dc.o_pad`
/// (the reads of `xp` and of the weights are unchecked), and the epilogue's vectors hold `dc.o` values.
#[inline(always)]
unsafe fn tile<const L: usize, const OB: usize, const NV: usize>(
    dc: &DirectConv,
    xp: &[f32],
    epi: &Epilogue,
    out: &mut [MaybeUninit<f32>],
    o0: usize,
    n0: usize,
) {
    let mut acc = [[[0f32; L]; NV]; OB];
    let op = dc.o_pad;
    debug_assert!(n0 + NV * L <= dc.nwide && o0 + OB <= op);
    let (xptr, wptr) = (xp.as_ptr(), dc.wt.as_ptr());
    for (t, &off) in dc.toff.iter().enumerate() {
        let mut xv = [[0f32; L]; NV];
        for (v, xvv) in xv.iter_mut().enumerate() {
            // SAFETY: `off + n0 + (v+1)*L <= off + n0 + NV*L <= xp.len()` (the caller's contract);
            // unaligned read of plain floats.
            *xvv = unsafe {
                xptr.add(off + n0 + v * L)
                    .cast::<[f32; L]>()
                    .read_unaligned()
            };
        }
        for (j, accj) in acc.iter_mut().enumerate() {
            // SAFETY: `t * op + o0 + j < (t + 1) * op <= wt.len()` (the caller's contract).
            let wj = unsafe { *wptr.add(t * op + o0 + j) };
            for (av, xvv) in accj.iter_mut().zip(&xv) {
                for (a, &x) in av.iter_mut().zip(xvv) {
                    *a += x * wj;
                }
            }
        }
    }
    for (j, accj) in acc.iter().enumerate() {
        let oc = o0 + j;
        if oc >= dc.o {
            break;
        }
        let b = epi.bias.map_or(0.0, |b| b[oc]);
        let (s, sh) = epi.affine.map_or((1.0, 0.0), |(s, t)| (s[oc], t[oc]));
        let dst = &mut out[oc * dc.nwide + n0..oc * dc.nwide + n0 + NV * L];
        for (dv, av) in dst.chunks_exact_mut(L).zip(accj) {
            for (d, &a) in dv.iter_mut().zip(av) {
                let mut y = a + b;
                if epi.relu {
                    y = if y > 0.0 { y } else { 0.0 };
                }
                if epi.affine.is_some() {
                    y = y * s + sh;
                }
                d.write(y);
            }
        }
    }
}

/// All tiles of `OB` channels: blocks of `NV` vectors, then one narrower tile for the rest.
///
/// # Safety
/// [`tile_in_bounds`] holds for `dc`, `xp` and `out`, `dc.o_pad` is a multiple of `OB`, and the
/// epilogue's vectors hold `dc.o` values (see [`tile`]).
#[inline(always)]
unsafe fn sweep<const L: usize, const OB: usize, const NV: usize>(
    dc: &DirectConv,
    xp: &[f32],
    epi: &Epilogue,
    out: &mut [MaybeUninit<f32>],
) {
    let nv = dc.nwide / L;
    for o0 in (0..dc.o_pad).step_by(OB) {
        let mut v0 = 0;
        while v0 + NV <= nv {
            // SAFETY: the contract above, `v0 + NV <= nv` and `o0 + OB <= o_pad`.
            unsafe { tile::<L, OB, NV>(dc, xp, epi, out, o0, v0 * L) };
            v0 += NV;
        }
        let n0 = v0 * L;
        // SAFETY: as above, with the remaining `nv - v0` vectors.
        unsafe {
            match nv - v0 {
                0 => {}
                1 => tile::<L, OB, 1>(dc, xp, epi, out, o0, n0),
                2 => tile::<L, OB, 2>(dc, xp, epi, out, o0, n0),
                3 => tile::<L, OB, 3>(dc, xp, epi, out, o0, n0),
                4 => tile::<L, OB, 4>(dc, xp, epi, out, o0, n0),
                5 => tile::<L, OB, 5>(dc, xp, epi, out, o0, n0),
                6 => tile::<L, OB, 6>(dc, xp, epi, out, o0, n0),
                _ => tile::<L, OB, 7>(dc, xp, epi, out, o0, n0),
            }
        }
    }
}

/// The x86 kernels with explicit vector types: an array of `OB*NV` `__m512` / `__m256` accumulators is
/// kept in registers, while the portable `[[f32; L]; NV]` version above gets split into hundreds of scalars
/// and spilled to the stack every tap. Tile sizes keep `OB*NV` accumulators plus `NV` inputs and a
/// weight in the vector registers (32 with AVX-512, 16 with AVX2).
#[cfg(target_arch = "x86_64")]
macro_rules! simd_kernel {
    ($modname:ident, $feat:literal, $lanes:literal, $v:ty, $load:ident, $store:ident, $set1:ident,
     $zero:ident, $fmadd:ident, $add:ident, $max:ident, [$($ob:literal => $nv:literal),*],
     $nv1:literal, $cstore:path) => {
        mod $modname {
            use super::{DirectConv, Epilogue};
            use std::mem::MaybeUninit;
            use std::arch::x86_64::*;

            const L: usize = $lanes;

            /// See [`super::tile`]; the caller has checked the bounds with [`super::tile_in_bounds`].
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile<const OB: usize, const NV: usize, const COMPACT: bool>(
                dc: &DirectConv,
                xp: &[f32],
                epi: &Epilogue,
                out: &mut [MaybeUninit<f32>],
                o0: usize,
                n0: usize,
            ) {
                let op = dc.o_pad;
                let (xptr, wptr) = (xp.as_ptr(), dc.wt.as_ptr());
                let mut acc = [[$zero(); NV]; OB];
                for (t, &off) in dc.toff.iter().enumerate() {
                    let mut xv = [$zero(); NV];
                    for (v, x) in xv.iter_mut().enumerate() {
                        // SAFETY: `off + n0 + NV*L <= xp.len()` (checked by the caller).
                        *x = unsafe { $load(xptr.add(off + n0 + v * L)) };
                    }
                    for (j, accj) in acc.iter_mut().enumerate() {
                        // SAFETY: `t * op + o0 + j < (t + 1) * op <= wt.len()` (checked by the caller).
                        let w = $set1(unsafe { *wptr.add(t * op + o0 + j) });
                        for (a, &x) in accj.iter_mut().zip(&xv) {
                            *a = $fmadd(x, w, *a);
                        }
                    }
                }
                let zero = $zero();
                // The epilogue indexes the rows at run time (its loop is not unrolled), which needs the
                // accumulators in memory: a copy of their final values, so that the taps' loop keeps
                // `acc` in registers from its zeroing on (taking `acc` itself cost a `memset` call and
                // the accumulators' loads before the loop, every tile).
                let acc = std::hint::black_box(acc);
                for (j, accj) in acc.iter().enumerate() {
                    let oc = o0 + j;
                    if oc >= dc.o {
                        break;
                    }
                    let b = $set1(epi.bias.map_or(0.0, |b| b[oc]));
                    let (s, sh) = epi.affine.map_or((1.0, 0.0), |(s, t)| (s[oc], t[oc]));
                    let (s, sh) = ($set1(s), $set1(sh));
                    for (v, &a) in accj.iter().enumerate() {
                        let mut y = $add(a, b);
                        if epi.relu {
                            y = $max(y, zero);
                        }
                        if epi.affine.is_some() {
                            y = $fmadd(y, s, sh);
                        }
                        let n = n0 + v * L;
                        if COMPACT {
                            // The vector's output columns straight into plane `oc` of `[o, oh*ow]`.
                            let plane = out.as_mut_ptr().cast::<f32>().wrapping_add(oc * dc.oh * dc.ow);
                            // SAFETY: the segments of vector `n / L` address only outputs of the plane
                            // (`DirectConv::compact_segs`; the caller checked `out` holds `o*oh*ow`).
                            unsafe { $cstore(plane, n, &dc.segs[n / L], y) };
                        } else {
                            // SAFETY: `out` holds `[o, nwide]` and `n + L <= nwide` (the caller's contract).
                            unsafe { $store(out.as_mut_ptr().cast::<f32>().add(oc * dc.nwide + n), y) };
                        }
                    }
                }
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn sweep<const OB: usize, const NV: usize, const C: bool>(
                dc: &DirectConv,
                xp: &[f32],
                epi: &Epilogue,
                out: &mut [MaybeUninit<f32>],
            ) {
                let nv = dc.nwide / L;
                for o0 in (0..dc.o_pad).step_by(OB) {
                    let mut v0 = 0;
                    while v0 + NV <= nv {
                        // SAFETY: in bounds (`run` checked the buffers, `v0 + NV <= nv`).
                        unsafe { tile::<OB, NV, C>(dc, xp, epi, out, o0, v0 * L) };
                        v0 += NV;
                    }
                    let n0 = v0 * L;
                    // SAFETY: as above, with the remaining `nv - v0` vectors.
                    unsafe {
                        match nv - v0 {
                            0 => {}
                            1 => tile::<OB, 1, C>(dc, xp, epi, out, o0, n0),
                            2 => tile::<OB, 2, C>(dc, xp, epi, out, o0, n0),
                            3 => tile::<OB, 3, C>(dc, xp, epi, out, o0, n0),
                            4 => tile::<OB, 4, C>(dc, xp, epi, out, o0, n0),
                            5 => tile::<OB, 5, C>(dc, xp, epi, out, o0, n0),
                            6 => tile::<OB, 6, C>(dc, xp, epi, out, o0, n0),
                            _ => tile::<OB, 7, C>(dc, xp, epi, out, o0, n0),
                        }
                    }
                }
            }

            /// # Safety
            /// The CPU must support the target features; the buffers must be as [`DirectConv::run`]
            /// checks them.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn run<const COMPACT: bool>(
                dc: &DirectConv,
                xp: &[f32],
                epi: &Epilogue,
                out: &mut [MaybeUninit<f32>],
            ) {
                // SAFETY: forwarded contract.
                unsafe {
                    match dc.ob {
                        $($ob => sweep::<$ob, $nv, COMPACT>(dc, xp, epi, out),)*
                        _ => sweep::<1, $nv1, COMPACT>(dc, xp, epi, out),
                    }
                }
            }
        }
    };
}

// Arguments: module, target features, lanes, vector type, its load / store / splat / zero / fmadd /
// add / max intrinsics, `output-channel block => vectors per tile` (OB*NV accumulators), vectors for OB 1.
#[cfg(target_arch = "x86_64")]
simd_kernel!(
    k512,
    "avx512f,avx2,fma",
    16,
    __m512,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_setzero_ps,
    _mm512_fmadd_ps,
    _mm512_add_ps,
    _mm512_max_ps,
    [5 => 4, 4 => 5, 2 => 8],
    8,
    super::compact_store_512
);
#[cfg(target_arch = "x86_64")]
simd_kernel!(
    k256,
    "avx2,fma",
    8,
    __m256,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_setzero_ps,
    _mm256_fmadd_ps,
    _mm256_add_ps,
    _mm256_max_ps,
    [5 => 2, 4 => 2, 2 => 4],
    6,
    super::compact_store_256
);

/// Stores the 16 outputs of wide column `n..n+16` into their places in the compact plane at `plane`:
/// each segment `(shift, mask)` is the lanes of one output row, whose compact index is `n + lane - shift`.
///
/// # Safety
/// AVX-512F must be available; every masked-in lane's address `plane + n + lane - shift` must be
/// writable (those of [`DirectConv::compact_segs`] lie inside the `oh * ow` plane).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn compact_store_512(
    plane: *mut f32,
    n: usize,
    segs: &Segments,
    y: std::arch::x86_64::__m512,
) {
    for &(shift, mask) in segs {
        if mask != 0 {
            // SAFETY: only the lanes of `mask` are written (the caller's contract).
            unsafe {
                std::arch::x86_64::_mm512_mask_storeu_ps(
                    plane.wrapping_add(n).wrapping_sub(shift),
                    mask,
                    y,
                )
            };
        }
    }
}

/// The AVX2 kernel has no compact stores: [`DirectConv::run_compact_stores`] runs only the AVX-512 one.
///
/// # Safety
/// Never called.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn compact_store_256(_: *mut f32, _: usize, _: &Segments, _: std::arch::x86_64::__m256) {
    unreachable!("compact stores are AVX-512 only")
}

/// The portable kernel.
///
/// # Safety
/// The buffers must be as [`DirectConv::run`] checks them.
unsafe fn run_generic(dc: &DirectConv, xp: &[f32], epi: &Epilogue, out: &mut [MaybeUninit<f32>]) {
    // SAFETY: forwarded contract; `o_pad` is a multiple of `ob` (5, 4, 2 or 1) by construction.
    unsafe {
        match dc.ob {
            5 => sweep::<8, 5, 1>(dc, xp, epi, out),
            4 => sweep::<8, 4, 1>(dc, xp, epi, out),
            2 => sweep::<8, 2, 2>(dc, xp, epi, out),
            _ => sweep::<8, 1, 2>(dc, xp, epi, out),
        }
    }
}

/// A random stride-1 convolution case with its reference output, for the tests of the kernels that
/// compute it (this module's and `winograd.rs`).
#[cfg(test)]
pub(crate) mod fixture {
    use super::{DirectConv, Epilogue};
    use crate::ops::test_util::rand_t;
    use crate::ops::Pad4;
    use candle_core::{Device, Tensor};

    /// `relu?(conv(x, w) + b) * scale + shift` on one random `[c, h, w]` image, with the direct
    /// convolution of its weights and its padded input.
    pub(crate) struct ConvCase {
        pub dc: DirectConv,
        /// The weights `[o, c, k, k]`, flattened.
        pub w: Vec<f32>,
        /// The padded input ([`DirectConv::pad_into`]; NaN where nothing was written).
        pub xp: Vec<f32>,
        /// candle's reference output `[1, o, oh, ow]` ([`crate::ops::conv2d_fused_reference`], then the
        /// affine of [`crate::ops::batch_norm_eval_reference`]).
        pub reference: Tensor,
        relu: bool,
        bias: Vec<f32>,
        scale: Vec<f32>,
        shift: Vec<f32>,
    }

    impl ConvCase {
        pub(crate) fn new(
            c: usize,
            (h, w): (usize, usize),
            (o, k): (usize, usize),
            pad: Pad4,
            relu: bool,
            seed: u64,
        ) -> Self {
            let x = rand_t(&[1, c, h, w], seed);
            let wt = rand_t(&[o, c, k, k], seed + 1);
            let b = rand_t(&[o], seed + 2);
            let (sc, sh) = (rand_t(&[o], seed + 3), rand_t(&[o], seed + 4));
            let yr = crate::ops::conv2d_fused_reference(&x, &wt, Some(&b), 1, pad, relu).unwrap();
            let reference = crate::ops::batch_norm_eval_reference(&yr, &sc, &sh).unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let wv = v(&wt);
            let dc = DirectConv::new((c, h, w), &wv, (o, k), pad).unwrap();
            let (_, _, oh, ow) = reference.dims4().unwrap();
            assert_eq!((dc.oh, dc.ow), (oh, ow));
            let mut xp = vec![f32::NAN; dc.xp_len];
            dc.pad_into(&v(&x), &mut xp);
            Self {
                dc,
                w: wv,
                xp,
                reference,
                relu,
                bias: v(&b),
                scale: v(&sc),
                shift: v(&sh),
            }
        }

        /// Bias, ReLU and the affine as the kernels' epilogue.
        pub(crate) fn epi(&self) -> Epilogue<'_> {
            Epilogue {
                bias: Some(&self.bias),
                relu: self.relu,
                affine: Some((&self.scale, &self.shift)),
            }
        }

        /// The outputs `[1, o, oh, ow]` of a wide buffer `[o, nwide]`.
        pub(crate) fn compact(&self, y: &[f32]) -> Tensor {
            let (o, oh, ow) = (self.dc.o, self.dc.oh, self.dc.ow);
            let mut out = Vec::with_capacity(o * oh * ow);
            for oc in 0..o {
                for oy in 0..oh {
                    out.extend_from_slice(self.dc.row(y, oc, oy));
                }
            }
            Tensor::from_vec(out, (1, o, oh, ow), &Device::Cpu).unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::assert_close;
    use candle_core::{Device, Tensor};

    /// The direct convolution (every kernel instance this CPU has, and the portable one) against
    /// [`crate::ops::conv2d_fused_reference`] followed by the affine, on random inputs.
    fn check(
        c: usize,
        (h, w): (usize, usize),
        o: usize,
        k: usize,
        pad: Pad4,
        relu: bool,
        seed: u64,
    ) {
        let case = fixture::ConvCase::new(c, (h, w), (o, k), pad, relu, seed);
        let (dc, xp, yr, epi) = (&case.dc, &case.xp, &case.reference, case.epi());
        let (oh, ow) = (dc.oh, dc.ow);
        let what = format!("c{c} {h}x{w} o{o} k{k} {pad:?} relu{relu}");
        let compact = |y: &[f32]| case.compact(y);
        // Outputs start as NaN, and every kernel writes every value of `[o, nwide]` (its callers build
        // results in place on that: `run_uninit`), finite from a finite padded input.
        let nan = || vec![MaybeUninit::new(f32::NAN); dc.out_len()];
        let init = |y: Vec<MaybeUninit<f32>>| {
            // SAFETY: every value was initialised (NaN, then maybe overwritten).
            let y: Vec<f32> = y.into_iter().map(|v| unsafe { v.assume_init() }).collect();
            assert!(
                y.iter().all(|v| v.is_finite()),
                "a value left unwritten: {what}"
            );
            y
        };
        let mut y = nan();
        dc.run_uninit(xp, &epi, &mut y).unwrap();
        let yd = compact(&init(y));
        assert_close(&yd, yr, 1e-4, &format!("dispatched {what}"));
        // The compact stores: the same bits, every one of `[o, oh*ow]` written.
        let mut yc = vec![MaybeUninit::new(f32::NAN); o * oh * ow];
        if dc.run_compact_stores(xp, &epi, &mut yc).unwrap() {
            let yc = Tensor::from_vec(init(yc), (1, o, oh, ow), &Device::Cpu).unwrap();
            assert_close(&yc, &yd, 0.0, &format!("compact stores {what}"));
        } else {
            assert!(!dc.has_compact_stores(), "compact stores refused: {what}");
        }
        let mut y = nan();
        // SAFETY: buffers sized by `dc`.
        unsafe { run_generic(dc, xp, &epi, &mut y) };
        assert_close(&compact(&init(y)), yr, 1e-4, &format!("portable {what}"));
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let mut y = nan();
            // SAFETY: AVX2 and FMA checked just above; buffers sized by `dc`.
            unsafe { k256::run::<false>(dc, xp, &epi, &mut y) };
            // Same FMAs in the same order per output as the AVX-512 kernel: bit-identical.
            assert_close(
                &compact(&init(y)),
                &yd,
                0.0,
                &format!("avx2 vs dispatched {what}"),
            );
        }
    }

    #[test]
    fn direct_conv_matches_reference() {
        check(1, (28, 28), 20, 7, (3, 3, 3, 3), true, 1);
        check(20, (14, 14), 10, 5, (0, 0, 0, 0), true, 2);
        check(7, (28, 28), 2, 3, (1, 1, 1, 1), false, 3);
        check(28, (26, 26), 28, 1, (0, 0, 0, 0), true, 4);
        // Odd sizes, asymmetric padding, every output-channel block (1, 2, 4, 5) and ragged tails.
        check(3, (9, 7), 7, 3, (1, 0, 2, 1), true, 5);
        check(2, (5, 11), 1, 2, (0, 0, 1, 1), false, 6);
        check(1, (3, 3), 3, 3, (0, 0, 0, 0), true, 7);
        check(4, (13, 6), 9, 4, (2, 1, 1, 2), true, 8);
        check(5, (17, 19), 11, 5, (2, 2, 2, 2), false, 9);
    }

    /// The row-by-row segments are those of the lane-by-lane definition, for every row width and
    /// length around the 16-lane vectors (and `None` under 8 columns a row, where it needs a fourth).
    #[test]
    fn compact_segments_follow_their_definition() {
        let by_lane = |oh: usize, ow: usize, wp: usize, nwide: usize| -> Option<Vec<Segments>> {
            (0..nwide / 16)
                .map(|v| {
                    let mut segs: Segments = [(0, 0); 3];
                    let mut used = 0;
                    for j in 0..16 {
                        let n = v * 16 + j;
                        let (r, x) = (n / wp, n % wp);
                        if r >= oh || x >= ow {
                            continue;
                        }
                        let shift = r * (wp - ow);
                        let k = match segs[..used].iter().position(|s| s.0 == shift) {
                            Some(k) => k,
                            None if used < 3 => {
                                used += 1;
                                segs[used - 1].0 = shift;
                                used - 1
                            }
                            None => return None,
                        };
                        segs[k].1 |= 1 << j;
                    }
                    Some(segs)
                })
                .collect()
        };
        for oh in 1usize..12 {
            for wp in 1..40 {
                for ow in 1..=wp {
                    let nwide = (oh * wp).div_ceil(ALIGN) * ALIGN;
                    let got = DirectConv::compact_segs(oh, ow, wp, nwide);
                    assert_eq!(got, by_lane(oh, ow, wp, nwide), "oh {oh} ow {ow} wp {wp}");
                }
            }
        }
    }

    /// Compact stores refuse an output smaller than `[o, oh*ow]` (rows 8 or more wide: they run).
    #[test]
    fn compact_stores_refuse_a_short_output() {
        let dc = DirectConv::new((1, 10, 10), &[0.5; 9], (1, 3), (0, 0, 0, 0)).unwrap();
        if !dc.has_compact_stores() {
            eprintln!("no AVX-512 here: no compact stores to check");
            return;
        }
        let (xp, epi) = (vec![0.0; dc.xp_len], Epilogue::default());
        let mut out = vec![MaybeUninit::new(0.0); 8 * 8 - 1];
        assert!(dc.run_compact_stores(&xp, &epi, &mut out).is_err());
        assert!(dc.run_compact_stores(&xp[1..], &epi, &mut out).is_err());
    }

    #[test]
    fn direct_conv_rejects_bad_shapes() {
        assert!(DirectConv::new((2, 5, 5), &[0.0; 17], (1, 3), (0, 0, 0, 0)).is_err());
        assert!(DirectConv::new((1, 2, 2), &[0.0; 9], (1, 3), (0, 0, 0, 0)).is_err());
        assert!(DirectConv::new((0, 2, 2), &[], (1, 1), (0, 0, 0, 0)).is_err());
        // Buffers too small for the convolution are an error, not silently wrong numbers.
        let dc = DirectConv::new((1, 5, 5), &[0.5; 9], (1, 3), (1, 1, 1, 1)).unwrap();
        let (xp, mut out) = (vec![0.0; dc.xp_len], vec![0.0; dc.out_len()]);
        let epi = Epilogue::default();
        assert!(dc.run(&xp, &epi, &mut out).is_ok());
        assert!(dc.run(&xp[1..], &epi, &mut out).is_err());
        assert!(dc.run(&xp, &epi, &mut out[1..]).is_err());
        let short_bias = Epilogue {
            bias: Some(&[]),
            ..Epilogue::default()
        };
        assert!(dc.run(&xp, &short_bias, &mut out).is_err());
    }
}

//! Inference of convolution blocks across images: sixteen images at a time, one in each lane of a
//! vector, so every vector operation does the same work for sixteen images and no lane is ever wasted
//! on a row's edge (the per-image kernels of [`super::infer`] run along a row's columns, and the 12x12
//! to 6x6 planes of the improved models fill their 16-lane vectors badly).
//!
//! A group's activations are `[c, h, w, 16]`: each pixel is one vector holding it in sixteen images.
//! Per block: the convolution, its epilogue (bias, ReLU, the BatchNorm affine: that of the per-image
//! kernels, [`crate::ops::direct`]) and the max pool, each a loop of whole vectors. A dense convolution
//! is either the direct one (a register tile of output channels x pixels along a row, accumulated over
//! the taps `(ci, ky, kx)` in the per-image kernel's order, so the same bits as the per-image AVX-512
//! kernel) or, for 3x3 convolutions where it does fewer operations, Winograd's F(4x4, 3x3) (Lavin and
//! Gray 2016): per 4x4 output tile, 36 products per input and output channel instead of 144, its input
//! and output transforms plain adds of vectors (the lanes are images, so no shuffles), which the
//! per-image layout could not have without shuffles (`docs/kernels.md`). A separable convolution of
//! stride one is its depthwise convolution into a group buffer, then the pointwise one as a direct 1x1.
//! Winograd's and the depthwise's results differ from the per-image kernels' by rounding.
//!
//! Every kernel is written once over [`Lane`]; the AVX-512 instance and the portable `[f32; 16]` one do
//! the same operations in the same order in each lane (fused multiply-adds as `f32::mul_add`), so they
//! give the same bits, and an image's result does not depend on its lane, its group or the thread
//! count. Used for batches of at least [`LANES`] images on AVX-512 CPUs ([`super::infer`]); smaller
//! batches keep the per-image kernels.

use candle_core::Result;
use rayon::prelude::*;

use crate::ops::direct::{pick_ob, DirectConv};
use crate::ops::lane::{in6, out4, Lane, Port, G};
use crate::ops::{with_scratch, PoolGeom};

/// Images per group: the lanes of an AVX-512 vector.
pub(super) const LANES: usize = 16;
const L: usize = LANES;

/// Tiles of F(4x4, 3x3) whose products run together (the register tile is `ob` channels x `NT` tiles).
const NT: usize = 4;

/// How a block's convolution runs.
#[derive(Debug, Clone)]
enum Kernel {
    /// Direct: weights `[c*k*k, o_pad]` (tap-major, the padding channels zero).
    Direct(Vec<f32>),
    /// F(4x4, 3x3): transformed weights `[36, c, o_pad]` and the `th x tw` output tiles.
    Winograd { u: Vec<f32>, th: usize, tw: usize },
    /// Separable: the depthwise `k x k` weights `[c, k*k]` (stride 1), then the pointwise `[c, o_pad]`.
    Separable { dw: Vec<f32>, pw: Vec<f32> },
}

/// What the direct kernel loops over: `c` input planes `[hp, wp]` (padded), `k x k` taps, `[oh, ow]`
/// outputs of `o_pad` channels.
#[derive(Debug, Clone, Copy)]
struct Geom {
    c: usize,
    k: usize,
    hp: usize,
    wp: usize,
    oh: usize,
    ow: usize,
    o_pad: usize,
}

/// A stride-1 convolution block, dense or separable (`relu?(conv + bias)`, the BatchNorm affine, an
/// optional max pool), prepared for groups of [`LANES`] images.
#[derive(Debug, Clone)]
pub(super) struct LaneBlock {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    pt: usize,
    pl: usize,
    hp: usize,
    wp: usize,
    oh: usize,
    ow: usize,
    ob: usize,
    o_pad: usize,
    kernel: Kernel,
    /// Bias (zeros without one: the per-image kernels add 0 then too), scale and shift, `o_pad` long.
    bias: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
    pool: Option<PoolGeom>,
}

/// The per-channel epilogue of one block, `o_pad` long each.
pub(super) struct LaneEpilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub relu: bool,
}

impl LaneBlock {
    /// The block of `dc`'s geometry with weights `w [o, c, k, k]`, the epilogue `epi` and `pool`;
    /// F(4x4, 3x3) where it needs fewer operations and `winograd` allows it.
    pub(super) fn new(
        dc: &DirectConv,
        w: &[f32],
        epi: &LaneEpilogue,
        pool: Option<PoolGeom>,
        winograd: bool,
    ) -> Result<Self> {
        let (c, o, k) = (dc.c, dc.o, dc.k());
        if w.len() != o * c * k * k {
            candle_core::bail!("lane block: {} weights for [{o}, {c}, {k}, {k}]", w.len())
        }
        let op = o_pad(o);
        let (th, tw) = (dc.oh.div_ceil(4), dc.ow.div_ceil(4));
        // Vector operations per group, roughly: the direct kernel's multiply-adds; F(4x4, 3x3)'s 36
        // products per tile and channel pair, about 170 per tile and input channel for its input
        // transform and 140 per tile and output channel for its output transform and epilogue.
        // Winograd only under 4/5 of the direct count.
        let direct = op * dc.oh * dc.ow * c * k * k;
        let wino = th * tw * (c * 170 + 36 * c * op + o * 140);
        let kernel = if winograd && k == 3 && 5 * wino < 4 * direct {
            Kernel::Winograd {
                u: winograd_weights(w, c, o, op),
                th,
                tw,
            }
        } else {
            Kernel::Direct(transposed(w, o, c * k * k, op))
        };
        let geom = (dc.h, dc.w, dc.pt, dc.pl, dc.hp, dc.wp, dc.oh, dc.ow);
        Self::with(c, o, k, geom, kernel, epi, pool)
    }

    /// The separable block (a `k x k` depthwise convolution of stride 1 over `[c, h, w]` padded by
    /// `pad`, then the pointwise one to `o` channels) with weights `w` (the depthwise `[c, 1, k, k]`
    /// then the pointwise `[o, c, 1, 1]`), the epilogue `epi` and `pool`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn separable(
        (c, h, w): (usize, usize, usize),
        k: usize,
        (pt, pl): (usize, usize),
        (oh, ow): (usize, usize),
        o: usize,
        wv: &[f32],
        epi: &LaneEpilogue,
        pool: Option<PoolGeom>,
    ) -> Result<Self> {
        if wv.len() != c * k * k + o * c || oh + k - 1 < h + pt || ow + k - 1 < w + pl {
            candle_core::bail!(
                "lane block: {} weights or [{oh}, {ow}] outputs for a separable {k}x{k} on [{c}, {h}, {w}]",
                wv.len()
            )
        }
        let (dw, pw) = wv.split_at(c * k * k);
        let kernel = Kernel::Separable {
            dw: dw.to_vec(),
            pw: transposed(pw, o, c, o_pad(o)),
        };
        let geom = (h, w, pt, pl, oh + k - 1, ow + k - 1, oh, ow);
        Self::with(c, o, k, geom, kernel, epi, pool)
    }

    /// The block from its parts; `geom` is `(h, w, pt, pl, hp, wp, oh, ow)`.
    fn with(
        c: usize,
        o: usize,
        k: usize,
        (h, w, pt, pl, hp, wp, oh, ow): (usize, usize, usize, usize, usize, usize, usize, usize),
        kernel: Kernel,
        epi: &LaneEpilogue,
        pool: Option<PoolGeom>,
    ) -> Result<Self> {
        let op = o_pad(o);
        let pad_to = |v: &[f32], what: &str| -> Result<Vec<f32>> {
            if v.len() != o {
                candle_core::bail!("lane block: {what} of {} values for {o} channels", v.len())
            }
            Ok(v.iter()
                .copied()
                .chain(std::iter::repeat(0.0))
                .take(op)
                .collect())
        };
        if pool.is_some_and(|p| (p.h, p.w) != (oh, ow)) {
            candle_core::bail!("lane block: a pool of another plane than [{oh}, {ow}]")
        }
        Ok(Self {
            c,
            h,
            w,
            o,
            k,
            pt,
            pl,
            hp,
            wp,
            oh,
            ow,
            ob: pick_ob(o),
            o_pad: op,
            kernel,
            bias: match epi.bias {
                Some(b) => pad_to(b, "bias")?,
                None => vec![0.0; op],
            },
            scale: pad_to(epi.scale, "scale")?,
            shift: pad_to(epi.shift, "shift")?,
            relu: epi.relu,
            pool,
        })
    }

    /// The direct kernel's loops: the convolution's, or the pointwise one's of a separable block.
    fn geom(&self) -> Geom {
        let (c, oh, ow, o_pad) = (self.c, self.oh, self.ow, self.o_pad);
        match self.kernel {
            Kernel::Separable { .. } => Geom {
                c,
                k: 1,
                hp: oh,
                wp: ow,
                oh,
                ow,
                o_pad,
            },
            _ => Geom {
                c,
                k: self.k,
                hp: self.hp,
                wp: self.wp,
                oh,
                ow,
                o_pad,
            },
        }
    }

    /// True where the convolution runs as F(4x4, 3x3).
    #[cfg(test)]
    pub(super) fn is_winograd(&self) -> bool {
        matches!(self.kernel, Kernel::Winograd { .. })
    }

    /// Floats per lane of the input image.
    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Floats per lane of the convolution's output.
    fn conv_len(&self) -> usize {
        self.o * self.oh * self.ow
    }

    /// Floats per lane of the block's output (pooled where it pools).
    pub(super) fn out_len(&self) -> usize {
        match self.pool {
            Some(p) => self.o * p.oh * p.ow,
            None => self.conv_len(),
        }
    }

    /// Floats per lane of the padded input the direct kernel reads (0 where it reads the input itself).
    fn pad_len(&self) -> usize {
        let padded = (self.hp, self.wp) != (self.h, self.w);
        match self.kernel {
            Kernel::Direct(_) | Kernel::Separable { .. } if padded => self.c * self.hp * self.wp,
            _ => 0,
        }
    }

    /// Floats of the Winograd buffers: the transformed inputs and the products of one channel block.
    fn wino_lens(&self) -> (usize, usize) {
        match self.kernel {
            Kernel::Winograd { .. } => (36 * self.c * NT * L, 36 * self.ob * NT * L),
            _ => (0, 0),
        }
    }

    /// Floats per lane of a separable block's depthwise output (0 for the others).
    fn dw_len(&self) -> usize {
        match self.kernel {
            Kernel::Separable { .. } => self.c * self.oh * self.ow,
            _ => 0,
        }
    }
}

/// `o` rounded up to its output-channel block ([`pick_ob`]).
fn o_pad(o: usize) -> usize {
    let ob = pick_ob(o);
    o.div_ceil(ob) * ob
}

/// `w [o, taps]` as `[taps, op]` (tap-major, the padding channels zero).
fn transposed(w: &[f32], o: usize, taps: usize, op: usize) -> Vec<f32> {
    let mut wt = vec![0f32; taps * op];
    for oc in 0..o {
        for t in 0..taps {
            wt[t * op + oc] = w[oc * taps + t];
        }
    }
    wt
}

/// `U = G g G^T` for every filter `g = w[oc, ci]`: `[36, c, o_pad]`, point `6*xi + eta`, computed in
/// `f64` (`g G^T` first) and rounded once.
fn winograd_weights(w: &[f32], c: usize, o: usize, op: usize) -> Vec<f32> {
    let mut u = vec![0f32; 36 * c * op];
    for oc in 0..o {
        for ci in 0..c {
            let g = &w[(oc * c + ci) * 9..][..9];
            let ggt: [[f64; 6]; 3] = std::array::from_fn(|ky| {
                std::array::from_fn(|eta| {
                    (0..3)
                        .map(|kx| f64::from(g[ky * 3 + kx]) * G[eta][kx])
                        .sum()
                })
            });
            for xi in 0..6 {
                for eta in 0..6 {
                    let s: f64 = (0..3).map(|ky| G[xi][ky] * ggt[ky][eta]).sum();
                    u[((xi * 6 + eta) * c + ci) * op + oc] = s as f32;
                }
            }
        }
    }
    u
}

/// Blocks that run one after the other on groups of [`LANES`] images.
#[derive(Debug, Clone)]
pub(super) struct LaneStack {
    blocks: Vec<LaneBlock>,
    /// The portable kernels even where the CPU has AVX-512 (tests).
    portable: bool,
}

impl LaneStack {
    /// The blocks `blocks` (each reading the previous one's output), on AVX-512 where the CPU has it.
    pub(super) fn new(blocks: Vec<LaneBlock>) -> Result<Self> {
        for pair in blocks.windows(2) {
            if pair[0].out_len() != pair[1].in_len() {
                candle_core::bail!(
                    "lane stack: a block of {} values per image feeds one of {}",
                    pair[0].out_len(),
                    pair[1].in_len()
                )
            }
        }
        Ok(Self {
            blocks,
            portable: false,
        })
    }

    /// This stack on the portable kernels.
    #[cfg(test)]
    pub(super) fn portable(mut self) -> Self {
        self.portable = true;
        self
    }

    /// True where a group's images are small enough for the gathers' and scatters' 32-bit offsets
    /// (`15 * len` values); larger ones run image by image instead.
    pub(super) fn fits_gathers(&self) -> bool {
        let (inl, outl) = self.lens();
        (L - 1).saturating_mul(inl.max(outl)) <= i32::MAX as usize
    }

    /// Floats per image of the input and of the output.
    pub(super) fn lens(&self) -> (usize, usize) {
        match (self.blocks.first(), self.blocks.last()) {
            (Some(a), Some(z)) => (a.in_len(), z.out_len()),
            _ => (0, 0),
        }
    }

    /// The stack on `b` images `xs [b, in_len]`: `[b, out_len]`, groups of [`LANES`] images in parallel
    /// (the last group's missing lanes are zeros, their results dropped).
    pub(super) fn run(&self, xs: &[f32], b: usize) -> Result<Vec<f32>> {
        let (inl, outl) = self.lens();
        if xs.len() < b * inl {
            candle_core::bail!("lane stack: {} values for {b} images of {inl}", xs.len())
        }
        let mut out = vec![0f32; b * outl];
        if b == 0 || outl == 0 {
            return Ok(out);
        }
        let act = self
            .blocks
            .iter()
            .map(|blk| blk.in_len().max(blk.out_len()))
            .max()
            .unwrap_or(0)
            * L;
        let pad = self
            .blocks
            .iter()
            .map(LaneBlock::pad_len)
            .max()
            .unwrap_or(0)
            * L;
        let conv = self
            .blocks
            .iter()
            .filter(|blk| blk.pool.is_some())
            .map(LaneBlock::conv_len)
            .max()
            .unwrap_or(0)
            * L;
        let (vl, ml) = self
            .blocks
            .iter()
            .map(LaneBlock::wino_lens)
            .fold((0, 0), |(a, b), (c, d)| (a.max(c), b.max(d)));
        let dwl = self.blocks.iter().map(LaneBlock::dw_len).max().unwrap_or(0) * L;
        let use_k512 = !self.portable && crate::ops::has_avx512();
        out.par_chunks_mut(L * outl)
            .zip(xs[..b * inl].par_chunks(L * inl))
            .for_each(|(dst, src)| {
                let lens = [act, act, pad, conv, vl, ml, dwl].map(|n| n + L);
                with_scratch(lens, |bufs| {
                    // Every vector one cache line: the buffers start on a 64-byte boundary.
                    let [a, z, p, y, v, m, d] = bufs.map(aligned);
                    let mut bufs = Bufs { p, y, v, m, d };
                    #[cfg(target_arch = "x86_64")]
                    if use_k512 {
                        // SAFETY: AVX-512F, AVX2 and FMA present; the buffers hold what every
                        // block reads and writes (sized above).
                        unsafe { k512::group(&self.blocks, src, dst, a, z, &mut bufs) };
                        return;
                    }
                    let _ = use_k512;
                    // SAFETY: as above.
                    unsafe { group::<Port>(&self.blocks, src, dst, a, z, &mut bufs) };
                })
            });
        Ok(out)
    }
}

/// `buf` from its first 64-byte boundary on (it holds [`L`] floats more than is used).
fn aligned(buf: &mut [f32]) -> &mut [f32] {
    let off = buf.as_ptr().align_offset(64).min(buf.len());
    &mut buf[off..]
}

/// A group's scratch: the padded input, the unpooled convolution output, the Winograd buffers.
struct Bufs<'a> {
    p: &'a mut [f32],
    y: &'a mut [f32],
    v: &'a mut [f32],
    m: &'a mut [f32],
    /// A separable block's depthwise output.
    d: &'a mut [f32],
}

/// One group: `dst [n, out_len]` from its `n <= L` images `src [n, in_len]`, through the blocks, with
/// the activations in `a` and `z` (`[len, L]`, turn about) and the blocks' scratch in `bufs`.
///
/// # Safety
/// The [`Lane`] contract; `a` and `z` hold every block's input and output, `bufs` its scratch.
#[inline(always)]
unsafe fn group<V: Lane>(
    blocks: &[LaneBlock],
    src: &[f32],
    dst: &mut [f32],
    a: &mut [f32],
    z: &mut [f32],
    bufs: &mut Bufs,
) {
    let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
        return;
    };
    let (inl, outl) = (first.in_len(), last.out_len());
    let n = src.len() / inl;
    debug_assert!(n <= L && dst.len() == n * outl && a.len() >= inl * L);
    // SAFETY: value `i` of image `lane < n` is `src[lane * inl + i]`; the vectors of `a` and of the
    // last block's output hold `inl` and `outl` values; the trait's contract.
    unsafe {
        for i in 0..inl {
            V::gather(src.as_ptr().add(i), inl, n).store(a.as_mut_ptr().add(i * L));
        }
        let mut flip = false;
        for blk in blocks {
            let (s, d): (&[f32], &mut [f32]) = if flip { (&*z, &mut *a) } else { (&*a, &mut *z) };
            run_block::<V>(blk, s, d, bufs);
            flip = !flip;
        }
        let out: &[f32] = if flip { z } else { a };
        for i in 0..outl {
            V::load(out.as_ptr().add(i * L)).scatter(dst.as_mut_ptr().add(i), outl, n);
        }
    }
}

/// One block on a group: `dst [out_len, L]` from `src [in_len, L]`.
///
/// # Safety
/// The [`Lane`] contract; `src` holds the block's input, `dst` its output, `bufs` what
/// [`LaneStack::run`] sizes for it.
#[inline(always)]
unsafe fn run_block<V: Lane>(b: &LaneBlock, src: &[f32], dst: &mut [f32], bufs: &mut Bufs) {
    debug_assert!(src.len() >= b.in_len() * L && dst.len() >= b.out_len() * L);
    let conv_out: &mut [f32] = if b.pool.is_some() {
        &mut *bufs.y
    } else {
        &mut *dst
    };
    debug_assert!(conv_out.len() >= b.conv_len() * L);
    // SAFETY (of the kernels): the buffers' sizes (the caller's contract).
    unsafe {
        let xp: &[f32] = if b.pad_len() > 0 {
            pad_group(b, src, bufs.p);
            &*bufs.p
        } else {
            src
        };
        match &b.kernel {
            Kernel::Direct(wt) => direct::<V>(b, &b.geom(), wt, xp, conv_out),
            Kernel::Winograd { u, th, tw } => {
                winograd::<V>(b, u, (*th, *tw), src, conv_out, bufs.v, bufs.m);
            }
            Kernel::Separable { dw, pw } => {
                depthwise::<V>(b, dw, xp, bufs.d);
                direct::<V>(b, &b.geom(), pw, bufs.d, conv_out);
            }
        }
        if let Some(pg) = b.pool {
            pool::<V>(b.o, &pg, bufs.y, dst);
        }
    }
}

/// A separable block's depthwise convolution (stride 1): `d [c, oh, ow, L]` from the padded `xp [c, hp,
/// wp, L]`, runs of 8 pixels along each row (then 4, 2, 1), the taps `(ky, kx)` in order.
#[inline(always)]
unsafe fn depthwise<V: Lane>(b: &LaneBlock, dw: &[f32], xp: &[f32], d: &mut [f32]) {
    // SAFETY: every run lies inside its output row (the caller's sizes).
    unsafe {
        for ci in 0..b.c {
            for oy in 0..b.oh {
                let mut ox = 0;
                while ox < b.ow {
                    let left = b.ow - ox;
                    ox += if left >= 8 {
                        dw_run::<V, 8>(b, dw, xp, d, ci, oy, ox)
                    } else if left >= 4 {
                        dw_run::<V, 4>(b, dw, xp, d, ci, oy, ox)
                    } else if left >= 2 {
                        dw_run::<V, 2>(b, dw, xp, d, ci, oy, ox)
                    } else {
                        dw_run::<V, 1>(b, dw, xp, d, ci, oy, ox)
                    };
                }
            }
        }
    }
}

/// Pixels `ox..ox+NP` of row `oy`, channel `ci`, of the depthwise convolution; returns `NP`.
#[inline(always)]
unsafe fn dw_run<V: Lane, const NP: usize>(
    b: &LaneBlock,
    dw: &[f32],
    xp: &[f32],
    d: &mut [f32],
    ci: usize,
    oy: usize,
    ox: usize,
) -> usize {
    let k = b.k;
    debug_assert!(ox + NP <= b.ow && oy + k <= b.hp);
    // SAFETY: the reads stay inside `xp [c, hp, wp, L]` and `dw [c, k*k]`, the stores inside `d [c, oh,
    // ow, L]`; the trait's contract.
    unsafe {
        let mut acc = [V::zero(); NP];
        for ky in 0..k {
            let row = xp.as_ptr().add(((ci * b.hp + oy + ky) * b.wp + ox) * L);
            for kx in 0..k {
                let w = V::splat(*dw.get_unchecked((ci * k + ky) * k + kx));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = V::load(row.add((kx + i) * L)).fma(w, *a);
                }
            }
        }
        let dst = d.as_mut_ptr().add(((ci * b.oh + oy) * b.ow + ox) * L);
        for (i, a) in acc.iter().enumerate() {
            a.store(dst.add(i * L));
        }
    }
    NP
}

/// `xp [c, hp, wp, L]`: the group's images zero-padded.
fn pad_group(b: &LaneBlock, src: &[f32], xp: &mut [f32]) {
    let xp = &mut xp[..b.c * b.hp * b.wp * L];
    xp.fill(0.0);
    for ci in 0..b.c {
        for y in 0..b.h {
            let from = ((ci * b.h + y) * b.w) * L;
            let to = ((ci * b.hp + y + b.pt) * b.wp + b.pl) * L;
            xp[to..to + b.w * L].copy_from_slice(&src[from..from + b.w * L]);
        }
    }
}

/// The direct convolution with its epilogue: `y [o, oh, ow, L]` from `xp [c, hp, wp, L]`.
#[inline(always)]
unsafe fn direct<V: Lane>(b: &LaneBlock, g: &Geom, wt: &[f32], xp: &[f32], y: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe {
        match b.ob {
            5 => direct_ob::<V, 5, 5>(b, g, wt, xp, y),
            4 => direct_ob::<V, 4, 6>(b, g, wt, xp, y),
            2 => direct_ob::<V, 2, 8>(b, g, wt, xp, y),
            _ => direct_ob::<V, 1, 12>(b, g, wt, xp, y),
        }
    }
}

/// Every tile of `OB` channels: runs of `NP` pixels along each output row, the rest in runs of 4, 2, 1.
#[inline(always)]
unsafe fn direct_ob<V: Lane, const OB: usize, const NP: usize>(
    b: &LaneBlock,
    g: &Geom,
    wt: &[f32],
    xp: &[f32],
    y: &mut [f32],
) {
    for oy in 0..g.oh {
        for o0 in (0..g.o_pad).step_by(OB) {
            let mut ox = 0;
            // SAFETY: every tile lies inside the output row (the caller's sizes).
            unsafe {
                while ox + NP <= g.ow {
                    direct_tile::<V, OB, NP>(b, g, wt, xp, y, (o0, oy, ox));
                    ox += NP;
                }
                while ox < g.ow {
                    let left = g.ow - ox;
                    if left >= 4 && NP > 4 {
                        direct_tile::<V, OB, 4>(b, g, wt, xp, y, (o0, oy, ox));
                        ox += 4;
                    } else if left >= 2 {
                        direct_tile::<V, OB, 2>(b, g, wt, xp, y, (o0, oy, ox));
                        ox += 2;
                    } else {
                        direct_tile::<V, OB, 1>(b, g, wt, xp, y, (o0, oy, ox));
                        ox += 1;
                    }
                }
            }
        }
    }
}

/// Channels `o0..o0+OB`, pixels `ox..ox+NP` of output row `oy`: the taps in the per-image kernel's
/// order `(ci, ky, kx)`, one fused multiply-add each, then its epilogue `affine(relu?(acc + bias))`.
#[inline(always)]
unsafe fn direct_tile<V: Lane, const OB: usize, const NP: usize>(
    b: &LaneBlock,
    g: &Geom,
    wt: &[f32],
    xp: &[f32],
    y: &mut [f32],
    (o0, oy, ox): (usize, usize, usize),
) {
    let (k, op) = (g.k, g.o_pad);
    debug_assert!(ox + NP <= g.ow && o0 + OB <= op);
    // SAFETY: the reads stay inside `xp [c, hp, wp, L]` (`oy + ky < hp`, `ox + kx + NP <= wp`) and
    // `wt [c*k*k, o_pad]`; the stores inside `y [o, oh, ow, L]`; the trait's contract.
    unsafe {
        let mut acc = [[V::zero(); NP]; OB];
        let (xptr, wptr) = (xp.as_ptr(), wt.as_ptr());
        for ci in 0..g.c {
            for ky in 0..k {
                let row = xptr.add(((ci * g.hp + oy + ky) * g.wp + ox) * L);
                let wrow = wptr.add((ci * k + ky) * k * op + o0);
                for kx in 0..k {
                    let xv: [V; NP] = std::array::from_fn(|i| V::load(row.add((kx + i) * L)));
                    for (j, accj) in acc.iter_mut().enumerate() {
                        let wv = V::splat(*wrow.add(kx * op + j));
                        for (a, &x) in accj.iter_mut().zip(&xv) {
                            *a = x.fma(wv, *a);
                        }
                    }
                }
            }
        }
        for (j, accj) in acc.iter().enumerate() {
            let oc = o0 + j;
            if oc >= b.o {
                break;
            }
            let dst = y.as_mut_ptr().add(((oc * g.oh + oy) * g.ow + ox) * L);
            let ep = Epi::<V>::of(b, oc);
            for (i, &a) in accj.iter().enumerate() {
                ep.apply(a).store(dst.add(i * L));
            }
        }
    }
}

/// The epilogue of one output channel: `affine(relu?(v + bias))`, as the per-image kernels.
struct Epi<V> {
    bias: V,
    scale: V,
    shift: V,
    relu: bool,
}

impl<V: Lane> Epi<V> {
    #[inline(always)]
    unsafe fn of(b: &LaneBlock, oc: usize) -> Self {
        // SAFETY: the trait's contract.
        unsafe {
            Self {
                bias: V::splat(b.bias[oc]),
                scale: V::splat(b.scale[oc]),
                shift: V::splat(b.shift[oc]),
                relu: b.relu,
            }
        }
    }

    #[inline(always)]
    unsafe fn apply(&self, v: V) -> V {
        // SAFETY: the trait's contract.
        unsafe {
            let mut y = v.add(self.bias);
            if self.relu {
                y = y.relu();
            }
            y.fma(self.scale, self.shift)
        }
    }
}

/// F(4x4, 3x3) with its epilogue: `y [o, oh, ow, L]` from the unpadded `x [c, h, w, L]` (the padding
/// and the tiles past the input's edge read as zeros), `NT` tiles at a time: their input transforms
/// into `vb [36, c, NT, L]`, then per block of `ob` output channels the products into `mb [36, ob, NT,
/// L]` and the output transforms.
#[inline(always)]
unsafe fn winograd<V: Lane>(
    b: &LaneBlock,
    u: &[f32],
    (th, tw): (usize, usize),
    x: &[f32],
    y: &mut [f32],
    vb: &mut [f32],
    mb: &mut [f32],
) {
    // SAFETY: forwarded.
    unsafe {
        match b.ob {
            5 => wino_ob::<V, 5>(b, u, (th, tw), x, y, vb, mb),
            4 => wino_ob::<V, 4>(b, u, (th, tw), x, y, vb, mb),
            2 => wino_ob::<V, 2>(b, u, (th, tw), x, y, vb, mb),
            _ => wino_ob::<V, 1>(b, u, (th, tw), x, y, vb, mb),
        }
    }
}

#[inline(always)]
// The transforms go down one axis of a tile and store along the other.
#[allow(clippy::needless_range_loop)]
unsafe fn wino_ob<V: Lane, const OB: usize>(
    b: &LaneBlock,
    u: &[f32],
    (th, tw): (usize, usize),
    x: &[f32],
    y: &mut [f32],
    vb: &mut [f32],
    mb: &mut [f32],
) {
    let (c, op) = (b.c, b.o_pad);
    let tiles = th * tw;
    debug_assert!(vb.len() >= 36 * c * NT * L && mb.len() >= 36 * OB * NT * L);
    // SAFETY: every read and write below stays inside the buffers (the caller's sizes; loads of the
    // input only at in-bounds pixels); the trait's contract.
    unsafe {
        let (vp, mp, xptr) = (vb.as_mut_ptr(), mb.as_mut_ptr(), x.as_ptr());
        for q0 in (0..tiles).step_by(NT) {
            // The input transforms of tiles q0.. (tiles past the last are zeros).
            for t in 0..NT {
                let q = q0 + t;
                let (y0, x0) = ((q / tw) * 4, (q % tw) * 4);
                // A tile whose 6x6 input lies inside the image reads it without bounds checks.
                let inside = q < tiles
                    && y0 >= b.pt
                    && x0 >= b.pl
                    && y0 + 6 <= b.h + b.pt
                    && x0 + 6 <= b.w + b.pl;
                for ci in 0..c {
                    // Down the columns, then along the rows.
                    let mut tcol = [[V::zero(); 6]; 6];
                    if inside {
                        let at = xptr.add(((ci * b.h + y0 - b.pt) * b.w + x0 - b.pl) * L);
                        for col in 0..6 {
                            let v = in6(std::array::from_fn(|r| {
                                V::load(at.add((r * b.w + col) * L))
                            }));
                            for xi in 0..6 {
                                tcol[xi][col] = v[xi];
                            }
                        }
                    } else {
                        let mut d = [[V::zero(); 6]; 6];
                        if q < tiles {
                            for (r, dr) in d.iter_mut().enumerate() {
                                let Some(iy) = (y0 + r).checked_sub(b.pt).filter(|&iy| iy < b.h)
                                else {
                                    continue;
                                };
                                let row = xptr.add((ci * b.h + iy) * b.w * L);
                                for (col, dv) in dr.iter_mut().enumerate() {
                                    if let Some(ix) =
                                        (x0 + col).checked_sub(b.pl).filter(|&ix| ix < b.w)
                                    {
                                        *dv = V::load(row.add(ix * L));
                                    }
                                }
                            }
                        }
                        for col in 0..6 {
                            let v = in6(std::array::from_fn(|r| d[r][col]));
                            for xi in 0..6 {
                                tcol[xi][col] = v[xi];
                            }
                        }
                    }
                    for (xi, tr) in tcol.iter().enumerate() {
                        let v = in6(*tr);
                        for (eta, &val) in v.iter().enumerate() {
                            val.store(vp.add((((xi * 6 + eta) * c + ci) * NT + t) * L));
                        }
                    }
                }
            }
            for o0 in (0..op).step_by(OB) {
                // The products: for each point, channels o0.. x the NT tiles over the input channels.
                for p in 0..36 {
                    let mut acc = [[V::zero(); NT]; OB];
                    let up = u.as_ptr().add(p * c * op + o0);
                    for ci in 0..c {
                        let vv: [V; NT] =
                            std::array::from_fn(|t| V::load(vp.add(((p * c + ci) * NT + t) * L)));
                        for (j, accj) in acc.iter_mut().enumerate() {
                            let wv = V::splat(*up.add(ci * op + j));
                            for (a, &v) in accj.iter_mut().zip(&vv) {
                                *a = v.fma(wv, *a);
                            }
                        }
                    }
                    for (j, accj) in acc.iter().enumerate() {
                        for (t, a) in accj.iter().enumerate() {
                            a.store(mp.add(((p * OB + j) * NT + t) * L));
                        }
                    }
                }
                // The output transforms, the epilogue and the stores of the pixels inside the plane.
                for j in 0..OB {
                    let oc = o0 + j;
                    if oc >= b.o {
                        break;
                    }
                    let ep = Epi::<V>::of(b, oc);
                    for t in 0..NT.min(tiles - q0) {
                        let q = q0 + t;
                        let (y0, x0) = ((q / tw) * 4, (q % tw) * 4);
                        let m = |p: usize| V::load(mp.add(((p * OB + j) * NT + t) * L));
                        let mut rows = [[V::zero(); 6]; 4];
                        for eta in 0..6 {
                            let v = out4(std::array::from_fn(|xi| m(xi * 6 + eta)));
                            for r in 0..4 {
                                rows[r][eta] = v[r];
                            }
                        }
                        for (r, row) in rows.iter().enumerate() {
                            let oy = y0 + r;
                            if oy >= b.oh {
                                break;
                            }
                            let out = out4(*row);
                            let dst = y.as_mut_ptr().add(((oc * b.oh + oy) * b.ow) * L);
                            for (cx, &v) in out.iter().enumerate() {
                                let ox = x0 + cx;
                                if ox < b.ow {
                                    ep.apply(v).store(dst.add(ox * L));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The max pool of every channel: `dst [o, ph, pw, L]` from `y [o, oh, ow, L]`; the window's values in
/// order, `-inf` for one entirely in the padding; the 2x2 / stride-2 pool as the per-image
/// `max(max(a, b), max(c, d))`.
#[inline(always)]
unsafe fn pool<V: Lane>(o: usize, g: &PoolGeom, y: &[f32], dst: &mut [f32]) {
    let (yp, dp) = (y.as_ptr(), dst.as_mut_ptr());
    // SAFETY: the windows stay inside the plane (`PoolGeom::window`); the trait's contract.
    unsafe {
        for oc in 0..o {
            let plane = yp.add(oc * g.h * g.w * L);
            let at = |iy: usize, ix: usize| V::load(plane.add((iy * g.w + ix) * L));
            for py in 0..g.oh {
                for px in 0..g.ow {
                    let v = if g.is_unpadded_2x2() {
                        let (iy, ix) = (2 * py, 2 * px);
                        let top = at(iy, ix).max(at(iy, ix + 1));
                        top.max(at(iy + 1, ix).max(at(iy + 1, ix + 1)))
                    } else {
                        let (ylo, yhi) = PoolGeom::window(py, g.stride, g.pt, g.k, g.h);
                        let (xlo, xhi) = PoolGeom::window(px, g.stride, g.pl, g.k, g.w);
                        let mut m = V::splat(f32::NEG_INFINITY);
                        for ky in ylo..yhi {
                            for kx in xlo..xhi {
                                m = m.max(at(py * g.stride + ky - g.pt, px * g.stride + kx - g.pl));
                            }
                        }
                        m
                    };
                    v.store(dp.add(((oc * g.oh + py) * g.ow + px) * L));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod k512 {
    use super::{Bufs, LaneBlock};
    use crate::ops::lane::K512;

    /// [`run_block`] on AVX-512.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA present; the buffers as [`run_block`] needs them.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn block(b: &LaneBlock, src: &[f32], dst: &mut [f32], bufs: &mut Bufs) {
        // SAFETY: forwarded.
        unsafe { super::run_block::<K512>(b, src, dst, bufs) }
    }

    /// [`group`] on AVX-512.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA present; the buffers as [`group`] needs them.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn group(
        blocks: &[LaneBlock],
        src: &[f32],
        dst: &mut [f32],
        a: &mut [f32],
        z: &mut [f32],
        bufs: &mut Bufs,
    ) {
        // SAFETY: forwarded.
        unsafe { super::group::<K512>(blocks, src, dst, a, z, bufs) }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::{LaneBlock, LaneEpilogue, LaneStack, LANES};
    use crate::ops::block::{
        conv_bn_pool_eval_reference, conv_bn_pool_infer, separable_bn_pool_eval_reference,
        separable_bn_pool_infer, BlockSpec, PoolSpec,
    };
    use crate::ops::test_util::{assert_close, rand_t};
    use crate::ops::winograd::Winograd;
    use crate::ops::{DirectConv, PoolGeom};

    /// One block's case: input `[c, h, w]`, `o` channels of `k x k`, padding, bias, ReLU, pool.
    struct Case {
        c: usize,
        hw: (usize, usize),
        o: usize,
        k: usize,
        pad: (usize, usize, usize, usize),
        bias: bool,
        relu: bool,
        pool: Option<PoolSpec>,
    }

    fn spec(case: &Case) -> BlockSpec {
        BlockSpec {
            pad: case.pad,
            relu: case.relu,
            pool: case.pool,
            ..BlockSpec::default()
        }
    }

    /// The case's weights, bias, scale and shift (seeded).
    fn params(case: &Case, seed: u64) -> (Tensor, Option<Tensor>, Tensor, Tensor) {
        let w = rand_t(&[case.o, case.c, case.k, case.k], seed);
        let bias = case.bias.then(|| rand_t(&[case.o], seed + 1));
        let scale = (rand_t(&[case.o], seed + 2) + 1.5).unwrap();
        let shift = rand_t(&[case.o], seed + 3);
        (w, bias, scale, shift)
    }

    fn vec1(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// The case as a lane block (`winograd` allowed or not) on its input geometry.
    fn block(case: &Case, seed: u64, winograd: bool) -> LaneBlock {
        let (w, bias, scale, shift) = params(case, seed);
        let dc = DirectConv::new(case.hw_c(), &vec1(&w), (case.o, case.k), case.pad).unwrap();
        let pool = case
            .pool
            .map(|p| PoolGeom::new(dc.oh, dc.ow, p.kernel, p.stride, p.pad).unwrap());
        let bias = bias.as_ref().map(vec1);
        let epi = LaneEpilogue {
            bias: bias.as_deref(),
            scale: &vec1(&scale),
            shift: &vec1(&shift),
            relu: case.relu,
        };
        LaneBlock::new(&dc, &vec1(&w), &epi, pool, winograd).unwrap()
    }

    impl Case {
        fn hw_c(&self) -> (usize, usize, usize) {
            (self.c, self.hw.0, self.hw.1)
        }
    }

    fn cases() -> Vec<Case> {
        let p2 = Some(PoolSpec::default());
        let odd_pool = Some(PoolSpec {
            kernel: 3,
            stride: 2,
            pad: (1, 1, 0, 1),
        });
        let case = |c, hw, o, k, pad, bias, relu, pool| Case {
            c,
            hw,
            o,
            k,
            pad,
            bias,
            relu,
            pool,
        };
        vec![
            // The improved conv's six layers.
            case(1, (28, 28), 10, 3, (0, 0, 0, 0), false, true, None),
            case(10, (26, 26), 20, 3, (0, 0, 0, 0), false, true, None),
            case(20, (24, 24), 10, 1, (0, 0, 0, 0), false, true, p2),
            case(10, (12, 12), 14, 3, (0, 0, 0, 0), false, true, None),
            case(14, (10, 10), 16, 3, (0, 0, 0, 0), false, true, None),
            case(16, (8, 8), 16, 3, (0, 0, 0, 0), false, true, None),
            // The seed conv's big kernels, padded; odd sizes, asymmetric padding, odd pools, every
            // channel block (1, 2, 4, 5) and ragged Winograd tiles.
            case(1, (28, 28), 8, 7, (3, 3, 3, 3), true, true, p2),
            case(8, (14, 14), 7, 5, (0, 0, 0, 0), true, true, odd_pool),
            case(6, (9, 7), 7, 3, (1, 0, 2, 1), true, false, None),
            case(9, (13, 11), 9, 3, (1, 1, 1, 1), false, true, odd_pool),
            case(12, (7, 10), 2, 3, (0, 0, 0, 0), true, true, p2),
            case(5, (6, 6), 1, 3, (2, 2, 2, 2), false, false, None),
        ]
    }

    /// `n` images of the case's input, one after the other.
    fn images(case: &Case, n: usize, seed: u64) -> Tensor {
        rand_t(&[n, case.c, case.hw.0, case.hw.1], seed)
    }

    /// Every case across lanes (the batch not a multiple of [`LANES`]): within rounding of candle's
    /// reference, with and without F(4x4, 3x3); where no Winograd runs, bit for bit the per-image
    /// AVX-512 kernels (on CPUs with AVX-512), whose summation order it keeps.
    #[test]
    fn lanes_match_the_reference_and_the_per_image_kernels() {
        let b = LANES + 3;
        for (i, case) in cases().iter().enumerate() {
            let seed = 100 + 10 * i as u64;
            let x = images(case, b, seed + 7);
            let (w, bias, scale, shift) = params(case, seed);
            let reference =
                conv_bn_pool_eval_reference(&x, &w, bias.as_ref(), &scale, &shift, &spec(case))
                    .unwrap();
            for winograd in [false, true] {
                let stack = LaneStack::new(vec![block(case, seed, winograd)]).unwrap();
                let out = stack.clone().portable().run(&vec1(&x), b).unwrap();
                let got = Tensor::from_vec(out.clone(), reference.dims(), x.device()).unwrap();
                let what = format!("case {i}, winograd allowed {winograd}");
                assert_close(&got, &reference, 1e-4, &what);
                if crate::ops::has_avx512() {
                    let fast = stack.run(&vec1(&x), b).unwrap();
                    assert!(fast == out, "{what}: AVX-512 != portable");
                    let dc = DirectConv::new(case.hw_c(), &vec1(&w), (case.o, case.k), case.pad)
                        .unwrap();
                    let per_image_winograd = Winograd::for_conv(&dc, &vec1(&w), false).is_some();
                    if !stack.blocks[0].is_winograd() && !per_image_winograd {
                        // The per-image kernels run on batches under LANES images.
                        let per_image: Vec<f32> = (0..b)
                            .step_by(LANES - 1)
                            .flat_map(|s| {
                                let part = x.narrow(0, s, (LANES - 1).min(b - s)).unwrap();
                                let y = conv_bn_pool_infer(
                                    &part,
                                    &w,
                                    bias.as_ref(),
                                    &scale,
                                    &shift,
                                    &spec(case),
                                )
                                .unwrap();
                                vec1(&y)
                            })
                            .collect();
                        let first = out
                            .iter()
                            .zip(&per_image)
                            .position(|(a, b)| a.to_bits() != b.to_bits());
                        assert_eq!(first, None, "{what}: per-image kernels differ");
                        assert_eq!(out.len(), per_image.len());
                    }
                }
            }
        }
    }

    /// Separable blocks across lanes (the separable's layers, padding, odd pools, bias or not): within
    /// rounding of candle's reference and of the per-image kernels; AVX-512 and portable bit for bit.
    #[test]
    fn separable_lanes_match_the_reference() {
        let b = LANES + 5;
        let p2 = Some(PoolSpec::default());
        let odd_pool = Some(PoolSpec {
            kernel: 3,
            stride: 2,
            pad: (1, 0, 1, 1),
        });
        // (c, (h, w), o, k, pad, bias, relu, pool)
        let cases = [
            (1, (28, 28), 16, 3, (0, 0, 0, 0), false, true, None),
            (16, (26, 26), 28, 3, (0, 0, 0, 0), false, true, p2),
            (28, (10, 10), 32, 3, (1, 1, 1, 1), true, true, None),
            (7, (9, 11), 5, 5, (2, 1, 0, 2), true, false, odd_pool),
            (3, (6, 5), 9, 3, (0, 0, 0, 0), false, true, p2),
        ];
        for (i, &(c, (h, w), o, k, pad, bias, relu, pool)) in cases.iter().enumerate() {
            let seed = 500 + 10 * i as u64;
            let x = rand_t(&[b, c, h, w], seed);
            let dw = rand_t(&[c, 1, k, k], seed + 1);
            let pw = rand_t(&[o, c, 1, 1], seed + 2);
            let bias_t = bias.then(|| rand_t(&[o], seed + 3));
            let scale = (rand_t(&[o], seed + 4) + 1.5).unwrap();
            let shift = rand_t(&[o], seed + 5);
            let spec = BlockSpec {
                pad,
                relu,
                pool,
                ..BlockSpec::default()
            };
            let reference = separable_bn_pool_eval_reference(
                &x,
                &dw,
                &pw,
                bias_t.as_ref(),
                &scale,
                &shift,
                &spec,
            )
            .unwrap();
            let (oh, ow) = (h + pad.0 + pad.2 + 1 - k, w + pad.1 + pad.3 + 1 - k);
            let pool_geom = pool.map(|p| PoolGeom::new(oh, ow, p.kernel, p.stride, p.pad).unwrap());
            let wv: Vec<f32> = vec1(&dw).into_iter().chain(vec1(&pw)).collect();
            let bias_v = bias_t.as_ref().map(vec1);
            let epi = LaneEpilogue {
                bias: bias_v.as_deref(),
                scale: &vec1(&scale),
                shift: &vec1(&shift),
                relu,
            };
            let blk = LaneBlock::separable(
                (c, h, w),
                k,
                (pad.0, pad.1),
                (oh, ow),
                o,
                &wv,
                &epi,
                pool_geom,
            )
            .unwrap();
            let stack = LaneStack::new(vec![blk]).unwrap();
            let out = stack.clone().portable().run(&vec1(&x), b).unwrap();
            let got = Tensor::from_vec(out.clone(), reference.dims(), x.device()).unwrap();
            let what = format!("separable case {i}");
            assert_close(&got, &reference, 1e-4, &what);
            // The per-image kernels (batches under LANES images).
            let part = x.narrow(0, 0, LANES - 1).unwrap();
            let per_image =
                separable_bn_pool_infer(&part, &dw, &pw, bias_t.as_ref(), &scale, &shift, &spec)
                    .unwrap();
            assert_close(
                &got.narrow(0, 0, LANES - 1).unwrap(),
                &per_image,
                1e-5,
                &what,
            );
            if crate::ops::has_avx512() {
                assert!(
                    stack.run(&vec1(&x), b).unwrap() == out,
                    "{what}: AVX-512 != portable"
                );
            }
        }
    }

    /// F(4x4, 3x3) is chosen for the improved conv's 3x3 layers but its first (one input channel).
    #[test]
    fn winograd_is_chosen_where_it_saves_work() {
        let chosen: Vec<bool> = cases()[..6]
            .iter()
            .map(|c| block(c, 1, true).is_winograd())
            .collect();
        assert_eq!(chosen, [false, true, false, true, true, true]);
        assert!(!block(&cases()[1], 1, false).is_winograd());
    }

    /// An image's result does not depend on its lane or group, nor on the batch around it: each image
    /// alone (padded to a group with zeros) gives the bits it gets in a batch of three groups.
    #[test]
    fn an_image_gets_the_same_bits_in_any_lane() {
        let c1 = &cases()[1];
        let first = block(c1, 3, true);
        let mut second = block(&cases()[3], 4, true);
        second.pool = None;
        let stack = LaneStack::new(vec![first, block(&cases()[2], 5, true), second]);
        let stack = stack.unwrap().portable();
        let b = 2 * LANES + 5;
        let x = vec1(&images(c1, b, 9));
        let (inl, outl) = stack.lens();
        let all = stack.run(&x, b).unwrap();
        for i in [0, 7, LANES, 2 * LANES + 4] {
            let one = stack.run(&x[i * inl..(i + 1) * inl], 1).unwrap();
            assert!(one == all[i * outl..(i + 1) * outl], "image {i}");
        }
    }

    /// Stacks whose images are too large for 32-bit gather offsets say so (they run image by image).
    #[test]
    fn images_too_large_for_the_gathers_are_left_to_the_per_image_kernels() {
        let small = LaneStack::new(vec![block(&cases()[0], 1, true)]).unwrap();
        assert!(small.fits_gathers());
        let mut huge = small.clone();
        huge.blocks[0].c = (i32::MAX as usize) / (28 * 28 * 15) + 1;
        assert!(!huge.fits_gathers());
    }

    /// Blocks that do not chain are refused.
    #[test]
    fn blocks_that_do_not_chain_are_refused() {
        let err = LaneStack::new(vec![
            block(&cases()[0], 1, true),
            block(&cases()[3], 2, true),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("feeds one of"), "{err}");
    }

    /// Time per group of each improved-conv layer (not a test: `--ignored --nocapture`).
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn probe_layer_times() {
        if !crate::ops::has_avx512() {
            return;
        }
        use super::{Bufs, L};
        let only: Option<usize> = std::env::var("PROBE_LAYER")
            .ok()
            .and_then(|v| v.parse().ok());
        for (i, case) in cases()[..6].iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let blk = block(case, 1, true);
            let mut xv = vec1(&images(case, L, 2));
            xv.extend([0.0; L]);
            let mut xa = vec![0f32; xv.len() + L];
            let xa = super::aligned(&mut xa);
            xa[..xv.len()].copy_from_slice(&xv);
            let x = &*xa;
            let mut y = vec![0f32; blk.conv_len().max(blk.out_len()) * L + L];
            let y = super::aligned(&mut y);
            let (mut p, mut c) = (
                vec![0f32; blk.pad_len() * L + L],
                vec![0f32; blk.conv_len() * L + L],
            );
            let (vl, ml) = blk.wino_lens();
            let (mut v, mut m) = (vec![0f32; vl + L], vec![0f32; ml + L]);
            let mut d = vec![0f32; blk.dw_len() * L + L];
            let mut bufs = Bufs {
                p: super::aligned(&mut p),
                y: super::aligned(&mut c),
                v: super::aligned(&mut v),
                m: super::aligned(&mut m),
                d: super::aligned(&mut d),
            };
            let reps = if only.is_some() { 20000 } else { 2000 };
            let t = std::time::Instant::now();
            for _ in 0..reps {
                unsafe { super::k512::block(&blk, x, y, &mut bufs) };
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
            println!("layer {i}: {us:.1} us per group of {L}");
        }
    }

    /// Time per group of the improved conv's six layers as one stack (not a test).
    #[test]
    #[ignore]
    fn probe_stack_time() {
        let blocks: Vec<LaneBlock> = cases()[..6]
            .iter()
            .enumerate()
            .map(|(i, c)| block(c, i as u64, true))
            .collect();
        let stack = LaneStack::new(blocks).unwrap();
        let groups = 64;
        let b = groups * LANES;
        let x = vec1(&images(&cases()[0], b, 2));
        stack.run(&x, b).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..10 {
            stack.run(&x, b).unwrap();
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / (10.0 * groups as f64);
        println!("stack: {us:.1} us per group of {LANES}");
    }
}

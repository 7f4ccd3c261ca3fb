//! Inference-mode blocks, image by image in cache: one block over a batch ([`infer_with`], behind
//! [`super::conv_bn_pool_infer`] and [`super::separable_bn_pool_infer`]), or a run of blocks
//! ([`block_stack_infer`]) where each image goes through every block before the next image starts, so
//! the activations between the blocks stay in the core's cache instead of making a round trip through
//! memory for the whole batch at every block. Both run the same per-image code in the same order: a
//! stack's output is that of its blocks called one by one, bit for bit.

use std::mem::MaybeUninit;

use candle_core::{Result, Shape, Tensor};

use super::lanes::{LaneBlock, LaneEpilogue, LaneStack, LANES};
use super::{
    check_vec, conv_bn_pool_eval, with_scratch, with_thread_buf, write_row, BlockConv, BlockSpec,
    DirectConv, Epilogue, PoolGeom, Prepared, Weights, Winograd, OP_INFER, POOL_BUF,
};
use crate::ops::{collect_images_in_place, cpu_data, dims4, uninit_view};

const OP_STACK: &str = "block_stack_infer";

/// One block of [`block_stack_infer`]: the arguments of [`super::conv_bn_pool_infer`] (`w`, `bias`,
/// `scale`, `shift`, `spec`), or of [`super::separable_bn_pool_infer`] when `depthwise` is set (`w` is
/// then the pointwise weight).
#[derive(Debug, Clone)]
pub struct InferStackBlock<'a> {
    /// The depthwise weight `[c, 1, k, k]` of a separable block; `None` for a dense convolution.
    pub depthwise: Option<&'a Tensor>,
    /// The convolution weight `[o, c, k, k]` (the pointwise `[o, c, 1, 1]` of a separable block).
    pub w: &'a Tensor,
    /// The convolution bias `[o]`, if any.
    pub bias: Option<&'a Tensor>,
    /// BatchNorm's inference-mode scale `[o]` (`gamma / sqrt(running_var + eps)`).
    pub scale: Tensor,
    /// BatchNorm's inference-mode shift `[o]` (`beta - running_mean * scale`).
    pub shift: Tensor,
    /// Stride, padding, activation and pool of the block.
    pub spec: BlockSpec,
}

impl InferStackBlock<'_> {
    fn weights(&self) -> Weights<'_> {
        match self.depthwise {
            Some(dw) => Weights::Separable(dw, self.w),
            None => Weights::Dense(self.w),
        }
    }

    /// This block prepared for inputs of `dims` ([`InferBlock::new`]).
    fn prepare(&self, dims: (usize, usize, usize, usize)) -> Result<Option<InferBlock>> {
        InferBlock::new(
            dims,
            self.weights(),
            self.bias,
            &self.scale,
            &self.shift,
            &self.spec,
        )
    }

    /// This block alone over the batch `x` ([`infer_with`]).
    fn run_alone(&self, x: &Tensor) -> Result<Tensor> {
        infer_with(
            x,
            self.weights(),
            self.bias,
            &self.scale,
            &self.shift,
            &self.spec,
        )
    }
}

/// One inference-mode block prepared once for every image of a call: its geometry, the packed weights
/// and epilogue vectors, the direct (or Winograd) kernel of a dense convolution, and the pool.
struct InferBlock {
    conv: BlockConv,
    prep: Prepared,
    wino: Option<Winograd>,
    pool: Option<PoolGeom>,
    /// The convolution's weights, flat.
    wv: Vec<f32>,
    bias: Option<Vec<f32>>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
}

impl InferBlock {
    /// The block on inputs of `dims`, checked; `None` for a strided dense convolution (run on candle's
    /// ops by [`conv_bn_pool_eval`]).
    fn new(
        dims: (usize, usize, usize, usize),
        w: Weights,
        bias: Option<&Tensor>,
        scale: &Tensor,
        shift: &Tensor,
        spec: &BlockSpec,
    ) -> Result<Option<Self>> {
        let conv = w.geometry(dims, bias, spec, OP_INFER)?;
        let (o, oh, ow) = conv.output();
        check_vec(scale, o, OP_INFER, "scale")?;
        check_vec(shift, o, OP_INFER, "shift")?;
        if matches!(&conv, BlockConv::Dense(g) if g.stride != 1) {
            return Ok(None);
        }
        let pool = match spec.pool {
            Some(p) => Some(PoolGeom::new(oh, ow, p.kernel, p.stride, p.pad)?),
            None => None,
        };
        let wv = Tensor::cat(&w.flat()?, 0)?.to_vec1::<f32>()?;
        let prep = conv.prepare(&wv)?;
        // 3x3 convolutions with Winograd's F(m, 3) along the rows where it saves work (AVX-512 CPUs).
        let wino = match &prep {
            Prepared::Dense(Some(dc)) => Winograd::for_conv(dc, &wv, false),
            _ => None,
        };
        Ok(Some(Self {
            conv,
            prep,
            wino,
            pool,
            wv,
            bias: bias.map(|b| b.to_vec1::<f32>()).transpose()?,
            scale: scale.to_vec1::<f32>()?,
            shift: shift.to_vec1::<f32>()?,
            relu: spec.relu,
        }))
    }

    /// True for a block that runs across vector lanes ([`super::lanes`]): a dense or separable
    /// convolution of stride 1.
    fn runs_in_lanes(&self) -> bool {
        match (&self.conv, &self.prep) {
            (BlockConv::Dense(_), Prepared::Dense(Some(_))) => true,
            (BlockConv::Separable(sg), Prepared::Separable(_)) => sg.dw.stride == 1,
            _ => false,
        }
    }

    /// `(o, h, w)` of one image's output.
    fn out_dims(&self) -> (usize, usize, usize) {
        let (o, oh, ow) = self.conv.output();
        match self.pool {
            Some(p) => (o, p.oh, p.ow),
            None => (o, oh, ow),
        }
    }

    /// Values of one image's output.
    fn out_len(&self) -> usize {
        let (o, h, w) = self.out_dims();
        o * h * w
    }

    /// Values [`Self::run_image`] reads from where its image starts: the image, and for a direct kernel
    /// that reads its unpadded input in place, what follows it up to [`DirectConv::xp_len`] (never
    /// meeting a stored output, see [`DirectConv::padded`]); with less, it pads into scratch instead.
    fn in_len(&self) -> usize {
        match &self.prep {
            Prepared::Dense(Some(dc)) => self.conv.chw().max(dc.xp_len),
            _ => self.conv.chw(),
        }
    }

    /// One image: `oimg [o, pooled h * w]` from the image at the start of `x` (which may go on past
    /// it). When it returns `Ok`, every value of `oimg` is written: pooled, each plane as the values of
    /// `plane_max`; unpooled, all of them by `run_compact_uninit` or `forward_image_uninit`.
    fn run_image(&self, x: &[f32], oimg: &mut [MaybeUninit<f32>]) -> Result<()> {
        let epi = Epilogue {
            bias: self.bias.as_deref(),
            relu: self.relu,
            affine: Some((&self.scale, &self.shift)),
        };
        let (o, h, w) = self.out_dims();
        let pl = h * w;
        if oimg.len() != o * pl || x.len() < self.conv.chw() {
            candle_core::bail!("{OP_INFER}: buffers of {} / {} values", x.len(), oimg.len());
        }
        // A pooled block: the image's output `[o, nwide]` in the wide layout of `dc`, pooled plane by
        // plane straight into the result.
        let pool_into =
            |pg: PoolGeom, dc: &DirectConv, y: &[f32], oimg: &mut [MaybeUninit<f32>]| {
                for (oc, op) in oimg.chunks_exact_mut(pl).enumerate() {
                    with_thread_buf(&POOL_BUF, pl, |pooled| {
                        pg.plane_max(&y[oc * dc.nwide..(oc + 1) * dc.nwide], dc.wp, pooled);
                        write_row(op, pooled);
                    })
                }
            };
        match (&self.conv, &self.prep) {
            (BlockConv::Dense(_), Prepared::Dense(Some(dc))) => {
                let scratch = self.wino.as_ref().map_or(0, Winograd::scratch_len);
                with_scratch([dc.xp_len, dc.out_len(), scratch], |[xp, y, t]| {
                    let xp = dc.padded(x, xp);
                    match (&self.wino, self.pool) {
                        (Some(wg), None) => wg.run_compact_uninit(dc, xp, t, &epi, y, oimg),
                        (Some(wg), Some(pg)) => {
                            wg.run(xp, t, &epi, y)?; // [o, nwide]
                            pool_into(pg, dc, y, oimg);
                            Ok(())
                        }
                        (None, None) => dc.run_compact_uninit(xp, &epi, y, oimg),
                        (None, Some(pg)) => {
                            dc.run(xp, &epi, y)?; // [o, nwide]
                            pool_into(pg, dc, y, oimg);
                            Ok(())
                        }
                    }
                })
            }
            (BlockConv::Separable(sg), Prepared::Separable(k)) => {
                let xi = &x[..self.conv.chw()];
                match self.pool {
                    None => sg.forward_image_uninit(k, xi, &self.wv, &epi, oimg),
                    Some(pg) => {
                        let dc = sg.pointwise(k);
                        with_scratch([dc.out_len()], |[y]| {
                            sg.wide_image(k, xi, &self.wv, &epi, y)?; // [o, nwide]
                            pool_into(pg, dc, y, oimg);
                            Ok(())
                        })
                    }
                }
            }
            _ => candle_core::bail!("{OP_INFER}: no direct kernels for this convolution"),
        }
    }
}

/// True where dense blocks run across vector lanes on a batch of `b` images: at least [`LANES`] of
/// them, on a CPU with AVX-512.
fn lanes_for(b: usize) -> bool {
    b >= LANES && crate::ops::has_avx512()
}

/// The blocks `plan` across the lanes of vectors, [`LANES`] images at a time ([`super::lanes`]), where
/// every one is a dense or separable stride-1 convolution, the batch `b` has at least [`LANES`] images and the CPU
/// has AVX-512; `None` where the per-image kernels run.
fn lane_stack(plan: &[&InferBlock], b: usize) -> Result<Option<LaneStack>> {
    if !lanes_for(b) {
        return Ok(None);
    }
    let mut blocks = Vec::with_capacity(plan.len());
    for ib in plan {
        let epi = LaneEpilogue {
            bias: ib.bias.as_deref(),
            scale: &ib.scale,
            shift: &ib.shift,
            relu: ib.relu,
        };
        let block = match (&ib.conv, &ib.prep) {
            (BlockConv::Dense(_), Prepared::Dense(Some(dc))) => {
                LaneBlock::new(dc, &ib.wv, &epi, ib.pool, true)?
            }
            (BlockConv::Separable(sg), Prepared::Separable(_)) if sg.dw.stride == 1 => {
                let g = &sg.dw;
                LaneBlock::separable(
                    (g.c, g.h, g.w),
                    g.k,
                    (g.pt, g.pl),
                    (g.oh, g.ow),
                    sg.o,
                    &ib.wv,
                    &epi,
                    ib.pool,
                )?
            }
            _ => return Ok(None),
        };
        blocks.push(block);
    }
    let lanes = LaneStack::new(blocks)?;
    Ok(lanes.fits_gathers().then_some(lanes))
}

/// The inference-mode block of any convolution over a batch, image by image (see
/// [`super::conv_bn_pool_infer`]).
pub(super) fn infer_with(
    x: &Tensor,
    w: Weights,
    bias: Option<&Tensor>,
    scale: &Tensor,
    shift: &Tensor,
    spec: &BlockSpec,
) -> Result<Tensor> {
    let dims = dims4(x, OP_INFER)?;
    let Some(block) = InferBlock::new(dims, w, bias, scale, shift, spec)? else {
        let Weights::Dense(wt) = w else {
            candle_core::bail!("{OP_INFER}: only a dense convolution runs on candle's ops");
        };
        return Ok(conv_bn_pool_eval(x, wt, bias, scale, shift, spec)?.detach());
    };
    let (b, chw) = (dims.0, block.conv.chw());
    cpu_data!(x, xg, xs, OP_INFER);
    let (o, h, w) = block.out_dims();
    if let Some(lanes) = lane_stack(&[&block], b)? {
        return Tensor::from_vec(lanes.run(xs, b)?, (b, o, h, w), x.device());
    }
    // The direct kernel may read the next images as its padding (`DirectConv::padded`).
    // SAFETY: `run_image` returns `Ok` only after writing every value of its `oimg`.
    let out = unsafe {
        collect_images_in_place(b, block.out_len(), |i, oimg| {
            block.run_image(&xs[i * chw..], oimg)
        })
    }?;
    Tensor::from_vec(out, Shape::from((b, o, h, w)), x.device())
}

/// The inference-mode blocks `blocks` one after the other on `x [b, c, h, w]` (`f32`, CPU), each image
/// through all of them in cache (two per-thread buffers hold one image's activations between blocks),
/// only the last block's output written for the batch. The result is bit for bit that of calling
/// [`super::conv_bn_pool_infer`] / [`super::separable_bn_pool_infer`] block by block (a block with a
/// strided dense convolution runs on its own, on candle's ops, between the stacks before and after it).
pub fn block_stack_infer(x: &Tensor, blocks: &[InferStackBlock]) -> Result<Tensor> {
    let mut dims = dims4(x, OP_STACK)?;
    let mut plan = Vec::with_capacity(blocks.len());
    for (k, blk) in blocks.iter().enumerate() {
        let Some(ib) = blk.prepare(dims)? else {
            // A strided dense block on candle's ops splits the stack in two.
            let head = block_stack_infer(x, &blocks[..k])?;
            let mid = blk.run_alone(&head)?;
            return block_stack_infer(&mid, &blocks[k + 1..]);
        };
        let (o, h, w) = ib.out_dims();
        dims = (dims.0, o, h, w);
        plan.push(ib);
    }
    // Where blocks run across lanes, a stack that mixes them with blocks that cannot (strided
    // separable ones) runs as its stretches of each kind, so that its result is still that of its
    // blocks one by one.
    if lanes_for(dims.0) {
        let lanes = |ib: &InferBlock| ib.runs_in_lanes();
        if let Some(k) = (1..plan.len()).find(|&k| lanes(&plan[k]) != lanes(&plan[k - 1])) {
            let head = block_stack_infer(x, &blocks[..k])?;
            return block_stack_infer(&head, &blocks[k..]);
        }
    }
    if let Some(lanes) = lane_stack(&plan.iter().collect::<Vec<_>>(), dims.0)? {
        cpu_data!(x, xg, xs, OP_STACK);
        let (b, o, h, w) = dims;
        return Tensor::from_vec(lanes.run(xs, b)?, (b, o, h, w), x.device());
    }
    let (last, between) = match plan.split_last() {
        Some(split) => split,
        None => return Ok(x.clone()),
    };
    // Each buffer holds one block's output and is long enough for the next block to read it in place.
    let buf_len = between
        .iter()
        .zip(&plan[1..])
        .map(|(blk, next)| blk.out_len().max(next.in_len()))
        .max()
        .unwrap_or(0);
    let (b, chw) = (dims.0, plan[0].conv.chw());
    cpu_data!(x, xg, xs, OP_STACK);
    // SAFETY: the last block's `run_image` returns `Ok` only after writing every value of `oimg`.
    let out = unsafe {
        collect_images_in_place(b, last.out_len(), |i, oimg| {
            with_scratch([buf_len, buf_len], |[even, odd]| {
                let image = &xs[i * chw..];
                for (k, blk) in between.iter().enumerate() {
                    // Block k reads block k - 1's output (the image for k = 0) and writes the other buffer.
                    let (src, dst): (&[f32], &mut [f32]) = match (k, k % 2) {
                        (0, _) => (image, &mut *even),
                        (_, 0) => (&*odd, &mut *even),
                        _ => (&*even, &mut *odd),
                    };
                    // SAFETY: `run_image` only writes initialised values through the view.
                    blk.run_image(src, uninit_view(&mut dst[..blk.out_len()]))?;
                }
                let src: &[f32] = match between.len() {
                    0 => image,
                    n if n % 2 == 1 => even,
                    _ => odd,
                };
                last.run_image(src, oimg)
            })
        })
    }?;
    let (_, o, h, w) = dims;
    Tensor::from_vec(out, (b, o, h, w), x.device())
}

//! A run of fused blocks trained as ONE custom op ([`block_stack_train`]): the forward pass runs each
//! block's training forward on the previous one's output, the backward pass each block's backward in
//! reverse, handing the gradient at a block's input straight to the block before it. Only the stack's
//! input and its one parameter vector meet candle's autograd, so the activations' gradients skip its
//! gradient store, which would start each one as a zero tensor and add the op's gradient to it (two
//! more passes over every activation gradient, and an allocation). Same arithmetic, same order: the
//! results are those of the blocks run one by one, bit for bit.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use std::sync::Mutex;

use super::{build, stats_tensors, BlockOp, BlockSpec, Saved, Weights};
use crate::ops::inception_train::InceptionOp;
use crate::ops::{cpu_data, dims4, fwd_slice, give_buf, AfterDx, OpState};

const OP: &str = "block_stack_train";

/// One block of [`block_stack_train`]: the arguments of [`super::conv_bn_pool_train`] (`w`, `bias`,
/// `gamma`, `beta`, `spec`), or of [`super::separable_bn_pool_train`] when `depthwise` is set (`w` is
/// then the pointwise weight).
#[derive(Debug, Clone, Copy)]
pub struct StackBlock<'a> {
    /// The depthwise weight `[c, 1, k, k]` of a separable block; `None` for a dense convolution.
    pub depthwise: Option<&'a Tensor>,
    /// The convolution weight `[o, c, k, k]` (the pointwise `[o, c, 1, 1]` of a separable block).
    pub w: &'a Tensor,
    /// The convolution bias `[o]`, if any.
    pub bias: Option<&'a Tensor>,
    /// BatchNorm's scale `[o]`.
    pub gamma: &'a Tensor,
    /// BatchNorm's shift `[o]`.
    pub beta: &'a Tensor,
    /// Stride, padding, activation, eps and pool of the block.
    pub spec: BlockSpec,
}

/// The training-mode blocks `blocks` one after the other on `x [b, c, h, w]` (`f32`, CPU), as one op.
///
/// Returns the last block's output and each block's batch statistics `(mean [o], var [o])` for the
/// running-average update. Outputs, statistics and every gradient (x, and each block's weights, bias,
/// gamma and beta) are bit for bit those of calling [`super::conv_bn_pool_train`] /
/// [`super::separable_bn_pool_train`] block by block.
pub fn block_stack_train(
    x: &Tensor,
    blocks: &[StackBlock],
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let StackTrained { y, stats, .. } = stack_train(x, None, blocks)?;
    Ok((y, stats))
}

/// An inception module (with its BatchNorm, if any) and then `blocks`, as ONE op: the arguments of
/// [`crate::ops::inception_train`] (`branches`, `bn`; `x`, the images, needs no gradient) and of
/// [`block_stack_train`]. The gradient at the module's output goes straight from the first block's
/// backward pass into the module's (no candle gradient store between them, which would start it as
/// a zero tensor and add to it). Returns the last block's output, the module's batch statistics (with
/// `bn`) and each block's; outputs, statistics and every gradient are bit for bit those of
/// `inception_train` followed by `block_stack_train`.
pub fn inception_stack_train(
    x: &Tensor,
    branches: &[crate::ops::InceptionBranch],
    bn: Option<crate::ops::ModuleBn>,
    blocks: &[StackBlock],
) -> Result<StackTrained> {
    stack_train(x, Some((branches, bn)), blocks)
}

/// What [`inception_stack_train`] returns.
#[derive(Debug)]
pub struct StackTrained {
    /// The last block's output.
    pub y: Tensor,
    /// The module's batch statistics `(mean, var)`, with its BatchNorm.
    pub head_stats: Option<(Tensor, Tensor)>,
    /// Each block's batch statistics `(mean, var)`.
    pub stats: Vec<(Tensor, Tensor)>,
}

/// The head of a stack: an inception module's branches and BatchNorm.
type Head<'a, 'b> = (
    &'b [crate::ops::InceptionBranch<'a>],
    Option<crate::ops::ModuleBn<'a>>,
);

fn stack_train(x: &Tensor, head: Option<Head>, blocks: &[StackBlock]) -> Result<StackTrained> {
    if blocks.is_empty() {
        candle_core::bail!("{OP}: no blocks")
    }
    let mut dims = dims4(x, OP)?;
    let (mut ops, mut parts, mut ranges) = (Vec::new(), Vec::new(), Vec::new());
    let mut end = 0;
    let head = match head {
        Some((branches, bn)) => {
            let (op, p) = crate::ops::inception_train::build(x, branches, bn)?;
            end = p.iter().map(Tensor::elem_count).sum();
            dims = op.out_dims();
            parts.extend(p);
            Some((op, 0..end))
        }
        None => None,
    };
    for blk in blocks {
        let w = match blk.depthwise {
            Some(dw) => Weights::Separable(dw, blk.w),
            None => Weights::Dense(blk.w),
        };
        let (op, p) = build(dims, w, blk.bias, blk.gamma, blk.beta, &blk.spec, true)?;
        let start = end;
        end += p.iter().map(Tensor::elem_count).sum::<usize>();
        ranges.push(start..end);
        dims = op.out_dims();
        ops.push(op);
        parts.extend(p);
    }
    let params = Tensor::cat(&parts, 0)?;
    let saved: Vec<_> = ops.iter().map(|op| op.saved.clone()).collect();
    let head_saved = head.as_ref().map(|(op, _)| op.saved().clone());
    let stack = StackOp {
        head,
        ops,
        ranges,
        inputs: OpState::new(OP),
    };
    let y = x.contiguous()?.apply_op2(&params, stack)?;
    let head_stats = match head_saved {
        Some(s) => InceptionOp::stats_of(&s, x.device())?,
        None => None,
    };
    let stats = saved
        .iter()
        .map(|s| {
            let s = s.lock()?;
            stats_tensors(&s.mean, &s.var, x.device())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StackTrained {
        y,
        head_stats,
        stats,
    })
}

struct StackOp {
    /// The inception module before the blocks, if any, and its part of the parameter vector.
    head: Option<(InceptionOp, std::ops::Range<usize>)>,
    /// The blocks, in training mode.
    ops: Vec<BlockOp>,
    /// Each block's part of the parameter vector.
    ranges: Vec<std::ops::Range<usize>>,
    /// The inputs of the blocks after the stack's input (the head's output, if any, then the outputs
    /// of blocks ..n-1), from the forward pass.
    inputs: OpState<Vec<Vec<f32>>>,
}

impl StackOp {
    fn params<'a>(&self, ps: &'a [f32], k: usize) -> Result<&'a [f32]> {
        self.slice(ps, &self.ranges[k])
    }

    fn slice<'a>(&self, ps: &'a [f32], r: &std::ops::Range<usize>) -> Result<&'a [f32]> {
        ps.get(r.clone()).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "{OP}: parameter vector of {} values, a part needs {r:?}",
                ps.len(),
            ))
        })
    }

    /// The input of block `k` among the stack's input `xs` and the forward pass's `inputs`.
    fn input<'a>(&self, xs: &'a [f32], inputs: &'a [Vec<f32>], k: usize) -> &'a [f32] {
        let k = k + self.head.is_some() as usize;
        if k == 0 {
            xs
        } else {
            &inputs[k - 1]
        }
    }
}

impl CustomOp2 for StackOp {
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
        let ps = fwd_slice(s2, l2, OP)?;
        let mut inputs = Vec::with_capacity(self.ops.len());
        let mut cur: Option<Vec<f32>> = match &self.head {
            Some((op, r)) => Some(op.fwd(x, self.slice(ps, r)?)?),
            None => None,
        };
        for (k, op) in self.ops.iter().enumerate() {
            let eps = op.train_eps.ok_or_else(|| {
                candle_core::Error::msg(format!("{OP}: block {k} not in training mode"))
            })?;
            let out = op.fwd_train(
                cur.as_deref().unwrap_or(x),
                op.split(self.params(ps, k)?)?,
                eps,
            )?;
            inputs.extend(cur.replace(out));
        }
        self.inputs.set(inputs)?;
        let last = self.ops.last().map(BlockOp::out_shape);
        match (cur, last) {
            (Some(y), Some(shape)) => Ok((CpuStorage::F32(y), shape)),
            _ => candle_core::bail!("{OP}: no blocks"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        cpu_data!(x, xg, xs, OP);
        cpu_data!(params, pg, ps, OP);
        cpu_data!(grad, gg, dys, OP);
        let inputs = self.inputs.lock()?;
        if inputs.len() + 1 != self.ops.len() + self.head.is_some() as usize {
            candle_core::bail!("{OP} backward: no forward pass to go back through")
        }
        let mut dparams = vec![0f32; ps.len()];
        // The gradient at the output of block k (owned from the last block's input down).
        let mut g: Option<Vec<f32>> = None;
        // BatchNorm's per-image sums of block k, taken by block k + 1's backward pass from each image's
        // input gradient while it was in cache (the same values as block k would take from `g`).
        let mut sums: Option<Vec<(f64, f64)>> = None;
        for (k, op) in self.ops.iter().enumerate().rev() {
            let xin = self.input(xs, &inputs, k);
            let need_dx = k > 0 || self.head.is_some() || x.track_op();
            let taken = (k > 0).then(|| ImageSums::new(&self.ops[k - 1]));
            let (dx, dp) = {
                let prev = match k {
                    0 => None,
                    _ => Some(self.ops[k - 1].saved.lock()?),
                };
                let hook = |i: usize, dxi: &[f32]| {
                    if let (Some(t), Some(saved)) = (&taken, &prev) {
                        t.take(saved, i, dxi);
                    }
                };
                op.grads_with(
                    xin,
                    self.params(ps, k)?,
                    g.as_deref().unwrap_or(dys),
                    need_dx,
                    sums.as_deref(),
                    taken.is_some().then_some(&hook as &AfterDx<'_>),
                )?
            };
            sums = taken.and_then(ImageSums::finish);
            let dst = &mut dparams[self.ranges[k].clone()];
            if dp.len() != dst.len() {
                candle_core::bail!(
                    "{OP} backward: block {k} gave {} parameter gradients",
                    dp.len()
                )
            }
            dst.copy_from_slice(&dp);
            if k > 0 && dx.is_none() {
                candle_core::bail!("{OP} backward: block {k} gave no input gradient")
            }
            // The gradient at block k's output is spent: its buffer goes back for reuse.
            if let Some(spent) = std::mem::replace(&mut g, dx) {
                give_buf(spent);
            }
        }
        let dev = x.device();
        let dx = match (&self.head, g) {
            (Some((op, r)), Some(gh)) => {
                // The gradient at the head's output, straight into its backward pass.
                let dp = op.grads(xs, self.slice(ps, r)?, &inputs[0], &gh)?;
                dparams[r.clone()].copy_from_slice(&dp);
                give_buf(gh);
                None
            }
            (Some(_), None) => {
                candle_core::bail!("{OP} backward: the first block gave no input gradient")
            }
            (None, Some(v)) => Some(Tensor::from_vec(v, x.shape(), dev)?),
            (None, None) => None,
        };
        Ok((dx, Some(Tensor::from_vec(dparams, params.shape(), dev)?)))
    }
}

/// Block k's per-image BatchNorm sums ([`BlockOp::image_sums`]) as block k + 1's backward pass hands
/// over each image's input gradient; complete only when every image came (the im2col path of a
/// convolution does not call back: block k then takes its sums itself).
struct ImageSums<'a> {
    op: &'a BlockOp,
    taken: Mutex<Taken>,
}

/// The sums so far: `[b, o]` image-major, and which images came.
struct Taken {
    sums: Vec<(f64, f64)>,
    came: Vec<bool>,
}

impl<'a> ImageSums<'a> {
    fn new(op: &'a BlockOp) -> Self {
        let (b, o, _, _) = op.out_dims();
        Self {
            op,
            taken: Mutex::new(Taken {
                sums: vec![(0.0, 0.0); b * o],
                came: vec![false; b],
            }),
        }
    }

    fn take(&self, saved: &Saved, i: usize, dxi: &[f32]) {
        let o = self.op.out_dims().1;
        let mut mine = vec![(0.0, 0.0); o];
        self.op.image_sums(saved, i, dxi, &mut mine);
        if let Ok(mut t) = self.taken.lock() {
            let Taken { sums, came } = &mut *t;
            if let (Some(dst), Some(seen)) = (sums.get_mut(i * o..(i + 1) * o), came.get_mut(i)) {
                dst.copy_from_slice(&mine);
                *seen = true;
            }
        }
    }

    fn finish(self) -> Option<Vec<(f64, f64)>> {
        let t = self.taken.into_inner().ok()?;
        t.came.iter().all(|&c| c).then_some(t.sums)
    }
}

/// The reference twin of [`block_stack_train`]: each block's reference twin
/// ([`super::conv_bn_pool_train_reference`], [`super::separable_bn_pool_train_reference`]) one after the
/// other, on candle's own ops (any device / dtype).
pub fn block_stack_train_reference(
    x: &Tensor,
    blocks: &[StackBlock],
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let mut y = x.clone();
    let mut stats = Vec::with_capacity(blocks.len());
    for b in blocks {
        let (out, mean, var) = match b.depthwise {
            Some(dw) => super::separable_bn_pool_train_reference(
                &y, dw, b.w, b.bias, b.gamma, b.beta, &b.spec,
            )?,
            None => super::conv_bn_pool_train_reference(&y, b.w, b.bias, b.gamma, b.beta, &b.spec)?,
        };
        y = out;
        stats.push((mean, var));
    }
    Ok((y, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_close, rand_t};
    use crate::ops::{conv_bn_pool_train, separable_bn_pool_train, PoolSpec};
    use candle_core::backprop::GradStore;
    use candle_core::Var;

    /// The parameters of one test block.
    struct Params {
        depthwise: Option<Var>,
        w: Var,
        bias: Option<Var>,
        gamma: Var,
        beta: Var,
        spec: BlockSpec,
    }

    impl Params {
        fn block(&self) -> StackBlock<'_> {
            StackBlock {
                depthwise: self.depthwise.as_ref().map(|v| v.as_tensor()),
                w: self.w.as_tensor(),
                bias: self.bias.as_ref().map(|v| v.as_tensor()),
                gamma: self.gamma.as_tensor(),
                beta: self.beta.as_tensor(),
                spec: self.spec,
            }
        }

        fn vars(&self) -> Vec<&Var> {
            let mut v: Vec<&Var> = self.depthwise.iter().collect();
            v.push(&self.w);
            v.extend(self.bias.iter());
            v.extend([&self.gamma, &self.beta]);
            v
        }
    }

    /// `(c_in, o, k, separable, bias, spec)` -> random parameters.
    fn params(
        c: usize,
        o: usize,
        k: usize,
        sep: bool,
        bias: bool,
        spec: BlockSpec,
        seed: u64,
    ) -> Params {
        let var = |t: Tensor| Var::from_tensor(&t).unwrap();
        let gamma = (rand_t(&[o], seed + 3) * 0.3).unwrap() + 1.0;
        Params {
            depthwise: sep.then(|| var(rand_t(&[c, 1, k, k], seed))),
            w: var(if sep {
                rand_t(&[o, c, 1, 1], seed + 1)
            } else {
                rand_t(&[o, c, k, k], seed + 1)
            }),
            bias: bias.then(|| var(rand_t(&[o], seed + 2))),
            gamma: var(gamma.unwrap()),
            beta: var(rand_t(&[o], seed + 4)),
            spec,
        }
    }

    /// Each variable's gradient in `fast` bit for bit as in `one_by_one`, and within rounding of
    /// `reference`.
    fn assert_gradients(vars: &[&Var], [fast, one_by_one, reference]: [&GradStore; 3]) {
        for (i, v) in vars.iter().enumerate() {
            let (a, b, c) = (
                fast.get(v).unwrap(),
                one_by_one.get(v).unwrap(),
                reference.get(v).unwrap(),
            );
            assert_eq!(bits(a), bits(b), "gradient of variable {i}");
            assert_close(
                a,
                c,
                1e-3,
                &format!("gradient of variable {i} against the reference"),
            );
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|f| f.to_bits())
            .collect()
    }

    /// A stack of a dense valid 3x3 block, a separable block with a pool, a padded dense block and a
    /// 1x1 block with a bias, against the same blocks one by one (bit for bit: output, statistics and
    /// every gradient) and against the reference twins (within rounding).
    #[test]
    fn stack_matches_blocks_one_by_one() {
        // The pooled blocks have no ReLU: the ReLU's zeros would tie in the pool windows, where the
        // reference may pick another argmax (a legitimate difference in where the gradient goes).
        let pool = BlockSpec {
            relu: false,
            ..Default::default()
        };
        let no_pool = BlockSpec {
            pool: None,
            ..Default::default()
        };
        let padded = BlockSpec {
            pad: (1, 1, 1, 1),
            pool: Some(PoolSpec::default()),
            ..pool
        };
        let blocks = [
            params(3, 6, 3, false, false, no_pool, 10),
            params(6, 8, 3, true, true, pool, 20),
            params(8, 7, 3, false, false, padded, 30),
            params(7, 5, 1, false, true, no_pool, 40),
        ];
        let x = Var::from_tensor(&rand_t(&[5, 3, 20, 20], 1)).unwrap();
        let r = rand_t(&[5, 5, 4, 4], 2);

        let sb: Vec<StackBlock> = blocks.iter().map(Params::block).collect();
        let (ys, stats) = block_stack_train(x.as_tensor(), &sb).unwrap();
        let gs = (&ys * &r).unwrap().sum_all().unwrap().backward().unwrap();

        let mut y1 = x.as_tensor().clone();
        let mut stats1 = Vec::new();
        for p in &blocks {
            let b = p.block();
            let (y, m, v) = match b.depthwise {
                Some(dw) => separable_bn_pool_train(&y1, dw, b.w, b.bias, b.gamma, b.beta, &b.spec),
                None => conv_bn_pool_train(&y1, b.w, b.bias, b.gamma, b.beta, &b.spec),
            }
            .unwrap();
            y1 = y;
            stats1.push((m, v));
        }
        let g1 = (&y1 * &r).unwrap().sum_all().unwrap().backward().unwrap();

        let (yr, statsr) = block_stack_train_reference(x.as_tensor(), &sb).unwrap();
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();

        assert_eq!(ys.dims(), &[5, 5, 4, 4]);
        assert_eq!(bits(&ys), bits(&y1), "output");
        assert_close(&ys, &yr, 1e-4, "output against the reference");
        for (k, ((m, v), ((m1, v1), (mr, vr)))) in
            stats.iter().zip(stats1.iter().zip(&statsr)).enumerate()
        {
            assert_eq!(
                (bits(m), bits(v)),
                (bits(m1), bits(v1)),
                "statistics of block {k}"
            );
            assert_close(
                m,
                mr,
                1e-4,
                &format!("mean of block {k} against the reference"),
            );
            assert_close(
                v,
                vr,
                1e-4,
                &format!("var of block {k} against the reference"),
            );
        }
        let mut vars = vec![&x];
        vars.extend(blocks.iter().flat_map(Params::vars));
        assert_gradients(&vars, [&gs, &g1, &gr]);
    }

    /// An inception module with BatchNorm (a pooled branch, a bias, 'same' paddings) and then two
    /// blocks, as one op, against `inception_train` followed by `block_stack_train` (bit for bit: output,
    /// both kinds of statistics and every gradient) and against the reference twins (within rounding).
    #[test]
    fn inception_head_matches_the_module_then_the_stack() {
        use crate::ops::{inception_train, inception_train_reference, BranchPool, InceptionBranch};
        let var = |t: Tensor| Var::from_tensor(&t).unwrap();
        let (wa, wb, wc) = (
            var(rand_t(&[3, 1, 1, 1], 50)),
            var(rand_t(&[4, 1, 3, 3], 51)),
            var(rand_t(&[2, 1, 1, 1], 52)),
        );
        let bias_b = var(rand_t(&[4], 53));
        let gamma = var(((rand_t(&[9], 54) * 0.3).unwrap() + 1.0).unwrap());
        let beta = var(rand_t(&[9], 55));
        let pool = BranchPool {
            kernel: 3,
            stride: 1,
            pad: (1, 1, 1, 1),
        };
        let branches = [
            InceptionBranch {
                pool: None,
                w: wa.as_tensor(),
                bias: None,
                pad: (0, 0, 0, 0),
                relu: true,
            },
            InceptionBranch {
                pool: None,
                w: wb.as_tensor(),
                bias: Some(bias_b.as_tensor()),
                pad: (1, 1, 1, 1),
                relu: true,
            },
            InceptionBranch {
                pool: Some(pool),
                w: wc.as_tensor(),
                bias: None,
                pad: (0, 0, 0, 0),
                relu: true,
            },
        ];
        let bn = ModuleBnOf {
            gamma: &gamma,
            beta: &beta,
        };
        let no_pool = BlockSpec {
            pool: None,
            ..Default::default()
        };
        let pooled = BlockSpec {
            relu: false,
            ..Default::default()
        };
        let blocks = [
            params(9, 6, 3, true, false, no_pool, 60),
            params(6, 5, 1, false, false, pooled, 70),
        ];
        let x = rand_t(&[4, 1, 14, 12], 56);
        let r = rand_t(&[4, 5, 6, 5], 57);
        let sb: Vec<StackBlock> = blocks.iter().map(Params::block).collect();
        let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();

        let StackTrained {
            y: ys,
            head_stats,
            stats,
        } = inception_stack_train(&x, &branches, Some(bn.get()), &sb).unwrap();
        let gs = loss(&ys);
        let (h1, hs1) = inception_train(&x, &branches, Some(bn.get())).unwrap();
        let (y1, stats1) = block_stack_train(&h1, &sb).unwrap();
        let g1 = loss(&y1);
        let (hr, hsr) = inception_train_reference(&x, &branches, Some(bn.get())).unwrap();
        let (yr, statsr) = block_stack_train_reference(&hr, &sb).unwrap();
        let gr = loss(&yr);

        assert_eq!(ys.dims(), &[4, 5, 6, 5]);
        assert_eq!(bits(&ys), bits(&y1), "output");
        assert_close(&ys, &yr, 1e-4, "output against the reference");
        let ((m, v), (m1, v1), (mr, vr)) = (head_stats.unwrap(), hs1.unwrap(), hsr.unwrap());
        assert_eq!(
            (bits(&m), bits(&v)),
            (bits(&m1), bits(&v1)),
            "module statistics"
        );
        assert_close(&m, &mr, 1e-5, "module mean against the reference");
        assert_close(&v, &vr, 1e-5, "module var against the reference");
        for (k, ((m, v), (m1, v1))) in stats.iter().zip(&stats1).enumerate() {
            assert_eq!(
                (bits(m), bits(v)),
                (bits(m1), bits(v1)),
                "statistics of block {k}"
            );
        }
        assert_eq!(statsr.len(), stats.len());
        let mut vars = vec![&wa, &wb, &bias_b, &wc, &gamma, &beta];
        vars.extend(blocks.iter().flat_map(Params::vars));
        assert_gradients(&vars, [&gs, &g1, &gr]);
        // The images need no gradient: an input that does is refused, as by `inception_train`.
        let xv = Var::from_tensor(&x).unwrap();
        assert!(inception_stack_train(xv.as_tensor(), &branches, Some(bn.get()), &sb).is_err());
    }

    /// The module's BatchNorm parameters of a test.
    struct ModuleBnOf<'a> {
        gamma: &'a Var,
        beta: &'a Var,
    }

    impl ModuleBnOf<'_> {
        fn get(&self) -> crate::ops::ModuleBn<'_> {
            crate::ops::ModuleBn {
                gamma: self.gamma.as_tensor(),
                beta: self.beta.as_tensor(),
                eps: 1e-3,
            }
        }
    }

    #[test]
    fn stack_refuses_bad_inputs() {
        let x = rand_t(&[2, 3, 10, 10], 1);
        assert!(block_stack_train(&x, &[]).is_err());
        // The second block expects 4 input channels, the first gives 6.
        let a = params(3, 6, 3, false, false, BlockSpec::default(), 1);
        let b = params(
            4,
            5,
            3,
            false,
            false,
            BlockSpec {
                pool: None,
                ..Default::default()
            },
            2,
        );
        let err = block_stack_train(&x, &[a.block(), b.block()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("weight"), "{err}");
    }
}

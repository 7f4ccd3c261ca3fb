//! Image-by-image inference of an inception module: every branch of one image runs while that image is in
//! cache, each convolution (a separable one folded into one dense kernel) as a direct convolution
//! ([`super::DirectConv`]) with its bias and ReLU fused into the store, BatchNorm as a per-channel affine.
//! No gradient: inference only.

use candle_core::{Result, Tensor};

use super::{cpu_data, DirectConv, Epilogue, PoolGeom};
use crate::error::shape_err;
use crate::Padding;

/// One layer of a branch, as the plan needs it.
#[derive(Debug, Clone)]
pub enum InferStep {
    /// A stride-1 convolution with weight `[o, c, k, k]` (row-major), optional bias `[o]` and ReLU.
    Conv {
        /// The weight, `o * c * k * k` values.
        weight: Vec<f32>,
        /// Output channels.
        o: usize,
        /// Kernel size.
        k: usize,
        /// Keras padding.
        padding: Padding,
        /// Bias `[o]`.
        bias: Option<Vec<f32>>,
        /// ReLU after the bias.
        relu: bool,
    },
    /// Max pooling.
    Pool {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Keras padding (`-inf` cells).
        padding: Padding,
    },
    /// `x * scale[c] + shift[c]` (BatchNorm with its running statistics folded in).
    Affine {
        /// Per-channel scale.
        scale: Vec<f32>,
        /// Per-channel shift.
        shift: Vec<f32>,
    },
}

/// The dense `[o, c, k, k]` kernel of a depthwise `[c, 1, k, k]` then pointwise `[o, c, 1, 1]`
/// convolution: `w[o, c, ky, kx] = pointwise[o, c] * depthwise[c, ky, kx]`.
pub fn fold_separable(
    depthwise: &[f32],
    pointwise: &[f32],
    c: usize,
    o: usize,
    k: usize,
) -> Vec<f32> {
    let kk = k * k;
    let mut wv = vec![0f32; o * c * kk];
    for (oc, row) in wv.chunks_exact_mut(c * kk).enumerate() {
        for (cc, taps) in row.chunks_exact_mut(kk).enumerate() {
            let p = pointwise[oc * c + cc];
            for (t, d) in taps.iter_mut().zip(&depthwise[cc * kk..(cc + 1) * kk]) {
                *t = p * d;
            }
        }
    }
    wv
}

/// One prepared step of a branch on one image.
enum Step {
    Conv {
        dc: DirectConv,
        bias: Option<Vec<f32>>,
        relu: bool,
    },
    Pool(PoolGeom),
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
}

/// A branch: its steps with the `[c, h, w]` dims after each.
struct Branch {
    steps: Vec<(Step, (usize, usize, usize))>,
    out: (usize, usize, usize),
}

/// Everything a batch needs, prepared once per call from the module's current weights.
pub struct InceptionPlan {
    branches: Vec<Branch>,
    dims: (usize, usize, usize, usize),
    out_c: usize,
    /// Scratch lengths: a planes buffer, a padded input, a wide convolution output.
    planes: usize,
    xp: usize,
    wide: usize,
}

impl InceptionPlan {
    /// The plan for `[b, c, h, w]` inputs of the module whose branches are `branches` (an empty branch
    /// passes its input through). Every branch must end at the same spatial size.
    pub fn new(dims: (usize, usize, usize, usize), branches: &[Vec<InferStep>]) -> Result<Self> {
        let (_, c, h, w) = dims;
        let (mut planes, mut xp, mut wide) = (c * h * w, 0, 0);
        let mut out = Vec::with_capacity(branches.len());
        for branch in branches {
            let mut cur = (c, h, w);
            let mut steps = Vec::with_capacity(branch.len());
            for step in branch {
                let (ci, hi, wi) = cur;
                let (step, next) = match step {
                    InferStep::Conv {
                        weight,
                        o,
                        k,
                        padding,
                        bias,
                        relu,
                    } => {
                        let (pad, _) = padding.resolve2d(hi, wi, *k, 1)?;
                        let dc = DirectConv::new((ci, hi, wi), weight, (*o, *k), pad)?;
                        if bias.as_ref().is_some_and(|b| b.len() != *o) {
                            candle_core::bail!("inception plan: bias does not have {o} values")
                        }
                        xp = xp.max(dc.xp_len);
                        wide = wide.max(dc.out_len());
                        let next = (dc.o, dc.oh, dc.ow);
                        let step = Step::Conv {
                            dc,
                            bias: bias.clone(),
                            relu: *relu,
                        };
                        (step, next)
                    }
                    InferStep::Pool {
                        kernel,
                        stride,
                        padding,
                    } => {
                        let (pad, _) = padding.resolve2d(hi, wi, *kernel, *stride)?;
                        let pg = PoolGeom::new(hi, wi, *kernel, *stride, pad)?;
                        let next = (ci, pg.oh, pg.ow);
                        (Step::Pool(pg), next)
                    }
                    InferStep::Affine { scale, shift } => {
                        if scale.len() != ci || shift.len() != ci {
                            candle_core::bail!("inception plan: affine over {ci} channels expected")
                        }
                        let step = Step::Affine {
                            scale: scale.clone(),
                            shift: shift.clone(),
                        };
                        (step, cur)
                    }
                };
                cur = next;
                planes = planes.max(cur.0 * cur.1 * cur.2);
                steps.push((step, cur));
            }
            out.push(Branch { steps, out: cur });
        }
        let Some(first) = out.first() else {
            candle_core::bail!("inception plan: no branch")
        };
        let (_, oh, ow) = first.out;
        if let Some(br) = out.iter().find(|br| (br.out.1, br.out.2) != (oh, ow)) {
            candle_core::bail!(
                "inception plan: branches end at {oh}x{ow} and {}x{}",
                br.out.1,
                br.out.2
            )
        }
        let out_c = out.iter().map(|br| br.out.0).sum();
        Ok(Self {
            branches: out,
            dims,
            out_c,
            planes,
            xp,
            wide,
        })
    }

    /// `[b, c, h, w] -> [b, sum c_i, oh, ow]`, images in parallel (one image's result never depends on
    /// the others or on the thread count).
    pub fn run(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = self.dims;
        if xs.dims() != [b, c, h, w] {
            return Err(shape_err(
                "inception plan",
                format!("[{b}, {c}, {h}, {w}]"),
                xs.dims(),
            ));
        }
        let (oh, ow) = self
            .branches
            .first()
            .map_or((h, w), |br| (br.out.1, br.out.2));
        let per = self.out_c * oh * ow;
        let chw = c * h * w;
        cpu_data!(xs, xg, x, "inception");
        // [b, out_c, oh, ow]
        let out = super::collect_images(b, per, |i, oimg| {
            self.image(&x[i * chw..(i + 1) * chw], oimg)
        })?;
        Tensor::from_vec(out, (b, self.out_c, oh, ow), xs.device())
    }

    /// One image `xi [c, h, w]` into `oimg [out_c, oh, ow]`.
    fn image(&self, xi: &[f32], oimg: &mut [f32]) -> Result<()> {
        let (_, c, h, w) = self.dims;
        super::with_scratch(
            [self.planes, self.planes, self.xp, self.wide],
            |[pa, pb, xp, wide]| {
                let mut dst_off = 0;
                for br in &self.branches {
                    let (mut cur, mut next) = (&mut *pa, &mut *pb);
                    let mut dims = (c, h, w);
                    let mut from_input = true;
                    for (step, out_dims) in &br.steps {
                        let n_in = dims.0 * dims.1 * dims.2;
                        let src: &[f32] = if from_input { xi } else { &cur[..n_in] };
                        let (oc_n, ohh, oww) = *out_dims;
                        let dst = &mut next[..oc_n * ohh * oww];
                        match step {
                            Step::Conv { dc, bias, relu } => {
                                let epi = Epilogue {
                                    bias: bias.as_deref(),
                                    relu: *relu,
                                    affine: None,
                                };
                                dc.pad_into(src, xp);
                                dc.run(xp, &epi, wide)?;
                                for (oc, plane) in dst.chunks_exact_mut(ohh * oww).enumerate() {
                                    for (oy, row) in plane.chunks_exact_mut(oww).enumerate() {
                                        row.copy_from_slice(dc.row(wide, oc, oy));
                                    }
                                }
                            }
                            Step::Pool(pg) => {
                                let hw = dims.1 * dims.2;
                                for (ch, plane) in dst.chunks_exact_mut(ohh * oww).enumerate() {
                                    pg.plane_max(&src[ch * hw..(ch + 1) * hw], dims.2, plane);
                                }
                            }
                            Step::Affine { scale, shift } => {
                                let hw = dims.1 * dims.2;
                                for (ch, plane) in dst.chunks_exact_mut(hw).enumerate() {
                                    let (s, t) = (scale[ch], shift[ch]);
                                    for (d, &v) in plane.iter_mut().zip(&src[ch * hw..]) {
                                        *d = v * s + t;
                                    }
                                }
                            }
                        }
                        std::mem::swap(&mut cur, &mut next);
                        from_input = false;
                        dims = *out_dims;
                    }
                    let n = dims.0 * dims.1 * dims.2;
                    let src: &[f32] = if from_input { xi } else { &cur[..n] };
                    oimg[dst_off..dst_off + n].copy_from_slice(src);
                    dst_off += n;
                }
                Ok(())
            },
        )
    }
}

//! The inception module: parallel branches over the same input, concatenated along channels.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::{
    batch_norm, conv2d, dropout, separable_conv2d, Activation, BatchNorm, BatchNormConfig, Conv2d,
    Conv2dConfig, Dropout, Kernels, MaxPool2d, MaxPool2dConfig, Padding, SeparableConv2d,
    SharedRng,
};

/// One layer of an inception branch. Convolutions keep the spatial size ('same' padding, stride 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchLayer {
    /// A k x k convolution with bias to `out` channels, followed by the module's activation.
    Conv { out: usize, k: usize },
    /// A k x k separable convolution (depthwise, then pointwise with bias) to `out` channels + activation.
    SepConv { out: usize, k: usize },
    /// k x k max-pooling with stride 1 and 'same' padding.
    MaxPool { k: usize },
    /// BatchNorm over the current channels.
    BatchNorm,
    /// Dropout with this rate.
    Dropout(f32),
}

/// Configuration of an [`InceptionModule`]: the branches, each a list of layers applied to the input.
#[derive(Debug, Clone, PartialEq)]
pub struct InceptionConfig {
    /// The branches, in the order their outputs are concatenated.
    pub branches: Vec<Vec<BranchLayer>>,
    /// Activation after every convolution.
    pub activation: Activation,
    /// BatchNorm settings for `BranchLayer::BatchNorm`.
    pub batch_norm: BatchNormConfig,
    /// Which kernels the layers use.
    pub kernels: Kernels,
}

impl InceptionConfig {
    /// The number of channels the module outputs for an input of `in_c` channels.
    pub fn out_channels(&self, in_c: usize) -> usize {
        self.branches
            .iter()
            .map(|branch| {
                branch.iter().fold(in_c, |c, layer| match layer {
                    BranchLayer::Conv { out, .. } | BranchLayer::SepConv { out, .. } => *out,
                    _ => c,
                })
            })
            .sum()
    }
}

enum BranchOp {
    Conv(Conv2d),
    SepConv(SeparableConv2d),
    MaxPool(MaxPool2d),
    BatchNorm(BatchNorm),
    Dropout(Dropout),
}

impl BranchOp {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            BranchOp::Conv(m) => m.forward(xs),
            BranchOp::SepConv(m) => m.forward(xs),
            BranchOp::MaxPool(m) => m.forward(xs),
            BranchOp::BatchNorm(m) => m.forward_t(xs, train),
            BranchOp::Dropout(m) => m.forward_t(xs, train),
        }
    }
}

/// Parallel branches over one input, concatenated along the channel axis: `[b, c, h, w] -> [b, sum(out_i), h, w]`.
pub struct InceptionModule {
    branches: Vec<Vec<BranchOp>>,
    in_channels: usize,
    out_channels: usize,
    kernels: Kernels,
}

impl InceptionModule {
    /// The number of output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }
}

/// Builds an inception module over `in_c` input channels. Variables live under `vb.pp("branch{i}").pp("{j}")`.
pub fn inception_module(
    in_c: usize,
    cfg: &InceptionConfig,
    vb: VarBuilder,
    rng: SharedRng,
) -> Result<InceptionModule> {
    if cfg.branches.is_empty() {
        candle_core::bail!("inception module needs at least one branch");
    }
    let conv_cfg = Conv2dConfig {
        padding: Padding::Same,
        activation: cfg.activation,
        kernels: cfg.kernels,
        ..Default::default()
    };
    let mut branches = Vec::with_capacity(cfg.branches.len());
    for (i, spec) in cfg.branches.iter().enumerate() {
        let vb_b = vb.pp(format!("branch{i}"));
        let mut c = in_c;
        let mut ops = Vec::with_capacity(spec.len());
        for (j, layer) in spec.iter().enumerate() {
            let vb_l = vb_b.pp(j.to_string());
            let op = match *layer {
                BranchLayer::Conv { out, k } => {
                    let m = conv2d(c, out, k, conv_cfg, vb_l)?;
                    c = out;
                    BranchOp::Conv(m)
                }
                BranchLayer::SepConv { out, k } => {
                    let m = separable_conv2d(c, out, k, conv_cfg, vb_l)?;
                    c = out;
                    BranchOp::SepConv(m)
                }
                BranchLayer::MaxPool { k } => BranchOp::MaxPool(MaxPool2d(MaxPool2dConfig {
                    kernel: k,
                    stride: 1,
                    padding: Padding::Same,
                    kernels: cfg.kernels,
                })),
                BranchLayer::BatchNorm => BranchOp::BatchNorm(batch_norm(c, cfg.batch_norm, vb_l)?),
                BranchLayer::Dropout(p) => BranchOp::Dropout(dropout(p, rng.clone())),
            };
            ops.push(op);
        }
        branches.push(ops);
    }
    Ok(InceptionModule {
        branches,
        in_channels: in_c,
        out_channels: cfg.out_channels(in_c),
        kernels: cfg.kernels,
    })
}

impl InceptionModule {
    /// The layer-by-layer forward pass (candle ops or the fast ops, as the layers' kernels say).
    fn forward_layers(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.branches.len());
        for branch in &self.branches {
            let mut ys = xs.clone();
            for op in branch {
                ys = op.forward_t(&ys, train)?;
            }
            outs.push(ys); // [b, c_i, h, w]
        }
        Tensor::cat(&outs, 1) // [b, sum c_i, h, w]
    }
}

impl ModuleT for InceptionModule {
    /// Inference with the fast kernels runs [`infer::Plan`]: all branches of one image at a time, in cache
    /// (no gradient); otherwise the layers run one after the other.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !train && self.kernels.use_fast(xs) {
            if let Some(plan) = infer::Plan::new(self, xs)? {
                return plan.run(xs);
            }
        }
        self.forward_layers(xs, train)
    }
}

/// Image-by-image inference of an [`InceptionModule`].
mod infer {
    use super::{BranchOp, InceptionModule};
    use crate::error::shape_err;
    use crate::ops::{self, DirectConv, Epilogue, PoolGeom};
    use candle_core::{Result, Tensor};

    /// One step of a branch on one image.
    enum Step {
        /// A stride-1 convolution (a separable one folded into one dense kernel), bias, activation.
        Conv {
            dc: DirectConv,
            bias: Option<Vec<f32>>,
            relu: bool,
        },
        /// A max pool.
        Pool(PoolGeom),
        /// BatchNorm with its running statistics: `x * scale + shift` per channel.
        Affine { scale: Vec<f32>, shift: Vec<f32> },
    }

    /// A branch: its steps with the `[c, h, w]` dims after each.
    struct Branch {
        steps: Vec<(Step, (usize, usize, usize))>,
        out: (usize, usize, usize),
    }

    /// Everything a batch needs, prepared once per call from the module's current weights.
    pub(super) struct Plan {
        branches: Vec<Branch>,
        dims: (usize, usize, usize, usize),
        out_c: usize,
        /// Scratch lengths: a planes buffer, a padded input, a wide convolution output.
        planes: usize,
        xp: usize,
        wide: usize,
    }

    fn vec1(t: &Tensor) -> Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }

    impl Plan {
        /// The plan for input `xs [b, c, h, w]`, or `None` for a layer it does not cover (a strided
        /// convolution, an activated or biased depthwise stage): the caller then runs the layers.
        pub(super) fn new(m: &InceptionModule, xs: &Tensor) -> Result<Option<Self>> {
            let (b, c, h, w) = match xs.dims() {
                &[b, c, h, w] if c == m.in_channels => (b, c, h, w),
                d => {
                    return Err(shape_err(
                        "inception",
                        format!("[b, {}, h, w]", m.in_channels),
                        d,
                    ))
                }
            };
            let (mut planes, mut xp, mut wide) = (c * h * w, 0, 0);
            let mut branches = Vec::with_capacity(m.branches.len());
            for branch in &m.branches {
                let mut dims = (c, h, w);
                let mut steps = Vec::with_capacity(branch.len());
                for op in branch {
                    let (ci, hi, wi) = dims;
                    let step = match op {
                        BranchOp::Conv(conv) => {
                            let cfg = conv.config();
                            let (o, _, k, _) = conv.weight().dims4()?;
                            if cfg.stride != 1 {
                                return Ok(None);
                            }
                            let (pad, _) = cfg.padding.resolve2d(hi, wi, k, 1)?;
                            let dc =
                                DirectConv::new((ci, hi, wi), &vec1(conv.weight())?, (o, k), pad)?;
                            let bias = conv.bias().map(vec1).transpose()?;
                            Step::Conv {
                                dc,
                                bias,
                                relu: cfg.activation.is_relu(),
                            }
                        }
                        BranchOp::SepConv(sep) => {
                            let (dw, pw) = (sep.depthwise(), sep.pointwise());
                            let (dcfg, pcfg) = (dw.config(), pw.config());
                            if dcfg.stride != 1
                                || dw.bias().is_some()
                                || dcfg.activation.is_relu()
                                || pcfg.stride != 1
                            {
                                return Ok(None);
                            }
                            let (_, _, k, _) = dw.weight().dims4()?;
                            let (o, _, _, _) = pw.weight().dims4()?;
                            let (pad, _) = dcfg.padding.resolve2d(hi, wi, k, 1)?;
                            // depthwise [ci, 1, k, k] then pointwise [o, ci, 1, 1] is the dense
                            // [o, ci, k, k] kernel w[o, c, ky, kx] = pw[o, c] * dw[c, ky, kx].
                            let (dwv, pwv) = (vec1(dw.weight())?, vec1(pw.weight())?);
                            let kk = k * k;
                            let mut wv = vec![0f32; o * ci * kk];
                            for (oc, row) in wv.chunks_exact_mut(ci * kk).enumerate() {
                                for (cc, taps) in row.chunks_exact_mut(kk).enumerate() {
                                    let p = pwv[oc * ci + cc];
                                    for (t, d) in taps.iter_mut().zip(&dwv[cc * kk..(cc + 1) * kk])
                                    {
                                        *t = p * d;
                                    }
                                }
                            }
                            let dc = DirectConv::new((ci, hi, wi), &wv, (o, k), pad)?;
                            let bias = pw.bias().map(vec1).transpose()?;
                            Step::Conv {
                                dc,
                                bias,
                                relu: pcfg.activation.is_relu(),
                            }
                        }
                        BranchOp::MaxPool(p) => {
                            let p = p.0;
                            let (pad, _) = p.padding.resolve2d(hi, wi, p.kernel, p.stride)?;
                            Step::Pool(PoolGeom::new(hi, wi, p.kernel, p.stride, pad)?)
                        }
                        BranchOp::BatchNorm(bn) => {
                            let (scale, shift) = bn.eval_scale_shift()?;
                            Step::Affine {
                                scale: vec1(&scale)?,
                                shift: vec1(&shift)?,
                            }
                        }
                        BranchOp::Dropout(_) => continue,
                    };
                    dims = match &step {
                        Step::Conv { dc, .. } => {
                            xp = xp.max(dc.xp_len);
                            wide = wide.max(dc.out_len());
                            (dc.o, dc.oh, dc.ow)
                        }
                        Step::Pool(pg) => (ci, pg.oh, pg.ow),
                        Step::Affine { .. } => dims,
                    };
                    planes = planes.max(dims.0 * dims.1 * dims.2);
                    steps.push((step, dims));
                }
                branches.push(Branch { steps, out: dims });
            }
            let Some(first) = branches.first() else {
                return Ok(None);
            };
            let (_, oh, ow) = first.out;
            if branches.iter().any(|br| (br.out.1, br.out.2) != (oh, ow)) {
                return Ok(None);
            }
            let out_c = branches.iter().map(|br| br.out.0).sum();
            Ok(Some(Self {
                branches,
                dims: (b, c, h, w),
                out_c,
                planes,
                xp,
                wide,
            }))
        }

        /// `[b, c, h, w] -> [b, sum c_i, oh, ow]`, images in parallel (one image's result never
        /// depends on the others or on the thread count).
        pub(super) fn run(&self, xs: &Tensor) -> Result<Tensor> {
            let (b, c, h, w) = self.dims;
            let (oh, ow) = self
                .branches
                .first()
                .map_or((h, w), |br| (br.out.1, br.out.2));
            let per = self.out_c * oh * ow;
            let chw = c * h * w;
            ops::cpu_data!(xs, xg, x, "inception");
            // [b, out_c, oh, ow]
            let out = ops::collect_images(b, per, |i, oimg| {
                self.image(&x[i * chw..(i + 1) * chw], oimg)
            });
            Tensor::from_vec(out, (b, self.out_c, oh, ow), xs.device())
        }

        /// One image `xi [c, h, w]` into `oimg [out_c, oh, ow]`.
        fn image(&self, xi: &[f32], oimg: &mut [f32]) {
            let (_, c, h, w) = self.dims;
            ops::with_scratch(
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
                                    dc.run(xp, &epi, wide);
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
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededVarMap;
    use crate::ops::test_util::{assert_close, rand_t};
    use crate::shared_rng;
    use candle_core::{DType, Device};

    fn build(
        cfg: &InceptionConfig,
        in_c: usize,
        kernels: Kernels,
    ) -> (InceptionModule, SeededVarMap) {
        let vars = SeededVarMap::new(7);
        let cfg = InceptionConfig {
            kernels,
            batch_norm: BatchNormConfig {
                kernels,
                ..cfg.batch_norm
            },
            ..cfg.clone()
        };
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        let m = inception_module(in_c, &cfg, vb, shared_rng(0)).unwrap();
        (m, vars)
    }

    /// The image-by-image inference plan against the same module on candle's ops and on the
    /// layer-by-layer fast ops (random inputs, odd sizes), and bit-identical on 1 and 3 threads.
    #[test]
    fn inference_plan_matches_reference() {
        use BranchLayer::{BatchNorm, Conv, Dropout, MaxPool, SepConv};
        let seed = InceptionConfig {
            branches: vec![
                vec![
                    SepConv { out: 2, k: 3 },
                    MaxPool { k: 2 },
                    Conv { out: 1, k: 1 },
                    Dropout(0.25),
                ],
                vec![
                    Conv { out: 2, k: 1 },
                    SepConv { out: 2, k: 5 },
                    Dropout(0.25),
                ],
                vec![Conv { out: 2, k: 1 }, Dropout(0.25)],
                vec![Conv { out: 2, k: 1 }, SepConv { out: 2, k: 3 }],
            ],
            activation: Activation::Relu,
            batch_norm: BatchNormConfig::default(),
            kernels: Kernels::Auto,
        };
        let improved = InceptionConfig {
            branches: vec![
                vec![Conv { out: 4, k: 1 }, BatchNorm],
                vec![Conv { out: 3, k: 3 }],
                vec![Conv { out: 5, k: 5 }, BatchNorm, MaxPool { k: 3 }],
                vec![MaxPool { k: 3 }, Conv { out: 4, k: 1 }],
                vec![Dropout(0.5)],
            ],
            activation: Activation::None,
            ..seed.clone()
        };
        for (cfg, in_c) in [(&seed, 1), (&improved, 1), (&seed, 3), (&improved, 2)] {
            let (fast, _vf) = build(cfg, in_c, Kernels::Auto);
            let (refr, _vr) = build(cfg, in_c, Kernels::Reference);
            // One training step each, so that the BatchNorm running statistics are not 0 / 1.
            let xt = rand_t(&[6, in_c, 12, 10], 1);
            fast.forward_t(&xt, true).unwrap();
            refr.forward_t(&xt, true).unwrap();
            for (i, (h, w)) in [(28, 28), (9, 13), (5, 6)].into_iter().enumerate() {
                let x = rand_t(&[3, in_c, h, w], 10 + i as u64);
                let what = format!("in_c {in_c} {h}x{w} {:?}", cfg.branches);
                assert!(
                    infer::Plan::new(&fast, &x).unwrap().is_some(),
                    "no plan: {what}"
                );
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| fast.forward_t(&x, false).unwrap())
                };
                let y1 = run(1);
                let yr = refr.forward_t(&x, false).unwrap();
                assert_eq!(y1.dims(), yr.dims(), "{what}");
                assert_close(&y1, &yr, 1e-4, &format!("plan vs reference {what}"));
                let yl = fast.forward_layers(&x, false).unwrap();
                assert_close(&y1, &yl, 1e-4, &format!("plan vs fast layers {what}"));
                assert_close(&run(3), &y1, 0.0, &format!("1 vs 3 threads {what}"));
            }
        }
        let (fast, _v) = build(&seed, 1, Kernels::Auto);
        assert!(fast.forward_t(&rand_t(&[2, 3, 8, 8], 1), false).is_err());
    }
}

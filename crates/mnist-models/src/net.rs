//! A built model: the stages [`crate::build`] lowered an [`ArchSpec`] to, run one after the other.

use candle_core::{Module, ModuleT, Result, Tensor};
use mnist_layers::{BatchNorm, FusedBlock, InceptionModule, RunningStats};

use crate::ArchSpec;

/// A stateless or stateful layer of a [`Net`].
pub(crate) enum Layer {
    Plain(Box<dyn Module + Send + Sync>),
    Train(Box<dyn ModuleT + Send + Sync>),
    /// A fused block: a run of them trains as one op ([`mnist_layers::train_stack`]).
    Block(FusedBlock),
    /// An inception module: with the BatchNorm stage after it, it trains as one op
    /// ([`InceptionModule::train_with_bn`]).
    Inception(InceptionModule),
    /// A BatchNorm stage.
    Norm(BatchNorm),
    /// Keeps its input, the input of top-level layer `n`, for a residual shortcut; passes it on.
    KeepInput(usize),
    /// Adds the input kept for top-level layer `n` (a residual shortcut).
    AddInputOf(usize),
}

/// One named stage of a [`Net`]: its variables live under `prefix.` for each of its prefixes (one, or
/// several for a fused block such as conv1 + bn1 + pool1).
pub(crate) struct Stage {
    pub(crate) name: String,
    pub(crate) kind: &'static str,
    pub(crate) prefixes: Vec<String>,
    pub(crate) layer: Layer,
}

impl Stage {
    pub(crate) fn plain(
        name: &str,
        kind: &'static str,
        m: impl Module + Send + Sync + 'static,
    ) -> Self {
        Self::with_layer(name, kind, &[name], Layer::Plain(Box::new(m)))
    }

    pub(crate) fn train(
        name: &str,
        kind: &'static str,
        m: impl ModuleT + Send + Sync + 'static,
    ) -> Self {
        Self::with_layer(name, kind, &[name], Layer::Train(Box::new(m)))
    }

    /// A fused convolution block (its variables under the convolution's and the BatchNorm's prefixes).
    pub(crate) fn block(name: &str, kind: &'static str, prefixes: &[&str], b: FusedBlock) -> Self {
        Self::with_layer(name, kind, prefixes, Layer::Block(b))
    }

    /// An inception module.
    pub(crate) fn inception(name: &str, m: InceptionModule) -> Self {
        Self::with_layer(name, "Inception", &[name], Layer::Inception(m))
    }

    /// A BatchNorm.
    pub(crate) fn norm(name: &str, bn: BatchNorm) -> Self {
        Self::with_layer(name, "BatchNormalization", &[name], Layer::Norm(bn))
    }

    /// Keeps the input of top-level layer `n` for a shortcut (no output of its own in traces).
    pub(crate) fn keep_input(n: usize) -> Self {
        Self::with_layer(
            &format!("layers[{n}].input"),
            "Input",
            &[],
            Layer::KeepInput(n),
        )
    }

    /// Adds the input of top-level layer `n` to its input (a residual shortcut).
    pub(crate) fn add_input_of(name: &str, n: usize) -> Self {
        Self::with_layer(name, "Add", &[], Layer::AddInputOf(n))
    }

    fn with_layer(name: &str, kind: &'static str, prefixes: &[&str], layer: Layer) -> Self {
        Self {
            name: name.to_string(),
            kind,
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            layer,
        }
    }

    /// The stage over `xs`; `kept` holds the inputs kept for shortcuts so far, by layer.
    fn forward_t(
        &self,
        xs: &Tensor,
        train: bool,
        kept: &mut Vec<(usize, Tensor)>,
    ) -> Result<Tensor> {
        match &self.layer {
            Layer::Plain(m) => m.forward(xs),
            Layer::Train(m) => m.forward_t(xs, train),
            Layer::Block(b) => b.forward_t(xs, train),
            Layer::Inception(m) => m.forward_t(xs, train),
            Layer::Norm(bn) => bn.forward_t(xs, train),
            Layer::KeepInput(n) => {
                kept.push((*n, xs.clone()));
                Ok(xs.clone())
            }
            Layer::AddInputOf(n) => match kept.iter().find(|(k, _)| k == n) {
                Some((_, from)) => xs + from,
                None => candle_core::bail!("{}: the input of layers[{n}] was not kept", self.name),
            },
        }
    }
}

/// `[b, ...] -> [b, prod(...)]`.
pub(crate) struct Flatten;

impl Module for Flatten {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.flatten_from(1)
    }
}

/// Global average pooling `[b, c, h, w] -> [b, c]`.
pub(crate) struct GlobalAvgPool;

impl Module for GlobalAvgPool {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        mnist_layers::global_avg_pool(xs)
    }
}

/// One stage of a [`Net`] as seen by [`Net::trace_shapes`] (a fused block is one stage).
#[derive(Debug, Clone)]
pub struct StageTrace {
    /// The stage name.
    pub name: String,
    /// The Keras-style layer type.
    pub kind: &'static str,
    /// The prefixes of the stage's variables.
    pub prefixes: Vec<String>,
    /// The output shape, batch dimension included.
    pub dims: Vec<usize>,
}

/// A built model: `[b, 1, 28, 28]` images (pixels / 255) to `[b, 10]` logits (softmax is in the loss).
pub struct Net {
    spec: ArchSpec,
    stages: Vec<Stage>,
    /// Shared by every BatchNorm of the model.
    bn_stats: RunningStats,
}

impl Net {
    pub(crate) fn new(spec: ArchSpec, stages: Vec<Stage>, bn_stats: RunningStats) -> Self {
        Self {
            spec,
            stages,
            bn_stats,
        }
    }

    /// Replaces every BatchNorm's running statistics with the plain mean of its batch statistics over
    /// `batches`, each run through the model in training mode ("precise BatchNorm", see
    /// [`RunningStats`]): the moving average that training leaves weighs the last few dozen batches
    /// most. The weights are not touched and no gradient is taken. Returns the number of batches; with
    /// none, nothing changes. Layers go back to their momentum afterwards, also after an error.
    pub fn recalibrate_batch_norm(
        &self,
        batches: impl IntoIterator<Item = Result<Tensor>>,
    ) -> Result<usize> {
        let mut n = 0;
        let pass = || -> Result<usize> {
            for batch in batches {
                let batch = batch?;
                n += 1;
                self.bn_stats.average_batch(n);
                self.run(&batch, true)?;
            }
            Ok(n)
        };
        let result = pass();
        self.bn_stats.use_momentum();
        result
    }

    /// A training-mode forward pass (batch statistics, a graph for gradients) that leaves every
    /// BatchNorm's running statistics as they are: a second look at a batch already counted, as
    /// sharpness-aware minimisation takes at perturbed weights. Layers go back to their momentum
    /// afterwards, also after an error.
    pub fn forward_train_keeping_statistics(&self, xs: &Tensor) -> Result<Tensor> {
        self.bn_stats.freeze();
        let result = self.run(xs, true);
        self.bn_stats.use_momentum();
        result
    }

    /// A training-mode forward pass with ghost BatchNorm (Hoffer, Hubara and Soudry 2017, "Train longer,
    /// generalize better", section 4.1): `xs` runs through the model in consecutive parts of `ghost`
    /// images (the last may be shorter), so that every BatchNorm normalises each part by that part's
    /// own statistics, and the parts' outputs are concatenated in order (gradients flow to each part).
    /// The running statistics move once, as for one batch with the layers' momentum, toward the plain
    /// mean of the parts' statistics (as the usual ghost BatchNorm's per-part statistics, averaged). With
    /// `keep_statistics`, they do not move (as [`Self::forward_train_keeping_statistics`]). A batch of at
    /// most `ghost` images is one part, an ordinary training-mode pass. Layers go back to their momentum
    /// afterwards, also after an error.
    pub fn forward_train_ghost(
        &self,
        xs: &Tensor,
        ghost: usize,
        keep_statistics: bool,
    ) -> Result<Tensor> {
        let b = xs.dim(0)?;
        if ghost == 0 {
            candle_core::bail!("ghost BatchNorm: the ghost batch size must be at least 1");
        }
        let parts = b.div_ceil(ghost);
        if parts <= 1 {
            return match keep_statistics {
                true => self.forward_train_keeping_statistics(xs),
                false => self.run(xs, true),
            };
        }
        let pass = || -> Result<Tensor> {
            let mut ys = Vec::with_capacity(parts);
            for i in 0..parts {
                if keep_statistics {
                    self.bn_stats.freeze();
                } else {
                    self.bn_stats.ghost_part(i + 1, parts);
                }
                let start = i * ghost;
                ys.push(self.run(&xs.narrow(0, start, ghost.min(b - start))?, true)?);
            }
            Tensor::cat(&ys, 0)
        };
        let result = pass();
        self.bn_stats.use_momentum();
        result
    }

    /// The architecture the model was built from.
    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Every stage over `xs`, one after the other; in training, each run of consecutive fused blocks
    /// as one op ([`mnist_layers::train_stack`]), and an inception module with its BatchNorm and the
    /// fused blocks after it as one ([`mnist_layers::train_inception_stack`]): the same results,
    /// without candle's gradient store between them. In inference, each run of fused blocks image by
    /// image through all of them in cache ([`mnist_layers::infer_stack`]), bit for bit the same.
    fn run(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut ys = match self.spec.deskew {
            true => deskew(xs)?,
            false => xs.clone(),
        };
        let mut kept = Vec::new();
        let mut rest = &self.stages[..];
        while let Some((stage, after)) = rest.split_first() {
            let blocks = leading_blocks(rest);
            if !blocks.is_empty() {
                // One block, or blocks off the fast kernels, run one by one inside; in inference each
                // image goes through the whole run in cache.
                ys = match train {
                    true => mnist_layers::train_stack(&blocks, &ys)?,
                    false => mnist_layers::infer_stack(&blocks, &ys)?,
                };
                rest = &rest[blocks.len()..];
                continue;
            }
            if train {
                if let [Stage {
                    layer: Layer::Inception(m),
                    ..
                }, Stage {
                    layer: Layer::Norm(bn),
                    ..
                }, ..] = rest
                {
                    // With the blocks after it, one op too.
                    let blocks = leading_blocks(&rest[2..]);
                    ys = mnist_layers::train_inception_stack(m, bn, &blocks, &ys)?;
                    rest = &rest[2 + blocks.len()..];
                    continue;
                }
            }
            ys = stage.forward_t(&ys, train, &mut kept)?;
            rest = after;
        }
        Ok(ys)
    }

    /// Runs the model in inference mode on `xs` and describes every stage's output.
    pub fn trace_shapes(&self, xs: &Tensor) -> Result<Vec<StageTrace>> {
        let mut shapes = Vec::with_capacity(self.stages.len());
        let mut ys = xs.clone();
        let mut kept = Vec::new();
        for stage in &self.stages {
            ys = stage.forward_t(&ys, false, &mut kept)?;
            if matches!(stage.layer, Layer::KeepInput(_)) {
                continue;
            }
            shapes.push(StageTrace {
                name: stage.name.clone(),
                kind: stage.kind,
                prefixes: stage.prefixes.clone(),
                dims: ys.dims().to_vec(),
            });
        }
        Ok(shapes)
    }
}

/// Every image of `xs` (`[b, 1, 28, 28]`) deskewed ([`mnist_data::deskew_into`]); an input transform
/// with no parameters, so no gradient flows through it.
fn deskew(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let side = mnist_data::IMAGE_SIDE;
    if (c, h, w) != (1, side, side) {
        candle_core::bail!("deskew: images must be [b, 1, 28, 28], got {:?}", xs.dims());
    }
    use rayon::prelude::*;
    let src = xs.flatten_all()?.to_vec1::<f32>()?;
    let mut dst = vec![0f32; src.len()];
    // Images are independent: in parallel, the same values.
    dst.par_chunks_exact_mut(mnist_data::IMAGE_PIXELS)
        .zip(src.par_chunks_exact(mnist_data::IMAGE_PIXELS))
        .for_each(|(d, s)| mnist_data::deskew_into(s, d));
    Tensor::from_vec(dst, (b, c, h, w), xs.device())
}

/// The fused blocks at the start of `stages`, up to the first other stage.
fn leading_blocks(stages: &[Stage]) -> Vec<&FusedBlock> {
    stages
        .iter()
        .map_while(|s| match &s.layer {
            Layer::Block(b) => Some(b),
            _ => None,
        })
        .collect()
}

/// Inference on the CPU runs a large batch through the whole network in chunks of this many images, the
/// chunks in parallel, so that a chunk's activations stay in cache from stage to stage (one stage over
/// 1,000 images writes tens of MB, which would go to memory and back). Images are independent in
/// inference (BatchNorm uses its running statistics), so each image's logits are those of one pass, up
/// to float rounding in the dense layers (candle's matmul sums in an order that depends on the number of
/// rows; the convolution kernels work image by image and give the same bits). Since runs of fused blocks
/// take each image through all of them in cache ([`mnist_layers::infer_stack`], itself parallel over the
/// images), a chunk only has to keep the stages between such runs in cache, and each chunk prepares every
/// block's kernels again: 128 against 32, `cargo bench --bench models -- --no-reference --filter
/// "improved fwd b1000"`, 2 threads, three alternations (2026-12-06): conv 81,903-84,672 against
/// 76,449-78,411 images/s, separable 72,828-81,137 against 66,184-72,646, inception 50,221-51,538 against
/// 49,288-50,792; 256 was level with 128, one chunk of 1,000 halved the inception (its module runs stage by
/// stage).
pub const EVAL_CHUNK: usize = 128;

impl ModuleT for Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        use rayon::prelude::*;
        let b = xs.dim(0)?;
        if train || b <= EVAL_CHUNK || !xs.device().is_cpu() {
            return self.run(xs, train);
        }
        let starts: Vec<usize> = (0..b).step_by(EVAL_CHUNK).collect();
        let parts = starts
            .par_iter()
            .map(|&start| self.run(&xs.narrow(0, start, EVAL_CHUNK.min(b - start))?, false))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

/// True for variables the optimizer trains; false for BatchNorm running statistics (Keras's
/// "non-trainable params").
pub fn is_trainable(name: &str) -> bool {
    !(name.ends_with("running_mean") || name.ends_with("running_var"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{build, builtin, dropout_rng, ArchSpec, Solution, Variant};
    use candle_core::{DType, Device};
    use mnist_layers::{init::SeededVarMap, Kernels};

    /// Every BatchNorm running statistic of `vars`, by name.
    fn running(vars: &SeededVarMap) -> Vec<(String, Vec<f32>)> {
        let data = vars.var_map().data().lock().unwrap();
        let mut out: Vec<_> = data
            .iter()
            .filter(|(name, _)| !is_trainable(name))
            .map(|(name, v)| (name.clone(), v.as_tensor().to_vec1::<f32>().unwrap()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn net(spec: &ArchSpec, kernels: Kernels) -> (Net, SeededVarMap) {
        let vars = SeededVarMap::new(5);
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        (build(spec, vb, kernels, dropout_rng(5)).unwrap(), vars)
    }

    /// Six images drawn from `seed` (the same on every run and machine), scaled by a seed-dependent
    /// factor so that batches differ in their statistics, not only in their pixels.
    fn images(seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let scale = 0.5 + seed as f32 * 0.25;
        let v: Vec<f32> = (0..6 * 28 * 28)
            .map(|_| rng.random::<f32>() * scale)
            .collect();
        Tensor::from_vec(v, (6, 1, 28, 28), &Device::Cpu).unwrap()
    }

    /// Recalibrating on one batch leaves that batch's statistics, exactly as one training step of a
    /// momentum-0 model would; on two, their mean; and the layers keep their momentum afterwards.
    #[test]
    fn recalibration_leaves_the_mean_of_the_batch_statistics() {
        let (x1, x2) = (images(1), images(2));
        for solution in [Solution::Conv, Solution::Separable, Solution::Inception] {
            for variant in [Variant::Seed, Variant::Improved] {
                for kernels in [Kernels::Auto, Kernels::Reference] {
                    let spec = builtin(solution, variant);
                    let mut zero = spec.clone();
                    zero.batch_norm.momentum = 0.0;
                    let one_step = |x: &Tensor| {
                        let (n, vars) = net(&zero, kernels);
                        n.forward_t(x, true).unwrap();
                        running(&vars)
                    };
                    let (n, vars) = net(spec, kernels);
                    let before = running(&vars);
                    assert_eq!(n.recalibrate_batch_norm([]).unwrap(), 0);
                    assert_eq!(running(&vars), before, "no batches, no change");
                    assert_eq!(n.recalibrate_batch_norm([Ok(x1.clone())]).unwrap(), 1);
                    let what = format!("{solution} {variant} {kernels:?}");
                    assert_eq!(running(&vars), one_step(&x1), "{what}: one batch");
                    if format!("{spec:?}").contains("Dropout") {
                        continue; // two passes draw different masks
                    }
                    n.recalibrate_batch_norm([Ok(x1.clone()), Ok(x2.clone())])
                        .unwrap();
                    let (a, b) = (one_step(&x1), one_step(&x2));
                    for ((name, got), ((_, a), (_, b))) in
                        running(&vars).iter().zip(a.iter().zip(&b))
                    {
                        for ((g, a), b) in got.iter().zip(a).zip(b) {
                            let want = (a + b) / 2.0;
                            assert!(
                                (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                                "{what} {name}: {g} vs {want}"
                            );
                        }
                    }
                    // Momentum again: a training step moves the statistics only part of the way.
                    let recalibrated = running(&vars);
                    n.forward_t(&x1, true).unwrap();
                    let m = spec.batch_norm.momentum as f32;
                    for ((name, now), ((_, old), (_, batch))) in running(&vars)
                        .iter()
                        .zip(recalibrated.iter().zip(&one_step(&x1)))
                    {
                        for ((n, o), b) in now.iter().zip(old).zip(batch) {
                            let want = m * o + (1.0 - m) * b;
                            assert!(
                                (n - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{what} {name}: {n} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A pass that keeps the statistics computes what a training pass computes (output and gradients,
    /// bit for bit, where no dropout mask differs) and leaves every running statistic as it was; the
    /// next training pass uses the momentum again.
    #[test]
    fn a_pass_keeping_the_statistics_trains_like_any_other() {
        let x = images(3);
        for solution in [Solution::Conv, Solution::Separable, Solution::Inception] {
            for variant in [Variant::Seed, Variant::Improved] {
                for kernels in [Kernels::Auto, Kernels::Reference] {
                    let spec = builtin(solution, variant);
                    let what = format!("{solution} {variant} {kernels:?}");
                    let (n, vars) = net(spec, kernels);
                    let before = running(&vars);
                    let kept = n.forward_train_keeping_statistics(&x).unwrap();
                    assert_eq!(running(&vars), before, "{what}: statistics kept");
                    let plain = n.forward_t(&x, true).unwrap();
                    if !before.is_empty() {
                        assert_ne!(running(&vars), before, "{what}: momentum again");
                    }
                    if format!("{spec:?}").contains("Dropout") {
                        continue; // the two passes draw different masks
                    }
                    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(flat(&kept), flat(&plain), "{what}: output");
                    let (gk, gp) = (
                        kept.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
                        plain.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
                    );
                    let data = vars.var_map().data().lock().unwrap();
                    for (name, v) in data.iter().filter(|(name, _)| is_trainable(name)) {
                        let (a, b) = (gk.get(v.as_tensor()), gp.get(v.as_tensor()));
                        let (a, b) = (a.expect(name), b.expect(name));
                        assert_eq!(flat(a), flat(b), "{what}: gradient of {name}");
                    }
                }
            }
        }
    }

    /// In inference, each run of fused blocks goes image by image through all of them
    /// (`mnist_layers::infer_stack`): the same logits, bit for bit, as the stages one by one, for every
    /// built-in model and a spec with padded, strided, separable and pooled blocks and a shortcut, on batches whose
    /// last image has nothing after it to read as padding.
    #[test]
    fn inference_stacks_give_the_blocks_one_by_one_bit_for_bit() {
        let mixed = ArchSpec::from_json(
            r#"{ "layers": [
                { "type": "conv", "filters": 6, "kernel": 3, "padding": "same", "batch_norm": "after" },
                { "type": "conv", "filters": 8, "kernel": 3, "batch_norm": "after", "pool": { "kernel": 2 } },
                { "type": "separable_conv", "filters": 12, "kernel": 3, "batch_norm": "after" },
                { "type": "conv", "filters": 12, "kernel": 3, "stride": 2, "batch_norm": "after" },
                { "type": "separable_conv", "filters": 10, "kernel": 3, "padding": "same", "batch_norm": "after", "pool": { "kernel": 2 } },
                { "type": "conv", "filters": 10, "kernel": 1, "batch_norm": "after", "shortcut": 5 },
                { "type": "global_avg_pool" },
                { "type": "dense", "units": 10 }
            ] }"#,
        )
        .unwrap();
        let mut specs: Vec<ArchSpec> = Vec::new();
        for solution in [Solution::Conv, Solution::Separable, Solution::Inception] {
            for variant in [Variant::Seed, Variant::Improved] {
                specs.push(builtin(solution, variant).clone());
            }
        }
        specs.push(mixed);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for spec in &specs {
            let (n, _) = net(spec, Kernels::Auto);
            // Train a step so the running statistics are not the initial ones.
            n.forward_t(&images(6), true).unwrap();
            // Batches under and over the 16 images that inference runs across vector lanes.
            let many = Tensor::cat(&[images(9), images(10), images(11), images(12)], 0).unwrap();
            for x in [images(7), images(8).narrow(0, 0, 1).unwrap(), many] {
                let stacked = n.forward_t(&x, false).unwrap();
                let mut kept = Vec::new();
                // The deskewing is the net's input transform, before its stages.
                let input = if spec.deskew {
                    deskew(&x).unwrap()
                } else {
                    x.clone()
                };
                let one_by_one = n
                    .stages
                    .iter()
                    .try_fold(input, |ys, s| s.forward_t(&ys, false, &mut kept))
                    .unwrap();
                assert_eq!(flat(&stacked), flat(&one_by_one), "{}", spec.name);
            }
        }
    }

    /// Ghost BatchNorm: the output is each part's own training pass, concatenated, with the gradients of
    /// those passes; the running statistics move once toward the parts' mean (or not at all when kept);
    /// a batch no larger than a ghost batch is an ordinary training pass, bit for bit.
    #[test]
    fn ghost_batches_are_separate_passes_that_move_the_statistics_once() {
        let x = images(4);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for solution in [Solution::Conv, Solution::Separable, Solution::Inception] {
            for kernels in [Kernels::Auto, Kernels::Reference] {
                let spec = builtin(solution, Variant::Improved);
                let what = format!("{solution} {kernels:?}");
                let mut zero = spec.clone();
                zero.batch_norm.momentum = 0.0;
                let stats_of = |x: &Tensor| {
                    let (n, vars) = net(&zero, kernels);
                    n.forward_t(x, true).unwrap();
                    running(&vars)
                };
                let parts = [x.narrow(0, 0, 4).unwrap(), x.narrow(0, 4, 2).unwrap()];
                let (ghost, gvars) = net(spec, kernels);
                let before = running(&gvars);
                let y = ghost.forward_train_ghost(&x, 4, false).unwrap();
                let (plain, pvars) = net(spec, kernels);
                let ys: Vec<Tensor> = parts
                    .iter()
                    .map(|p| plain.forward_train_keeping_statistics(p).unwrap())
                    .collect();
                assert_eq!(
                    flat(&y),
                    flat(&Tensor::cat(&ys, 0).unwrap()),
                    "{what}: output"
                );
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let loss = (ys[0].sqr().unwrap().sum_all().unwrap()
                    + ys[1].sqr().unwrap().sum_all().unwrap())
                .unwrap();
                let gp = loss.backward().unwrap();
                let (gd, pd) = (
                    gvars.var_map().data().lock().unwrap(),
                    pvars.var_map().data().lock().unwrap(),
                );
                for (name, v) in gd.iter().filter(|(name, _)| is_trainable(name)) {
                    let a = flat(g.get(v.as_tensor()).expect(name));
                    let b = flat(gp.get(pd[name].as_tensor()).expect(name));
                    for (a, b) in a.iter().zip(&b) {
                        assert!(
                            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{what}: gradient of {name}: {a} vs {b}"
                        );
                    }
                }
                drop((gd, pd));
                let m = spec.batch_norm.momentum as f32;
                let (s0, s1) = (stats_of(&parts[0]), stats_of(&parts[1]));
                for (((name, now), (_, old)), ((_, a), (_, b))) in
                    running(&gvars).iter().zip(&before).zip(s0.iter().zip(&s1))
                {
                    for (((n, o), a), b) in now.iter().zip(old).zip(a).zip(b) {
                        let want = m * o + (1.0 - m) * (a + b) / 2.0;
                        assert!(
                            (n - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{what} {name}: {n} vs {want}"
                        );
                    }
                }
                // Kept: nothing moves. One part: an ordinary pass.
                let moved = running(&gvars);
                ghost.forward_train_ghost(&x, 4, true).unwrap();
                assert_eq!(running(&gvars), moved, "{what}: kept");
                let (one, ovars) = net(spec, kernels);
                let whole = one.forward_train_ghost(&x, 6, false).unwrap();
                let (two, tvars) = net(spec, kernels);
                assert_eq!(flat(&whole), flat(&two.forward_t(&x, true).unwrap()));
                assert_eq!(running(&ovars), running(&tvars), "{what}: one part");
                assert!(one.forward_train_ghost(&x, 0, false).is_err());
            }
        }
    }

    /// A tied convolution (`weights_of`, plain with its bias and separable) is the owner's weights
    /// applied again: the same output as an untied twin holding a copy of them, one variable instead of
    /// two, and its gradient the sum of the twin's two; on the fused and the reference kernels.
    #[test]
    fn tied_weights_train_as_one_variable_with_the_sum_of_both_gradients() {
        let x = images(6);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let spec = |tie: bool| {
            let (a, b) = match tie {
                true => (r#", "weights_of": 1"#, r#", "weights_of": 3"#),
                false => ("", ""),
            };
            ArchSpec::from_json(&format!(
                r#"{{ "batch_norm": {{ "momentum": 0.9 }}, "layers": [
                {{ "type": "conv", "filters": 6, "kernel": 3, "bias": false, "batch_norm": "after", "pool": {{ "kernel": 2 }} }},
                {{ "type": "conv", "filters": 6, "kernel": 3, "batch_norm": "after" }},
                {{ "type": "conv", "filters": 6, "kernel": 3, "batch_norm": "after"{a} }},
                {{ "type": "separable_conv", "filters": 6, "kernel": 3, "padding": "same", "batch_norm": "after" }},
                {{ "type": "separable_conv", "filters": 6, "kernel": 3, "padding": "same", "batch_norm": "after"{b} }},
                {{ "type": "global_avg_pool" }}, {{ "type": "dense", "units": 10 }} ] }}"#
            ))
            .unwrap()
        };
        // (the tied variable, its twin's copy)
        let pairs = [
            ("block2.conv.weight", "block3.conv.weight"),
            ("block2.conv.bias", "block3.conv.bias"),
            (
                "block4.conv.depthwise.weight",
                "block5.conv.depthwise.weight",
            ),
            (
                "block4.conv.pointwise.weight",
                "block5.conv.pointwise.weight",
            ),
            ("block4.conv.pointwise.bias", "block5.conv.pointwise.bias"),
        ];
        for kernels in [Kernels::Auto, Kernels::Reference] {
            let (tied, tvars) = net(&spec(true), kernels);
            let (twin, wvars) = net(&spec(false), kernels);
            let (td, wd) = (
                tvars.var_map().data().lock().unwrap(),
                wvars.var_map().data().lock().unwrap(),
            );
            assert_eq!(td.len() + pairs.len(), wd.len(), "{kernels:?}: variables");
            for (owner, copy) in pairs {
                assert!(!td.contains_key(copy), "{kernels:?}: {copy} exists");
                wd[owner].set(td[owner].as_tensor()).unwrap();
                wd[copy].set(td[owner].as_tensor()).unwrap();
            }
            for (name, v) in td.iter() {
                wd[name].set(v.as_tensor()).unwrap();
            }
            let y = tied.forward_t(&x, true).unwrap();
            let w = twin.forward_t(&x, true).unwrap();
            assert_eq!(flat(&y), flat(&w), "{kernels:?}: output");
            let gt = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let gw = w.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let close = |what: &str, a: Vec<f32>, b: Vec<f32>| {
                assert_eq!(a.len(), b.len());
                for (a, b) in a.iter().zip(&b) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1e-2),
                        "{kernels:?}: gradient of {what}: {a} vs {b}"
                    );
                }
            };
            for (name, v) in td.iter().filter(|(name, _)| is_trainable(name)) {
                let got = flat(gt.get(v.as_tensor()).expect(name));
                let mut want = flat(gw.get(wd[name].as_tensor()).expect(name));
                if let Some((_, copy)) = pairs.iter().find(|(owner, _)| owner == name) {
                    let other = flat(gw.get(wd[*copy].as_tensor()).expect(copy));
                    assert!(other.iter().any(|g| *g != 0.0), "{copy}: no gradient");
                    want.iter_mut().zip(other).for_each(|(a, b)| *a += b);
                }
                close(name, got, want);
            }
        }
    }

    /// A residual shortcut (`"shortcut": k` on the last conv layer) adds the input of `layers[k]`: as
    /// global average pooling and the dense layer are linear, the logits are those of the model without
    /// it plus those of the model cut before `layers[k]` (less the dense bias, counted once), and so are
    /// the gradients of a loss linear in the logits; one-layer and two-layer shortcuts, plain and
    /// separable convolutions, training mode, on the fused and the reference kernels.
    #[test]
    fn a_shortcut_adds_the_input_of_its_layer_with_its_gradients() {
        let x = images(7);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let convs = [
            r#"{ "type": "conv", "filters": 6, "kernel": 3, "bias": false, "batch_norm": "after", "pool": { "kernel": 2 } }"#,
            r#"{ "type": "separable_conv", "filters": 6, "kernel": 3, "padding": "same", "batch_norm": "after" }"#,
            r#"{ "type": "conv", "filters": 6, "kernel": 3, "padding": "same", "batch_norm": "after" }"#,
        ];
        let spec = |layers: &[&str], shortcut: Option<usize>| {
            let mut layers: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
            if let Some(k) = shortcut {
                let last = layers.last_mut().unwrap();
                last.insert_str(last.len() - 2, &format!(r#", "shortcut": {k}"#));
            }
            ArchSpec::from_json(&format!(
                r#"{{ "batch_norm": {{ "momentum": 0.9 }}, "layers": [ {},
                {{ "type": "global_avg_pool" }}, {{ "type": "dense", "units": 10 }} ] }}"#,
                layers.join(", ")
            ))
            .unwrap()
        };
        let r = Tensor::from_vec(
            (0..60)
                .map(|i| ((i * 7) % 11) as f32 - 5.0)
                .collect::<Vec<_>>(),
            (6, 10),
            &Device::Cpu,
        )
        .unwrap();
        for k in [1, 2] {
            for kernels in [Kernels::Auto, Kernels::Reference] {
                let what = format!("shortcut {k}, {kernels:?}");
                let (with, svars) = net(&spec(&convs, Some(k)), kernels);
                let (without, wvars) = net(&spec(&convs, None), kernels);
                let (cut, cvars) = net(&spec(&convs[..k], None), kernels);
                let sd = svars.var_map().data().lock().unwrap();
                for other in [&wvars, &cvars] {
                    for (name, v) in other.var_map().data().lock().unwrap().iter() {
                        v.set(sd[name].as_tensor()).unwrap();
                    }
                }
                let ys = with.forward_t(&x, true).unwrap();
                let yw = without.forward_t(&x, true).unwrap();
                let yc = cut.forward_t(&x, true).unwrap();
                let bias = sd["dense.bias"].as_tensor().unsqueeze(0).unwrap();
                let want = (&yw + yc.broadcast_sub(&bias).unwrap()).unwrap();
                // Within float rounding of the largest value (the sums go in other orders).
                let close = |what: &str, a: Vec<f32>, b: Vec<f32>| {
                    assert_eq!(a.len(), b.len(), "{what}");
                    let scale = b.iter().fold(1e-2f32, |m, v| m.max(v.abs()));
                    let worst = a
                        .iter()
                        .zip(&b)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(worst <= 3e-4 * scale, "{what}: {a:?} vs {b:?}");
                };
                close(&format!("{what}: logits"), flat(&ys), flat(&want));
                let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let (gs, gw, gc) = (grads(&ys), grads(&yw), grads(&yc));
                let (wd, cd) = (
                    wvars.var_map().data().lock().unwrap(),
                    cvars.var_map().data().lock().unwrap(),
                );
                for (name, v) in sd.iter().filter(|(name, _)| is_trainable(name)) {
                    let mut want = flat(gw.get(wd[name].as_tensor()).expect(name));
                    if let (Some(c), false) = (cd.get(name), name.as_str() == "dense.bias") {
                        let more = flat(gc.get(c.as_tensor()).expect(name));
                        want.iter_mut().zip(more).for_each(|(a, b)| *a += b);
                    }
                    close(
                        &format!("{what}: gradient of {name}"),
                        flat(gs.get(v.as_tensor()).expect(name)),
                        want,
                    );
                }
            }
        }
    }

    /// `"deskew": true` is the same model run on deskewed images, in training and inference alike, with
    /// the same variables; the deskewing passes no gradient to the (parameter-free) input.
    #[test]
    fn a_deskewing_model_is_the_plain_model_on_deskewed_images() {
        let plain = builtin(Solution::Conv, Variant::Improved).clone();
        let spec = ArchSpec {
            deskew: true,
            ..plain.clone()
        };
        let xs = images(3);
        let mut flat = xs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let src = flat.clone();
        for (s, d) in src.chunks_exact(784).zip(flat.chunks_exact_mut(784)) {
            mnist_data::deskew_into(s, d);
        }
        let deskewed = Tensor::from_vec(flat, xs.dims(), xs.device()).unwrap();
        assert_ne!(
            deskewed.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            xs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        for train in [false, true] {
            let ((a, _), (b, _)) = (net(&spec, Kernels::Auto), net(&plain, Kernels::Auto));
            let got = a.forward_t(&xs, train).unwrap().to_vec2::<f32>().unwrap();
            let want = b
                .forward_t(&deskewed, train)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(got, want, "train = {train}");
        }
        // The summary shows it as a row without parameters; the counts are the plain model's.
        let (a, b) = (
            crate::summary(&spec).unwrap(),
            crate::summary(&plain).unwrap(),
        );
        assert_eq!(
            (a.layers[0].kind.as_str(), a.layers[0].params),
            ("Deskew", 0)
        );
        assert_eq!(a.layers.len(), b.layers.len() + 1);
        assert_eq!(a.params_total, b.params_total);
        // It round-trips through JSON, and only as a boolean.
        assert_eq!(ArchSpec::from_json(&spec.to_json()).unwrap(), spec);
        let text = spec.to_json().replace("\"deskew\": true", "\"deskew\": 1");
        let err = ArchSpec::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("deskew") || err.contains("boolean"), "{err}");
    }

    /// A spec's `"init"` scales the same draws: every convolution and dense weight of a built-in model
    /// (plain, separable and inception) is its glorot-uniform value times the ratio of the two limits for
    /// that layer's fans, and everything else (biases, BatchNorm) is the same.
    #[test]
    fn the_weight_init_scales_the_same_draws() {
        use mnist_layers::WeightInit;
        for solution in [Solution::Conv, Solution::Separable, Solution::Inception] {
            let glorot = builtin(solution, Variant::Improved).clone();
            for init in [WeightInit::HeUniform, WeightInit::Pytorch] {
                let spec = ArchSpec {
                    init,
                    ..glorot.clone()
                };
                let (_, a) = net(&glorot, Kernels::Auto);
                let (_, b) = net(&spec, Kernels::Auto);
                let (a, b) = (
                    a.var_map().data().lock().unwrap(),
                    b.var_map().data().lock().unwrap(),
                );
                assert_eq!(a.len(), b.len());
                let mut scaled = 0;
                for (name, va) in a.iter() {
                    let ta = va
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let tb = b[name]
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let dims = va.as_tensor().dims().to_vec();
                    if !name.ends_with("weight") || dims.len() < 2 {
                        assert_eq!(ta, tb, "{solution:?} {init:?} {name}");
                        continue;
                    }
                    // [out, in] or [out, in, k, k]; a depthwise weight's fans are both k*k.
                    let k2: usize = dims[2..].iter().product();
                    let (fan_in, fan_out) = if name.contains("depthwise") {
                        (k2, k2)
                    } else {
                        (dims[1] * k2, dims[0] * k2)
                    };
                    let ratio = init.limit(fan_in, fan_out)
                        / WeightInit::GlorotUniform.limit(fan_in, fan_out);
                    for (x, y) in ta.iter().zip(&tb) {
                        let want = *x as f64 * ratio;
                        assert!(
                            (*y as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                            "{solution:?} {init:?} {name}: {y} vs {want}"
                        );
                    }
                    scaled += 1;
                }
                assert!(scaled >= 6, "{solution:?}: {scaled} weights scaled");
            }
        }
    }
}

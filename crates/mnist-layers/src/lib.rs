//! Layer blocks for tiny MNIST models on candle, and the fast CPU kernels behind them.
//!
//! Every layer follows candle-nn's shape: a `Copy + Default` config struct, a free constructor taking a
//! [`candle_nn::VarBuilder`], and `Module` (stateless layers) or `ModuleT` (BatchNorm, Dropout).
//!
//! Each layer picks its implementation once per call through [`Kernels`]: with [`Kernels::Auto`] a tensor
//! that lives on the CPU as `f32` goes through the fused custom ops of [`ops`] (im2col + `gemm`, direct
//! depthwise loops, one-pass BatchNorm, max-pool with saved argmax); anything else, or
//! [`Kernels::Reference`], goes through the `*_reference` twins built from plain candle ops.
//!
//! Weights are initialised as Keras does (glorot-uniform, zero bias) from a seeded RNG through
//! [`init::SeededVarMap`], because candle's own CPU RNG cannot be seeded.

pub mod block;
pub mod conv;
pub mod dropout;
pub mod error;
pub mod excite;
pub mod inception;
pub mod init;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod pool;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use block::{
    conv_bn_pool, infer_stack, separable_bn_pool, train_inception_stack, train_stack, ConvBnPool,
    ConvBnPoolConfig, FusedBlock, SeparableBnPool,
};
pub use conv::{
    conv2d, depthwise_conv2d, separable_conv2d, Conv2d, Conv2dConfig, DepthwiseConv2d,
    SeparableConv2d,
};
pub use dropout::{dropout, Dropout};
pub use error::LayerError;
pub use excite::{squeeze_excite, SqueezeExcite};
pub use inception::{BranchLayer, InceptionModule};
pub use init::WeightInit;
pub use linear::{linear, linear_with_init};
pub use norm::{batch_norm, BatchNorm, BatchNormConfig, RunningStats};
pub use pool::{global_avg_pool, max_pool2d, MaxPool2d, MaxPool2dConfig};

/// A seeded random generator shared by every layer that draws random numbers (dropout masks).
pub type SharedRng = std::sync::Arc<std::sync::Mutex<rand_chacha::ChaCha8Rng>>;

/// Builds a [`SharedRng`] from a seed.
pub fn shared_rng(seed: u64) -> SharedRng {
    use rand::SeedableRng;
    std::sync::Arc::new(std::sync::Mutex::new(
        rand_chacha::ChaCha8Rng::seed_from_u64(seed),
    ))
}

/// Which implementation a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The fast custom ops of [`ops`] when the input is an `f32` tensor on the CPU, candle's ops otherwise.
    #[default]
    Auto,
    /// Always candle's own ops (the `*_reference` twins).
    Reference,
}

impl Kernels {
    /// True when `xs` should go through the fast custom ops.
    pub fn use_fast(self, xs: &Tensor) -> bool {
        self == Kernels::Auto && xs.device().is_cpu() && xs.dtype() == DType::F32
    }
}

/// Spatial padding, with Keras/TensorFlow semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// No padding: `out = (in - k) / stride + 1`.
    #[default]
    Valid,
    /// TF 'same': `out = ceil(in / stride)`, total pad `max((out-1)*stride + k - in, 0)`,
    /// top/left = total / 2, bottom/right = the rest.
    Same,
}

impl Padding {
    /// Resolves the padding of one spatial dimension: `(pad_before, pad_after, out_len)`.
    pub fn resolve(
        self,
        input: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<(usize, usize, usize), LayerError> {
        if kernel == 0 || stride == 0 {
            return Err(LayerError::Config(format!(
                "kernel ({kernel}) and stride ({stride}) must be positive"
            )));
        }
        match self {
            Padding::Valid => {
                if input < kernel {
                    return Err(LayerError::Config(format!(
                        "valid padding: input size {input} is smaller than kernel {kernel}"
                    )));
                }
                Ok((0, 0, (input - kernel) / stride + 1))
            }
            Padding::Same => {
                if input == 0 {
                    return Err(LayerError::Config("same padding: empty input".into()));
                }
                let out = input.div_ceil(stride);
                let total = ((out - 1) * stride + kernel).saturating_sub(input);
                Ok((total / 2, total - total / 2, out))
            }
        }
    }

    /// Resolves both spatial dims of an `[h, w]` input: `((top, left, bottom, right), (out_h, out_w))`.
    pub fn resolve2d(
        self,
        h: usize,
        w: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<(ops::Pad4, (usize, usize)), LayerError> {
        let (t, b, oh) = self.resolve(h, kernel, stride)?;
        let (l, r, ow) = self.resolve(w, kernel, stride)?;
        Ok(((t, l, b, r), (oh, ow)))
    }
}

/// Activation after a convolution or a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `x * sigmoid(x)` (SiLU, "swish": Elfwing, Uchibe and Doya 2018; Ramachandran, Zoph and Le 2017).
    /// Applied by candle's own op after the convolution; the fused kernels know only ReLU and none.
    Silu,
}

impl Activation {
    /// True for [`Activation::Relu`].
    pub fn is_relu(self) -> bool {
        self == Activation::Relu
    }

    /// True when the fused kernels can apply it in their epilogues (none or ReLU); a layer with any
    /// other activation runs on candle's ops after the convolution.
    pub fn fuses(self) -> bool {
        matches!(self, Activation::None | Activation::Relu)
    }

    /// Keras's layer class for it as a layer of its own, for summaries: `ReLU` has its own class, every
    /// other function is an `Activation` layer (`Activation("silu")`, `Activation("linear")`).
    pub fn keras_layer(self) -> &'static str {
        match self {
            Activation::Relu => "ReLU",
            Activation::None | Activation::Silu => "Activation",
        }
    }

    /// Its name in the spec files (`none`, `relu`, `silu`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
    }
}

impl candle_core::Module for Activation {
    /// The activation on every value (with a gradient: candle's `relu` and `silu` ops).
    fn forward(&self, xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::None => Ok(xs.clone()),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
        }
    }
}

/// Tunes glibc's malloc for training loops that free and re-allocate the same multi-megabyte tensors
/// every step: no `mmap` below 32 MiB, no trimming of the heap top, one arena. Without it every step
/// page-faults its fresh activations in again (about 3 ms of a ~13 ms single-thread model-1 step in
/// `benches/layers.rs`). Call it once at program start (binaries, benches). Returns false where it does
/// nothing (not Linux/glibc) or glibc rejected a setting.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        let settings = [
            (M_MMAP_THRESHOLD, 32 << 20),
            (M_TRIM_THRESHOLD, 1 << 30),
            (M_TOP_PAD, 64 << 20),
            (M_ARENA_MAX, 1),
        ];
        // SAFETY: mallopt is glibc's documented tuning call; it takes plain integers and is safe to call
        // at any time (glibc serialises it with its own arena locks).
        let ok = settings.iter().all(|&(p, v)| unsafe { mallopt(p, v) } == 1);
        tracing::debug!(ok, "tuned glibc malloc for steady-state tensor reuse");
        ok
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Runs `f` on a worker thread of rayon's global pool and returns its result; the calling thread waits.
///
/// Every parallel loop of the kernels started from a worker thread runs part of its work on that
/// thread and hands the rest to the other workers through their queues. Started from any other thread
/// (such as `main`), each loop is injected into the pool, the calling thread sleeps until it is done,
/// and is woken again: a futex sleep and wake-up, two context switches, for each of the few dozen
/// parallel loops of a training step.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// While it lives, rayon's other workers keep looking for work instead of going to sleep between the
/// parallel loops: see [`keep_workers_awake`].
#[must_use = "the workers stay awake only while the guard lives"]
pub struct Awake {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Awake {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Keeps the pool's other workers awake until the guard drops: each runs a job that takes any work
/// the pool has (`rayon::yield_now`) and otherwise yields its core, instead of falling asleep after a
/// few idle rounds as rayon's workers do. A training step's parallel loops are short (tens of
/// microseconds to a millisecond) and separated by serial work, so an asleep worker is woken for each
/// (a futex wake and a context switch), and the loop's first chunks wait for it. Call it on a worker
/// thread ([`on_pool`]); elsewhere it does nothing.
pub fn keep_workers_awake() -> Awake {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    if let Some(me) = rayon::current_thread_index() {
        let flag = stop.clone();
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() == me {
                return; // the caller's own copy: it has its work
            }
            while !flag.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::yield_now();
                }
            }
        });
    }
    Awake { stop }
}

/// Prepares the process for CPU training with the fast kernels; call it first thing in `main`, before
/// any other thread exists.
///
/// - [`tune_allocator`].
/// - Unless `CANDLE_NUM_THREADS` is set, sets it to 1: candle's own element-wise ops (the few left on the
///   training path, such as backprop's gradient sums) then run inline instead of on candle's spinning
///   barrier-pool threads, which otherwise compete with the rayon threads of our kernels for the cores
///   (measured on 2 cores: an epoch of model 1 took 40% longer with the barrier pool). The fast kernels
///   parallelise over the batch with rayon (`RAYON_NUM_THREADS`).
pub fn init_runtime() {
    tune_allocator();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called at the start of main, before other threads exist (documented contract above).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pool_runs_on_a_worker_thread() {
        assert_eq!(rayon::current_thread_index(), None);
        assert!(on_pool(rayon::current_thread_index).is_some());
    }

    /// Awake workers still take the parallel work (a parallel sum on a pool of 3 gives its value), and
    /// once the guard drops they leave their loop: a job that needs every worker of the pool finishes.
    #[test]
    fn awake_workers_take_work_and_stop_with_the_guard() {
        use rayon::prelude::*;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let sum = pool.install(|| {
                let _awake = keep_workers_awake();
                (0..100_000u64).into_par_iter().map(|v| v * 2).sum::<u64>()
            });
            let everyone = pool.broadcast(|ctx| ctx.index());
            tx.send((sum, everyone)).unwrap();
        });
        let (sum, mut everyone) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the workers never went back to the pool");
        assert_eq!(sum, 99_999 * 100_000);
        everyone.sort();
        assert_eq!(everyone, [0, 1, 2]);
        // Off the pool it does nothing.
        drop(keep_workers_awake());
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        // 28, k7, s1 -> total 6, 3/3
        assert_eq!(Padding::Same.resolve(28, 7, 1).unwrap(), (3, 3, 28));
        // 28, k2, s1 -> total 1, 0/1 (TF puts the extra pad at the bottom/right)
        assert_eq!(Padding::Same.resolve(28, 2, 1).unwrap(), (0, 1, 28));
        // 28, k3, s2 -> out 14, total (13*2+3-28)=1 -> 0/1
        assert_eq!(Padding::Same.resolve(28, 3, 2).unwrap(), (0, 1, 14));
        // 5, k3, s2 -> out 3, total 2*2+3-5=2 -> 1/1
        assert_eq!(Padding::Same.resolve(5, 3, 2).unwrap(), (1, 1, 3));
        // stride larger than kernel never gives negative pad
        assert_eq!(Padding::Same.resolve(7, 1, 3).unwrap(), (0, 0, 3));
    }

    #[test]
    fn valid_padding() {
        assert_eq!(Padding::Valid.resolve(28, 3, 2).unwrap(), (0, 0, 13));
        assert_eq!(Padding::Valid.resolve(14, 5, 1).unwrap(), (0, 0, 10));
        assert!(Padding::Valid.resolve(2, 3, 1).is_err());
        assert!(Padding::Valid.resolve(5, 3, 0).is_err());
    }

    /// `Activation::name` is the spelling the spec files use (serde's), both ways.
    #[test]
    fn activation_names_are_the_serde_names() {
        for a in [Activation::None, Activation::Relu, Activation::Silu] {
            // A new variant breaks this match: add it to the list above too.
            match a {
                Activation::None | Activation::Relu | Activation::Silu => {}
            }
            let json = format!("\"{}\"", a.name());
            assert_eq!(serde_json::to_string(&a).unwrap(), json);
            assert_eq!(serde_json::from_str::<Activation>(&json).unwrap(), a);
        }
    }

    #[test]
    fn kernels_serde_lowercase() {
        assert_eq!(serde_json::to_string(&Kernels::Auto).unwrap(), "\"auto\"");
        let k: Kernels = serde_json::from_str("\"reference\"").unwrap();
        assert_eq!(k, Kernels::Reference);
    }
}

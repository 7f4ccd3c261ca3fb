//! Fast CPU kernels as candle custom ops, each beside a `*_reference` twin built from plain candle ops.
//!
//! The fast ops take `f32` tensors on the CPU (other dtypes fail with `UnsupportedDTypeForOp`), make their
//! inputs contiguous, spread work over images / channels with rayon's global pool (so
//! `RAYON_NUM_THREADS` applies) and have a real backward pass. Reductions over the batch (weight and
//! BatchNorm gradients) are done in a fixed order (fixed-size chunks of images summed in chunk order, or
//! per channel), so results do not depend on the number of threads.
//!
//! The reference twins work on any device and dtype and get their gradient from candle's autograd.
//!
//! Inference-only kernels (`conv_bn_pool_infer`, the direct convolution of `direct.rs`, the inception
//! module's image-by-image plan) return tensors WITHOUT gradient and are used only for `train == false`;
//! they work image by image, so their results do not depend on the number of threads either.

mod block;
/// For one spatial axis of a window op (input length `w`, leading pad `pl`, stride `s`, `ow` outputs):
/// the range `lo..hi` of outputs whose tap `kx` reads an input inside `[0, w)` (at `ox*s + kx - pl`).
#[inline]
pub(crate) fn tap_cols(w: usize, pl: usize, s: usize, ow: usize, kx: usize) -> (usize, usize) {
    let lo = if pl > kx { (pl - kx).div_ceil(s) } else { 0 };
    let hi = if w + pl <= kx {
        0
    } else {
        ((w - 1 + pl - kx) / s + 1).min(ow)
    };
    (lo.min(hi), hi)
}

/// The input row read by output row `oy` through kernel row `ky` (stride `s`, leading pad `pt`, `h`
/// input rows), if inside the image.
#[inline]
pub(crate) fn tap_row(h: usize, pt: usize, s: usize, oy: usize, ky: usize) -> Option<usize> {
    let iy = oy * s + ky;
    if iy < pt || iy - pt >= h {
        None
    } else {
        Some(iy - pt)
    }
}

mod bn;
mod conv;
mod depthwise;
mod depthwise_k512;
mod direct;
mod direct_grad;
mod inception;
mod inception_train;
mod lane;
mod pool;
mod separable;
mod stream_k512;
mod winograd;

pub(crate) use direct::{DirectConv, Epilogue};
pub(crate) use pool::PoolGeom;

pub use block::{
    block_stack_infer, block_stack_train, block_stack_train_reference, conv_bn_pool_eval,
    conv_bn_pool_eval_reference, conv_bn_pool_infer, conv_bn_pool_train,
    conv_bn_pool_train_reference, inception_stack_train, separable_bn_pool_eval_reference,
    separable_bn_pool_infer, separable_bn_pool_train, separable_bn_pool_train_reference, BlockSpec,
    InferStackBlock, PoolSpec, StackBlock, StackTrained,
};
pub use bn::{
    batch_norm_eval, batch_norm_eval_reference, batch_norm_train, batch_norm_train_reference,
};
pub use conv::{conv2d_fused, conv2d_fused_reference};
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_reference};
pub use inception::{fold_separable, InceptionPlan, InferStep};
pub use inception_train::{
    inception_train, inception_train_reference, BranchPool, InceptionBranch, ModuleBn,
};
pub use pool::{max_pool2d, max_pool2d_reference};

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// Explicit spatial padding `(top, left, bottom, right)`.
pub type Pad4 = (usize, usize, usize, usize);

/// Batch images per chunk in the deterministic weight-gradient reduction.
pub(crate) const GRAD_CHUNK: usize = 4;

/// The contiguous `f32` slice of a custom op's input.
pub(crate) fn fwd_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt()),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The contiguous `f32` slice of a tensor's storage (`t` must be contiguous; see [`contig`]).
pub(crate) fn storage_slice<'a>(s: &'a Storage, l: &Layout, op: &'static str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => fwd_slice(c, l, op),
        _ => candle_core::bail!("{op}: the fast op only runs on the CPU"),
    }
}

/// Borrow the `f32` data of a tensor: `let g = t.contiguous()?; let (s, l) = g.storage_and_layout();
/// let data = storage_slice(&s, l, op)?;` wrapped as a macro to keep the guard alive in the caller.
macro_rules! cpu_data {
    ($t:expr, $guard:ident, $data:ident, $op:expr) => {
        let $guard = $t.contiguous()?;
        let (__s, __l) = $guard.storage_and_layout();
        let $data: &[f32] = $crate::ops::storage_slice(&__s, __l, $op)?;
    };
}
pub(crate) use cpu_data;

/// Defines a function whose body is compiled twice, for baseline x86-64 and with AVX2 + FMA enabled,
/// the second chosen at run time when the CPU has them (other architectures: the baseline only). The
/// body is the same code, so both give bit-identical results (Rust never contracts `a * b + c` into
/// an FMA on its own).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $crate::ops::multiversion! {
            $(#[$m])* $vis fn $name($($arg: $ty),*) -> () $body
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// [`multiversion!`] of an `unsafe fn` (the caller upholds its `# Safety` contract).
macro_rules! multiversion_unsafe {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis unsafe fn $name($($arg: $ty),*) {
            #[inline(always)]
            unsafe fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    // SAFETY: forwarded contract.
                    unsafe { imp($($arg),*) }
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above); forwarded contract.
                    return unsafe { avx2($($arg),*) };
                }
            }
            // SAFETY: forwarded contract.
            unsafe { imp($($arg),*) }
        }
    };
}
pub(crate) use multiversion_unsafe;

/// True where the AVX-512 kernels can run: AVX-512F with AVX2 and FMA, the features they are compiled for.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// The free scratch buffers of this thread (a stack: a call takes its buffers from the top and puts
    /// them back in the same order, so each call site keeps getting buffers of the sizes it needs).
    static SCRATCH: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `N` thread-local scratch buffers of exactly the given lengths (contents unspecified:
/// earlier values, never uninitialised memory).
///
/// The buffers are kept per thread and only grow, so a training loop allocates them once. Calls nest:
/// a call inside `f` (a kernel's own scratch, or rayon work-stealing) takes further buffers from the
/// same pool, which then stay in it too, instead of allocating zeroed ones on every call.
pub(crate) fn with_scratch<const N: usize, R>(
    lens: [usize; N],
    f: impl FnOnce([&mut [f32]; N]) -> R,
) -> R {
    let mut bufs: [Vec<f32>; N] =
        SCRATCH.with(|cell| std::array::from_fn(|_| cell.borrow_mut().pop().unwrap_or_default()));
    for (b, &n) in bufs.iter_mut().zip(&lens) {
        if b.len() < n {
            b.resize(n, 0.0);
        }
    }
    let r = {
        let mut it = bufs.iter_mut().zip(lens);
        f(std::array::from_fn(|_| match it.next() {
            Some((b, n)) => &mut b[..n],
            None => &mut [],
        }))
    };
    // Back in reverse, so the next call's first buffer is this call's first.
    SCRATCH.with(|cell| cell.borrow_mut().extend(bufs.into_iter().rev()));
    r
}

thread_local! {
    static IMAGE_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` floats of the per-thread buffer `key` (contents unspecified: earlier values,
/// never uninitialised memory). The buffer only grows; if `key` is already borrowed on this thread
/// (rayon work-stealing inside `f`), `f` gets a fresh buffer instead of a panic.
pub(crate) fn with_thread_buf<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// `[b, per]` from `f(i, buf)` for every image `i < b` (in parallel over images; inline for one image):
/// `f` fills a per-thread buffer of `per` floats, which is then copied into the result. The large result
/// is never zero-filled first (one pass over memory instead of two). The first error of `f` is returned.
///
/// The buffer holds earlier values, never uninitialised memory: an `f` that leaves some of it unwritten
/// gives wrong values, not undefined behaviour. `f` may use [`with_scratch`] (this uses its own buffer).
pub(crate) fn collect_images(
    b: usize,
    per: usize,
    f: impl Fn(usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    if b == 0 || per == 0 {
        return Ok(Vec::new());
    }
    let mut out: Vec<f32> = Vec::with_capacity(b * per);
    let work = |(i, dst): (usize, &mut [MaybeUninit<f32>])| {
        let mut fill = |buf: &mut [f32]| -> Result<()> {
            f(i, buf)?;
            for (d, &v) in dst.iter_mut().zip(buf.iter()) {
                d.write(v);
            }
            Ok(())
        };
        with_thread_buf(&IMAGE_BUF, per, &mut fill)
    };
    let spare = &mut out.spare_capacity_mut()[..b * per];
    if b == 1 {
        work((0, spare))?;
    } else {
        spare.par_chunks_mut(per).enumerate().try_for_each(work)?;
    }
    // SAFETY: the capacity is `b * per` and every element of `spare[..b * per]` was written above (no
    // error was returned): each chunk of `per` elements by the zip with its fully sized buffer.
    unsafe { out.set_len(b * per) };
    Ok(out)
}

/// [`collect_images`] without the per-thread buffer and its copy: `f(i, dst)` writes image `i`'s `per`
/// values straight into the result (in parallel over images). The first error of `f` is returned.
///
/// # Safety
/// When it returns `Ok`, `f` has written every one of the `per` values of the `dst` it was given.
pub(crate) unsafe fn collect_images_in_place(
    b: usize,
    per: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) -> Result<()> + Sync,
) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    if b == 0 || per == 0 {
        return Ok(Vec::new());
    }
    let mut out = Uninit::new(b * per);
    out.par_chunks_mut(per)
        .enumerate()
        .try_for_each(|(i, dst)| f(i, dst))?;
    // SAFETY: the `b` chunks of `per` values cover all `b * per`, and `f` wrote each of its chunk (the
    // caller's contract; no error was returned).
    Ok(unsafe { out.assume_init() })
}

/// What a custom op keeps from its forward pass for its backward pass (and for the caller that built
/// it, e.g. the batch statistics of a fused block): one value behind a shared lock, set by `cpu_fwd`
/// and read by `bwd`. Clones share the value.
pub(crate) struct OpState<T> {
    op: &'static str,
    value: std::sync::Arc<std::sync::Mutex<T>>,
}

impl<T> Clone for OpState<T> {
    fn clone(&self) -> Self {
        Self {
            op: self.op,
            value: std::sync::Arc::clone(&self.value),
        }
    }
}

impl<T: Default> OpState<T> {
    /// An empty state of the op named `op` (named in errors).
    pub(crate) fn new(op: &'static str) -> Self {
        Self {
            op,
            value: Default::default(),
        }
    }

    /// Replaces the state (the forward pass's result).
    pub(crate) fn set(&self, value: T) -> Result<()> {
        *self.lock()? = value;
        Ok(())
    }

    /// The state, locked.
    pub(crate) fn lock(&self) -> Result<std::sync::MutexGuard<'_, T>> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::msg(format!("{}: saved state lock poisoned", self.op)))
    }
}

/// `n` zeros, written by all threads in parallel: a batch-sized output is not zeroed by one thread while
/// the others wait (the training step's large buffers are made on the thread that drives it).
pub(crate) fn par_zeros<T: Copy + Default + Send + Sync>(n: usize) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    if n <= CHUNK {
        return vec![T::default(); n];
    }
    let mut v: Vec<T> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|c| {
            c.iter_mut().for_each(|x| {
                x.write(T::default());
            })
        });
    // SAFETY: the capacity is `n` and all `n` elements were written just above.
    unsafe { v.set_len(n) };
    v
}

/// A batch-sized output of `n` values that its kernel writes in full, built without zero-filling it
/// first (which costs a pass over memory as large as the kernel's own): the kernel gets the values as
/// `MaybeUninit` chunks ([`Self::par_chunks_mut`]) and writes each one with `MaybeUninit::write`; only
/// then does [`Self::assume_init`] hand out the vector. On an error the buffer is dropped unread.
pub(crate) struct Uninit<T> {
    v: Vec<T>,
    n: usize,
}

impl<T: Send> Uninit<T> {
    /// Room for `n` values, none written yet.
    pub(crate) fn new(n: usize) -> Self {
        Self {
            v: Vec::with_capacity(n),
            n,
        }
    }

    /// The `n` values in chunks of `chunk` (the last may be shorter), for rayon.
    pub(crate) fn par_chunks_mut(
        &mut self,
        chunk: usize,
    ) -> rayon::slice::ChunksMut<'_, std::mem::MaybeUninit<T>> {
        use rayon::prelude::*;
        self.v.spare_capacity_mut()[..self.n].par_chunks_mut(chunk)
    }

    /// The `n` values, for writers that split them other than into chunks.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [std::mem::MaybeUninit<T>] {
        &mut self.v.spare_capacity_mut()[..self.n]
    }

    /// The vector of the `n` values.
    ///
    /// # Safety
    /// Every one of the `n` values was written through [`Self::par_chunks_mut`].
    pub(crate) unsafe fn assume_init(mut self) -> Vec<T> {
        // SAFETY: the capacity is `n` (from `new`) and the caller guarantees all `n` were written.
        unsafe { self.v.set_len(self.n) };
        self.v
    }
}

/// The planes of a buffer (`plane` values each) for tasks running in parallel that each write planes no
/// other task writes, in an order rayon's chunked iterators cannot express (e.g. every `c`-th plane).
pub(crate) struct DisjointPlanes<'a, T> {
    ptr: *mut T,
    len: usize,
    plane: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: handing out planes to several threads is sound under `plane`'s contract (no plane twice at
// once); the values themselves are `Send`.
unsafe impl<T: Send> Sync for DisjointPlanes<'_, T> {}

impl<'a, T> DisjointPlanes<'a, T> {
    pub(crate) fn new(buf: &'a mut [T], plane: usize) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            plane,
            _buf: std::marker::PhantomData,
        }
    }

    /// Plane `p` (panics past the end of the buffer).
    ///
    /// # Safety
    /// No other reference to plane `p` obtained from `self` is alive: each plane is handed to one task.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn plane(&self, p: usize) -> &mut [T] {
        let end = (p + 1)
            .checked_mul(self.plane)
            .expect("plane index overflows");
        assert!(
            end <= self.len,
            "plane {p} past the end of {} values",
            self.len
        );
        // SAFETY: in bounds (checked above) of the buffer borrowed mutably for `'a`; exclusive by the
        // caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(p * self.plane), self.plane) }
    }
}

/// `s` as values a kernel may write without reading (`MaybeUninit<f32>` has the layout of `f32`): the
/// `f32` entry points of the `*_uninit` kernels hand their output over through this.
///
/// # Safety
/// Only initialised values may be written through the result, so that `s` stays initialised.
pub(crate) unsafe fn uninit_view(s: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: same layout; the caller writes only initialised values.
    unsafe { &mut *(s as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// Called by a convolution's backward pass with each image's input gradient once it is written
/// (`(image, dx [c, h, w])`), from the thread that wrote it.
pub(crate) type AfterDx<'a> = dyn Fn(usize, &[f32]) + Sync + 'a;

/// Spare batch-sized buffers for state that lives inside an op between its forward and backward pass
/// (recycled so a training loop neither zero-fills nor page-faults them in every step).
static SPARE: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// How many [`SPARE`] buffers are kept (a stack of blocks keeps one output per block, and its backward
/// pass one input gradient at a time).
const SPARE_BUFFERS: usize = 16;

/// A buffer of `len` floats with unspecified contents (a recycled one when available).
pub(crate) fn take_buf(len: usize) -> Vec<f32> {
    let mut v = SPARE
        .lock()
        .ok()
        .and_then(|mut spare| {
            // Only one of exactly this length: a training step asks for the same lengths every step,
            // and a longer one cut short would need filling the next time it is taken for its length.
            let i = spare.iter().rposition(|b| b.len() == len)?;
            Some(spare.remove(i))
        })
        .unwrap_or_default();
    v.resize(len, 0.0);
    // The unit tests poison the buffer, so a kernel that counts on zeros or leaves a value unwritten
    // shows up there as NaN.
    #[cfg(test)]
    v.fill(f32::NAN);
    v
}

/// Returns a buffer from [`take_buf`] for reuse (at most a few are kept).
pub(crate) fn give_buf(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    if let Ok(mut spare) = SPARE.lock() {
        // The most recent ones are kept: the lengths of the step that is running.
        if spare.len() >= SPARE_BUFFERS {
            spare.remove(0);
        }
        spare.push(v);
    }
}

/// `dst = src` over the shorter of the two, for the short rows of planes (10-40 floats): fixed 8-float
/// blocks, then the tail, never a `memcpy` call (whose call cost is that of the copy at these sizes;
/// see [`write_row`]).
#[inline(always)]
pub(crate) fn copy_row(dst: &mut [f32], src: &[f32]) {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and `write_row` only writes initialised values
    // through it, so `dst` stays initialised.
    let dst = unsafe { &mut *(dst as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
    write_row(dst, src);
}

/// [`copy_row`] into values that may not have been written yet (an [`Uninit`] output): every one of the
/// first `min(dst.len(), src.len())` is written.
///
/// Each value's bits pass through an OR with a zero the compiler cannot see (`black_box`): the same
/// bits, but no longer a plain load and store, which LLVM's loop-idiom pass would turn back into a
/// `memcpy` call (it did, in the depthwise kernels' row stores).
#[inline(always)]
pub(crate) fn write_row(dst: &mut [std::mem::MaybeUninit<f32>], src: &[f32]) {
    let n = dst.len().min(src.len());
    let (dst, src) = (&mut dst[..n], &src[..n]);
    let z = std::hint::black_box(0u32);
    let same = |y: f32| f32::from_bits(y.to_bits() | z);
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, b) in (&mut d).zip(&mut s) {
        for (x, &y) in a.iter_mut().zip(b) {
            x.write(same(y));
        }
    }
    for (a, &b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        a.write(same(b));
    }
}

/// `dst.fill(0.0)` for short runs (a border of a few floats, a row), without a `memset` call (the zero
/// comes through `black_box`, so the compiler cannot turn the loop back into one).
#[inline(always)]
pub(crate) fn zero_row(dst: &mut [f32]) {
    let z = std::hint::black_box(0.0f32);
    for a in dst {
        *a = z;
    }
}

multiversion! {
    /// Sum of a slice with 16 independent f32 lanes (vectorises), the lanes added in f64.
    pub(crate) fn sum_f32(xs: &[f32]) -> f64 {
        let mut acc = [0f32; 16];
        let chunks = xs.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..16 {
                acc[i] += c[i];
            }
        }
        finish_sum(&acc, rest)
    }
}

/// The end of [`sum_f32`] (and of the one-pass sums that must give its bits): the 16 lane sums added in
/// f64, then the values past the last whole vector one by one.
#[inline(always)]
pub(crate) fn finish_sum(lanes: &[f32; 16], rest: &[f32]) -> f64 {
    let mut s: f64 = lanes.iter().map(|&v| v as f64).sum();
    for &v in rest {
        s += v as f64;
    }
    s
}

/// Requires an `f32` CPU tensor of rank 4 and returns its dims.
pub(crate) fn dims4(t: &Tensor, op: &'static str) -> Result<(usize, usize, usize, usize)> {
    if t.rank() != 4 {
        return Err(crate::error::shape_err(op, "[b, c, h, w]", t.dims()));
    }
    if !t.device().is_cpu() {
        candle_core::bail!(
            "{op}: the fast op only runs on the CPU, got {:?}",
            t.device()
        )
    }
    if t.dtype() != candle_core::DType::F32 {
        return Err(candle_core::Error::UnsupportedDTypeForOp(t.dtype(), op).bt());
    }
    t.dims4()
}

/// Output length of a padded window sweep, or an error if the window does not fit.
pub(crate) fn out_len(
    input: usize,
    before: usize,
    after: usize,
    k: usize,
    stride: usize,
    op: &'static str,
) -> Result<usize> {
    let padded = input + before + after;
    if k == 0 || stride == 0 || padded < k {
        candle_core::bail!(
            "{op}: window {k} with stride {stride} does not fit input {input} padded by ({before}, {after})"
        )
    }
    Ok((padded - k) / stride + 1)
}

/// Zero-pads `x [b, c, h, w]` by `pad` and crops the rows / columns that no window reaches, so that
/// `(padded - k) % stride == 0`: candle 0.11's conv backward (a transposed conv) returns a gradient of
/// the wrong size otherwise.
pub(crate) fn pad_for_window(x: &Tensor, k: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    let (pt, pl, pb, pr) = pad;
    let (_, _, h, w) = x.dims4()?;
    let oh = out_len(h, pt, pb, k, stride, "reference conv")?;
    let ow = out_len(w, pl, pr, k, stride, "reference conv")?;
    let xp = x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?;
    xp.narrow(2, 0, (oh - 1) * stride + k)?
        .narrow(3, 0, (ow - 1) * stride + k)
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// A deterministic random tensor in [-1, 1).
    pub fn rand_t(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |a - b| and max |b| over two tensors of the same shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let m = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
        (d, m)
    }

    /// Asserts max |a - b| <= tol * max(1, max |b|).
    pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let (d, m) = max_diff(a, b);
        assert!(
            d <= tol * m.max(1.0),
            "{what}: max|diff| = {d:e} (max|ref| = {m:e}, tol {tol:e})"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{copy_row, with_scratch};

    /// A call inside `with_scratch` gets buffers of its own (the outer ones keep their values), and the
    /// same nesting again gets the very same buffers: nothing is allocated after the first time.
    #[test]
    fn nested_scratch_calls_get_their_own_buffers_and_keep_them() {
        let nest = || {
            with_scratch([10, 20], |[a, b]| {
                a.fill(1.0);
                b.fill(2.0);
                let inner = with_scratch([30], |[c]| {
                    c.fill(3.0);
                    (c.len(), c.as_ptr() as usize)
                });
                assert!(a.iter().all(|&v| v == 1.0) && b.iter().all(|&v| v == 2.0));
                assert_eq!((a.len(), b.len(), inner.0), (10, 20, 30));
                [a.as_ptr() as usize, b.as_ptr() as usize, inner.1]
            })
        };
        let first = nest();
        assert!(first[0] != first[1] && first[1] != first[2] && first[0] != first[2]);
        assert_eq!(nest(), first, "the second time, the same buffers");
    }

    /// `copy_row` copies every bit (negative zero, NaN payloads, infinities) over the shorter length.
    #[test]
    fn copy_row_copies_the_bits() {
        let src: Vec<f32> = [-0.0, f32::from_bits(0x7fc0_1234), f32::INFINITY, -1.5]
            .into_iter()
            .cycle()
            .take(27)
            .collect();
        for n in [0, 1, 7, 8, 9, 16, 26, 27] {
            let mut dst = vec![9.0f32; n + 3];
            copy_row(&mut dst[..n], &src);
            assert!(
                dst[..n]
                    .iter()
                    .zip(&src)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{n}"
            );
            assert!(dst[n..].iter().all(|&v| v == 9.0), "{n}: past the row");
        }
    }
}

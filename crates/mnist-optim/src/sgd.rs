//! SGD with (Nesterov) momentum exactly as PyTorch's `torch.optim.SGD` (dampening 0), with a fast
//! in-place CPU path.
//!
//! At each step, for each variable `w` with gradient `g`:
//! ```text
//! g = g + wd w                     // coupled L2 weight decay (PyTorch `weight_decay=`), when wd > 0
//! b = mu b + g                     // the momentum buffer, zero before the first step (so b1 = g1)
//! u = g + mu b   if nesterov       // Nesterov's look-ahead
//!     b          otherwise
//! w = w - lr u
//! ```
//! Unlike Keras's SGD (`v = mu v - lr g`), the learning rate multiplies the whole step, so a scheduled
//! learning rate rescales the momentum too, as in PyTorch and the public tiny-MNIST recipes built on it.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adam::check_lr;
use crate::error::{OptimError, Result};
use crate::slots::{centralized, is_false, is_fast, take_in_order, tensor_like, unique_names};

/// Hyper-parameters of [`Sgd`]; the defaults are those of the public tiny-MNIST leaders
/// (momentum 0.9, Nesterov on, no weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SgdConfig {
    /// Learning rate (`> 0`, finite). Default `0.1`.
    pub lr: f64,
    /// Momentum `mu`, in `[0, 1)`. Default `0.9`.
    pub momentum: f64,
    /// Nesterov momentum (default `true`); `false` = classical (heavy-ball) momentum.
    pub nesterov: bool,
    /// Coupled L2 weight decay (`g += wd * w` before the momentum), `>= 0`. Default `0.0` (off).
    pub weight_decay: f64,
    /// Gradient centralization of every weight of rank 2 and up before the step (default off; a config
    /// without the field reads as off, and off is not written).
    #[serde(skip_serializing_if = "is_false")]
    pub grad_centralization: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
            grad_centralization: false,
        }
    }
}

impl SgdConfig {
    /// Checks every hyper-parameter, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        check_lr("sgd.lr", self.lr)?;
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(OptimError::InvalidConfig {
                what: "sgd.momentum",
                value: self.momentum,
                reason: "must lie in [0, 1)",
            });
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(OptimError::InvalidConfig {
                what: "sgd.weight_decay",
                value: self.weight_decay,
                reason: "must be finite and >= 0",
            });
        }
        Ok(())
    }
}

/// A serialisable snapshot of an [`Sgd`] optimiser, for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SgdState {
    /// Number of steps taken so far.
    pub step: u64,
    /// Learning rate in use.
    pub lr: f64,
    /// Momentum buffer per variable name, flattened in row-major order.
    pub momentum: BTreeMap<String, Vec<f32>>,
}

/// Where the momentum buffer of a variable lives.
enum Buffer {
    /// CPU, f32, contiguous variable: a plain vector updated in one pass with the variable.
    Host(Vec<f32>),
    /// Any other variable: a tensor of the variable's dtype and device.
    Tensor(Tensor),
}

struct Slot {
    name: String,
    var: Var,
    buffer: Buffer,
}

/// SGD with momentum (PyTorch form), see the [module docs](self) for the formula.
pub struct Sgd {
    slots: Vec<Slot>,
    cfg: SgdConfig,
    step: u64,
}

impl std::fmt::Debug for Sgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("Sgd")
            .field("cfg", &self.cfg)
            .field("step", &self.step)
            .field("vars", &names)
            .finish()
    }
}

impl Sgd {
    /// Builds the optimiser over named variables (names must be unique; they key checkpoints).
    pub fn new(vars: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Self> {
        Self::build(vars, cfg, true)
    }

    /// The slow twin of [`Sgd::new`]: the same update written with plain tensor ops for every
    /// variable. Used to test the fast CPU path.
    pub fn new_reference(vars: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Self> {
        Self::build(vars, cfg, false)
    }

    fn build(vars: Vec<(String, Var)>, cfg: SgdConfig, allow_fast: bool) -> Result<Self> {
        cfg.validate()?;
        let vars = unique_names(vars)?;
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let buffer = if allow_fast && is_fast(&var) {
                Buffer::Host(vec![0.0; var.elem_count()])
            } else {
                Buffer::Tensor(var.zeros_like()?)
            };
            slots.push(Slot { name, var, buffer });
        }
        Ok(Self {
            slots,
            cfg,
            step: 0,
        })
    }

    /// The configuration (its `lr` is the current learning rate).
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate used by the next steps (e.g. from a [`crate::Scheduler`]).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Sets the momentum for the next steps (a schedule's cyclical momentum).
    pub fn set_momentum(&mut self, momentum: f64) {
        self.cfg.momentum = momentum;
    }

    /// Number of steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Computes the gradients of `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// Takes one step. Variables without a gradient in `grads` are left untouched (their buffers too,
    /// as PyTorch skips parameters whose `grad` is `None`).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for slot in &self.slots {
            if let Some(g) = grads.get(slot.var.as_tensor()) {
                if g.dims() != slot.var.dims() {
                    return Err(OptimError::GradShape {
                        name: slot.name.clone(),
                        grad: g.dims().to_vec(),
                        var: slot.var.dims().to_vec(),
                    });
                }
            }
        }
        self.step += 1;
        let SgdConfig {
            lr,
            momentum,
            nesterov,
            weight_decay,
            grad_centralization,
        } = self.cfg;
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let grad = &centralized(grad, grad_centralization)?;
            match &mut slot.buffer {
                Buffer::Host(b) => {
                    let grad = grad.to_dtype(DType::F32)?.contiguous()?;
                    let op = SgdCpuUpdate {
                        buffer: RefCell::new(b.as_mut_slice()),
                        lr: lr as f32,
                        momentum: momentum as f32,
                        nesterov,
                        weight_decay: weight_decay as f32,
                    };
                    slot.var.inplace_op2(&grad, &op)?;
                }
                Buffer::Tensor(b) => {
                    let w = slot.var.as_tensor();
                    let mut g = grad.to_dtype(slot.var.dtype())?;
                    if weight_decay > 0.0 {
                        g = (g + w.affine(weight_decay, 0.0)?)?;
                    }
                    let new_b = (b.affine(momentum, 0.0)? + &g)?;
                    let update = if nesterov {
                        (g + new_b.affine(momentum, 0.0)?)?
                    } else {
                        new_b.clone()
                    };
                    slot.var.set(&(w - update.affine(lr, 0.0)?)?)?;
                    *b = new_b;
                }
            }
        }
        Ok(())
    }

    /// A snapshot of the optimiser for a checkpoint (buffers copied to the host as f32).
    pub fn state(&self) -> Result<SgdState> {
        let mut momentum = BTreeMap::new();
        for slot in &self.slots {
            let b = match &slot.buffer {
                Buffer::Host(b) => b.clone(),
                Buffer::Tensor(b) => b.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            };
            momentum.insert(slot.name.clone(), b);
        }
        Ok(SgdState {
            step: self.step,
            lr: self.cfg.lr,
            momentum,
        })
    }

    /// Restores a snapshot taken by [`Sgd::state`]. The names and sizes must match the variables of
    /// this optimiser exactly; on error nothing is changed.
    pub fn load_state(&mut self, state: SgdState) -> Result<()> {
        check_lr("sgd state lr", state.lr)?;
        let saved = take_in_order(
            self.slots.iter().map(|s| (s.name.as_str(), &s.var)),
            state.momentum,
            |b| vec![b.len()],
            "momentum buffer",
            "optimiser",
        )?;
        let mut new = Vec::with_capacity(self.slots.len());
        for (slot, b) in self.slots.iter().zip(saved) {
            new.push(match &slot.buffer {
                Buffer::Host(_) => Buffer::Host(b),
                Buffer::Tensor(_) => Buffer::Tensor(tensor_like(b, &slot.var)?),
            });
        }
        for (slot, buffer) in self.slots.iter_mut().zip(new) {
            slot.buffer = buffer;
        }
        self.step = state.step;
        self.cfg.lr = state.lr;
        Ok(())
    }
}

/// The fused in-place update of one contiguous f32 CPU variable: reads the gradient, updates the
/// momentum buffer and writes the variable in a single pass.
struct SgdCpuUpdate<'a> {
    buffer: RefCell<&'a mut [f32]>,
    lr: f32,
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
}

impl InplaceOp2 for SgdCpuUpdate<'_> {
    fn name(&self) -> &'static str {
        "sgd-cpu-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let Some((w0, w1)) = l1.contiguous_offsets() else {
            bail!(
                "sgd: variable must be contiguous, got strides {:?}",
                l1.stride()
            )
        };
        let Some((g0, g1)) = l2.contiguous_offsets() else {
            bail!(
                "sgd: gradient must be contiguous, got strides {:?}",
                l2.stride()
            )
        };
        let w = match s1 {
            CpuStorage::F32(w) => &mut w[w0..w1],
            other => bail!(
                "sgd: fast path expects an f32 variable, got {:?}",
                other.dtype()
            ),
        };
        let g = match s2 {
            CpuStorage::F32(g) => &g[g0..g1],
            other => bail!(
                "sgd: fast path expects an f32 gradient, got {:?}",
                other.dtype()
            ),
        };
        let mut buffer = self.buffer.borrow_mut();
        let b = &mut **buffer;
        if g.len() != w.len() || b.len() != w.len() {
            bail!(
                "sgd: sizes differ: variable {}, gradient {}, buffer {}",
                w.len(),
                g.len(),
                b.len()
            )
        }
        let (lr, mu, wd) = (self.lr, self.momentum, self.weight_decay);
        // Same operation order as the tensor path, so both round alike.
        for ((w, &g), b) in w.iter_mut().zip(g).zip(b.iter_mut()) {
            let g = if wd > 0.0 { g + *w * wd } else { g };
            let bi = *b * mu + g;
            *b = bi;
            let u = if self.nesterov { g + bi * mu } else { bi };
            *w -= u * lr;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::test_util::{lcg, max_abs_diff, vars_from};
    use candle_core::Device;

    #[test]
    fn config_validation_names_the_parameter() {
        assert!(SgdConfig::default().validate().is_ok());
        for (cfg, what) in [
            (
                SgdConfig {
                    lr: 0.0,
                    ..Default::default()
                },
                "sgd.lr",
            ),
            (
                SgdConfig {
                    momentum: 1.0,
                    ..Default::default()
                },
                "sgd.momentum",
            ),
            (
                SgdConfig {
                    momentum: -0.1,
                    ..Default::default()
                },
                "sgd.momentum",
            ),
            (
                SgdConfig {
                    weight_decay: f64::NAN,
                    ..Default::default()
                },
                "sgd.weight_decay",
            ),
        ] {
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(msg.contains(what), "{cfg:?}: {msg}");
        }
        let cfg: SgdConfig = serde_json::from_str(r#"{"lr": 0.05}"#).unwrap();
        assert_eq!(
            cfg,
            SgdConfig {
                lr: 0.05,
                ..Default::default()
            }
        );
    }

    /// Three steps on one weight, computed by hand with PyTorch's formula (Nesterov and classical, with
    /// and without weight decay).
    #[test]
    fn hand_computed_steps_match_pytorch() {
        // w0 = 1, gradients 0.5, -0.25, 1.0, lr 0.1, mu 0.9.
        // Nesterov, wd 0:
        //   step 1: b = 0.5,              u = 0.5 + 0.45 = 0.95,         w = 1 - 0.095 = 0.905
        //   step 2: b = 0.45 - 0.25 = 0.2, u = -0.25 + 0.18 = -0.07,     w = 0.905 + 0.007 = 0.912
        //   step 3: b = 0.18 + 1 = 1.18,   u = 1 + 1.062 = 2.062,        w = 0.912 - 0.2062 = 0.7058
        let grads = [0.5f64, -0.25, 1.0];
        let hand = |nesterov: bool, wd: f64| {
            let (lr, mu) = (0.1, 0.9);
            let (mut w, mut b) = (1.0f64, 0.0f64);
            let mut out = vec![];
            for g in grads {
                let g = g + wd * w;
                b = mu * b + g;
                let u = if nesterov { g + mu * b } else { b };
                w -= lr * u;
                out.push(w);
            }
            out
        };
        let nest = hand(true, 0.0);
        for (got, want) in nest.iter().zip([0.905, 0.912, 0.7058]) {
            assert!((got - want).abs() < 1e-12, "{nest:?}");
        }
        for (nesterov, wd) in [(true, 0.0), (false, 0.0), (true, 0.01), (false, 0.01)] {
            let expected = hand(nesterov, wd);
            for reference in [false, true] {
                let vars = vars_from(&[("w", vec![1.0], &[1])]);
                let var = vars[0].1.clone();
                let cfg = SgdConfig {
                    lr: 0.1,
                    momentum: 0.9,
                    nesterov,
                    weight_decay: wd,
                    grad_centralization: false,
                };
                let mut opt = if reference {
                    Sgd::new_reference(vars, cfg).unwrap()
                } else {
                    Sgd::new(vars, cfg).unwrap()
                };
                for (i, g) in grads.iter().enumerate() {
                    // loss = g * w  => dloss/dw = g
                    let loss = (var.as_tensor() * *g).unwrap().sum_all().unwrap();
                    opt.backward_step(&loss).unwrap();
                    let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
                    assert!(
                        (got - expected[i]).abs() < 1e-6,
                        "nesterov={nesterov} wd={wd} reference={reference} step {}: {got} vs {}",
                        i + 1,
                        expected[i]
                    );
                }
                assert_eq!(opt.step_count(), 3);
            }
        }
    }

    /// The fast in-place path and the tensor-op path agree over several steps.
    #[test]
    fn fast_path_matches_tensor_path() {
        let shapes: [&[usize]; 3] = [&[8, 1, 3, 3], &[10, 72], &[10]];
        let init: Vec<(&str, Vec<f32>, &[usize])> = ["c.w", "fc.w", "fc.b"]
            .iter()
            .zip(shapes)
            .enumerate()
            .map(|(i, (n, s))| (*n, lcg(i as u64 + 1, s.iter().product()), s))
            .collect();
        for (nesterov, weight_decay) in [(true, 0.0), (false, 5e-4), (true, 5e-4)] {
            let cfg = SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                nesterov,
                weight_decay,
                grad_centralization: false,
            };
            let fast_vars = vars_from(&init);
            let ref_vars = vars_from(&init);
            let mut fast = Sgd::new(fast_vars.clone(), cfg).unwrap();
            let mut slow = Sgd::new_reference(ref_vars.clone(), cfg).unwrap();
            assert!(fast
                .slots
                .iter()
                .all(|s| matches!(s.buffer, Buffer::Host(_))));
            assert!(slow
                .slots
                .iter()
                .all(|s| matches!(s.buffer, Buffer::Tensor(_))));
            for step in 0..10u64 {
                let loss = |vars: &[(String, Var)]| -> Tensor {
                    let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
                    for (k, (name, v)) in vars.iter().enumerate() {
                        if name == "fc.b" && step % 2 == 1 {
                            continue;
                        }
                        let c = lcg(100 + step * 7 + k as u64, v.elem_count());
                        let c = Tensor::from_vec(c, v.shape(), &Device::Cpu).unwrap();
                        let term = (v.as_tensor().powf(3.0).unwrap() * c).unwrap();
                        total = (total + term.sum_all().unwrap()).unwrap();
                    }
                    total
                };
                fast.backward_step(&loss(&fast_vars)).unwrap();
                slow.backward_step(&loss(&ref_vars)).unwrap();
                for ((name, a), (_, b)) in fast_vars.iter().zip(&ref_vars) {
                    let d = max_abs_diff(a.as_tensor(), b.as_tensor());
                    assert!(d < 1e-6, "{cfg:?} step {step} var {name}: max |diff| = {d}");
                }
            }
            let (sf, ss) = (fast.state().unwrap(), slow.state().unwrap());
            for (name, bf) in &sf.momentum {
                for (x, y) in bf.iter().zip(&ss.momentum[name]) {
                    assert!((x - y).abs() < 1e-6, "{name}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn minimises_a_quadratic() {
        let target = Tensor::new(&[3.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let vars = vars_from(&[("w", vec![0.0, 0.0, 0.0], &[3])]);
        let w = vars[0].1.clone();
        let mut opt = Sgd::new(
            vars,
            SgdConfig {
                lr: 0.05,
                ..Default::default()
            },
        )
        .unwrap();
        let loss_of = |w: &Var| {
            (w.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        for _ in 0..300 {
            opt.backward_step(&loss_of(&w)).unwrap();
        }
        assert!(max_abs_diff(w.as_tensor(), &target) < 1e-3);
    }

    #[test]
    fn state_round_trip_continues_bit_for_bit() {
        let init = [
            ("a", lcg(1, 6), &[2usize, 3][..]),
            ("b", lcg(2, 3), &[3][..]),
        ];
        let run = |opt: &mut Sgd, vars: &[(String, Var)], steps: std::ops::Range<u64>| {
            for s in steps {
                let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
                for (_, v) in vars {
                    let c = lcg(50 + s, v.elem_count());
                    let c = Tensor::from_vec(c, v.shape(), &Device::Cpu).unwrap();
                    let term = (v.as_tensor().sqr().unwrap() * c).unwrap();
                    loss = (loss + term.sum_all().unwrap()).unwrap();
                }
                opt.backward_step(&loss).unwrap();
            }
        };
        let cfg = SgdConfig::default();
        let va = vars_from(&init);
        let mut a = Sgd::new(va.clone(), cfg).unwrap();
        run(&mut a, &va, 0..3);
        let json = serde_json::to_string(&a.state().unwrap()).unwrap();
        let snapshot: Vec<Vec<f32>> = va
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        run(&mut a, &va, 3..6);

        let vb: Vec<(String, Var)> = init
            .iter()
            .zip(&snapshot)
            .map(|((n, _, s), d)| {
                let t = Tensor::from_vec(d.clone(), *s, &Device::Cpu).unwrap();
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let mut b = Sgd::new(vb.clone(), SgdConfig { lr: 0.5, ..cfg }).unwrap();
        b.load_state(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!((b.step_count(), b.lr()), (3, 0.1));
        run(&mut b, &vb, 3..6);
        for ((n, x), (_, y)) in va.iter().zip(&vb) {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y, "{n}");
        }

        // A state of other variables is refused, naming the variable, and changes nothing.
        let mut wrong = a.state().unwrap();
        wrong.momentum.get_mut("a").unwrap().pop();
        let err = b.load_state(wrong).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("5 values"), "{err}");
        let mut extra = a.state().unwrap();
        extra.momentum.insert("c".into(), vec![]);
        assert!(b.load_state(extra).unwrap_err().to_string().contains("`c`"));
        assert_eq!(b.step_count(), 6);
    }

    #[test]
    fn variables_without_gradient_are_skipped() {
        let vars = vars_from(&[("a", vec![1.0, 2.0], &[2]), ("b", vec![3.0], &[1])]);
        let (a, b) = (vars[0].1.clone(), vars[1].1.clone());
        let mut opt = Sgd::new(vars, SgdConfig::default()).unwrap();
        opt.backward_step(&a.as_tensor().sum_all().unwrap())
            .unwrap();
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0]);
        let st = opt.state().unwrap();
        assert_eq!(st.momentum["b"], vec![0.0]);
        assert_eq!(st.momentum["a"], vec![1.0, 1.0]);
    }
}

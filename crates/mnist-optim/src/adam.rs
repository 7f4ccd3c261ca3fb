//! Adam exactly as Keras (TF 2.x) implements it, with a fast in-place CPU path.
//!
//! At step `t` (1-based), for each variable `w` with gradient `g`:
//! ```text
//! m     = b1 m + (1 - b1) g
//! v     = b2 v + (1 - b2) g^2
//! alpha = lr sqrt(1 - b2^t) / (1 - b1^t)
//! w     = w - alpha m / (sqrt(v) + eps)        // eps is NOT bias-corrected (Keras form)
//! ```
//! With `weight_decay > 0` the decoupled (AdamW, Keras `weight_decay=`) decay `w -= lr wd w` is
//! applied before the update; the default is `0.0`, so unlike `candle_nn::ParamsAdamW::default()`
//! there is no hidden decay.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};
use crate::slots::{centralized, is_false, is_fast, take_in_order, tensor_like, unique_names};

/// Hyper-parameters of [`Adam`]; the defaults are those of `keras.optimizers.Adam`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamConfig {
    /// Learning rate (`> 0`, finite). Default `1e-3`.
    pub lr: f64,
    /// Decay of the first moment, in `[0, 1)`. Default `0.9`.
    pub beta1: f64,
    /// Decay of the second moment, in `[0, 1)`. Default `0.999`.
    pub beta2: f64,
    /// Added to `sqrt(v)` (not bias-corrected, as in Keras), `> 0`. Default `1e-7`.
    pub epsilon: f64,
    /// Decoupled weight decay (`w -= lr * wd * w` each step), `>= 0`. Default `0.0` (off).
    pub weight_decay: f64,
    /// Gradient centralization of every weight of rank 2 and up before the step (default off; a config
    /// without the field reads as off, and off is not written).
    #[serde(skip_serializing_if = "is_false")]
    pub grad_centralization: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-7,
            weight_decay: 0.0,
            grad_centralization: false,
        }
    }
}

impl AdamConfig {
    /// Checks every hyper-parameter, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        check_lr("adam.lr", self.lr)?;
        for (what, value) in [("adam.beta1", self.beta1), ("adam.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(OptimError::InvalidConfig {
                    what,
                    value,
                    reason: "must lie in [0, 1)",
                });
            }
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(OptimError::InvalidConfig {
                what: "adam.epsilon",
                value: self.epsilon,
                reason: "must be finite and > 0",
            });
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(OptimError::InvalidConfig {
                what: "adam.weight_decay",
                value: self.weight_decay,
                reason: "must be finite and >= 0",
            });
        }
        Ok(())
    }
}

/// Rejects a learning rate that is not finite and positive.
pub(crate) fn check_lr(what: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(OptimError::InvalidConfig {
            what,
            value,
            reason: "must be finite and > 0",
        })
    }
}

/// First and second moments of one variable, flattened in row-major order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MomentState {
    /// First moment (`m`).
    pub m: Vec<f32>,
    /// Second moment (`v`).
    pub v: Vec<f32>,
}

/// A serialisable snapshot of an [`Adam`] optimiser, for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamState {
    /// Number of steps taken so far.
    pub step: u64,
    /// Learning rate in use.
    pub lr: f64,
    /// Moments per variable name.
    pub moments: BTreeMap<String, MomentState>,
}

/// Where the moments of a variable live.
enum Moments {
    /// CPU, f32, contiguous variable: plain vectors updated in one pass with the variable.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Any other variable: tensors of the variable's dtype and device.
    Tensors { m: Tensor, v: Tensor },
}

/// One optimised variable.
struct Slot {
    name: String,
    var: Var,
    moments: Moments,
}

/// The Adam optimiser (Keras form), see the [module docs](self) for the formula.
pub struct Adam {
    slots: Vec<Slot>,
    cfg: AdamConfig,
    step: u64,
}

impl std::fmt::Debug for Adam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("Adam")
            .field("cfg", &self.cfg)
            .field("step", &self.step)
            .field("vars", &names)
            .finish()
    }
}

impl Adam {
    /// Builds the optimiser over named variables (names must be unique; they key checkpoints).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        Self::build(vars, cfg, true)
    }

    /// The slow twin of [`Adam::new`]: the same update written with plain tensor ops for every
    /// variable, whatever its device or dtype. Used to test the fast CPU path.
    pub fn new_reference(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        Self::build(vars, cfg, false)
    }

    fn build(vars: Vec<(String, Var)>, cfg: AdamConfig, allow_fast: bool) -> Result<Self> {
        cfg.validate()?;
        let vars = unique_names(vars)?;
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let moments = if allow_fast && is_fast(&var) {
                let n = var.elem_count();
                Moments::Host {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            } else {
                Moments::Tensors {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                }
            };
            slots.push(Slot { name, var, moments });
        }
        Ok(Self {
            slots,
            cfg,
            step: 0,
        })
    }

    /// The configuration (its `lr` is the current learning rate).
    pub fn config(&self) -> &AdamConfig {
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

    /// Sets `beta1`, the first moment's decay, for the next steps (a schedule's cyclical momentum; the
    /// bias correction uses the current value, as PyTorch's Adam does).
    pub fn set_beta1(&mut self, beta1: f64) {
        self.cfg.beta1 = beta1;
    }

    /// Number of steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The optimised variables with their names, in the order given to [`Adam::new`].
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Computes the gradients of `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// Takes one step. Variables without a gradient in `grads` are left untouched (their moments too).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        // Check every shape before touching any state, so an error leaves the optimiser as it was.
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
        let t = self.step as f64;
        let AdamConfig {
            lr,
            beta1,
            beta2,
            epsilon,
            weight_decay,
            grad_centralization,
        } = self.cfg;
        let alpha = lr * (1.0 - beta2.powf(t)).sqrt() / (1.0 - beta1.powf(t));
        let decay = 1.0 - lr * weight_decay;
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let grad = &centralized(grad, grad_centralization)?;
            match &mut slot.moments {
                Moments::Host { m, v } => {
                    let grad = grad.to_dtype(DType::F32)?.contiguous()?;
                    let op = AdamCpuUpdate {
                        moments: RefCell::new((m.as_mut_slice(), v.as_mut_slice())),
                        beta1: beta1 as f32,
                        beta2: beta2 as f32,
                        one_minus_beta1: (1.0 - beta1) as f32,
                        one_minus_beta2: (1.0 - beta2) as f32,
                        alpha: alpha as f32,
                        epsilon: epsilon as f32,
                        decay: decay as f32,
                    };
                    slot.var.inplace_op2(&grad, &op)?;
                }
                Moments::Tensors { m, v } => {
                    let grad = grad.to_dtype(slot.var.dtype())?;
                    let new_m = (m.affine(beta1, 0.0)? + grad.affine(1.0 - beta1, 0.0)?)?;
                    let new_v = (v.affine(beta2, 0.0)? + grad.sqr()?.affine(1.0 - beta2, 0.0)?)?;
                    let update = new_m
                        .div(&new_v.sqrt()?.affine(1.0, epsilon)?)?
                        .affine(alpha, 0.0)?;
                    let w = slot.var.as_tensor();
                    let w = if weight_decay > 0.0 {
                        w.affine(decay, 0.0)?
                    } else {
                        w.clone()
                    };
                    slot.var.set(&(w - update)?)?;
                    *m = new_m;
                    *v = new_v;
                }
            }
        }
        Ok(())
    }

    /// A snapshot of the optimiser for a checkpoint (moments copied to the host as f32).
    pub fn state(&self) -> Result<AdamState> {
        let mut moments = BTreeMap::new();
        for slot in &self.slots {
            let state = match &slot.moments {
                Moments::Host { m, v } => MomentState {
                    m: m.clone(),
                    v: v.clone(),
                },
                Moments::Tensors { m, v } => MomentState {
                    m: m.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
                    v: v.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
                },
            };
            moments.insert(slot.name.clone(), state);
        }
        Ok(AdamState {
            step: self.step,
            lr: self.cfg.lr,
            moments,
        })
    }

    /// Restores a snapshot taken by [`Adam::state`]. The names and sizes must match the variables
    /// of this optimiser exactly; on error nothing is changed.
    pub fn load_state(&mut self, state: AdamState) -> Result<()> {
        check_lr("adam state lr", state.lr)?;
        let saved = take_in_order(
            self.slots.iter().map(|s| (s.name.as_str(), &s.var)),
            state.moments,
            |ms| vec![ms.m.len(), ms.v.len()],
            "moments",
            "optimiser",
        )?;
        // Build every new moment first, so a device error also leaves the state untouched.
        let mut new = Vec::with_capacity(self.slots.len());
        for (slot, ms) in self.slots.iter().zip(saved) {
            new.push(match &slot.moments {
                Moments::Host { .. } => Moments::Host { m: ms.m, v: ms.v },
                Moments::Tensors { .. } => Moments::Tensors {
                    m: tensor_like(ms.m, &slot.var)?,
                    v: tensor_like(ms.v, &slot.var)?,
                },
            });
        }
        for (slot, moments) in self.slots.iter_mut().zip(new) {
            slot.moments = moments;
        }
        self.step = state.step;
        self.cfg.lr = state.lr;
        Ok(())
    }
}

/// The fused in-place update of one contiguous f32 CPU variable: reads the gradient, updates `m`
/// and `v` and writes the variable in a single pass.
struct AdamCpuUpdate<'a> {
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    alpha: f32,
    epsilon: f32,
    decay: f32,
}

impl InplaceOp2 for AdamCpuUpdate<'_> {
    fn name(&self) -> &'static str {
        "adam-cpu-update"
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
                "adam: variable must be contiguous, got strides {:?}",
                l1.stride()
            )
        };
        let Some((g0, g1)) = l2.contiguous_offsets() else {
            bail!(
                "adam: gradient must be contiguous, got strides {:?}",
                l2.stride()
            )
        };
        let w = match s1 {
            CpuStorage::F32(w) => &mut w[w0..w1],
            other => bail!(
                "adam: fast path expects an f32 variable, got {:?}",
                other.dtype()
            ),
        };
        let g = match s2 {
            CpuStorage::F32(g) => &g[g0..g1],
            other => bail!(
                "adam: fast path expects an f32 gradient, got {:?}",
                other.dtype()
            ),
        };
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        let n = w.len();
        if g.len() != n || m.len() != n || v.len() != n {
            bail!(
                "adam: sizes differ: variable {n}, gradient {}, moments {} / {}",
                g.len(),
                m.len(),
                v.len()
            )
        }
        let (b1, b2, c1, c2) = (
            self.beta1,
            self.beta2,
            self.one_minus_beta1,
            self.one_minus_beta2,
        );
        let (alpha, eps, decay) = (self.alpha, self.epsilon, self.decay);
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let mi = *m * b1 + g * c1;
            let vi = *v * b2 + g * g * c2;
            *m = mi;
            *v = vi;
            // Same operation order as the tensor path, so both round alike.
            *w = *w * decay - mi / (vi.sqrt() + eps) * alpha;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::test_util::{lcg, max_abs_diff, vars_from};
    use candle_core::Device;

    /// With gradient centralization, a step is the plain step on the centralized gradient (every
    /// filter's mean out, vectors as they are), bit for bit; without it, nothing changes.
    #[test]
    fn grad_centralization_steps_on_the_centralized_gradient() {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 3] = [&[3, 2, 3, 3], &[4, 5], &[4]];
        let make = || -> Vec<(String, Var)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let n: usize = s.iter().product();
                    let v: Vec<f32> = (0..n)
                        .map(|k| ((k * 7 + i * 3) % 11) as f32 * 0.1 - 0.5)
                        .collect();
                    (
                        format!("w{i}"),
                        Var::from_tensor(&Tensor::from_vec(v, *s, &dev).unwrap()).unwrap(),
                    )
                })
                .collect()
        };
        // A fixed gradient per variable: the loss sum(w * c).
        let coeffs: Vec<Tensor> = shapes
            .iter()
            .map(|s| {
                let n: usize = s.iter().product();
                let v: Vec<f32> = (0..n).map(|k| ((k * 13) % 17) as f32 * 0.3 - 2.0).collect();
                Tensor::from_vec(v, *s, &dev).unwrap()
            })
            .collect();
        let loss = |vars: &[(String, Var)], cs: &[Tensor]| -> Tensor {
            vars.iter()
                .zip(cs)
                .map(|((_, v), c)| (v.as_tensor() * c).unwrap().sum_all().unwrap())
                .reduce(|a, b| (a + b).unwrap())
                .unwrap()
        };
        let centred: Vec<Tensor> = coeffs
            .iter()
            .map(|c| centralized(c, true).unwrap())
            .collect();
        for c in &centred[..2] {
            let sums = c
                .flatten_from(1)
                .unwrap()
                .sum(1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(sums.iter().all(|s| s.abs() < 1e-5), "{sums:?}");
        }
        assert_eq!(
            centred[2].to_vec1::<f32>().unwrap(),
            coeffs[2].to_vec1::<f32>().unwrap()
        );
        let (a_vars, b_vars) = (make(), make());
        let cfg = AdamConfig {
            lr: 1e-2,
            ..AdamConfig::default()
        };
        let mut a = Adam::new(
            a_vars.clone(),
            AdamConfig {
                grad_centralization: true,
                ..cfg
            },
        )
        .unwrap();
        let mut b = Adam::new(b_vars.clone(), cfg).unwrap();
        for _ in 0..3 {
            a.backward_step(&loss(&a_vars, &coeffs)).unwrap();
            b.backward_step(&loss(&b_vars, &centred)).unwrap();
        }
        let bits = |vars: &[(String, Var)]| -> Vec<Vec<u32>> {
            vars.iter()
                .map(|(_, v)| {
                    let t = v
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    t.iter().map(|x| x.to_bits()).collect()
                })
                .collect()
        };
        assert_eq!(bits(&a_vars), bits(&b_vars));
        // The plain optimizer on the raw gradient ends elsewhere.
        let c_vars = make();
        let mut c = Adam::new(c_vars.clone(), cfg).unwrap();
        for _ in 0..3 {
            c.backward_step(&loss(&c_vars, &coeffs)).unwrap();
        }
        assert_ne!(bits(&a_vars), bits(&c_vars));
    }

    #[test]
    fn config_validation() {
        assert!(AdamConfig::default().validate().is_ok());
        let bad = [
            AdamConfig {
                lr: 0.0,
                ..Default::default()
            },
            AdamConfig {
                lr: f64::NAN,
                ..Default::default()
            },
            AdamConfig {
                lr: f64::INFINITY,
                ..Default::default()
            },
            AdamConfig {
                beta1: 1.0,
                ..Default::default()
            },
            AdamConfig {
                beta2: -0.1,
                ..Default::default()
            },
            AdamConfig {
                epsilon: 0.0,
                ..Default::default()
            },
            AdamConfig {
                weight_decay: -1.0,
                ..Default::default()
            },
        ];
        for cfg in bad {
            let err = cfg.validate().unwrap_err();
            assert!(matches!(err, OptimError::InvalidConfig { .. }), "{cfg:?}");
        }
        let msg = AdamConfig {
            beta1: 1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(msg.contains("adam.beta1"), "{msg}");
        // Defaults match Keras, and serde round-trips (missing fields take defaults).
        let cfg: AdamConfig = serde_json::from_str(r#"{"lr": 0.01}"#).unwrap();
        assert_eq!(
            cfg,
            AdamConfig {
                lr: 0.01,
                ..Default::default()
            }
        );
        assert_eq!(AdamConfig::default().epsilon, 1e-7);
        assert_eq!(AdamConfig::default().weight_decay, 0.0);
    }

    #[test]
    fn duplicate_names_rejected() {
        let vars = vars_from(&[("a", vec![1.0], &[1]), ("a", vec![2.0], &[1])]);
        let err = Adam::new(vars, AdamConfig::default()).unwrap_err();
        assert!(matches!(err, OptimError::DuplicateVar { ref name } if name == "a"));
    }

    /// Two steps on a single weight, computed by hand with the Keras formula.
    #[test]
    fn hand_computed_two_steps() {
        // w0 = 1, g1 = 0.5, g2 = -0.25, lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-7
        let (lr, b1, b2, eps) = (0.1f64, 0.9f64, 0.999f64, 1e-7f64);
        let mut w = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        let mut expected = vec![];
        for (t, g) in [(1.0f64, 0.5f64), (2.0, -0.25)] {
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let alpha = lr * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
            w -= alpha * m / (v.sqrt() + eps);
            expected.push(w);
        }
        // Step 1: m = 0.05, v = 0.00025, alpha = 0.1*sqrt(0.001)/0.1 = 0.0316228,
        // w = 1 - 0.0316228 * 0.05 / (0.0158114 + 1e-7) = 0.9000006 (≈ 1 - lr, the eps shows).
        assert!(
            (expected[0] - 0.900_000_632_4).abs() < 1e-9,
            "{}",
            expected[0]
        );
        for reference in [false, true] {
            let vars = vars_from(&[("w", vec![1.0], &[1])]);
            let var = vars[0].1.clone();
            let cfg = AdamConfig {
                lr,
                ..Default::default()
            };
            let mut opt = if reference {
                Adam::new_reference(vars, cfg).unwrap()
            } else {
                Adam::new(vars, cfg).unwrap()
            };
            for (i, g) in [0.5f32, -0.25].into_iter().enumerate() {
                // loss = g * w  => dloss/dw = g
                let loss = (var.as_tensor() * g as f64).unwrap().sum_all().unwrap();
                opt.backward_step(&loss).unwrap();
                let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
                assert!(
                    (got - expected[i]).abs() < 1e-6,
                    "reference={reference} step {}: got {got}, expected {}",
                    i + 1,
                    expected[i]
                );
            }
            assert_eq!(opt.step_count(), 2);
        }
    }

    /// The fast in-place path and the tensor-op path agree over several steps.
    #[test]
    fn fast_path_matches_tensor_path() {
        let shapes: [&[usize]; 4] = [&[8, 1, 3, 3], &[8], &[10, 72], &[10]];
        let init: Vec<(&str, Vec<f32>, &[usize])> = ["c.w", "c.b", "fc.w", "fc.b"]
            .iter()
            .zip(shapes)
            .enumerate()
            .map(|(i, (n, s))| (*n, lcg(i as u64 + 1, s.iter().product()), s))
            .collect();
        for weight_decay in [0.0, 0.01] {
            let cfg = AdamConfig {
                lr: 0.01,
                weight_decay,
                ..Default::default()
            };
            let fast_vars = vars_from(&init);
            let ref_vars = vars_from(&init);
            let mut fast = Adam::new(fast_vars.clone(), cfg).unwrap();
            let mut slow = Adam::new_reference(ref_vars.clone(), cfg).unwrap();
            assert!(fast
                .slots
                .iter()
                .all(|s| matches!(s.moments, Moments::Host { .. })));
            assert!(slow
                .slots
                .iter()
                .all(|s| matches!(s.moments, Moments::Tensors { .. })));
            for step in 0..10u64 {
                // loss = sum(w^3 * c) with a per-step coefficient: a gradient that varies in sign
                // and size; the bias "fc.b" gets no gradient on odd steps (must be skipped).
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
                    assert!(
                        d < 1e-6,
                        "wd={weight_decay} step {step} var {name}: max |diff| = {d}"
                    );
                }
            }
            // The moments agree too.
            let (sf, ss) = (fast.state().unwrap(), slow.state().unwrap());
            for (name, mf) in &sf.moments {
                let ms = &ss.moments[name];
                for (x, y) in mf.m.iter().chain(&mf.v).zip(ms.m.iter().chain(&ms.v)) {
                    assert!((x - y).abs() < 1e-6, "{name}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn variables_without_gradient_are_skipped() {
        let vars = vars_from(&[("a", vec![1.0, 2.0], &[2]), ("b", vec![3.0], &[1])]);
        let (a, b) = (vars[0].1.clone(), vars[1].1.clone());
        let mut opt = Adam::new(vars, AdamConfig::default()).unwrap();
        let loss = a.as_tensor().sum_all().unwrap();
        opt.backward_step(&loss).unwrap();
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0]);
        let st = opt.state().unwrap();
        assert_eq!(st.moments["b"].m, vec![0.0]);
        assert!(st.moments["a"].m.iter().all(|&x| x > 0.0));
        // first step of Adam moves each weight by ~lr
        let a_now = a.as_tensor().to_vec1::<f32>().unwrap();
        assert!((a_now[0] - (1.0 - 1e-3)).abs() < 1e-5, "{a_now:?}");
    }

    #[test]
    fn minimises_a_quadratic() {
        // f(w) = sum (w - target)^2, started far away.
        let target = Tensor::new(&[3.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let vars = vars_from(&[("w", vec![0.0, 0.0, 0.0], &[3])]);
        let w = vars[0].1.clone();
        let mut opt = Adam::new(
            vars,
            AdamConfig {
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
        let first = loss_of(&w).to_scalar::<f32>().unwrap();
        for _ in 0..500 {
            opt.backward_step(&loss_of(&w)).unwrap();
        }
        let last = loss_of(&w).to_scalar::<f32>().unwrap();
        assert!(first > 13.0 && last < 1e-4, "loss {first} -> {last}");
        assert!(max_abs_diff(w.as_tensor(), &target) < 1e-2);
    }

    #[test]
    fn f64_vars_use_tensor_path() {
        let t = Tensor::new(&[1.0f64, -1.0], &Device::Cpu).unwrap();
        let w = Var::from_tensor(&t).unwrap();
        let mut opt = Adam::new(vec![("w".into(), w.clone())], AdamConfig::default()).unwrap();
        assert!(matches!(opt.slots[0].moments, Moments::Tensors { .. }));
        opt.backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap();
        let got = w.as_tensor().to_vec1::<f64>().unwrap();
        assert!(
            (got[0] - 0.999).abs() < 1e-6 && (got[1] + 0.999).abs() < 1e-6,
            "{got:?}"
        );
        let st = opt.state().unwrap();
        assert_eq!(st.moments["w"].m.len(), 2);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let init = [
            ("a", lcg(1, 6), &[2usize, 3][..]),
            ("b", lcg(2, 3), &[3][..]),
        ];
        let run = |opt: &mut Adam, vars: &[(String, Var)], steps: std::ops::Range<u64>| {
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
        let cfg = AdamConfig::default();
        let va = vars_from(&init);
        let mut a = Adam::new(va.clone(), cfg).unwrap();
        run(&mut a, &va, 0..3);
        let json = serde_json::to_string(&a.state().unwrap()).unwrap();
        let snapshot: Vec<Vec<f32>> = va
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        run(&mut a, &va, 3..6);

        // A fresh optimiser (fast path) and a reference one, restored from the snapshot.
        for reference in [false, true] {
            let vb: Vec<(String, Var)> = init
                .iter()
                .zip(&snapshot)
                .map(|((n, _, s), d)| {
                    let t = Tensor::from_vec(d.clone(), *s, &Device::Cpu).unwrap();
                    (n.to_string(), Var::from_tensor(&t).unwrap())
                })
                .collect();
            let mut b = if reference {
                Adam::new_reference(vb.clone(), AdamConfig { lr: 0.5, ..cfg }).unwrap()
            } else {
                Adam::new(vb.clone(), AdamConfig { lr: 0.5, ..cfg }).unwrap()
            };
            b.load_state(serde_json::from_str(&json).unwrap()).unwrap();
            assert_eq!(b.step_count(), 3);
            assert_eq!(b.lr(), 1e-3);
            run(&mut b, &vb, 3..6);
            for ((n, x), (_, y)) in va.iter().zip(&vb) {
                let d = max_abs_diff(x.as_tensor(), y.as_tensor());
                assert!(d < 1e-6, "reference={reference} {n}: max |diff| = {d}");
            }
        }
    }

    #[test]
    fn load_state_mismatch_names_the_var() {
        let vars = vars_from(&[("a", vec![1.0, 2.0], &[2]), ("b", vec![3.0], &[1])]);
        let mut opt = Adam::new(vars, AdamConfig::default()).unwrap();
        let good = opt.state().unwrap();

        let mut missing = good.clone();
        missing.moments.remove("b");
        let err = opt.load_state(missing).unwrap_err().to_string();
        assert!(err.contains("`b`") && err.contains("missing"), "{err}");

        let mut wrong = good.clone();
        wrong.moments.get_mut("a").unwrap().v = vec![0.0; 3];
        let err = opt.load_state(wrong).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("3"), "{err}");

        let mut extra = good.clone();
        extra.moments.insert(
            "c".into(),
            MomentState {
                m: vec![],
                v: vec![],
            },
        );
        let err = opt.load_state(extra).unwrap_err().to_string();
        assert!(err.contains("`c`"), "{err}");

        let mut bad_lr = good.clone();
        bad_lr.lr = -1.0;
        assert!(opt.load_state(bad_lr).is_err());
        // Nothing changed, and the good state still loads.
        assert_eq!(opt.step_count(), 0);
        opt.load_state(good).unwrap();
    }

    #[test]
    fn gradient_shape_mismatch_is_an_error() {
        let vars = vars_from(&[("a", vec![1.0, 2.0], &[2])]);
        let a = vars[0].1.clone();
        let mut opt = Adam::new(vars, AdamConfig::default()).unwrap();
        // Build a GradStore holding a wrongly-shaped gradient for `a`.
        let mut grads = a.as_tensor().sum_all().unwrap().backward().unwrap();
        grads.insert(
            a.as_tensor(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = opt.step(&grads).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("[3]"), "{err}");
        assert_eq!(opt.step_count(), 0);
    }
}

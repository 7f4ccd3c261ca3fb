//! Squeeze-and-excitation (Hu, Shen and Sun, "Squeeze-and-Excitation Networks", CVPR 2018): each
//! channel of a feature map scaled by a gate in (0, 1) computed from the means of all channels.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::error::shape_err;
use crate::{linear_with_init, WeightInit};

/// `[b, c, h, w] -> [b, c, h, w]`: `x * sigmoid(expand(relu(reduce(mean_hw(x)))))`, the gate broadcast
/// over each channel's plane. Plain candle ops (no fused kernel: the arithmetic is `2 c u` multiply-adds
/// per image plus one multiply per element), so the gradient is candle's own.
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    /// `[c] -> [u]` (`"reduce"`).
    reduce: Linear,
    /// `[u] -> [c]` (`"expand"`).
    expand: Linear,
    c: usize,
}

/// Builds a [`SqueezeExcite`] over `c` channels with a bottleneck of `units`: two dense layers
/// (`"reduce"`, `"expand"`), weights drawn by `init` (as Keras's Dense), biases zero, so every gate starts
/// near 1/2.
pub fn squeeze_excite(
    c: usize,
    units: usize,
    init: WeightInit,
    vb: VarBuilder,
) -> Result<SqueezeExcite> {
    Ok(SqueezeExcite {
        reduce: linear_with_init(c, units, init, vb.pp("reduce"))?,
        expand: linear_with_init(units, c, init, vb.pp("expand"))?,
        c,
    })
}

impl SqueezeExcite {
    /// The gates `[b, c]` of `xs [b, c, h, w]`.
    pub fn gates(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.rank() != 4 || xs.dim(1)? != self.c {
            return Err(shape_err(
                "squeeze_excite",
                format!("[b, {}, h, w]", self.c),
                xs.dims(),
            ));
        }
        let s = xs.mean((2, 3))?; // [b, c]
        let z = self.reduce.forward(&s)?.relu()?; // [b, u]
        candle_nn::ops::sigmoid(&self.expand.forward(&z)?) // [b, c]
    }
}

impl Module for SqueezeExcite {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let g = self.gates(xs)?.unsqueeze(2)?.unsqueeze(3)?; // [b, c, 1, 1]
        xs.broadcast_mul(&g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededVarMap;
    use crate::ops::test_util::rand_t;
    use candle_core::{DType, Device, Var};

    /// The output is each channel times the gate computed by hand from the channel means, and every
    /// gradient (input, both layers' weights and biases) matches central differences of the loss.
    #[test]
    fn gates_scale_channels_and_gradients_match_finite_differences() {
        let m = SeededVarMap::new(3);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let se = squeeze_excite(3, 2, WeightInit::default(), vb.pp("se")).unwrap();
        let x = rand_t(&[2, 3, 4, 5], 9).affine(2.0, -0.5).unwrap();
        let y = se.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 4, 5]);
        let w1 = se.reduce.weight().to_vec2::<f32>().unwrap();
        let b1 = se.reduce.bias().unwrap().to_vec1::<f32>().unwrap();
        let w2 = se.expand.weight().to_vec2::<f32>().unwrap();
        let b2 = se.expand.bias().unwrap().to_vec1::<f32>().unwrap();
        let planes = x.flatten_from(2).unwrap().to_vec3::<f32>().unwrap();
        let out = y.flatten_from(2).unwrap().to_vec3::<f32>().unwrap();
        for b in 0..2 {
            let s: Vec<f32> = planes[b]
                .iter()
                .map(|p| p.iter().sum::<f32>() / p.len() as f32)
                .collect();
            let z: Vec<f32> = (0..2)
                .map(|u| (b1[u] + (0..3).map(|c| w1[u][c] * s[c]).sum::<f32>()).max(0.0))
                .collect();
            for c in 0..3 {
                let a = b2[c] + (0..2).map(|u| w2[c][u] * z[u]).sum::<f32>();
                let gate = 1.0 / (1.0 + (-a).exp());
                for (o, i) in out[b][c].iter().zip(&planes[b][c]) {
                    assert!((o - i * gate).abs() < 1e-5, "{o} vs {}", i * gate);
                }
            }
        }
        // Gradients of sum(y * r) for a fixed r, against central differences in f64 terms.
        let r = rand_t(&[2, 3, 4, 5], 11);
        let xv = Var::from_tensor(&x).unwrap();
        let loss = |se: &SqueezeExcite, x: &Tensor| -> f64 {
            se.forward(x)
                .unwrap()
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let grads = se
            .forward(xv.as_tensor())
            .unwrap()
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let data = m.var_map().data().lock().unwrap();
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        drop(data);
        vars.push(("x".into(), xv.clone()));
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let base = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in (0..base.len()).step_by(7.max(base.len() / 6)) {
                let h = 1e-2f32;
                let at = |d: f32| {
                    let mut p = base.clone();
                    p[i] += d;
                    v.set(&Tensor::from_vec(p, v.as_tensor().shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&se, xv.as_tensor())
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
                v.set(
                    &Tensor::from_vec(base.clone(), v.as_tensor().shape(), &Device::Cpu).unwrap(),
                )
                .unwrap();
                assert!(
                    (numeric - g[i] as f64).abs() < 2e-2 * (1.0 + numeric.abs()),
                    "{name}[{i}]: {} vs {numeric}",
                    g[i]
                );
            }
        }
        assert!(se.forward(&rand_t(&[2, 4, 3, 3], 1)).is_err());
    }
}

//! Keras-initialised dense layer.

use candle_core::Result;
use candle_nn::{Init, Linear, VarBuilder};

use crate::init::WeightInit;
use crate::LayerError;

/// A `candle_nn::Linear` with a glorot-uniform `"weight" [out_dim, in_dim]` and a zero `"bias" [out_dim]`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_with_init(in_dim, out_dim, WeightInit::GlorotUniform, vb)
}

/// [`linear`] with its weight drawn by `init`.
pub fn linear_with_init(
    in_dim: usize,
    out_dim: usize,
    init: WeightInit,
    vb: VarBuilder,
) -> Result<Linear> {
    if in_dim == 0 || out_dim == 0 {
        return Err(LayerError::Config(format!(
            "linear: dims {in_dim} -> {out_dim} must be positive"
        ))
        .into());
    }
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init.init(in_dim, out_dim))?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{glorot_uniform_limit, SeededVarMap};
    use candle_core::{DType, Device, Module, Tensor};

    #[test]
    fn linear_init_and_shape() {
        let m = SeededVarMap::new(5);
        let l = linear(250, 10, m.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let lim = glorot_uniform_limit(250, 10) as f32;
        let w = l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(w.iter().all(|v| v.abs() <= lim));
        assert_eq!(
            l.bias()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let y = l
            .forward(&Tensor::ones((3, 250), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(y.dims(), &[3, 10]);
    }
}

//! The training loss: cross-entropy, optionally against smoothed labels, optionally with the Poly-1
//! term.

use candle_core::{Result, Tensor, D};
use candle_nn::loss::cross_entropy;
use candle_nn::ops::log_softmax;

/// Mean cross-entropy of `logits` `[b, k]` against class indices `labels` `[b]` (u32), with the targets
/// smoothed by `eps`: each target is `(1 - eps) * one_hot + eps / k`. `eps = 0` is plain cross-entropy
/// (candle's `cross_entropy`, bit for bit). Built from candle ops, so it has a gradient.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> Result<Tensor> {
    if eps == 0.0 {
        return cross_entropy(logits, labels);
    }
    // log p: [b, k]
    let log_p = log_softmax(logits, D::Minus1)?;
    // -log p[label], mean over the batch
    let nll = log_p
        .gather(&labels.unsqueeze(1)?, 1)? // [b, 1]
        .mean_all()?
        .neg()?;
    // -mean_k log p[k], mean over the batch (the cross-entropy against the uniform target)
    let uniform = log_p.mean(D::Minus1)?.mean_all()?.neg()?;
    (nll * (1.0 - eps))? + (uniform * eps)?
}

/// [`smoothed_cross_entropy`] plus the Poly-1 term `poly * mean(1 - p[label])` (Leng et al., ICLR
/// 2022); `poly = 0` is [`smoothed_cross_entropy`] bit for bit.
pub fn training_loss(
    logits: &Tensor,
    labels: &Tensor,
    smoothing: f64,
    poly: f64,
) -> Result<Tensor> {
    let ce = smoothed_cross_entropy(logits, labels, smoothing)?;
    if poly == 0.0 {
        return Ok(ce);
    }
    // p[label]: [b, 1] (log_softmax is candle ops with a gradient; softmax_last_dim has none)
    let p_label = log_softmax(logits, D::Minus1)?
        .gather(&labels.unsqueeze(1)?, 1)?
        .exp()?;
    let term = p_label.mean_all()?.affine(-poly, poly)?; // poly * (1 - mean p[label])
    ce + term
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn inputs() -> Result<(Var, Tensor)> {
        let dev = Device::Cpu;
        let logits = Var::from_vec(
            vec![
                0.3f32, -1.2, 2.0, 0.0, 0.5, //
                -0.7, 0.1, 0.4, 1.5, -2.0, //
                1.0, 1.0, -0.5, 0.2, 0.9,
            ],
            (3, 5),
            &dev,
        )?;
        let labels = Tensor::new(&[2u32, 0, 4], &dev)?;
        Ok((logits, labels))
    }

    #[test]
    fn zero_smoothing_is_cross_entropy() -> Result<()> {
        let (logits, labels) = inputs()?;
        let a = smoothed_cross_entropy(&logits, &labels, 0.0)?.to_scalar::<f32>()?;
        let b = cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn smoothed_loss_and_gradient_match_the_closed_form() -> Result<()> {
        let (logits, labels) = inputs()?;
        let eps = 0.1;
        let loss = smoothed_cross_entropy(&logits, &labels, eps)?;
        let grad = loss.backward()?;
        let g = grad.get(&logits).expect("gradient").to_vec2::<f32>()?;
        let x = logits.as_tensor().to_vec2::<f32>()?;
        let y = labels.to_vec1::<u32>()?;
        let (b, k) = (x.len(), x[0].len());
        let mut want_loss = 0.0f64;
        for i in 0..b {
            let m = x[i].iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = x[i].iter().map(|&v| (v as f64 - m).exp()).sum();
            for j in 0..k {
                let log_p = x[i][j] as f64 - m - z.ln();
                let target = eps / k as f64 + if j == y[i] as usize { 1.0 - eps } else { 0.0 };
                want_loss -= target * log_p / b as f64;
                // d loss / d logit = (softmax - target) / b
                let want_g = (log_p.exp() - target) / b as f64;
                assert!((g[i][j] as f64 - want_g).abs() < 1e-6, "grad[{i}][{j}]");
            }
        }
        let got = loss.to_scalar::<f32>()? as f64;
        assert!((got - want_loss).abs() < 1e-6, "{got} vs {want_loss}");
        Ok(())
    }

    #[test]
    fn poly_loss_and_gradient_match_the_closed_form() -> Result<()> {
        let (logits, labels) = inputs()?;
        let a = training_loss(&logits, &labels, 0.0, 0.0)?.to_scalar::<f32>()?;
        let b = cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        assert_eq!(a, b, "no Poly-1 term: plain cross-entropy");
        let eps = 2.0;
        let loss = training_loss(&logits, &labels, 0.0, eps)?;
        let grad = loss.backward()?;
        let g = grad.get(&logits).expect("gradient").to_vec2::<f32>()?;
        let x = logits.as_tensor().to_vec2::<f32>()?;
        let y = labels.to_vec1::<u32>()?;
        let (b, k) = (x.len(), x[0].len());
        let mut want_loss = 0.0f64;
        for i in 0..b {
            let m = x[i].iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = x[i].iter().map(|&v| (v as f64 - m).exp()).sum();
            let p: Vec<f64> = x[i].iter().map(|&v| (v as f64 - m).exp() / z).collect();
            let t = y[i] as usize;
            want_loss += (-p[t].ln() + eps * (1.0 - p[t])) / b as f64;
            for j in 0..k {
                let onehot = if j == t { 1.0 } else { 0.0 };
                // d CE / d x_j = p_j - 1[j = t]; d (1 - p_t) / d x_j = -p_t (1[j = t] - p_j)
                let want_g = ((p[j] - onehot) - eps * p[t] * (onehot - p[j])) / b as f64;
                assert!((g[i][j] as f64 - want_g).abs() < 1e-6, "grad[{i}][{j}]");
            }
        }
        let got = loss.to_scalar::<f32>()? as f64;
        assert!((got - want_loss).abs() < 1e-6, "{got} vs {want_loss}");
        Ok(())
    }
}

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

    /// Checks `loss` of `inputs()` and its gradient against `want`, which maps one row's softmax `p`
    /// and label `t` to that row's loss and its gradient by the row's logits (both before the mean over
    /// the batch).
    fn matches_closed_form(
        loss: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        want: impl Fn(&[f64], usize) -> (f64, Vec<f64>),
    ) -> Result<()> {
        let (logits, labels) = inputs()?;
        let loss = loss(&logits, &labels)?;
        let grad = loss.backward()?;
        let g = grad.get(&logits).expect("gradient").to_vec2::<f32>()?;
        let x = logits.as_tensor().to_vec2::<f32>()?;
        let y = labels.to_vec1::<u32>()?;
        let b = x.len() as f64;
        let mut want_loss = 0.0f64;
        for (i, row) in x.iter().enumerate() {
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            let p: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp() / z).collect();
            let (l, dx) = want(&p, y[i] as usize);
            want_loss += l / b;
            for (j, d) in dx.iter().enumerate() {
                assert!((g[i][j] as f64 - d / b).abs() < 1e-6, "grad[{i}][{j}]");
            }
        }
        let got = loss.to_scalar::<f32>()? as f64;
        assert!((got - want_loss).abs() < 1e-6, "{got} vs {want_loss}");
        Ok(())
    }

    #[test]
    fn smoothed_loss_and_gradient_match_the_closed_form() -> Result<()> {
        let eps = 0.1;
        matches_closed_form(
            |x, y| smoothed_cross_entropy(x, y, eps),
            |p, t| {
                let k = p.len() as f64;
                let target = |j: usize| eps / k + if j == t { 1.0 - eps } else { 0.0 };
                let loss = -(0..p.len()).map(|j| target(j) * p[j].ln()).sum::<f64>();
                // d loss / d logit = softmax - target
                (loss, (0..p.len()).map(|j| p[j] - target(j)).collect())
            },
        )
    }

    #[test]
    fn poly_loss_and_gradient_match_the_closed_form() -> Result<()> {
        let (logits, labels) = inputs()?;
        let a = training_loss(&logits, &labels, 0.0, 0.0)?.to_scalar::<f32>()?;
        let b = cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        assert_eq!(a, b, "no Poly-1 term: plain cross-entropy");
        let eps = 2.0;
        matches_closed_form(
            |x, y| training_loss(x, y, 0.0, eps),
            |p, t| {
                let onehot = |j: usize| if j == t { 1.0 } else { 0.0 };
                let loss = -p[t].ln() + eps * (1.0 - p[t]);
                // d CE / d x_j = p_j - 1[j = t]; d (1 - p_t) / d x_j = -p_t (1[j = t] - p_j)
                let dx = (0..p.len())
                    .map(|j| (p[j] - onehot(j)) - eps * p[t] * (onehot(j) - p[j]))
                    .collect();
                (loss, dx)
            },
        )
    }
}

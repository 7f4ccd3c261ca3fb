//! Turning logits `[b, k]` into predictions.

use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{MetricsError, Result};

/// Runs `f` on each row of `logits` `[b, k]` (1 <= k <= 256), read from one contiguous f32 CPU copy
/// (no copy at all when the logits already are contiguous f32 on the CPU).
fn for_each_row(logits: &Tensor, mut f: impl FnMut(&[f32])) -> Result<()> {
    let dims = logits.dims();
    let &[_b, k] = dims else {
        return Err(MetricsError::LogitsShape {
            dims: dims.to_vec(),
        });
    };
    if k == 0 || k > 256 {
        return Err(MetricsError::LogitsShape {
            dims: dims.to_vec(),
        });
    }
    let host = logits
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let (storage, layout) = host.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("logits copy is not on the CPU".into()).into());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::Msg("logits copy is not contiguous".into()).into());
    };
    let data = cpu.as_slice::<f32>()?;
    data.get(start..end)
        .ok_or_else(|| candle_core::Error::Msg("logits storage shorter than its layout".into()))?
        .chunks_exact(k)
        .for_each(&mut f);
    Ok(())
}

/// The index of the largest logit of each row of `logits` `[b, k]` (`k <= 256`).
/// Ties go to the first index; NaN entries are never chosen unless the whole row is NaN (then 0).
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(logits.dims().first().copied().unwrap_or(0));
    for_each_row(logits, |row| {
        let mut best = 0usize;
        let mut best_val = f32::NEG_INFINITY;
        for (j, &x) in row.iter().enumerate() {
            if x > best_val {
                best = j;
                best_val = x;
            }
        }
        // k <= 256 was checked, so the index fits in a u8.
        out.push(best as u8);
    })?;
    Ok(out)
}

/// The softmax of each row of `logits` `[b, k]` (`k <= 256`), computed stably (max subtracted).
pub fn softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(logits.dims().first().copied().unwrap_or(0));
    for_each_row(logits, |row| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut p: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        out.push(p);
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_basic_ties_and_layouts() {
        let t = Tensor::new(
            &[[0.1f32, 2.0, -1.0], [5.0, 5.0, 1.0], [-3.0, -2.0, -1.0]],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(argmax_rows(&t).unwrap(), vec![1, 0, 2]);
        // Non-contiguous (same values, transposed strides) and f64 inputs take the copy path.
        let tt = t.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!tt.is_contiguous());
        assert_eq!(argmax_rows(&tt).unwrap(), vec![1, 0, 2]);
        let t64 = t.to_dtype(DType::F64).unwrap();
        assert_eq!(argmax_rows(&t64).unwrap(), vec![1, 0, 2]);
        // A narrowed view (non-zero offset).
        let tail = t.narrow(0, 1, 2).unwrap();
        assert_eq!(argmax_rows(&tail).unwrap(), vec![0, 2]);
        // NaN is skipped.
        let n = Tensor::new(&[[f32::NAN, 1.0, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(argmax_rows(&n).unwrap(), vec![1]);
        // Empty batch.
        let e = Tensor::zeros((0, 10), DType::F32, &Device::Cpu).unwrap();
        assert!(argmax_rows(&e).unwrap().is_empty());
    }

    #[test]
    fn bad_shapes_are_errors() {
        for dims in [vec![10], vec![2, 0], vec![2, 300], vec![2, 3, 4]] {
            let t = Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu).unwrap();
            let err = argmax_rows(&t).unwrap_err();
            assert!(
                matches!(&err, MetricsError::LogitsShape { dims: d } if *d == dims),
                "{err}"
            );
            assert!(softmax_rows(&t).is_err());
        }
    }

    #[test]
    fn softmax_matches_candle() {
        let t = Tensor::new(
            &[[1.0f32, 2.0, 3.0], [1000.0, 1000.0, -1000.0]],
            &Device::Cpu,
        )
        .unwrap();
        let ours = softmax_rows(&t).unwrap();
        let theirs: Vec<Vec<f32>> = candle_nn::ops::softmax_last_dim(&t)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        for row in &ours {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // Large logits do not overflow.
        assert!((ours[1][0] - 0.5).abs() < 1e-6 && ours[1][2] == 0.0);
    }
}

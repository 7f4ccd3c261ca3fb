//! Running accuracy and mean loss over an epoch.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result};
use crate::tensor::argmax_rows;

/// Checks that predictions and labels pair up.
pub(crate) fn check_lengths(pred: &[u8], labels: &[u8]) -> Result<()> {
    if pred.len() == labels.len() {
        Ok(())
    } else {
        Err(MetricsError::LengthMismatch {
            left_name: "predictions",
            left: pred.len(),
            right_name: "labels",
            right: labels.len(),
        })
    }
}

/// Fraction of correct predictions seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Number of correct predictions.
    pub correct: u64,
    /// Number of predictions.
    pub total: u64,
}

impl Accuracy {
    /// Adds a batch of logits `[b, k]` (arg-max taken per row) against `b` labels.
    pub fn update(&mut self, logits: &Tensor, labels: &[u8]) -> Result<()> {
        let pred = argmax_rows(logits)?;
        self.update_from_predictions(&pred, labels)
    }

    /// Adds a batch of predicted classes against labels of the same length.
    pub fn update_from_predictions(&mut self, pred: &[u8], labels: &[u8]) -> Result<()> {
        check_lengths(pred, labels)?;
        let correct = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
        self.correct += correct as u64;
        self.total += pred.len() as u64;
        Ok(())
    }

    /// `correct / total`, `0.0` before any update.
    pub fn value(&self) -> f64 {
        crate::ratio(self.correct, self.total)
    }

    /// Adds the counts of another accumulator (e.g. from another thread).
    pub fn merge(&mut self, other: &Accuracy) {
        self.correct += other.correct;
        self.total += other.total;
    }
}

/// Sample-weighted mean of per-batch mean losses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MeanLoss {
    /// Sum of `batch mean loss * batch size`.
    pub sum: f64,
    /// Number of samples.
    pub count: u64,
}

impl MeanLoss {
    /// Adds one batch whose mean loss is `loss_mean_of_batch` over `batch_size` samples.
    /// A non-finite loss is kept (the mean becomes non-finite, so divergence shows).
    pub fn update(&mut self, loss_mean_of_batch: f64, batch_size: usize) {
        self.sum += loss_mean_of_batch * batch_size as f64;
        self.count += batch_size as u64;
    }

    /// The mean loss per sample, `0.0` before any sample.
    pub fn value(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    /// Adds the sums of another accumulator.
    pub fn merge(&mut self, other: &MeanLoss) {
        self.sum += other.sum;
        self.count += other.count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn accuracy_counts_and_merges() {
        let mut a = Accuracy::default();
        assert_eq!(a.value(), 0.0, "empty accuracy is 0, not NaN");
        a.update_from_predictions(&[1, 2, 3, 4], &[1, 2, 0, 0])
            .unwrap();
        assert_eq!((a.correct, a.total), (2, 4));
        let logits = Tensor::new(&[[0.0f32, 1.0], [2.0, 1.0], [0.0, 3.0]], &Device::Cpu).unwrap();
        let mut b = Accuracy::default();
        b.update(&logits, &[1, 0, 0]).unwrap();
        assert_eq!((b.correct, b.total), (2, 3));
        a.merge(&b);
        assert_eq!((a.correct, a.total), (4, 7));
        assert!((a.value() - 4.0 / 7.0).abs() < 1e-15);
    }

    #[test]
    fn accuracy_length_mismatch() {
        let mut a = Accuracy::default();
        let err = a
            .update_from_predictions(&[1, 2], &[1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("predictions has 2") && err.contains("labels has 1"),
            "{err}"
        );
        let logits = Tensor::zeros((3, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(a.update(&logits, &[0, 0]).is_err());
        assert_eq!(a, Accuracy::default(), "a failed update changes nothing");
    }

    #[test]
    fn mean_loss_is_sample_weighted() {
        let mut m = MeanLoss::default();
        assert_eq!(m.value(), 0.0);
        m.update(1.0, 10);
        m.update(4.0, 30);
        assert!((m.value() - (10.0 + 120.0) / 40.0).abs() < 1e-12);
        let mut n = MeanLoss::default();
        n.update(0.5, 10);
        m.merge(&n);
        assert!((m.value() - 135.0 / 50.0).abs() < 1e-12);
        m.update(f64::NAN, 1);
        assert!(m.value().is_nan());
    }
}

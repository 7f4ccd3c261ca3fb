//! The confusion matrix and the per-class statistics derived from it.

use std::fmt;

use serde::Serialize;

use crate::error::{MetricsError, Result};
use crate::ratio;
use crate::running::check_lengths;

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassStats {
    /// The class index.
    pub class: usize,
    /// `tp / (tp + fp)`, `0.0` if the class was never predicted.
    pub precision: f64,
    /// `tp / (tp + fn)`, `0.0` if the class never occurs.
    pub recall: f64,
    /// Harmonic mean of precision and recall, `0.0` if both are zero.
    pub f1: f64,
    /// Number of samples whose true class is this one.
    pub support: u64,
}

/// Counts of (true class, predicted class) pairs: rows are true classes, columns predictions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfusionMatrix {
    num_classes: usize,
    counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    /// An empty `num_classes x num_classes` matrix.
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            counts: vec![vec![0; num_classes]; num_classes],
        }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Adds predictions against labels of the same length. Every class must be below
    /// `num_classes`; on error nothing is counted.
    pub fn update(&mut self, pred: &[u8], labels: &[u8]) -> Result<()> {
        check_lengths(pred, labels)?;
        let n = self.num_classes;
        for (index, (&p, &l)) in pred.iter().zip(labels).enumerate() {
            for (what, value) in [("label", l), ("prediction", p)] {
                if value as usize >= n {
                    return Err(MetricsError::ClassOutOfRange {
                        what,
                        value,
                        index,
                        num_classes: n,
                    });
                }
            }
        }
        for (&p, &l) in pred.iter().zip(labels) {
            if let Some(c) = self
                .counts
                .get_mut(l as usize)
                .and_then(|row| row.get_mut(p as usize))
            {
                *c += 1;
            }
        }
        Ok(())
    }

    /// Adds the counts of another matrix with the same number of classes.
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<()> {
        if other.num_classes != self.num_classes {
            return Err(MetricsError::LengthMismatch {
                left_name: "this confusion matrix's classes",
                left: self.num_classes,
                right_name: "the merged one",
                right: other.num_classes,
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        Ok(())
    }

    /// The counts, `counts()[true_class][predicted_class]`.
    pub fn counts(&self) -> &[Vec<u64>] {
        &self.counts
    }

    /// Number of samples counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    fn true_positives(&self, class: usize) -> u64 {
        self.counts
            .get(class)
            .and_then(|row| row.get(class))
            .copied()
            .unwrap_or(0)
    }

    /// Number of samples whose true class is `class` (0 for a class out of range).
    pub fn support(&self, class: usize) -> u64 {
        self.counts.get(class).map_or(0, |row| row.iter().sum())
    }

    /// Number of samples predicted as `class` (0 for a class out of range).
    pub fn predicted(&self, class: usize) -> u64 {
        self.counts.iter().filter_map(|row| row.get(class)).sum()
    }

    /// `tp / (tp + fp)` of `class`; `0.0` if it was never predicted (or is out of range).
    pub fn precision(&self, class: usize) -> f64 {
        ratio(self.true_positives(class), self.predicted(class))
    }

    /// `tp / (tp + fn)` of `class`; `0.0` if it never occurs (or is out of range).
    pub fn recall(&self, class: usize) -> f64 {
        ratio(self.true_positives(class), self.support(class))
    }

    /// `2 p r / (p + r)` of `class`; `0.0` if precision and recall are both zero.
    pub fn f1(&self, class: usize) -> f64 {
        let (p, r) = (self.precision(class), self.recall(class));
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    /// Statistics of every class, in class order.
    pub fn per_class(&self) -> Vec<ClassStats> {
        (0..self.num_classes)
            .map(|class| ClassStats {
                class,
                precision: self.precision(class),
                recall: self.recall(class),
                f1: self.f1(class),
                support: self.support(class),
            })
            .collect()
    }

    /// Fraction on the diagonal; `0.0` when empty.
    pub fn accuracy(&self) -> f64 {
        let diag = (0..self.num_classes).map(|c| self.true_positives(c)).sum();
        ratio(diag, self.total())
    }
}

/// An aligned table: counts (rows true, columns predicted) with support, recall, precision and F1
/// per class, then the overall accuracy.
impl fmt::Display for ConfusionMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = self.counts.iter().flatten().copied().max().unwrap_or(0);
        let w = max
            .to_string()
            .len()
            .max(self.num_classes.to_string().len())
            .max(5);
        let head = "true\\pred";
        write!(f, "{head:>9}")?;
        for c in 0..self.num_classes {
            write!(f, " {c:>w$}")?;
        }
        writeln!(
            f,
            " | {:>8} {:>9} {:>9} {:>6}",
            "support", "precision", "recall", "f1"
        )?;
        for (class, row) in self.counts.iter().enumerate() {
            write!(f, "{class:>9}")?;
            for c in row {
                write!(f, " {c:>w$}")?;
            }
            writeln!(
                f,
                " | {:>8} {:>9.4} {:>9.4} {:>6.4}",
                self.support(class),
                self.precision(class),
                self.recall(class),
                self.f1(class)
            )?;
        }
        write!(
            f,
            "accuracy {:.4} ({} samples)",
            self.accuracy(),
            self.total()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rows (true) x cols (pred): [[3, 1, 0], [0, 2, 2], [1, 0, 1]]
    fn known() -> ConfusionMatrix {
        let pairs: &[(u8, u8, usize)] = &[
            (0, 0, 3),
            (0, 1, 1),
            (1, 1, 2),
            (1, 2, 2),
            (2, 0, 1),
            (2, 2, 1),
        ];
        let (mut labels, mut pred) = (vec![], vec![]);
        for &(t, p, n) in pairs {
            labels.extend(std::iter::repeat_n(t, n));
            pred.extend(std::iter::repeat_n(p, n));
        }
        let mut cm = ConfusionMatrix::new(3);
        cm.update(&pred, &labels).unwrap();
        cm
    }

    #[test]
    fn counts_precision_recall_f1() {
        let cm = known();
        assert_eq!(cm.counts(), &[vec![3, 1, 0], vec![0, 2, 2], vec![1, 0, 1]]);
        assert_eq!(cm.total(), 10);
        assert!((cm.accuracy() - 0.6).abs() < 1e-15);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // class 0: tp 3, predicted 4, support 4
        assert!(close(cm.precision(0), 0.75) && close(cm.recall(0), 0.75) && close(cm.f1(0), 0.75));
        // class 1: tp 2, predicted 3, support 4 -> f1 = 2 (2/3)(1/2) / (7/6) = 4/7
        assert!(close(cm.precision(1), 2.0 / 3.0));
        assert!(close(cm.recall(1), 0.5));
        assert!(close(cm.f1(1), 4.0 / 7.0));
        // class 2: tp 1, predicted 3, support 2 -> f1 = 2 (1/3)(1/2) / (5/6) = 2/5
        assert!(close(cm.precision(2), 1.0 / 3.0) && close(cm.recall(2), 0.5));
        assert!(close(cm.f1(2), 0.4));
        let stats = cm.per_class();
        assert_eq!(stats.len(), 3);
        assert_eq!(stats[1].support, 4);
        assert!(close(stats[2].f1, 0.4));
    }

    #[test]
    fn division_by_zero_gives_zero() {
        // Class 3 never occurs and is never predicted; class 2 predicted but never right.
        let mut cm = ConfusionMatrix::new(4);
        cm.update(&[0, 2], &[0, 1]).unwrap();
        assert_eq!(cm.precision(3), 0.0);
        assert_eq!(cm.recall(3), 0.0);
        assert_eq!(cm.f1(3), 0.0);
        assert_eq!(cm.precision(2), 0.0);
        assert_eq!(cm.recall(1), 0.0);
        assert_eq!(cm.f1(2), 0.0);
        // Out-of-range class queries are 0.0 as well, not a panic.
        assert_eq!(cm.precision(99), 0.0);
        assert_eq!(cm.support(99), 0);
        assert_eq!(ConfusionMatrix::new(10).accuracy(), 0.0);
    }

    #[test]
    fn bad_inputs_are_errors_and_change_nothing() {
        let mut cm = ConfusionMatrix::new(3);
        let err = cm.update(&[0, 1, 2], &[0, 3, 1]).unwrap_err().to_string();
        assert!(
            err.contains("label 3 at position 1") && err.contains("3 classes"),
            "{err}"
        );
        assert!(cm.update(&[0, 5], &[0, 1]).is_err());
        assert!(cm.update(&[0], &[0, 1]).is_err());
        assert_eq!(cm.total(), 0);
        let mut other = ConfusionMatrix::new(3);
        other.update(&[1], &[1]).unwrap();
        cm.merge(&other).unwrap();
        cm.merge(&other).unwrap();
        assert_eq!(cm.counts()[1][1], 2);
        assert!(cm.merge(&ConfusionMatrix::new(4)).is_err());
    }

    #[test]
    fn display_is_an_aligned_table() {
        let text = known().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        // Header and class rows share one width, so columns line up.
        let width = lines[0].len();
        assert!(lines[1..4].iter().all(|l| l.len() == width), "{text}");
        assert!(lines[0].contains("precision") && lines[0].contains("recall"));
        assert!(lines[1].trim_start().starts_with("0 "));
        assert!(
            lines[2].contains("0.6667") && lines[2].contains("0.5000"),
            "{text}"
        );
        assert_eq!(lines[4], "accuracy 0.6000 (10 samples)");
    }

    #[test]
    fn serializes_counts() {
        let json = serde_json::to_value(known()).unwrap();
        assert_eq!(json["num_classes"], 3);
        assert_eq!(json["counts"][1][2], 2);
        let stats = serde_json::to_value(known().per_class()).unwrap();
        assert_eq!(stats[0]["support"], 4);
    }
}

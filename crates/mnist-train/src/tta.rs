//! Test-time augmentation: each image is classified by the mean of the softmax over five views, the
//! image itself and its whole-pixel shifts one pixel left, right, up and down (zeros move in at the
//! edge). A separately labelled figure: it never replaces the plain test accuracy.

use candle_core::{Device, ModuleT};
use mnist_data::{to_tensor, Split, IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES};
use mnist_metrics::{softmax_rows, ConfusionMatrix};
use mnist_models::Net;

use crate::{TrainError, EVAL_BATCH};

/// The views averaged, as `(shift_x, shift_y)` in pixels (`+x` = right, `+y` = down).
pub const TTA_SHIFTS: [(isize, isize); 5] = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)];

/// Writes `src` (28x28) moved by `(dx, dy)` whole pixels into `dst`: `dst(x, y) = src(x - dx, y - dy)`,
/// zero where that falls outside the image.
pub fn shift_image(src: &[u8], dst: &mut [u8], dx: isize, dy: isize) {
    let side = IMAGE_SIDE as isize;
    for (y, row) in dst
        .chunks_exact_mut(IMAGE_SIDE)
        .take(IMAGE_SIDE)
        .enumerate()
    {
        let sy = y as isize - dy;
        for (x, out) in row.iter_mut().enumerate() {
            let sx = x as isize - dx;
            *out = match (0..side).contains(&sx) && (0..side).contains(&sy) {
                true => src.get((sy * side + sx) as usize).copied().unwrap_or(0),
                false => 0,
            };
        }
    }
}

/// The result of [`evaluate_tta`].
#[derive(Debug, Clone)]
pub struct TtaEvaluation {
    /// Fraction correct, classifying by the mean softmax of the views.
    pub accuracy: f64,
    /// Mean cross-entropy of the mean softmax (`-ln` of the true class's mean probability).
    pub loss: f64,
    /// Confusion matrix of the averaged predictions (rows: true class).
    pub confusion: ConfusionMatrix,
}

/// Evaluates `net` in inference mode on every image of `split` with the views of [`TTA_SHIFTS`].
pub fn evaluate_tta(
    net: &Net,
    split: &Split,
    device: &Device,
) -> Result<TtaEvaluation, TrainError> {
    let n = split.len();
    let mut confusion = ConfusionMatrix::new(NUM_CLASSES);
    let mut loss_sum = 0.0f64;
    let views = TTA_SHIFTS.len() as f32;
    let mut start = 0;
    while start < n {
        let end = (start + EVAL_BATCH).min(n);
        let b = end - start;
        let mut mean = vec![[0f32; NUM_CLASSES]; b];
        let mut bytes = vec![0u8; b * IMAGE_PIXELS];
        for &(dx, dy) in &TTA_SHIFTS {
            for (i, dst) in bytes.chunks_exact_mut(IMAGE_PIXELS).enumerate() {
                shift_image(split.image(start + i), dst, dx, dy);
            }
            let images = to_tensor(&bytes, b, device)?; // [b, 1, 28, 28]
            let logits = net.forward_t(&images, false)?; // [b, 10]
            for (acc, p) in mean.iter_mut().zip(softmax_rows(&logits)?) {
                for (a, q) in acc.iter_mut().zip(p) {
                    *a += q / views;
                }
            }
        }
        let labels = &split.labels()[start..end];
        let mut pred = Vec::with_capacity(b);
        for (p, &label) in mean.iter().zip(labels) {
            let best = (0..NUM_CLASSES).fold(0, |best, j| if p[j] > p[best] { j } else { best });
            pred.push(best as u8);
            loss_sum -= (p[label as usize].max(f32::MIN_POSITIVE) as f64).ln();
        }
        confusion.update(&pred, labels)?;
        start = end;
    }
    Ok(TtaEvaluation {
        accuracy: confusion.accuracy(),
        loss: loss_sum / n.max(1) as f64,
        confusion,
    })
}

/// How the views of [`TTA_SHIFTS`] are described in reports.
pub const TTA_LABEL: &str =
    "test-time augmentation: mean softmax of the image and its 1-px shifts left, right, up, down";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{evaluate, TrainConfig, Trained};
    use mnist_models::{Solution, Variant};

    #[test]
    fn views_are_the_image_and_four_exact_shifts_and_tta_runs() {
        // One image with a single bright pixel: each view moves it by one pixel, exactly.
        let mut img = vec![0u8; 784];
        img[10 * 28 + 12] = 200;
        let split = Split::from_parts(img.clone(), vec![3]).unwrap();
        let mut dst = vec![0u8; 784];
        for (sx, sy) in TTA_SHIFTS {
            shift_image(split.image(0), &mut dst, sx, sy);
            let lit: Vec<usize> = (0..784).filter(|&i| dst[i] != 0).collect();
            let want = (10 + sy) as usize * 28 + (12 + sx) as usize;
            assert_eq!(lit, vec![want], "shift ({sx}, {sy})");
            assert_eq!(dst[want], 200);
        }
        // Content shifted past the edge is gone; zeros move in.
        let mut edge = vec![0u8; 784];
        edge[27] = 9; // top-right corner
        shift_image(&edge, &mut dst, 1, 0);
        assert!(dst.iter().all(|&p| p == 0));
        shift_image(&edge, &mut dst, -1, 1);
        assert_eq!(dst[28 + 26], 9);
        // On a model, TTA gives a valid figure beside the plain one.
        let cfg = TrainConfig::recipe(Solution::Conv, Variant::Seed);
        let t = Trained::init(&cfg, &Device::Cpu).unwrap();
        let images: Vec<u8> = (0..20 * 784).map(|i| ((i * 37) % 251) as u8).collect();
        let labels: Vec<u8> = (0..20).map(|i| (i % 10) as u8).collect();
        let split = Split::from_parts(images, labels).unwrap();
        let tta = evaluate_tta(&t.net, &split, &Device::Cpu).unwrap();
        let plain = evaluate(&t.net, &split, &Device::Cpu).unwrap();
        assert!((0.0..=1.0).contains(&tta.accuracy));
        assert!(tta.loss.is_finite() && tta.loss > 0.0);
        assert_eq!(tta.confusion.counts().iter().flatten().sum::<u64>(), 20);
        assert!(plain.loss.is_finite());
    }
}

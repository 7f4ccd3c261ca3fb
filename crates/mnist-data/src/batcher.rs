//! Seeded training batches: shuffle (Fisher-Yates from our own ChaCha rng), optional augmentation,
//! `u8 -> f32 / 255` images `[b, 1, 28, 28]` and `u32 [b]` labels.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::augment::{augment_into, AugmentConfig};
use crate::dataset::Split;
use crate::error::{DataError, Result};
use crate::mix::BatchMix;
use crate::{IMAGE_PIXELS, IMAGE_SIDE};

/// A deterministic rng for one purpose (`stream`) in one epoch of a run seeded with `seed`.
///
/// Different `(seed, stream, epoch)` triples give independent ChaCha8 streams: the three numbers form
/// the 256-bit key, so e.g. the shuffle of epoch 3 never depends on how many numbers epoch 2 used.
pub fn epoch_rng(seed: u64, stream: u64, epoch: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&stream.to_le_bytes());
    key[16..24].copy_from_slice(&epoch.to_le_bytes());
    key[24..].copy_from_slice(b"mnistrng");
    ChaCha8Rng::from_seed(key)
}

/// A uniformly random permutation of `0..n` (Fisher-Yates driven by `rng`).
pub fn permutation(n: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// How to cut a split into batches.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatcherConfig {
    /// Examples per batch (the last one may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Visit the examples in a seeded random order.
    pub shuffle: bool,
    /// Randomly perturb each image (`None`: plain `/ 255`).
    pub augment: Option<AugmentConfig>,
    /// Drop the last partial batch (Keras keeps it: default `false`).
    pub drop_last: bool,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            shuffle: true,
            augment: None,
            drop_last: false,
        }
    }
}

impl BatcherConfig {
    /// A plain, in-order config for evaluation: no shuffle, no augmentation, partial last batch kept.
    pub fn eval(batch_size: usize) -> Self {
        Self {
            batch_size,
            shuffle: false,
            augment: None,
            drop_last: false,
        }
    }

    fn augments(&self) -> bool {
        self.augment.is_some_and(|a| !a.is_identity())
    }

    /// Checks the batch size and augmentation ranges.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(DataError::Config("batch_size must be at least 1".into()));
        }
        if let Some(a) = &self.augment {
            a.validate()?;
        }
        Ok(())
    }
}

/// One batch of examples on a device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `f32 [b, 1, 28, 28]`, pixels / 255 (augmented if asked).
    pub images: Tensor,
    /// `u32 [b]` class indices.
    pub labels: Tensor,
    /// The same labels on the host.
    pub labels_u8: Vec<u8>,
    /// How the images were mixed in pairs, when the augmentation mixes ([`crate::MixConfig`]): the loss
    /// then weighs each image's own label by `lam` and its partner's by `1 - lam`.
    pub mix: Option<BatchMix>,
}

impl Batch {
    /// The label each image holds the larger share of: its own, or, in a batch mixed with `lam < 0.5`,
    /// its partner's (what the training accuracy of a mixed batch counts).
    pub fn majority_labels(&self) -> std::borrow::Cow<'_, [u8]> {
        match (&self.mix, self.partner_labels_u8()) {
            (Some(mix), Some(partners)) if mix.lam < 0.5 => std::borrow::Cow::Owned(partners),
            _ => std::borrow::Cow::Borrowed(&self.labels_u8),
        }
    }

    /// The labels of the images mixed into this batch's images (`u32 [b]`, `labels[partner[i]]`), when
    /// it was mixed.
    pub fn partner_labels(&self) -> candle_core::Result<Option<Tensor>> {
        self.partner_labels_u8()
            .map(|l| labels_to_tensor(&l, self.labels.device()))
            .transpose()
    }

    /// `labels[partner[i]]` on the host, when the batch was mixed.
    fn partner_labels_u8(&self) -> Option<Vec<u8>> {
        let mix = self.mix.as_ref()?;
        Some(mix.partner.iter().map(|&j| self.labels_u8[j]).collect())
    }

    /// Number of examples in the batch.
    pub fn len(&self) -> usize {
        self.labels_u8.len()
    }

    /// True for a batch without examples (never yielded by [`Batcher`]).
    pub fn is_empty(&self) -> bool {
        self.labels_u8.is_empty()
    }
}

/// An iterator over the batches of one epoch of a [`Split`].
pub struct Batcher<'a> {
    split: &'a Split,
    order: Vec<usize>,
    pos: usize,
    end: usize,
    batch_size: usize,
    augment: Option<Augment>,
    device: Device,
}

/// An epoch's augmentation and its rngs: one for the warps, and one each for erasing, mixing and the
/// stroke thickness when they are on (so turning any on leaves the others' draws as they were).
struct Augment {
    cfg: AugmentConfig,
    warp: ChaCha8Rng,
    erase: Option<ChaCha8Rng>,
    mix: Option<ChaCha8Rng>,
    thickness: Option<ChaCha8Rng>,
}

impl<'a> Batcher<'a> {
    /// Prepares one epoch. When `cfg.shuffle` the order is drawn from `rng` now; when augmenting, a child
    /// rng for the per-image transforms is also seeded from `rng`, then one for erasing and one for
    /// mixing when those are on. Either needs `rng` (error otherwise), as does an invalid config.
    pub fn new(
        split: &'a Split,
        cfg: &BatcherConfig,
        rng: Option<&mut ChaCha8Rng>,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let needs_rng = cfg.shuffle || cfg.augments();
        let (order, augment) = match rng {
            None if needs_rng => {
                return Err(DataError::Config(
                    "shuffling or augmenting needs an rng (see epoch_rng)".into(),
                ))
            }
            None => ((0..split.len()).collect(), None),
            Some(rng) => {
                let order = if cfg.shuffle {
                    permutation(split.len(), rng)
                } else {
                    (0..split.len()).collect()
                };
                let augment = match cfg.augment {
                    Some(a) if !a.is_identity() => {
                        let warp = ChaCha8Rng::from_rng(rng);
                        let erase = a
                            .erase
                            .filter(|e| !e.is_identity())
                            .map(|_| ChaCha8Rng::from_rng(rng));
                        let mix = a.mix.map(|_| ChaCha8Rng::from_rng(rng));
                        let thickness = a
                            .thickness
                            .filter(|t| !t.is_identity())
                            .map(|_| ChaCha8Rng::from_rng(rng));
                        Some(Augment {
                            cfg: a,
                            warp,
                            erase,
                            mix,
                            thickness,
                        })
                    }
                    _ => None,
                };
                (order, augment)
            }
        };
        let end = if cfg.drop_last {
            split.len() - split.len() % cfg.batch_size
        } else {
            split.len()
        };
        Ok(Self {
            split,
            order,
            pos: 0,
            end,
            batch_size: cfg.batch_size,
            augment,
            device: device.clone(),
        })
    }

    /// Total number of batches this epoch yields.
    pub fn num_batches(&self) -> usize {
        self.end.div_ceil(self.batch_size)
    }

    /// Total number of examples this epoch yields (less than the split with `drop_last`).
    pub fn num_examples(&self) -> usize {
        self.end
    }

    fn make(&mut self, idx: &[usize]) -> candle_core::Result<Batch> {
        let b = idx.len();
        let mut pixels = vec![0f32; b * IMAGE_PIXELS];
        let mut labels_u8 = Vec::with_capacity(b);
        for (dst, &i) in pixels.chunks_exact_mut(IMAGE_PIXELS).zip(idx) {
            let src = self.split.image(i);
            match &mut self.augment {
                Some(a) => {
                    augment_into(src, dst, &a.cfg, &mut a.warp);
                    if let (Some(t), Some(rng)) = (&a.cfg.thickness, &mut a.thickness) {
                        t.apply(dst, rng);
                    }
                    if let (Some(e), Some(rng)) = (&a.cfg.erase, &mut a.erase) {
                        e.apply(dst, rng);
                    }
                }
                None => {
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = s as f32 / 255.0;
                    }
                }
            }
            labels_u8.push(self.split.label(i));
        }
        let mix = match &mut self.augment {
            Some(Augment {
                cfg: AugmentConfig { mix: Some(m), .. },
                mix: Some(rng),
                ..
            }) => Some(
                m.apply(&mut pixels, rng)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            ),
            _ => None,
        };
        let images = Tensor::from_vec(pixels, (b, 1, IMAGE_SIDE, IMAGE_SIDE), &self.device)?; // [b, 1, 28, 28]
        let labels = labels_to_tensor(&labels_u8, &self.device)?; // [b]
        Ok(Batch {
            images,
            labels,
            labels_u8,
            mix,
        })
    }
}

impl Iterator for Batcher<'_> {
    type Item = candle_core::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let stop = (self.pos + self.batch_size).min(self.end);
        let idx = std::mem::take(&mut self.order);
        let batch = self.make(&idx[self.pos..stop]);
        self.order = idx;
        self.pos = stop;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.end - self.pos).div_ceil(self.batch_size);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batcher<'_> {}

/// Runs `batches` on a thread of its own, up to `depth` items ahead, and hands every item to `consume` in
/// order, so that preparing the next batch (shuffling, augmentation, conversion) overlaps with the work
/// on the current one. The items and their order are exactly those of `batches`: prefetching changes no
/// result. The first error of `consume` stops both sides and is returned.
///
/// The producer may run rayon parallel loops of its own (a distillation teacher's forward pass does).
/// When the consumer runs on a rayon worker (training runs on the pool, `mnist_layers::on_pool`), it
/// waits for the next item without blocking that worker: it runs the pool's pending jobs meanwhile
/// ([`recv_on_pool`]), so the producer's loops finish even on a pool of one thread.
pub fn with_prefetch<T: Send, E>(
    batches: impl Iterator<Item = T> + Send,
    depth: usize,
    mut consume: impl FnMut(T) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(depth.max(1));
        scope.spawn(move || {
            for item in batches {
                // The consumer is gone (it stopped early): stop producing.
                if tx.send(item).is_err() {
                    break;
                }
            }
        });
        // `rx` is dropped on return, which ends the producer before the scope joins it.
        while let Some(item) = recv_on_pool(&rx) {
            consume(item)?;
        }
        Ok(())
    })
}

/// The next item of `rx` (`None` once the sender is gone). Off the rayon pool, a plain blocking
/// receive. On a pool worker, a blocking receive could idle the one worker that the sender's own
/// parallel loops wait for (a deadlock on a pool of one thread), so while nothing has arrived the
/// worker runs any pending job of the pool (`rayon::yield_now`) and otherwise waits at most 100 us
/// for the item before looking again.
fn recv_on_pool<T>(rx: &std::sync::mpsc::Receiver<T>) -> Option<T> {
    use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
    if rayon::current_thread_index().is_none() {
        return rx.recv().ok();
    }
    loop {
        match rx.try_recv() {
            Ok(item) => return Some(item),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            continue;
        }
        match rx.recv_timeout(std::time::Duration::from_micros(100)) {
            Ok(item) => return Some(item),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Shorthand for [`Batcher::new`].
pub fn batches<'a>(
    split: &'a Split,
    cfg: &BatcherConfig,
    rng: Option<&mut ChaCha8Rng>,
    device: &Device,
) -> Result<Batcher<'a>> {
    Batcher::new(split, cfg, rng, device)
}

/// `n` images of 784 `u8` pixels as an `f32 [n, 1, 28, 28]` tensor of pixels / 255 (for evaluation).
pub fn to_tensor(images: &[u8], n: usize, device: &Device) -> candle_core::Result<Tensor> {
    if n.checked_mul(IMAGE_PIXELS) != Some(images.len()) {
        candle_core::bail!(
            "to_tensor: {} pixel bytes for {n} images of 28x28 (expected {})",
            images.len(),
            n.saturating_mul(IMAGE_PIXELS)
        );
    }
    let pixels: Vec<f32> = images.iter().map(|&p| p as f32 / 255.0).collect();
    Tensor::from_vec(pixels, (n, 1, IMAGE_SIDE, IMAGE_SIDE), device) // [n, 1, 28, 28]
}

/// Labels as a `u32 [n]` tensor.
pub fn labels_to_tensor(labels: &[u8], device: &Device) -> candle_core::Result<Tensor> {
    let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let n = labels.len();
    Tensor::from_vec(labels, n, device) // [n]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(n: usize) -> Split {
        // Image i is filled with the value i (mod 256), label i % 10.
        let images: Vec<u8> = (0..n * 784).map(|k| (k / 784 % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        Split::from_parts(images, labels).unwrap()
    }

    /// The example indices of a batch, recovered from the constant pixel value of each image.
    fn ids(b: &Batch) -> Vec<usize> {
        let v = b.images.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
        v.iter()
            .map(|row| (row[0] * 255.0).round() as usize)
            .collect()
    }

    #[test]
    fn epoch_rng_is_deterministic_and_distinct() {
        let draw = |s, t, e| {
            let mut r = epoch_rng(s, t, e);
            (0..4).map(|_| r.random::<u64>()).collect::<Vec<_>>()
        };
        assert_eq!(draw(1, 2, 3), draw(1, 2, 3));
        assert_ne!(draw(1, 2, 3), draw(1, 2, 4));
        assert_ne!(draw(1, 2, 3), draw(1, 3, 3));
        assert_ne!(draw(1, 2, 3), draw(2, 2, 3));
        // Swapping the roles of the numbers gives another stream.
        assert_ne!(draw(3, 2, 1), draw(1, 2, 3));
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let p1 = permutation(1000, &mut epoch_rng(42, 1, 0));
        let p2 = permutation(1000, &mut epoch_rng(42, 1, 0));
        let p3 = permutation(1000, &mut epoch_rng(42, 1, 1));
        assert_eq!(p1, p2);
        assert_ne!(p1, p3);
        let mut sorted = p1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        // Not the identity, and roughly uniform: about 1 fixed point expected.
        assert!(p1.iter().enumerate().filter(|(i, &v)| *i == v).count() < 10);
    }

    #[test]
    fn in_order_batches_keep_the_partial_tail() {
        let s = split(10);
        let cfg = BatcherConfig::eval(4);
        let b = Batcher::new(&s, &cfg, None, &Device::Cpu).unwrap();
        assert_eq!(b.num_batches(), 3);
        assert_eq!(b.len(), 3);
        let all: Vec<Batch> = b.map(|r| r.unwrap()).collect();
        assert_eq!(
            all.iter().map(Batch::len).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert_eq!(all[0].images.dims(), &[4, 1, 28, 28]);
        assert_eq!(all[0].labels.dtype(), candle_core::DType::U32);
        assert_eq!(all[2].labels.to_vec1::<u32>().unwrap(), vec![8, 9]);
        assert_eq!(all[2].labels_u8, vec![8, 9]);
        assert_eq!(ids(&all[1]), vec![4, 5, 6, 7]);
        // Pixels are exactly /255.
        let v = all[0]
            .images
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(v[784], 1.0 / 255.0);
        let dropped = Batcher::new(
            &s,
            &BatcherConfig {
                drop_last: true,
                ..cfg
            },
            None,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!((dropped.num_batches(), dropped.num_examples()), (2, 8));
        assert_eq!(dropped.count(), 2);
    }

    #[test]
    fn shuffled_epoch_visits_each_example_once_and_repeats_with_the_seed() {
        let s = split(103);
        let cfg = BatcherConfig {
            batch_size: 16,
            ..BatcherConfig::default()
        };
        let epoch = |e| {
            let mut rng = epoch_rng(9, 1, e);
            let b = Batcher::new(&s, &cfg, Some(&mut rng), &Device::Cpu).unwrap();
            let mut seen = Vec::new();
            for batch in b {
                let batch = batch.unwrap();
                let id = ids(&batch);
                // Labels travel with their images.
                let labels: Vec<u8> = id.iter().map(|&i| (i % 10) as u8).collect();
                assert_eq!(batch.labels_u8, labels);
                seen.extend(id);
            }
            seen
        };
        let a = epoch(0);
        assert_eq!(a, epoch(0));
        assert_ne!(a, epoch(1));
        assert_ne!(a, (0..103).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..103).collect::<Vec<_>>());
    }

    #[test]
    fn augmented_batches_are_deterministic_and_differ_from_plain() {
        let s = split(20);
        let cfg = BatcherConfig {
            batch_size: 8,
            shuffle: false,
            augment: Some(AugmentConfig {
                max_rotation_deg: 10.0,
                max_shift_px: 2.0,
                scale_range: (0.9, 1.1),
                ..Default::default()
            }),
            drop_last: false,
        };
        let run = |seed| {
            let mut rng = epoch_rng(seed, 2, 0);
            let b = Batcher::new(&s, &cfg, Some(&mut rng), &Device::Cpu).unwrap();
            b.map(|r| {
                r.unwrap()
                    .images
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
            .concat()
        };
        let a = run(5);
        assert_eq!(a, run(5));
        assert_ne!(a, run(6));
        let plain: Vec<f32> = s.images().iter().map(|&p| p as f32 / 255.0).collect();
        assert_eq!(a.len(), plain.len());
        assert_ne!(a, plain);
    }

    #[test]
    fn config_errors() {
        let s = split(3);
        let dev = Device::Cpu;
        let zero = BatcherConfig {
            batch_size: 0,
            ..BatcherConfig::eval(1)
        };
        assert!(matches!(
            Batcher::new(&s, &zero, None, &dev),
            Err(DataError::Config(_))
        ));
        let shuffled = BatcherConfig::default();
        assert!(matches!(
            Batcher::new(&s, &shuffled, None, &dev),
            Err(DataError::Config(_))
        ));
        let bad_aug = BatcherConfig {
            augment: Some(AugmentConfig {
                scale_range: (2.0, 1.0),
                ..Default::default()
            }),
            ..BatcherConfig::eval(2)
        };
        let mut rng = epoch_rng(0, 0, 0);
        assert!(matches!(
            Batcher::new(&s, &bad_aug, Some(&mut rng), &dev),
            Err(DataError::Config(_))
        ));
        // An identity augmentation needs no rng.
        let id_aug = BatcherConfig {
            augment: Some(AugmentConfig::default()),
            ..BatcherConfig::eval(2)
        };
        assert_eq!(Batcher::new(&s, &id_aug, None, &dev).unwrap().count(), 2);
        // Empty split: no batches.
        let empty = Split::default();
        assert_eq!(
            Batcher::new(&empty, &BatcherConfig::eval(4), None, &dev)
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn to_tensor_checks_length() {
        let t = to_tensor(&[255; 784 * 2], 2, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 1, 28, 28]);
        assert_eq!(t.max_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
        assert!(to_tensor(&[0; 700], 1, &Device::Cpu).is_err());
        let l = labels_to_tensor(&[3, 4], &Device::Cpu).unwrap();
        assert_eq!(l.to_vec1::<u32>().unwrap(), vec![3, 4]);
    }

    /// Erasing, mixing and the stroke thickness draw from rngs of their own: the shuffle and the warps of
    /// an epoch stay those of the same seed without them, so a candidate with any is paired image for
    /// image.
    #[test]
    fn erasing_mixing_and_thickness_keep_the_shuffle_and_the_warps_of_the_seed() {
        // Images with structure, so warps and erasing show.
        let n = 40;
        let images: Vec<u8> = (0..n * 784)
            .map(|k| ((k * 37 + k / 784 * 11) % 256) as u8)
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let s = Split::from_parts(images, labels).unwrap();
        let warp = AugmentConfig {
            max_rotation_deg: 10.0,
            max_shift_px: 2.0,
            ..AugmentConfig::default()
        };
        let epoch = |aug: AugmentConfig| -> Vec<Batch> {
            let cfg = BatcherConfig {
                batch_size: 16,
                augment: Some(aug),
                ..BatcherConfig::default()
            };
            let mut rng = epoch_rng(7, 1, 0);
            Batcher::new(&s, &cfg, Some(&mut rng), &Device::Cpu)
                .unwrap()
                .map(|b| b.unwrap())
                .collect()
        };
        let pixels = |b: &Batch| b.images.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
        let base = epoch(warp);
        assert!(base
            .iter()
            .all(|b| b.mix.is_none() && b.partner_labels().unwrap().is_none()));

        // Each image of `got` against the same image of the base epoch (same shuffle): `check` of
        // (image, warped image); how many images changed.
        let changed_images = |got: &[Batch], check: &dyn Fn(&[f32], &[f32])| -> usize {
            let mut changed = 0;
            for (g, b) in got.iter().zip(&base) {
                assert_eq!(g.labels_u8, b.labels_u8, "same shuffle");
                for (img, want) in pixels(g).iter().zip(pixels(b)) {
                    check(img, &want);
                    changed += (img != &want) as usize;
                }
            }
            changed
        };

        let erased = epoch(AugmentConfig {
            erase: Some(crate::EraseConfig::new(1.0)),
            ..warp
        });
        let changed = changed_images(&erased, &|img, want| {
            // Every pixel is the warped one or erased to 0.
            assert!(img.iter().zip(want).all(|(&v, &w)| v == w || v == 0.0));
        });
        assert!(changed > n / 2, "{changed} of {n} images erased");

        let thick = epoch(AugmentConfig {
            thickness: Some(crate::ThicknessConfig::new(1.0)),
            ..warp
        });
        let changed = changed_images(&thick, &|img, want| {
            // Every pixel lies between the warped image's erosion and its dilation.
            let (mut lo, mut hi) = (want.to_vec(), want.to_vec());
            crate::thicken(&mut lo, -1.0);
            crate::thicken(&mut hi, 1.0);
            for ((&v, &l), &h) in img.iter().zip(&lo).zip(&hi) {
                assert!(l - 1e-6 <= v && v <= h + 1e-6, "{l} <= {v} <= {h}");
            }
        });
        assert!(
            changed > n / 2,
            "{changed} of {n} images thickened or thinned"
        );

        let mixed = epoch(AugmentConfig {
            mix: Some(crate::MixConfig {
                kind: crate::MixKind::Mixup,
                alpha: 0.4,
            }),
            ..warp
        });
        for (m, b) in mixed.iter().zip(&base) {
            assert_eq!(m.labels_u8, b.labels_u8, "same shuffle");
            let mix = m.mix.as_ref().expect("mixed");
            let partner_labels = m
                .partner_labels()
                .unwrap()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            let majority: Vec<u32> = m.majority_labels().iter().map(|&l| l as u32).collect();
            let own: Vec<u32> = m.labels_u8.iter().map(|&l| l as u32).collect();
            assert_eq!(
                majority,
                if mix.lam < 0.5 {
                    partner_labels.clone()
                } else {
                    own
                }
            );
            let (got, want) = (pixels(m), pixels(b));
            for (i, img) in got.iter().enumerate() {
                let j = mix.partner[i];
                assert_eq!(partner_labels[i], b.labels_u8[j] as u32);
                for ((&v, &x), &y) in img.iter().zip(&want[i]).zip(&want[j]) {
                    assert_eq!(
                        v,
                        mix.lam * x + (1.0 - mix.lam) * y,
                        "the warped images, blended"
                    );
                }
            }
        }
    }

    /// A producer whose items need rayon loops, consumed on the only worker of a one-thread pool (as a
    /// distillation teacher's forward pass is, in a training run with one thread): the consumer must
    /// lend its worker to the producer's loops, or both wait for each other for ever.
    #[test]
    fn a_producer_using_the_pool_finishes_on_a_pool_of_one_thread() {
        use rayon::prelude::*;
        // The producer's loops go to the consumer's pool, as the global pool's loops do in a run.
        let pool = std::sync::Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap(),
        );
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let producer_pool = pool.clone();
            let sums = pool.install(|| {
                let produced = (0..20u64).map(move |i| {
                    producer_pool.install(|| (0..10_000u64).into_par_iter().map(|x| x * i).sum())
                });
                let mut got: Vec<u64> = Vec::new();
                with_prefetch(produced, 2, |s| {
                    got.push(s);
                    Ok::<(), ()>(())
                })
                .unwrap();
                got
            });
            done_tx.send(sums).unwrap();
        });
        let sums = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("with_prefetch deadlocked on a one-thread pool");
        let want: Vec<u64> = (0..20u64)
            .map(|i| i * (0..10_000u64).sum::<u64>())
            .collect();
        assert_eq!(sums, want, "every item, in order");
    }
}

//! Pictures of a finished run: learning curves (`curves.png`), the test confusion matrix (`confusion.png`)
//! and some misclassified test images (`mistakes.png`).
//!
//! Drawn with plotters into an in-memory RGB buffer (the bundled DejaVu Sans subset is the only font: no
//! system fonts or fontconfig are needed), encoded as PNG with `image`, and written atomically. Plotting is
//! a by-product: [`write_run_plots`] returns its failures for the caller to log, it never fails a run.

use std::error::Error as StdError;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mnist_data::{Dataset, Split, IMAGE_SIDE, NUM_CLASSES};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{write_bytes_atomic, EpochRecord, Evaluation, TrainError};

/// Learning curves: loss and accuracy per epoch, training and validation.
pub const CURVES_FILE: &str = "curves.png";
/// The test confusion matrix.
pub const CONFUSION_FILE: &str = "confusion.png";
/// Misclassified test images with their true and predicted labels.
pub const MISTAKES_FILE: &str = "mistakes.png";
/// How many misclassified images `mistakes.png` shows at most.
pub const MAX_MISTAKES: usize = 24;

/// The font family the bundled font is registered under.
pub(crate) const FONT: &str = "sans-serif";
/// DejaVu Sans, subset to printable ASCII (licence: `assets/FONT-LICENSE.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");

/// The names of Fashion-MNIST's ten classes, in label order.
pub const FASHION_CLASSES: [&str; NUM_CLASSES] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The label names of a data set: the digits for MNIST, [`FASHION_CLASSES`] for Fashion-MNIST.
pub fn class_names(dataset: Dataset) -> [&'static str; NUM_CLASSES] {
    match dataset {
        Dataset::Mnist => ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
        Dataset::Fashion => FASHION_CLASSES,
    }
}

/// Why a picture could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Drawing failed (plotters' error).
    #[error("drawing {file}: {reason}")]
    Draw {
        /// The picture's file name.
        file: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The input cannot be drawn (e.g. no epochs, mismatched lengths).
    #[error("drawing {file}: {reason}")]
    Input {
        /// The picture's file name.
        file: &'static str,
        /// What is wrong with the input.
        reason: String,
    },
    /// PNG encoding failed.
    #[error("encoding {file} as PNG: {reason}")]
    Encode {
        /// The picture's file name.
        file: &'static str,
        /// The encoder's message.
        reason: String,
    },
    /// Writing the file failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<TrainError>,
    },
}

type DrawResult = Result<(), Box<dyn StdError>>;

/// One panel of the learning curves: title, y-axis name, y range, and the (train, validation) values.
type Panel = (
    &'static str,
    &'static str,
    std::ops::Range<f64>,
    fn(&EpochRecord) -> (f64, f64),
);

fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
                .map_err(|_| "the bundled font could not be loaded".to_string())
        })
        .clone()
}

/// Draws into a white `w` x `h` RGB canvas with `draw` and returns it encoded as PNG.
pub(crate) fn render(
    file: &'static str,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
) -> Result<Vec<u8>, PlotError> {
    ensure_font().map_err(|reason| PlotError::Draw { file, reason })?;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let backend = BitMapBackend::with_buffer_and_format(&mut buf, (w, h)).map_err(|e| {
            PlotError::Draw {
                file,
                reason: e.to_string(),
            }
        })?;
        let root = backend.into_drawing_area();
        let drawn: DrawResult = root
            .fill(&WHITE)
            .map_err(|e| e.into())
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(|e| e.into()));
        drawn.map_err(|e| PlotError::Draw {
            file,
            reason: e.to_string(),
        })?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| PlotError::Encode {
        file,
        reason: format!("buffer is not {w}x{h} RGB"),
    })?;
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| PlotError::Encode {
            file,
            reason: e.to_string(),
        })?;
    Ok(png)
}

/// `curves.png` (1000x420): loss (left) and accuracy (right) per epoch, training and validation.
pub fn curves_png(history: &[EpochRecord]) -> Result<Vec<u8>, PlotError> {
    let file = CURVES_FILE;
    if history.is_empty() {
        return Err(PlotError::Input {
            file,
            reason: "no epochs to plot".into(),
        });
    }
    let n = history.len() as i32;
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let max_loss = history
        .iter()
        .flat_map(|r| [finite(r.loss), finite(r.val_loss)])
        .fold(0.0, f64::max);
    let max_loss = if max_loss > 0.0 { max_loss * 1.1 } else { 1.0 };
    let min_acc = history
        .iter()
        .flat_map(|r| [finite(r.accuracy), finite(r.val_accuracy)])
        .fold(1.0, f64::min);
    let low_acc = (min_acc - 0.02).clamp(0.0, 0.98);
    let panels: [Panel; 2] = [
        ("Loss (cross-entropy)", "loss", 0.0..max_loss, |r| {
            (r.loss, r.val_loss)
        }),
        ("Accuracy", "accuracy", low_acc..1.0, |r| {
            (r.accuracy, r.val_accuracy)
        }),
    ];
    render(file, (1000, 420), |root| {
        let halves = root.split_evenly((1, 2));
        for (area, (title, y_desc, y_range, pick)) in halves.iter().zip(panels) {
            let mut chart = ChartBuilder::on(area)
                .caption(title, (FONT, 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0..n + 1, y_range)?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(y_desc)
                .x_labels(((n + 2) as usize).min(12))
                .x_label_formatter(&|x| {
                    if *x >= 1 && *x <= n {
                        x.to_string()
                    } else {
                        String::new()
                    }
                })
                .label_style((FONT, 13))
                .draw()?;
            let blue = RGBColor(31, 119, 180);
            let orange = RGBColor(255, 127, 14);
            for (name, colour, val) in [("train", blue, false), ("validation", orange, true)] {
                let points: Vec<(i32, f64)> = history
                    .iter()
                    .map(|r| {
                        let (t, v) = pick(r);
                        (r.epoch as i32, finite(if val { v } else { t }))
                    })
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::MiddleRight)
                .label_font((FONT, 14))
                .border_style(BLACK)
                .background_style(WHITE.mix(0.85))
                .draw()?;
        }
        Ok(())
    })
}

/// `confusion.png`: the confusion matrix `counts` (rows: true class, columns: predicted), each cell
/// shaded by its share of the row and labelled with its count. `names` label the classes.
pub fn confusion_png(counts: &[Vec<u64>], names: &[&str]) -> Result<Vec<u8>, PlotError> {
    let file = CONFUSION_FILE;
    let k = counts.len();
    if k == 0 || counts.iter().any(|row| row.len() != k) || names.len() != k {
        return Err(PlotError::Input {
            file,
            reason: format!(
                "expected a square matrix with one name per class, got {k} rows of lengths {:?} and {} names",
                counts.iter().map(Vec::len).collect::<Vec<_>>(),
                names.len()
            ),
        });
    }
    let cell = 48i32;
    let named = names.iter().any(|n| n.len() > 2);
    let left = if named { 130 } else { 80 };
    let top = 70i32;
    let bottom = if named { 120 } else { 60 };
    let w = left + cell * k as i32 + 30;
    let h = top + cell * k as i32 + bottom;
    let total: u64 = counts.iter().flatten().sum();
    let diag: u64 = (0..k).map(|i| counts[i][i]).sum();
    render(file, (w as u32, h as u32), |root| {
        let centre = |size: i32| {
            (FONT, size)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Center))
        };
        let title = format!(
            "Test confusion matrix: accuracy {:.2}% of {total}",
            if total > 0 {
                100.0 * diag as f64 / total as f64
            } else {
                0.0
            }
        );
        root.draw(&Text::new(title, (w / 2, 20), centre(18)))?;
        root.draw(&Text::new(
            "predicted",
            (left + cell * k as i32 / 2, 48),
            centre(15),
        ))?;
        let rotated = (FONT, 15)
            .into_font()
            .transform(FontTransform::Rotate270)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new("true", (14, top + cell * k as i32 / 2), rotated))?;
        for (i, row) in counts.iter().enumerate() {
            let support: u64 = row.iter().sum();
            let y = top + cell * i as i32;
            let row_label = if named {
                format!("{i} {}", names[i])
            } else {
                names[i].to_string()
            };
            let right = (FONT, 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Right, VPos::Center));
            root.draw(&Text::new(row_label, (left - 8, y + cell / 2), right))?;
            for (j, &c) in row.iter().enumerate() {
                let x = left + cell * j as i32;
                let share = if support > 0 {
                    c as f64 / support as f64
                } else {
                    0.0
                };
                let shade = |full: u8| (255.0 - share * (255.0 - full as f64)).round() as u8;
                let fill = RGBColor(shade(8), shade(48), shade(107));
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    fill.filled(),
                ))?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    RGBColor(200, 200, 200),
                ))?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                let style = (FONT, 12)
                    .into_font()
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                root.draw(&Text::new(
                    c.to_string(),
                    (x + cell / 2, y + cell / 2),
                    style,
                ))?;
            }
        }
        for j in 0..k {
            let x = left + cell * j as i32 + cell / 2;
            root.draw(&Text::new(j.to_string(), (x, top - 10), centre(13)))?;
        }
        if named {
            root.draw(&Text::new(
                "columns: class numbers as in the rows",
                (left + cell * k as i32 / 2, top + cell * k as i32 + 24),
                centre(13),
            ))?;
        }
        Ok(())
    })
}

/// `mistakes.png`: up to `max` misclassified images of `split` (in order), each with its true and predicted
/// label (`names`). `predictions` holds the predicted class of every image of `split`.
pub fn mistakes_png(
    split: &Split,
    predictions: &[u8],
    names: &[&str],
    max: usize,
) -> Result<Vec<u8>, PlotError> {
    let file = MISTAKES_FILE;
    if predictions.len() != split.len() {
        return Err(PlotError::Input {
            file,
            reason: format!(
                "{} predictions for {} images",
                predictions.len(),
                split.len()
            ),
        });
    }
    let name = |c: u8| {
        names
            .get(c as usize)
            .map(|s| s.to_string())
            .unwrap_or_else(|| c.to_string())
    };
    let wrong: Vec<usize> = (0..split.len())
        .filter(|&i| predictions[i] != split.label(i))
        .take(max)
        .collect();
    let cols = 6i32;
    let rows = (wrong.len() as i32 + cols - 1).div_euclid(cols).max(1);
    let scale = 4i32;
    let side = IMAGE_SIDE as i32 * scale;
    let (cell_w, cell_h) = (side + 24, side + 46);
    let (w, h) = (cols * cell_w + 20, rows * cell_h + 50);
    let count = (0..split.len())
        .filter(|&i| predictions[i] != split.label(i))
        .count();
    render(file, (w as u32, h as u32), |root| {
        let centre = |size: i32, colour: RGBColor| {
            (FONT, size)
                .into_font()
                .color(&colour)
                .pos(Pos::new(HPos::Center, VPos::Center))
        };
        let title = format!(
            "Misclassified test images: {} shown of {count} (of {})",
            wrong.len(),
            split.len()
        );
        root.draw(&Text::new(title, (w / 2, 22), centre(18, BLACK)))?;
        if wrong.is_empty() {
            root.draw(&Text::new(
                "none: every test image is classified correctly",
                (w / 2, h / 2),
                centre(15, BLACK),
            ))?;
        }
        for (slot, &i) in wrong.iter().enumerate() {
            let (r, c) = (slot as i32 / cols, slot as i32 % cols);
            let (x0, y0) = (10 + c * cell_w + 12, 45 + r * cell_h);
            // Dark ink on white, like a printed page.
            for (p, &v) in split.image(i).iter().enumerate() {
                if v == 0 {
                    continue;
                }
                let (px, py) = ((p % IMAGE_SIDE) as i32, (p / IMAGE_SIDE) as i32);
                let g = 255 - v;
                let (x, y) = (x0 + px * scale, y0 + py * scale);
                root.draw(&Rectangle::new(
                    [(x, y), (x + scale, y + scale)],
                    RGBColor(g, g, g).filled(),
                ))?;
            }
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + side, y0 + side)],
                RGBColor(180, 180, 180),
            ))?;
            let label_y = y0 + side + 12;
            root.draw(&Text::new(
                format!("true {}", name(split.label(i))),
                (x0 + side / 2, label_y),
                centre(13, BLACK),
            ))?;
            root.draw(&Text::new(
                format!("pred {}", name(predictions[i])),
                (x0 + side / 2, label_y + 17),
                centre(13, RGBColor(200, 30, 30)),
            ))?;
        }
        Ok(())
    })
}

/// Writes the picture `png` (or returns its failure) as `dir/file`, atomically.
pub(crate) fn write_png(
    dir: &Path,
    file: &'static str,
    png: Result<Vec<u8>, PlotError>,
) -> Result<PathBuf, PlotError> {
    let path = dir.join(file);
    write_bytes_atomic(&path, &png?).map_err(|e| PlotError::Write {
        path: path.clone(),
        source: Box::new(e),
    })?;
    Ok(path)
}

/// Writes `curves.png` alone into the run folder `dir` (a run that never saw the test split).
pub fn write_curves(dir: &Path, history: &[EpochRecord]) -> Result<PathBuf, PlotError> {
    write_png(dir, CURVES_FILE, curves_png(history))
}

/// Writes `curves.png`, `confusion.png` and `mistakes.png` into the run folder `dir`: each is attempted even
/// when another failed. Returns the files written and the failures (for the caller to log; a run does not
/// fail for a picture).
pub fn write_run_plots(
    dir: &Path,
    history: &[EpochRecord],
    test: &Split,
    evaluation: &Evaluation,
    dataset: Dataset,
) -> (Vec<PathBuf>, Vec<PlotError>) {
    let names = class_names(dataset);
    let results = [
        write_png(dir, CURVES_FILE, curves_png(history)),
        write_png(
            dir,
            CONFUSION_FILE,
            confusion_png(evaluation.confusion.counts(), &names),
        ),
        write_png(
            dir,
            MISTAKES_FILE,
            mistakes_png(test, &evaluation.predictions, &names, MAX_MISTAKES),
        ),
    ];
    let mut written = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(p) => written.push(p),
            Err(e) => failed.push(e),
        }
    }
    (written, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: usize, loss: f64, acc: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            lr: 1e-3,
            loss,
            accuracy: acc,
            val_loss: loss * 0.9,
            val_accuracy: acc + 0.01,
            seconds: 1.0,
        }
    }

    fn decode(png: &[u8]) -> image::DynamicImage {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        image::load_from_memory_with_format(png, image::ImageFormat::Png).unwrap()
    }

    /// Pixels that are neither white nor grey: coloured ink was drawn.
    fn coloured_pixels(img: &image::DynamicImage) -> usize {
        img.to_rgb8()
            .pixels()
            .filter(|p| {
                let [r, g, b] = p.0;
                r.max(g).max(b) - r.min(g).min(b) > 40
            })
            .count()
    }

    #[test]
    fn curves_are_a_png_with_both_series() {
        let h: Vec<_> = (1..=5)
            .map(|e| record(e, 1.0 / e as f64, 0.8 + 0.03 * e as f64))
            .collect();
        let img = decode(&curves_png(&h).unwrap());
        assert_eq!((img.width(), img.height()), (1000, 420));
        assert!(coloured_pixels(&img) > 500, "the curves were not drawn");
        // One epoch (a single point per series) still draws.
        let img = decode(&curves_png(&h[..1]).unwrap());
        assert!(coloured_pixels(&img) > 20);
        assert!(matches!(curves_png(&[]), Err(PlotError::Input { .. })));
    }

    #[test]
    fn confusion_shades_the_diagonal() {
        let mut counts = vec![vec![0u64; 10]; 10];
        for (i, row) in counts.iter_mut().enumerate() {
            row[i] = 95;
            row[(i + 1) % 10] = 5;
        }
        let names = class_names(Dataset::Mnist);
        let img = decode(&confusion_png(&counts, &names).unwrap()).to_rgb8();
        // Cell (0, 0) is dark blue, cell (0, 5) white (centre pixels may carry text: sample a corner).
        let (left, top, cell) = (80u32, 70u32, 48u32);
        let dark = img.get_pixel(left + 3, top + 3).0;
        let blank = img.get_pixel(left + 5 * cell + 3, top + 3).0;
        assert!(dark[2] > dark[0] + 50, "diagonal cell not blue: {dark:?}");
        assert_eq!(blank, [255, 255, 255]);
        let fashion = confusion_png(&counts, &class_names(Dataset::Fashion)).unwrap();
        assert!(decode(&fashion).width() > img.width());
        assert!(matches!(
            confusion_png(&counts[..3], &names),
            Err(PlotError::Input { .. })
        ));
    }

    #[test]
    fn mistakes_show_only_wrong_images() {
        let images = vec![200u8; 784 * 3];
        let split = Split::from_parts(images, vec![1, 2, 3]).unwrap();
        let names = class_names(Dataset::Mnist);
        let png = mistakes_png(&split, &[1, 7, 3], &names, MAX_MISTAKES).unwrap();
        let img = decode(&png).to_rgb8();
        // The first slot holds the wrong image (a uniform 200 block, drawn as grey 55).
        assert_eq!(img.get_pixel(10 + 12 + 50, 45 + 50).0, [55, 55, 55]);
        // The second slot is empty.
        let (cell_w, x0) = (112 + 24, 10 + 12);
        assert_eq!(img.get_pixel(x0 + cell_w + 50, 45 + 50).0, [255, 255, 255]);
        assert!(mistakes_png(&split, &[1, 2], &names, 4).is_err());
        // No mistakes still gives a picture.
        decode(&mistakes_png(&split, &[1, 2, 3], &names, 4).unwrap());
    }

    #[test]
    fn a_folder_in_the_way_is_a_write_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(CURVES_FILE)).unwrap();
        let h = vec![record(1, 0.5, 0.9)];
        let err = write_png(dir.path(), CURVES_FILE, curves_png(&h)).unwrap_err();
        assert!(matches!(err, PlotError::Write { .. }), "{err}");
        assert!(err.to_string().contains(CURVES_FILE), "{err}");
    }
}

//! Every shipped model, evaluated on the 10,000 real MNIST test images, gets exactly the accuracy its
//! `pretrained/<solution>-<variant>.json` records (and the crate docs list).

mod common;

use mnist_models::{pretrained, pretrained_info, Solution, Variant};

#[test]
fn every_shipped_model_scores_what_it_records() {
    let Some(data) = common::mnist() else {
        return;
    };
    let images: Vec<Vec<u8>> = (0..data.test.len())
        .map(|i| data.test.image(i).to_vec())
        .collect();
    let docs = include_str!("../src/lib.rs");
    let readme = include_str!("../../../README.md");
    for s in Solution::ALL {
        for v in Variant::ALL {
            let info = pretrained_info(s, v);
            let model = pretrained(s, v).unwrap();
            let predictions = model.predict(&images).unwrap();
            let correct = predictions
                .iter()
                .enumerate()
                .filter(|(i, p)| p.digit == data.test.label(*i))
                .count();
            assert_eq!(info.test_images, images.len(), "{s}-{v}");
            assert_eq!(correct, info.test_correct, "{s}-{v}: {correct} right");
            let row = format!(
                "| {s}-{v} | {} | {:.2}% | {} |",
                mnist_models::thousands(info.params),
                100.0 * info.test_accuracy(),
                info.seed
            );
            assert!(docs.contains(&row), "the crate docs lack the row `{row}`");
            let readme_row = format!(
                "| {s} {v} | {} | {:.2}% |",
                mnist_models::thousands(info.params),
                100.0 * info.test_accuracy()
            );
            assert!(
                readme.contains(&readme_row),
                "README.md lacks the row `{readme_row}`"
            );
        }
    }
}

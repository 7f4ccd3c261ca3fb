//! Classifies pictures of digits (PNG or JPEG, any size) with a shipped pretrained model; a program that
//! depends on `mnist-models` alone.
//!
//! `cargo run --release -p mnist-models --example classify -- digit.png [more.png ...]`

use mnist_models::{pretrained, Solution, Variant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = pretrained(Solution::Conv, Variant::Improved)?;
    for path in std::env::args().skip(1) {
        let p = model.classify_file(path.as_ref())?;
        let confidence = 100.0 * p.probabilities[p.digit as usize];
        println!("{path}: {} ({confidence:.1}%)", p.digit);
    }
    Ok(())
}

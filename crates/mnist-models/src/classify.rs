//! A trained model ready to classify digits: [`Classifier`] (a built [`Net`], its weights and the
//! [`ModelConfig`] it was built from), in inference mode only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use mnist_data::{to_tensor, IMAGE_PIXELS};
use mnist_layers::init::SeededVarMap;
use mnist_metrics::{argmax_rows, softmax_rows};
use serde::Serialize;

use crate::{dropout_rng, ModelConfig, ModelError, Net};

/// Images per forward pass when classifying many at once.
pub const INFER_BATCH: usize = 1_000;

/// The classification of one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The most probable class.
    pub digit: u8,
    /// Softmax probability of each class, in class order.
    pub probabilities: Vec<f32>,
}

impl Prediction {
    /// The `k` most probable classes, most probable first, with their probabilities.
    pub fn top(&self, k: usize) -> Vec<(u8, f32)> {
        let mut ranked: Vec<(u8, f32)> = self
            .probabilities
            .iter()
            .enumerate()
            .map(|(c, &p)| (c as u8, p))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked.truncate(k);
        ranked
    }
}

/// A trained model that classifies 28x28 images (784 grey levels each, light ink on black, as MNIST and
/// [`mnist_data::to_mnist`] give them).
///
/// ```no_run
/// use mnist_models::{pretrained, Solution, Variant};
/// let model = pretrained(Solution::Conv, Variant::Improved)?;
/// let p = model.classify_file("digit.png".as_ref())?;
/// println!("{} ({:.1}%)", p.digit, 100.0 * p.probabilities[p.digit as usize]);
/// # Ok::<(), mnist_models::ModelError>(())
/// ```
pub struct Classifier {
    config: ModelConfig,
    net: Net,
    vars: VarMap,
    device: Device,
}

impl Classifier {
    /// Builds the model of `config` and loads the weights file `weights` (safetensors, as training writes
    /// `model.safetensors`) into it.
    pub fn load(config: ModelConfig, weights: &Path, device: &Device) -> Result<Self, ModelError> {
        let err = weights_error(weights);
        if !weights.is_file() {
            return Err(err("no such file".into()));
        }
        let bytes = std::fs::read(weights).map_err(|e| err(e.to_string()))?;
        Self::from_bytes(config, &bytes, device, weights)
    }

    /// [`Classifier::load`] from the bytes of a safetensors file; errors name the source as `origin`.
    pub fn from_safetensors(
        config: ModelConfig,
        bytes: &[u8],
        origin: &Path,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::from_bytes(config, bytes, device, origin)
    }

    fn from_bytes(
        config: ModelConfig,
        bytes: &[u8],
        device: &Device,
        origin: &Path,
    ) -> Result<Self, ModelError> {
        let vars = SeededVarMap::new(0);
        let net = config.build(vars.var_builder(DType::F32, device), dropout_rng(0))?;
        let map = vars.var_map().clone();
        let tensors = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| weights_error(origin)(format!("not a readable safetensors file: {e}")))?;
        assign(&map, &tensors, origin)?;
        Ok(Self {
            config,
            net,
            vars: map,
            device: device.clone(),
        })
    }

    /// What the model is.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The weights, by the names [`crate::build`] gives them.
    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the model on `images` (784 grey levels each) in batches of [`INFER_BATCH`], in inference
    /// mode, handing each batch's logits `[n, 10]` to `f`.
    fn forward_batches(
        &self,
        images: &[Vec<u8>],
        mut f: impl FnMut(&Tensor) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        if let Some((i, img)) = images
            .iter()
            .enumerate()
            .find(|(_, im)| im.len() != IMAGE_PIXELS)
        {
            return Err(ModelError::Input(format!(
                "image #{i} has {} pixels, expected {IMAGE_PIXELS} (28x28)",
                img.len()
            )));
        }
        for chunk in images.chunks(INFER_BATCH) {
            let flat: Vec<u8> = chunk.concat();
            let xs = to_tensor(&flat, chunk.len(), &self.device)
                .map_err(|e| ModelError::Input(e.to_string()))?; // [n, 1, 28, 28]
            f(&self.net.forward_t(&xs, false)?)?; // [n, 10]
        }
        Ok(())
    }

    /// The logits (10 each) of `images` (784 grey levels each), in inference mode.
    pub fn logits(&self, images: &[Vec<u8>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(images.len());
        self.forward_batches(images, |logits| {
            out.extend(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Classifies each image (784 grey levels each), in inference mode.
    pub fn predict(&self, images: &[Vec<u8>]) -> Result<Vec<Prediction>, ModelError> {
        let mut out = Vec::with_capacity(images.len());
        self.forward_batches(images, |logits| {
            let digits = argmax_rows(logits)?;
            let probs = softmax_rows(logits)?;
            out.extend(
                digits
                    .into_iter()
                    .zip(probs)
                    .map(|(digit, probabilities)| Prediction {
                        digit,
                        probabilities,
                    }),
            );
            Ok(())
        })?;
        Ok(out)
    }

    /// Reads a PNG or JPEG picture of one digit, brings it into MNIST's form
    /// ([`mnist_data::load_mnist_image`]) and classifies it.
    pub fn classify_file(&self, path: &Path) -> Result<Prediction, ModelError> {
        let image = mnist_data::load_mnist_image(path)?;
        self.one(image)
    }

    /// [`Classifier::classify_file`] for the bytes of a PNG or JPEG file.
    pub fn classify_bytes(&self, bytes: &[u8]) -> Result<Prediction, ModelError> {
        let image = mnist_data::decode_mnist_image(bytes)?;
        self.one(image)
    }

    fn one(&self, image: Vec<u8>) -> Result<Prediction, ModelError> {
        self.predict(&[image])?
            .pop()
            .ok_or_else(|| ModelError::Input("no prediction for one image".into()))
    }
}

fn weights_error(path: &Path) -> impl Fn(String) -> ModelError + '_ {
    move |reason| ModelError::Weights {
        path: path.to_path_buf(),
        reason,
    }
}

/// Sets every variable of `vars` from `tensors`: each must be present with its shape and hold finite
/// values only (a NaN or infinity is refused, naming the tensor). Variables are visited by name, so the
/// first problem reported does not depend on hash order.
fn assign(
    vars: &VarMap,
    tensors: &HashMap<String, Tensor>,
    origin: &Path,
) -> Result<(), ModelError> {
    let err = weights_error(origin);
    let data = vars
        .data()
        .lock()
        .map_err(|_| err("variable map lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let Some(t) = tensors.get(name) else {
            return Err(err(format!(
                "no tensor '{name}' (is it a weights file of this solution and variant?)"
            )));
        };
        if t.dims() != var.dims() {
            return Err(err(format!(
                "tensor '{name}' has shape {:?}, the model needs {:?} (is it a weights file of this \
                 solution and variant?)",
                t.dims(),
                var.dims()
            )));
        }
        let t = t.to_dtype(DType::F32)?;
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(err(format!(
                "tensor '{name}' holds {v}: the weights are broken (a diverged run?)"
            )));
        }
        var.set(&t)?;
    }
    Ok(())
}

/// Where a weights file came from, for errors about shipped weights.
pub(crate) fn shipped_origin(name: &str) -> PathBuf {
    PathBuf::from(format!("<shipped {name}>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_ranks_by_probability() {
        let p = Prediction {
            digit: 3,
            probabilities: vec![0.1, 0.0, 0.2, 0.6, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],
        };
        assert_eq!(p.top(2), vec![(3, 0.6), (2, 0.2)]);
    }
}

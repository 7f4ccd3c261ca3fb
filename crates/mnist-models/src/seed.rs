//! The three original architectures, layer for layer as in the Keras notebook
//! (see `shared/reference/seed-architectures.md`). Keras flattens NHWC, we flatten NCHW: the dense weights
//! are a permutation of Keras's, the model is the same.

use candle_core::Result;
use candle_nn::VarBuilder;
use mnist_layers::{
    batch_norm, conv2d, dropout, inception_module, linear, separable_conv2d, Activation,
    BatchNormConfig, BranchLayer, Conv2dConfig, InceptionConfig, Kernels, MaxPool2d,
    MaxPool2dConfig, Padding, SharedRng,
};

use crate::net::{Flatten, Stage};

fn conv_cfg(padding: Padding, stride: usize, kernels: Kernels) -> Conv2dConfig {
    Conv2dConfig {
        stride,
        padding,
        activation: Activation::Relu,
        bias: true,
        kernels,
    }
}

fn bn_cfg(kernels: Kernels) -> BatchNormConfig {
    BatchNormConfig {
        kernels,
        ..Default::default()
    }
}

fn pool(kernel: usize, stride: usize, padding: Padding, kernels: Kernels) -> MaxPool2d {
    MaxPool2d(MaxPool2dConfig {
        kernel,
        stride,
        padding,
        kernels,
    })
}

/// Solution 1: 8,640 params (8,580 trainable).
pub(crate) fn conv(vb: VarBuilder, rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    Ok(vec![
        // [b, 1, 28, 28] -> [b, 20, 28, 28]
        Stage::plain("conv1", "Conv2D", conv2d(1, 20, 7, conv_cfg(Padding::Same, 1, k), vb.pp("conv1"))?),
        Stage::train("bn1", "BatchNormalization", batch_norm(20, bn_cfg(k), vb.pp("bn1"))?),
        // -> [b, 20, 14, 14]
        Stage::plain("pool1", "MaxPooling2D", pool(2, 2, Padding::Valid, k)),
        // -> [b, 10, 10, 10]
        Stage::plain("conv2", "Conv2D", conv2d(20, 10, 5, conv_cfg(Padding::Valid, 1, k), vb.pp("conv2"))?),
        Stage::train("bn2", "BatchNormalization", batch_norm(10, bn_cfg(k), vb.pp("bn2"))?),
        // -> [b, 10, 5, 5]
        Stage::plain("pool2", "MaxPooling2D", pool(2, 2, Padding::Valid, k)),
        Stage::train("dropout", "Dropout", dropout(0.5, rng)),
        // -> [b, 250]
        Stage::plain("flatten", "Flatten", Flatten),
        // -> [b, 10]
        Stage::plain("dense", "Dense", linear(250, 10, vb.pp("dense"))?),
    ])
}

/// Solution 2: 4,967 params (4,879 trainable).
pub(crate) fn separable(vb: VarBuilder, rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    let c = conv_cfg(Padding::Valid, 1, k);
    Ok(vec![
        // [b, 1, 28, 28] -> [b, 28, 26, 26]
        Stage::plain("sepconv1", "SeparableConv2D", separable_conv2d(1, 28, 3, c, vb.pp("sepconv1"))?),
        Stage::train("bn1", "BatchNormalization", batch_norm(28, bn_cfg(k), vb.pp("bn1"))?),
        // -> [b, 28, 13, 13]
        Stage::plain("pool1", "MaxPooling2D", pool(2, 2, Padding::Valid, k)),
        // -> [b, 16, 11, 11]
        Stage::plain("sepconv2", "SeparableConv2D", separable_conv2d(28, 16, 3, c, vb.pp("sepconv2"))?),
        Stage::train("bn2", "BatchNormalization", batch_norm(16, bn_cfg(k), vb.pp("bn2"))?),
        // -> [b, 16, 5, 5]
        Stage::plain("pool2", "MaxPooling2D", pool(2, 2, Padding::Valid, k)),
        Stage::train("dropout", "Dropout", dropout(0.25, rng)),
        // -> [b, 400]
        Stage::plain("flatten", "Flatten", Flatten),
        // -> [b, 10]
        Stage::plain("dense", "Dense", linear(400, 10, vb.pp("dense"))?),
    ])
}

/// Solution 3: 3,077 params, no BatchNorm.
pub(crate) fn inception(vb: VarBuilder, rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    use BranchLayer::{Conv, Dropout, MaxPool, SepConv};
    let module = InceptionConfig {
        branches: vec![
            vec![SepConv { out: 2, k: 3 }, MaxPool { k: 2 }, Conv { out: 1, k: 1 }, Dropout(0.25)],
            vec![Conv { out: 2, k: 1 }, SepConv { out: 2, k: 5 }, Dropout(0.25)],
            vec![Conv { out: 2, k: 1 }, Dropout(0.25)],
            vec![Conv { out: 2, k: 1 }, SepConv { out: 2, k: 3 }, Dropout(0.25)],
        ],
        activation: Activation::Relu,
        batch_norm: bn_cfg(k),
        kernels: k,
    };
    Ok(vec![
        // [b, 1, 28, 28] -> [b, 7, 28, 28]
        Stage::train("inception", "Inception", inception_module(1, &module, vb.pp("inception"), rng.clone())?),
        // -> [b, 2, 13, 13]
        Stage::plain("sepconv", "SeparableConv2D", separable_conv2d(7, 2, 3, conv_cfg(Padding::Valid, 2, k), vb.pp("sepconv"))?),
        // -> [b, 2, 12, 12]
        Stage::plain("pool", "MaxPooling2D", pool(2, 1, Padding::Valid, k)),
        Stage::train("dropout", "Dropout", dropout(0.25, rng)),
        // -> [b, 288]
        Stage::plain("flatten", "Flatten", Flatten),
        // -> [b, 10]
        Stage::plain("dense", "Dense", linear(288, 10, vb.pp("dense"))?),
    ])
}

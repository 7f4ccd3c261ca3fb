//! The three original architectures, layer for layer as in the Keras notebook
//! (see `shared/reference/seed-architectures.md`). Keras flattens NHWC, we flatten NCHW: the dense weights
//! are a permutation of Keras's, the model is the same.

use candle_core::Result;
use candle_nn::VarBuilder;
use mnist_layers::{
    batch_norm, conv2d, conv_bn_pool, dropout, inception_module, linear, separable_bn_pool,
    separable_conv2d, Activation, BatchNormConfig, BranchLayer, Conv2dConfig, ConvBnPoolConfig,
    InceptionConfig, Kernels, MaxPool2d, MaxPool2dConfig, Padding, SharedRng,
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

fn pool_cfg(kernels: Kernels) -> MaxPool2dConfig {
    MaxPool2dConfig {
        kernel: 2,
        stride: 2,
        padding: Padding::Valid,
        kernels,
    }
}

/// `conv -> ReLU -> BatchNorm -> MaxPool 2x2` as one fused stage (fast kernels: one custom op in training),
/// or as three stages (reference kernels, and the Keras-style summary). The variables are the same.
#[allow(clippy::too_many_arguments)]
fn conv_block(
    stages: &mut Vec<Stage>,
    vb: &VarBuilder,
    names: [&str; 3],
    separable: bool,
    (c_in, c_out, ksize): (usize, usize, usize),
    conv: Conv2dConfig,
    k: Kernels,
) -> Result<()> {
    let [conv_name, bn_name, pool_name] = names;
    let conv_kind = if separable {
        "SeparableConv2D"
    } else {
        "Conv2D"
    };
    if k == Kernels::Auto {
        let cfg = ConvBnPoolConfig {
            conv,
            bn: bn_cfg(k),
            pool: Some(pool_cfg(k)),
        };
        let (vc, vn) = (vb.pp(conv_name), vb.pp(bn_name));
        let name = format!("{conv_name}+{bn_name}+{pool_name}");
        let kind = if separable {
            "SeparableConv2D+BN+MaxPool"
        } else {
            "Conv2D+BN+MaxPool"
        };
        let prefixes = [conv_name, bn_name];
        stages.push(if separable {
            let m = separable_bn_pool(c_in, c_out, ksize, cfg, vc, vn)?;
            Stage::fused(&name, kind, &prefixes, m)
        } else {
            let m = conv_bn_pool(c_in, c_out, ksize, cfg, vc, vn)?;
            Stage::fused(&name, kind, &prefixes, m)
        });
    } else {
        stages.push(if separable {
            Stage::plain(
                conv_name,
                conv_kind,
                separable_conv2d(c_in, c_out, ksize, conv, vb.pp(conv_name))?,
            )
        } else {
            Stage::plain(
                conv_name,
                conv_kind,
                conv2d(c_in, c_out, ksize, conv, vb.pp(conv_name))?,
            )
        });
        stages.push(Stage::train(
            bn_name,
            "BatchNormalization",
            batch_norm(c_out, bn_cfg(k), vb.pp(bn_name))?,
        ));
        stages.push(Stage::plain(
            pool_name,
            "MaxPooling2D",
            MaxPool2d(pool_cfg(k)),
        ));
    }
    Ok(())
}

/// Solution 1: 8,640 params (8,580 trainable).
pub(crate) fn conv(vb: VarBuilder, rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    let mut stages = Vec::new();
    // [b, 1, 28, 28] -> conv 7x7 same -> [b, 20, 28, 28] -> pool -> [b, 20, 14, 14]
    conv_block(
        &mut stages,
        &vb,
        ["conv1", "bn1", "pool1"],
        false,
        (1, 20, 7),
        conv_cfg(Padding::Same, 1, k),
        k,
    )?;
    // -> conv 5x5 valid -> [b, 10, 10, 10] -> pool -> [b, 10, 5, 5]
    conv_block(
        &mut stages,
        &vb,
        ["conv2", "bn2", "pool2"],
        false,
        (20, 10, 5),
        conv_cfg(Padding::Valid, 1, k),
        k,
    )?;
    stages.extend([
        Stage::train("dropout", "Dropout", dropout(0.5, rng)),
        // -> [b, 250]
        Stage::plain("flatten", "Flatten", Flatten),
        // -> [b, 10]
        Stage::plain("dense", "Dense", linear(250, 10, vb.pp("dense"))?),
    ]);
    Ok(stages)
}

/// Solution 2: 4,967 params (4,879 trainable).
pub(crate) fn separable(vb: VarBuilder, rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    let c = conv_cfg(Padding::Valid, 1, k);
    let mut stages = Vec::new();
    // [b, 1, 28, 28] -> sepconv 3x3 -> [b, 28, 26, 26] -> pool -> [b, 28, 13, 13]
    conv_block(
        &mut stages,
        &vb,
        ["sepconv1", "bn1", "pool1"],
        true,
        (1, 28, 3),
        c,
        k,
    )?;
    // -> sepconv 3x3 -> [b, 16, 11, 11] -> pool -> [b, 16, 5, 5]
    conv_block(
        &mut stages,
        &vb,
        ["sepconv2", "bn2", "pool2"],
        true,
        (28, 16, 3),
        c,
        k,
    )?;
    stages.extend([
        Stage::train("dropout", "Dropout", dropout(0.25, rng)),
        // -> [b, 400]
        Stage::plain("flatten", "Flatten", Flatten),
        // -> [b, 10]
        Stage::plain("dense", "Dense", linear(400, 10, vb.pp("dense"))?),
    ]);
    Ok(stages)
}

/// Solution 3: 3,077 params, no BatchNorm.
pub(crate) fn inception(vb: VarBuilder, rng: SharedRng, k: Kernels) -> Result<Vec<Stage>> {
    use BranchLayer::{Conv, Dropout, MaxPool, SepConv};
    let module = InceptionConfig {
        branches: vec![
            vec![
                SepConv { out: 2, k: 3 },
                MaxPool { k: 2 },
                Conv { out: 1, k: 1 },
                Dropout(0.25),
            ],
            vec![
                Conv { out: 2, k: 1 },
                SepConv { out: 2, k: 5 },
                Dropout(0.25),
            ],
            vec![Conv { out: 2, k: 1 }, Dropout(0.25)],
            vec![
                Conv { out: 2, k: 1 },
                SepConv { out: 2, k: 3 },
                Dropout(0.25),
            ],
        ],
        activation: Activation::Relu,
        batch_norm: bn_cfg(k),
        kernels: k,
    };
    Ok(vec![
        // [b, 1, 28, 28] -> [b, 7, 28, 28]
        Stage::train(
            "inception",
            "Inception",
            inception_module(1, &module, vb.pp("inception"), rng.clone())?,
        ),
        // -> [b, 2, 13, 13]
        Stage::plain(
            "sepconv",
            "SeparableConv2D",
            separable_conv2d(7, 2, 3, conv_cfg(Padding::Valid, 2, k), vb.pp("sepconv"))?,
        ),
        // -> [b, 2, 12, 12]
        Stage::plain("pool", "MaxPooling2D", pool(2, 1, Padding::Valid, k)),
        Stage::train("dropout", "Dropout", dropout(0.25, rng)),
        // -> [b, 288]
        Stage::plain("flatten", "Flatten", Flatten),
        // -> [b, 10]
        Stage::plain("dense", "Dense", linear(288, 10, vb.pp("dense"))?),
    ])
}

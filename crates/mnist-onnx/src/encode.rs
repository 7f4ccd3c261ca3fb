//! A [`Graph`] as an ONNX `ModelProto`, written with rust-protobuf through the ONNX message types of
//! the `onnx-protobuf` crate (generated from the official `onnx.proto`; no `protoc` needed).

use mnist_models::plan;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use protobuf::MessageField;

use crate::graph::{Attr, Graph, Initializer, Node};
use crate::{OnnxError, INPUT_NAME, OPSET, OUTPUT_NAME};

/// The IR version of opset 13 (ONNX 1.8).
const IR_VERSION: i64 = 7;

/// The free batch dimension of the input and output.
const BATCH: &str = "N";

/// What the file says about itself.
pub(crate) struct Meta {
    /// The graph's name.
    pub graph_name: String,
    /// The model's documentation.
    pub doc: String,
    /// Metadata key/value pairs.
    pub props: Vec<(String, String)>,
}

/// A float32 tensor value `[N, dims...]`.
fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
    let dim = std::iter::once(tensor_shape_proto::dimension::Value::DimParam(BATCH.into()))
        .chain(
            dims.iter()
                .map(|&d| tensor_shape_proto::dimension::Value::DimValue(d as i64)),
        )
        .map(|v| tensor_shape_proto::Dimension {
            value: Some(v),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        type_: MessageField::some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::FLOAT as i32,
                shape: MessageField::some(TensorShapeProto {
                    dim,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attribute(name: &str, attr: &Attr) -> AttributeProto {
    let mut a = AttributeProto {
        name: name.into(),
        ..Default::default()
    };
    match attr {
        Attr::Int(i) => {
            a.type_ = AttributeType::INT.into();
            a.i = *i;
        }
        Attr::Ints(v) => {
            a.type_ = AttributeType::INTS.into();
            a.ints = v.clone();
        }
        Attr::Float(f) => {
            a.type_ = AttributeType::FLOAT.into();
            a.f = *f;
        }
    }
    a
}

fn node(n: &Node) -> NodeProto {
    NodeProto {
        input: n.inputs.clone(),
        output: vec![n.output.clone()],
        name: n.output.clone(),
        op_type: n.op.into(),
        attribute: n.attrs.iter().map(|(k, v)| attribute(k, v)).collect(),
        ..Default::default()
    }
}

/// A float32 initializer; the values little-endian in `raw_data`, as ONNX stores them.
fn tensor(t: &Initializer) -> TensorProto {
    TensorProto {
        name: t.name.clone(),
        dims: t.dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::FLOAT as i32,
        raw_data: t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// The ONNX file of `graph`: input `[N, 1, 28, 28]`, output `[N, 10]`.
pub(crate) fn encode(graph: &Graph, meta: &Meta) -> Result<Vec<u8>, OnnxError> {
    let proto = GraphProto {
        name: meta.graph_name.clone(),
        node: graph.nodes.iter().map(node).collect(),
        initializer: graph.initializers.iter().map(tensor).collect(),
        input: vec![value_info(INPUT_NAME, &plan::INPUT.to_vec())],
        output: vec![value_info(OUTPUT_NAME, &[plan::OUTPUTS])],
        ..Default::default()
    };
    ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
            ..Default::default()
        }],
        producer_name: "mnist-onnx".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: meta.doc.clone(),
        graph: MessageField::some(proto),
        metadata_props: meta
            .props
            .iter()
            .map(|(key, value)| StringStringEntryProto {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .write_to_bytes()
    .map_err(|e| OnnxError::Encode(e.to_string()))
}

//! A small, protobuf-free picture of an ONNX graph: nodes with one output each, f32 initializers and
//! the attributes our layers need. [`crate::lower`] builds it from a model; [`crate::encode`] writes it
//! as an ONNX `ModelProto`.

use std::collections::HashSet;

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Attr {
    /// `INT`.
    Int(i64),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `FLOAT`.
    Float(f32),
}

/// A node's attributes, by name.
pub(crate) type Attrs = Vec<(&'static str, Attr)>;

/// One operator application.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    /// The ONNX operator (`Conv`, `Relu`, ...), default domain.
    pub op: &'static str,
    /// The node's name, which is also the name of its one output.
    pub output: String,
    /// Input value names, in the operator's order.
    pub inputs: Vec<String>,
    /// Attributes.
    pub attrs: Attrs,
}

/// A constant f32 tensor (a weight).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Initializer {
    /// Its value name (the variable's name in the weights file).
    pub name: String,
    /// Its shape.
    pub dims: Vec<usize>,
    /// Its values, row-major.
    pub data: Vec<f32>,
}

/// A graph from one input to one output.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Graph {
    /// Nodes in execution order.
    pub nodes: Vec<Node>,
    /// Weights.
    pub initializers: Vec<Initializer>,
    /// Every value name given out so far (inputs, initializers, node outputs).
    names: HashSet<String>,
}

impl Graph {
    /// A graph whose input value is `input`.
    pub fn new(input: &str) -> Self {
        let mut g = Self::default();
        g.names.insert(input.to_string());
        g
    }

    /// `name`, or `name_2`, `name_3`, ... when taken: value names are unique in a graph.
    fn fresh(&mut self, name: &str) -> String {
        let mut candidate = name.to_string();
        let mut n = 1;
        while self.names.contains(&candidate) {
            n += 1;
            candidate = format!("{name}_{n}");
        }
        self.names.insert(candidate.clone());
        candidate
    }

    /// Adds a node named (about) `name` and returns the name of its output.
    pub fn node(
        &mut self,
        op: &'static str,
        name: &str,
        inputs: Vec<String>,
        attrs: Attrs,
    ) -> String {
        let output = self.fresh(name);
        self.nodes.push(Node {
            op,
            output: output.clone(),
            inputs,
            attrs,
        });
        output
    }

    /// Adds a weight named `name` and returns its value name.
    pub fn initializer(&mut self, name: &str, dims: Vec<usize>, data: Vec<f32>) -> String {
        let name = self.fresh(name);
        self.initializers.push(Initializer {
            name: name.clone(),
            dims,
            data,
        });
        name
    }

    /// Renames the output of the last node to `name` (the graph output), which no node may have taken.
    /// False when the graph has no node.
    pub fn name_last_output(&mut self, name: &str) -> bool {
        let Some(last) = self.nodes.last_mut() else {
            return false;
        };
        self.names.remove(&last.output);
        last.output = name.to_string();
        self.names.insert(name.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_unique() {
        let mut g = Graph::new("input");
        let a = g.node("Relu", "x", vec!["input".into()], vec![]);
        let b = g.node("Relu", "x", vec![a.clone()], vec![]);
        let c = g.initializer("x", vec![1], vec![0.0]);
        assert_eq!((a.as_str(), b.as_str(), c.as_str()), ("x", "x_2", "x_3"));
        assert!(g.name_last_output("logits"));
        assert_eq!(g.nodes[1].output, "logits");
        assert!(!Graph::new("input").name_last_output("logits"));
    }
}

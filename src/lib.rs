//! Facade over the workspace crates, so integration tests (`tests/`) and benches (`benches/`) can reach
//! every layer of the project through one dependency.
pub use mnist_data as data;
pub use mnist_layers as layers;
pub use mnist_metrics as metrics;
pub use mnist_models as models;
pub use mnist_optim as optim;
pub use mnist_serve as serve;
pub use mnist_train as train;

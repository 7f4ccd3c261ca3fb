//! Solution: `conv`. Trains, evaluates or summarises it; see `--help`.

fn main() -> std::process::ExitCode {
    mnist_train::cli::main(mnist_models::Solution::Conv)
}

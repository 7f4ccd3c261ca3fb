//! The command line shared by `solution-conv`, `solution-separable` and `solution-inception`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use mnist_data::{
    DataSource, Dataset, ElasticConfig, EraseConfig, Interpolation, MixConfig, MixKind,
    ThicknessConfig, DEFAULT_ELASTIC_SIGMA, ERASE_AREA,
};
use mnist_layers::Kernels;
use mnist_models::{thousands, ArchSpec, Classifier, ModelConfig, Solution, Variant};
use mnist_optim::{
    AdamConfig, EmaConfig, LookaheadConfig, MomentumRange, OptimizerConfig, SamConfig,
    ScheduleConfig, SgdConfig,
};

use crate::{
    default_run_dir, evaluate, load_checkpoint, read_json, run_training_with, Checkpoint,
    DistillConfig, Interrupt, LogReporter, ProgressReporter, Reporter, RunOptions, TeacherRef,
    TrainConfig, TrainError, CHECKPOINT_FILE, CONFIG_FILE, INTERRUPTED_EXIT_CODE, MIN_POLY_LOSS,
    RESULTS_FILE,
};

#[derive(Parser, Debug)]
#[command(
    about = "Train, evaluate and inspect a tiny (<10k parameter) MNIST model",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train the model (the default when no subcommand is given), then evaluate it on the test split.
    Train(Box<TrainArgs>),
    /// Evaluate saved weights on the test split.
    Evaluate(EvalArgs),
    /// Print the model's layers and parameter counts, like Keras's model.summary(), or its architecture
    /// as the JSON that --arch reads (--spec).
    Summary(SummaryArgs),
    /// Classify image files (PNG or JPEG, any size, grey or colour) with saved weights. Exit code 1 when any
    /// file could not be classified (after printing the results of all the others).
    Predict(PredictArgs),
    /// Compare finished runs (run folders, or folders of runs): a table, and per configuration trained
    /// with several seeds the mean, standard deviation and min of the test accuracy.
    Compare(CompareArgs),
    /// Write a model as an ONNX file (opset 13) for other runtimes: input `input` [N, 1, 28, 28] float32
    /// (pixels / 255), output `logits` [N, 10]. Saved weights, or without --weights the shipped model.
    Export(ExportArgs),
    /// Compare recipes on paired seeds (validation split only): train a plan's baseline and candidates as
    /// run folders, several at once, and report each candidate's difference with an interval and a verdict.
    /// With --final, train the chosen recipe on fresh seeds and test each run once.
    Sweep(crate::sweep::SweepArgs),
    /// Test accuracy against model size: one point per recipe of the final runs given (their final.json
    /// files, or folders holding them), as frontier.txt, frontier.json and frontier.png.
    Frontier(crate::frontier::FrontierArgs),
    /// Serve the draw-a-digit page and its JSON API (POST /api/predict, GET /api/model) until Ctrl-C.
    Serve(ServeArgs),
}

/// A number flag's value: `s` parsed as `f64`, accepted when `ok` holds; `want` completes "must be ..."
/// in the error clap prints beside the flag.
fn f64_where(s: &str, ok: fn(f64) -> bool, want: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if ok(v) => Ok(v),
        Ok(v) => Err(format!("must be {want}, got {v}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    f64_where(s, |v| v.is_finite() && v > 0.0, "a positive number")
}

fn smoothing_f64(s: &str) -> std::result::Result<f64, String> {
    f64_where(s, |v| (0.0..1.0).contains(&v), "at least 0 and below 1")
}

fn non_negative_f64(s: &str) -> std::result::Result<f64, String> {
    f64_where(s, |v| v.is_finite() && v >= 0.0, "a number of at least 0")
}

fn up_to_one_f64(s: &str) -> std::result::Result<f64, String> {
    f64_where(s, |v| v > 0.0 && v <= 1.0, "above 0 and at most 1")
}

fn open_unit_f64(s: &str) -> std::result::Result<f64, String> {
    f64_where(s, |v| v > 0.0 && v < 1.0, "above 0 and below 1")
}

fn probability_f64(s: &str) -> std::result::Result<f64, String> {
    f64_where(s, |v| (0.0..=1.0).contains(&v), "a probability in [0, 1]")
}

fn poly_f64(s: &str) -> std::result::Result<f64, String> {
    let want = format!("a number of at least {MIN_POLY_LOSS}");
    f64_where(s, |v| v.is_finite() && v >= MIN_POLY_LOSS, &want)
}

fn share_f64(s: &str) -> std::result::Result<f64, String> {
    f64_where(s, |v| (0.0..=1.0).contains(&v), "a share in [0, 1]")
}

fn erase_area_f64(s: &str) -> std::result::Result<f64, String> {
    let want = format!("a share of the image in ({}, 1]", ERASE_AREA.0);
    f64_where(s, |v| v > ERASE_AREA.0 as f64 && v <= 1.0, &want)
}

fn positive_usize(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a positive whole number: {e}")),
    }
}

fn parse_kernels(s: &str) -> std::result::Result<Kernels, String> {
    match s {
        "auto" | "fast" => Ok(Kernels::Auto),
        "reference" | "candle" => Ok(Kernels::Reference),
        _ => Err(format!("expected auto or reference, got '{s}'")),
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ScheduleArg {
    /// The learning rate stays at --lr.
    Constant,
    /// The original plateau rule (divide by --plateau-factor).
    Plateau,
    /// One-cycle: warm up to --lr, then cosine-anneal.
    OneCycle,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum OptimizerArg {
    /// Adam (Keras form).
    Adam,
    /// SGD with momentum (PyTorch form).
    Sgd,
}

#[derive(Args, Debug, Clone)]
struct DataArgs {
    /// Folder with the four IDX files (.gz or raw). Default: $MNIST_DIR, then the cache folder, then a download.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Which data set: mnist or fashion (Fashion-MNIST).
    #[arg(long, default_value = "mnist")]
    dataset: Dataset,
}

#[derive(Args, Debug, Clone)]
struct TrainArgs {
    /// seed = the original architecture and recipe; improved = ours (the default).
    #[arg(long, default_value = "improved")]
    variant: Variant,
    /// Train the architecture described in FILE (JSON, as `summary --spec` prints) with the --variant's
    /// recipe instead of the variant's own architecture.
    #[arg(long, value_name = "FILE")]
    arch: Option<PathBuf>,
    /// Number of epochs [recipe: 10].
    #[arg(long, allow_negative_numbers = true, value_parser = positive_usize)]
    epochs: Option<usize>,
    /// Batch size [recipe: 32 for seed, 64 for improved].
    #[arg(long, allow_negative_numbers = true, value_parser = positive_usize)]
    batch_size: Option<usize>,
    /// Learning rate: the optimizer's for seed; the peak of the schedule for improved [recipe].
    #[arg(long, allow_negative_numbers = true, value_parser = positive_f64)]
    lr: Option<f64>,
    /// Weight decay [recipe: 0]. Adam: decoupled (AdamW), each step multiplies every weight by
    /// `1 - lr * WD`, with the scheduled lr. SGD: coupled L2 (PyTorch's), `WD * w` is added to the gradient.
    #[arg(long, value_name = "WD", allow_negative_numbers = true, value_parser = non_negative_f64)]
    weight_decay: Option<f64>,
    /// Gradient centralization (Yong et al. 2020): before each step, every convolution and dense weight's
    /// gradient loses its mean over each filter (each output's inputs), so each filter's update sums to
    /// zero [recipe: off].
    #[arg(long)]
    grad_centralization: bool,
    /// The optimizer: adam (Keras form) or sgd (PyTorch form, momentum and Nesterov on by default; pass
    /// its --lr, e.g. 0.1) [recipe: adam].
    #[arg(long, value_enum, value_name = "OPT")]
    optimizer: Option<OptimizerArg>,
    /// SGD momentum, in [0, 1) [default: 0.9]. Needs --optimizer sgd.
    #[arg(long, value_name = "M", allow_negative_numbers = true, value_parser = smoothing_f64)]
    momentum: Option<f64>,
    /// SGD with classical (heavy-ball) momentum instead of Nesterov's. Needs --optimizer sgd.
    #[arg(long)]
    no_nesterov: bool,
    /// Adam's second-moment decay beta2, in [0, 1) [default: 0.999, Keras's; fast.ai's one-cycle uses
    /// 0.99]. Needs Adam.
    #[arg(long, value_name = "B2", allow_negative_numbers = true, value_parser = smoothing_f64)]
    beta2: Option<f64>,
    /// Average the weights: keep an exponential moving average of every model variable (BatchNorm
    /// statistics included) with this decay per step, in (0, 1), e.g. 0.999; validate, test and save the
    /// average [default: off].
    #[arg(long, value_name = "DECAY", allow_negative_numbers = true, value_parser = open_unit_f64)]
    ema: Option<f64>,
    /// Use the --ema decay from the first step instead of ramping it up as min(DECAY, (1+t)/(10+t)).
    #[arg(long, requires = "ema")]
    no_ema_warmup: bool,
    /// Knowledge distillation: also learn the probabilities this trained model gives each training
    /// batch (FILE is the model.safetensors of a finished run, its config.json beside it); several
    /// (repeated or FILE,FILE,...) make an ensemble, whose probabilities are averaged [default: off].
    #[arg(long, value_name = "FILE", value_delimiter = ',')]
    teacher: Vec<PathBuf>,
    /// Distillation: temperature of the teachers' and the student's softmax [default: 4].
    #[arg(long, value_name = "T", requires = "teacher", allow_negative_numbers = true, value_parser = positive_f64)]
    distill_temperature: Option<f64>,
    /// Distillation: share w of the teachers' term in the loss, (1 - w) * labels + w * T^2 * teachers,
    /// in (0, 1] [default: 0.5].
    #[arg(long, value_name = "W", requires = "teacher", allow_negative_numbers = true, value_parser = up_to_one_f64)]
    distill_weight: Option<f64>,
    /// Learning-rate schedule [recipe: plateau for seed, one-cycle for improved].
    #[arg(long, value_enum)]
    schedule: Option<ScheduleArg>,
    /// Divide the learning rate by this when validation accuracy plateaus (1 = off, as the original).
    #[arg(long, allow_negative_numbers = true, value_parser = positive_f64)]
    plateau_factor: Option<f64>,
    /// One-cycle schedule: the fraction of the steps spent warming up to the peak, the rest annealing
    /// to the end, above 0 and below 1 [improved recipe: 0.25]. Needs the one-cycle schedule.
    #[arg(long, value_name = "F", allow_negative_numbers = true, value_parser = open_unit_f64)]
    warmup_fraction: Option<f64>,
    /// One-cycle schedule: cycle the momentum (Adam's beta1, SGD's momentum) against the learning rate,
    /// from 0.95 down to 0.85 at the peak and back, as PyTorch's OneCycleLR and fast.ai do [improved
    /// recipe: off]. Needs the one-cycle schedule.
    #[arg(long)]
    cycle_momentum: bool,
    /// Turn on-the-fly augmentation (rotation, shift, scale) on.
    #[arg(long, conflicts_with = "no_augment")]
    augment: bool,
    /// Turn augmentation off.
    #[arg(long)]
    no_augment: bool,
    /// Augmentation: largest random rotation in degrees (turns augmentation on) [improved recipe: 10].
    #[arg(long, value_name = "DEG", conflicts_with = "no_augment")]
    rotate: Option<f32>,
    /// Augmentation: largest random shift in pixels (turns augmentation on) [improved recipe: 2].
    #[arg(long, value_name = "PX", conflicts_with = "no_augment")]
    shift: Option<f32>,
    /// Augmentation: random scale in [1 - F, 1 + F] (turns augmentation on) [improved recipe: 0.1].
    #[arg(long, value_name = "F", conflicts_with = "no_augment")]
    scale: Option<f32>,
    /// Augmentation: how warped images sample the source, bilinear or nearest (turns augmentation on)
    /// [improved recipe: bilinear].
    #[arg(long, value_name = "MODE", conflicts_with = "no_augment")]
    interpolation: Option<Interpolation>,
    /// Augmentation: elastic distortion (Simard et al. 2003) of strength ALPHA pixels after the affine
    /// warp, >= 0, 0 = off (turns augmentation on) [recipe: off].
    #[arg(long, value_name = "ALPHA", conflicts_with = "no_augment", allow_negative_numbers = true, value_parser = non_negative_f64)]
    elastic: Option<f64>,
    /// Augmentation: smoothing of the elastic displacement field, a Gaussian of S pixels [default: 4].
    #[arg(long, value_name = "S", requires = "elastic", allow_negative_numbers = true, value_parser = positive_f64)]
    elastic_sigma: Option<f64>,
    /// Augmentation: random erasing (Zhong et al. 2020): with probability P a rectangle of each training
    /// image set to the background, 0 = off (turns augmentation on) [recipe: off].
    #[arg(long, value_name = "P", conflicts_with = "no_augment", allow_negative_numbers = true, value_parser = probability_f64)]
    erase: Option<f64>,
    /// Augmentation: the largest share of the image one erased rectangle covers (the smallest is 0.02)
    /// [default: 0.33].
    #[arg(long, value_name = "A", requires = "erase", allow_negative_numbers = true, value_parser = erase_area_f64)]
    erase_max_area: Option<f64>,
    /// Augmentation: stroke thickness (Bengio et al. 2011): each training image blended with its
    /// dilation or erosion by one pixel, by a share drawn uniformly in [-T, T], T in [0, 1], 0 = off
    /// (turns augmentation on) [recipe: off].
    #[arg(long, value_name = "T", conflicts_with = "no_augment", allow_negative_numbers = true, value_parser = share_f64)]
    thickness: Option<f64>,
    /// Augmentation: mixup (Zhang et al. 2018): each training image blended with another of its batch,
    /// the share drawn from Beta(ALPHA, ALPHA) once a batch, the loss weighing both labels by it (turns
    /// augmentation on) [recipe: off].
    #[arg(long, value_name = "ALPHA", conflicts_with_all = ["no_augment", "cutmix"], allow_negative_numbers = true, value_parser = positive_f64)]
    mixup: Option<f64>,
    /// Augmentation: CutMix (Yun et al. 2019): a rectangle of another image of the batch pasted into each
    /// training image, its area's share drawn as for --mixup, the labels weighed by the areas (turns
    /// augmentation on) [recipe: off].
    #[arg(long, value_name = "ALPHA", conflicts_with = "no_augment", allow_negative_numbers = true, value_parser = positive_f64)]
    cutmix: Option<f64>,
    /// Train the last N epochs without augmentation [improved recipe: 1 for separable and inception, 0 for conv].
    #[arg(long, value_name = "N")]
    clean_epochs: Option<usize>,
    /// After the last epoch, set every BatchNorm's running statistics to the mean of its batch statistics
    /// over the plain training images ("precise BatchNorm"), before the last validation and the test
    /// [recipe: off].
    #[arg(long)]
    precise_bn: bool,
    /// Sharpness-aware minimisation (Foret et al. 2021): each step takes its gradient at the weights
    /// moved RHO (> 0, e.g. 0.05) uphill along the normalised gradient; two passes a step [recipe: off].
    #[arg(long, value_name = "RHO", allow_negative_numbers = true, value_parser = positive_f64)]
    sam: Option<f64>,
    /// With --sam: ASAM (Kwon et al. 2021), the move relative to each weight's size (|w| + 0.01), for
    /// which radii of about 0.5 to 2 are usual [recipe: off].
    #[arg(long, requires = "sam")]
    sam_adaptive: bool,
    /// Lookahead (Zhang et al. 2019): slow weights that move ALPHA of the way to the optimizer's weights
    /// every K steps, the optimizer going on from them (also at every epoch's end, so the slow weights
    /// are validated, tested and saved) [recipe: off].
    #[arg(long, value_name = "K", allow_negative_numbers = true, value_parser = positive_usize)]
    lookahead: Option<usize>,
    /// With --lookahead: the fraction of the way the slow weights move, in (0, 1] [default: 0.5].
    #[arg(long, value_name = "ALPHA", requires = "lookahead", allow_negative_numbers = true, value_parser = up_to_one_f64)]
    lookahead_alpha: Option<f64>,
    /// Ghost BatchNorm (Hoffer et al. 2017): every batch runs through the model in parts of N images,
    /// each normalised by its own statistics (at least 2, smaller than the batch size) [recipe: off].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = positive_usize)]
    ghost_batch: Option<usize>,
    /// Label smoothing of the training loss, in [0, 1) [recipe: 0].
    #[arg(long, value_name = "EPS", allow_negative_numbers = true, value_parser = smoothing_f64)]
    label_smoothing: Option<f64>,
    /// Poly-1 loss (Leng et al. 2022): the training loss adds EPS * (1 - p_label), EPS at least -1
    /// [recipe: 0].
    #[arg(long, value_name = "EPS", allow_negative_numbers = true, value_parser = poly_f64)]
    poly_loss: Option<f64>,
    /// Seed of every random draw (weights, dropout, shuffles, augmentation).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder [default: runs/<solution>-<variant>-seed<seed>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Train on the first N training images only (quick trials).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = positive_usize)]
    limit_train: Option<usize>,
    /// Kernels: auto (fast CPU kernels where possible) or reference (candle's own ops).
    #[arg(long, default_value = "auto", value_parser = parse_kernels)]
    kernels: Kernels,
    /// No progress bar; one log line per epoch.
    #[arg(long)]
    quiet: bool,
    /// Never load or evaluate the test split (only the two training files are read): results.json holds
    /// the validation figures only, for choosing recipes (`evaluate` can test the run later).
    #[arg(long)]
    no_test: bool,
    /// Train into --out even if it holds an unfinished run or a run with other settings (they are lost).
    #[arg(long)]
    overwrite: bool,
    /// Test hook: after epoch N's checkpoint, wait for Ctrl-C (prints `paused after epoch N`).
    #[arg(long, hide = true, value_name = "N")]
    pause_after_epoch: Option<usize>,
    /// Continue the run in DIR from its last complete epoch (its config.json gives every setting;
    /// only --epochs may change, to extend the run).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = [
            "variant", "arch", "batch_size", "lr", "weight_decay", "schedule", "plateau_factor", "warmup_fraction", "cycle_momentum", "augment", "no_augment",
            "rotate", "shift", "scale", "interpolation", "clean_epochs", "label_smoothing", "poly_loss", "seed", "overwrite", "out", "limit_train", "kernels", "dataset", "no_test",
            "optimizer", "momentum", "no_nesterov", "beta2", "ema", "no_ema_warmup", "elastic", "elastic_sigma",
            "erase", "erase_max_area", "mixup", "cutmix", "thickness",
            "teacher", "distill_temperature", "distill_weight", "precise_bn", "sam", "sam_adaptive",
            "grad_centralization", "lookahead", "lookahead_alpha", "ghost_batch",
        ]
    )]
    resume: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// The weights file (model.safetensors of a run folder) [default: the shipped pretrained model of
    /// --variant].
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also report the test accuracy with test-time augmentation (`tta_accuracy`: the mean softmax of
    /// each image and its 1-px shifts left, right, up and down), beside the plain figure.
    #[arg(long)]
    tta: bool,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args, Debug)]
struct SummaryArgs {
    /// Which built-in variant.
    #[arg(long, default_value = "improved")]
    variant: Variant,
    /// Summarise the architecture described in FILE (JSON) instead.
    #[arg(long, value_name = "FILE", conflicts_with = "variant")]
    arch: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long, conflicts_with = "spec")]
    json: bool,
    /// Print the architecture as JSON (the format --arch reads) instead of the table.
    #[arg(long)]
    spec: bool,
    /// Kernels to build the model on, to check it against the summary (which is computed from the
    /// architecture alone and is the same for every choice).
    #[arg(long, default_value = "auto", value_parser = parse_kernels)]
    kernels: Kernels,
}

/// Which model a weights file holds, when no config.json lies beside it; without --weights, which shipped
/// model.
#[derive(Args, Debug)]
struct ModelArgs {
    /// The built-in variant, when no config.json lies beside the weights; without --weights, the shipped
    /// pretrained model to use [default: improved].
    #[arg(long)]
    variant: Option<Variant>,
    /// The architecture (JSON), when no config.json lies beside the weights.
    #[arg(long, value_name = "FILE", conflicts_with = "variant")]
    arch: Option<PathBuf>,
}

/// A bad value of a flag found after parsing, such as an --arch file that does not describe a model:
/// exit code 2, as for the flags clap rejects.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// The architecture an `--arch FILE` flag names.
fn load_arch(path: &Path) -> Result<ArchSpec> {
    ArchSpec::load(path).map_err(|e| UsageError(format!("--arch {e}")).into())
}

/// A command whose output goes to a pipe that closes early (`summary --spec | head`) ends quietly, as
/// other command-line tools do, instead of panicking in `println!` on the broken pipe: SIGPIPE gets its
/// default action back (Rust ignores it, so writes fail instead). Not for `serve`, whose clients may
/// close their connections at any time: there the failed write is an error of that one response.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: `signal` with a valid signal number and the default action has no memory-safety
    // preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Entry point of a solution binary: parses the command line, sets up logging, runs, and turns any
/// error into one line on stderr and a non-zero exit code.
pub fn main(solution: Solution) -> ExitCode {
    mnist_layers::init_runtime();
    let name: &'static str = match solution {
        Solution::Conv => "solution-conv",
        Solution::Separable => "solution-separable",
        Solution::Inception => "solution-inception",
    };
    let matches = Cli::command().name(name).bin_name(name).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let serve = matches!(cli.command, Some(Command::Serve(_)));
    if !serve {
        quiet_on_closed_pipe();
    }
    init_logging();
    // Training and evaluation start their parallel loops from a worker thread of the pool (cheaper:
    // `mnist_layers::on_pool`). Not the server: it runs for good, and its requests' inference loops
    // need every worker.
    let result = match serve {
        true => run(solution, cli),
        false => mnist_layers::on_pool(|| run(solution, cli)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            let interrupted = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<TrainError>(),
                    Some(TrainError::Interrupted { .. })
                )
            });
            let interrupted = interrupted
                || e.chain().any(|c| {
                    c.downcast_ref::<crate::sweep::SweepError>()
                        .is_some_and(crate::sweep::SweepError::is_interrupted)
                });
            let usage = e.chain().any(|c| c.downcast_ref::<UsageError>().is_some());
            if interrupted {
                ExitCode::from(INTERRUPTED_EXIT_CODE)
            } else if usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message already contains (many
/// errors print their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(solution: Solution, cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Train(args)) => train(solution, *args),
        None => train(solution, cli.train),
        Some(Command::Evaluate(args)) => evaluate_cmd(solution, args),
        Some(Command::Summary(args)) => summary_cmd(solution, args),
        Some(Command::Predict(args)) => predict_cmd(solution, args),
        Some(Command::Compare(args)) => compare_cmd(args),
        Some(Command::Export(args)) => export_cmd(solution, args),
        Some(Command::Sweep(args)) => sweep_cmd(solution, args),
        Some(Command::Frontier(args)) => frontier_cmd(args),
        Some(Command::Serve(args)) => serve_cmd(solution, args),
    }
}

fn train_config(solution: Solution, args: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::recipe(solution, args.variant);
    if let Some(path) = &args.arch {
        let arch = load_arch(path)?;
        cfg.model = ModelConfig::custom(solution, arch);
    }
    cfg.model.kernels = args.kernels;
    cfg.dataset = args.data.dataset;
    cfg.seed = args.seed;
    cfg.limit_train = args.limit_train;
    cfg.no_test = args.no_test;
    if let Some(e) = args.epochs {
        cfg.epochs = e;
    }
    if let Some(b) = args.batch_size {
        cfg.batch_size = b;
    }
    apply_optimizer_flags(&mut cfg, args)?;
    if let Some(lr) = args.lr {
        cfg.optimizer.set_lr(lr);
        if let ScheduleConfig::OneCycle { max_lr, .. } = &mut cfg.schedule {
            *max_lr = lr;
        }
    }
    if let Some(wd) = args.weight_decay {
        cfg.optimizer.set_weight_decay(wd);
    }
    if args.grad_centralization {
        cfg.optimizer.set_grad_centralization(true);
    }
    cfg.ema = args.ema.map(|decay| EmaConfig {
        decay,
        warmup: !args.no_ema_warmup,
    });
    if !args.teacher.is_empty() {
        cfg.distill = Some(DistillConfig {
            teachers: args
                .teacher
                .iter()
                .map(|path| TeacherRef::of_file(path))
                .collect::<Result<_, _>>()?,
            temperature: args
                .distill_temperature
                .unwrap_or(crate::distill::DEFAULT_TEMPERATURE),
            weight: args
                .distill_weight
                .unwrap_or(crate::distill::DEFAULT_WEIGHT),
        });
    }
    match args.schedule {
        Some(ScheduleArg::Constant) => cfg.schedule = ScheduleConfig::Constant,
        Some(ScheduleArg::Plateau) => {
            cfg.schedule = ScheduleConfig::Plateau {
                factor: args.plateau_factor.unwrap_or(1.0),
            }
        }
        Some(ScheduleArg::OneCycle) => {
            cfg.schedule = ScheduleConfig::OneCycle {
                max_lr: cfg.optimizer.lr(),
                pct_start: 0.25,
                div_factor: 25.0,
                final_div_factor: 1e3,
                cycle_momentum: None,
            }
        }
        None => {}
    }
    if let (Some(f), ScheduleConfig::Plateau { factor }) = (args.plateau_factor, &mut cfg.schedule)
    {
        *factor = f;
    }
    let needs_one_cycle = |flag: String, other: &ScheduleConfig| {
        anyhow::anyhow!(
            "{flag}: needs the one-cycle schedule (this run's is {}; add --schedule one-cycle)",
            other.name()
        )
    };
    if let Some(f) = args.warmup_fraction {
        match &mut cfg.schedule {
            ScheduleConfig::OneCycle { pct_start, .. } => *pct_start = f,
            other => return Err(needs_one_cycle(format!("--warmup-fraction {f}"), other)),
        }
    }
    if args.cycle_momentum {
        match &mut cfg.schedule {
            ScheduleConfig::OneCycle { cycle_momentum, .. } => {
                *cycle_momentum = Some(MomentumRange::default())
            }
            other => return Err(needs_one_cycle("--cycle-momentum".into(), other)),
        }
    }
    let custom_augment = args.rotate.is_some()
        || args.shift.is_some()
        || args.scale.is_some()
        || args.interpolation.is_some()
        || args.elastic.is_some()
        || args.erase.is_some()
        || args.thickness.is_some()
        || args.mixup.is_some()
        || args.cutmix.is_some();
    if (args.augment || custom_augment) && cfg.augment.is_none() {
        cfg.augment = TrainConfig::recipe(solution, Variant::Improved).augment;
    }
    if let Some(aug) = cfg.augment.as_mut() {
        if let Some(r) = args.rotate {
            aug.max_rotation_deg = r;
        }
        if let Some(t) = args.shift {
            aug.max_shift_px = t;
        }
        if let Some(f) = args.scale {
            aug.scale_range = (1.0 - f, 1.0 + f);
        }
        if let Some(i) = args.interpolation {
            aug.interpolation = i;
        }
        if let Some(alpha) = args.elastic {
            // Zero alpha moves nothing: the same run as no elastic distortion.
            aug.elastic = (alpha > 0.0).then(|| ElasticConfig {
                alpha: alpha as f32,
                sigma: args.elastic_sigma.unwrap_or(DEFAULT_ELASTIC_SIGMA as f64) as f32,
            });
        }
        if let Some(p) = args.erase {
            // Zero probability erases nothing: the same run as no erasing.
            aug.erase = (p > 0.0).then(|| {
                let mut e = EraseConfig::new(p as f32);
                if let Some(a) = args.erase_max_area {
                    e.area.1 = a as f32;
                }
                e
            });
        }
        if let Some(t) = args.thickness {
            // Zero changes nothing: the same run as no thickness change.
            aug.thickness = (t > 0.0).then(|| ThicknessConfig::new(t as f32));
        }
        let mix = |kind, alpha: f64| MixConfig {
            kind,
            alpha: alpha as f32,
        };
        if let Some(alpha) = args.mixup {
            aug.mix = Some(mix(MixKind::Mixup, alpha));
        }
        if let Some(alpha) = args.cutmix {
            aug.mix = Some(mix(MixKind::Cutmix, alpha));
        }
    }
    if let Some(n) = args.clean_epochs {
        cfg.clean_epochs = n;
    }
    if let Some(eps) = args.label_smoothing {
        cfg.label_smoothing = eps;
    }
    if let Some(eps) = args.poly_loss {
        cfg.poly_loss = eps;
    }
    if args.precise_bn {
        cfg.precise_bn = true;
    }
    if let Some(rho) = args.sam {
        cfg.sam = Some(SamConfig {
            rho,
            adaptive: args.sam_adaptive,
        });
    }
    if let Some(k) = args.lookahead {
        let mut la = LookaheadConfig::new(k);
        if let Some(alpha) = args.lookahead_alpha {
            la.alpha = alpha;
        }
        cfg.lookahead = Some(la);
    }
    if let Some(g) = args.ghost_batch {
        if let Some(problem) = cfg.ghost_batch_problem(g) {
            return Err(UsageError(format!("--ghost-batch {g}: {problem}")).into());
        }
        cfg.ghost_batch = Some(g);
    }
    if args.no_augment {
        cfg.augment = None;
    }
    Ok(cfg)
}

/// `--optimizer`, `--momentum`, `--no-nesterov`: switching to SGD keeps the recipe's learning rate and
/// weight decay (flags given after override them); the SGD flags need SGD.
fn apply_optimizer_flags(cfg: &mut TrainConfig, args: &TrainArgs) -> Result<()> {
    match args.optimizer {
        Some(OptimizerArg::Sgd) if !matches!(cfg.optimizer, OptimizerConfig::Sgd(_)) => {
            cfg.optimizer = OptimizerConfig::Sgd(SgdConfig {
                lr: cfg.optimizer.lr(),
                weight_decay: cfg.optimizer.weight_decay(),
                grad_centralization: cfg.optimizer.grad_centralization(),
                ..SgdConfig::default()
            });
        }
        Some(OptimizerArg::Adam) if !matches!(cfg.optimizer, OptimizerConfig::Adam(_)) => {
            cfg.optimizer = OptimizerConfig::Adam(AdamConfig {
                lr: cfg.optimizer.lr(),
                weight_decay: cfg.optimizer.weight_decay(),
                grad_centralization: cfg.optimizer.grad_centralization(),
                ..AdamConfig::default()
            });
        }
        _ => {}
    }
    match &mut cfg.optimizer {
        OptimizerConfig::Sgd(sgd) => {
            if let Some(m) = args.momentum {
                sgd.momentum = m;
            }
            if args.no_nesterov {
                sgd.nesterov = false;
            }
            if args.beta2.is_some() {
                return Err(UsageError(
                    "--beta2 applies to Adam only (the optimizer is sgd)".to_string(),
                )
                .into());
            }
        }
        OptimizerConfig::Adam(adam) => {
            if let Some(b2) = args.beta2 {
                adam.beta2 = b2;
            }
            let flag = match (args.momentum, args.no_nesterov) {
                (Some(_), _) => "--momentum",
                (None, true) => "--no-nesterov",
                (None, false) => return Ok(()),
            };
            return Err(UsageError(format!(
                "{flag} applies to SGD only: add --optimizer sgd (the optimizer is adam)"
            ))
            .into());
        }
    }
    Ok(())
}

fn load_data(args: &DataArgs) -> Result<mnist_data::Mnist> {
    let source = DataSource {
        dir: args.data_dir.clone(),
        dataset: args.dataset,
    };
    Ok(source.load()?)
}

fn train(solution: Solution, args: TrainArgs) -> Result<()> {
    if args.plateau_factor.is_some_and(|f| f < 1.0) {
        bail!(
            "--plateau-factor must be at least 1 (1 = off), got {}",
            args.plateau_factor.unwrap_or(0.0)
        );
    }
    // Installed first, so Ctrl-C while the data loads also stops cleanly.
    let interrupt = Interrupt::install()?;
    let (cfg, out, resume) = match &args.resume {
        Some(dir) => resume_config(solution, &args, dir)?,
        None => {
            let cfg = train_config(solution, &args)?;
            cfg.validate()?;
            let out = args.out.clone().unwrap_or_else(|| default_run_dir(&cfg));
            if !args.overwrite {
                check_out_dir(&out, &cfg)?;
            }
            (cfg, out, None)
        }
    };
    let data_args = DataArgs {
        data_dir: args.data.data_dir.clone(),
        dataset: cfg.dataset,
    };
    let data = match cfg.no_test {
        // Only the two training files are read: the test split cannot leak into a choice.
        true => DataSource {
            dir: data_args.data_dir,
            dataset: data_args.dataset,
        }
        .load_without_test()?,
        false => load_data(&data_args)?,
    };
    let device = Device::Cpu;
    let mut reporter: Box<dyn Reporter> = if args.quiet {
        Box::new(LogReporter::default())
    } else {
        Box::new(ProgressReporter::new())
    };
    let stop = interrupt.flag();
    let options = RunOptions {
        resume,
        stop: Some(stop.as_ref()),
        pause_after_epoch: args.pause_after_epoch,
    };
    let what = format!(
        "training {solution} ({}) into {}",
        cfg.model.label(),
        out.display()
    );
    let results = match run_training_with(&cfg, &data, &out, &device, reporter.as_mut(), options) {
        Ok(results) => results,
        Err(e @ TrainError::Interrupted { completed, .. }) => {
            let hint = if completed > 0 {
                format!(
                    "the checkpoint of epoch {completed} is kept: resume with `solution-{solution} train --resume {}`",
                    out.display()
                )
            } else {
                "no epoch was complete, so there is nothing to resume: start again".to_string()
            };
            return Err(
                anyhow::Error::new(e).context(format!("{what} stopped by a signal; {hint}"))
            );
        }
        Err(e) => return Err(anyhow::Error::new(e).context(what)),
    };
    let mean_epoch =
        results.epoch_seconds.iter().sum::<f64>() / results.epoch_seconds.len().max(1) as f64;
    let figure = match (results.test_accuracy, results.test_loss) {
        (Some(acc), Some(loss)) => format!("test accuracy {:.2}% (loss {loss:.4})", 100.0 * acc),
        _ => format!(
            "validation accuracy {:.2}% (test split not read)",
            100.0 * results.final_val_accuracy
        ),
    };
    println!(
        "{solution} ({}), {} params, seed {}: {figure} after {} epochs, {:.1} s/epoch; saved to {}",
        results.variant,
        results.params_total,
        results.seed,
        results.epochs,
        mean_epoch,
        out.display()
    );
    Ok(())
}

/// Refuses to start a new run in a folder whose run would be lost: an unfinished run (a checkpoint but no
/// results; it can be resumed) or a run with other settings. Re-running a finished run with the same
/// settings is allowed: training is deterministic, so it gives the same run again.
fn check_out_dir(out: &Path, cfg: &TrainConfig) -> Result<()> {
    let (checkpoint, results) = (out.join(CHECKPOINT_FILE), out.join(RESULTS_FILE));
    if checkpoint.exists() && !results.exists() {
        bail!(
            "{} holds an unfinished run ({} without {RESULTS_FILE}): continue it with `train --resume {}`, \
             or pass --overwrite to start again there, or choose another --out",
            out.display(),
            checkpoint.display(),
            out.display()
        );
    }
    let config_path = out.join(CONFIG_FILE);
    if config_path.exists() {
        let same = read_json::<TrainConfig>(&config_path).is_ok_and(|old| old.same_settings(cfg));
        if !same {
            bail!(
                "{} holds a run with other settings ({}): choose another --out, pass --overwrite to replace \
                 it, or train it longer with `train --resume {} --epochs N`",
                out.display(),
                config_path.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// The settings of `train --resume DIR`: `DIR/config.json` with `--epochs` as the only change, and the
/// checkpoint of the last complete epoch.
fn resume_config(
    solution: Solution,
    args: &TrainArgs,
    dir: &Path,
) -> Result<(TrainConfig, PathBuf, Option<Checkpoint>)> {
    let config_path = dir.join(CONFIG_FILE);
    let mut cfg: TrainConfig = read_json(&config_path)
        .with_context(|| format!("--resume {}: not a run folder", dir.display()))?;
    if cfg.model.solution != solution {
        bail!(
            "{} is a '{}' run, not '{solution}': use solution-{} train --resume {}",
            dir.display(),
            cfg.model.solution,
            cfg.model.solution,
            dir.display()
        );
    }
    let ckpt = load_checkpoint(dir, &Device::Cpu)?;
    if let Some(epochs) = args.epochs {
        if epochs < ckpt.state.epoch {
            bail!(
                "--epochs {epochs} is fewer than the {} epochs {} has already completed",
                ckpt.state.epoch,
                dir.display()
            );
        }
        let depends_on_length = !matches!(
            cfg.schedule,
            ScheduleConfig::Constant | ScheduleConfig::Plateau { .. }
        );
        if epochs != cfg.epochs && depends_on_length {
            tracing::warn!(
                "--epochs {epochs} changes the length of the {:?} schedule (was {} epochs): the learning rates from here on differ from those of an uninterrupted run",
                cfg.schedule,
                cfg.epochs
            );
        }
        cfg.epochs = epochs;
    }
    cfg.validate()?;
    Ok((cfg, dir.to_path_buf(), Some(ckpt)))
}

/// The model config of a weights file: `config.json` beside it, or the flags.
fn model_config_for(solution: Solution, weights: &Path, flags: &ModelArgs) -> Result<ModelConfig> {
    let config_path = weights.with_file_name(CONFIG_FILE);
    let model = if config_path.is_file() {
        let cfg: TrainConfig = read_json(&config_path)?;
        if let Some(v) = flags.variant {
            if Some(v) != cfg.model.variant {
                bail!(
                    "{} says the model is '{}', but --variant {v} was given",
                    config_path.display(),
                    cfg.model.label()
                );
            }
        }
        if let Some(path) = &flags.arch {
            let arch = load_arch(path)?;
            if arch != cfg.model.arch {
                bail!(
                    "{} describes another architecture than --arch {}",
                    config_path.display(),
                    path.display()
                );
            }
        }
        cfg.model
    } else if let Some(path) = &flags.arch {
        let arch = load_arch(path)?;
        ModelConfig::custom(solution, arch)
    } else {
        ModelConfig::new(solution, flags.variant.unwrap_or_default())
    };
    if model.solution != solution {
        bail!(
            "{} holds a '{}' model, not '{solution}': use solution-{}",
            weights.display(),
            model.solution,
            model.solution
        );
    }
    Ok(model)
}

/// The model to evaluate, predict or export with: `weights` with the model `config.json` beside it (or
/// the flags) name, or without `weights` the shipped pretrained model of `flags.variant` (said on stderr).
fn load_classifier(
    solution: Solution,
    weights: Option<&Path>,
    flags: &ModelArgs,
) -> Result<Classifier> {
    let Some(weights) = weights else {
        if let Some(path) = &flags.arch {
            return Err(UsageError(format!(
                "--arch {} needs --weights: only the built-in variants ship trained",
                path.display()
            ))
            .into());
        }
        let variant = flags.variant.unwrap_or_default();
        let info = mnist_models::pretrained_info(solution, variant);
        eprintln!(
            "using the shipped {solution}-{variant} model (no --weights): {} parameters, test accuracy \
             {:.2}%, trained with seed {} ({})",
            thousands(info.params),
            100.0 * info.test_accuracy(),
            info.seed,
            info.made
        );
        return Ok(mnist_models::pretrained(solution, variant)?);
    };
    let model = model_config_for(solution, weights, flags)?;
    Ok(Classifier::load(model, weights, &Device::Cpu)?)
}

fn evaluate_cmd(solution: Solution, args: EvalArgs) -> Result<()> {
    let classifier = load_classifier(solution, args.weights.as_deref(), &args.model)?;
    let model = classifier.config();
    let device = Device::Cpu;
    let data = load_data(&args.data)?;
    let eval = evaluate(classifier.net(), &data.test, &device)?;
    let tta = match args.tta {
        true => Some(crate::evaluate_tta(classifier.net(), &data.test, &device)?),
        false => None,
    };
    let per_class = eval.confusion.per_class();
    if args.json {
        let mut json = serde_json::json!({
            "solution": model.solution,
            "variant": model.label(),
            "test_accuracy": eval.accuracy,
            "test_loss": eval.loss,
            "per_class": per_class,
            "confusion": eval.confusion.counts(),
        });
        if let Some(tta) = &tta {
            json["tta_accuracy"] = tta.accuracy.into();
            json["tta_loss"] = tta.loss.into();
            json["tta_views"] = crate::TTA_LABEL.into();
        }
        println!("{json}");
    } else {
        println!(
            "{} ({}): test accuracy {:.2}%, loss {:.4} on {} images",
            model.solution,
            model.label(),
            100.0 * eval.accuracy,
            eval.loss,
            data.test.len()
        );
        println!("{}", eval.confusion);
        if let Some(tta) = &tta {
            println!(
                "tta_accuracy {:.2}% (loss {:.4}), {}; not the plain test accuracy above",
                100.0 * tta.accuracy,
                tta.loss,
                crate::TTA_LABEL
            );
        }
    }
    Ok(())
}

/// Builds `arch` on `kernels` and checks that the model holds the summary's parameters and maps images
/// to 10 logits (a mismatch would be a bug in the lowering).
fn check_build(arch: &ArchSpec, kernels: Kernels, summary: &mnist_models::Summary) -> Result<()> {
    let vars = mnist_layers::init::SeededVarMap::new(0);
    let device = Device::Cpu;
    let net = mnist_models::build(
        arch,
        vars.var_builder(candle_core::DType::F32, &device),
        kernels,
        mnist_models::dropout_rng(0),
    )?;
    let x = candle_core::Tensor::zeros((1, 1, 28, 28), candle_core::DType::F32, &device)?;
    let dims = candle_core::ModuleT::forward_t(&net, &x, false)?
        .dims()
        .to_vec();
    let params: usize = vars
        .var_map()
        .all_vars()
        .iter()
        .map(|v| v.elem_count())
        .sum();
    if dims != [1, 10] || params != summary.params_total {
        bail!(
            "the model built on {kernels:?} kernels gives {dims:?} from {params} parameters, the summary \
             says [1, 10] from {}",
            summary.params_total
        );
    }
    Ok(())
}

fn summary_cmd(solution: Solution, args: SummaryArgs) -> Result<()> {
    let arch = match &args.arch {
        Some(path) => load_arch(path)?,
        None => mnist_models::builtin(solution, args.variant).clone(),
    };
    if args.spec {
        println!("{}", arch.to_json());
        return Ok(());
    }
    let summary = mnist_models::summary(&arch)?;
    check_build(&arch, args.kernels, &summary)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(())
}

#[derive(Args, Debug)]
struct PredictArgs {
    /// The weights file (model.safetensors of a run folder; its config.json says which model)
    /// [default: the shipped pretrained model of --variant].
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// How many of the most probable classes to print per file.
    #[arg(long, default_value_t = 3, value_parser = positive_usize)]
    top: usize,
    /// Print one JSON list with an object per file: {file, digit, class, probabilities} or {file, error}.
    #[arg(long)]
    json: bool,
    /// Image files, one digit (or Fashion-MNIST item) each.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Run folders (each holding results.json), or folders whose sub-folders are runs.
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Print one JSON object ({runs, groups}) instead of the table.
    #[arg(long)]
    json: bool,
}

/// The data set a weights file was trained on: config.json beside it says, else MNIST.
fn dataset_for(weights: &Path) -> Result<Dataset> {
    let config_path = weights.with_file_name(CONFIG_FILE);
    if config_path.is_file() {
        let cfg: TrainConfig = read_json(&config_path)?;
        Ok(cfg.dataset)
    } else {
        Ok(Dataset::Mnist)
    }
}

fn predict_cmd(solution: Solution, args: PredictArgs) -> Result<()> {
    let dataset = match &args.weights {
        Some(w) => dataset_for(w)?,
        None => Dataset::Mnist,
    };
    let names = crate::plots::class_names(dataset);
    let predictor = load_classifier(solution, args.weights.as_deref(), &args.model)?;
    let loaded: Vec<_> = args
        .images
        .iter()
        .map(|path| mnist_data::load_mnist_image(path))
        .collect();
    let good: Vec<Vec<u8>> = loaded
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    let mut predictions = predictor.predict(&good)?.into_iter();
    let mut failed = 0usize;
    let mut json = Vec::with_capacity(args.images.len());
    for (path, image) in args.images.iter().zip(&loaded) {
        let file = path.display().to_string();
        let prediction = match image {
            Ok(_) => predictions.next(),
            Err(_) => None,
        };
        match (image, prediction) {
            (Ok(_), Some(p)) => {
                let class = names.get(p.digit as usize).copied().unwrap_or("?");
                if args.json {
                    json.push(serde_json::json!({
                        "file": file,
                        "digit": p.digit,
                        "class": class,
                        "probabilities": p.probabilities,
                    }));
                } else {
                    let top: Vec<String> = p
                        .top(args.top)
                        .iter()
                        .map(|(c, prob)| {
                            format!(
                                "{} {:.1}%",
                                names.get(*c as usize).copied().unwrap_or("?"),
                                100.0 * prob
                            )
                        })
                        .collect();
                    println!("{file}: {class} (top: {})", top.join(", "));
                }
            }
            (Err(e), _) => {
                failed += 1;
                if args.json {
                    json.push(serde_json::json!({ "file": file, "error": e.to_string() }));
                } else {
                    eprintln!("error: {e}");
                }
            }
            (Ok(_), None) => bail!("{file}: the model returned no prediction"),
        }
    }
    if args.json {
        println!("{}", serde_json::Value::Array(json));
    }
    if failed > 0 {
        bail!(
            "{failed} of {} files could not be classified",
            args.images.len()
        );
    }
    Ok(())
}

/// The settings `train ARGS` runs with (`argv` = `train ...`), as `train` checks them before it starts:
/// how `sweep` checks every run of a plan and recognises the finished ones.
fn train_settings(solution: Solution, argv: &[String]) -> std::result::Result<TrainConfig, String> {
    let name = format!("solution-{solution}");
    let cli = Cli::try_parse_from(std::iter::once(&name).chain(argv)).map_err(|e| {
        let text = e.to_string();
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.trim().trim_start_matches("error: "))
            .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
            .collect();
        lines.join("; ")
    })?;
    let Some(Command::Train(args)) = cli.command else {
        return Err(format!("not a train command: {}", argv.join(" ")));
    };
    let cfg = train_config(solution, &args).map_err(|e| one_line(&e))?;
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn sweep_cmd(solution: Solution, args: crate::sweep::SweepArgs) -> Result<()> {
    let interrupt = Interrupt::install()?;
    let settings = |argv: &[String]| train_settings(solution, argv);
    crate::sweep::run(solution, &args, &settings, &interrupt.flag()).map_err(|e| {
        match e.is_usage() {
            true => UsageError(e.to_string()).into(),
            false => anyhow::Error::new(e),
        }
    })
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The weights file (model.safetensors of a run folder) [default: the shipped pretrained model of
    /// --variant].
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// The address to listen on (this machine only by default; port 0 picks a free one).
    #[arg(long, value_name = "IP:PORT", default_value = mnist_serve::DEFAULT_ADDR)]
    addr: std::net::SocketAddr,
}

fn serve_cmd(solution: Solution, args: ServeArgs) -> Result<()> {
    let classifier = load_classifier(solution, args.weights.as_deref(), &args.model)?;
    let (test_accuracy, weights) = match &args.weights {
        // The run folder's results.json, when there, says how the weights scored.
        Some(path) => (
            read_json::<crate::RunResults>(&path.with_file_name(RESULTS_FILE))
                .ok()
                .and_then(|r| r.test_accuracy),
            path.display().to_string(),
        ),
        None => {
            let info =
                mnist_models::pretrained_info(solution, args.model.variant.unwrap_or_default());
            (
                Some(info.test_accuracy()),
                format!("pretrained, seed {}", info.seed),
            )
        }
    };
    let info = mnist_serve::ModelInfo::of(&classifier, test_accuracy, weights);
    let what = format!("{solution} ({})", info.variant);
    let state = mnist_serve::AppState::new(classifier, info, mnist_serve::ServeConfig::default())?;
    mnist_serve::run(args.addr, state, |addr| {
        println!("serving {what} at http://{addr}/ (Ctrl-C stops)")
    })?;
    Ok(())
}

fn frontier_cmd(args: crate::frontier::FrontierArgs) -> Result<()> {
    crate::frontier::run(&args).map_err(|e| match e {
        crate::frontier::FrontierError::Input { .. } => UsageError(e.to_string()).into(),
        e => anyhow::Error::new(e),
    })
}

fn compare_cmd(args: CompareArgs) -> Result<()> {
    let comparison = crate::compare::compare(&args.runs)?;
    if args.json {
        println!("{}", serde_json::to_string(&comparison)?);
    } else {
        println!("{comparison}");
    }
    Ok(())
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// The ONNX file to write (an existing file is replaced, all at once).
    #[arg(long, value_name = "OUT.onnx")]
    onnx: PathBuf,
    /// The weights file (model.safetensors of a run folder; its config.json says which model)
    /// [default: the shipped pretrained model of --variant].
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

fn export_cmd(solution: Solution, args: ExportArgs) -> Result<()> {
    let out = &args.onnx;
    if out.is_dir() {
        return Err(UsageError(format!(
            "--onnx {}: is a folder; name the file to write (such as {})",
            out.display(),
            out.join("model.onnx").display()
        ))
        .into());
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(UsageError(format!(
                "--onnx {}: there is no folder {}",
                out.display(),
                dir.display()
            ))
            .into());
        }
    }
    let classifier = load_classifier(solution, args.weights.as_deref(), &args.model)?;
    let model = classifier.config();
    let bytes = mnist_onnx::export(model, classifier.vars())
        .with_context(|| format!("exporting {solution} ({}) to ONNX", model.label()))?;
    mnist_fs::write_bytes_atomic(out, &bytes)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let from = match &args.weights {
        Some(w) => w.display().to_string(),
        None => "the shipped pretrained model".into(),
    };
    println!(
        "wrote {}: {solution} ({}) from {from}, ONNX opset {}, {} bytes; input '{}' [N, 1, 28, 28] \
         float32 (pixels / 255), output '{}' [N, 10]",
        out.display(),
        model.label(),
        mnist_onnx::OPSET,
        bytes.len(),
        mnist_onnx::INPUT_NAME,
        mnist_onnx::OUTPUT_NAME
    );
    Ok(())
}

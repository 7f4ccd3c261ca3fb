//! The draw-a-digit page and its JSON API: an [axum] server around a trained [`Classifier`].
//!
//! Routes:
//! - `GET /`: the page (one self-contained file, `page.html`, embedded in the binary): draw a digit, watch
//!   the ten probabilities change while drawing, and see the 28x28 image the model is given.
//! - `GET /api/model`: which model answers ([`ModelInfo`]).
//! - `POST /api/predict`: a PNG or JPEG (`Content-Type: image/png` / `image/jpeg`), turned into the MNIST
//!   form by the same code as the command line's `predict` ([`mnist_data::decode_mnist_image`]), or JSON
//!   `{"pixels": [784 whole numbers 0-255]}`, row by row, which is the model's input as it is (add
//!   `"preprocess": true` to run the 28x28 picture through the same preprocessing as an image). The answer
//!   is `{"digit": d, "probabilities": [10 floats], "pixels": [the 784 grey levels the model saw]}`.
//!
//! Every failure is a JSON `{"error": "..."}` with its status: 400 for a body that is not what the
//! `Content-Type` says, a missing or other `Content-Type`, a wrong pixel count or value, an image over
//! [`ServeConfig::max_image_side`], or a blank image (for images and preprocessed pixels: no ink stands out
//! of the background, as `predict` decides; for raw pixels: all 784 the same); 413 for a body over
//! [`ServeConfig::body_limit`]; 408 for a body slower than [`ServeConfig::read_timeout`]; 404 and 405 for
//! unknown routes and methods; 500 if the model fails. Decoding and inference run off the async threads
//! (see `engine.rs`); the server listens on this machine only unless told otherwise ([`DEFAULT_ADDR`]).
//!
//! ```no_run
//! # async fn demo(classifier: mnist_models::Classifier) -> Result<(), mnist_serve::ServeError> {
//! let info = mnist_serve::ModelInfo::of(&classifier, Some(0.9937), "pretrained");
//! let state = mnist_serve::AppState::new(classifier, info, mnist_serve::ServeConfig::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(mnist_serve::ServeError::Io)?;
//! mnist_serve::serve(listener, state, mnist_serve::shutdown_signal()).await
//! # }
//! ```

mod api;
mod engine;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use mnist_models::Classifier;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::engine::Engine;

/// The address `serve` listens on unless told otherwise: this machine only.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address cannot be listened on (in use, not this machine's, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The inference worker thread could not be started.
    #[error("cannot start the inference worker: {0}")]
    Worker(std::io::Error),
    /// The async runtime could not be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The server failed while running.
    #[error("server error: {0}")]
    Io(std::io::Error),
}

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Largest accepted request body, in bytes (413 above it).
    pub body_limit: usize,
    /// Largest accepted image side, in pixels, checked from the image header before decoding.
    pub max_image_side: u32,
    /// How long a request body may take to arrive (408 after it).
    pub read_timeout: Duration,
    /// After a shutdown signal, how long open requests may take to finish before the server stops anyway.
    pub shutdown_grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            body_limit: 4 << 20,
            max_image_side: 4096,
            read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Which model answers: the body of `GET /api/model`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// `conv`, `separable` or `inception`.
    pub solution: String,
    /// `seed`, `improved`, or the name of a custom architecture.
    pub variant: String,
    /// Parameters, BatchNorm statistics included (as `summary` counts them).
    pub params: usize,
    /// Accuracy on the 10,000 MNIST test images, when known.
    pub test_accuracy: Option<f64>,
    /// Where the weights come from (`pretrained`, or the weights file).
    pub weights: String,
}

impl ModelInfo {
    /// The info of `classifier`'s model; `test_accuracy` and `weights` are what the caller knows of them.
    pub fn of(
        classifier: &Classifier,
        test_accuracy: Option<f64>,
        weights: impl Into<String>,
    ) -> Self {
        let config = classifier.config();
        let params = mnist_models::summary(&config.arch)
            .map(|s| s.params_total)
            .unwrap_or_else(|_| {
                classifier
                    .vars()
                    .all_vars()
                    .iter()
                    .map(|v| v.elem_count())
                    .sum()
            });
        Self {
            solution: config.solution.to_string(),
            variant: config.label(),
            params,
            test_accuracy,
            weights: weights.into(),
        }
    }
}

/// What every request handler shares: the inference engine, the model info and the limits.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    engine: Engine,
    info: ModelInfo,
    config: ServeConfig,
}

impl AppState {
    /// Starts the inference worker that owns `classifier`.
    pub fn new(
        classifier: Classifier,
        info: ModelInfo,
        config: ServeConfig,
    ) -> Result<Self, ServeError> {
        let engine = Engine::start(classifier, config.max_image_side)?;
        Ok(Self(Arc::new(Shared {
            engine,
            info,
            config,
        })))
    }

    /// The model info `GET /api/model` returns.
    pub fn info(&self) -> &ModelInfo {
        &self.0.info
    }

    /// The limits.
    pub fn config(&self) -> &ServeConfig {
        &self.0.config
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.0.engine
    }
}

/// The routes (see the crate docs).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(api::page))
        .route("/api/model", get(api::model))
        .route("/api/predict", post(api::predict))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` completes, then lets open requests finish (for at most
/// [`ServeConfig::shutdown_grace`]) and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let grace = state.config().shutdown_grace;
    let (fired, on_fired) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing open requests");
        let _ = fired.send(());
    };
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(signal);
    let overdue = async move {
        if on_fired.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        done = server => done.map_err(ServeError::Io),
        () = overdue => {
            tracing::warn!("requests still open {} s after the shutdown signal: stopping anyway", grace.as_secs_f64());
            Ok(())
        }
    }
}

/// A future that completes on Ctrl-C (SIGINT) or SIGTERM. The signals are caught from the moment this is
/// called (inside a tokio runtime), not from the future's first poll, so a signal sent as soon as the
/// server says it is ready is never lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for {name}: {e}");
                None
            }
        };
        let interrupt = listen(SignalKind::interrupt(), "Ctrl-C (SIGINT)");
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            tokio::select! {
                () = recv(interrupt) => {}
                () = recv(terminate) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Waits for `signal`, or forever when it could not be listened for.
#[cfg(unix)]
async fn recv(signal: Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(mut s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// The whole server for a command line: starts a runtime, listens on `addr`, calls `ready` with the address
/// it listens on (the port chosen when `addr`'s is 0), and serves until Ctrl-C or SIGTERM.
pub fn run(
    addr: SocketAddr,
    state: AppState,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mnist-serve")
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let bound = listener.local_addr().map_err(ServeError::Io)?;
        if !bound.ip().is_loopback() {
            tracing::warn!(
                "listening on {bound}, which other machines can reach: the server has no authentication"
            );
        }
        let shutdown = shutdown_signal();
        ready(bound);
        serve(listener, state, shutdown).await
    })
}

//! Work kept off the async threads: decoding uploaded images (on tokio's blocking pool, a few at a time) and
//! running the model (one worker thread that owns the classifier and answers whatever requests are waiting
//! as one batch, so many concurrent requests cost a few forward passes, not one each).

use std::io::Cursor;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use image::{DynamicImage, GrayImage};
use mnist_data::{IMAGE_PIXELS, IMAGE_SIDE};
use mnist_models::{Classifier, Prediction};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::ServeError;

/// The most images one forward pass takes.
const MAX_BATCH: usize = 256;
/// Requests that may wait for the worker before senders wait for room.
const QUEUE: usize = 1024;

/// Why a request could not be answered, split by whose fault it is.
#[derive(Debug)]
pub(crate) enum EngineError {
    /// The input is not something the model can classify (an HTTP 400).
    BadInput(String),
    /// The server failed (an HTTP 500).
    Internal(String),
}

/// One image waiting for the model, and where its answer goes.
struct Job {
    pixels: Vec<u8>, // [784], MNIST form
    reply: oneshot::Sender<Result<Prediction, String>>,
}

/// The inference worker's mailbox and the limit on concurrent decodes.
pub(crate) struct Engine {
    jobs: mpsc::Sender<Job>,
    decoders: Arc<Semaphore>,
    max_side: u32,
}

impl Engine {
    /// Starts the worker thread that owns `classifier`; it ends when the last [`Engine`] handle is dropped.
    pub(crate) fn start(classifier: Classifier, max_side: u32) -> Result<Self, ServeError> {
        let (jobs, queue) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("mnist-inference".into())
            .spawn(move || worker(classifier, queue))
            .map_err(ServeError::Worker)?;
        let decoders = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            jobs,
            decoders: Arc::new(Semaphore::new(decoders)),
            max_side,
        })
    }

    /// Classifies one MNIST-form image (784 grey levels, light ink on black).
    pub(crate) async fn classify(&self, pixels: Vec<u8>) -> Result<Prediction, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { pixels, reply })
            .await
            .map_err(|_| EngineError::Internal("the inference worker has stopped".into()))?;
        match answer.await {
            Ok(Ok(prediction)) => Ok(prediction),
            Ok(Err(e)) => Err(EngineError::Internal(e)),
            Err(_) => Err(EngineError::Internal(
                "the inference worker dropped the request".into(),
            )),
        }
    }

    /// PNG or JPEG bytes -> the MNIST form, through the one preprocessing path of `predict`
    /// ([`mnist_data::decode_mnist_image`]), on the blocking pool.
    pub(crate) async fn decode(&self, bytes: Vec<u8>) -> Result<Vec<u8>, EngineError> {
        let max_side = self.max_side;
        self.preprocess(move || {
            check_dimensions(&bytes, max_side)?;
            mnist_data::decode_mnist_image(&bytes).map_err(|e| e.to_string())
        })
        .await
    }

    /// 784 grey levels read as a 28x28 picture -> the MNIST form ([`mnist_data::to_mnist`]), on the
    /// blocking pool.
    pub(crate) async fn refit(&self, pixels: Vec<u8>) -> Result<Vec<u8>, EngineError> {
        self.preprocess(move || {
            let side = IMAGE_SIDE as u32;
            let img = GrayImage::from_raw(side, side, pixels)
                .ok_or_else(|| format!("expected {IMAGE_PIXELS} pixels"))?;
            mnist_data::to_mnist(&DynamicImage::ImageLuma8(img)).map_err(|e| e.to_string())
        })
        .await
    }

    /// Runs `work` on tokio's blocking pool, at most one per core at a time; its error is the client's.
    async fn preprocess(
        &self,
        work: impl FnOnce() -> Result<Vec<u8>, String> + Send + 'static,
    ) -> Result<Vec<u8>, EngineError> {
        let permit = self
            .decoders
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Internal("the decoder pool is closed".into()))?;
        let done = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await;
        match done {
            Ok(Ok(pixels)) => Ok(pixels),
            Ok(Err(e)) => Err(EngineError::BadInput(e)),
            Err(e) => Err(EngineError::Internal(format!(
                "image preprocessing failed: {e}"
            ))),
        }
    }
}

/// Refuses images larger than `max_side` on a side from their header alone, before anything is decoded (a
/// small PNG can declare a huge canvas). Headers that cannot be read are left to the decoder's own error.
fn check_dimensions(bytes: &[u8], max_side: u32) -> Result<(), String> {
    let reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    if let Ok((w, h)) = reader
        .map_err(|_| ())
        .and_then(|r| r.into_dimensions().map_err(|_| ()))
    {
        if w > max_side || h > max_side {
            return Err(format!(
                "the image is {w}x{h} pixels: at most {max_side} on a side"
            ));
        }
    }
    Ok(())
}

/// The worker: waits for a request, takes every other one already waiting (up to [`MAX_BATCH`]), runs
/// one forward pass and answers each. A failing (or panicking) pass answers its requests with the error
/// and the worker carries on.
fn worker(classifier: Classifier, mut queue: mpsc::Receiver<Job>) {
    while let Some(first) = queue.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let (images, replies): (Vec<Vec<u8>>, Vec<_>) =
            jobs.into_iter().map(|j| (j.pixels, j.reply)).unzip();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| classifier.predict(&images)));
        let outcome = match result {
            Ok(Ok(predictions)) if predictions.len() == replies.len() => Ok(predictions),
            Ok(Ok(predictions)) => Err(format!(
                "the model returned {} predictions for {} images",
                predictions.len(),
                replies.len()
            )),
            Ok(Err(e)) => Err(format!("the model failed: {e}")),
            Err(_) => Err("the model panicked".to_string()),
        };
        match outcome {
            Ok(predictions) => {
                for (reply, p) in replies.into_iter().zip(predictions) {
                    // A client that went away no longer waits for its answer.
                    let _ = reply.send(Ok(p));
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
    tracing::debug!("inference worker stopped");
}

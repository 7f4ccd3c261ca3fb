//! The HTTP routes: the page, `GET /api/model`, `POST /api/predict`, and JSON errors for everything else.

use std::pin::Pin;

use axum::body::HttpBody;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use mnist_data::IMAGE_PIXELS;
use mnist_models::Prediction;
use serde::{Deserialize, Serialize};

use crate::engine::EngineError;
use crate::{AppState, ModelInfo};

/// The draw-a-digit page: one self-contained file (script and style inline, nothing fetched from elsewhere).
pub(crate) const PAGE: &str = include_str!("page.html");

/// What the page may load: itself, and requests to this server only.
const PAGE_CSP: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'";

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::BadInput(m) => Self::bad_request(m),
            EngineError::Internal(m) => {
                tracing::error!("predict: {m}");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.message }));
        (self.status, body).into_response()
    }
}

/// `POST /api/predict` with `Content-Type: application/json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PixelsRequest {
    /// 784 grey levels, row by row (28x28), whole numbers 0-255.
    pixels: Vec<f64>,
    /// Run the pixels through the MNIST preprocessing (as a PNG is) instead of taking them as the model's
    /// input as they are.
    #[serde(default)]
    preprocess: bool,
}

/// The answer of `POST /api/predict`.
#[derive(Debug, Serialize)]
pub(crate) struct PredictResponse {
    #[serde(flatten)]
    prediction: Prediction,
    /// The 784 grey levels the model saw (after preprocessing), row by row.
    pixels: Vec<u8>,
}

/// `GET /`.
pub(crate) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(PAGE),
    )
}

/// `GET /api/model`.
pub(crate) async fn model(State(state): State<AppState>) -> Json<ModelInfo> {
    Json(state.info().clone())
}

/// What a predict request's body is, from its `Content-Type`.
enum BodyKind {
    Image,
    Pixels,
}

const ACCEPTED: &str = "send image/png (or image/jpeg) or application/json";

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::bad_request(format!(
            "missing Content-Type: {ACCEPTED}"
        )));
    };
    let text = value.to_str().unwrap_or("");
    let media = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "image/png" | "image/jpeg" => Ok(BodyKind::Image),
        "application/json" => Ok(BodyKind::Pixels),
        _ => Err(ApiError::bad_request(format!(
            "Content-Type '{text}' is not accepted: {ACCEPTED}"
        ))),
    }
}

/// How far past the size limit an oversize body is still read (and thrown away) so that the client, still
/// sending, gets the 413 instead of a reset connection. Larger bodies are answered at once.
const DRAIN_LIMIT: usize = 16 << 20;

/// The request body, within the size limit and the time limit. An oversize body (by its Content-Length or
/// as it arrives) is a 413; it is read to its end, up to [`DRAIN_LIMIT`] more bytes, before the answer.
async fn read_body(state: &AppState, req: Request) -> Result<Vec<u8>, ApiError> {
    let limit = state.config().body_limit;
    let timeout = state.config().read_timeout;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > (limit + DRAIN_LIMIT) as u64) {
        return Err(too_large());
    }
    let mut oversize = declared.is_some_and(|n| n > limit as u64);
    let mut body = req.into_body();
    let mut bytes = Vec::new();
    let mut drained = 0usize;
    let read = async {
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            if !oversize && bytes.len() + data.len() > limit {
                oversize = true;
                bytes = Vec::new();
            }
            if oversize {
                drained += data.len();
                if drained > DRAIN_LIMIT {
                    break;
                }
            } else {
                bytes.extend_from_slice(&data);
            }
        }
        Ok::<(), ApiError>(())
    };
    let outcome = tokio::time::timeout(timeout, read).await;
    match outcome {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        )),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) if oversize => Err(too_large()),
        Ok(Ok(())) => Ok(bytes),
    }
}

/// The 784 validated grey levels of a JSON body, and whether to preprocess them.
fn parse_pixels(bytes: &[u8]) -> Result<(Vec<u8>, bool), ApiError> {
    let req: PixelsRequest = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    if req.pixels.len() != IMAGE_PIXELS {
        return Err(ApiError::bad_request(format!(
            "pixels: expected {IMAGE_PIXELS} values (28x28, row by row), got {}",
            req.pixels.len()
        )));
    }
    let mut pixels = Vec::with_capacity(IMAGE_PIXELS);
    for (i, &v) in req.pixels.iter().enumerate() {
        if !(0.0..=255.0).contains(&v) || v.fract() != 0.0 {
            return Err(ApiError::bad_request(format!(
                "pixels[{i}] is {v}: every value must be a whole number from 0 to 255"
            )));
        }
        pixels.push(v as u8);
    }
    Ok((pixels, req.preprocess))
}

/// `POST /api/predict`: a PNG/JPEG (preprocessed like `predict`'s files) or 784 pixels as JSON (the model's
/// input as it is, or preprocessed with `"preprocess": true`).
pub(crate) async fn predict(
    State(state): State<AppState>,
    req: Request,
) -> Result<Json<PredictResponse>, ApiError> {
    // The body is read (or drained) before any error is answered: a client still sending gets the answer,
    // not a reset connection.
    let kind = body_kind(req.headers());
    let bytes = read_body(&state, req).await?;
    let kind = kind?;
    let engine = state.engine();
    let pixels = match kind {
        BodyKind::Image => engine.decode(bytes).await?,
        BodyKind::Pixels => match parse_pixels(&bytes)? {
            (pixels, true) => engine.refit(pixels).await?,
            (pixels, false) => {
                if pixels.iter().all(|&p| p == pixels[0]) {
                    return Err(ApiError::bad_request(format!(
                        "the image is blank: all {IMAGE_PIXELS} pixels are {}",
                        pixels[0]
                    )));
                }
                pixels
            }
        },
    };
    let prediction = engine.classify(pixels.clone()).await?;
    tracing::debug!(digit = prediction.digit, "predicted");
    Ok(Json(PredictResponse { prediction, pixels }))
}

/// Any route that does not exist.
pub(crate) async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {method} {}: the API is GET /api/model and POST /api/predict, the page is GET /",
            uri.path()
        ),
    )
}

/// A route that exists, asked with another method.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allowed = match uri.path() {
        "/api/predict" => "POST",
        _ => "GET",
    };
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}: use {allowed}", uri.path()),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = content_type {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn content_types_pick_the_body_kind() {
        for ct in ["image/png", "IMAGE/PNG", "image/jpeg", "image/png; q=1"] {
            assert!(
                matches!(body_kind(&headers(Some(ct))), Ok(BodyKind::Image)),
                "{ct}"
            );
        }
        for ct in ["application/json", "application/json; charset=utf-8"] {
            assert!(
                matches!(body_kind(&headers(Some(ct))), Ok(BodyKind::Pixels)),
                "{ct}"
            );
        }
        for ct in [Some("text/plain"), Some("image/gif"), Some(""), None] {
            let err = body_kind(&headers(ct)).err().expect("refused");
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.contains("Content-Type"), "{}", err.message);
        }
    }

    #[test]
    fn pixels_are_checked_one_by_one() {
        let mut values = vec![0u32; IMAGE_PIXELS];
        values[3] = 255;
        let body = serde_json::json!({ "pixels": values }).to_string();
        let (pixels, preprocess) = parse_pixels(body.as_bytes()).unwrap();
        assert_eq!(
            (pixels[3], pixels.len(), preprocess),
            (255, IMAGE_PIXELS, false)
        );
        let body = serde_json::json!({ "pixels": values, "preprocess": true }).to_string();
        assert!(parse_pixels(body.as_bytes()).unwrap().1);

        let refused = |body: String, says: &str| {
            let err = parse_pixels(body.as_bytes()).expect_err(&body);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.contains(says), "{body}: {}", err.message);
        };
        refused(
            serde_json::json!({ "pixels": [1, 2, 3] }).to_string(),
            "got 3",
        );
        for bad in [256.0, -1.0, 0.5] {
            let mut v: Vec<f64> = vec![0.0; IMAGE_PIXELS];
            v[700] = bad;
            refused(
                serde_json::json!({ "pixels": v }).to_string(),
                "pixels[700]",
            );
        }
        refused(r#"{"pixels": [1, 2"#.to_string(), "invalid JSON");
        refused(r#"{"pixels": [], "extra": 1}"#.to_string(), "unknown field");
        refused("[]".to_string(), "invalid JSON");
    }
}

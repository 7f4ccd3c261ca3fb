//! The draw-a-digit server (`mnist-serve`, `solution-* serve`) over real HTTP on an ephemeral port: real
//! MNIST test digits as PNG drawings and as pixel JSON, every kind of bad request, 200 requests at once,
//! a slow body, a clean shutdown, and the binary's `serve` stopping on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader, Cursor};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, mnist_dir_if_present};
use image::imageops::FilterType;
use image::{GrayImage, ImageFormat, Luma};
use mnist_challenge::data::{load_dir, Split, VALIDATION_SIZE};
use mnist_challenge::models::{pretrained, pretrained_info, Solution, Variant};
use mnist_challenge::serve::{self, AppState, ModelInfo, ServeConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The real MNIST test split, or `None` (skipped) when the files are absent outside CI.
fn test_split() -> Option<Split> {
    let dir = mnist_dir_if_present()?;
    Some(load_dir(&dir, VALIDATION_SIZE).expect("load MNIST").test)
}

/// A server running in this process on 127.0.0.1:0, with the pretrained conv/improved model.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), serve::ServeError>>,
}

impl Server {
    async fn start(config: ServeConfig) -> Self {
        let classifier = pretrained(Solution::Conv, Variant::Improved).expect("pretrained model");
        let accuracy = pretrained_info(Solution::Conv, Variant::Improved).test_accuracy();
        let info = ModelInfo::of(&classifier, Some(accuracy), "pretrained");
        let state = AppState::new(classifier, info, config).expect("state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server and checks that it stopped cleanly, within a bound.
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
        let done = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server did not stop within 20 s of the shutdown signal");
        done.expect("server task panicked")
            .expect("server returned an error");
    }
}

/// Test digit `i` as a canvas drawing: blown up to 280x280, dark ink on white, as a PNG.
fn drawing_png(test: &Split, i: usize) -> Vec<u8> {
    let img = GrayImage::from_raw(28, 28, test.image(i).to_vec()).unwrap();
    let mut big = image::imageops::resize(&img, 280, 280, FilterType::Triangle);
    image::imageops::invert(&mut big);
    png(&big)
}

/// An HTTP client that gives up on any one request after 60 s, so a hung connection fails the test.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

fn png(img: &GrayImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let response = client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url} ({content_type}): {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.expect("response body");
    let value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("POST {url} ({content_type}): {status}, not JSON ({e}): {text}")
    });
    (status, value)
}

/// Checks a successful predict answer's shape and returns its digit.
fn digit_of(body: &Value) -> u8 {
    let probs = body["probabilities"].as_array().expect("probabilities");
    assert_eq!(probs.len(), 10, "{body}");
    let sum: f64 = probs.iter().map(|p| p.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-3, "probabilities sum to {sum}");
    assert_eq!(body["pixels"].as_array().expect("pixels").len(), 784);
    body["digit"].as_u64().expect("digit") as u8
}

fn pixels_json(pixels: &[u8], preprocess: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({ "pixels": pixels, "preprocess": preprocess })).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classifies_real_test_digits_as_png_and_as_pixels() {
    let Some(test) = test_split() else { return };
    let server = Server::start(ServeConfig::default()).await;
    let client = client();

    let (status, info) = {
        let r = client.get(server.url("/api/model")).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200);
    assert_eq!(info["solution"], "conv");
    assert_eq!(info["variant"], "improved");
    assert!(info["params"].as_u64().unwrap() < 10_000, "{info}");
    assert!(info["test_accuracy"].as_f64().unwrap() > 0.99, "{info}");

    let page = client.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("<canvas") && html.contains("api/predict"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page must not load anything from elsewhere"
    );

    let n = 200;
    let predict = server.url("/api/predict");
    let (mut png_right, mut raw_right, mut refit_right) = (0, 0, 0);
    for i in 0..n {
        let label = test.label(i);
        let (status, body) = post(&client, &predict, "image/png", drawing_png(&test, i)).await;
        assert_eq!(status, 200, "digit {i} as PNG: {body}");
        png_right += usize::from(digit_of(&body) == label);

        let (status, body) = post(
            &client,
            &predict,
            "application/json",
            pixels_json(test.image(i), false),
        )
        .await;
        assert_eq!(status, 200, "digit {i} as pixels: {body}");
        raw_right += usize::from(digit_of(&body) == label);
        // Raw pixels are the model's input as they are.
        let seen: Vec<u64> = body["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(seen.iter().zip(test.image(i)).all(|(&a, &b)| a == b as u64));

        let (status, body) = post(
            &client,
            &predict,
            "application/json; charset=utf-8",
            pixels_json(test.image(i), true),
        )
        .await;
        assert_eq!(status, 200, "digit {i} as preprocessed pixels: {body}");
        refit_right += usize::from(digit_of(&body) == label);
    }
    eprintln!("right of {n}: PNG drawings {png_right}, raw pixels {raw_right}, preprocessed pixels {refit_right}");
    for (what, right) in [
        ("PNG drawings", png_right),
        ("raw pixels", raw_right),
        ("preprocessed pixels", refit_right),
    ] {
        assert!(
            right * 100 >= n * 95,
            "{what}: {right} of {n} right, expected at least 95%"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_with_the_right_status() {
    let Some(test) = test_split() else { return };
    let server = Server::start(ServeConfig::default()).await;
    let client = client();
    let predict = server.url("/api/predict");
    let good = test.image(0).to_vec();

    let mut bad: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "wrong content type",
            "text/plain",
            b"hello".to_vec(),
            400,
            "Content-Type",
        ),
        (
            "form content type",
            "application/x-www-form-urlencoded",
            b"a=1".to_vec(),
            400,
            "Content-Type",
        ),
        (
            "malformed JSON",
            "application/json",
            br#"{"pixels": [1, 2"#.to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "JSON without pixels",
            "application/json",
            br#"{"pixel": []}"#.to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "pixels not numbers",
            "application/json",
            br#"{"pixels": "abc"}"#.to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "783 pixels",
            "application/json",
            pixels_json(&good[..783], false),
            400,
            "expected 784",
        ),
        (
            "785 pixels",
            "application/json",
            serde_json::to_vec(&json!({ "pixels": vec![7; 785] })).unwrap(),
            400,
            "expected 784",
        ),
        (
            "blank pixels",
            "application/json",
            pixels_json(&[0; 784], false),
            400,
            "blank",
        ),
        (
            "blank pixels, preprocessed",
            "application/json",
            pixels_json(&[255; 784], true),
            400,
            "blank",
        ),
        (
            "blank PNG",
            "image/png",
            png(&GrayImage::from_pixel(280, 280, Luma([255]))),
            400,
            "blank",
        ),
        (
            "not a PNG",
            "image/png",
            b"GIF89a this is not a png at all".to_vec(),
            400,
            "not a readable PNG",
        ),
        (
            "truncated PNG",
            "image/png",
            drawing_png(&test, 0)[..100].to_vec(),
            400,
            "not a readable PNG",
        ),
        (
            "empty body",
            "image/png",
            Vec::new(),
            400,
            "not a readable PNG",
        ),
        (
            "huge image",
            "image/png",
            png(&GrayImage::new(5000, 2)),
            400,
            "at most 4096",
        ),
        (
            "oversize body",
            "image/png",
            vec![0u8; 5 << 20],
            413,
            "larger than the limit",
        ),
    ];
    for (value, what) in [(256.0, "256"), (-1.0, "-1"), (1.5, "1.5")] {
        let mut pixels: Vec<f64> = good.iter().map(|&p| p as f64).collect();
        pixels[10] = value;
        bad.push((
            what,
            "application/json",
            serde_json::to_vec(&json!({ "pixels": pixels })).unwrap(),
            400,
            "pixels[10]",
        ));
    }
    for (what, content_type, body, want, says) in bad {
        let (status, answer) = post(&client, &predict, content_type, body).await;
        assert_eq!(status, want, "{what}: {answer}");
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error field: {answer}"));
        assert!(
            error.contains(says),
            "{what}: error {error:?} should say {says:?}"
        );
    }

    // No Content-Type at all.
    let r = client
        .post(&predict)
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let answer: Value = r.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("missing Content-Type"),
        "{answer}"
    );

    // Unknown routes and wrong methods.
    for (method, path, want) in [
        ("GET", "/nope", 404),
        ("POST", "/api/nope", 404),
        ("GET", "/api/predict", 405),
        ("POST", "/api/model", 405),
        ("DELETE", "/", 405),
    ] {
        let r = client
            .request(method.parse().unwrap(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{method} {path}");
        if want == 405 {
            assert!(
                r.headers().contains_key("allow"),
                "{method} {path}: no Allow header"
            );
        }
        let answer: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON: {e}"));
        assert!(
            answer["error"].as_str().unwrap().contains(path),
            "{method} {path}: {answer}"
        );
    }

    // After all that, the server still answers.
    let (status, body) = post(
        &client,
        &predict,
        "application/json",
        pixels_json(&good, false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(digit_of(&body), test.label(0));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_200_concurrent_requests() {
    let Some(test) = test_split() else { return };
    let server = Server::start(ServeConfig::default()).await;
    let client = client();
    let predict = server.url("/api/predict");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (client, predict, label) = (client.clone(), predict.clone(), test.label(i));
        let (content_type, body) = if i % 2 == 0 {
            ("image/png", drawing_png(&test, i))
        } else {
            ("application/json", pixels_json(test.image(i), false))
        };
        tasks.spawn(async move {
            let (status, body) = post(&client, &predict, content_type, body).await;
            assert_eq!(status, 200, "request {i}: {body}");
            digit_of(&body) == label
        });
    }
    let all = async {
        let mut right = 0;
        while let Some(done) = tasks.join_next().await {
            right += usize::from(done.expect("request task"));
        }
        right
    };
    let right = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("200 concurrent requests were not all answered within 60 s");
    eprintln!("200 concurrent requests: {right} right");
    assert!(right >= 190, "{right} of 200 right");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_times_out_and_shutdown_is_clean() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let config = ServeConfig {
        read_timeout: Duration::from_millis(500),
        ..ServeConfig::default()
    };
    let server = Server::start(config).await;
    // Headers promising 100 bytes, then nothing: a 408 with a JSON error, not a connection held forever.
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            if reply.windows(8).any(|w| w == b"\"error\":") && reply.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a stalled body within 20 s");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within"), "{text}");
    // An idle keep-alive connection does not hold the shutdown up.
    let _idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    server.shutdown().await;
}

#[test]
fn the_serve_command_answers_and_stops_on_ctrl_c() {
    if mnist_dir_if_present().is_none() {
        return;
    }
    let mut child = Command::new(bin("solution-conv"))
        .args(["serve", "--variant", "seed", "--addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start solution-conv serve");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read the serve banner");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches('/')
        .to_string();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let info: Value = runtime.block_on(async {
        reqwest::get(format!("{url}/api/model"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(info["solution"], "conv", "{info}");
    assert_eq!(info["variant"], "seed", "{info}");

    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(kill.success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("serve did not stop within 20 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        status.success(),
        "serve exited with {status} after Ctrl-C: {stderr}"
    );
}

#[test]
fn the_serve_command_refuses_a_bad_address_or_a_busy_port() {
    let out = common::run("solution-conv", &["serve", "--addr", "localhost:eighty"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--addr"));

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = common::run("solution-conv", &["serve", "--addr", &addr]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

//! The draw-a-digit page in a real browser: runs `tests/browser/draw.mjs` (playwright-core driving Debian's
//! headless `chromium`) against `solution-conv serve`. It draws real MNIST test digits on the canvas with
//! mouse strokes and checks that the page reads at least 8 of 10 right, saves a screenshot and stops the
//! server with Ctrl-C.
//!
//! Needs `node`, `chromium` (`$CHROMIUM`, else `/usr/bin/chromium`) and `npm ci` run in `tests/browser`
//! (`.ci/run` does all three). Without them the test is skipped with a notice, except under `CI=true`,
//! where it fails.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, mnist_dir_if_present};

/// What the browser test needs that is not there.
fn missing_tools(chromium: &Path, browser_dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        missing.push("node (apt-get install nodejs npm)".to_string());
    }
    if !chromium.is_file() {
        missing.push(format!(
            "{} (apt-get install chromium, or set CHROMIUM)",
            chromium.display()
        ));
    }
    if !browser_dir.join("node_modules/playwright-core").is_dir() {
        missing.push(format!(
            "playwright-core (run `npm ci` in {})",
            browser_dir.display()
        ));
    }
    missing
}

/// Reads a child's pipe to the end on its own thread, so a full pipe never stalls the child.
fn drain(pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut pipe = pipe;
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

#[test]
fn the_page_reads_digits_drawn_with_the_mouse() {
    let Some(mnist) = mnist_dir_if_present() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let missing = missing_tools(&chromium, &browser_dir);
    if !missing.is_empty() {
        let msg = format!("the browser test needs {}", missing.join(", "));
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let screenshot = out.path().join("serve.png");
    let mut child = Command::new("node")
        .arg(browser_dir.join("draw.mjs"))
        .arg("--bin")
        .arg(bin("solution-conv"))
        .arg("--mnist")
        .arg(&mnist)
        .arg("--chromium")
        .arg(&chromium)
        .arg("--screenshot")
        .arg(&screenshot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    println!("{stdout}");
    eprintln!("{stderr}");
    let status = status.unwrap_or_else(|| panic!("the browser test did not finish within 300 s"));
    assert!(
        status.success(),
        "the browser test failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("serve stopped cleanly"), "{stdout}");
    let shot = image::open(&screenshot)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()));
    assert!(
        shot.width() >= 400 && shot.height() >= 300,
        "screenshot {}x{}",
        shot.width(),
        shot.height()
    );
}

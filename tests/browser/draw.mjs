#!/usr/bin/env node
// The draw-a-digit page in a real browser: starts `solution-conv serve` on a free port, opens the page in
// headless Chromium (Debian's `chromium`, driven by playwright-core), draws real MNIST test digits on the
// canvas with mouse strokes (each row of a digit's ink, scaled up, as one stroke), and checks that the page
// shows the right digit for most of them. Saves a screenshot of the page with test digit --shot drawn. Stops the server with
// Ctrl-C (SIGINT) and checks that it exits cleanly.
//
//   node tests/browser/draw.mjs [--bin target/release/solution-conv] [--mnist $MNIST_DIR]
//       [--chromium /usr/bin/chromium] [--screenshot docs/serve.png] [--shot 0] [--count 10] [--min 8]
//
// Exit code 0 when at least --min of the --count digits are read right, 1 otherwise.

import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { gunzipSync } from "node:zlib";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");

function options() {
  const opts = {
    bin: path.join(root, "target/release/solution-conv"),
    mnist: process.env.MNIST_DIR || path.join(root, "../shared/data/mnist"),
    chromium: process.env.CHROMIUM || "/usr/bin/chromium",
    screenshot: path.join(root, "docs/serve.png"),
    shot: 0,
    count: 10,
    min: 8,
  };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in opts) || argv[i + 1] === undefined) {
      throw new Error(`unknown or incomplete option ${argv[i]} (see the header of ${path.basename(import.meta.url)})`);
    }
    opts[key] = typeof opts[key] === "number" ? Number(argv[i + 1]) : argv[i + 1];
  }
  return opts;
}

// An IDX file of the MNIST folder, raw or gzipped.
function readIdx(dir, name) {
  const raw = path.join(dir, name);
  if (existsSync(raw)) return readFileSync(raw);
  if (existsSync(`${raw}.gz`)) return gunzipSync(readFileSync(`${raw}.gz`));
  throw new Error(`no ${raw} or ${raw}.gz (set MNIST_DIR or --mnist)`);
}

function testDigits(dir, count) {
  const images = readIdx(dir, "t10k-images-idx3-ubyte");
  const labels = readIdx(dir, "t10k-labels-idx1-ubyte");
  if (images.readUInt32BE(0) !== 2051 || labels.readUInt32BE(0) !== 2049) throw new Error("not MNIST IDX files");
  const digits = [];
  for (let i = 0; i < count; i++) {
    digits.push({ index: i, label: labels[8 + i], pixels: images.subarray(16 + 784 * i, 16 + 784 * (i + 1)) });
  }
  return digits;
}

// Grey level from which a pixel counts as ink.
const INK = 128;

// The strokes that draw a digit: every horizontal run of ink (grey level >= INK) in each row, as
// [x0, x1, y] in 28x28 pixel coordinates (pixel centres).
function strokes(pixels) {
  const out = [];
  for (let y = 0; y < 28; y++) {
    let start = -1;
    for (let x = 0; x <= 28; x++) {
      const ink = x < 28 && pixels[28 * y + x] >= INK;
      if (ink && start < 0) start = x;
      if (!ink && start >= 0) { out.push([start + 0.5, x - 0.5, y + 0.5]); start = -1; }
    }
  }
  return out;
}

// Starts the server on a free port; resolves with its URL once it says where it listens.
function startServer(bin) {
  const server = spawn(bin, ["serve", "--addr", "127.0.0.1:0"], {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const url = new Promise((resolve, reject) => {
    let seen = "";
    const timer = setTimeout(() => reject(new Error(`${bin} serve did not say where it listens within 60 s`)), 60000);
    server.stdout.on("data", (chunk) => {
      seen += chunk;
      const m = seen.match(/http:\/\/[^\s/]+\//);
      if (m) { clearTimeout(timer); resolve(m[0]); }
    });
    server.on("error", (e) => { clearTimeout(timer); reject(new Error(`cannot start ${bin}: ${e.message}`)); });
    server.on("exit", (code) => { clearTimeout(timer); reject(new Error(`${bin} serve exited early with ${code}`)); });
  });
  return { server, url };
}

// Sends SIGINT and waits for the exit; resolves with the exit code (null if it had to be killed).
function stopServer(server) {
  if (server.exitCode !== null) return Promise.resolve(server.exitCode);
  return new Promise((resolve) => {
    const timer = setTimeout(() => { server.kill("SIGKILL"); resolve(null); }, 15000);
    server.once("exit", (code) => { clearTimeout(timer); resolve(code); });
    server.kill("SIGINT");
  });
}

async function drawDigit(page, digit) {
  await page.click("#clear");
  const box = await page.locator("#pad").boundingBox();
  // The digit's 28x28 field over the whole canvas, as a person would draw it.
  const s = box.width / 28;
  for (const [x0, x1, y] of strokes(digit.pixels)) {
    await page.mouse.move(box.x + x0 * s, box.y + y * s);
    await page.mouse.down();
    await page.mouse.move(box.x + x1 * s, box.y + y * s, { steps: Math.max(1, Math.round(x1 - x0)) });
    await page.mouse.up();
  }
  // The answer on show is the one for the finished drawing.
  await page.waitForFunction(() => {
    const pad = document.getElementById("pad");
    const answer = document.getElementById("answer");
    return answer.dataset.state === "idle" && answer.dataset.version === pad.dataset.version;
  }, null, { timeout: 30000 });
  return page.evaluate(() => {
    const answer = document.getElementById("answer");
    return {
      digit: answer.dataset.digit,
      answers: Number(answer.dataset.answers),
      message: document.getElementById("message").textContent,
    };
  });
}

let running = null; // the server, for the deadline to stop

async function main() {
  const opts = options();
  const digits = testDigits(opts.mnist, opts.count);
  const { server, url } = startServer(opts.bin);
  running = server;
  const profile = mkdtempSync(path.join(tmpdir(), "mnist-serve-chromium-"));
  let browser = null;
  let right = 0;
  try {
    const address = await url;
    browser = await chromium.launchPersistentContext(profile, {
      executablePath: opts.chromium,
      headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
      viewport: { width: 820, height: 640 },
      deviceScaleFactor: 1,
    });
    const page = browser.pages()[0] || (await browser.newPage());
    const problems = [];
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    page.on("console", (m) => { if (m.type() === "error") problems.push(`console error: ${m.text()}`); });
    page.on("request", (r) => { if (!r.url().startsWith(address)) problems.push(`request outside the server: ${r.url()}`); });
    await page.goto(address);
    await page.waitForFunction(() => document.getElementById("model").textContent.includes("parameters"), null, { timeout: 30000 });
    console.log(`model: ${await page.textContent("#model")}`);
    for (const digit of digits) {
      const shown = await drawDigit(page, digit);
      const ok = shown.digit === String(digit.label);
      right += ok ? 1 : 0;
      console.log(`test digit ${digit.index}: label ${digit.label}, the page shows ${shown.digit || "nothing"}` +
        ` after ${shown.answers} live answers${ok ? "" : "  <-- wrong"}${shown.message ? ` (${shown.message})` : ""}`);
      if (!(shown.answers > 1)) problems.push(`test digit ${digit.index}: only ${shown.answers} answer while drawing`);
      if (digit.index === opts.shot) {
        mkdirSync(path.dirname(path.resolve(opts.screenshot)), { recursive: true });
        await page.screenshot({ path: opts.screenshot, fullPage: true });
        console.log(`screenshot of test digit ${digit.index}: ${opts.screenshot}`);
      }
    }
    console.log(`${right} of ${digits.length} drawn digits read right (at least ${opts.min} needed)`);
    if (problems.length) throw new Error(problems.join("\n"));
  } finally {
    if (browser) await browser.close();
    rmSync(profile, { recursive: true, force: true });
    const code = await stopServer(server);
    if (code !== 0) throw new Error(`serve exited with ${code} after SIGINT, expected 0`);
    console.log("serve stopped cleanly on SIGINT");
  }
  if (right < opts.min) throw new Error(`only ${right} of ${digits.length} digits read right`);
}

const deadline = setTimeout(() => {
  console.error("error: the browser test took over 240 s");
  if (running) running.kill("SIGKILL");
  process.exit(1);
}, 240000);
main().then(() => clearTimeout(deadline), (e) => { console.error(`error: ${e.message}`); clearTimeout(deadline); process.exitCode = 1; });

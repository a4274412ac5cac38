//! `xfuser serve` end to end: the real binary on the bundled model, listening on an ephemeral
//! loopback port, driven by a real HTTP client. Checks that the PNG equals the CLI's for the
//! same arguments, that the OpenAI route returns `n` images, that a full queue answers 503 and
//! the server stays healthy, that every bad input gets its status and a JSON one-line error,
//! that a failed generation answers 500 without stopping the server, and that SIGTERM ends the
//! process with status 0 after the request in progress.
//!
//! Every request is small (2 steps, 64×64) and every wait is bounded.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use xfuser::core::testing::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(120);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The binary with a hermetic environment: offline, an empty private Hub cache.
fn xfuser() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xfuser"));
    for var in [
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "RUST_LOG",
        "HF_HOME",
        "HF_HUB_CACHE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd.env(
        "HF_HUB_CACHE",
        std::env::temp_dir().join("xfuser-serve-test-no-such-hub-cache"),
    );
    cmd
}

/// A running `xfuser serve`, killed when dropped if it is still running.
struct Server {
    child: Child,
    base: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let mut child = xfuser()
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xfuser serve");
        // Drain both pipes so the server never blocks on a full one.
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut all = stderr.lock().unwrap();
                    all.push_str(&line);
                    all.push('\n');
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        let pipe = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let base = match rx.recv_timeout(START_TIMEOUT) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server printed no address; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Self {
            child,
            base,
            stderr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits (bounded) for the process to end.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A response, error statuses included.
struct Reply {
    status: u16,
    content_type: String,
    retry_after: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            )
        })
    }

    /// The `error` of an error answer, checked to be one line.
    fn error(&self) -> String {
        let json = self.json();
        let message = json["error"]
            .as_str()
            .expect("an `error` string")
            .to_string();
        assert!(!message.contains('\n'), "multi-line error: {message}");
        message
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(REQUEST_TIMEOUT).build()
}

fn reply(result: Result<ureq::Response, ureq::Error>) -> Reply {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = response.status();
    let content_type = response.header("content-type").unwrap_or("").to_string();
    let retry_after = response.header("retry-after").map(str::to_string);
    let mut body = Vec::new();
    response
        .into_reader()
        .take(64 << 20)
        .read_to_end(&mut body)
        .expect("read body");
    Reply {
        status,
        content_type,
        retry_after,
        body,
    }
}

fn get(url: &str) -> Reply {
    reply(agent().get(url).call())
}

fn post(url: &str, body: &str) -> Reply {
    reply(
        agent()
            .post(url)
            .set("Content-Type", "application/json")
            .send_string(body),
    )
}

/// The PNGs `xfuser generate` writes for these flags (bundled model, 2 steps, 64×64).
fn cli_pngs(flags: &[&str]) -> Vec<Vec<u8>> {
    let out = TempDir::new("cli");
    let output = xfuser()
        .args([
            "generate",
            "--num-inference-steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--quiet",
            "--output-dir",
        ])
        .arg(out.path())
        .args(flags)
        .output()
        .expect("run xfuser generate");
    assert!(
        output.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|path| std::fs::read(path).expect("read the CLI's PNG"))
        .collect()
}

fn assert_png(bytes: &[u8], width: u32, height: u32) {
    let image = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a decodable PNG");
    assert_eq!((image.width(), image.height()), (width, height));
}

const QUICK: &str = r#""num_inference_steps": 2, "height": 64, "width": 64"#;

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn health_page_and_the_cli_png() {
    let server = Server::start(&[]);
    let health = get(&server.url("/health"));
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    assert_eq!(health.json()["model"], "tiny-pixart-shapes");

    let page = get(&server.url("/"));
    assert_eq!(page.status, 200);
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains("<textarea id=\"prompt\""));
    assert!(html.contains("/generate"));

    // xDiT's fields, `cfg` for the guidance scale: the same bytes as the CLI's file.
    let served = post(
        &server.url("/generate"),
        &format!(
            r#"{{"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7,
                "cfg": 3.0, {QUICK}}}"#
        ),
    );
    assert_eq!(
        served.status,
        200,
        "{}",
        String::from_utf8_lossy(&served.body)
    );
    assert_eq!(served.content_type, "image/png");
    assert_png(&served.body, 64, 64);
    let cli = cli_pngs(&[
        "--prompt",
        "a red fox",
        "--negative-prompt",
        "blurry",
        "--seed",
        "7",
        "--guidance-scale",
        "3.0",
    ]);
    assert_eq!(cli.len(), 1);
    assert!(
        served.body == cli[0],
        "the served PNG differs from the CLI's"
    );

    // Another seed, another image.
    let other = post(
        &server.url("/generate"),
        &format!(
            r#"{{"prompt": "a red fox", "negative_prompt": "blurry", "seed": 8, "guidance_scale": 3.0, {QUICK}}}"#
        ),
    );
    assert_eq!(other.status, 200);
    assert!(other.body != served.body);

    // One log line per request, with its timings and status.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.stderr();
        let line = log
            .lines()
            .find(|l| l.contains("route=\"/generate\"") && l.contains("status=200"));
        if let Some(line) = line {
            for field in ["id=", "size=64x64", "steps=2", "queue_wait_ms=", "run_ms="] {
                assert!(line.contains(field), "log line lacks {field}: {line}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "no request log line in:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn openai_route_returns_n_images() {
    let server = Server::start(&[]);
    let reply = post(
        &server.url("/v1/images/generations"),
        r#"{"prompt": "a lighthouse", "n": 2, "size": "64x64", "response_format": "b64_json",
            "num_inference_steps": 2, "seed": 3}"#,
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let json = reply.json();
    assert!(json["created"].as_u64().is_some_and(|t| t > 1_600_000_000));
    let data = json["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    let images: Vec<Vec<u8>> = data
        .iter()
        .map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().expect("b64_json"))
                .expect("base64")
        })
        .collect();
    for image in &images {
        assert_png(image, 64, 64);
    }
    let cli = cli_pngs(&[
        "--prompt",
        "a lighthouse",
        "--seed",
        "3",
        "--num-images-per-prompt",
        "2",
    ]);
    assert!(images == cli, "the served images differ from the CLI's");
}

#[test]
fn bad_requests_get_their_status() {
    let server = Server::start(&["--fail-on-prompt", "boom"]);
    let generate_url = server.url("/generate");
    let openai_url = server.url("/v1/images/generations");
    let nowhere_url = server.url("/nowhere");
    let (generate, openai, nowhere) = (
        generate_url.as_str(),
        openai_url.as_str(),
        nowhere_url.as_str(),
    );

    let cases: &[(&str, String, u16, &str)] = &[
        (generate, "{not json".into(), 400, "invalid JSON"),
        (generate, "[1, 2]".into(), 400, "invalid JSON"),
        (generate, format!("{{{QUICK}}}"), 400, "--prompt"),
        (
            generate,
            r#"{"prompt": "a", "num_inference_steps": -1}"#.into(),
            400,
            "invalid JSON",
        ),
        (
            generate,
            r#"{"prompt": "a", "num_inference_steps": 0}"#.into(),
            400,
            "--num-inference-steps",
        ),
        (
            generate,
            r#"{"prompt": "a", "height": 60, "width": 64}"#.into(),
            400,
            "--height 60",
        ),
        // Off the 2×2 patch grid without binning: refused by the pipeline, still a 400.
        (
            generate,
            // The pipeline refuses it (the bundled model has no aspect-ratio table).
            r#"{"prompt": "a", "height": 64, "width": 64, "use_resolution_binning": true,
                "num_inference_steps": 2}"#
                .into(),
            400,
            "sample_size 16",
        ),
        (
            generate,
            format!(r#"{{"prompt": "a", "save_disk_path": "/tmp/x.png", {QUICK}}}"#),
            400,
            "save_disk_path",
        ),
        (
            openai,
            r#"{"prompt": "a", "response_format": "url"}"#.into(),
            400,
            "url",
        ),
        (
            openai,
            r#"{"prompt": "a", "size": "big"}"#.into(),
            400,
            "size",
        ),
        (openai, r#"{"prompt": "a", "n": 11}"#.into(), 400, "n 11"),
        (
            openai,
            r#"{"prompt": "a", "n": 0}"#.into(),
            400,
            "--num-images-per-prompt",
        ),
        (openai, r#"{"n": 1}"#.into(), 400, "--prompt"),
        (nowhere, "{}".into(), 404, "no such route"),
        // A failure inside generation: 500 with its message.
        (
            generate,
            format!(r#"{{"prompt": "boom", {QUICK}}}"#),
            500,
            "injected failure",
        ),
    ];
    for (url, body, status, needle) in cases {
        let reply = post(url, body);
        assert_eq!(reply.status, *status, "{url} {body}");
        let message = reply.error();
        assert!(
            message.contains(needle),
            "{body}: `{message}` lacks `{needle}`"
        );
    }

    // A known route with the wrong method: 405, still JSON.
    let reply = get(generate);
    assert_eq!(reply.status, 405);
    assert!(reply.error().contains("method"));

    // Over 1 MiB: 413.
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat((1 << 20) + 10));
    let reply = post(generate, &huge);
    assert_eq!(reply.status, 413);
    assert!(reply.error().contains("larger than"));

    // The server carries on after all of that.
    assert_eq!(get(&server.url("/health")).status, 200);
    let ok = post(generate, &format!(r#"{{"prompt": "a", {QUICK}}}"#));
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_png(&ok.body, 64, 64);
}

/// More clients than the queue holds: each gets 200 or 503 (with `Retry-After`), at least one
/// gets its image, every image is the same, and `/health` answers throughout.
#[test]
fn a_full_queue_answers_503_and_stays_healthy() {
    let server = Arc::new(Server::start(&["--max-queue", "1"]));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let server = server.clone();
            std::thread::spawn(move || {
                post(
                    &server.url("/generate"),
                    &format!(r#"{{"prompt": "a crowd", "seed": 1, {QUICK}}}"#),
                )
            })
        })
        .collect();
    for _ in 0..5 {
        assert_eq!(get(&server.url("/health")).status, 200);
        std::thread::sleep(Duration::from_millis(20));
    }
    let replies: Vec<Reply> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let mut images = Vec::new();
    for reply in &replies {
        match reply.status {
            200 => images.push(reply.body.clone()),
            503 => {
                let secs: u64 = reply
                    .retry_after
                    .as_deref()
                    .expect("Retry-After on 503")
                    .parse()
                    .expect("Retry-After in seconds");
                assert!(secs >= 1);
                assert!(reply.error().contains("queue is full"));
            }
            other => panic!("status {other}: {}", String::from_utf8_lossy(&reply.body)),
        }
    }
    assert!(!images.is_empty(), "no client got an image");
    assert!(images.iter().all(|i| *i == images[0]));
    assert_eq!(get(&server.url("/health")).status, 200);
}

/// SIGTERM while a request runs: the request still gets its image, then the process exits 0.
#[test]
fn sigterm_finishes_the_request_and_exits_0() {
    let mut server = Server::start(&[]);
    let url = server.url("/generate");
    let client = std::thread::spawn(move || {
        post(
            &url,
            r#"{"prompt": "slow", "num_inference_steps": 8, "height": 64, "width": 64}"#,
        )
    });
    // Let the request reach the server before the signal.
    std::thread::sleep(Duration::from_millis(300));
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
    let reply = client.join().unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_png(&reply.body, 64, 64);
    assert!(server.stderr().contains("shutting down"));
}

//! `xfuser serve`: an HTTP server that loads the model once and runs requests on it.
//!
//! One worker thread owns the pipeline (and through it the rank group, whose ranks run as
//! threads) and takes requests in arrival order from a bounded queue; the HTTP side (axum on a
//! small tokio runtime) only parses, validates, queues and answers. Routes:
//!
//! - `GET /`: a self-contained HTML page to try the model.
//! - `GET /health`: 200 with the model's name once it is loaded.
//! - `POST /generate`: xDiT's JSON fields → one `image/png`, the bytes `xfuser generate`
//!   writes for the same arguments.
//! - `POST /v1/images/generations`: the OpenAI images API (`b64_json` only).
//!
//! Requests are validated by the code the CLI uses ([`crate::request`]) and refused with its
//! messages. A full queue answers 503 with `Retry-After`; a failed (or panicking) generation
//! answers 500 and the server carries on. SIGTERM or SIGINT stops accepting connections,
//! finishes the request in progress, refuses the queued ones with 503 and returns.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;
use xfuser_core::engine::{InputConfig, OutputType};
use xfuser_core::pipeline::DiffusionPipeline;

use crate::request::GenerateParams;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// An oversized body is read (and dropped) up to this size before the 413 goes out, so the
/// client, which is usually still sending, receives the answer instead of a reset connection.
const MAX_DRAINED_BYTES: usize = 16 << 20;
/// The most images one OpenAI-style request may ask for (the OpenAI API's own limit).
pub const MAX_IMAGES_PER_REQUEST: usize = 10;

const PAGE: &str = include_str!("serve_page.html");

/// How the server listens and queues.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    /// 0: any free port (the bound address is passed to `on_listening`).
    pub port: u16,
    /// Requests that may wait while one runs; more are refused with 503.
    pub max_queue: usize,
    /// Shown by `/health` and the page.
    pub model_name: String,
    /// Text tokens kept per prompt for every request; None: the pipeline's default.
    pub max_sequence_length: Option<usize>,
    /// What a request that leaves a field out gets (steps, guidance, binning): the general
    /// defaults, or the bundled model's own.
    pub defaults: GenerateParams,
    /// Test aid: a request with exactly this prompt panics inside the worker, to check that
    /// a failed generation answers 500 and the server keeps serving. Never set it otherwise.
    pub fail_on_prompt: Option<String>,
}

/// Binds `config.host:config.port`, loads the pipeline with `load`, calls `on_listening` with
/// the bound address and serves until SIGTERM or SIGINT. The port is bound before the (slow)
/// load, so a port already in use fails at once; connections that arrive while the model
/// loads wait and are served once it is ready.
pub fn run(
    config: ServeConfig,
    load: impl FnOnce() -> anyhow::Result<Box<dyn DiffusionPipeline>>,
    on_listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    if config.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let pipeline = load()?;

    let (queue, jobs) = sync_channel::<Message>(config.max_queue);
    let shared = Arc::new(Shared {
        queue: queue.clone(),
        capacity: config.max_queue,
        next_id: AtomicU64::new(1),
        last_run_ms: AtomicU64::new(0),
        shutting_down: AtomicBool::new(false),
        model_name: config.model_name.clone(),
        class_name: pipeline.class_name(),
        max_sequence_length: config.max_sequence_length,
        defaults: config.defaults.clone(),
    });
    let worker = {
        let shared = shared.clone();
        let fail_on_prompt = config.fail_on_prompt.clone();
        std::thread::Builder::new()
            .name("xfuser-worker".into())
            .spawn(move || work(pipeline, jobs, &shared, fail_on_prompt.as_deref()))
            .context("cannot start the worker thread")?
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("xfuser-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = router(shared.clone());
        on_listening(addr);
        tracing::info!(%addr, model = %config.model_name, "listening");
        let shutdown = {
            let shared = shared.clone();
            async move {
                shutdown_signal().await;
                shared.shutting_down.store(true, Ordering::SeqCst);
                tracing::info!("shutting down: finishing the request in progress");
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    // Every connection has been answered; the worker has nothing left to run.
    shared.shutting_down.store(true, Ordering::SeqCst);
    let _ = queue.send(Message::Stop);
    drop(queue);
    let worker_ok = worker.join().is_ok();
    runtime.shutdown_timeout(Duration::from_secs(1));
    served.context("serving HTTP")?;
    anyhow::ensure!(worker_ok, "the worker thread panicked");
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// What the HTTP handlers and the worker share.
struct Shared {
    queue: SyncSender<Message>,
    capacity: usize,
    next_id: AtomicU64,
    /// How long the last generation took, for `Retry-After`.
    last_run_ms: AtomicU64,
    shutting_down: AtomicBool,
    model_name: String,
    class_name: &'static str,
    max_sequence_length: Option<usize>,
    defaults: GenerateParams,
}

impl Shared {
    /// Seconds until a place in the queue is likely free: the whole queue at the last run's
    /// pace, at least one.
    fn retry_after_secs(&self) -> u64 {
        let run_ms = self.last_run_ms.load(Ordering::Relaxed);
        (run_ms * (self.capacity as u64 + 1))
            .div_ceil(1000)
            .clamp(1, 3600)
    }
}

enum Message {
    Job(Job),
    Stop,
}

struct Job {
    input: InputConfig,
    enqueued: Instant,
    reply: oneshot::Sender<Finished>,
}

/// A job's outcome: PNG bytes per image, or the error to answer with.
struct Finished {
    queue_wait: Duration,
    run: Duration,
    result: Result<Vec<Vec<u8>>, ApiError>,
}

/// The worker: runs queued jobs one at a time, in order, until told to stop.
fn work(
    pipeline: Box<dyn DiffusionPipeline>,
    jobs: Receiver<Message>,
    shared: &Shared,
    fail_on_prompt: Option<&str>,
) {
    while let Ok(Message::Job(job)) = jobs.recv() {
        let queue_wait = job.enqueued.elapsed();
        if job.reply.is_closed() {
            // The client went away while the job waited; nobody would read the image.
            continue;
        }
        if shared.shutting_down.load(Ordering::SeqCst) {
            let result = Err(ApiError::shutting_down());
            let _ = job.reply.send(Finished {
                queue_wait,
                run: Duration::ZERO,
                result,
            });
            continue;
        }
        let started = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if fail_on_prompt.is_some_and(|p| job.input.prompts.iter().any(|q| q == p)) {
                panic!("injected failure (--fail-on-prompt)");
            }
            generate_pngs(pipeline.as_ref(), &job.input)
        }))
        .unwrap_or_else(|panic| {
            Err(ApiError::internal(format!(
                "generation panicked: {}",
                panic_message(panic.as_ref())
            )))
        });
        let run = started.elapsed();
        shared
            .last_run_ms
            .store(run.as_millis() as u64, Ordering::Relaxed);
        let _ = job.reply.send(Finished {
            queue_wait,
            run,
            result,
        });
    }
}

fn generate_pngs(
    pipeline: &dyn DiffusionPipeline,
    input: &InputConfig,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let output = pipeline
        .generate(input, &mut |_, _| {})
        .map_err(ApiError::from_pipeline)?;
    output
        .images
        .iter()
        .map(|image| crate::pipelines::image::encode_rgb_png(image).map_err(ApiError::internal))
        .collect()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An error answer: `{"error": message}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl ToString) -> Self {
        Self {
            status,
            message: message.to_string(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl ToString) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: impl ToString) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY_BYTES} bytes"),
        )
    }

    fn busy(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the queue is full; retry later",
            )
        }
    }

    fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
    }

    /// Input the pipeline refuses once it knows the model (a size off its patch grid, ...)
    /// is the client's error, as in the CLI; anything else failed inside generation.
    fn from_pipeline(err: xfuser_core::Error) -> Self {
        match err {
            xfuser_core::Error::InvalidArgument(_) | xfuser_core::Error::Unsupported(_) => {
                Self::bad_request(err)
            }
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/generate", post(generate))
        .route("/v1/images/generations", post(openai_generations))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn health(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "model": shared.model_name,
        "pipeline": shared.class_name,
        "max_queue": shared.capacity,
    }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// `POST /generate`: xDiT's request fields.
#[derive(Deserialize)]
struct GenerateBody {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    num_inference_steps: Option<usize>,
    seed: Option<u64>,
    height: Option<usize>,
    width: Option<usize>,
    #[serde(alias = "cfg")]
    guidance_scale: Option<f64>,
    use_resolution_binning: Option<bool>,
    /// xDiT writes the image where this says; this server never writes files a client names.
    save_disk_path: Option<serde_json::Value>,
}

/// `POST /v1/images/generations`: OpenAI's fields, plus xDiT's sampling fields.
#[derive(Deserialize)]
struct OpenAiBody {
    prompt: Option<String>,
    n: Option<usize>,
    size: Option<String>,
    response_format: Option<String>,
    negative_prompt: Option<String>,
    num_inference_steps: Option<usize>,
    seed: Option<u64>,
    #[serde(alias = "cfg")]
    guidance_scale: Option<f64>,
    use_resolution_binning: Option<bool>,
}

/// What a validated request asked for, for the log line.
struct Summary {
    size: String,
    steps: usize,
    n: usize,
}

impl Summary {
    fn of(input: &InputConfig) -> Self {
        let dim = |d: Option<usize>| d.map_or_else(|| "default".to_string(), |v| v.to_string());
        Self {
            size: format!("{}x{}", dim(input.width), dim(input.height)),
            steps: input.num_inference_steps,
            n: input.num_images_per_prompt,
        }
    }
}

/// The body, at most [`MAX_BODY_BYTES`] of it.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_DRAINED_BYTES) {
        return Err(ApiError::too_large());
    }
    let mut body = body;
    let mut bytes = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= MAX_BODY_BYTES {
                bytes.extend_from_slice(&data);
            } else if total > MAX_DRAINED_BYTES {
                break;
            }
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(ApiError::too_large());
    }
    Ok(bytes)
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

fn params(
    shared: &Shared,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    num_inference_steps: Option<usize>,
    seed: Option<u64>,
    guidance_scale: Option<f64>,
    use_resolution_binning: Option<bool>,
) -> GenerateParams {
    let defaults = shared.defaults.clone();
    GenerateParams {
        prompts: prompt.into_iter().collect(),
        negative_prompt: negative_prompt.unwrap_or(defaults.negative_prompt),
        num_inference_steps: num_inference_steps.unwrap_or(defaults.num_inference_steps),
        seed: seed.unwrap_or(defaults.seed),
        guidance_scale: guidance_scale.unwrap_or(defaults.guidance_scale),
        use_resolution_binning: use_resolution_binning.unwrap_or(defaults.use_resolution_binning),
        output_type: OutputType::Pil,
        max_sequence_length: shared.max_sequence_length,
        ..defaults
    }
}

fn generate_input(shared: &Shared, bytes: &[u8]) -> Result<InputConfig, ApiError> {
    let body: GenerateBody = parse_json(bytes)?;
    if body.save_disk_path.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad_request(
            "save_disk_path is not supported: the server never writes files a client names; \
             the image is the response body",
        ));
    }
    let mut params = params(
        shared,
        body.prompt,
        body.negative_prompt,
        body.num_inference_steps,
        body.seed,
        body.guidance_scale,
        body.use_resolution_binning,
    );
    params.height = body.height;
    params.width = body.width;
    params.into_input().map_err(ApiError::bad_request)
}

fn openai_input(shared: &Shared, bytes: &[u8]) -> Result<InputConfig, ApiError> {
    let body: OpenAiBody = parse_json(bytes)?;
    match body.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some("url") => {
            return Err(ApiError::bad_request(
                "response_format \"url\" is not supported: this server keeps no files; use \
                 \"b64_json\"",
            ))
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "response_format {other:?} is not supported; use \"b64_json\""
            )))
        }
    }
    let n = body.n.unwrap_or(1);
    if n > MAX_IMAGES_PER_REQUEST {
        return Err(ApiError::bad_request(format!(
            "n {n} is too many: at most {MAX_IMAGES_PER_REQUEST} images per request"
        )));
    }
    let (width, height) = match body.size.as_deref() {
        None | Some("auto") => (None, None),
        Some(size) => {
            let parsed = size
                .split_once(['x', 'X'])
                .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
            let (w, h) = parsed.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "size {size:?} is not WIDTHxHEIGHT in pixels, e.g. \"512x512\""
                ))
            })?;
            (Some(w), Some(h))
        }
    };
    let mut params = params(
        shared,
        body.prompt,
        body.negative_prompt,
        body.num_inference_steps,
        body.seed,
        body.guidance_scale,
        body.use_resolution_binning,
    );
    params.width = width;
    params.height = height;
    params.num_images_per_prompt = n;
    params.into_input().map_err(ApiError::bad_request)
}

/// Queues `input` and waits for the worker's answer.
async fn submit(shared: &Shared, input: InputConfig) -> Finished {
    let refused = |result| Finished {
        queue_wait: Duration::ZERO,
        run: Duration::ZERO,
        result: Err(result),
    };
    if shared.shutting_down.load(Ordering::SeqCst) {
        return refused(ApiError::shutting_down());
    }
    let (reply, answer) = oneshot::channel();
    let job = Job {
        input,
        enqueued: Instant::now(),
        reply,
    };
    match shared.queue.try_send(Message::Job(job)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => return refused(ApiError::busy(shared.retry_after_secs())),
        Err(TrySendError::Disconnected(_)) => return refused(ApiError::shutting_down()),
    }
    answer
        .await
        .unwrap_or_else(|_| refused(ApiError::internal("the worker stopped")))
}

/// Parses, queues and runs one request, logs it, and turns its images into a response.
async fn handle(
    shared: &Shared,
    route: &'static str,
    headers: &HeaderMap,
    body: Body,
    parse: fn(&Shared, &[u8]) -> Result<InputConfig, ApiError>,
    respond: fn(Vec<Vec<u8>>) -> Response,
) -> Response {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let received = Instant::now();
    let parsed = match read_body(headers, body).await {
        Ok(bytes) => parse(shared, &bytes),
        Err(e) => Err(e),
    };
    let (summary, finished) = match parsed {
        Ok(input) => {
            let summary = Summary::of(&input);
            (Some(summary), submit(shared, input).await)
        }
        Err(e) => (
            None,
            Finished {
                queue_wait: Duration::ZERO,
                run: Duration::ZERO,
                result: Err(e),
            },
        ),
    };
    let mut response = match finished.result {
        Ok(images) => respond(images),
        Err(e) => e.into_response(),
    };
    let status = response.status();
    let (size, steps, n) = summary.map_or(("-".into(), 0, 0), |s| (s.size, s.steps, s.n));
    tracing::info!(
        id,
        route,
        size = %size,
        steps,
        n,
        queue_wait_ms = finished.queue_wait.as_millis() as u64,
        run_ms = finished.run.as_millis() as u64,
        total_ms = received.elapsed().as_millis() as u64,
        status = status.as_u16(),
        "request"
    );
    response
        .headers_mut()
        .insert("x-request-id", HeaderValue::from(id));
    response
}

async fn generate(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    handle(
        &shared,
        "/generate",
        &headers,
        body,
        generate_input,
        |mut images| match images.len() {
            0 => ApiError::internal("the pipeline returned no image").into_response(),
            _ => ([(header::CONTENT_TYPE, "image/png")], images.swap_remove(0)).into_response(),
        },
    )
    .await
}

async fn openai_generations(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(
        &shared,
        "/v1/images/generations",
        &headers,
        body,
        openai_input,
        |images| {
            let created = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let data: Vec<_> = images
                .iter()
                .map(|png| json!({ "b64_json": base64::engine::general_purpose::STANDARD.encode(png) }))
                .collect();
            Json(json!({ "created": created, "data": data })).into_response()
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        let (queue, _) = sync_channel(1);
        Shared {
            queue,
            capacity: 1,
            next_id: AtomicU64::new(1),
            last_run_ms: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            model_name: "m".into(),
            class_name: "P",
            max_sequence_length: None,
            defaults: GenerateParams::default(),
        }
    }

    #[test]
    fn cfg_is_an_alias_of_guidance_scale() {
        let input = generate_input(&shared(), br#"{"prompt": "a", "cfg": 7.0}"#).unwrap();
        assert_eq!(input.guidance_scale, 7.0);
        assert_eq!(input.prompts, vec!["a".to_string()]);
    }

    #[test]
    fn openai_size_is_width_by_height() {
        let input =
            openai_input(&shared(), br#"{"prompt": "a", "size": "64x128", "n": 3}"#).unwrap();
        assert_eq!((input.width, input.height), (Some(64), Some(128)));
        assert_eq!(input.num_images_per_prompt, 3);
        for bad in ["64", "ax64", "64x"] {
            let body = format!(r#"{{"prompt": "a", "size": "{bad}"}}"#);
            let err = openai_input(&shared(), body.as_bytes()).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn retry_after_grows_with_the_queue() {
        let s = shared();
        assert_eq!(s.retry_after_secs(), 1);
        s.last_run_ms.store(1500, Ordering::Relaxed);
        assert_eq!(s.retry_after_secs(), 3);
    }
}

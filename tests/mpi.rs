//! One process per rank: the `xfuser` binary under `mpirun` (the `mpi` feature; run with
//! `cargo test --features mpi --test mpi`, with Open MPI's `mpirun` on the PATH).
//!
//! Every parallel method, run as 2 or 4 MPI processes on the bundled model, gives the latents
//! of the serial run of the same command (relative L2 ≤ 1e-5), and PipeFusion with stale K/V
//! gives those of the thread backend (≤ 1e-6); exactly one process writes, one file. Degrees
//! that do not match the process count are refused before any weights load; a rank that meets
//! bad input only it can see, or that is killed, ends the whole job quickly with a nonzero
//! status and no output file.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use xfuser::core::testing::{rel_l2, TempDir};

const STEPS: &str = "3";

/// `mpirun -n n` with what a root container and a 2-core machine need, around `xfuser`.
fn mpirun(n: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "-n",
        &n.to_string(),
        "--oversubscribe",
        "--allow-run-as-root",
    ])
    // Shared memory between the local processes, no network interfaces.
    .args(["--mca", "btl", "self,vader"])
    .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    cmd
}

/// `xfuser` alone (n = 0) or under `mpirun -n n`.
fn xfuser(n: usize) -> Command {
    match n {
        0 => Command::new(env!("CARGO_BIN_EXE_xfuser")),
        n => {
            let mut c = mpirun(n);
            c.arg(env!("CARGO_BIN_EXE_xfuser"));
            c
        }
    }
}

fn hermetic(cmd: &mut Command) -> &mut Command {
    cmd.env("HF_HUB_OFFLINE", "1").env_remove("RUST_BACKTRACE")
}

/// The generate arguments of one small request on the bundled model, writing latents to `out`.
fn request(out: &Path, steps: &str) -> Vec<String> {
    [
        "generate",
        "--prompt",
        "a red circle on a blue background",
        "--prompt",
        "a green square on a white background",
        "--num-inference-steps",
        steps,
        "--output-type",
        "latent",
        "--quiet",
        "--output-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.to_string_lossy().into_owned()])
    .collect()
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The one line of stderr that starts with `error`: the whole job says its cause once.
    #[track_caller]
    fn error_line(&self) -> &str {
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line, got:\n{}", self.stderr);
        errors[0]
    }
}

fn run(cmd: &mut Command) -> Run {
    let out = hermetic(cmd)
        .output()
        .expect("start the command (is mpirun installed?)");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    found.sort();
    found
}

/// Runs `xfuser <request> <flags>` (under `mpirun -n n` when n > 0) and returns its latents,
/// checking that exactly one file was written and listed.
fn latents(n: usize, flags: &[&str]) -> Tensor {
    let dir = TempDir::new("run");
    let mut cmd = xfuser(n);
    cmd.args(request(dir.path(), STEPS)).args(flags);
    let r = run(&mut cmd);
    assert_eq!(
        r.code,
        Some(0),
        "{flags:?} on {n} processes failed:\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    let written = files(dir.path());
    assert_eq!(written.len(), 1, "{flags:?}: files {written:?}");
    let listed: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(listed, [written[0].to_string_lossy()], "{flags:?}: stdout");
    let tensors = candle_core::safetensors::load(&written[0], &Device::Cpu).expect("latents");
    tensors["latents"].clone()
}

#[track_caller]
fn assert_close(got: &Tensor, want: &Tensor, limit: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let err = rel_l2(got, want).expect("rel_l2");
    assert!(err <= limit, "{what}: rel L2 {err:.3e} > {limit:.0e}");
}

#[test]
fn every_method_on_mpi_processes_gives_the_serial_latents() {
    let serial = latents(0, &[]);
    let cases: [(usize, &[&str]); 9] = [
        (2, &["--use-cfg-parallel"]),
        (2, &["--ulysses-degree", "2"]),
        (2, &["--ring-degree", "2"]),
        (4, &["--ulysses-degree", "2", "--ring-degree", "2"]),
        (2, &["--data-parallel-degree", "2"]),
        (4, &["--use-cfg-parallel", "--ulysses-degree", "2"]),
        (
            2,
            &["--pipefusion-parallel-degree", "2", "--warmup-steps", STEPS],
        ),
        (2, &["--tensor-parallel-degree", "2"]),
        (
            4,
            &[
                "--data-parallel-degree",
                "2",
                "--tensor-parallel-degree",
                "2",
            ],
        ),
    ];
    for (n, flags) in cases {
        let got = latents(n, flags);
        assert_close(&got, &serial, 1e-5, &format!("{flags:?} on {n} processes"));
    }
}

/// The `--report-comm` lines of a run (`group op calls bytes`), but the world group's: a
/// launched job also sends its outputs to rank 0 over the world.
fn comm_report(n: usize, flags: &[&str]) -> Vec<String> {
    let dir = TempDir::new("comm");
    let mut cmd = xfuser(n);
    cmd.args(request(dir.path(), STEPS))
        .args(flags)
        .arg("--report-comm");
    let r = run(&mut cmd);
    assert_eq!(r.code, Some(0), "{flags:?} on {n}: {}", r.stderr);
    let lines: Vec<String> = r
        .stderr
        .lines()
        .skip_while(|l| !l.starts_with("communication"))
        .skip(1)
        .filter(|l| !l.trim_start().starts_with("world"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        !lines.is_empty(),
        "{flags:?} on {n}: no counters in\n{}",
        r.stderr
    );
    lines
}

#[test]
fn report_comm_on_processes_counts_every_rank_as_threads_do() {
    for (n, flags) in [
        (2, &["--ulysses-degree", "2"][..]),
        (4, &["--use-cfg-parallel", "--ring-degree", "2"][..]),
    ] {
        assert_eq!(comm_report(n, flags), comm_report(0, flags), "{flags:?}");
    }
}

#[test]
fn pipefusion_with_stale_kv_on_processes_equals_the_thread_backend() {
    let flags = [
        "--pipefusion-parallel-degree",
        "2",
        "--warmup-steps",
        "1",
        "--num-pipeline-patch",
        "2",
    ];
    let threads = latents(0, &flags);
    let processes = latents(2, &flags);
    assert_close(&processes, &threads, 1e-6, "pipefusion warmup 1");
}

#[test]
fn degrees_that_do_not_match_the_process_count_are_refused_before_loading() {
    let dir = TempDir::new("mismatch");
    let mut cmd = mpirun(2);
    cmd.arg(env!("CARGO_BIN_EXE_xfuser"))
        .args(request(dir.path(), STEPS))
        .args(["--ulysses-degree", "2", "--ring-degree", "2"]);
    let r = run(&mut cmd);
    assert_ne!(r.code, Some(0), "stderr: {}", r.stderr);
    let error = r.error_line();
    assert!(
        error.contains("multiply to 4 ranks") && error.contains("started 2 processes"),
        "{}",
        error
    );
    assert!(
        files(dir.path()).is_empty(),
        "no file: {:?}",
        files(dir.path())
    );
}

/// A copy of the bundled model whose transformer weights are not a safetensors file.
fn broken_model(dir: &Path) -> PathBuf {
    let source = xfuser::bundled::bundled_model_dir().expect("bundled model");
    let model = dir.join("broken-model");
    xfuser::core::testing::copy_dir(&source, &model).expect("copy the model");
    let weights = model.join("transformer/diffusion_pytorch_model.safetensors");
    std::fs::write(&weights, b"not a safetensors file").expect("break the weights");
    model
}

#[test]
fn a_rank_that_meets_bad_input_alone_ends_the_job_with_its_error() {
    let dir = TempDir::new("bad-input");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).expect("out dir");
    let good = xfuser::bundled::bundled_model_dir().expect("bundled model");
    let broken = broken_model(dir.path());
    // MPMD: rank 0 reads the good model, rank 1 a broken copy (as a node with a bad disk).
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--oversubscribe",
        "--allow-run-as-root",
        "--mca",
        "btl",
        "self,vader",
    ]);
    for (i, model) in [good, broken].iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-n", "1", env!("CARGO_BIN_EXE_xfuser")])
            .args(request(&out, STEPS))
            .args(["--model", &model.to_string_lossy(), "--ulysses-degree", "2"]);
    }
    let started = Instant::now();
    let r = run(&mut cmd);
    assert_ne!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let error = r.error_line();
    assert!(
        error.starts_with("error (rank 1 of 2)")
            && error.contains("diffusion_pytorch_model.safetensors"),
        "{}",
        error
    );
    assert!(files(&out).is_empty(), "no file: {:?}", files(&out));
}

#[test]
fn a_killed_rank_ends_the_job_within_30_seconds() {
    let dir = TempDir::new("killed");
    let mut cmd = mpirun(2);
    cmd.arg(env!("CARGO_BIN_EXE_xfuser"))
        // Long enough (about a second a step here) to be killed mid-run.
        .args(request(dir.path(), "200"))
        .args(["--height", "256", "--width", "256"])
        .args(["--ulysses-degree", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut job = hermetic(&mut cmd).spawn().expect("start mpirun");
    // Wait until both ranks run, then kill one of them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        let ranks = children_named(job.id(), "xfuser");
        if ranks.len() == 2 {
            std::thread::sleep(Duration::from_secs(3));
            break ranks[1];
        }
        if let Some(status) = job.try_wait().expect("wait") {
            let mut stderr = String::new();
            if let Some(mut pipe) = job.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            panic!("the job ended before a rank was killed ({status:?}): {stderr}");
        }
        assert!(Instant::now() < deadline, "the ranks did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    let killed = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().expect("wait") {
            break status;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "the job still runs 30 s after a rank was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "exit status {status:?}");
    assert!(
        files(dir.path()).is_empty(),
        "no file: {:?}",
        files(dir.path())
    );
}

/// The pids of the processes named `name` whose parent is `parent`, in pid order.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(") ").and_then(|(head, rest)| {
            head.split_once(" (")
                .map(|(_, comm)| (comm.to_string(), rest))
        }) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if comm == name && ppid == Some(parent) {
            found.push(pid);
        }
    }
    found.sort();
    found
}

/// `--use-parallel-vae` on 2 processes (every rank decodes a band of rows, the halos crossing
/// between processes): the PNGs of the serial run, within 1/255 per channel.
#[test]
fn the_parallel_vae_on_processes_draws_the_serial_images() {
    let pngs = |n: usize, flags: &[&str]| -> Vec<Vec<u8>> {
        let dir = TempDir::new("vae");
        let mut cmd = xfuser(n);
        let args: Vec<String> = request(dir.path(), STEPS)
            .into_iter()
            .map(|a| if a == "latent" { "pil".to_string() } else { a })
            .collect();
        let r = run(cmd.args(args).args(flags));
        assert_eq!(r.code, Some(0), "{flags:?}: {}", r.stderr);
        let written = files(dir.path());
        assert_eq!(written.len(), 2, "{flags:?}: {written:?}");
        written
            .iter()
            .map(|p| image::open(p).expect("a PNG").to_rgb8().into_raw())
            .collect()
    };
    let serial = pngs(0, &[]);
    let parallel = pngs(2, &["--ulysses-degree", "2", "--use-parallel-vae"]);
    for (a, b) in serial.iter().zip(&parallel) {
        let worst = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max();
        assert!(
            worst.is_some_and(|w| w <= 1),
            "max pixel difference {worst:?}"
        );
    }
}

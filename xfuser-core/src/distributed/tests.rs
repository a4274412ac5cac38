//! Tests of the process groups over the local backend: every op against the serial math,
//! bit for bit; the byte counters against their formulas; and the failure paths.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::engine::ParallelConfig;
use crate::{Error, Result};

fn mesh_of(n: usize) -> RankMesh {
    RankMesh::new(&ParallelConfig {
        ulysses_degree: n,
        ..Default::default()
    })
    .unwrap()
}

/// Rank `rank`'s input: values of varied magnitude, so that the order of a sum shows in its
/// bits.
fn input(rank: usize, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((rank * 7919 + i) as f32 * 0.37).sin() * 10f32.powi((i % 5) as i32 - 2))
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_bitwise(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    assert!(bits(a) == bits(b), "{what}: values differ");
}

#[test]
fn collectives_match_serial_math_on_1_to_4_ranks() {
    for n in 1..=4 {
        let dims = [2, 12, 12];
        launch_local(&mesh_of(n), &LaunchOptions::default(), |ctx| {
            let g = ctx.world();
            let r = g.index();
            let xs: Vec<Tensor> = (0..n).map(|i| input(i, &dims)).collect();
            let x = &xs[r];

            let mut serial_sum = xs[0].clone();
            for t in &xs[1..] {
                serial_sum = serial_sum.add(t)?;
            }
            assert_bitwise(&g.all_reduce_sum(x)?, &serial_sum, "all_reduce_sum");

            for dim in 0..3 {
                let serial = Tensor::cat(&xs, dim)?;
                assert_bitwise(&g.all_gather(x, dim)?, &serial, "all_gather");
            }

            // Ulysses-like (scatter heads, gather sequence) and the reverse, and a same-dim
            // exchange.
            for (scatter, gather) in [(2, 1), (1, 2), (1, 1), (1, 0)] {
                let chunk = dims[scatter] / n;
                let parts: Vec<Tensor> = xs
                    .iter()
                    .map(|t| t.narrow(scatter, r * chunk, chunk))
                    .collect::<candle_core::Result<_>>()?;
                let serial = Tensor::cat(&parts, gather)?;
                let got = g.all_to_all(x, scatter, gather)?;
                assert_bitwise(&got, &serial, &format!("all_to_all({scatter}, {gather})"));
            }

            for (root, expected) in xs.iter().enumerate() {
                let got = g.broadcast(x, root)?;
                assert_bitwise(&got, expected, "broadcast");
            }

            g.barrier()?;

            // A ring shift: send to the next member, receive from the previous.
            g.send(x, g.next_index())?;
            let got = g.recv(g.prev_index())?;
            assert_bitwise(&got, &xs[g.prev_index()], "send/recv");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{n} ranks: {e}"));
    }
}

#[test]
fn ulysses_all_to_all_round_trip_is_identity() {
    // (B, S/N, H, D) -> (B, S, H/N, D) -> (B, S/N, H, D)
    launch_local(&mesh_of(4), &LaunchOptions::default(), |ctx| {
        let g = ctx.ulysses_group();
        let x = input(ctx.rank(), &[2, 3, 8, 5]);
        let heads = g.all_to_all(&x, 2, 1)?;
        assert_eq!(heads.dims(), &[2, 12, 2, 5]);
        let back = g.all_to_all(&heads, 1, 2)?;
        assert_bitwise(&back, &x, "round trip");
        Ok(())
    })
    .unwrap();
}

#[test]
fn half_precision_tensors_move_bitwise() {
    launch_local(&mesh_of(3), &LaunchOptions::default(), |ctx| {
        let g = ctx.world();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let xs: Vec<Tensor> = (0..3)
                .map(|i| input(i, &[4, 6]).to_dtype(dtype))
                .collect::<candle_core::Result<_>>()?;
            let got = g.all_gather(&xs[g.index()], 1)?;
            assert_eq!(got.dtype(), dtype);
            assert_bitwise(&got, &Tensor::cat(&xs, 1)?, "all_gather half");
            let sum = g.all_reduce_sum(&xs[g.index()])?;
            let serial = xs[0].add(&xs[1])?.add(&xs[2])?;
            assert_bitwise(&sum, &serial, "all_reduce half");
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn groups_of_one_axis_run_independently() {
    // dp 2 × ulysses 2: two ulysses groups and two dp groups at once.
    let mesh = RankMesh::new(&ParallelConfig {
        data_parallel_degree: 2,
        ulysses_degree: 2,
        ..Default::default()
    })
    .unwrap();
    let names = launch_local(&mesh, &LaunchOptions::default(), |ctx| {
        let u = ctx.ulysses_group();
        let gathered = u.all_gather(&input(ctx.rank(), &[3]), 0)?;
        let members = u.members().to_vec();
        let serial = Tensor::cat(&[input(members[0], &[3]), input(members[1], &[3])], 0)?;
        assert_bitwise(&gathered, &serial, "ulysses gather");
        let dp_sum = ctx.dp_group().all_reduce_sum(&input(ctx.rank(), &[3]))?;
        let m = ctx.dp_group().members().to_vec();
        assert_bitwise(
            &dp_sum,
            &input(m[0], &[3]).add(&input(m[1], &[3]))?,
            "dp sum",
        );
        Ok((u.name().to_string(), ctx.dp_group().name().to_string()))
    })
    .unwrap();
    assert_eq!(names[0], ("ulysses[0,1]".into(), "dp[0,2]".into()));
    assert_eq!(names[3], ("ulysses[2,3]".into(), "dp[1,3]".into()));
}

#[test]
fn ranks_compute_on_the_threads_they_are_given() {
    let global = rayon::current_num_threads();
    let threads_in_ranks = |threads: RankThreads, world: usize| {
        let options = LaunchOptions {
            threads,
            ..LaunchOptions::default()
        };
        launch_local(&mesh_of(world), &options, |_| {
            // What a rank's candle ops and kernels see: rayon's pool of the calling thread.
            Ok(rayon::current_num_threads())
        })
        .unwrap()
    };
    assert_eq!(threads_in_ranks(RankThreads::Shared, 2), vec![global; 2]);
    assert_eq!(threads_in_ranks(RankThreads::Each(3), 2), vec![3; 2]);
    let split = (global / 2).max(1);
    assert_eq!(threads_in_ranks(RankThreads::Split, 2), vec![split; 2]);
    assert_eq!(RankThreads::Split.per_rank(global + 1), Some(1));
    // A panic on a rank's own pool still reaches the launcher as that rank's failure.
    let err = launch_local(&mesh_of(2), &LaunchOptions::default(), |ctx| {
        if ctx.rank() == 1 {
            panic!("rank 1 gives up");
        }
        ctx.world().barrier()
    })
    .unwrap_err();
    assert!(err.to_string().contains("rank 1 gives up"), "{err}");
}

#[test]
fn many_large_sends_posted_before_receives_do_not_deadlock() {
    // 16 messages of 4 MB each way, both ranks sending everything before receiving anything.
    const COUNT: usize = 16;
    const ELEMS: usize = 1 << 20;
    launch_local(
        &mesh_of(2),
        &LaunchOptions::with_timeout(Duration::from_secs(10)),
        |ctx| {
            let g = ctx.world();
            let peer = 1 - g.index();
            let mut sends = Vec::new();
            for k in 0..COUNT {
                let t = Tensor::full((1000 * g.index() + k) as f32, ELEMS, &Device::Cpu)?;
                sends.push(g.isend(&t, peer)?);
            }
            // Receives posted in order, waited in reverse: each still gets its own message.
            let handles: Vec<RecvHandle> =
                (0..COUNT).map(|_| g.irecv(peer)).collect::<Result<_>>()?;
            let mut got: Vec<(usize, f32)> = Vec::new();
            for (k, h) in handles.into_iter().enumerate().rev() {
                let t = h.wait()?;
                assert_eq!(t.dims(), &[ELEMS]);
                got.push((k, t.get(ELEMS - 1)?.to_scalar::<f32>()?));
            }
            for (k, v) in got {
                assert_eq!(v, (1000 * peer + k) as f32, "message {k} out of order");
            }
            for s in sends {
                s.wait()?;
            }
            let stats = g.comm_stats();
            assert_eq!(stats[&CommOp::Send].bytes_sent, (COUNT * ELEMS * 4) as u64);
            assert_eq!(
                stats[&CommOp::Recv].bytes_received,
                (COUNT * ELEMS * 4) as u64
            );
            Ok(())
        },
    )
    .unwrap();
}

#[test]
fn byte_counters_equal_their_formulas() {
    let n = 4u64;
    let options = LaunchOptions::default();
    let stats = options.stats.clone();
    let dims = [2, 8, 6];
    let s = (2 * 8 * 6 * 4) as u64; // f32 bytes of one rank's tensor: 384
    launch_local(&mesh_of(n as usize), &options, |ctx| {
        let g = ctx.world();
        let x = input(ctx.rank(), &dims);
        g.all_reduce_sum(&x)?;
        g.all_gather(&x, 0)?;
        g.all_to_all(&x, 1, 2)?;
        g.broadcast(&x, 0)?;
        g.send(&x, g.next_index())?;
        g.recv(g.prev_index())?;
        g.barrier()?;
        g.all_gather(&x.to_dtype(DType::BF16)?, 0)?;
        // A group of one moves nothing.
        ctx.tp_group().all_reduce_sum(&x)?;
        Ok(())
    })
    .unwrap();
    let world = "world[0,1,2,3]";
    let counts = |op, rank| stats.rank_op(world, op, rank);
    let c = |calls, sent, received| CommCounts {
        calls,
        bytes_sent: sent,
        bytes_received: received,
    };
    for rank in 0..n as usize {
        let ring = 2 * (n - 1) * s / n;
        assert_eq!(ring, 576);
        assert_eq!(counts(CommOp::AllReduceSum, rank), c(1, ring, ring));
        // The f32 gather and the bf16 gather (half the bytes).
        let gather = (n - 1) * s + (n - 1) * s / 2;
        assert_eq!(counts(CommOp::AllGather, rank), c(2, gather, gather));
        assert_eq!(counts(CommOp::AllToAll, rank), c(1, 288, 288));
        let bcast = if rank == 0 {
            c(1, (n - 1) * s, 0)
        } else {
            c(1, 0, s)
        };
        assert_eq!(counts(CommOp::Broadcast, rank), bcast);
        assert_eq!(counts(CommOp::Send, rank), c(1, s, 0));
        assert_eq!(counts(CommOp::Recv, rank), c(1, 0, s));
        assert_eq!(counts(CommOp::Barrier, rank), c(1, 0, 0));
        let tp = format!("tp[{rank}]");
        assert_eq!(stats.rank_op(&tp, CommOp::AllReduceSum, rank), c(1, 0, 0));
    }
    assert_eq!(
        stats.group_op(world, CommOp::AllToAll),
        c(4, 4 * 288, 4 * 288)
    );
    stats.reset();
    assert!(stats.snapshot().is_empty());
}

/// What a peer saw: its error and how long after the failure it came.
type Seen = Mutex<Vec<(usize, Error, Instant)>>;

fn check_peers_woken(seen: &Seen, failed_at: &Mutex<Option<Instant>>, peers: usize) -> Duration {
    let failed_at = failed_at.lock().unwrap().expect("the failing rank ran");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), peers, "every peer saw an error: {seen:?}");
    let mut worst = Duration::ZERO;
    for (rank, e, at) in seen.iter() {
        match e {
            Error::Comm { group, op, message } => {
                assert!(
                    group.starts_with("world[") || group.starts_with("ulysses["),
                    "{e}"
                );
                assert!(["all_reduce_sum", "recv", "barrier"].contains(op), "{e}");
                assert!(message.contains("rank 2 failed"), "rank {rank}: {e}");
            }
            other => panic!("rank {rank}: expected a Comm error, got {other}"),
        }
        worst = worst.max(at.saturating_duration_since(failed_at));
    }
    worst
}

/// Rank 2 fails (by `fail`) in the middle of a sequence while rank 0 waits on a receive from
/// it and ranks 1 and 3 wait in an all-reduce; every peer must see an error at once, and a
/// later op must fail too.
/// Long enough that a peer woken by the timeout instead of the abort is unmistakable, on a
/// loaded machine too; the wake-up bound is a fraction of it, not a speed claim.
const FAULT_TIMEOUT: Duration = Duration::from_secs(20);

fn run_with_failing_rank(fail: impl Fn() -> Result<()> + Sync) -> (Error, Duration, Duration) {
    let timeout = FAULT_TIMEOUT;
    let seen: Seen = Mutex::new(Vec::new());
    let failed_at = Mutex::new(None);
    let start = Instant::now();
    let result = launch_local(&mesh_of(4), &LaunchOptions::with_timeout(timeout), |ctx| {
        let g = ctx.world();
        let x = input(ctx.rank(), &[4]);
        g.all_reduce_sum(&x)?;
        if ctx.rank() == 2 {
            std::thread::sleep(Duration::from_millis(50));
            *failed_at.lock().unwrap() = Some(Instant::now());
            fail()?;
            return Ok(());
        }
        let pending = if ctx.rank() == 0 {
            g.recv(2).map(|_| ())
        } else {
            g.all_reduce_sum(&x).map(|_| ())
        };
        let e = pending.expect_err("the op must fail");
        seen.lock().unwrap().push((ctx.rank(), e, Instant::now()));
        // Future ops fail at once too, on this group and on the others rank 2 is in.
        let later = g.barrier().expect_err("a later op must fail");
        assert!(later.to_string().contains("rank 2 failed"), "{later}");
        ctx.ulysses_group()
            .barrier()
            .expect_err("and on another group");
        Err(later)
    });
    let total = start.elapsed();
    let worst = check_peers_woken(&seen, &failed_at, 3);
    assert!(total < timeout / 2, "the run took {total:?}");
    (result.expect_err("the run fails"), worst, total)
}

#[test]
fn a_rank_returning_an_error_wakes_every_peer() {
    let (root, worst, total) = run_with_failing_rank(|| Err(Error::invalid("boom")));
    // The root cause, not a peer's echo.
    assert!(
        matches!(&root, Error::InvalidArgument(m) if m == "boom"),
        "{root}"
    );
    assert!(
        worst < FAULT_TIMEOUT / 4,
        "peers woke after {worst:?}: by the timeout, not the abort"
    );
    eprintln!("error: peers woke within {worst:?}, run {total:?}");
}

#[test]
fn a_panicking_rank_wakes_every_peer() {
    let (root, worst, total) = run_with_failing_rank(|| panic!("kaboom"));
    assert!(
        matches!(&root, Error::RankPanicked { rank: 2, message } if message == "kaboom"),
        "{root}"
    );
    assert!(
        worst < FAULT_TIMEOUT / 4,
        "peers woke after {worst:?}: by the timeout, not the abort"
    );
    eprintln!("panic: peers woke within {worst:?}, run {total:?}");
}

#[test]
fn an_op_a_peer_never_calls_times_out() {
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = launch_local(&mesh_of(2), &LaunchOptions::with_timeout(timeout), |ctx| {
        if ctx.rank() == 1 {
            // Alive but busy elsewhere past the timeout.
            std::thread::sleep(timeout * 2);
            return Ok(());
        }
        ctx.world().all_gather(&input(0, &[3]), 0)?;
        Ok(())
    })
    .unwrap_err();
    let elapsed = start.elapsed();
    match &err {
        Error::CommTimeout {
            group,
            op,
            timeout: t,
            message,
        } => {
            assert_eq!(
                (group.as_str(), *op, *t),
                ("world[0,1]", "all_gather", timeout)
            );
            assert!(message.contains("[1]"), "{message}");
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(elapsed >= timeout && elapsed < timeout * 2 + Duration::from_millis(500));
}

#[test]
fn an_op_waiting_for_a_finished_rank_fails_at_once() {
    let start = Instant::now();
    let err = launch_local(
        &mesh_of(2),
        &LaunchOptions::with_timeout(Duration::from_secs(5)),
        |ctx| {
            if ctx.rank() == 1 {
                return Ok(());
            }
            ctx.world().recv(1)?;
            Ok(())
        },
    )
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1));
    let msg = err.to_string();
    assert!(msg.contains("recv on process group world[0,1]"), "{msg}");
    assert!(msg.contains("finished without joining"), "{msg}");
}

#[test]
fn mismatched_ops_and_shapes_fail_on_every_member() {
    let seen = Mutex::new(Vec::new());
    let err = launch_local(
        &mesh_of(2),
        &LaunchOptions::with_timeout(Duration::from_secs(5)),
        |ctx| {
            let g = ctx.world();
            let x = input(0, &[4]);
            let r = if ctx.rank() == 0 {
                g.all_gather(&x, 0).map(|_| ())
            } else {
                g.all_reduce_sum(&x).map(|_| ())
            };
            seen.lock()
                .unwrap()
                .push(r.as_ref().map_err(|e| e.to_string()).err());
            r
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("while another member called"),
        "{err}"
    );
    for e in seen.lock().unwrap().iter() {
        assert!(e.is_some(), "both members fail");
    }

    let err = launch_local(
        &mesh_of(2),
        &LaunchOptions::with_timeout(Duration::from_secs(5)),
        |ctx| {
            ctx.world().all_reduce_sum(&input(0, &[3 + ctx.rank()]))?;
            Ok(())
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("members disagree on the tensors"),
        "{err}"
    );

    let err = launch_local(&mesh_of(3), &LaunchOptions::default(), |ctx| {
        ctx.world().all_to_all(&input(0, &[4, 2]), 0, 1)?;
        Ok(())
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("not divisible by the 3 members"),
        "{err}"
    );
}

//! The tensor-parallel linear layers against the serial full-weight computation, on local rank
//! threads, with the weights read from a safetensors file written here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use xfuser_core::distributed::{launch_local, CommOp, LaunchOptions, RankMesh};
use xfuser_core::engine::ParallelConfig;
use xfuser_core::Result;
use xfuser_layers::tensor_parallel::{
    ColumnParallelLinear, RowParallelLinear, SafetensorsShards, TpRank,
};

const DIM: usize = 24;
const HIDDEN: usize = 96;
const BATCH: usize = 2;
const SEQ: usize = 5;
const F32: usize = 4;

/// Deterministic values in [-1, 1) (a 64-bit LCG), so that the checkpoint is reproducible.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(values(n, seed), shape, &Device::Cpu)?)
}

struct Checkpoint {
    dir: PathBuf,
    file: PathBuf,
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A checkpoint with `mlp.fc1` (DIM → HIDDEN), `mlp.fc2` (HIDDEN → DIM), a fused
/// `attn.qkv` (DIM → 3·DIM) and a Flux-like `single.proj_out` over [DIM, HIDDEN] → DIM.
fn write_checkpoint(tag: &str) -> Result<Checkpoint> {
    let dir = std::env::temp_dir().join(format!("xfuser-tp-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| xfuser_core::Error::io(&dir, e))?;
    let shapes: [(&str, &[usize]); 8] = [
        ("mlp.fc1.weight", &[HIDDEN, DIM]),
        ("mlp.fc1.bias", &[HIDDEN]),
        ("mlp.fc2.weight", &[DIM, HIDDEN]),
        ("mlp.fc2.bias", &[DIM]),
        ("attn.qkv.weight", &[3 * DIM, DIM]),
        ("attn.qkv.bias", &[3 * DIM]),
        ("single.proj_out.weight", &[DIM, DIM + HIDDEN]),
        ("single.proj_out.bias", &[DIM]),
    ];
    let mut tensors = HashMap::new();
    for (seed, (name, shape)) in shapes.iter().enumerate() {
        tensors.insert(name.to_string(), tensor(shape, seed as u64 + 1)?);
    }
    let file = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &file)?;
    Ok(Checkpoint { dir, file })
}

fn full_vb(file: &Path) -> Result<VarBuilder<'static>> {
    // SAFETY: the test's own file, not modified while mapped.
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &Device::Cpu)? })
}

/// x · Wᵀ + b with candle's own matmul: the serial reference.
fn linear(xs: &Tensor, vb: &VarBuilder, out: usize, inp: usize) -> Result<Tensor> {
    let w = vb.get((out, inp), "weight")?;
    let b = vb.get(out, "bias")?;
    let (bsz, seq, _) = xs.dims3()?;
    Ok(xs
        .reshape((bsz * seq, inp))?
        .matmul(&w.t()?)?
        .broadcast_add(&b)?
        .reshape((bsz, seq, out))?)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((diff / norm).sqrt())
}

fn input() -> Result<Tensor> {
    tensor(&[BATCH, SEQ, DIM], 99)
}

fn mesh(tp: usize, dp: usize) -> Result<RankMesh> {
    RankMesh::new(&ParallelConfig {
        tensor_parallel_degree: tp,
        data_parallel_degree: dp,
        ..Default::default()
    })
}

/// fc1 (column) → GELU → fc2 (row) on every rank equals the serial MLP; each rank keeps and
/// reads 1/T of the weights (plus fc2's whole bias) and all-reduces the output once.
/// `shared`: the shards are loaded before the launch, one per tp position (from its
/// [`TpRank`]), and shared by the ranks of the other axes, as the runtime loads models;
/// otherwise every rank loads its own from its tp group.
fn mlp_matches_serial(tp: usize, dp: usize, shared: bool) -> Result<()> {
    let ckpt = write_checkpoint(&format!("mlp-{tp}-{dp}-{shared}"))?;
    let vb = full_vb(&ckpt.file)?.pp("mlp");
    let xs = input()?;
    let fc1_full = linear(&xs, &vb.pp("fc1"), HIDDEN, DIM)?;
    let serial = linear(&fc1_full.gelu()?, &vb.pp("fc2"), DIM, HIDDEN)?;
    let full_bytes = |out: usize, inp: usize| (out * inp + out) * F32;

    let load = |shard: TpRank| -> Result<_> {
        let source = SafetensorsShards::open(&[&ckpt.file], DType::F32, &Device::Cpu)?.pp("mlp");
        let fc1 = ColumnParallelLinear::load(DIM, HIDDEN, true, shard, &source.pp("fc1"))?;
        let fc2 = RowParallelLinear::load(HIDDEN, DIM, true, shard, &source.pp("fc2"))?;
        Ok((fc1, fc2, source.bytes_read()))
    };
    let preloaded = match shared {
        true => (0..tp)
            .map(|i| load(TpRank::new(i, tp)?))
            .collect::<Result<Vec<_>>>()?,
        false => Vec::new(),
    };

    let options = LaunchOptions::default();
    let mesh = mesh(tp, dp)?;
    let results = launch_local(&mesh, &options, |ctx| {
        let group = ctx.tp_group();
        assert_eq!(group.size(), tp);
        let own;
        let (fc1, fc2, read) = match shared {
            true => &preloaded[group.index()],
            false => {
                own = load(TpRank::of(group))?;
                &own
            }
        };
        let hidden = fc1.forward(&xs, group)?;
        assert_eq!(hidden.dims(), &[BATCH, SEQ, HIDDEN / tp]);
        let out = fc2.forward(&hidden.gelu()?, group)?;
        let stats = group.comm_stats();
        Ok((
            ctx.rank(),
            group.name().to_string(),
            out,
            fc1.parameter_bytes(),
            fc2.parameter_bytes(),
            *read,
            stats,
        ))
    })?;

    let out_bytes = (BATCH * SEQ * DIM * F32) as u64;
    let t = tp as u64;
    for (rank, group, out, fc1_bytes, fc2_bytes, read, stats) in results {
        let err = rel_l2(&out, &serial)?;
        println!("tp {tp} dp {dp} rank {rank}: rel L2 {err:.3e}");
        assert!(err <= 1e-6, "rank {rank}: rel L2 {err}");
        // 1/T of the column layer, exactly; the row layer's weight 1/T and its whole bias.
        assert_eq!(fc1_bytes * tp, full_bytes(HIDDEN, DIM), "rank {rank} fc1");
        assert_eq!(
            fc2_bytes,
            (DIM * HIDDEN / tp + DIM) * F32,
            "rank {rank} fc2"
        );
        // What the rank copied out of the file is what it keeps: never the full matrix.
        assert_eq!(
            read as usize,
            fc1_bytes + fc2_bytes,
            "rank {rank} bytes read"
        );
        // One all-reduce of the (B, S, D) output, counted as a ring all-reduce.
        let ar = stats
            .get(&CommOp::AllReduceSum)
            .copied()
            .unwrap_or_default();
        assert_eq!(ar.calls, 1, "rank {rank} on {group}");
        assert_eq!(ar.bytes_sent, 2 * (t - 1) * out_bytes / t, "rank {rank}");
        assert_eq!(ar.bytes_received, ar.bytes_sent);
        assert_eq!(
            stats.len(),
            1,
            "rank {rank}: only the all-reduce: {stats:?}"
        );
    }
    // Every tp group's traffic: T ranks, each 2(T−1)/T of the output.
    let total = options.stats.sum(|k| k.op == CommOp::AllReduceSum);
    assert_eq!(total.bytes_sent, dp as u64 * 2 * (t - 1) * out_bytes);
    Ok(())
}

#[test]
fn mlp_column_then_row_matches_serial_tp2_on_4_ranks() -> Result<()> {
    mlp_matches_serial(2, 2, true)
}

#[test]
fn mlp_column_then_row_matches_serial_tp4() -> Result<()> {
    mlp_matches_serial(4, 1, false)
}

/// gather_output gives the full layer's output, also for a fused [q; k; v] weight whose
/// segments are split one by one (each rank's output is [q_r, k_r, v_r]).
#[test]
fn column_gather_output_equals_full_linear() -> Result<()> {
    let ckpt = write_checkpoint("gather")?;
    let vb = full_vb(&ckpt.file)?;
    let xs = input()?;
    let fc1_full = linear(&xs, &vb.pp("mlp.fc1"), HIDDEN, DIM)?;
    let qkv_full = linear(&xs, &vb.pp("attn.qkv"), 3 * DIM, DIM)?;
    for tp in [2, 4] {
        let results = launch_local(&mesh(tp, 1)?, &LaunchOptions::default(), |ctx| {
            let group = ctx.tp_group();
            let source = SafetensorsShards::open(&[&ckpt.file], DType::F32, &Device::Cpu)?;
            let fc1 = ColumnParallelLinear::load(DIM, HIDDEN, true, group, &source.pp("mlp.fc1"))?
                .with_gather_output(true);
            let qkv = ColumnParallelLinear::load_fused(
                DIM,
                &[DIM, DIM, DIM],
                true,
                group,
                &source.pp("attn.qkv"),
            )?
            .with_gather_output(true);
            // The local qkv output is this rank's slice of q, of k and of v.
            let local = qkv.forward_local(&xs)?;
            let part = DIM / tp;
            let r = group.index();
            let expected_q = qkv_full.narrow(D::Minus1, r * part, part)?;
            let expected_v = qkv_full.narrow(D::Minus1, 2 * DIM + r * part, part)?;
            let q_err = rel_l2(&local.narrow(D::Minus1, 0, part)?, &expected_q)?;
            let v_err = rel_l2(&local.narrow(D::Minus1, 2 * part, part)?, &expected_v)?;
            Ok((
                fc1.forward(&xs, group)?,
                qkv.forward(&xs, group)?,
                q_err.max(v_err),
            ))
        })?;
        for (rank, (fc1, qkv, local_err)) in results.into_iter().enumerate() {
            let (e1, e2) = (rel_l2(&fc1, &fc1_full)?, rel_l2(&qkv, &qkv_full)?);
            println!("tp {tp} rank {rank}: fc1 {e1:.3e} qkv {e2:.3e} local qkv {local_err:.3e}");
            assert_eq!(fc1.dims(), &[BATCH, SEQ, HIDDEN]);
            assert!(e1 <= 1e-6 && e2 <= 1e-6 && local_err <= 1e-6);
        }
    }
    Ok(())
}

/// A row layer over concatenated segments (Flux's single-block proj_out over [attn, mlp]):
/// each rank's input is [attn_r, mlp_r], the local outputs of two column layers.
#[test]
fn row_over_segments_matches_the_full_layer() -> Result<()> {
    let ckpt = write_checkpoint("segments")?;
    let vb = full_vb(&ckpt.file)?;
    let attn = tensor(&[BATCH, SEQ, DIM], 7)?;
    let mlp = tensor(&[BATCH, SEQ, HIDDEN], 8)?;
    let whole = Tensor::cat(&[&attn, &mlp], D::Minus1)?;
    let serial = linear(&whole, &vb.pp("single.proj_out"), DIM, DIM + HIDDEN)?;
    let results = launch_local(&mesh(2, 2)?, &LaunchOptions::default(), |ctx| {
        let group = ctx.tp_group();
        let source = SafetensorsShards::open(&[&ckpt.file], DType::F32, &Device::Cpu)?;
        let proj_out = RowParallelLinear::load_fused(
            &[DIM, HIDDEN],
            DIM,
            true,
            group,
            &source.pp("single.proj_out"),
        )?;
        let (r, part_a, part_m) = (group.index(), DIM / 2, HIDDEN / 2);
        let local = Tensor::cat(
            &[
                attn.narrow(D::Minus1, r * part_a, part_a)?,
                mlp.narrow(D::Minus1, r * part_m, part_m)?,
            ],
            D::Minus1,
        )?;
        // scatter_input takes the same slices from the whole input.
        let scattered = proj_out.scatter_input(&whole)?;
        let same = (&scattered - &local)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        Ok((proj_out.forward(&local, group)?, same))
    })?;
    for (rank, (out, same)) in results.into_iter().enumerate() {
        let err = rel_l2(&out, &serial)?;
        println!("rank {rank}: segmented row rel L2 {err:.3e}");
        assert_eq!(same, 0.0, "rank {rank}: scatter_input");
        assert!(err <= 1e-6, "rank {rank}: rel L2 {err}");
    }
    Ok(())
}

/// A VarBuilder source reads each full tensor but keeps the same shard, in a buffer of its
/// own (not a view that would keep the full weight alive).
#[test]
fn var_builder_source_keeps_only_the_shard() -> Result<()> {
    let ckpt = write_checkpoint("vb")?;
    let results = launch_local(&mesh(4, 1)?, &LaunchOptions::default(), |ctx| {
        let group = ctx.tp_group();
        let vb = full_vb(&ckpt.file)?.pp("mlp");
        let mm = SafetensorsShards::open(&[&ckpt.file], DType::F32, &Device::Cpu)?.pp("mlp");
        let a = ColumnParallelLinear::load(DIM, HIDDEN, true, group, &vb.pp("fc1"))?;
        let b = ColumnParallelLinear::load(DIM, HIDDEN, true, group, &mm.pp("fc1"))?;
        let c = RowParallelLinear::load(HIDDEN, DIM, true, group, &vb.pp("fc2"))?;
        let d = RowParallelLinear::load(HIDDEN, DIM, true, group, &mm.pp("fc2"))?;
        let same = |x: &Tensor, y: &Tensor| -> Result<f32> {
            Ok((x - y)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        Ok((
            [a.parameter_bytes(), b.parameter_bytes()],
            [c.parameter_bytes(), d.parameter_bytes()],
            same(a.weight(), b.weight())?.max(same(c.weight(), d.weight())?),
            a.out_ranges(),
            c.in_ranges(),
        ))
    })?;
    for (rank, (col, row, diff, out_ranges, in_ranges)) in results.into_iter().enumerate() {
        assert_eq!(col, [(HIDDEN / 4) * (DIM + 1) * F32; 2], "rank {rank}");
        assert_eq!(row, [(DIM * HIDDEN / 4 + DIM) * F32; 2], "rank {rank}");
        assert_eq!(diff, 0.0, "rank {rank}");
        let part = HIDDEN / 4;
        assert_eq!(out_ranges, vec![rank * part..(rank + 1) * part]);
        assert_eq!(in_ranges, out_ranges);
    }
    Ok(())
}

/// Sizes the degree does not divide are refused, naming the layer and the sizes; so are a
/// checkpoint tensor of the wrong shape and an input of the wrong width.
#[test]
fn indivisible_and_mismatched_sizes_are_refused() -> Result<()> {
    let ckpt = write_checkpoint("refuse")?;
    let messages = launch_local(&mesh(4, 1)?, &LaunchOptions::default(), |ctx| {
        let group = ctx.tp_group();
        let source = SafetensorsShards::open(&[&ckpt.file], DType::F32, &Device::Cpu)?;
        let err = |r: Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let col = err(ColumnParallelLinear::load(DIM, 6, true, group, &source.pp("c")).map(|_| ()));
        let row = err(RowParallelLinear::load(10, DIM, true, group, &source.pp("r")).map(|_| ()));
        let fused =
            err(
                ColumnParallelLinear::load_fused(DIM, &[DIM, 6], true, group, &source.pp("f"))
                    .map(|_| ()),
            );
        let shape =
            err(
                ColumnParallelLinear::load(DIM + 4, HIDDEN, true, group, &source.pp("mlp.fc1"))
                    .map(|_| ()),
            );
        let fc1 = ColumnParallelLinear::load(DIM, HIDDEN, true, group, &source.pp("mlp.fc1"))?;
        let input = err(fc1
            .forward(
                &Tensor::zeros((1, 3, DIM + 1), DType::F32, &Device::Cpu)?,
                group,
            )
            .map(|_| ()));
        // A shard run on another member of the group than it was cut for.
        let other = TpRank::new((group.index() + 1) % 4, 4)?;
        let fc2 = RowParallelLinear::load(HIDDEN, DIM, true, other, &source.pp("mlp.fc2"))?;
        let xs = Tensor::zeros((1, 3, HIDDEN / 4), DType::F32, &Device::Cpu)?;
        let wrong = err(fc2.forward(&xs, group).map(|_| ()));
        Ok([col, row, fused, shape, input, wrong])
    })?;
    let [col, row, fused, shape, input, wrong] = &messages[0];
    println!("{col}\n{row}\n{fused}\n{shape}\n{input}\n{wrong}");
    assert!(col.contains("column-parallel linear `c`"), "{col}");
    assert!(
        col.contains("out_features 6") && col.contains("degree 4"),
        "{col}"
    );
    assert!(row.contains("row-parallel linear `r`"), "{row}");
    assert!(
        row.contains("in_features 10") && row.contains("degree 4"),
        "{row}"
    );
    assert!(
        fused.contains("segment 1 (6) of out_features [24, 6]"),
        "{fused}"
    );
    assert!(
        shape.contains("mlp.fc1.weight") && shape.contains("[96, 28]"),
        "{shape}"
    );
    assert!(
        input.contains("`mlp.fc1`") && input.contains("[1, 3, 25]"),
        "{input}"
    );
    assert!(
        wrong.contains("holds shard 1 of 4 but runs on member 0"),
        "{wrong}"
    );
    assert!(TpRank::new(4, 4).is_err());
    Ok(())
}

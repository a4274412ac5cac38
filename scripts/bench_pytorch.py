#!/usr/bin/env python3
"""The work of `xfuser-bench` (xfuser-bench/src/main.rs) in diffusers/PyTorch, for comparison.

    python scripts/bench_pytorch.py pixart-forward --resolution 256 --batch 2 --layers 28
    python scripts/bench_pytorch.py pipeline --resolution 256 --steps 20
    python scripts/bench_pytorch.py gemm-floor --resolution 256 --batch 2 --layers 28

Same config and shapes as the Rust side: full-size PixArt-α (16 heads x 72, caption 4096,
patch 2, 4 -> 8 channels), sample_size = resolution/8 unless --sample-size, random weights,
120 text tokens, float32, torch.set_num_threads(<cores>), inference_mode. The last line is
`torch_seconds=<median>` (and `gflops=` before it for the forward and the GEMM floor).
"""

import argparse
import os
import statistics
import sys
import time

import torch


def model_config(args):
    return dict(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=args.layers,
        cross_attention_dim=1152,
        attention_bias=True,
        sample_size=args.sample_size or args.resolution // 8,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=4096,
    )


def build_model(args):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**model_config(args)).eval()
    return model


def size_conditions(model, batch, res):
    if not model.use_additional_conditions:
        return None
    return {
        "resolution": torch.tensor([[float(res), float(res)]] * batch),
        "aspect_ratio": torch.tensor([[1.0]] * batch),
    }


def gemms(args):
    """Every matrix product of a forward, as xfuser-bench's forward_gemms lists them."""
    cfg = model_config(args)
    b, layers, l = args.batch, args.layers, args.text_len
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    lat = args.resolution // 8
    p = cfg["patch_size"]
    n = (lat // p) ** 2
    h, dh = cfg["num_attention_heads"], cfg["attention_head_dim"]
    c = cfg["caption_channels"]
    v = [
        ("linear N.D.D (q,k,v,out; cross q,out)", 6 * layers, 1, b * n, d, d),
        ("linear ff up N.D.4D", layers, 1, b * n, d, 4 * d),
        ("linear ff down N.4D.D", layers, 1, b * n, 4 * d, d),
        ("linear cross k,v L.D.D", 2 * layers, 1, b * l, d, d),
        ("attn self q.kT", layers, b * h, n, dh, n),
        ("attn self p.v", layers, b * h, n, n, dh),
        ("attn cross q.kT", layers, b * h, n, dh, l),
        ("attn cross p.v", layers, b * h, n, l, dh),
        ("caption linear_1", 1, 1, b * l, c, d),
        ("caption linear_2", 1, 1, b * l, d, d),
        ("patch embed", 1, 1, b * n, cfg["in_channels"] * p * p, d),
        ("proj_out", 1, 1, b * n, d, p * p * cfg["out_channels"]),
        ("adaln linear", 1, 1, b, d, 6 * d),
        ("timestep mlp", 1, 1, b, 256, d),
        ("timestep mlp 2", 1, 1, b, d, d),
    ]
    if cfg["sample_size"] == 128:
        v += [("size mlps", 2, 1, 3 * b, 256, d // 3), ("size mlps 2", 2, 1, 3 * b, d // 3, d // 3)]
    return v


def flops_of(gs):
    return sum(2.0 * count * batch * m * k * n for _, count, batch, m, k, n in gs)


def uniform(shape, gen):
    # Unit-variance uniform, as the Rust side draws its inputs.
    return (torch.rand(shape, generator=gen) * 2 - 1) * (3.0**0.5)


def pixart_forward(args):
    model = build_model(args)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    lat = args.resolution // 8
    b = args.batch
    latent = uniform((b, cfg.in_channels, lat, lat), gen)
    text = uniform((b, args.text_len, cfg.caption_channels), gen)
    mask = torch.ones(b, args.text_len)
    timestep = torch.full((b,), 999.0)
    added = size_conditions(model, b, args.resolution)
    flops = flops_of(gemms(args))

    def run():
        return model(
            latent,
            encoder_hidden_states=text,
            timestep=timestep,
            added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None},
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]

    with torch.inference_mode():
        for _ in range(args.warmup):
            run()
        times = []
        for i in range(args.iters):
            t = time.perf_counter()
            out = run()
            s = time.perf_counter() - t
            print(f"forward {i}: {s:.4f}s, output {list(out.shape)}", file=sys.stderr)
            times.append(s)
    med = statistics.median(times)
    print(f"gflops={flops / med / 1e9:.2f}")
    print(f"torch_seconds={med:.4f}")


def pipeline(args):
    """diffusers' PixArtAlphaPipeline denoising loop (CFG, DPM-Solver++), given the embeddings."""
    from diffusers import DPMSolverMultistepScheduler

    args.batch = 2
    model = build_model(args)
    cfg = model.config
    scheduler = DPMSolverMultistepScheduler()
    gen = torch.Generator().manual_seed(1)
    lat = args.resolution // 8
    latents0 = uniform((1, cfg.in_channels, lat, lat), gen) * scheduler.init_noise_sigma
    pos = uniform((1, args.text_len, cfg.caption_channels), gen)
    neg = uniform((1, args.text_len, cfg.caption_channels), gen)
    embeds = torch.cat([neg, pos])
    mask = torch.ones(2, args.text_len)
    added = size_conditions(model, 2, args.resolution) or {"resolution": None, "aspect_ratio": None}
    flops = flops_of(gemms(args)) * args.steps

    def run_loop():
        scheduler.set_timesteps(args.steps)
        latents = latents0.clone()
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2)
            model_input = scheduler.scale_model_input(model_input, t)
            timestep = t.expand(model_input.shape[0])
            noise = model(
                model_input,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=timestep,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            uncond, text = noise.chunk(2)
            noise = uncond + args.guidance_scale * (text - uncond)
            if model.config.out_channels // 2 == cfg.in_channels:
                noise = noise.chunk(2, dim=1)[0]
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents

    with torch.inference_mode():
        for _ in range(args.warmup):
            model(
                torch.cat([latents0] * 2),
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=torch.full((2,), 999.0),
                added_cond_kwargs=added,
                return_dict=False,
            )
        times = []
        for i in range(max(args.iters, 1)):
            t = time.perf_counter()
            out = run_loop()
            s = time.perf_counter() - t
            print(f"loop {i}: {s:.3f}s ({args.steps} steps), latents mean {out.mean():.5f}",
                  file=sys.stderr)
            times.append(s)
    med = statistics.median(times)
    print(f"gflops={flops / med / 1e9:.2f}")
    print(f"torch_seconds={med:.4f}")


def gemm_floor(args):
    gs = gemms(args)
    floor = 0.0
    with torch.inference_mode():
        for what, count, batch, m, k, n in gs:
            a = torch.randn(batch, m, k)
            b = torch.randn(batch, k, n)
            f = 2.0 * batch * m * k * n
            reps = max(1, min(2000, int(0.2e9 * 100 / f)))
            torch.matmul(a, b)
            samples = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(reps):
                    torch.matmul(a, b)
                samples.append((time.perf_counter() - t) / reps)
            s = statistics.median(samples)
            floor += s * count
            print(f"gemm {what:<40} {count:>3}x [{batch}x] {m}x{k}x{n}: "
                  f"{f / s / 1e9:.1f} GFLOP/s, {s * count:.4f}s in all")
    flops = flops_of(gs)
    print(f"model_gflop={flops / 1e9:.2f}")
    print(f"gemm_floor_seconds={floor:.4f}")
    print(f"gflops={flops / floor / 1e9:.2f}")
    print(f"torch_seconds={floor:.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["pixart-forward", "pipeline", "gemm-floor"])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--text-len", type=int, default=120)
    p.add_argument("--sample-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None,
                   help="timed runs (default: 5 forwards, 1 loop)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    if args.iters is None:
        args.iters = 1 if args.command == "pipeline" else 5
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)
    {"pixart-forward": pixart_forward, "pipeline": pipeline, "gemm-floor": gemm_floor}[args.command](args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The work of `xfuser-bench` (xfuser-bench/src/main.rs) in diffusers/PyTorch, for comparison.

    python scripts/bench_pytorch.py pixart-forward --resolution 256 --batch 2 --layers 28
    python scripts/bench_pytorch.py pipeline --resolution 256 --steps 20
    python scripts/bench_pytorch.py gemm-floor --resolution 256 --batch 2 --layers 28
    python scripts/bench_pytorch.py sd3-forward --resolution 256 --batch 2 --layers 24
    python scripts/bench_pytorch.py flux-forward --resolution 256 --double-layers 2 --single-layers 4
    python scripts/bench_pytorch.py vae --latent 32

Same config and shapes as the Rust side: full-size PixArt-α (16 heads x 72, caption 4096,
patch 2, 4 -> 8 channels), sample_size = resolution/8 unless --sample-size, random weights,
120 text tokens, float32, torch.set_num_threads(<cores>), inference_mode. The last line is
`torch_seconds=<median>` (and `gflops=` before it for the forwards and the GEMM floor).

`sd3-forward` is diffusers' SD3Transformer2DModel at SD3-medium width (24 joint blocks,
24 heads x 64, joint_attention_dim 4096, pooled 2048, patch 2, 16 channels,
pos_embed_max_size 192, sample_size 128 unless --sample-size), 77 + 256 = 333 text tokens
unless --text-len, as `xfuser-bench sd3-forward`.

`flux-forward` is diffusers' FluxTransformer2DModel at Flux.1-dev width (24 heads x 128,
joint_attention_dim 4096, pooled 768, in_channels 64, axes_dims_rope (16, 56, 56),
guidance_embeds) with --double-layers 2 and --single-layers 4 by default, batch 1, 512 text
tokens unless --text-len; its inputs are built as FluxPipeline builds them (packed latents,
img_ids / txt_ids, timestep / 1000, guidance 3.5), as `xfuser-bench flux-forward`.

`vae` is one `AutoencoderKL.decode` of a (1, 4, latent, latent) latent with the full-size
PixArt VAE (block_out_channels [128, 256, 512, 512], layers_per_block 2, 4 latent channels,
random weights), after an untimed 8 x 8 decode, as `xfuser-bench vae --one-process bands`;
the peak resident memory goes to stderr.
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


def sd3_config(args):
    """SD3-medium (stabilityai/stable-diffusion-3-medium-diffusers) with --layers blocks."""
    return dict(
        sample_size=args.sample_size or 128,
        patch_size=2,
        in_channels=16,
        num_layers=args.layers,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )


def sd3_gemms(args):
    """Every matrix product of an SD3 forward, as xfuser-bench's sd3::forward_gemms lists them
    (the last, context_pre_only block: no text out projection or text feed-forward, a 2D text
    modulation, only the image queries counted in its attention)."""
    cfg = sd3_config(args)
    b, layers, l = args.batch, args.layers, args.text_len
    h, dh = cfg["num_attention_heads"], cfg["attention_head_dim"]
    d = h * dh
    p = cfg["patch_size"]
    n = (args.resolution // 8 // p) ** 2
    last = min(layers, 1)
    joint = layers - last
    return [
        ("image q,k,v,out N.D.D", 4 * layers, 1, b * n, d, d),
        ("text q,k,v L.D.D", 3 * layers, 1, b * l, d, d),
        ("text out L.D.D", joint, 1, b * l, d, d),
        ("attn q.kT (N+L queries)", joint, b * h, n + l, dh, n + l),
        ("attn p.v (N+L queries)", joint, b * h, n + l, n + l, dh),
        ("attn q.kT last (N queries)", last, b * h, n, dh, n + l),
        ("attn p.v last (N queries)", last, b * h, n, n + l, dh),
        ("image ff up N.D.4D", layers, 1, b * n, d, 4 * d),
        ("image ff down N.4D.D", layers, 1, b * n, 4 * d, d),
        ("text ff up L.D.4D", joint, 1, b * l, d, 4 * d),
        ("text ff down L.4D.D", joint, 1, b * l, 4 * d, d),
        ("adaLN norm1 D.6D", layers, 1, b, d, 6 * d),
        ("adaLN norm1_context D.6D", joint, 1, b, d, 6 * d),
        ("adaLN norm1_context last D.2D", last, 1, b, d, 2 * d),
        ("context_embedder", 1, 1, b * l, cfg["joint_attention_dim"], cfg["caption_projection_dim"]),
        ("patch embed", 1, 1, b * n, cfg["in_channels"] * p * p, d),
        ("timestep mlp", 1, 1, b, 256, d),
        ("timestep mlp 2", 1, 1, b, d, d),
        ("pooled text mlp", 1, 1, b, cfg["pooled_projection_dim"], d),
        ("pooled text mlp 2", 1, 1, b, d, d),
        ("norm_out D.2D", 1, 1, b, d, 2 * d),
        ("proj_out", 1, 1, b * n, d, p * p * cfg["out_channels"]),
    ]


def sd3_forward(args):
    """One SD3Transformer2DModel forward: random init, a new text tensor per forward (nothing
    is cached in diffusers anyway), timestep 999."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = SD3Transformer2DModel(**sd3_config(args)).eval()
    cfg = model.config
    flops = flops_of(sd3_gemms(args))
    print(f"model built in {time.perf_counter() - t0:.1f}s: {args.layers} layers, "
          f"{args.text_len} text tokens, {flops / 1e9:.1f} GFLOP per forward", file=sys.stderr)
    gen = torch.Generator().manual_seed(1)
    lat = args.resolution // 8
    b = args.batch
    latent = uniform((b, cfg.in_channels, lat, lat), gen)
    text = uniform((b, args.text_len, cfg.joint_attention_dim), gen)
    pooled = uniform((b, cfg.pooled_projection_dim), gen)
    timestep = torch.full((b,), 999.0)

    def run(text):
        return model(
            latent,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )[0]

    with torch.inference_mode():
        for _ in range(args.warmup):
            run(text.clone())
        times = []
        for i in range(args.iters):
            fresh = text.clone()
            t = time.perf_counter()
            out = run(fresh)
            s = time.perf_counter() - t
            print(f"forward {i}: {s:.4f}s, output {list(out.shape)}", file=sys.stderr)
            times.append(s)
    med = statistics.median(times)
    print(f"gflops={flops / med / 1e9:.2f}")
    print(f"torch_seconds={med:.4f}")


def flux_config(args):
    """Flux.1-dev (black-forest-labs/FLUX.1-dev) with --double-layers / --single-layers."""
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=args.double_layers,
        num_single_layers=args.single_layers,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def flux_gemms(args):
    """Every matrix product of a Flux forward, as xfuser-bench's flux::forward_gemms lists
    them (every block's attention has all N + L queries)."""
    cfg = flux_config(args)
    b, l = args.batch, args.text_len
    dl, sl = args.double_layers, args.single_layers
    h, dh = cfg["num_attention_heads"], cfg["attention_head_dim"]
    d = h * dh
    mlp = 4 * d
    n = (args.resolution // 8 // 2) ** 2
    s = n + l
    return [
        ("double image q,k,v,out N.D.D", 4 * dl, 1, b * n, d, d),
        ("double text q,k,v,out L.D.D", 4 * dl, 1, b * l, d, d),
        ("double attn q.kT", dl, b * h, s, dh, s),
        ("double attn p.v", dl, b * h, s, s, dh),
        ("double image ff up N.D.4D", dl, 1, b * n, d, 4 * d),
        ("double image ff down N.4D.D", dl, 1, b * n, 4 * d, d),
        ("double text ff up L.D.4D", dl, 1, b * l, d, 4 * d),
        ("double text ff down L.4D.D", dl, 1, b * l, 4 * d, d),
        ("double adaLN norm1 D.6D", dl, 1, b, d, 6 * d),
        ("double adaLN norm1_context D.6D", dl, 1, b, d, 6 * d),
        ("single q,k,v S.D.3D", sl, 1, b * s, d, 3 * d),
        ("single proj_mlp S.D.4D", sl, 1, b * s, d, mlp),
        ("single attn q.kT", sl, b * h, s, dh, s),
        ("single attn p.v", sl, b * h, s, s, dh),
        ("single proj_out S.5D.D", sl, 1, b * s, d + mlp, d),
        ("single adaLN norm D.3D", sl, 1, b, d, 3 * d),
        ("x_embedder", 1, 1, b * n, cfg["in_channels"], d),
        ("context_embedder", 1, 1, b * l, cfg["joint_attention_dim"], d),
        ("timestep mlp", 1, 1, b, 256, d),
        ("timestep mlp 2", 1, 1, b, d, d),
        ("guidance mlp", 1, 1, b, 256, d),
        ("guidance mlp 2", 1, 1, b, d, d),
        ("pooled text mlp", 1, 1, b, cfg["pooled_projection_dim"], d),
        ("pooled text mlp 2", 1, 1, b, d, d),
        ("norm_out D.2D", 1, 1, b, d, 2 * d),
        ("proj_out", 1, 1, b * n, d, cfg["in_channels"]),
    ]


def flux_forward(args):
    """One FluxTransformer2DModel forward with FluxPipeline's inputs: packed latents,
    img_ids / txt_ids, timestep / 1000, the guidance value; random init, a new text tensor
    per forward."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = FluxTransformer2DModel(**flux_config(args)).eval()
    cfg = model.config
    flops = flops_of(flux_gemms(args))
    print(f"model built in {time.perf_counter() - t0:.1f}s: {args.double_layers} double + "
          f"{args.single_layers} single blocks, {args.text_len} text tokens, "
          f"{flops / 1e9:.1f} GFLOP per forward", file=sys.stderr)
    gen = torch.Generator().manual_seed(1)
    lat = args.resolution // 8
    b = args.batch
    c = cfg.in_channels // 4
    latent = uniform((b, c, lat, lat), gen)
    # FluxPipeline._pack_latents: 2x2 latent pixels per token, (channel, row, col) order.
    packed = latent.view(b, c, lat // 2, 2, lat // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(b, (lat // 2) * (lat // 2), c * 4)
    # FluxPipeline._prepare_latent_image_ids: (0, row, col) per token; text ids are zeros.
    img_ids = torch.zeros(lat // 2, lat // 2, 3)
    img_ids[..., 1] = img_ids[..., 1] + torch.arange(lat // 2)[:, None]
    img_ids[..., 2] = img_ids[..., 2] + torch.arange(lat // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(args.text_len, 3)
    text = uniform((b, args.text_len, cfg.joint_attention_dim), gen)
    pooled = uniform((b, cfg.pooled_projection_dim), gen)
    timestep = torch.full((b,), 999.0)
    guidance = torch.full((b,), args.guidance)

    def run(text):
        return model(
            hidden_states=packed,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    with torch.inference_mode():
        for _ in range(args.warmup):
            run(text.clone())
        times = []
        for i in range(args.iters):
            fresh = text.clone()
            t = time.perf_counter()
            out = run(fresh)
            s = time.perf_counter() - t
            print(f"forward {i}: {s:.4f}s, output {list(out.shape)}", file=sys.stderr)
            times.append(s)
    med = statistics.median(times)
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {rss:.0f} MiB", file=sys.stderr)
    except ImportError:
        pass
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


def vae_decode(args):
    import resource

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()
    z = torch.randn(1, 4, args.latent, args.latent)
    with torch.inference_mode():
        vae.decode(z[:, :, :8, :8])
        t = time.perf_counter()
        image = vae.decode(z).sample
        s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"image {list(image.shape)}: {s:.2f} s, peak RSS {rss:.0f} MiB", file=sys.stderr)
    print(f"torch_seconds={s:.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["pixart-forward", "sd3-forward", "flux-forward", "pipeline", "gemm-floor",
                                       "vae"])
    p.add_argument("--latent", type=int, default=32, help="vae: latent side (image side / 8)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=None, help="default: 2; flux-forward 1")
    p.add_argument("--layers", type=int, default=None,
                   help="transformer blocks (default: 28; sd3-forward 24)")
    p.add_argument("--text-len", type=int, default=None,
                   help="text tokens (default: 120; sd3-forward 77 + 256 = 333)")
    p.add_argument("--sample-size", type=int, default=None)
    p.add_argument("--double-layers", type=int, default=2, help="flux-forward: double blocks")
    p.add_argument("--single-layers", type=int, default=4, help="flux-forward: single blocks")
    p.add_argument("--guidance", type=float, default=3.5, help="flux-forward: embedded guidance")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None,
                   help="timed runs (default: 5 forwards, 1 loop)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    if args.iters is None:
        args.iters = 1 if args.command == "pipeline" else 5
    sd3 = args.command == "sd3-forward"
    flux = args.command == "flux-forward"
    if args.batch is None:
        args.batch = 1 if flux else 2
    if args.layers is None:
        args.layers = 24 if sd3 else 28
    if args.text_len is None:
        args.text_len = 512 if flux else 333 if sd3 else 120
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)
    {
        "pixart-forward": pixart_forward,
        "sd3-forward": sd3_forward,
        "flux-forward": flux_forward,
        "pipeline": pipeline,
        "gemm-floor": gemm_floor,
        "vae": vae_decode,
    }[args.command](args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Trains a tiny PixArt-α text-to-image pipeline on CPU, in diffusers' folder layout: coloured
shapes on coloured backgrounds ("a red circle on a blue background"), 64x64 px.

    .venv/bin/python scripts/train_tiny_pixart.py                  # the committed model
    .venv/bin/python scripts/train_tiny_pixart.py --smoke --out /tmp/smoke

Stages, all seeded (the default settings reproduce tests/fixtures/pipelines/tiny-pixart-shapes):
  1. a T5-style unigram sentencepiece tokenizer on the prompt words (each word one piece);
  2. a small AutoencoderKL (3 blocks: 64x64x3 <-> 16x16x4), trained as an autoencoder on drawn
     images (MSE + a small KL term); its scaling_factor is set to 1 / std of the latents;
  3. a pool of drawn images encoded once by the frozen VAE (posterior means);
  4. a PixArtTransformer2DModel (epsilon prediction, no learned sigma) trained jointly with a
     tiny T5 encoder on that pool, the prompt dropped to "" 10 % of the time for
     classifier-free guidance; an EMA of both is what gets saved.
Then the pipeline is saved, evaluated (scripts/eval_tiny_pixart.py), and the loss curve is
written to docs/trained-model-loss.csv.
"""

import argparse
import copy
import csv
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Set before torch loads OpenMP: on a machine shared with other jobs, spinning OpenMP threads
# wait for each other's time slices and make a training step up to 8x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import sentencepiece as spm
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_data import COLORS, RESOLUTION, SHAPES, all_classes, prompt, random_example  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "pipelines" / "tiny-pixart-shapes"
LOSS_CSV = ROOT / "docs" / "trained-model-loss.csv"

# The prompts are padded to this many tokens during training; the prompt attention mask makes
# the result independent of the padding length used at inference.
TRAIN_MAX_LENGTH = 16
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class Settings:
    seed: int = 0
    # VAE: 3 blocks, so 64x64x3 <-> 16x16x4
    vae_channels: tuple = (8, 16, 32)
    vae_groups: int = 4
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # drawn images encoded once for the diffusion stage; pool_seed < 0: drawn by the image
    # generator that the VAE stage used, after it; else by a generator of its own, seeded so
    pool_size: int = 10000
    pool_seed: int = -1
    # text encoder (trained jointly with the transformer)
    t5_d_model: int = 32
    t5_layers: int = 2
    # transformer
    hidden_heads: int = 4
    head_dim: int = 32
    num_layers: int = 4
    steps: int = 3000
    batch: int = 48
    lr: float = 1e-3
    warmup: int = 150
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    uncond_prob: float = 0.1
    min_snr: float = 5.0
    log_every: int = 20
    checkpoint_every: int = 500


SMOKE = dict(vae_steps=20, pool_size=512, steps=20, log_every=5, checkpoint_every=10)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# tokenizer and text encoder


def tokenizer_corpus(seed: int, n_lines=3000):
    """Random sequences of the prompt words: enough variety that the unigram trainer keeps
    every word as one piece (the 90 prompts alone make it split words into letters)."""
    words = ["a", "on", "background", *COLORS, *SHAPES]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(n_lines)]


def build_tokenizer(work: Path, seed: int) -> Path:
    """A T5-style unigram sentencepiece model (pad=0, eos=1, unk=2, no bos), saved as a
    T5Tokenizer folder (tokenizer.json + tokenizer_config.json + spiece.model)."""
    src = work / "spm"
    src.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(seed)),
        model_writer=model,
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (src / "spiece.model").write_bytes(model.getvalue())
    tok = T5Tokenizer.from_pretrained(str(src), extra_ids=0, legacy=False)
    out = work / "tokenizer"
    tok.save_pretrained(str(out))
    shutil.copy(src / "spiece.model", out / "spiece.model")
    for word in ["background", *COLORS, *SHAPES]:
        pieces = tok.tokenize(f"a {word}")
        assert len(pieces) == 2, f"{word!r} is split into pieces: {pieces}"
    return out


def build_text_encoder(s: Settings, vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=s.t5_d_model,
        d_kv=8,
        d_ff=2 * s.t5_d_model,
        num_layers=s.t5_layers,
        num_heads=s.t5_d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def tokenize(tokenizer, prompts, max_length):
    """Token ids and attention mask exactly as PixArtAlphaPipeline.encode_prompt makes them."""
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return inputs.input_ids, inputs.attention_mask


# ---------------------------------------------------------------------------------------------
# VAE


def build_vae(s: Settings) -> AutoencoderKL:
    n = len(s.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(s.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=s.vae_groups,
        sample_size=RESOLUTION,
        scaling_factor=1.0,
    )


def image_batch(rng: np.random.Generator, n: int):
    """n drawn images as a (n, 3, H, W) float tensor in [-1, 1], and their class triples."""
    images, classes = zip(*(random_example(rng) for _ in range(n)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, list(classes)


def cosine_lr(step, total, base, warmup, floor=0.1):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, s: Settings, rng, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(s.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, s.vae_steps, s.vae_lr, warmup=20)
        x, _ = image_batch(rng, s.vae_batch)
        posterior = vae.encode(x).latent_dist
        # Decodes the posterior mean: at this size sampling the (initially unit-variance)
        # posterior drowns the signal and slows training a lot; the KL term only keeps the
        # latents small. The diffusion model is then trained on the means too.
        recon = vae.decode(posterior.mode()).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean()  # summed over the latent, averaged over the batch
        loss = mse + s.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % s.log_every == 0 or step == s.vae_steps - 1:
            log("vae", step, mse=mse.item(), kl=kl.item())
    vae.eval()
    return vae


def load_vae(pipeline_dir: Path, s: Settings) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(str(pipeline_dir / "vae")).eval()
    expected = build_vae(s).config
    for key in ("block_out_channels", "norm_num_groups", "layers_per_block", "latent_channels"):
        if vae.config[key] != expected[key]:
            raise SystemExit(f"--vae-from: {key} is {vae.config[key]}, these settings need {expected[key]}")
    print(f"VAE taken from {pipeline_dir}", flush=True)
    return vae


@torch.no_grad()
def encode_pool(vae, s: Settings, rng):
    """Draws s.pool_size images and keeps their posterior mean/std and class index."""
    index = {c: i for i, c in enumerate(all_classes())}
    means, stds, labels = [], [], []
    for start in range(0, s.pool_size, 256):
        x, classes = image_batch(rng, min(256, s.pool_size - start))
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        labels += [index[c] for c in classes]
    return torch.cat(means), torch.cat(stds), torch.tensor(labels)


# ---------------------------------------------------------------------------------------------
# transformer


def build_transformer(s: Settings, latent_side: int) -> PixArtTransformer2DModel:
    inner = s.hidden_heads * s.head_dim
    return PixArtTransformer2DModel(
        sample_size=latent_side,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=s.num_layers,
        num_attention_heads=s.hidden_heads,
        attention_head_dim=s.head_dim,
        cross_attention_dim=inner,
        caption_channels=s.t5_d_model,
        use_additional_conditions=False,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=1,
    )


def build_scheduler():
    return DPMSolverMultistepScheduler(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        solver_order=2,
        algorithm_type="dpmsolver++",
        lower_order_final=True,
        prediction_type="epsilon",
        timestep_spacing="linspace",
    )


def alphas_cumprod():
    betas = torch.linspace(0.0001, 0.02, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train_diffusion(transformer, text_encoder, tokenizer, pool, scaling, s: Settings, log, checkpoint):
    means, stds, labels = pool
    classes = all_classes()
    ids, mask = tokenize(tokenizer, [prompt(*c) for c in classes] + [""], TRAIN_MAX_LENGTH)
    uncond = len(classes)
    abar = alphas_cumprod()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.99))
    ema_t, ema_e = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    transformer.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(s.seed + 2)
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, s.steps, s.lr, s.warmup)
        pick = torch.randint(len(labels), (s.batch,), generator=gen)
        x0 = means[pick] * scaling
        cls = labels[pick].clone()
        cls[torch.rand(s.batch, generator=gen) < s.uncond_prob] = uncond
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (s.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = text_encoder(ids[cls], attention_mask=mask[cls])[0]
        pred = transformer(
            xt,
            encoder_hidden_states=emb,
            encoder_attention_mask=mask[cls],
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        # min-SNR-5 weighting of the epsilon loss (Hang et al. 2023): converges faster.
        snr = (a / (1 - a)).view(-1)
        weight = snr.clamp(max=s.min_snr) / snr
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_t, transformer, decay)
        ema_update(ema_e, text_encoder, decay)
        if step % s.log_every == 0 or step == s.steps - 1:
            log("diffusion", step, loss=loss.item(), grad_norm=grad_norm.item(), lr=opt.param_groups[0]["lr"])
        if (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
            checkpoint(ema_t, ema_e)
    return ema_t, ema_e


# ---------------------------------------------------------------------------------------------


class Logger:
    """Prints progress and keeps the rows of the loss curve."""

    def __init__(self):
        self.start = time.time()
        self.rows = []

    def __call__(self, stage, step, **values):
        elapsed = time.time() - self.start
        self.rows.append(dict(stage=stage, step=step, elapsed_s=round(elapsed, 1), **values))
        text = " ".join(f"{k}={v:.5g}" for k, v in values.items())
        print(f"[{elapsed:7.1f}s] {stage} {step:5d} {text}", flush=True)

    def write_csv(self, path: Path):
        keys = ["stage", "step", "elapsed_s", "loss", "mse", "kl", "grad_norm", "lr"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for row in self.rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def save_pipeline(out: Path, tokenizer_dir, text_encoder, vae, transformer):
    pipe = PixArtAlphaPipeline(
        tokenizer=T5Tokenizer.from_pretrained(str(tokenizer_dir)),
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=build_scheduler(),
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    shutil.copy(tokenizer_dir / "spiece.model", out / "tokenizer" / "spiece.model")
    return pipe


def folder_sizes(out: Path):
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="pipeline folder to write")
    ap.add_argument("--smoke", action="store_true", help="a few steps of each stage, to test the script")
    ap.add_argument("--loss-csv", type=Path, default=None,
                    help=f"loss curve CSV (default {LOSS_CSV.relative_to(ROOT)}, or OUT/loss.csv with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="override the transformer training steps")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    ap.add_argument("--vae-from", type=Path, default=None,
                    help="skip stage 2: take the VAE of this pipeline folder, trained by this script "
                    "with the same settings (saves its ~12 minutes when retraining the transformer)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override settings (experiments only), e.g. --set batch=32 num_layers=3")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    s = Settings()
    if args.smoke:
        s = replace(s, **SMOKE)
    if args.steps is not None:
        s = replace(s, steps=args.steps)
    for item in args.set:
        key, value = item.split("=", 1)
        s = replace(s, **{key: type(getattr(s, key))(eval(value))})
    loss_csv = args.loss_csv or (args.out / "loss.csv" if args.smoke else LOSS_CSV)
    print("settings:", json.dumps(asdict(s)), flush=True)
    log = Logger()
    seed_all(s.seed)
    rng = np.random.default_rng(s.seed)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = build_tokenizer(Path(tmp), s.seed)
        tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir))

        seed_all(s.seed + 1)
        if args.vae_from is None:
            vae = train_vae(build_vae(s), s, rng, log)
        else:
            vae = load_vae(args.vae_from, s)
            for _ in range(s.vae_steps):  # the images the VAE stage would have drawn
                image_batch(rng, s.vae_batch)
        pool_rng = rng if s.pool_seed < 0 else np.random.default_rng(s.pool_seed)
        pool = encode_pool(vae, s, pool_rng)
        scaling = 1.0 / pool[0].std().item()
        vae.register_to_config(scaling_factor=round(scaling, 5))
        scaling = vae.config.scaling_factor
        print(f"latent scaling_factor = {scaling}", flush=True)
        t_vae = time.time() - log.start

        seed_all(s.seed + 2)
        latent_side = RESOLUTION // 2 ** (len(s.vae_channels) - 1)
        transformer = build_transformer(s, latent_side)
        text_encoder = build_text_encoder(s, len(tokenizer))

        def checkpoint(ema_t, ema_e):
            # The EMA so far, saved as a loadable pipeline (then put back in training mode).
            save_pipeline(args.out, tokenizer_dir, copy.deepcopy(ema_e), vae, copy.deepcopy(ema_t))
            print(f"checkpoint saved to {args.out}", flush=True)

        ema_t, ema_e = train_diffusion(transformer, text_encoder, tokenizer, pool, scaling, s, log, checkpoint)
        t_total = time.time() - log.start

        save_pipeline(args.out, tokenizer_dir, ema_e, vae, ema_t)

    log.write_csv(loss_csv)
    sizes = folder_sizes(args.out)
    print(json.dumps(sizes, indent=1))
    print(f"total size {sum(sizes.values())} bytes")
    print(f"time: vae+pool {t_vae:.0f}s, total training {t_total:.0f}s", flush=True)
    if not args.no_eval:
        from eval_tiny_pixart import evaluate

        evaluate(args.out, seeds=[0])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Evaluates the tiny trained PixArt-α shapes model with diffusers' PixArtAlphaPipeline.

    .venv/bin/python scripts/eval_tiny_pixart.py [--model DIR] [--seeds 0 1 2] [--grid PNG]

For 8 prompts that cover every colour as shape and as background and every shape, it generates
a 64x64 image at the model's default steps and guidance (use_resolution_binning=False, as the
model's sample_size has no binning table) and checks, by nearest palette colour:
  border: the mean colour of the 4-pixel frame  == the background asked for;
  centre: the mean colour of the central 12x12 px == the shape's colour.
It also guesses the shape from how much of its bounding box the shape-coloured region fills
(square ~1, circle ~0.79, triangle ~0.5), reported but not part of the pass mark.
"""

import argparse
import os
import sys
from pathlib import Path

# Set before torch loads OpenMP: on a machine shared with other jobs, spinning OpenMP threads
# wait for each other's time slices and make a training step up to 8x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch
from diffusers import PixArtAlphaPipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_data import COLORS, prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "tests" / "fixtures" / "pipelines" / "tiny-pixart-shapes"
DEFAULT_GRID = ROOT / "docs" / "images" / "tiny-pixart-shapes.png"

# The model's defaults, which the Rust CLI uses for it too.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5
SIZE = 64
BORDER = 4
CENTRE = 12

# (shape, colour, background): every colour appears once as shape and once as background.
EVAL_CASES = [
    ("circle", "red", "blue"),
    ("square", "green", "black"),
    ("triangle", "blue", "yellow"),
    ("circle", "yellow", "white"),
    ("square", "white", "red"),
    ("triangle", "black", "green"),
    ("triangle", "red", "white"),
    ("circle", "blue", "green"),
]
PASS_MARK = 7


def nearest_color(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLORS, key=lambda name: float(np.sum((rgb - np.array(COLORS[name])) ** 2)))


def border_mean(image: np.ndarray) -> np.ndarray:
    frame = np.ones(image.shape[:2], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    return image[frame].mean(axis=0)


def centre_mean(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - CENTRE) // 2, (w - CENTRE) // 2
    return image[top : top + CENTRE, left : left + CENTRE].reshape(-1, 3).mean(axis=0)


def guess_shape(image: np.ndarray, color: str, background: str) -> str:
    """Classifies the region nearer the shape colour than the background colour."""
    pixels = image.astype(np.float64)
    d_fg = np.sum((pixels - np.array(COLORS[color])) ** 2, axis=-1)
    d_bg = np.sum((pixels - np.array(COLORS[background])) ** 2, axis=-1)
    mask = d_fg < d_bg
    if mask.sum() < 20:
        return "none"
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    if fill > 0.9:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def generate(pipe, prompts, seed, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE):
    """uint8 (N, 64, 64, 3) images, one generator per prompt seeded seed, seed+1, ..."""
    images = []
    for i, text in enumerate(prompts):
        out = pipe(
            text,
            negative_prompt="",
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + i),
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=120,
            output_type="np",
        ).images[0]
        images.append((out * 255).round().clip(0, 255).astype(np.uint8))
    return np.stack(images)


def check(image, shape, color, background):
    border, centre = border_mean(image), centre_mean(image)
    got_bg, got_fg = nearest_color(border), nearest_color(centre)
    return dict(
        border=border.round().astype(int).tolist(),
        centre=centre.round().astype(int).tolist(),
        border_name=got_bg,
        centre_name=got_fg,
        colors_ok=(got_bg == background and got_fg == color),
        shape_guess=guess_shape(image, color, background),
    )


def save_grid(images, path: Path, cols=4, pad=2):
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, optimize=True)


def padding_check(pipe, seed=0):
    """Max |difference| of the final latents between padding the prompt to 120 and to 16 tokens
    (the prompt attention mask should make it vanish up to rounding)."""
    latents = [
        pipe(
            prompt(*EVAL_CASES[0]),
            height=SIZE,
            width=SIZE,
            num_inference_steps=DEFAULT_STEPS,
            guidance_scale=DEFAULT_GUIDANCE,
            generator=torch.Generator().manual_seed(seed),
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=length,
            output_type="latent",
        ).images
        for length in (120, 16)
    ]
    return (latents[0] - latents[1]).abs().max().item()


def evaluate(model_dir: Path, seeds=(0,), grid: Path | None = None, steps=DEFAULT_STEPS,
             guidance=DEFAULT_GUIDANCE):
    """Prints the per-prompt table for each seed; returns {seed: number of colour passes}."""
    pipe = PixArtAlphaPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    prompts = [prompt(*case) for case in EVAL_CASES]
    scores = {}
    for seed in seeds:
        images = generate(pipe, prompts, seed, steps, guidance)
        passes, shapes_ok = 0, 0
        print(f"seed {seed} ({steps} steps, guidance {guidance}):")
        for (shape, color, background), image in zip(EVAL_CASES, images):
            r = check(image, shape, color, background)
            passes += r["colors_ok"]
            shapes_ok += r["shape_guess"] == shape
            print(
                f"  {prompt(shape, color, background):42s} border {str(r['border']):16s} -> {r['border_name']:6s}"
                f" centre {str(r['centre']):16s} -> {r['centre_name']:6s}"
                f" shape~{r['shape_guess']:8s} {'PASS' if r['colors_ok'] else 'FAIL'}"
            )
        print(f"  colours right: {passes}/{len(EVAL_CASES)}, shapes guessed right: {shapes_ok}/{len(EVAL_CASES)}")
        scores[seed] = passes
        if grid is not None and seed == seeds[0]:
            save_grid(images, grid)
            print(f"  grid saved to {grid}")
    print(f"padding 120 vs 16 tokens: max |latent difference| = {padding_check(pipe):.2e}")
    return scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--grid", type=Path, default=None, help=f"grid PNG of the first seed (e.g. {DEFAULT_GRID})")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    scores = evaluate(args.model, args.seeds, args.grid, args.steps, args.guidance)
    ok = all(v >= PASS_MARK for v in scores.values())
    print(f"{'PASS' if ok else 'FAIL'}: colour passes per seed {scores} (mark {PASS_MARK}/{len(EVAL_CASES)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The synthetic data set of the tiny trained PixArt-α model: flat-coloured shapes on flat
backgrounds, drawn with numpy, and the prompts that describe them.

    "a {colour} {shape} on a {colour} background"

Shapes: circle, square, triangle (upright, isosceles, base = height), roughly centred, their
side (diameter, height) 40-60 % of the image side. Shape colour != background colour.
Shared by scripts/train_tiny_pixart.py and scripts/eval_tiny_pixart.py.
"""

import numpy as np

RESOLUTION = 64

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")

# Extent of a shape, as a fraction of the image side, and the jitter of its centre in pixels.
MIN_FRACTION, MAX_FRACTION = 0.4, 0.6
CENTER_JITTER = 2.0


def prompt(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_classes():
    """Every (shape, colour, background) triple with colour != background: 3 x 6 x 5 = 90."""
    return [
        (shape, color, background)
        for shape in SHAPES
        for color in COLORS
        for background in COLORS
        if color != background
    ]


def shape_mask(shape: str, size: float, cx: float, cy: float, res: int = RESOLUTION) -> np.ndarray:
    """Boolean (res, res) mask of `shape` with extent `size` px around the centre (cx, cy).

    The triangle is placed so that its incentre sits at the centre: that keeps the middle of
    the image inside the shape for every shape, which is what the evaluation looks at."""
    y, x = np.mgrid[0:res, 0:res].astype(np.float64) + 0.5
    half = size / 2.0
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "triangle":
        inradius = size / (1.0 + np.sqrt(5.0))  # base = height = size
        top, bottom = cy - (size - inradius), cy + inradius
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= (y - top) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def draw(shape: str, color: str, background: str, size: float, cx: float, cy: float,
         res: int = RESOLUTION) -> np.ndarray:
    """(res, res, 3) uint8 image."""
    image = np.empty((res, res, 3), dtype=np.uint8)
    image[:] = COLORS[background]
    image[shape_mask(shape, size, cx, cy, res)] = COLORS[color]
    return image


def random_example(rng: np.random.Generator, res: int = RESOLUTION):
    """Draws one random (image, (shape, colour, background)) pair."""
    classes = all_classes()
    shape, color, background = classes[rng.integers(len(classes))]
    size = rng.uniform(MIN_FRACTION, MAX_FRACTION) * res
    cx, cy = res / 2.0 + rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=2)
    return draw(shape, color, background, size, cx, cy, res), (shape, color, background)

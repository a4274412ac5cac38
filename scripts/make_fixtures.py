#!/usr/bin/env python3
"""Regenerates every fixture under tests/fixtures/: tiny random-weight diffusers models and the
outputs of diffusers/torch on them (the goldens the Rust tests compare against).

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    .venv/bin/python scripts/make_fixtures.py            # all modules
    .venv/bin/python scripts/make_fixtures.py randn      # only some

CPU only, deterministic; takes about a minute. CI never runs this: it reads the committed files.
"""

import importlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Each module has make(fixtures_dir: Path) and writes only below its own sub-folder (dit: below
# examples/dit-plugin/tests/fixtures, the out-of-tree plugin crate's own).
MODULES = ["randn", "schedulers", "transformer", "text", "pipelines", "vae", "sd3", "flux", "dit", "trained", "vit"]


def main(argv):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = argv or MODULES
    for name in names:
        if name not in MODULES:
            sys.exit(f"unknown fixture module {name!r}; known: {', '.join(MODULES)}")
        print(f"== {name}", flush=True)
        importlib.import_module(f"fixtures.{name}").make(FIXTURES)


if __name__ == "__main__":
    main(sys.argv[1:])

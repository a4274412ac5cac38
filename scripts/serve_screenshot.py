#!/usr/bin/env python3
"""Screenshots the page `xfuser serve` shows at `/`, with a generated image, in headless
Chromium (Debian's `chromium` package: `apt-get install -y chromium`).

It starts the server on the bundled model (127.0.0.1, an ephemeral port), opens
`/?prompt=...&auto=1` (the page fills the prompt box and the settings from the query and
submits the form, as a user typing the prompt and pressing Generate would), lets Chromium run
until the page is idle (the pending image request holds the page open), saves the screenshot,
checks in the server's log that the image was served, and stops the server with SIGTERM.

    cargo build --release
    python3 scripts/serve_screenshot.py               # writes target/serve_screenshot.png
    python3 scripts/serve_screenshot.py --bin target/debug/xfuser --prompt "a red fox"

Only loopback is used; Chromium runs with a fresh profile and its background networking off.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default=str(ROOT / "target" / "release" / "xfuser"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--out", default=str(ROOT / "target" / "serve_screenshot.png"))
    parser.add_argument("--prompt", default="A small cabin in a snowy forest at night")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="height and width")
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RUST_LOG", None)
    server = subprocess.Popen(
        [args.bin, "serve", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = []
    threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()
    base = None
    for line in server.stdout:
        if line.startswith("listening on "):
            base = line.split("listening on ", 1)[1].strip()
            break
    if base is None:
        sys.exit("the server did not start:\n" + "".join(log))

    query = urllib.parse.urlencode(
        {
            "prompt": args.prompt,
            "num_inference_steps": args.steps,
            "width": args.size,
            "height": args.size,
            "seed": 42,
            "auto": 1,
        }
    )
    out = Path(args.out).resolve()
    profile = tempfile.mkdtemp(prefix="xfuser-chromium-")
    try:
        command = [
            args.chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=820,900",
            # Virtual time stops while the image request is pending, so the budget is only
            # spent once the page is idle again (the image shown).
            "--virtual-time-budget=30000",
            f"--screenshot={out}",
            f"{base}/?{query}",
        ]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        seconds = time.monotonic() - started
        if done.returncode != 0 or not out.is_file():
            sys.exit(f"chromium failed ({done.returncode}):\n{done.stderr}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)

    served = [l for l in log if 'route="/generate"' in l]
    print(f"screenshot: {out} ({seconds:.1f} s in Chromium)")
    print(f"server exit status after SIGTERM: {code}")
    for line in served:
        print("server log:", line.strip())
    if not any("status=200" in l for l in served):
        sys.exit("the page did not receive an image")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

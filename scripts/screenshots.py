"""Screenshots of attnkit's output for the README, written to docs/.

    python scripts/screenshots.py [--out docs]

- ``analyze-console-wide.png`` and ``analyze-console-80.png``: ``attnkit analyze minilm`` as a
  terminal shows it at 120 and at 80 columns (rich's own SVG export of the console, rendered
  by headless Chromium);
- ``validate-report.png``: the top of ``attnkit validate reference --html``'s page, and
  ``validate-report-heads.png`` / ``validate-report-ablation.png``: its head and ablation sections.

Needs Chromium (``/usr/bin/chromium``) and the ``minilm`` extra. PNGs are kept under 300 KB each
(palette-quantised when RGB would be larger).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
MAX_BYTES = 300_000


def chromium_screenshot(page: Path, out: Path, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
                        f"--window-size={width},{height}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def trim_and_shrink(path: Path, crop: tuple[int, int] | None = None, background: int = 250) -> None:
    """Crop to ``crop`` (top, bottom) or to the content, and quantise to a palette so the PNG stays small."""
    import numpy as np
    from PIL import Image

    im = Image.open(path).convert("RGB")
    if crop is not None:
        im = im.crop((0, crop[0], im.width, crop[1]))
    else:
        gray = np.asarray(im.convert("L"))
        rows = np.where((gray < background).any(1))[0]
        cols = np.where((gray < background).any(0))[0]
        if len(rows):
            pad = 16
            im = im.crop((max(cols[0] - pad, 0), max(rows[0] - pad, 0), min(cols[-1] + pad, im.width),
                          min(rows[-1] + pad, im.height)))
    # 256 colours chosen by an octree keep the colour maps true; RGB when that still fits the budget.
    im.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size:,} bytes, more than {MAX_BYTES:,}")
    print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {im.width}x{im.height}, {size:,} bytes")


def console_svg(render, width: int) -> str:
    console = Console(record=True, width=width, force_terminal=True, color_system="truecolor",
                      file=open(os.devnull, "w"))
    render(console)
    return console.export_svg(title="attnkit analyze minilm")


def analyze_screens(out: Path, tmp: Path) -> None:
    from attnkit.common.default_text import DEFAULT_TEXT
    from attnkit.analyze.run import analyze
    from attnkit.common.tokenize import max_positions, tokenize
    from attnkit.common.loading.registry import load_model
    from attnkit.analyze.render import render_analysis

    loaded = load_model("minilm")
    inputs = tokenize(loaded.tokenizer, DEFAULT_TEXT, None, max_positions(loaded.model), truncate_silently=True)
    result = analyze(loaded.model, inputs, name="minilm")

    def render(console: Console) -> None:
        console.print("$ attnkit analyze minilm", style="bold")
        render_analysis(result, console)

    for name, columns in (("analyze-console-wide", 120), ("analyze-console-80", 80)):
        page = tmp / f"{name}.html"
        svg = console_svg(render, columns)
        page.write_text(f"<!DOCTYPE html><html><body style='margin:0;background:#fff'>{svg}</body></html>",
                        encoding="utf-8")
        png = out / f"{name}.png"
        chromium_screenshot(page, png, 60 + 10 * columns, 1400)
        trim_and_shrink(png)


def validate_screens(out: Path, tmp: Path) -> None:
    from attnkit.common.loading.registry import load_model
    from attnkit.validate import validate
    from attnkit.validate.html import render_html

    loaded = load_model("reference")
    report = validate(loaded.model, loaded.tokenizer, name="reference", kind=loaded.kind)
    page = render_html(report)
    top = tmp / "report.html"
    top.write_text(page, encoding="utf-8")
    png = out / "validate-report.png"
    chromium_screenshot(top, png, 1200, 1400)
    trim_and_shrink(png)
    # One section on a page of its own: the page's head and style, that section, nothing else.
    head, body = page.split("<main>", 1)
    for key in ("heads", "ablation"):
        match = re.search(rf"<section class='sec' id='{key}'>.*?</section>", body, flags=re.S)
        if match is None:
            raise SystemExit(f"no section {key!r} in the report")
        single = tmp / f"{key}.html"
        single.write_text(f"{head}<main>{match.group(0)}</main></body></html>", encoding="utf-8")
        png = out / f"validate-report-{key}.png"
        chromium_screenshot(single, png, 1200, 3200)
        trim_and_shrink(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for the PNGs (default: docs/)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        analyze_screens(out, Path(tmp))
        validate_screens(out, Path(tmp))


if __name__ == "__main__":
    main()

"""Render the console's screenshots from a fixed state: `python screenshots/make.py`.

Writes an SVG of each view at 100x30 and of the workers view at 80x24 into
this folder, then a PNG of each with `rsvg-convert` (Debian: librsvg2-bin,
with fonts-firacode installed) when it is available.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from console.app import ClusterConsole
from console.sample import NOW, SampleBackend

HERE = Path(__file__).parent
TAB_KEYS = {"workers": "1", "jobs": "2", "webhooks": "3", "events": "4"}
SHOTS = [
    ("workers", (100, 30), "workers-100x30"),
    ("workers", (80, 24), "workers-80x24"),
    ("jobs", (100, 30), "jobs-100x30"),
    ("webhooks", (100, 30), "webhooks-100x30"),
    ("events", (100, 30), "events-100x30"),
]


async def shoot(tab: str, size: tuple[int, int], name: str) -> Path:
    app = ClusterConsole(SampleBackend(), start_backend=False, clock=lambda: NOW)
    app.animation_level = "none"
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await pilot.press(TAB_KEYS[tab])
        await pilot.pause()
        if tab == "workers":
            await pilot.press("down", "down")  # worker 3: restarted twice, with output to show
        await app._refresh_store()
        app.refresh_view()
        await pilot.pause()
        path = Path(app.save_screenshot(filename=f"{name}.svg", path=str(HERE)))
    return path


def main() -> None:
    converter = shutil.which("rsvg-convert")
    for tab, size, name in SHOTS:
        svg = asyncio.run(shoot(tab, size, name))
        print(svg.relative_to(HERE.parent))
        if converter:
            png = svg.with_suffix(".png")
            # rsvg drops leading spaces in <text> unless told to keep them, shifting cells.
            preserved = svg.read_text().replace("<svg ", '<svg xml:space="preserve" ', 1)
            subprocess.run([converter, "--zoom", "1.5", "-o", str(png)], input=preserved.encode(), check=True)
            print(png.relative_to(HERE.parent))
    if not converter:
        print("rsvg-convert not found: SVGs only (apt-get install librsvg2-bin fonts-firacode)")


if __name__ == "__main__":
    main()

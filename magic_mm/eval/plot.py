"""The benchmark plot, drawn with Pillow (matplotlib is not a dependency).

Left panel: candidate latency against visual tokens per image.  Right panel:
quality against candidate latency when the benchmark ran ``--tasks`` (the
paper's Figure 1(c) trade-off), else throughput against visual tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PANEL = (560, 420)
MARGIN = (70, 40, 20, 60)  # left, top, right, bottom
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


@dataclass
class Point:
    x: float
    y: float
    label: str


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    start = math.floor(low / step) * step
    return [start + i * step for i in range(int(math.ceil((high - start) / step)) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


def draw_panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], points: list[Point], title: str,
               xlabel: str, ylabel: str, font: Any) -> None:
    left, top, right, bottom = MARGIN
    x0, y0 = origin[0] + left, origin[1] + top
    x1, y1 = origin[0] + PANEL[0] - right, origin[1] + PANEL[1] - bottom
    draw.text((x0, origin[1] + 12), title, fill="black", font=font)
    if not points:
        draw.text((x0 + 20, (y0 + y1) // 2), "no data", fill="gray", font=font)
        return
    xs, ys = [p.x for p in points], [p.y for p in points]
    xt = _ticks(min(0.0, min(xs)), max(xs) * 1.1)
    yt = _ticks(min(0.0, min(ys)), max(ys) * 1.1)

    def px(x: float) -> float:
        return x0 + (x - xt[0]) / (xt[-1] - xt[0]) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - yt[0]) / (yt[-1] - yt[0]) * (y1 - y0)

    for x in xt:
        draw.line([(px(x), y0), (px(x), y1)], fill=(230, 230, 230))
        draw.text((px(x) - 8, y1 + 6), _fmt(x), fill="black", font=font)
    for y in yt:
        draw.line([(x0, py(y)), (x1, py(y))], fill=(230, 230, 230))
        draw.text((origin[0] + 8, py(y) - 6), _fmt(y), fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1 - draw.textlength(xlabel, font=font)) / 2, y1 + 26), xlabel, fill="black", font=font)
    draw.text((origin[0] + 8, y0 - 16), ylabel, fill="black", font=font)
    taken: list[tuple[float, float, float, float]] = []
    for n, p in enumerate(points):
        colour = COLOURS[n % len(COLOURS)]
        cx, cy = px(p.x), py(p.y)
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour, outline="black")
        taken.append((cx - 5, cy - 5, cx + 5, cy + 5))
    for n, p in enumerate(points):
        # First label position (right/left, above/below, then further out) that overlaps no
        # point or earlier label, so variants with equal tokens or latency stay readable.
        cx, cy = px(p.x), py(p.y)
        width = draw.textlength(p.label, font=font)
        spots = [(cx + 8, cy - 18), (cx + 8, cy + 6), (cx - 8 - width, cy - 18), (cx - 8 - width, cy + 6),
                 (cx + 8, cy - 32), (cx + 8, cy + 20), (cx - 8 - width, cy - 32), (cx - 8 - width, cy + 20)]
        box = next((b for b in ((x, y, x + width, y + 12) for x, y in spots) if not any(_overlap(b, t) for t in taken)),
                   (cx + 8, cy - 18, cx + 8 + width, cy - 6))
        taken.append(box)
        draw.text(box[:2], p.label, fill=COLOURS[n % len(COLOURS)], font=font)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def bench_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Write the two-panel PNG for a ``run_bench`` result."""
    model = result["model"]
    rows = model["variants"]
    latency = [Point(r["visual_tokens"], r["candidate_ms"]["median"], v) for v, r in rows.items()]
    if all("quality" in r for r in rows.values()):
        right = [Point(r["candidate_ms"]["median"], 100 * r["quality"]["score"], v) for v, r in rows.items()]
        metric = "/".join(next(iter(rows.values()))["quality"]["metric"])
        right_args = ("quality vs latency", "candidate latency, ms (batch 1)", f"mean {metric}, %")
    else:
        right = [Point(r["visual_tokens"], r["throughput_per_s"]["median"], v)
                 for v, r in rows.items() if r.get("throughput_per_s")]
        right_args = ("throughput vs visual tokens", "visual tokens per image", "candidates / s")
    image = Image.new("RGB", (2 * PANEL[0], PANEL[1] + 30), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    name = model["target"].get("model", "model")
    draw.text((10, PANEL[1] + 8), f"magic-mm bench · {name} · {result['machine']['device']} "
              f"({result['machine']['cpus']} cores) · medians of {model['reps']} interleaved reps",
              fill=(90, 90, 90), font=font)
    draw_panel(draw, (0, 0), latency, "candidate latency vs visual tokens", "visual tokens per image",
               "ms per candidate (batch 1)", font)
    draw_panel(draw, (PANEL[0], 0), right, *right_args, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path

"""What is sent: seeded synthetic images, traffic mixes, arrival times and request bodies."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

BASELINE = "none"


def make_image(seed: int, width: int, height: int) -> Image.Image:
    """A deterministic RGB image: a seeded two-colour gradient with a few seeded shapes on it."""
    rng = np.random.default_rng(seed)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    t = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    row = c0 * (1 - t) + c1 * t
    img = Image.fromarray(np.repeat(row, height, axis=0).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_pool(count: int, sizes: list[tuple[int, int]], seed: int) -> list[str]:
    """``count`` data URLs, cycling through ``sizes``; image ``i`` uses seed ``seed + i``."""
    return [data_url(make_image(seed + i, *sizes[i % len(sizes)])) for i in range(count)]


def parse_size(text: str) -> tuple[int, int]:
    """``"336"`` or ``"640x480"`` (width x height) -> ``(width, height)``."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"bad image size {text!r}: use N or WxH") from None
    if len(parts) != 2 or w < 1 or h < 1 or w * h > 16_000_000:
        raise ValueError(f"bad image size {text!r}: use N or WxH, positive, at most 16 Mpixel")
    return w, h


def parse_mix(text: str) -> dict[str, float]:
    """``"kvsmooth=0.5,none=0.5"`` -> ``{"kvsmooth": 0.5, "none": 0.5}`` (weights normalised to 1)."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        name, sep, weight = item.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"bad mix entry {item!r}: use name=weight")
        if name in mix:
            raise ValueError(f"mitigation {name!r} appears twice in the mix")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"bad weight in {item!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {name!r} must be finite and >= 0")
        mix[name] = w
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("mix weights sum to 0")
    return {k: v / total for k, v in mix.items() if v > 0}


def mix_label(mix: dict[str, float]) -> str:
    return "mix(" + ",".join(f"{k}={v:g}" for k, v in mix.items()) + ")"


def assign(mix: dict[str, float], n: int, seed: int) -> list[str]:
    """``n`` mitigation names in the proportions of ``mix`` (largest remainder), in a seeded order."""
    quotas = {k: v * n for k, v in mix.items()}
    counts = {k: int(q) for k, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda k: (quotas[k] - counts[k], k), reverse=True)
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    names = [k for k in mix for _ in range(counts[k])]
    np.random.default_rng(seed).shuffle(names)
    return names


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of ``n`` Poisson arrivals at ``rate`` req/s; all 0 for ``inf``."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("request rate must be > 0")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0  # the first request opens the measurement window
    return [float(x) for x in np.cumsum(gaps)]


def chat_body(
    model: str, image: str, prompt: str, max_tokens: int, mitigation: str | None, ignore_eos: bool = True
) -> dict[str, Any]:
    """A streaming chat request with a fixed output length; ``mitigation=None`` omits the field."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": prompt},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        # Running usage on every chunk: counts the tokens of chunks that vLLM merged under load.
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if ignore_eos:
        body |= {"ignore_eos": True, "min_tokens": max_tokens}
    if mitigation is not None:
        body["mitigation"] = mitigation
    return body

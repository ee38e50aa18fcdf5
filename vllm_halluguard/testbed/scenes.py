"""Synthetic scenes with a built-in object co-occurrence bias, written as a COCO-format folder.

Each scene is a small dark image with 1–3 flat icons, one per object; every category has its own
shape and colour. Categories are real COCO categories (ids and names), so the COCO scorers
(:mod:`vllm_halluguard.eval.chair`, :mod:`~vllm_halluguard.eval.pope`) apply unchanged.

The bias: three *anchor* categories each have a *partner* (fork→knife, dog→frisbee,
person→umbrella). In training scenes the partner is drawn with its anchor at rate ``bias`` (0.9)
and never without it, and partners are drawn smaller and dimmer than other objects, so "anchor
present" is a cheap stand-in for "partner present". A captioner trained on these scenes learns the
prior and names the partner when only the anchor is there: that is the hallucination to mitigate.

Splits (each is sampled from its own seed, so splits are independent and reproducible):

* ``train``: the biased distribution above (one primary object, a neutral extra at rate
  ``extra_rate``, the anchor's partner at rate ``bias``).
* ``probe``: an anchor *without* its partner, plus a neutral object at rate ``extra_rate``.
* ``control``: no anchor at all (1–2 neutral objects), or an anchor *with* its partner (half each).

Captions list the objects in a fixed order (:data:`CATEGORY_ORDER`): "a fork, a knife and a cup."

Usage::

    python -m vllm_halluguard.testbed.scenes --out DIR --split probe --n 200
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

Split = Literal["train", "probe", "control"]
SPLITS: tuple[Split, ...] = ("train", "probe", "control")
Shape = Literal[
    "square", "bar_v", "circle", "ring", "triangle", "diamond", "hexagon", "bar_h", "star", "cross", "oval"
]


class Icon(BaseModel):
    """How a category is drawn: a shape, a fill colour and a size (pixels, on a 112 px canvas)."""

    model_config = ConfigDict(frozen=True)

    coco_id: int
    name: str
    supercategory: str
    shape: Shape
    color: tuple[int, int, int]
    size: int


#: The categories, with their real COCO ids. Partners are small and dim (a knife is thin and grey).
_ICON_TABLE: tuple[tuple[str, int, str, Shape, tuple[int, int, int], int], ...] = (
    # name, COCO id, supercategory, shape, colour, size
    ("fork", 48, "kitchen", "square", (240, 200, 40), 24),
    ("knife", 49, "kitchen", "bar_v", (120, 120, 130), 14),
    ("dog", 18, "animal", "circle", (210, 120, 40), 26),
    ("frisbee", 34, "sports", "ring", (150, 90, 120), 14),
    ("person", 1, "person", "triangle", (230, 40, 40), 26),
    ("umbrella", 28, "accessory", "diamond", (100, 80, 150), 14),
    ("cup", 47, "kitchen", "hexagon", (40, 210, 220), 24),
    ("car", 3, "vehicle", "bar_h", (50, 90, 240), 28),
    ("cat", 17, "animal", "star", (60, 200, 60), 26),
    ("bottle", 44, "kitchen", "cross", (240, 240, 240), 24),
    ("banana", 52, "food", "oval", (170, 240, 90), 26),
)
ICONS: dict[str, Icon] = {
    row[0]: Icon(name=row[0], coco_id=row[1], supercategory=row[2], shape=row[3], color=row[4], size=row[5])
    for row in _ICON_TABLE
}
#: anchor -> partner
PAIRS: dict[str, str] = {"fork": "knife", "dog": "frisbee", "person": "umbrella"}
PARTNERS: frozenset[str] = frozenset(PAIRS.values())
NEUTRALS: tuple[str, ...] = tuple(n for n in ICONS if n not in PAIRS and n not in PARTNERS)
#: Order of objects in a caption: each anchor is directly followed by its partner.
CATEGORY_ORDER: tuple[str, ...] = tuple(ICONS)
PROMPT = "Describe the image."


class SceneConfig(BaseModel):
    """Parameters of the scene distribution (defaults are the committed testbed's)."""

    model_config = ConfigDict(frozen=True)

    seed: int = 0
    image_size: int = 112
    bias: float = Field(0.9, ge=0.0, le=1.0, description="P(partner | anchor) in training scenes")
    extra_rate: float = Field(0.5, ge=0.0, le=1.0, description="P(one extra neutral object)")
    solo_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="P(a training scene's primary object is a partner, without anchor)"
    )
    partner_size: int = Field(14, ge=6, le=36, description="icon size of the partners (pixels at 112 px)")


def trained_config(model_dir: Path) -> SceneConfig:
    """The scene distribution a checkpoint was trained on (its ``testbed_train.json``), else the default."""
    record = Path(model_dir) / "testbed_train.json"
    if not record.exists():
        return SceneConfig()
    return SceneConfig(**json.loads(record.read_text())["config"]["scenes"])


class PlacedObject(BaseModel):
    name: str
    bbox: tuple[int, int, int, int]  # x, y, w, h in pixels


class Scene(BaseModel):
    image_id: int
    split: Split
    background: tuple[int, int, int]
    objects: list[PlacedObject]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]


_ID_OFFSET: dict[Split, int] = {"train": 1, "probe": 1_000_001, "control": 2_000_001}


def caption(names: Sequence[str]) -> str:
    """The template caption of a set of objects: "a fork, a knife and a cup."."""
    ordered = sorted(set(names), key=CATEGORY_ORDER.index)
    phrases = [("an " if n[0] in "aeiou" else "a ") + n for n in ordered]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return body + "."


def _choose_names(split: Split, rng: random.Random, cfg: SceneConfig) -> list[str]:
    if split == "train":
        primary = rng.choice(list(PAIRS) + list(NEUTRALS))
        if cfg.solo_rate > 0 and rng.random() < cfg.solo_rate:
            primary = rng.choice(list(PAIRS.values()))
        names = [primary]
        if primary in PAIRS and rng.random() < cfg.bias:
            names.append(PAIRS[primary])
    elif split == "probe":
        names = [rng.choice(list(PAIRS))]
    elif rng.random() < 0.5:  # control without any anchor
        names = [rng.choice(NEUTRALS)]
    else:  # control with anchor and partner
        anchor = rng.choice(list(PAIRS))
        names = [anchor, PAIRS[anchor]]
    if rng.random() < cfg.extra_rate:
        names.append(rng.choice([n for n in NEUTRALS if n not in names]))
    return names


def _place(names: list[str], rng: random.Random, cfg: SceneConfig) -> list[PlacedObject]:
    """Put each object in its own cell of a 3x3 grid, jittered inside the cell."""
    size = cfg.image_size
    cell = size // 3
    cells = rng.sample(range(9), len(names))
    placed = []
    for name, c in zip(names, cells, strict=True):
        icon_size = cfg.partner_size if name in PARTNERS else ICONS[name].size
        s = round(icon_size * size / 112)
        x0 = (c % 3) * cell + rng.randint(0, max(cell - s, 0))
        y0 = (c // 3) * cell + rng.randint(0, max(cell - s, 0))
        placed.append(PlacedObject(name=name, bbox=(x0, y0, s, s)))
    return placed


def sample_scenes(split: Split, n: int, cfg: SceneConfig | None = None) -> list[Scene]:
    """``n`` scenes of ``split``, deterministic in ``(cfg.seed, split)``."""
    cfg = cfg or SceneConfig()
    rng = random.Random(f"halluguard-testbed-{cfg.seed}-{split}")
    scenes = []
    for i in range(n):
        names = _choose_names(split, rng, cfg)
        background = (rng.randint(0, 50), rng.randint(0, 50), rng.randint(0, 50))
        scenes.append(
            Scene(
                image_id=_ID_OFFSET[split] + i,
                split=split,
                background=background,
                objects=_place(names, rng, cfg),
            )
        )
    return scenes


def _polygon(cx: float, cy: float, r: float, n: int, rot: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _draw_icon(draw: ImageDraw.ImageDraw, icon: Icon, bbox: tuple[int, int, int, int]) -> None:
    x, y, w, h = bbox
    x1, y1 = x + w - 1, y + h - 1
    cx, cy, r = x + (w - 1) / 2, y + (h - 1) / 2, (w - 1) / 2
    fill = icon.color
    if icon.shape == "square":
        draw.rectangle((x, y, x1, y1), fill=fill)
    elif icon.shape == "bar_v":
        draw.rectangle((cx - w / 6, y, cx + w / 6, y1), fill=fill)
    elif icon.shape == "bar_h":
        draw.rectangle((x, cy - h / 5, x1, cy + h / 5), fill=fill)
    elif icon.shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=fill)
    elif icon.shape == "oval":
        draw.ellipse((x, cy - h / 4, x1, cy + h / 4), fill=fill)
    elif icon.shape == "ring":
        draw.ellipse((x, y, x1, y1), outline=fill, width=max(2, w // 5))
    elif icon.shape == "triangle":
        draw.polygon([(cx, y), (x1, y1), (x, y1)], fill=fill)
    elif icon.shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=fill)
    elif icon.shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif icon.shape == "star":
        outer, inner = _polygon(cx, cy, r, 5), _polygon(cx, cy, r * 0.45, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=fill)
    elif icon.shape == "cross":
        t = w / 6
        draw.rectangle((cx - t, y, cx + t, y1), fill=fill)
        draw.rectangle((x, cy - t, x1, cy + t), fill=fill)
    else:  # pragma: no cover - Shape is a closed Literal
        raise ValueError(icon.shape)


def render(scene: Scene, image_size: int = 112) -> Image.Image:
    """Draw ``scene`` (deterministic: no randomness beyond what the scene records)."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_icon(draw, ICONS[obj.name], obj.bbox)
    return image


def coco_categories() -> list[dict[str, object]]:
    return [
        {"id": i.coco_id, "name": i.name, "supercategory": i.supercategory}
        for i in sorted(ICONS.values(), key=lambda i: i.coco_id)
    ]


def to_coco(scenes: Sequence[Scene], image_size: int = 112) -> tuple[dict, dict]:
    """``(instances, captions)`` COCO dicts of ``scenes`` (file names ``<image_id>.png``)."""
    images = [
        {"id": s.image_id, "file_name": f"{s.image_id:012d}.png", "width": image_size, "height": image_size}
        for s in scenes
    ]
    annotations: list[dict[str, Any]] = []
    for s in scenes:
        for o in s.objects:
            x, y, w, h = o.bbox
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": s.image_id,
                    "category_id": ICONS[o.name].coco_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    caps = [{"id": i + 1, "image_id": s.image_id, "caption": caption(s.names)} for i, s in enumerate(scenes)]
    instances = {"images": images, "annotations": annotations, "categories": coco_categories()}
    return instances, {"images": images, "annotations": caps}


def write_coco(out: Path, split: Split, n: int, cfg: SceneConfig | None = None) -> Path:
    """Write ``n`` scenes of ``split`` to ``out``: ``images/*.png``, ``instances.json``, ``captions.json``."""
    cfg = cfg or SceneConfig()
    scenes = sample_scenes(split, n, cfg)
    (out / "images").mkdir(parents=True, exist_ok=True)
    instances, captions = to_coco(scenes, cfg.image_size)
    for scene, meta in zip(scenes, instances["images"], strict=True):
        render(scene, cfg.image_size).save(out / "images" / meta["file_name"])
    (out / "instances.json").write_text(json.dumps(instances, indent=1))
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    (out / "scene_config.json").write_text(json.dumps({"split": split, "n": n, **cfg.model_dump()}, indent=1))
    logger.info("wrote %d %s scenes to %s", n, split, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: write one split of synthetic scenes as a COCO-format folder."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=SPLITS, default="probe")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bias", type=float, default=0.9)
    parser.add_argument("--partner-size", type=int, default=SceneConfig().partner_size)
    parser.add_argument(
        "--model", type=Path, help="draw from the distribution this testbed checkpoint was trained on"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model is not None:
        cfg = trained_config(args.model).model_copy(update={"seed": args.seed})
    else:
        cfg = SceneConfig(seed=args.seed, bias=args.bias, partner_size=args.partner_size)
    write_coco(args.out, args.split, args.n, cfg)


if __name__ == "__main__":
    main()

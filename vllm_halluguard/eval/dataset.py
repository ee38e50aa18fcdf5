"""A local COCO-format image folder: image files plus an ``instances`` (and optional ``captions``) file.

Builds the work items of the runner: one caption request per sampled image for CHAIR, and the POPE
questions of :func:`.pope.build_split`. Sampling is deterministic: sorted image ids, then
``random.Random(seed).sample``.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import chair, pope
from .chair import ImageId, normalize_image_id

logger = logging.getLogger(__name__)


def _sort_key(image_id: ImageId) -> tuple[int, int | str]:
    return (0, image_id) if isinstance(image_id, int) else (1, image_id)


def sample_ids(ids: Iterable[Any], n: int | None, seed: int) -> list[ImageId]:
    """``n`` ids drawn by ``random.Random(seed)`` from the sorted ids (all, sorted, if ``n`` is None).

    The result depends only on the set of ids, ``n`` and ``seed``, not on their order in the file.
    """
    pool = sorted({normalize_image_id(i) for i in ids}, key=_sort_key)
    if n is None:
        return pool
    if n < 1:
        raise ValueError(f"n_images must be >= 1, got {n}")
    if n > len(pool):
        raise ValueError(f"{n} images requested but only {len(pool)} are available")
    return random.Random(seed).sample(pool, n)


def load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class CocoFolder:
    """Images in ``images_dir`` named by the ``file_name`` entries of a COCO ``instances`` dict."""

    images_dir: Path
    instances: dict[str, Any]
    captions: dict[str, Any] | None = None

    @classmethod
    def load(cls, images_dir: Path, annotations: Path, captions: Path | None = None) -> CocoFolder:
        if not Path(images_dir).is_dir():
            raise FileNotFoundError(f"image folder {images_dir} does not exist")
        data = load_json(annotations)
        if not isinstance(data, dict) or "images" not in data or "categories" not in data:
            raise ValueError(f"{annotations}: not a COCO instances file (needs 'images' and 'categories')")
        caps = load_json(captions) if captions is not None else None
        logger.info("loaded %d images from %s", len(data["images"]), annotations)
        return cls(Path(images_dir), data, caps)

    @property
    def file_names(self) -> dict[ImageId, str]:
        return {normalize_image_id(im["id"]): im["file_name"] for im in self.instances["images"]}

    def image_path(self, image_id: ImageId) -> Path:
        return self.images_dir / self.file_names[normalize_image_id(image_id)]

    def check_files(self, image_ids: Sequence[ImageId]) -> None:
        """Raise ``FileNotFoundError`` naming the first few sampled images that are not on disk."""
        missing = [str(self.image_path(i)) for i in image_ids if not self.image_path(i).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} sampled images are missing, e.g. {missing[:3]}")

    def chair_items(
        self, n_images: int | None, seed: int, variant: chair.Variant = "fixed"
    ) -> tuple[list[ImageId], chair.CocoObjects]:
        """Sampled image ids (over every image of the file) and their CHAIR ground truth.

        The reference captions are parsed by the ``variant`` parser, as the generated ones will be.
        """
        ids = sample_ids(self.file_names, n_images, seed)
        self.check_files(ids)
        parser = chair.default_parser(variant)
        gt = chair.CocoObjects.from_annotations(self.instances, self.captions, parser=parser)
        return ids, gt

    def pope_questions(
        self, splits: Sequence[pope.Split], n_images: int | None, seed: int, n_per_image: int
    ) -> list[pope.PopeQuestion]:
        """POPE questions of every split; the splits share their images (see :func:`.pope.select_images`)."""
        questions = [
            q
            for split in splits
            for q in pope.build_split(self.instances, split, n_per_image, seed, n_images=n_images)
        ]
        self.check_files(sorted({q.image_id for q in questions}, key=_sort_key))
        return questions


@lru_cache(maxsize=64)
def data_url(path: Path) -> str:
    """The file as a ``data:<mime>;base64,...`` URL (the MIME type is guessed from the suffix)."""
    mime = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")

"""POPE: polling-based object probing (Li et al., EMNLP 2023).

Each selected image yields ``n_per_image`` positive questions ("Is there a <object> in the
image?", label yes) about objects it contains and as many negatives about objects it does not
contain. Negatives come from one of three strategies, computed over the selected images:

- ``random``: uniformly random absent object;
- ``popular``: the most frequent absent object (frequency = number of selected images with it);
- ``adversarial``: the absent object that co-occurs most often with the paired positive.

Scoring treats *yes* as the positive class. Paper: https://arxiv.org/abs/2305.10355
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from .chair import ImageId, normalize_image_id

logger = logging.getLogger(__name__)

Split = Literal["random", "popular", "adversarial"]
SPLITS: tuple[Split, ...] = ("random", "popular", "adversarial")
AnswerStyle = Literal["pope", "opera"]
TEMPLATE = "Is there {article} {object} in the image?"


@dataclass(frozen=True)
class ImageObjects:
    """Distinct object names per image, in a fixed order, plus optional image file names."""

    objects: Mapping[ImageId, tuple[str, ...]]
    file_names: Mapping[ImageId, str]

    @classmethod
    def from_coco(cls, instances: Mapping[str, Any]) -> ImageObjects:
        """From a COCO ``instances_*.json`` dict: category names in order of first annotation."""
        names = {c["id"]: c["name"] for c in instances.get("categories", [])}
        objects: dict[ImageId, dict[str, None]] = {}
        file_names: dict[ImageId, str] = {}
        for image in instances.get("images", []):
            image_id = normalize_image_id(image["id"])
            objects.setdefault(image_id, {})
            if "file_name" in image:
                file_names[image_id] = image["file_name"]
        for ann in instances.get("annotations", []):
            objects.setdefault(normalize_image_id(ann["image_id"]), {})[names[ann["category_id"]]] = None
        return cls({k: tuple(v) for k, v in objects.items()}, file_names)

    @classmethod
    def coerce(cls, annotations: ImageObjects | Mapping[Any, Any]) -> ImageObjects:
        """Accept an ``ImageObjects``, a COCO instances dict, or ``{image_id: [object, ...]}``."""
        if isinstance(annotations, ImageObjects):
            return annotations
        if "annotations" in annotations and "categories" in annotations:
            return cls.from_coco(annotations)
        objects = {normalize_image_id(k): tuple(dict.fromkeys(v)) for k, v in annotations.items()}
        return cls(objects, {})


class PopeQuestion(BaseModel):
    question_id: int
    image_id: ImageId
    image: str | None
    object: str
    label: Literal["yes", "no"]
    text: str
    split: Split


def _sort_key(image_id: ImageId) -> tuple[int, int | str]:
    return (0, image_id) if isinstance(image_id, int) else (1, image_id)


def select_images(
    annotations: ImageObjects | Mapping[Any, Any],
    n_per_image: int = 3,
    n_images: int | None = None,
    seed: int = 0,
) -> list[ImageId]:
    """Images with at least ``n_per_image`` objects; a seeded sample of ``n_images`` of them if given.

    The choice depends only on the annotations, ``n_per_image``, ``n_images`` and ``seed``, so all
    three splits built with the same arguments share images (and positives).
    """
    data = ImageObjects.coerce(annotations)
    eligible = sorted((k for k, v in data.objects.items() if len(v) >= n_per_image), key=_sort_key)
    if n_images is None:
        return eligible
    if n_images > len(eligible):
        raise ValueError(f"only {len(eligible)} images have >= {n_per_image} objects, {n_images} requested")
    return random.Random(seed).sample(eligible, n_images)


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def build_split(
    annotations: ImageObjects | Mapping[Any, Any],
    split: Split,
    n_per_image: int = 3,
    seed: int = 0,
    *,
    n_images: int | None = None,
    vocabulary: Sequence[str] | None = None,
    template: str = TEMPLATE,
) -> list[PopeQuestion]:
    """Build one POPE split: per image, ``n_per_image`` (positive, negative) question pairs.

    Positives are the image's first ``n_per_image`` objects. Object frequency and co-occurrence
    are counted over the selected images; candidates for negatives are the objects seen there
    plus ``vocabulary``. Ties go to the alphabetically first object. An adversarial positive
    with no co-occurring absent object falls back to a random negative, as in the reference code.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
    if n_per_image < 1:
        raise ValueError("n_per_image must be >= 1")
    data = ImageObjects.coerce(annotations)
    images = select_images(data, n_per_image, n_images, seed)
    freq: Counter[str] = Counter()
    cooc: dict[str, Counter[str]] = {}
    for image_id in images:
        objs = data.objects[image_id]
        freq.update(objs)
        for a in objs:
            cooc.setdefault(a, Counter()).update(b for b in objs if b != a)
    pool = sorted(set(freq) | set(vocabulary or ()))
    rng = random.Random(f"pope:{split}:{seed}")

    questions: list[PopeQuestion] = []

    def ask(image_id: ImageId, name: str, label: Literal["yes", "no"]) -> None:
        text = template.format(article=_article(name), object=name)
        questions.append(
            PopeQuestion(
                question_id=len(questions) + 1,
                image_id=image_id,
                image=data.file_names.get(image_id),
                object=name,
                label=label,
                text=text,
                split=split,
            )
        )

    for image_id in images:
        present = set(data.objects[image_id])
        used: set[str] = set()
        for positive in data.objects[image_id][:n_per_image]:
            candidates = [o for o in pool if o not in present and o not in used]
            if not candidates:
                raise ValueError(f"image {image_id!r}: no absent object left for a negative")
            if split == "popular":
                negative = min(candidates, key=lambda o: (-freq[o], o))
            elif split == "adversarial" and any(cooc[positive][o] for o in candidates):
                negative = min(candidates, key=lambda o: (-cooc[positive][o], o))
            else:
                if split == "adversarial":
                    logger.debug("POPE adversarial: no co-occurring negative for %r; random", positive)
                negative = rng.choice(candidates)
            used.add(negative)
            ask(image_id, positive, "yes")
            ask(image_id, negative, "no")
    return questions


def parse_answer(text: str, style: AnswerStyle = "pope") -> bool:
    """True for *yes*. ``style="pope"`` is the official POPE rule, ``"opera"`` OPERA's variant.

    pope: keep the text before the first ".", drop ",", split on whitespace; "No", "no" or "not"
    as a word means *no*, anything else (an empty answer included) means *yes*.
    opera: drop "." and ",", split on whitespace; "No", "no", "NO", "not" or a word ending in
    "n't" means *no*.
    """
    if style == "pope":
        words = text.split(".", 1)[0].replace(",", "").split()
        return not any(w in ("No", "no", "not") for w in words)
    if style == "opera":
        words = text.replace(".", "").replace(",", "").split()
        return not any(w in ("No", "no", "NO", "not") or w.endswith("n't") for w in words)
    raise ValueError(f"unknown answer style {style!r}")


class PopeReport(BaseModel):
    """POPE metrics with *yes* as the positive class (fractions in [0, 1])."""

    answer_style: AnswerStyle
    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float

    def metrics(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def score(
    questions: Sequence[PopeQuestion | Mapping[str, Any]],
    answers: Mapping[int, str] | Sequence[str],
    *,
    style: AnswerStyle = "pope",
) -> PopeReport:
    """Score ``answers`` (question id -> text, or a list aligned with ``questions``)."""
    qs = [q if isinstance(q, PopeQuestion) else PopeQuestion.model_validate(q) for q in questions]
    if isinstance(answers, Mapping):
        missing = [q.question_id for q in qs if q.question_id not in answers]
        if missing:
            raise KeyError(f"{len(missing)} questions have no answer, e.g. {missing[:5]}")
        texts = [answers[q.question_id] for q in qs]
    else:
        if len(answers) != len(qs):
            raise ValueError(f"{len(answers)} answers for {len(qs)} questions")
        texts = list(answers)
    tp = fp = tn = fn = 0
    for q, text in zip(qs, texts, strict=True):
        said_yes = parse_answer(text, style)
        is_yes = q.label == "yes"
        tp += said_yes and is_yes
        fp += said_yes and not is_yes
        tn += not said_yes and not is_yes
        fn += not said_yes and is_yes
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return PopeReport(
        answer_style=style,
        n=len(qs),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=_ratio(tp + tn, len(qs)),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        yes_ratio=_ratio(tp + fp, len(qs)),
    )

"""CHAIR object-hallucination metrics (Rohrbach et al., EMNLP 2018).

A caption is parsed into mentions of the 80 COCO categories: lower-case, tokenize, reduce plurals,
merge multi-word phrases, apply the reference special cases, then map every surface form to its
category through the synonym table in :mod:`.coco_objects`. Ground truth per image is the union of
its COCO instance categories and the categories parsed from its reference captions.

- ``CHAIR_i`` = hallucinated mentions / all mentions (repeats count), pooled over captions.
- ``CHAIR_s`` = captions with at least one hallucinated mention / captions.
- Recall / precision / F1 over the *distinct* categories of each caption, pooled (micro).

Three variants: ``fixed`` (default) and ``reference`` reduce plurals by rules and an irregulars
table gated by the table's vocabulary, with a regex tokenizer; ``original`` reproduces the original
scorer's NLTK tokenizing and ``pattern`` singularizing, quirks included (:mod:`.chair_original`).
``docs/evaluation.md`` lists every difference.
Paper: https://arxiv.org/abs/1809.02156
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel

from . import coco_objects
from .chair_original import pattern_singularize, treebank_tokenize

logger = logging.getLogger(__name__)

ImageId = int | str
Variant = Literal["fixed", "reference", "original"]
VARIANTS: tuple[Variant, ...] = ("fixed", "reference", "original")

# A word: letters/digits, hyphenated compounds kept whole (as NLTK's word_tokenize does); a
# trailing clitic ("dog's", "dogs'", "can't") is consumed but not part of the word.
_WORD_RE = re.compile(r"([^\W_]+(?:-[^\W_]+)*)(?:['’][^\W_]*)?")

_IRREGULAR_PLURALS: dict[str, str] = {
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "oxen": "ox",
    "children": "child",
    "people": "person",
    "dice": "die",
    "lice": "louse",
    "cacti": "cactus",
}
# (plural suffix, singular suffix, allowed stem endings or None), longest first; every candidate
# is checked against a vocabulary. A bare "-es" is stripped only after a sibilant ("buses",
# "benches", "glasses"), so "skies", "manes", "cares" and "vanes" are not reduced to ski, man, car
# and van; "horses" and "vases" reach their singular through the "-s" rule.
_SIBILANTS = ("s", "x", "z", "ch", "sh")
_SUFFIX_RULES: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("children", "child", None),
    ("men", "man", None),
    ("ies", "y", None),
    ("ies", "ie", None),
    ("ves", "f", None),
    ("ves", "fe", None),
    ("oes", "o", None),
    ("es", "", _SIBILANTS),
    ("s", "", None),
)


def normalize_image_id(image_id: Any) -> ImageId:
    """Return ``image_id`` as an int when it is one (or a string of digits), else as a string."""
    if isinstance(image_id, bool):
        raise TypeError(f"image id must be int or str, got {image_id!r}")
    if isinstance(image_id, int):
        return image_id
    text = str(image_id).strip()
    return int(text) if text.isdigit() else text


def tokenize(text: str) -> list[tuple[str, int, int]]:
    """Lower-cased word tokens of ``text`` with their character spans ``(word, start, end)``."""
    return [(m.group(1).lower(), m.start(1), m.end(1)) for m in _WORD_RE.finditer(text)]


@dataclass(frozen=True)
class Singularizer:
    """Vocabulary-gated plural reducer: a word becomes a singular form only if that form is known.

    Words already in ``vocabulary`` are kept; otherwise the irregulars table and the suffix rules
    propose candidates and the first one in ``vocabulary`` wins. Unknown words are left unchanged.
    """

    vocabulary: frozenset[str]
    _cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, word: str) -> str:
        hit = self._cache.get(word)
        if hit is None:
            hit = self._cache[word] = self._reduce(word)
        return hit

    def _reduce(self, word: str) -> str:
        if word in self.vocabulary:
            return word
        irregular = _IRREGULAR_PLURALS.get(word)
        if irregular is not None and irregular in self.vocabulary:
            return irregular
        for plural, singular, stem_endings in _SUFFIX_RULES:
            if not word.endswith(plural):
                continue
            stem = word[: len(word) - len(plural)]
            if stem_endings is not None and not stem.endswith(stem_endings):
                continue
            candidate = stem + singular  # "men" itself has an empty stem
            if candidate and candidate in self.vocabulary:
                return candidate
        return word


class Mention(BaseModel):
    """One COCO object mention: ``caption[start:end]`` is the surface text."""

    category: str
    word: str
    start: int
    end: int


class ParsedCaption(BaseModel):
    mentions: list[Mention]
    n_words: int


@dataclass(frozen=True, eq=False)
class CaptionParser:
    """Caption -> COCO mentions, following the reference ``caption_to_words``.

    ``variant="fixed"`` (default) strips and lower-cases every table entry (so " motor bike",
    " cheesecake" and "iPhone" can match) and merges phrases of up to three words (so "stove top
    oven" can match). ``variant="reference"`` keeps those entries unmatched and merges pairs only,
    as the reference scorer does. ``variant="original"`` is ``reference`` with the original
    scorer's tokenizer and singularizer (:mod:`.chair_original`) instead of ours, so its mentions
    are the original's, errors included ("bus" is never found, "ties" is not a tie).
    """

    variant: Variant = "fixed"
    node_of: Mapping[str, str] = field(init=False)
    phrases: Mapping[tuple[str, ...], str] = field(init=False)
    phrase_starts: frozenset[str] = field(init=False)
    singularize: Singularizer = field(init=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown CHAIR variant {self.variant!r}")
        node_of: dict[str, str] = {}
        for line in coco_objects.SYNONYM_LINES:
            if self.variant == "fixed":
                entries = [e.strip().lower() for e in line.split(",")]
            else:
                entries = line.strip().split(", ")
            for entry in entries:
                node_of[entry] = entries[0]
        phrases = {w: w for w in coco_objects.COCO_DOUBLE_WORDS}
        for animal in coco_objects.AGE_QUALIFIED_ANIMALS:
            phrases[f"baby {animal}"] = animal
            phrases[f"adult {animal}"] = animal
        for vehicle in coco_objects.PASSENGER_VEHICLES:
            phrases[f"passenger {vehicle}"] = vehicle
        phrases.update(coco_objects.PHRASE_OVERRIDES)
        max_len = 3 if self.variant == "fixed" else 2
        keyed = {tuple(k.split()): v for k, v in phrases.items() if len(k.split()) <= max_len}
        words = {w for text in (*node_of, *phrases, *phrases.values()) for w in text.split()}
        object.__setattr__(self, "node_of", node_of)
        object.__setattr__(self, "phrases", keyed)
        object.__setattr__(self, "phrase_starts", frozenset(k[0] for k in keyed))
        object.__setattr__(self, "singularize", Singularizer(frozenset(words)))

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.node_of.values()))

    def tokens(self, caption: str) -> tuple[list[tuple[str, int, int]], int]:
        """Singularized tokens ``(word, start, end)`` of ``caption`` and its number of words."""
        if self.variant == "original":
            lowered = caption.lower()
            if len(lowered) != len(caption):  # a few characters lower-case to two; keep spans aligned
                lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in caption)
            raw = treebank_tokenize(lowered)
            n_words = sum(any(c.isalnum() for c in w) for w, _, _ in raw)
            return [(pattern_singularize(w), s, e) for w, s, e in raw], n_words
        tokens = [(self.singularize(w), s, e) for w, s, e in tokenize(caption)]
        return tokens, len(tokens)

    def scan(self, caption: str) -> tuple[list[tuple[str, int, int]], int]:
        """``([(word, start, end), ...], n_words)`` for every table word in ``caption``."""
        tokens, n_words = self.tokens(caption)
        merged: list[tuple[str, int, int]] = []
        i = 0
        while i < len(tokens):
            for n in (3, 2) if tokens[i][0] in self.phrase_starts else ():
                key = tuple(t[0] for t in tokens[i : i + n])
                if len(key) == n and key in self.phrases:
                    merged.append((self.phrases[key], tokens[i][1], tokens[i + n - 1][2]))
                    i += n
                    break
            else:
                merged.append(tokens[i])
                i += 1
        words = {m[0] for m in merged}
        if "toilet" in words and "seat" in words:  # "the seat of the toilet" is not a chair
            merged = [m for m in merged if m[0] != "seat"]
        return [m for m in merged if m[0] in self.node_of], n_words

    def parse(self, caption: str) -> ParsedCaption:
        found, n_words = self.scan(caption)
        mentions = [Mention(category=self.node_of[w], word=w, start=s, end=e) for w, s, e in found]
        return ParsedCaption(mentions=mentions, n_words=n_words)

    def category_of(self, name: str) -> str:
        """Map a COCO category name (or any synonym) to its node word."""
        node = self.node_of.get(name) or self.node_of.get(name.strip().lower())
        if node is None:
            raise ValueError(f"{name!r} is not in the COCO synonym table")
        return node


@cache
def default_parser(variant: Variant = "fixed") -> CaptionParser:
    return CaptionParser(variant)


def extract_objects(caption: str, parser: CaptionParser | None = None) -> list[Mention]:
    """COCO object mentions in ``caption``, in order, repeats kept."""
    return (parser or default_parser()).parse(caption).mentions


def _as_list(data: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    if data is None:
        return []
    return [data] if isinstance(data, Mapping) else list(data)


@dataclass(frozen=True)
class CocoObjects:
    """Ground-truth COCO categories per image."""

    objects: Mapping[ImageId, frozenset[str]]
    variant: Variant = "fixed"

    @classmethod
    def from_annotations(
        cls,
        instances: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        captions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        *,
        parser: CaptionParser | None = None,
    ) -> CocoObjects:
        """Build from COCO ``instances_*.json`` and optionally ``captions_*.json`` dicts.

        Pass a list to merge several files (e.g. train2014 + val2014, as the OPERA port does).
        Every image listed in ``images`` is known, even when it has no object.
        """
        parser = parser or default_parser()
        objects: dict[ImageId, set[str]] = {}
        for data in _as_list(instances):
            names = {c["id"]: parser.category_of(c["name"]) for c in data.get("categories", [])}
            for image in data.get("images", []):
                objects.setdefault(normalize_image_id(image["id"]), set())
            for ann in data.get("annotations", []):
                image_id = normalize_image_id(ann["image_id"])
                objects.setdefault(image_id, set()).add(names[ann["category_id"]])
        for data in _as_list(captions):
            for image in data.get("images", []):
                objects.setdefault(normalize_image_id(image["id"]), set())
            for ann in data.get("annotations", []):
                found = {parser.node_of[w] for w, _, _ in parser.scan(ann["caption"])[0]}
                objects.setdefault(normalize_image_id(ann["image_id"]), set()).update(found)
        logger.debug("CHAIR ground truth for %d images", len(objects))
        return cls({k: frozenset(v) for k, v in objects.items()}, parser.variant)

    def __getitem__(self, image_id: Any) -> frozenset[str]:
        return self.objects[normalize_image_id(image_id)]

    def __contains__(self, image_id: object) -> bool:
        return normalize_image_id(image_id) in self.objects


class ScoredMention(Mention):
    hallucinated: bool


class ImageChair(BaseModel):
    image_id: ImageId
    n_words: int
    mentions: list[ScoredMention]
    gt_objects: list[str]
    covered: list[str]
    hallucinated: list[str]
    chair_i: float
    has_hallucination: bool


class ChairReport(BaseModel):
    """Aggregate CHAIR metrics (fractions in [0, 1]) plus per-image details."""

    variant: Variant
    n_captions: int
    n_mentions: int
    n_hallucinated_mentions: int
    n_hallucinated_captions: int
    chair_s: float
    chair_i: float
    recall: float
    precision: float
    f1: float
    mean_length: float
    per_image: list[ImageChair]

    def metrics(self) -> dict[str, float]:
        keys = ("chair_s", "chair_i", "recall", "precision", "f1", "mean_length")
        return {k: getattr(self, k) for k in keys}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def f1_score(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def score(
    captions: Mapping[Any, str] | Iterable[tuple[Any, str]],
    gt: CocoObjects,
    *,
    parser: CaptionParser | None = None,
) -> ChairReport:
    """Score generated ``captions`` (image id -> text) against ground truth ``gt``.

    Every image id must be known to ``gt``: the reference scorer silently treats an unknown id as
    an image with no objects, which mostly hides id mismatches, so this raises ``KeyError``.
    """
    parser = parser or default_parser(gt.variant)
    items = list(captions.items() if isinstance(captions, Mapping) else captions)
    missing = [image_id for image_id, _ in items if image_id not in gt]
    if missing:
        raise KeyError(f"{len(missing)} caption image ids have no ground truth, e.g. {missing[:5]}")
    per_image: list[ImageChair] = []
    n_mentions = n_halluc = n_halluc_caps = n_words = 0
    n_gt = n_covered = n_distinct = 0
    for raw_id, caption in items:
        image_id = normalize_image_id(raw_id)
        truth = gt[image_id]
        parsed = parser.parse(caption)
        scored = [
            ScoredMention(**m.model_dump(), hallucinated=m.category not in truth) for m in parsed.mentions
        ]
        bad = [m.category for m in scored if m.hallucinated]
        distinct = {m.category for m in scored}
        covered = sorted(distinct & truth)
        n_mentions += len(scored)
        n_halluc += len(bad)
        n_halluc_caps += bool(bad)
        n_words += parsed.n_words
        n_gt += len(truth)
        n_covered += len(covered)
        n_distinct += len(distinct)
        per_image.append(
            ImageChair(
                image_id=image_id,
                n_words=parsed.n_words,
                mentions=scored,
                gt_objects=sorted(truth),
                covered=covered,
                hallucinated=bad,
                chair_i=_ratio(len(bad), len(scored)),
                has_hallucination=bool(bad),
            )
        )
    recall = _ratio(n_covered, n_gt)
    precision = _ratio(n_covered, n_distinct)
    return ChairReport(
        variant=parser.variant,
        n_captions=len(items),
        n_mentions=n_mentions,
        n_hallucinated_mentions=n_halluc,
        n_hallucinated_captions=n_halluc_caps,
        chair_s=_ratio(n_halluc_caps, len(items)),
        chair_i=_ratio(n_halluc, n_mentions),
        recall=recall,
        precision=precision,
        f1=f1_score(precision, recall),
        mean_length=_ratio(n_words, len(items)),
        per_image=per_image,
    )

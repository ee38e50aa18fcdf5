"""AMBER metrics without spaCy or NLTK data (Wang et al., 2023).

Generative task (one description per image):

- candidates: words of the response that are in the AMBER object vocabulary (``relation.json``
  keys and values), repeats kept;
- a candidate is *safe* if it is a global safe word, one of the image's ``truth`` objects or a
  word associated with one; otherwise it is a hallucination;
- ``CHAIR`` = hallucinated candidates / candidates, pooled; ``Hal`` = responses with at least one
  hallucination / responses; ``Cover`` = truth objects mentioned / truth objects, pooled;
  ``Cog`` = annotated ``hallu`` objects mentioned / ``hallu`` objects, pooled.

The counting follows the official ``inference.py`` (first-match attribution of associated words,
global safe words checked first). Two steps are approximated; see ``APPROXIMATIONS`` and
``docs/evaluation.md``. The discriminative task is scored exactly as the official script does,
except that F1 is not computed from rounded percentages. Code: github.com/junyangwang0410/AMBER
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .chair import Singularizer, tokenize

logger = logging.getLogger(__name__)

Similarity = Callable[[str, str], float]

APPROXIMATIONS: tuple[str, ...] = (
    "nouns: vocabulary words found by rule-based plural reduction, without a POS tagger; a few "
    "ambiguous words count only after a determiner, and 'hot' never counts",
    "near-synonyms: no spaCy en_core_web_lg similarity (> 0.8) unless a similarity function is given",
    "text is lower-cased before matching (the official script does not lower-case)",
)

# Words whose verb/modal use is common in descriptions: their singular form counts only right
# after a determiner (a stand-in for the POS tagger).
# fmt: off
AMBIGUOUS_WORDS: frozenset[str] = frozenset({
    "can", "watch", "drink", "leave", "sound", "support", "note", "file", "ring", "switch", "star",
    "lock", "brush", "sailing", "drawing",
})
NEVER_NOUNS: frozenset[str] = frozenset({"hot"})
DETERMINERS: frozenset[str] = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "my", "your",
    "our", "some", "any", "each", "every", "another", "one", "two", "three", "several", "many", "no",
})
# fmt: on

# Official type -> reported group; every other non-generative type (the released file also uses
# plain "relation") is counted as relation, as the official script's catch-all branch does.
_FINE_GROUPS: Mapping[str, str] = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
}
_ATTRIBUTE = ("state", "number", "action")


@dataclass(frozen=True, eq=False)
class AmberData:
    """AMBER annotations: ``annotations.json`` items, ``relation.json`` and ``safe_words.txt``."""

    items: Mapping[int, Mapping[str, Any]]
    association: Mapping[str, tuple[str, ...]]
    safe_words: frozenset[str]
    vocabulary: frozenset[str] = field(init=False)
    singularize: Singularizer = field(init=False)

    def __post_init__(self) -> None:
        vocab = {w for k, vs in self.association.items() for w in (k, *vs)}
        object.__setattr__(self, "vocabulary", frozenset(vocab))
        object.__setattr__(self, "singularize", Singularizer(frozenset(vocab)))

    @classmethod
    def from_json(
        cls,
        annotations: Sequence[Mapping[str, Any]],
        relation: Mapping[str, Sequence[str]],
        safe_words: Iterable[str],
    ) -> AmberData:
        items = {int(item["id"]): item for item in annotations}
        association = {k.lower(): tuple(v.lower() for v in vs) for k, vs in relation.items()}
        safe = frozenset(w.strip().lower() for w in safe_words if w.strip())
        return cls(items, association, safe)

    def candidates(self, text: str) -> list[str]:
        """Vocabulary words of ``text`` in order (the approximation of NLTK noun extraction)."""
        out: list[str] = []
        prev = ""
        for raw, _, _ in tokenize(text):
            word = self.singularize(raw)
            ambiguous = raw in AMBIGUOUS_WORDS and prev not in DETERMINERS
            if word in self.vocabulary and word not in NEVER_NOUNS and not ambiguous:
                out.append(word)
            prev = raw
        return out


class AmberItem(BaseModel):
    id: int
    candidates: list[str]
    hallucinated: list[str]
    covered: list[str]
    missed: list[str]
    hallu_mentioned: list[str]


class AmberReport(BaseModel):
    """AMBER generative metrics (fractions in [0, 1]) and what was approximated."""

    n_responses: int
    n_candidates: int
    n_hallucinated: int
    chair: float
    cover: float
    hal: float
    cog: float
    similarity: bool
    approximations: list[str]
    per_item: list[AmberItem]

    def metrics(self) -> dict[str, float]:
        return {"chair": self.chair, "cover": self.cover, "hal": self.hal, "cog": self.cog}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _targets(objects: Sequence[str], association: Mapping[str, tuple[str, ...]]) -> list[tuple[str, int]]:
    """The official look-up order: every object's associated words first, then the objects."""
    assoc = [(w, i) for i, o in enumerate(objects) for w in association.get(o, ())]
    return assoc + [(o, i) for i, o in enumerate(objects)]


def _first(noun: str, targets: list[tuple[str, int]], similar: Callable[[str], bool] | None) -> int | None:
    for word, idx in targets:
        if (word == noun) if similar is None else similar(word):
            return idx
    return None


def _score_item(
    item_id: int, text: str, data: AmberData, similarity: Similarity | None, threshold: float
) -> AmberItem:
    item = data.items[item_id]
    truth = [w.lower() for w in item["truth"]]
    hallu = [w.lower() for w in item.get("hallu", [])]
    safe_t, hallu_t = _targets(truth, data.association), _targets(hallu, data.association)
    covered, hit = [False] * len(truth), [False] * len(hallu)
    nouns = data.candidates(text)
    bad: list[str] = []
    for noun in nouns:
        if noun in data.safe_words:
            continue
        idx = _first(noun, safe_t, None)
        if idx is not None:
            covered[idx] = True
            continue
        idx = _first(noun, hallu_t, None)
        if idx is not None:
            hit[idx] = True
        if similarity is not None:

            def near(word: str, noun: str = noun) -> bool:
                return similarity(noun, word) > threshold

            idx = _first(noun, hallu_t, near)
            if idx is not None:
                hit[idx] = True
            idx = _first(noun, safe_t, near)
            if idx is not None:
                covered[idx] = True
                continue
        bad.append(noun)
    return AmberItem(
        id=item_id,
        candidates=nouns,
        hallucinated=bad,
        covered=[w for w, c in zip(truth, covered, strict=True) if c],
        missed=[w for w, c in zip(truth, covered, strict=True) if not c],
        hallu_mentioned=[w for w, h in zip(hallu, hit, strict=True) if h],
    )


def score(
    responses: Mapping[Any, str] | Iterable[Mapping[str, Any]],
    data: AmberData,
    *,
    similarity: Similarity | None = None,
    threshold: float = 0.8,
) -> AmberReport:
    """Score generative responses: ``{id: text}`` or the official ``[{"id", "response"}]`` list.

    ``similarity(noun, word)`` may supply the official spaCy check (e.g. ``nlp(a).similarity(nlp(b))``);
    without it, near-synonyms that are not in the association lists count as hallucinations.
    """
    pairs = (
        [(int(k), v) for k, v in responses.items()]
        if isinstance(responses, Mapping)
        else [(int(r["id"]), r["response"]) for r in responses]
    )
    for item_id, _ in pairs:
        kind = data.items.get(item_id, {}).get("type")
        if kind != "generative":
            raise ValueError(f"AMBER id {item_id} is not a generative item (type {kind!r})")
    per_item = [_score_item(i, text, data, similarity, threshold) for i, text in pairs]
    n_cand = sum(len(r.candidates) for r in per_item)
    n_bad = sum(len(r.hallucinated) for r in per_item)
    n_truth = sum(len(r.covered) + len(r.missed) for r in per_item)
    n_hallu = sum(len(data.items[r.id].get("hallu", [])) for r in per_item)
    return AmberReport(
        n_responses=len(per_item),
        n_candidates=n_cand,
        n_hallucinated=n_bad,
        chair=_ratio(n_bad, n_cand),
        cover=_ratio(sum(len(r.covered) for r in per_item), n_truth),
        hal=_ratio(sum(bool(r.hallucinated) for r in per_item), len(per_item)),
        cog=_ratio(sum(len(r.hallu_mentioned) for r in per_item), n_hallu),
        similarity=similarity is not None,
        approximations=[a for a in APPROXIMATIONS if similarity is None or not a.startswith("near-synonyms")],
        per_item=per_item,
    )


class DiscriminativeScores(BaseModel):
    """Official AMBER yes/no scores: precision and recall treat *no* as the positive class."""

    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float


class AmberDiscriminativeReport(BaseModel):
    overall: DiscriminativeScores
    groups: dict[str, DiscriminativeScores]


def _disc_scores(rows: Sequence[tuple[str, str]]) -> DiscriminativeScores:
    correct = sum((truth == "yes" and ans == "Yes") or (truth == "no" and ans == "No") for truth, ans in rows)
    said_no = sum(ans == "No" for _, ans in rows)
    true_no = sum(truth == "no" for truth, _ in rows)
    right_no = sum(truth == "no" and ans == "No" for truth, ans in rows)
    precision, recall = _ratio(right_no, said_no), _ratio(right_no, true_no)
    return DiscriminativeScores(
        n=len(rows),
        accuracy=_ratio(correct, len(rows)),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
    )


def score_discriminative(
    responses: Mapping[Any, str] | Iterable[Mapping[str, Any]], data: AmberData, *, normalize: bool = False
) -> AmberDiscriminativeReport:
    """Score yes/no answers. The official rule counts only the exact strings "Yes" and "No";
    ``normalize=True`` first maps answers whose first word is yes/no (any case, punctuation
    stripped) onto them."""
    pairs = (
        [(int(k), v) for k, v in responses.items()]
        if isinstance(responses, Mapping)
        else [(int(r["id"]), r["response"]) for r in responses]
    )
    rows: list[tuple[str, str, str]] = []
    for item_id, answer in pairs:
        item = data.items.get(item_id)
        if item is None or item.get("type") == "generative":
            raise ValueError(f"AMBER id {item_id} is not a discriminative item")
        if normalize:
            first = (answer.strip().split() or [""])[0].strip(".,!:;").lower()
            answer = {"yes": "Yes", "no": "No"}.get(first, answer)
        group = _FINE_GROUPS.get(str(item.get("type")), "relation")
        rows.append((group, str(item["truth"]).lower(), answer))
    groups: dict[str, DiscriminativeScores] = {}
    for name, members in (
        ("existence", ("existence",)),
        ("attribute", _ATTRIBUTE),
        *((g, (g,)) for g in _ATTRIBUTE),
        ("relation", ("relation",)),
    ):
        selected = [(t, a) for g, t, a in rows if g in members]
        if selected:
            groups[name] = _disc_scores(selected)
    return AmberDiscriminativeReport(overall=_disc_scores([(t, a) for _, t, a in rows]), groups=groups)

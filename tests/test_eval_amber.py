"""AMBER: generative and discriminative scoring on a hand-made annotation set."""

import json

import pytest

from vllm_halluguard.eval import amber

ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "grass", "person", "man"], "hallu": ["cat", "frisbee"]},
    {"id": 2, "type": "generative", "truth": ["sky", "tree"], "hallu": ["bird", "sun"]},
    {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 4, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 5, "type": "discriminative-attribute-state", "truth": "no"},
    {"id": 6, "type": "discriminative-attribute-number", "truth": "yes"},
    {"id": 7, "type": "relation", "truth": "no"},  # the released file has some of these
    {"id": 8, "type": "discriminative-relation", "truth": "yes"},
]
RELATION = {
    "dog": [],
    "grass": ["ground"],
    "person": ["people", "man", "woman"],
    "man": ["person", "boy"],
    "cat": [],
    "frisbee": [],
    "tree": ["forest", "bush"],
    "sky": [],
    "bird": [],
    "sun": [],
    "can": [],
    "car": ["window"],
    "orange": [],
    "puppy": [],
    "hot": [],
}
SAFE_WORDS = ["orange", ""]


@pytest.fixture
def data() -> amber.AmberData:
    return amber.AmberData.from_json(ANNOTATIONS, RELATION, SAFE_WORDS)


def test_candidates_approximate_noun_extraction(data):
    text = "You can see two cats, a can and a hot dog. Dogs!"
    # modal "can" (after "you") skipped, "cats" -> cat, "a can" counted, "hot" never, "Dogs" -> dog
    assert data.candidates(text) == ["cat", "can", "dog", "dog"]


def test_generative_scores_match_hand_computation(data):
    responses = {
        1: "A dog and a man sit on the grass near two cats. You can see an orange car.",
        2: "Trees under a clear sky.",
    }
    report = amber.score(responses, data)
    # Item 1 candidates: dog, man, grass, cat, orange, car ("can" is modal here).
    #   dog -> covers truth "dog"; man -> first match is person's associated word "man", so it
    #   covers "person" (official first-match rule), not "man"; grass -> covers "grass";
    #   cat -> not safe: hallucination, and an annotated hallu target (Cog);
    #   orange -> global safe word: a candidate, never a hallucination; car -> hallucination.
    # Item 2 candidates: tree, sky -> both truth objects, no hallucination.
    one, two = report.per_item
    assert one.candidates == ["dog", "man", "grass", "cat", "orange", "car"]
    assert one.hallucinated == ["cat", "car"]
    assert one.covered == ["dog", "grass", "person"]
    assert one.missed == ["man"]
    assert one.hallu_mentioned == ["cat"]
    assert two.hallucinated == [] and two.covered == ["sky", "tree"]
    assert report.n_candidates == 8 and report.n_hallucinated == 2
    assert report.chair == pytest.approx(2 / 8)
    assert report.hal == pytest.approx(1 / 2)
    assert report.cover == pytest.approx(5 / 6)
    assert report.cog == pytest.approx(1 / 4)
    assert not report.similarity and len(report.approximations) == 3
    assert json.loads(report.model_dump_json())["chair"] == pytest.approx(0.25)
    official_format = [{"id": k, "response": v} for k, v in responses.items()]
    assert amber.score(official_format, data) == report


def test_similarity_hook_marks_near_synonyms_safe(data):
    def similarity(a: str, b: str) -> float:
        return 0.9 if {a, b} == {"puppy", "dog"} else 0.0

    plain = amber.score({1: "A puppy."}, data)
    assert plain.per_item[0].hallucinated == ["puppy"] and plain.cover == 0.0
    hooked = amber.score({1: "A puppy."}, data, similarity=similarity)
    assert hooked.per_item[0].hallucinated == [] and hooked.per_item[0].covered == ["dog"]
    assert hooked.similarity and len(hooked.approximations) == 2
    strict = amber.score({1: "A puppy."}, data, similarity=similarity, threshold=0.95)
    assert strict.per_item[0].hallucinated == ["puppy"]


def test_generative_rejects_other_ids(data):
    with pytest.raises(ValueError, match="not a generative"):
        amber.score({3: "No"}, data)
    with pytest.raises(ValueError):
        amber.score({99: "A dog."}, data)


def test_discriminative_scores_match_hand_computation(data):
    answers = {3: "No", 4: "Yes", 5: "Yes", 6: "No", 7: "No", 8: "yes"}
    report = amber.score_discriminative(answers, data)
    # Exact "Yes"/"No" only, so "yes" on item 8 is wrong. Correct: 3, 4, 7.
    # "No" is the positive class: said No = {3, 6, 7}, truly no = {3, 5, 7}, both = {3, 7}.
    assert report.overall.n == 6
    assert report.overall.accuracy == pytest.approx(3 / 6)
    assert report.overall.precision == pytest.approx(2 / 3)
    assert report.overall.recall == pytest.approx(2 / 3)
    assert report.overall.f1 == pytest.approx(2 / 3)
    groups = report.groups
    assert set(groups) == {"existence", "attribute", "state", "number", "relation"}
    assert (groups["existence"].accuracy, groups["existence"].precision) == (1.0, 1.0)
    assert (groups["attribute"].n, groups["attribute"].accuracy, groups["attribute"].f1) == (2, 0.0, 0.0)
    assert (groups["relation"].n, groups["relation"].accuracy, groups["relation"].recall) == (2, 0.5, 1.0)
    relaxed = amber.score_discriminative(answers, data, normalize=True)
    assert relaxed.overall.accuracy == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        amber.score_discriminative({1: "Yes"}, data)

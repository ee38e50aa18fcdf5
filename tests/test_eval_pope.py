"""POPE: split-building invariants and scoring on hand-made cases."""

import json
from collections import Counter

import pytest

from vllm_halluguard.eval import pope

CATEGORIES = ["person", "dog", "car", "frisbee", "bus", "cat", "couch", "tv", "traffic light"]
NAMES = dict(enumerate(CATEGORIES, start=1))
OBJECTS = {  # image -> categories in annotation order
    1: ["person", "dog", "car"],
    2: ["person", "dog", "frisbee"],
    3: ["person", "car", "bus"],
    4: ["cat", "couch", "tv"],
    5: ["person", "car", "traffic light", "bus"],
    6: ["dog"],  # too few objects for n_per_image=3
}


def coco_instances() -> dict:
    ids = {name: cid for cid, name in NAMES.items()}
    anns = []
    for image_id, objs in OBJECTS.items():
        for name in objs + objs[:1]:  # a repeated instance must not repeat the object
            anns.append({"id": len(anns), "image_id": image_id, "category_id": ids[name]})
    return {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in OBJECTS],
        "categories": [{"id": cid, "name": name} for cid, name in NAMES.items()],
        "annotations": anns,
    }


def yes_no_pairs(questions: list[pope.PopeQuestion]) -> list[tuple[int, str, str]]:
    """(image, positive, negative) per question pair; questions alternate yes/no."""
    assert [q.label for q in questions] == ["yes", "no"] * (len(questions) // 2)
    return [(a.image_id, a.object, b.object) for a, b in zip(questions[::2], questions[1::2], strict=True)]


def test_from_coco_keeps_annotation_order_and_file_names():
    data = pope.ImageObjects.from_coco(coco_instances())
    assert data.objects[5] == ("person", "car", "traffic light", "bus")
    assert data.file_names[1] == "COCO_val2014_000000000001.jpg"


@pytest.mark.parametrize("split", pope.SPLITS)
def test_split_invariants(split):
    questions = pope.build_split(coco_instances(), split, n_per_image=3, seed=0)
    assert len(questions) == 5 * 6  # image 6 has fewer than 3 objects
    assert [q.question_id for q in questions] == list(range(1, 31))
    labels = Counter(q.label for q in questions)
    assert labels["yes"] == labels["no"] == 15
    for image_id, positive, negative in yes_no_pairs(questions):
        assert positive in OBJECTS[image_id]
        assert negative not in OBJECTS[image_id]
    for image_id in (1, 2, 3, 4, 5):
        mine = [q for q in questions if q.image_id == image_id]
        assert [q.object for q in mine if q.label == "yes"] == OBJECTS[image_id][:3]
        negatives = [q.object for q in mine if q.label == "no"]
        assert len(set(negatives)) == 3
    assert questions[0].image == "COCO_val2014_000000000001.jpg"
    assert all(q.split == split for q in questions)
    assert pope.build_split(coco_instances(), split, n_per_image=3, seed=0) == questions


def test_popular_negatives_are_most_frequent_absent_objects():
    questions = pope.build_split(coco_instances(), "popular", n_per_image=3)
    # Frequency over images 1-5: person 4, car 3, bus 2, dog 2, then 1 each (ties alphabetical).
    expected = {
        1: ["bus", "cat", "couch"],
        2: ["car", "bus", "cat"],
        3: ["dog", "cat", "couch"],
        4: ["person", "car", "bus"],
        5: ["dog", "cat", "couch"],
    }
    got: dict[int, list[str]] = {}
    for image_id, _, negative in yes_no_pairs(questions):
        got.setdefault(image_id, []).append(negative)
    assert got == expected


def test_adversarial_negatives_are_most_co_occurring_absent_objects():
    questions = pope.build_split(coco_instances(), "adversarial", n_per_image=3)
    # Co-occurrence (images with both) among images 1-5, worked out by hand:
    # person: car 3, dog 2, bus 2, frisbee 1, traffic light 1; dog: person 2, car 1, frisbee 1;
    # car: person 3, bus 2, dog 1, traffic light 1; bus: person 2, car 2, traffic light 1.
    expected = {
        (1, "person"): "bus",
        (1, "dog"): "frisbee",
        (1, "car"): "traffic light",
        (2, "person"): "car",
        (3, "person"): "dog",
        (3, "car"): "traffic light",
        (5, "person"): "dog",
    }
    got = {(i, p): n for i, p, n in yes_no_pairs(questions)}
    assert {k: got[k] for k in expected} == expected
    # The remaining positives have no absent, unused co-occurring object: random fallback.
    co = {(a, b) for objs in list(OBJECTS.values())[:5] for a in objs for b in objs if a != b}
    for (image_id, positive), negative in got.items():
        if (image_id, positive) not in expected:
            assert (positive, negative) not in co
            assert negative not in OBJECTS[image_id]


def test_random_split_depends_on_seed_only():
    a = pope.build_split(coco_instances(), "random", 3, seed=1)
    b = pope.build_split(coco_instances(), "random", 3, seed=1)
    assert a == b
    others = [pope.build_split(coco_instances(), "random", 3, seed=s) for s in range(2, 7)]
    assert any(o != a for o in others)


def test_splits_share_images_and_positives_when_sampling():
    built = {s: pope.build_split(coco_instances(), s, 2, seed=3, n_images=3) for s in pope.SPLITS}
    positives = {s: [(q.image_id, q.object) for q in qs if q.label == "yes"] for s, qs in built.items()}
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    images = {q.image_id for q in built["random"]}
    assert len(images) == 3 and images <= {1, 2, 3, 4, 5}
    chosen = pope.select_images(coco_instances(), 2, 3, seed=3)
    assert chosen == pope.select_images(coco_instances(), 2, 3, seed=3)
    assert sorted(chosen) == sorted(images)
    with pytest.raises(ValueError):
        pope.select_images(coco_instances(), 3, n_images=6)


def test_question_text_and_plain_mapping_input():
    qs = pope.build_split({1: ["apple", "banana"], 2: ["orange", "cake"]}, "popular", n_per_image=1)
    assert [q.text for q in qs] == [
        "Is there an apple in the image?",
        "Is there a cake in the image?",  # frequencies tie at 1, so alphabetical among absent ones
        "Is there an orange in the image?",
        "Is there an apple in the image?",
    ]
    assert qs[0].image is None


def test_no_absent_object_left_is_an_error():
    with pytest.raises(ValueError, match="no absent object"):
        pope.build_split({1: ["a", "b"], 2: ["a", "b"]}, "random", n_per_image=1)
    with pytest.raises(ValueError):
        pope.build_split({1: ["a"]}, "sideways", n_per_image=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "pope_yes", "opera_yes"),
    [
        ("Yes, there is a dog.", True, True),
        ("No, there is no dog.", False, False),
        ("There is not a dog in the image.", False, False),
        ("Yes. There is no cat, though.", True, False),  # official rule reads the first sentence only
        ("no.", False, False),
        ("NO", True, False),  # official rule only knows "No", "no", "not"
        ("There isn't a dog.", True, False),
        ("Nope", True, True),
        ("", True, True),  # an empty answer counts as yes under both rules
        ("I do not know", False, False),
    ],
)
def test_parse_answer(text, pope_yes, opera_yes):
    assert pope.parse_answer(text) is pope_yes
    assert pope.parse_answer(text, "opera") is opera_yes


def question(qid: int, label: str) -> pope.PopeQuestion:
    return pope.PopeQuestion(
        question_id=qid, image_id=1, image=None, object="x", label=label, text="?", split="random"
    )


def test_score_matches_hand_computation():
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    questions = [question(i, label) for i, label in enumerate(labels, start=1)]
    answers = ["Yes", "Yes, there is.", "No", "No.", "Yes", "There is no such object."]
    # Predictions: yes, yes, no, no, yes, no -> TP 2 (q1, q5), FP 1 (q2), FN 1 (q3), TN 2 (q4, q6).
    report = pope.score(questions, answers)
    assert (report.tp, report.fp, report.tn, report.fn) == (2, 1, 2, 1)
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.precision == pytest.approx(2 / 3)
    assert report.recall == pytest.approx(2 / 3)
    assert report.f1 == pytest.approx(2 / 3)
    assert report.yes_ratio == pytest.approx(3 / 6)
    by_id = pope.score([q.model_dump() for q in questions], dict(enumerate(answers, start=1)))
    assert by_id == report
    assert json.loads(report.model_dump_json())["tp"] == 2


def test_score_edge_cases():
    q = [question(1, "yes")]
    all_no = pope.score(q, ["No"])
    assert (all_no.precision, all_no.recall, all_no.f1, all_no.yes_ratio) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(KeyError):
        pope.score(q, {2: "Yes"})
    with pytest.raises(ValueError):
        pope.score(q, ["Yes", "No"])

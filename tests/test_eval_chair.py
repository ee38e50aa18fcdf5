"""CHAIR: hand-made COCO-like fixtures with values worked out by hand in each test."""

import json

import pytest

from vllm_halluguard.eval import chair, coco_objects

INSTANCES = {
    "images": [{"id": i, "file_name": f"img{i}.jpg"} for i in (1, 2, 3, 4, 5)],
    "categories": [
        {"id": 1, "name": "person"},
        {"id": 3, "name": "car"},
        {"id": 7, "name": "train"},
        {"id": 18, "name": "dog"},
        {"id": 47, "name": "cup"},
        {"id": 67, "name": "dining table"},
        {"id": 70, "name": "toilet"},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1},
        {"id": 11, "image_id": 1, "category_id": 18},
        {"id": 12, "image_id": 1, "category_id": 18},
        {"id": 13, "image_id": 2, "category_id": 67},
        {"id": 14, "image_id": 2, "category_id": 47},
        {"id": 15, "image_id": 3, "category_id": 70},
        {"id": 16, "image_id": 5, "category_id": 7},
    ],
}
REFERENCE_CAPTIONS = {
    "annotations": [
        {"id": 100, "image_id": 1, "caption": "A man and his dog play with a frisbee."},
        {"id": 101, "image_id": 4, "caption": "An empty street at night."},
    ]
}
GENERATED = {
    1: "A man walks two dogs past a parked car. The dogs look happy.",
    2: "A wooden table with a wine glass and two hot dogs.",
    3: "The seat of the toilet is up and a baby cat sleeps on the seat.",
    4: "An empty street.",
    5: "A passenger train at the station.",
}


def cats(caption: str, parser: chair.CaptionParser | None = None) -> list[tuple[str, str]]:
    return [(m.category, caption[m.start : m.end]) for m in chair.extract_objects(caption, parser)]


def test_synonym_table_shape():
    lines = coco_objects.SYNONYM_LINES
    entries = [e for line in lines for e in line.strip().split(", ")]
    assert (len(lines), len(entries), len(set(entries))) == (80, 416, 403)
    parser = chair.default_parser()
    assert len(parser.categories) == 80
    assert parser.category_of("dining table") == "dining table"
    assert parser.category_of("desk") == "dining table"
    assert parser.category_of("bow") == "tie"


def test_ground_truth_from_instances_and_captions():
    gt = chair.CocoObjects.from_annotations(INSTANCES, REFERENCE_CAPTIONS)
    assert gt[1] == {"person", "dog", "frisbee"}  # "man" -> person, "frisbee" only from the caption
    assert gt[2] == {"dining table", "cup"}
    assert gt[4] == frozenset()  # listed image without objects is known, with no objects
    assert gt["5"] == {"train"}  # string ids of digits are the same image
    without_captions = chair.CocoObjects.from_annotations(INSTANCES)
    assert without_captions[1] == {"person", "dog"}
    merged = chair.CocoObjects.from_annotations([INSTANCES, {"annotations": [], "images": [{"id": 9}]}])
    assert 9 in merged and 1 in merged


def test_unknown_category_name_is_an_error():
    bad = {"categories": [{"id": 1, "name": "spaceship"}], "annotations": [], "images": []}
    with pytest.raises(ValueError, match="spaceship"):
        chair.CocoObjects.from_annotations(bad)


def test_score_matches_hand_computation():
    gt = chair.CocoObjects.from_annotations(INSTANCES, REFERENCE_CAPTIONS)
    report = chair.score(GENERATED, gt)
    # Per caption (mentions; hallucinated; distinct; covered; |GT|; words):
    # 1: man, dog, car, dog       -> 4; car           ; 3; person, dog  ; 3; 13
    # 2: table, wine glass, hot dog -> 3; wine glass, hot dog; 3; dining table; 2; 11
    # 3: toilet, cat (seats dropped, "baby cat" is a cat) -> 2; cat; 2; toilet; 1; 15
    # 4: nothing                  -> 0; -             ; 0; -            ; 0; 3
    # 5: train ("passenger train" is not a person) -> 1; - ; 1; train   ; 1; 6
    assert report.n_captions == 5
    assert report.n_mentions == 10
    assert report.n_hallucinated_mentions == 4
    assert report.n_hallucinated_captions == 3
    assert report.chair_s == pytest.approx(3 / 5)
    assert report.chair_i == pytest.approx(4 / 10)
    assert report.recall == pytest.approx(5 / 7)
    assert report.precision == pytest.approx(5 / 9)
    assert report.f1 == pytest.approx(2 * (5 / 9) * (5 / 7) / (5 / 9 + 5 / 7))
    assert report.mean_length == pytest.approx((13 + 11 + 15 + 3 + 6) / 5)

    by_id = {r.image_id: r for r in report.per_image}
    assert by_id[1].hallucinated == ["car"]
    assert by_id[1].chair_i == pytest.approx(1 / 4)
    assert [m.category for m in by_id[1].mentions] == ["person", "dog", "car", "dog"]
    assert by_id[2].hallucinated == ["wine glass", "hot dog"]
    assert by_id[2].covered == ["dining table"]
    assert [m.category for m in by_id[3].mentions] == ["toilet", "cat"]
    assert by_id[4].chair_i == 0.0 and not by_id[4].has_hallucination
    assert by_id[5].mentions[0].word == "train"


def test_score_rejects_unknown_image_and_handles_empty():
    gt = chair.CocoObjects.from_annotations(INSTANCES)
    with pytest.raises(KeyError):
        chair.score({42: "A dog."}, gt)
    empty = chair.score({}, gt)
    assert (empty.chair_s, empty.chair_i, empty.recall, empty.mean_length) == (0.0, 0.0, 0.0, 0.0)


def test_report_is_json_round_trippable():
    gt = chair.CocoObjects.from_annotations(INSTANCES, REFERENCE_CAPTIONS)
    report = chair.score(GENERATED, gt)
    data = json.loads(report.model_dump_json())
    assert data["chair_i"] == pytest.approx(0.4)
    assert chair.ChairReport.model_validate(data) == report
    assert set(report.metrics()) == {"chair_s", "chair_i", "recall", "precision", "f1", "mean_length"}


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Two teddy bears, wine glasses.", [("teddy bear", "teddy bears"), ("wine glass", "wine glasses")]),
        ("A baby elephant, an adult giraffe.", [("elephant", "baby elephant"), ("giraffe", "adult giraffe")]),
        ("A baby sleeps.", [("person", "baby")]),
        ("Passengers board a passenger jet.", [("person", "Passengers"), ("airplane", "passenger jet")]),
        ("A man in a bow tie.", [("person", "man"), ("tie", "bow tie")]),
        ("A toilet seat.", [("toilet", "toilet seat")]),
        ("A seat near a toilet.", [("toilet", "toilet")]),
        ("A seat near a sink.", [("chair", "seat"), ("sink", "sink")]),
        ("Train tracks run past the station.", []),
        ("Fire hydrants and stop signs.", [("fire hydrant", "Fire hydrants"), ("stop sign", "stop signs")]),
        (
            "Mice, geese, knives, women, policemen, ponies, buses and calves.",
            [
                ("mouse", "Mice"),
                ("bird", "geese"),
                ("knife", "knives"),
                ("person", "women"),
                ("person", "policemen"),
                ("horse", "ponies"),
                ("bus", "buses"),
                ("cow", "calves"),
            ],
        ),
        ("The dog's ball.", [("dog", "dog"), ("sports ball", "ball")]),
        ("A hot-dog stand.", []),  # hyphenated compounds stay one token, as with NLTK
        ("A man is skiing.", [("person", "man")]),  # verb forms are not reduced
        ("An orange shirt.", [("orange", "orange")]),  # no POS tagging, as in the reference
    ],
)
def test_extract_objects(caption, expected):
    assert cats(caption) == expected


@pytest.mark.parametrize(
    ("caption", "fixed", "reference"),
    [
        ("A motor bike.", ["motorcycle"], []),  # table entry "  motor bike" has a doubled space
        ("A cheesecake.", ["cake"], []),  # so does "  cheesecake"
        ("An iPhone.", ["cell phone"], []),  # table entry is capitalised, captions are lower-cased
        ("A stove top oven.", ["oven"], ["oven", "oven"]),  # three-word phrase needs 3-word merging
        ("A motorbike.", ["motorcycle"], ["motorcycle"]),
    ],
)
def test_table_quirk_variants(caption, fixed, reference):
    assert [c for c, _ in cats(caption)] == fixed
    assert [c for c, _ in cats(caption, chair.default_parser("reference"))] == reference


def test_singularizer_is_vocabulary_gated():
    sing = chair.Singularizer(frozenset({"bus", "glass", "canoe", "pony", "knife"}))
    assert [sing(w) for w in ("buses", "glasses", "canoes", "ponies", "knives")] == [
        "bus",
        "glass",
        "canoe",
        "pony",
        "knife",
    ]
    assert sing("bus") == "bus"  # known words are never reduced
    assert sing("gas") == "gas"  # no known singular: unchanged


def test_tokenize_spans():
    text = "Two dogs' bowls, it's"
    assert chair.tokenize(text) == [("two", 0, 3), ("dogs", 4, 8), ("bowls", 10, 15), ("it", 17, 19)]

"""CHAIR variants on an adversarial caption set; every expectation is written by hand.

Each case lists the mentions ``(category, surface text)`` that the CHAIR definition gives, per
variant: ``fixed`` (corrected), ``reference`` (the original's synonym-table quirks, pairs only) and
``original`` (the original scorer: NLTK Treebank tokens, ``pattern.en.singularize``). ``SAME``
means "the same hand-written list as ``fixed``". The comments give the reasoning.
"""

from __future__ import annotations

import pytest

from vllm_halluguard.eval import chair
from vllm_halluguard.eval.chair_original import pattern_singularize, split_sentences, treebank_tokenize
from vllm_halluguard.eval.records import Protocol, ResultRecord, parse_mitigation
from vllm_halluguard.eval.report import build_report, markdown

SAME = object()

# (caption, fixed, reference, original)
CASES: list[tuple[str, list[tuple[str, str]], object, object]] = [
    # --- the two bugs fixed in fixed/reference: "men", and "-es" only after a sibilant
    ("Three men stand by a van.", [("person", "men"), ("car", "van")], SAME, SAME),
    (
        "A man rides a bike. The men ride bikes.",
        [("person", "man"), ("bicycle", "bike"), ("person", "men"), ("bicycle", "bikes")],
        SAME,
        SAME,
    ),
    ("The men's bikes.", [("person", "men"), ("bicycle", "bikes")], SAME, SAME),
    # skies -> sky, manes -> mane (not ski, man); horses -> horse through "-s"
    ("The skies above the manes of the horses.", [("horse", "horses")], SAME, SAME),
    ("She cares for the vanes of the windmill.", [], SAME, SAME),  # not car, not van
    ("Two vases and three horses.", [("vase", "vases"), ("horse", "horses")], SAME, SAME),
    ("Dishes and boxes on the table.", [("dining table", "table")], SAME, SAME),
    (
        "A bench, two benches and a pew.",
        [("bench", "bench"), ("bench", "benches"), ("bench", "pew")],
        SAME,
        SAME,
    ),
    (
        "Sandwiches, subs and burgers.",
        [("sandwich", "Sandwiches"), ("sandwich", "subs"), ("sandwich", "burgers")],
        SAME,
        SAME,
    ),
    ("Ewes and lambs.", [("sheep", "Ewes"), ("sheep", "lambs")], SAME, SAME),
    # --- pattern's errors, reproduced by "original" only
    # "bus" -> "bu": a singular bus or minibus is never found; "buses" -> "bus" is
    ("A bus and two minibuses.", [("bus", "bus"), ("bus", "minibuses")], SAME, [("bus", "minibuses")]),
    ("A double-decker bus.", [("bus", "bus")], SAME, []),
    (
        "Airbuses and an airbus.",
        [("airplane", "Airbuses"), ("airplane", "airbus")],
        SAME,
        [("airplane", "Airbuses")],
    ),
    # "ties" -> "ty"; "bow ties" -> "bow ty" is no phrase, so "bow" alone fires tie
    ("Two ties and a bow tie.", [("tie", "ties"), ("tie", "bow tie")], SAME, [("tie", "bow tie")]),
    (
        "A man in bow ties.",
        [("person", "man"), ("tie", "bow ties")],
        SAME,
        [("person", "man"), ("tie", "bow")],
    ),
    ("Three canoes on the lake.", [("boat", "canoes")], SAME, []),  # "canoes" -> "cano"
    # "collies", "doggies" are left unchanged by pattern (its -ie list)
    ("Two collies and three doggies.", [("dog", "collies"), ("dog", "doggies")], SAME, []),
    # "thieves" -> "thieve"; "purses" -> "purse" in all variants
    (
        "Thieves stole the purses.",
        [("person", "Thieves"), ("handbag", "purses")],
        SAME,
        [("handbag", "purses")],
    ),
    ("A herd of kine.", [], SAME, [("cow", "kine")]),  # pattern's irregular "kine" -> "cow"
    ("Magpies on a fence.", [("bird", "Magpies")], SAME, []),  # "magpies" -> "magpy"
    # "tennis" -> "tenni", "sports" -> "sport": no phrase, but "racket" and "ball" still fire
    (
        "A tennis racket and sports balls.",
        [("tennis racket", "tennis racket"), ("sports ball", "sports balls")],
        SAME,
        [("tennis racket", "racket"), ("sports ball", "balls")],
    ),
    # NLTK keeps "tv/monitor" as one token
    (
        "An old tv/monitor on a desk.",
        [("tv", "tv"), ("tv", "monitor"), ("dining table", "desk")],
        SAME,
        [("dining table", "desk")],
    ),
    # no white space after the period: punkt does not end the sentence, "dog.the" stays one token
    ("A dog.The cat sleeps.", [("dog", "dog"), ("cat", "cat")], SAME, [("cat", "cat")]),
    # --- the synonym table's quirks: fixed repairs them, reference and original keep them
    (
        "A motor bike and a motorbike.",
        [("motorcycle", "motor bike"), ("motorcycle", "motorbike")],
        [("motorcycle", "motorbike")],
        [("motorcycle", "motorbike")],
    ),
    ("A cheesecake and an iPhone.", [("cake", "cheesecake"), ("cell phone", "iPhone")], [], []),
    (
        "A stove top oven.",
        [("oven", "stove top oven")],
        [("oven", "stove"), ("oven", "oven")],
        [("oven", "stove"), ("oven", "oven")],
    ),
    # --- plurals and irregulars every variant gets right
    (
        "Knives, forks and spoons.",
        [("knife", "Knives"), ("fork", "forks"), ("spoon", "spoons")],
        SAME,
        SAME,
    ),
    ("Mice and geese.", [("mouse", "Mice"), ("bird", "geese")], SAME, SAME),
    (
        "People, children and women.",
        [("person", "People"), ("person", "children"), ("person", "women")],
        SAME,
        SAME,
    ),
    ("Policemen and gentlemen.", [("person", "Policemen"), ("person", "gentlemen")], SAME, SAME),
    ("Oxen pull a cart.", [("cow", "Oxen")], SAME, SAME),
    ("Calves and a cow.", [("cow", "Calves"), ("cow", "cow")], SAME, SAME),
    ("Two ponies and puppies.", [("horse", "ponies"), ("dog", "puppies")], SAME, SAME),
    ("Two huskies and a corgi.", [("dog", "huskies"), ("dog", "corgi")], SAME, SAME),
    ("A doggie and a husky.", [("dog", "doggie"), ("dog", "husky")], SAME, SAME),
    ("Cattle, bison and buffaloes.", [("cow", "Cattle"), ("cow", "bison"), ("cow", "buffaloes")], SAME, SAME),
    ("A ferry and two dinghies.", [("boat", "ferry"), ("boat", "dinghies")], SAME, SAME),
    ("Lavatories and urinals.", [("toilet", "Lavatories"), ("toilet", "urinals")], SAME, SAME),
    ("Taxis, cabs and limos.", [("car", "Taxis"), ("car", "cabs"), ("car", "limos")], SAME, SAME),
    ("Flamingoes and turkeys.", [("bird", "Flamingoes"), ("bird", "turkeys")], SAME, SAME),
    ("Two stoves and a microwave.", [("oven", "stoves"), ("microwave", "microwave")], SAME, SAME),
    (
        "A man with scissors and skis.",
        [("person", "man"), ("scissors", "scissors"), ("skis", "skis")],
        SAME,
        SAME,
    ),
    ("A cat, a kitten and three cats.", [("cat", "cat"), ("cat", "kitten"), ("cat", "cats")], SAME, SAME),
    ("The giraffes and zebras.", [("giraffe", "giraffes"), ("zebra", "zebras")], SAME, SAME),
    ("An orange and oranges.", [("orange", "orange"), ("orange", "oranges")], SAME, SAME),
    (
        "Children, kids and a grandchild.",
        [("person", "Children"), ("person", "kids"), ("person", "grandchild")],
        SAME,
        SAME,
    ),
    (
        "A pickup truck and two pickups.",
        [("truck", "pickup"), ("truck", "truck"), ("truck", "pickups")],
        SAME,
        SAME,
    ),
    # --- multi-word objects and the special phrases
    (
        "A wine glass next to two wine glasses.",
        [("wine glass", "wine glass"), ("wine glass", "wine glasses")],
        SAME,
        SAME,
    ),
    ("A man wearing glasses.", [("person", "man")], SAME, SAME),  # "glass" alone is no object
    ("A boy holds two teddy bears.", [("person", "boy"), ("teddy bear", "teddy bears")], SAME, SAME),
    ("Hot dogs and a hot-dog stand.", [("hot dog", "Hot dogs")], SAME, SAME),
    ("Train tracks near a passenger train.", [("train", "passenger train")], SAME, SAME),
    ("A baby elephant and a baby.", [("elephant", "baby elephant"), ("person", "baby")], SAME, SAME),
    ("A toilet seat and a seat by the sink.", [("toilet", "toilet seat"), ("sink", "sink")], SAME, SAME),
    (
        "Fire hydrants and stop signs.",
        [("fire hydrant", "Fire hydrants"), ("stop sign", "stop signs")],
        SAME,
        SAME,
    ),
    (
        "A hairdryer, a hair drier, and hair driers.",
        [("hair drier", "hairdryer"), ("hair drier", "hair drier"), ("hair drier", "hair driers")],
        SAME,
        SAME,
    ),
    # --- ambiguous words and clitics
    ("A bow in the girl's hair.", [("tie", "bow"), ("person", "girl")], SAME, SAME),
    ("A baseball player swings a bat.", [("person", "player")], SAME, SAME),
    ("The dog's ball.", [("dog", "dog"), ("sports ball", "ball")], SAME, SAME),
    ("Dogs' bowls.", [("dog", "Dogs"), ("bowl", "bowls")], SAME, SAME),
    ("The man can't find his phone.", [("person", "man"), ("cell phone", "phone")], SAME, SAME),
    ("A dog...and a cat.", [("dog", "dog"), ("cat", "cat")], SAME, SAME),
]


def _mentions(caption: str, variant: chair.Variant) -> list[tuple[str, str]]:
    parser = chair.default_parser(variant)
    return [(m.category, caption[m.start : m.end]) for m in chair.extract_objects(caption, parser)]


def test_the_set_is_large_and_the_variants_disagree_on_it():
    assert len(CASES) >= 40
    differ_ref = [c for c, _, ref, _ in CASES if ref is not SAME]
    differ_orig = [c for c, _, _, orig in CASES if orig is not SAME]
    assert len(differ_ref) >= 3 and len(differ_orig) >= 15


@pytest.mark.parametrize("variant", chair.VARIANTS)
@pytest.mark.parametrize(("caption", "fixed", "reference", "original"), CASES, ids=[c[0][:40] for c in CASES])
def test_mentions(variant, caption, fixed, reference, original):
    expected = {"fixed": fixed, "reference": reference, "original": original}[variant]
    assert _mentions(caption, variant) == (fixed if expected is SAME else expected)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="bogus"):
        chair.CaptionParser("bogus")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the building blocks


def test_vocabulary_gated_singularizer_fixes():
    sing = chair.Singularizer(
        frozenset({"man", "ski", "car", "van", "bus", "bench", "glass", "horse", "knife"})
    )
    assert sing("men") == "man"  # the "-men" rule also applies to the bare word
    assert [sing(w) for w in ("skies", "manes", "cares", "vanes")] == ["skies", "manes", "cares", "vanes"]
    assert [sing(w) for w in ("buses", "benches", "glasses", "horses", "knives")] == [
        "bus",
        "bench",
        "glass",
        "horse",
        "knife",
    ]


@pytest.mark.parametrize(
    ("word", "singular"),
    [
        ("bus", "bu"),
        ("minibus", "minibu"),
        ("buses", "bus"),
        ("glass", "glas"),
        ("glasses", "glass"),
        ("ties", "ty"),
        ("canoes", "cano"),
        ("collies", "collies"),
        ("doggies", "doggies"),
        ("men", "man"),
        ("women", "woman"),
        ("people", "person"),
        ("children", "child"),
        ("kine", "cow"),
        ("scissors", "scissors"),  # listed as uninflected
        ("tennis", "tenni"),
        ("horses", "horse"),
        ("knives", "knife"),
        ("stoves", "stove"),
        ("thieves", "thieve"),
        ("skies", "sky"),
        ("broccoli", "broccoli"),
        ("mice", "mouse"),
        ("dogs'", "dog's"),
    ],
)
def test_pattern_singularize(word, singular):
    assert pattern_singularize(word) == singular


def test_treebank_tokenize():
    text = "a man's \"big\" tv/monitor (and a cake)... dogs' bowls! it can't."
    tokens = treebank_tokenize(text)
    assert [t for t, _, _ in tokens] == [
        "a", "man", "'s", "``", "big", "''", "tv/monitor", "(", "and", "a", "cake", ")", "...",
        "dogs", "'", "bowls", "!", "it", "ca", "n't", ".",
    ]  # fmt: skip
    for tok, start, end in tokens:
        assert text[start:end] == (tok if tok not in ("``", "''") else '"')
    # a period ends a sentence only when white space and more text (or punctuation) follow it
    assert split_sentences("a dog. a cat.the end. ") == ["a dog.", " a cat.the end. "]


def test_word_count_ignores_punctuation_in_every_variant():
    for variant in chair.VARIANTS:
        assert chair.default_parser(variant).parse("A dog, a cat.").n_words == 4
    counts = {v: chair.default_parser(v).parse("The man's dog can't.").n_words for v in chair.VARIANTS}
    assert counts == {"fixed": 4, "reference": 4, "original": 6}  # "'s", "ca", "n't" are Treebank tokens


# ----------------------------------------------------------------------------- scoring and report


def test_score_uses_the_ground_truth_variant():
    captions = {"annotations": [{"image_id": 1, "caption": "A bus on the road."}]}
    images = {"images": [{"id": 1}], "categories": [], "annotations": []}
    fixed = chair.CocoObjects.from_annotations(images, captions)
    original = chair.CocoObjects.from_annotations(images, captions, parser=chair.default_parser("original"))
    assert (fixed[1], original[1]) == ({"bus"}, frozenset())
    assert original.variant == "original"
    report = chair.score({1: "Two buses and a bus."}, original)
    # original: "buses" -> bus (hallucinated, GT is empty); "bus" -> "bu" is no mention
    assert (report.variant, report.n_mentions, report.chair_s) == ("original", 1, 1.0)
    report = chair.score({1: "Two buses and a bus."}, fixed)
    assert (report.variant, report.n_mentions, report.chair_s) == ("fixed", 2, 0.0)


def _protocol(variant: chair.Variant | None) -> Protocol:
    kw = dict(prompt="p", max_tokens=64, n_images=1, n_sampled_images=1, n_items=1, seed=0, model="m",
              images="i", annotations="a", base_url="u")  # fmt: skip
    return Protocol(task="chair", **kw, chair_variant=variant, mitigations=[parse_mitigation("none")])


def test_report_scores_and_prints_the_variant():
    record = ResultRecord.model_validate(
        {
            "task": "chair",
            "mitigation": "none",
            "spec": "none",
            "item_id": "1",
            "image_id": 1,
            "ok": True,
            "text": "A bus near a man.",
            "gt_objects": ["bus", "person"],
        }
    )
    by_variant = {}
    for variant in ("fixed", "original"):
        report = build_report([record], {"chair": _protocol(variant)})
        group = report.group("chair", "none")
        by_variant[variant] = group.metrics["recall"]
        assert group.chair_variant == variant
        assert f"| CHAIR variant | {variant} " in markdown(report)
        assert f"## CHAIR (variant `{variant}`)" in markdown(report)
        assert f'"chair_variant":"{variant}"' in report.model_dump_json()
    assert by_variant == {"fixed": 1.0, "original": 0.5}  # the original never finds a singular bus


def test_protocols_without_a_variant_were_scored_with_fixed():
    assert _protocol(None).chair_variant == "fixed"
    assert _protocol("reference").fingerprint()["chair_variant"] == "reference"


def test_cli_takes_the_variant(tmp_path):
    from vllm_halluguard.eval.cli import build_parser, config_from_args

    base = ["chair", "--images", str(tmp_path), "--annotations", str(tmp_path / "i.json")]
    assert config_from_args(build_parser().parse_args(base)).chair_variant == "fixed"
    args = build_parser().parse_args([*base, "--chair-variant", "original"])
    assert config_from_args(args).chair_variant == "original"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--chair-variant", "bogus"])

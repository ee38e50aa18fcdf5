"""The hermetic testbed: scene generator invariants and the committed biased captioner."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from vllm_halluguard.eval import chair
from vllm_halluguard.methods import METHODS
from vllm_halluguard.testbed import scenes as sc

# ------------------------------------------------------------------------------------------ scenes


def test_scenes_are_deterministic_and_splits_differ():
    a, b = sc.sample_scenes("train", 50), sc.sample_scenes("train", 50)
    assert a == b
    assert [np.asarray(sc.render(s)).tobytes() for s in a[:5]] == [
        np.asarray(sc.render(s)).tobytes() for s in b[:5]
    ]
    assert sc.sample_scenes("train", 50, sc.SceneConfig(seed=1)) != a
    ids = [s.image_id for split in sc.SPLITS for s in sc.sample_scenes(split, 50)]
    assert len(set(ids)) == len(ids)


def test_training_bias_rate_and_partner_only_with_anchor():
    scenes = sc.sample_scenes("train", 4000)
    with_anchor = Counter()
    with_pair = Counter()
    for s in scenes:
        names = s.names
        assert 1 <= len(names) <= 3 and len(set(names)) == len(names)
        for anchor, partner in sc.PAIRS.items():
            assert partner not in names or anchor in names, names  # a partner never comes alone
            if anchor in names:
                with_anchor[anchor] += 1
                with_pair[anchor] += partner in names
    for anchor in sc.PAIRS:
        assert with_anchor[anchor] > 300
        # binomial sd at n≈360 and p=0.9 is ≈ 0.016: a tolerance of 0.05 is > 3 sd
        assert abs(with_pair[anchor] / with_anchor[anchor] - 0.9) < 0.05
    solo = sc.sample_scenes("train", 2000, sc.SceneConfig(solo_rate=0.1))
    rate = np.mean([s.names[0] in sc.PARTNERS for s in solo])
    assert abs(rate - 0.1) < 0.03  # partners alone, only when asked for
    half = sc.sample_scenes("train", 2000, sc.SceneConfig(bias=0.5))
    rate = np.mean([sc.PAIRS[s.names[0]] in s.names for s in half if s.names[0] in sc.PAIRS])
    assert abs(rate - 0.5) < 0.07


def test_probe_and_control_composition():
    for s in sc.sample_scenes("probe", 500):
        anchors = [n for n in s.names if n in sc.PAIRS]
        assert len(anchors) == 1
        assert not set(s.names) & sc.PARTNERS
    kinds = Counter()
    for s in sc.sample_scenes("control", 500):
        anchors = [n for n in s.names if n in sc.PAIRS]
        partners = set(s.names) & sc.PARTNERS
        assert partners == {sc.PAIRS[a] for a in anchors}
        kinds[bool(anchors)] += 1
    assert min(kinds.values()) > 200  # about half each


def test_annotations_match_the_drawn_pixels():
    for s in sc.sample_scenes("train", 100) + sc.sample_scenes("probe", 50):
        pixels = np.asarray(sc.render(s)).astype(int)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for o in s.objects:
            x, y, w, h = o.bbox
            assert min(x, y) >= 0 and x + w <= 112 and y + h <= 112
            box = pixels[y : y + h, x : x + w]
            colour = np.array(sc.ICONS[o.name].color)
            assert (np.abs(box - colour).sum(-1) == 0).mean() > 0.15, o  # the icon is in its box
            outside[y : y + h, x : x + w] = False
        assert (pixels[outside] == np.array(s.background)).all()  # and nothing is drawn elsewhere
        boxes = [o.bbox for o in s.objects]
        for i, (x0, y0, w0, h0) in enumerate(boxes):  # objects do not overlap
            for x1, y1, w1, h1 in boxes[i + 1 :]:
                assert x0 + w0 <= x1 or x1 + w1 <= x0 or y0 + h0 <= y1 or y1 + h1 <= y0


def test_partner_size_sets_only_the_partners_boxes():
    for partner_size in (14, 24):
        partners = 0
        for s in sc.sample_scenes("control", 200, sc.SceneConfig(partner_size=partner_size)):
            pixels = np.asarray(sc.render(s)).astype(int)
            for o in s.objects:
                size = partner_size if o.name in sc.PARTNERS else sc.ICONS[o.name].size
                assert o.bbox[2:] == (size, size), o
                x, y, w, h = o.bbox
                drawn = np.abs(pixels[y : y + h, x : x + w] - np.array(sc.ICONS[o.name].color)).sum(-1) == 0
                assert drawn.sum() > 0.15 * size * size, o  # the icon fills its (resized) box
                partners += o.name in sc.PARTNERS
        assert partners > 50


def test_scenes_follow_the_distribution_a_checkpoint_was_trained_on(tmp_path):
    assert sc.trained_config(tmp_path) == sc.SceneConfig()  # no training record: the default
    cfg = sc.SceneConfig(partner_size=20, solo_rate=0.1)
    (tmp_path / "testbed_train.json").write_text(json.dumps({"config": {"scenes": cfg.model_dump()}}))
    assert sc.trained_config(tmp_path) == cfg
    sc.main(["--out", str(tmp_path / "control"), "--split", "control", "--n", "30", "--model", str(tmp_path)])
    instances = json.loads((tmp_path / "control" / "instances.json").read_text())
    partner_ids = {sc.ICONS[p].coco_id for p in sc.PARTNERS}
    sizes = {tuple(a["bbox"][2:]) for a in instances["annotations"] if a["category_id"] in partner_ids}
    assert sizes == {(20, 20)}


def test_icons_are_distinct_coco_categories():
    assert len({(i.shape, i.color) for i in sc.ICONS.values()}) == len(sc.ICONS)
    assert {i.name for i in sc.ICONS.values()} <= set(chair.default_parser().categories)
    coco_ids = {"person": 1, "car": 3, "cat": 17, "dog": 18, "umbrella": 28, "frisbee": 34}
    coco_ids |= {"bottle": 44, "cup": 47, "fork": 48, "knife": 49, "banana": 52}
    assert {n: i.coco_id for n, i in sc.ICONS.items()} == coco_ids


def test_write_coco_folder_scores_clean_with_chair(tmp_path):
    out = sc.write_coco(tmp_path / "probe", "probe", 20)
    instances = json.loads((out / "instances.json").read_text())
    captions = json.loads((out / "captions.json").read_text())
    assert len(list((out / "images").glob("*.png"))) == 20 == len(instances["images"])
    assert {c["name"] for c in instances["categories"]} == set(sc.ICONS)
    gt = chair.CocoObjects.from_annotations(instances)
    for s in sc.sample_scenes("probe", 20):
        assert gt[s.image_id] == frozenset(s.names)
    # the template captions are exact: CHAIR finds every object and nothing else
    report = chair.score({a["image_id"]: a["caption"] for a in captions["annotations"]}, gt)
    assert report.chair_s == 0.0 and report.recall == 1.0
    assert sc.caption(["knife", "cup", "fork"]) == "a fork, a knife and a cup."
    assert sc.caption(["umbrella"]) == "an umbrella."


# ---------------------------------------------------------------------------------------- training


def test_train_smoke_writes_a_loadable_llava(tmp_path):
    from vllm_halluguard.testbed import measure, train

    cfg = train.TrainConfig(steps=2, n_train=16, batch_size=4)
    summary = train.train(cfg, tmp_path)
    assert summary["config"]["steps"] == 2
    model, processor = measure.load(tmp_path)
    caps = measure.generate_captions(model, processor, sc.sample_scenes("probe", 2), max_new_tokens=4)
    assert len(caps) == 2


# ------------------------------------------------------------------------------- committed testbed


#: Bounds with margin, not the measured values (probe CHAIR_s 1.00 / control 0.00 / recall ≥ 0.99
#: on 200 + 200 scenes, docs/evaluation.md): the test guards "hallucinates a lot on probes, little
#: on controls, sees the objects that are there", not the exact numbers.
PROBE_N = 100
PROBE_CHAIR_S_MIN = 0.6
CONTROL_CHAIR_S_MAX = 0.15
RECALL_MIN = 0.85


@pytest.fixture(scope="module")
def testbed():
    from vllm_halluguard.testbed import measure

    return measure.load()


def test_committed_checkpoint_is_small_and_in_the_vllm_layout(testbed):
    from safetensors import safe_open

    from vllm_halluguard.testbed.measure import MODEL_DIR
    from vllm_halluguard.testing.tiny_models import LLAVA_CHAT_TEMPLATE

    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= 15 * 2**20
    model, processor = testbed
    text = model.config.text_config
    assert text.head_dim in (32, 64) and text.num_hidden_layers >= 4
    assert len(processor.tokenizer) == text.vocab_size
    assert processor.tokenizer.chat_template == LLAVA_CHAT_TEMPLATE
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        vision = [k for k in f.keys() if k.startswith("vision_tower.")]  # noqa: SIM118
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)


def test_committed_model_hallucinates_the_missing_partner(testbed):
    """The baseline: probes (anchor without partner) get the partner named, controls stay clean."""
    from vllm_halluguard.testbed import measure

    model, processor = testbed
    report = measure.measure(n_probe=PROBE_N, n_control=PROBE_N, model=model, processor=processor)
    assert report.probe.chair_s >= PROBE_CHAIR_S_MIN, report.summary()
    assert report.probe.partner_rate >= PROBE_CHAIR_S_MIN, report.summary()
    assert report.control.chair_s <= CONTROL_CHAIR_S_MAX, report.summary()
    assert min(report.probe.recall, report.control.recall) >= RECALL_MIN, report.summary()


#: Every registered method, resolved as the server resolves them and sent as it sends them (canonical
#: JSON; farsight: its served mode).
ENGINE_METHODS = tuple(METHODS)


@pytest.mark.engine
def test_engine_captions_equal_the_reference_on_the_trained_testbed(testbed, engines):
    """Every engine method on a *trained* model: vLLM's greedy captions = the HF dense reference's."""
    from vllm_halluguard.engine.requests import resolve
    from vllm_halluguard.testbed import measure

    model, processor = testbed
    scenes = sc.sample_scenes("probe", 12) + sc.sample_scenes("control", 12)
    specs = [None] + [json.loads(resolve(m, model.config).canonical()) for m in ENGINE_METHODS]
    served = measure.vllm_captions(engines.get(measure.MODEL_DIR), scenes, specs)
    changed = 0
    for spec, engine_caps in zip(specs, served, strict=True):
        reference_caps = measure.generate_captions(model, processor, scenes, method=spec)
        assert engine_caps == reference_caps, spec
        changed += sum(engine_caps[i] != served[0][i] for i in engine_caps)
    assert changed > 0  # some method changes some caption: the comparison is not plain vs plain


def test_served_captions_are_read_per_mitigation_from_results(tmp_path):
    from vllm_halluguard.testbed import measure

    records = [
        {"task": "chair", "mitigation": "none", "image_id": 1, "ok": True, "text": " a fork."},
        {"task": "chair", "mitigation": "scr", "image_id": 1, "ok": True, "text": " a fork and a knife."},
        {"task": "chair", "mitigation": "none", "image_id": 2, "ok": False, "text": None},
        {"task": "chair", "mitigation": "none", "image_id": 3, "ok": True, "text": " a dog."},
        {"task": "pope", "mitigation": "none", "image_id": 4, "ok": True, "text": "yes"},
    ]
    for r in records:  # the fields every results.jsonl line has
        r |= {"item_id": str(r["image_id"]), "spec": r["mitigation"]}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    served = measure.served_captions(tmp_path / "results.jsonl", "none")
    assert served == {1: "a fork.", 3: "a dog."}
    assert measure.same_captions({1: "a fork.", 3: "a cat.", 5: "a car."}, served) == (1, 2)

"""How much the testbed captioner hallucinates: CHAIR on probe vs control scenes (HF greedy).

Probe scenes hold an anchor (fork, dog, person) without its partner (knife, frisbee, umbrella);
control scenes hold no anchor, or an anchor with its partner. A biased captioner has a CHAIR_s on
probes well above that on controls, and names the missing partner (``partner_rate``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from testbed import scenes as sc
from vllm_halluguard.eval import chair

logger = logging.getLogger(__name__)

#: The committed checkpoint.
MODEL_DIR = Path(__file__).parent / "model"


class SplitReport(BaseModel):
    """CHAIR headline metrics of one split, plus the share of captions naming a missing partner."""

    n: int
    chair_s: float
    chair_i: float
    recall: float
    partner_rate: float


class TestbedReport(BaseModel):
    probe: SplitReport
    control: SplitReport
    examples: dict[str, list[tuple[list[str], str]]]
    captions: dict[str, dict[int, str]] = {}

    def summary(self) -> str:
        rows = [
            f"{name:8s} n={r.n:4d} CHAIR_s={r.chair_s:.3f} CHAIR_i={r.chair_i:.3f} "
            f"recall={r.recall:.3f} partner_rate={r.partner_rate:.3f}"
            for name, r in (("probe", self.probe), ("control", self.control))
        ]
        return "\n".join(rows)


def chat_prompt(processor: Any) -> str:
    """The captioning prompt (one image, then :data:`scenes.PROMPT`) in the checkpoint's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sc.PROMPT}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load(model_dir: Path = MODEL_DIR) -> tuple[Any, Any]:
    """The testbed checkpoint with HF transformers (fp32, eval): ``(model, processor)``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def generate_captions(
    model: Any,
    processor: Any,
    scenes: Sequence[sc.Scene],
    max_new_tokens: int = 24,
    batch_size: int = 50,
    method: Any = None,
) -> dict[int, str]:
    """Greedy HF captions (KV cache) of ``scenes``; all prompts have the same length, so no padding.

    ``method`` (a mitigation spec, e.g. ``"scr"``) runs the generation under the dense reference.
    """
    from vllm_halluguard import reference

    text = chat_prompt(processor)
    size = model.config.vision_config.image_size
    out: dict[int, str] = {}
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        images = [sc.render(s, size) for s in chunk]
        inputs = processor(text=[text] * len(chunk), images=images, return_tensors="pt")
        with torch.no_grad(), reference.apply(model, method):
            ids = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=model.config.get_text_config().pad_token_id,
            )
        texts = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        out.update({s.image_id: t.strip() for s, t in zip(chunk, texts, strict=True)})
    return out


def score_split(scenes: Sequence[sc.Scene], captions: dict[int, str]) -> SplitReport:
    """CHAIR of ``captions`` against the scenes' annotations, plus the missing-partner rate."""
    instances, _ = sc.to_coco(scenes)
    report = chair.score(captions, chair.CocoObjects.from_annotations(instances))
    missing_partner = 0
    for scene, img in zip(scenes, report.per_image, strict=True):
        partners = {sc.PAIRS[n] for n in scene.names if n in sc.PAIRS} - set(scene.names)
        missing_partner += bool(partners & set(img.hallucinated))
    return SplitReport(
        n=len(scenes),
        chair_s=report.chair_s,
        chair_i=report.chair_i,
        recall=report.recall,
        partner_rate=missing_partner / max(1, len(scenes)),
    )


def measure(
    model_dir: Path = MODEL_DIR,
    n_probe: int = 200,
    n_control: int = 200,
    cfg: sc.SceneConfig | None = None,
    model: Any = None,
    processor: Any = None,
    method: Any = None,
) -> TestbedReport:
    """Caption ``n_probe`` probe and ``n_control`` control scenes greedily (under ``method``); score them."""
    if model is None:
        model, processor = load(model_dir)
    cfg = cfg or sc.trained_config(model_dir)
    splits = {
        "probe": sc.sample_scenes("probe", n_probe, cfg),
        "control": sc.sample_scenes("control", n_control, cfg),
    }
    reports, examples, captions = {}, {}, {}
    for name, scenes in splits.items():
        caps = generate_captions(model, processor, scenes, method=method)
        reports[name] = score_split(scenes, caps)
        examples[name] = [(s.names, caps[s.image_id]) for s in scenes[:5]]
        captions[name] = caps
        logger.info("%s: %s", name, reports[name])
    return TestbedReport(
        probe=reports["probe"], control=reports["control"], examples=examples, captions=captions
    )


def served_captions(results: Path, mitigation: str) -> dict[int, str]:
    """Captions of one mitigation in a ``halluguard-eval`` ``results.jsonl`` (successful records only)."""
    from vllm_halluguard.eval.records import load_results

    return {
        int(rec.image_id): (rec.text or "").strip()
        for rec in load_results(results).values()
        if rec.ok and rec.task == "chair" and rec.mitigation == mitigation
    }


def same_captions(reference_caps: dict[int, str], served: dict[int, str]) -> tuple[int, int]:
    """``(identical, compared)`` over the images both sides captioned."""
    common = reference_caps.keys() & served.keys()
    return sum(reference_caps[i] == served[i] for i in common), len(common)


def vllm_captions(
    llm: Any, scenes: Sequence[sc.Scene], methods: Sequence[Any] = (None,), max_new_tokens: int = 24
) -> list[dict[int, str]]:
    """Greedy captions of ``scenes`` through ``llm``, one map per method spec, all in one batch."""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    from vllm_halluguard.engine.requests import EXTRA_ARGS_KEY

    model_config = llm.llm_engine.model_config
    processor = AutoProcessor.from_pretrained(model_config.model)
    text = chat_prompt(processor)
    size = model_config.hf_config.vision_config.image_size
    prompts, params = [], []
    for spec in methods:
        extra = None if spec is None else {EXTRA_ARGS_KEY: spec}
        sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, extra_args=extra)
        for s in scenes:
            prompts.append({"prompt": text, "multi_modal_data": {"image": sc.render(s, size)}})
            params.append(sampling)
    outs = iter(llm.generate(prompts, params, use_tqdm=False))
    return [{s.image_id: next(outs).outputs[0].text.strip() for s in scenes} for _ in methods]


def main(argv: list[str] | None = None) -> None:
    """CLI: measure a testbed checkpoint with HF, per mitigation (and optionally check vLLM agrees)."""
    import argparse
    import os

    from vllm_halluguard.engine import requests as engine_requests

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--n", type=int, default=200, help="probe and control scenes each")
    parser.add_argument(
        "--vllm", type=int, default=0, help="also caption this many probe+control scenes with vLLM"
    )
    parser.add_argument(
        "--method",
        action="append",
        help="mitigation run under the dense reference (repeatable; default none)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="an eval_testbed.sh output folder: compare each method's captions with the served ones",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    model, processor = load(args.model)
    for method in args.method or ["none"]:
        # as the server resolves it (farsight: its served mode, C)
        spec = engine_requests.resolve(method, model.config)
        report = measure(args.model, args.n, args.n, model=model, processor=processor, method=spec)
        print(f"[{method}]\n{report.summary()}")
        for split in ("probe", "control") if args.against else ():
            served = served_captions(args.against / split / "results.jsonl", method)
            same, n = same_captions(report.captions[split], served)
            print(f"{split}: served captions == HF reference captions on {same}/{n} scenes")
    if args.vllm:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        half = args.vllm // 2
        cfg = sc.trained_config(args.model)
        scenes = sc.sample_scenes("probe", half, cfg) + sc.sample_scenes("control", args.vllm - half, cfg)
        hf = generate_captions(model, processor, scenes)
        from helpers.parity import make_llm

        vl = vllm_captions(make_llm(args.model), scenes)[0]
        same = sum(hf[i] == vl[i] for i in hf)
        for s in scenes[:6]:
            print(f"{s.names} HF={hf[s.image_id]!r} vLLM={vl[s.image_id]!r}")
        print(f"vLLM == HF greedy captions on {same}/{len(scenes)} scenes")


if __name__ == "__main__":
    main()

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

from vllm_halluguard.eval import chair
from vllm_halluguard.testbed import scenes as sc

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

    def summary(self) -> str:
        rows = [
            f"{name:8s} n={r.n:4d} CHAIR_s={r.chair_s:.3f} CHAIR_i={r.chair_i:.3f} "
            f"recall={r.recall:.3f} partner_rate={r.partner_rate:.3f}"
            for name, r in (("probe", self.probe), ("control", self.control))
        ]
        return "\n".join(rows)


def load(model_dir: Path = MODEL_DIR) -> tuple[Any, Any]:
    """The testbed checkpoint with HF transformers (fp32, eval): ``(model, processor)``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def generate_captions(
    model: Any, processor: Any, scenes: Sequence[sc.Scene], max_new_tokens: int = 24, batch_size: int = 50
) -> dict[int, str]:
    """Greedy HF captions (KV cache) of ``scenes``; all prompts have the same length, so no padding."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sc.PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    size = model.config.vision_config.image_size
    out: dict[int, str] = {}
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        images = [sc.render(s, size) for s in chunk]
        inputs = processor(text=[text] * len(chunk), images=images, return_tensors="pt")
        with torch.no_grad():
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
) -> TestbedReport:
    """Caption ``n_probe`` probe and ``n_control`` control scenes greedily and score them."""
    if model is None:
        model, processor = load(model_dir)
    splits = {
        "probe": sc.sample_scenes("probe", n_probe, cfg),
        "control": sc.sample_scenes("control", n_control, cfg),
    }
    reports, examples = {}, {}
    for name, scenes in splits.items():
        caps = generate_captions(model, processor, scenes)
        reports[name] = score_split(scenes, caps)
        examples[name] = [(s.names, caps[s.image_id]) for s in scenes[:5]]
        logger.info("%s: %s", name, reports[name])
    return TestbedReport(probe=reports["probe"], control=reports["control"], examples=examples)


def vllm_captions(
    model_dir: Path, scenes: Sequence[sc.Scene], max_new_tokens: int = 24, **engine_args: Any
) -> dict[int, str]:
    """Greedy captions of ``scenes`` through an in-process vLLM engine (small CPU settings)."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from vllm_halluguard.testing.parity import ENGINE_DEFAULTS

    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sc.PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    llm = LLM(model=str(model_dir), **{**ENGINE_DEFAULTS, **engine_args})
    size = processor.image_processor.crop_size["height"]
    outs = llm.generate(
        [{"prompt": text, "multi_modal_data": {"image": sc.render(s, size)}} for s in scenes],
        SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
        use_tqdm=False,
    )
    return {s.image_id: o.outputs[0].text.strip() for s, o in zip(scenes, outs, strict=True)}


def main(argv: list[str] | None = None) -> None:
    """CLI: measure a testbed checkpoint with HF (and optionally check vLLM's captions agree)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--n", type=int, default=200, help="probe and control scenes each")
    parser.add_argument(
        "--vllm", type=int, default=0, help="also caption this many probe+control scenes with vLLM"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    model, processor = load(args.model)
    report = measure(args.model, args.n, args.n, model=model, processor=processor)
    print(report.summary())
    if args.vllm:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        half = args.vllm // 2
        scenes = sc.sample_scenes("probe", half) + sc.sample_scenes("control", args.vllm - half)
        hf = generate_captions(model, processor, scenes)
        vl = vllm_captions(args.model, scenes)
        same = sum(hf[i] == vl[i] for i in hf)
        for s in scenes[:6]:
            print(f"{s.names} HF={hf[s.image_id]!r} vLLM={vl[s.image_id]!r}")
        print(f"vLLM == HF greedy captions on {same}/{len(scenes)} scenes")


if __name__ == "__main__":
    main()

"""Train the hermetic testbed: a tiny LLaVA-1.5 captioner that learns the scenes' co-occurrence bias.

The checkpoint has the on-disk format of the ``llava`` test fixture
(:func:`vllm_halluguard.tiny_models.llava_parts` / ``save_llava``), so HF transformers and
vLLM 0.32 both load it, but it is trained: on :mod:`.scenes` training scenes, with the prompt
"Describe the image." and the template caption as the answer (loss on the answer and ``</s>`` only).

Usage::

    PYTHONPATH=tests python -m testbed.train --out tests/testbed/model
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from testbed import scenes as sc
from vllm_halluguard.tiny_models import (
    LLAVA_SPECIALS,
    _corpus,
    _strip_volatile,
    _train_tokenizer,
    llava_parts,
    save_llava,
)

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TrainConfig(BaseModel):
    """Model sizes and the training recipe (defaults produce the committed checkpoint)."""

    model_config = ConfigDict(frozen=True)

    seed: int = 0
    scenes: sc.SceneConfig = sc.SceneConfig()
    n_train: int = 4000
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    vocab_size: int = 512
    vision_hidden: int = 64
    vision_layers: int = 3  # vision_feature_layer=-2: the last layer is not used by LLaVA
    text_hidden: int = 128
    text_layers: int = 4
    text_intermediate: int = 256


def _tokenizer_corpus(cfg: TrainConfig) -> list[str]:
    """Captions of every split, the prompt in chat form, and pseudo-English filler."""
    texts = [sc.caption(s.names) for split in sc.SPLITS for s in sc.sample_scenes(split, 500, cfg.scenes)]
    texts += [f"USER: <image>\n{sc.PROMPT}\nASSISTANT: {t}</s>" for t in texts[:200]]
    return texts + _corpus()


def build_untrained(cfg: TrainConfig) -> tuple[Any, Any]:
    """``(model, processor)``: a freshly initialised LLaVA of ``cfg``'s sizes, fp32, train mode."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = _train_tokenizer(LLAVA_SPECIALS, cfg.vocab_size, _tokenizer_corpus(cfg))
    vision = dict(
        hidden_size=cfg.vision_hidden,
        intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=4,
    )
    text = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_hidden // 32,
        num_key_value_heads=max(1, cfg.text_hidden // 64),
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    config, processor = llava_parts(tokenizer, vision, text, cfg.scenes.image_size)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """CLIP normalisation of uint8 ``[N, H, W, 3]`` images (what the processor does at native size)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def prompt_ids(processor: Any, image_size: int) -> list[int]:
    """Token ids of the chat prompt with the ``<image>`` token expanded, as HF and vLLM build it."""
    from PIL import Image

    from testbed.measure import chat_prompt

    text = chat_prompt(processor)
    blank = Image.new("RGB", (image_size, image_size))
    return processor(text=[text], images=[blank], return_tensors="pt")["input_ids"][0].tolist()


def _batches(cfg: TrainConfig, processor: Any) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, int]:
    """Rendered training images and padded ``(input_ids, labels)`` for every training scene."""
    scenes = sc.sample_scenes("train", cfg.n_train, cfg.scenes)
    images = np.stack([np.asarray(sc.render(s, cfg.scenes.image_size)) for s in scenes])
    prompt = prompt_ids(processor, cfg.scenes.image_size)
    tok = processor.tokenizer
    answers = [
        tok(" " + sc.caption(s.names), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for s in scenes
    ]
    width = len(prompt) + max(map(len, answers))
    ids = torch.full((len(scenes), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, a in enumerate(answers):
        ids[i, : len(prompt) + len(a)] = torch.tensor(prompt + a)
        labels[i, len(prompt) : len(prompt) + len(a)] = torch.tensor(a)
    return images, ids, labels, len(prompt)


def train(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """Build, train and save the testbed checkpoint into ``out``; returns a summary."""
    t0 = time.perf_counter()
    model, processor = build_untrained(cfg)
    images, ids, labels, _ = _batches(cfg, processor)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(ids), generator=gen)
    pos, losses = 0, []
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(ids), generator=gen), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        batch_labels = labels[idx]
        keep = int((batch_labels != -100).any(0).nonzero().max()) + 1  # trim shared right padding
        input_ids = ids[idx, :keep]
        attention = (input_ids != processor.tokenizer.pad_token_id).long()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(
            input_ids=input_ids,
            pixel_values=pixel_values(images[idx.numpy()]),
            attention_mask=attention,
            labels=batch_labels[:, :keep],
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            logger.info(
                "step %d/%d loss %.4f (%.0f s)",
                step,
                cfg.steps,
                np.mean(losses[-50:]),
                time.perf_counter() - t0,
            )
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_llava(model, processor, out)
    _strip_volatile(out)
    wall = time.perf_counter() - t0
    summary = {
        "train_wall_s": round(wall, 1),
        "final_loss": float(np.mean(losses[-50:])),
        "config": cfg.model_dump(),
    }
    (out / "testbed_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("trained testbed in %.0f s, saved to %s", wall, out)
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI: train the testbed captioner (1 CPU thread by default) and report its hallucination."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--n-train", type=int, default=TrainConfig().n_train)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solo-rate", type=float, default=TrainConfig().scenes.solo_rate)
    parser.add_argument("--partner-size", type=int, default=TrainConfig().scenes.partner_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-measure", action="store_true", help="skip the probe/control measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        steps=args.steps,
        n_train=args.n_train,
        seed=args.seed,
        scenes=sc.SceneConfig(solo_rate=args.solo_rate, partner_size=args.partner_size),
    )
    summary = train(cfg, args.out)
    print(f"trained in {summary['train_wall_s']} s, final loss {summary['final_loss']:.4f} -> {args.out}")
    if not args.no_measure:
        from testbed.measure import measure

        report = measure(args.out)
        (args.out / "testbed_measure.json").write_text(
            report.model_dump_json(indent=2, exclude={"captions"}) + "\n"
        )
        print(report.summary())


if __name__ == "__main__":
    main()

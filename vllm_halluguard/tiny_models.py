"""Tiny, real vision-language checkpoints built offline and deterministically.

The papers' two architectures (:data:`FIXTURES`) are provided, small enough for a 2-core CPU and
loadable by HF transformers *and* vLLM 0.32 with real safetensors weights (no ``load_format="dummy"``):

* ``llava``: LLaVA-1.5 architecture. CLIP vision tower (2 layers, patch 14 on 112 px images, so an
  8x8 row-major grid of 64 image tokens after dropping CLS), 2-layer MLP projector, Llama text model
  (4 layers, hidden 128, 4 query heads and 2 KV heads of size 32). The prompt's ``<image>`` token is
  expanded to 64 tokens as LLaVA does.
* ``qwen2_vl``: Qwen2-VL architecture. Its own vision tower with 2x2 patch merge, M-RoPE text
  model (4 layers, hidden 128, 4 heads / 2 KV heads of size 32). A 112x112 image gives grid
  (1, 8, 8), i.e. 16 merged image tokens on a 4x4 grid; other sizes are resized dynamically.

and four served today (:data:`SERVED_FIXTURES`, same text sizes): ``qwen2_5_vl`` (windowed vision
attention), ``qwen3_vl`` (DeepStack), ``llava_next`` and ``llava_onevision`` (any-resolution tiles);
their builders below describe them.

Each checkpoint carries a byte-level BPE tokenizer trained here with ``tokenizers`` on a built-in
corpus, whose size equals the model's vocabulary (every id decodes), its image processor, processor
and chat template. Weights are drawn from a seeded generator with std 0.1 (norm weights 1 ± 0.1) so
that logits are spread and greedy decoding is not dominated by near-ties (``tests/test_fixtures.py``
measures that).

Usage::

    path = ensure_fixture("llava")            # builds once into the cache folder
    halluguard-fixtures [--out DIR] [--only NAME]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

FixtureName = Literal["llava", "qwen2_vl", "qwen2_5_vl", "llava_next", "llava_onevision", "qwen3_vl"]
#: The papers' architectures, which the full engine suites run on.
FIXTURES: tuple[FixtureName, ...] = ("llava", "qwen2_vl")
#: Architectures served today (issue 19), covered by the lean suite ``tests/test_served_vlms.py``
#: (Gemma 3 is not among them: see docs/methods.md, "Architectures").
SERVED_FIXTURES: tuple[FixtureName, ...] = ("qwen2_5_vl", "llava_next", "llava_onevision", "qwen3_vl")
ALL_FIXTURES: tuple[FixtureName, ...] = FIXTURES + SERVED_FIXTURES
# Bump when anything below changes the files written; it keys the cache folder.
FIXTURE_VERSION = 1
VOCAB_SIZE = 512
IMAGE_SIZE = 112
INIT_STD = 0.1
SEED = 1234
#: Text-model sizes shared by both fixtures: 4 query heads and 2 KV heads of size 32.
TEXT_DIMS = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)

_WORDS = (
    "a an the this that is are was were of on in under over near next to with and or but there "
    "here image picture photo scene shows show see seen left right top bottom middle front "
    "behind small large big tiny red green blue yellow black white orange purple pink brown "
    "gray round square circle triangle star cat dog person man woman child car bus truck "
    "bicycle boat bird horse sheep cow elephant bear zebra giraffe umbrella bag tie bottle cup "
    "fork knife spoon bowl banana apple sandwich pizza cake chair couch bed table tv laptop "
    "phone book clock vase kite ball bench tree sky grass road water wall window door street "
    "room field beach sitting standing walking eating holding playing riding looking parked "
    "flying describe detail what color how many yes no one two three four five it its they "
    "their he she his her we you i do does can could would should"
).split()


def _corpus(n_sentences: int = 3000, seed: int = SEED) -> list[str]:
    """Deterministic pseudo-English text to train the tokenizer on."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", "?", "!", ","])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 999)}"
        out.append(sentence)
    return out


def _train_tokenizer(special_tokens: list[str], vocab_size: int, corpus: Iterable[str] | None = None):
    """Byte-level BPE with ``special_tokens`` first (ids 0..n-1), padded to exactly ``vocab_size``.

    It is trained on ``corpus`` (default: the built-in pseudo-English :func:`_corpus`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    missing = vocab_size - len(fast)
    if missing > 0:  # the corpus ran out of merges: fill with reserved tokens so every id decodes
        fast.add_special_tokens({"additional_special_tokens": [f"<|reserved_{i}|>" for i in range(missing)]})
    if len(fast) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(fast)} tokens, expected {vocab_size}")
    for i, t in enumerate(special_tokens):
        assert fast.convert_tokens_to_ids(t) == i, (t, i)
    return fast


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded re-initialisation: norms 1 + 0.1·N(0,1), biases 0.1·N(0,1), the rest INIT_STD·N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(INIT_STD * noise)


# --------------------------------------------------------------------------------------------- LLaVA

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}\n"
    "{% else %}{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\n' if message['role'] == 'user' else '</s>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def llava_parts(
    tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], image_size: int = IMAGE_SIZE
) -> tuple[Any, Any]:
    """``(LlavaConfig, LlavaProcessor)`` of a LLaVA-1.5 model with our special-token layout.

    ``tokenizer`` must come from :func:`_train_tokenizer` with specials ``<unk> <s> </s> <pad> <image>``;
    ``vision`` holds ``CLIPVisionConfig`` sizes (patch 14) and ``text`` ``LlamaConfig`` sizes.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = LLAVA_SPECIALS[:4]
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    vision_config = CLIPVisionConfig(
        **vision, image_size=image_size, patch_size=14, projection_dim=64, hidden_act="quick_gelu"
    )
    text_config = LlamaConfig(**text, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = 3
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return config, processor


def _qwen_tokenizer() -> Any:
    """The Qwen-VL families' tokenizer: Qwen2-VL's special tokens and chat template."""
    tokenizer = _train_tokenizer(QWEN2VL_SPECIALS, VOCAB_SIZE)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tokenizer


def _save(model: Any, processor: Any, out: Path) -> None:
    """Weights (safetensors), processor and tokenizer into ``out``."""
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)


def save_llava(model: Any, processor: Any, out: Path) -> None:
    """Write a LLaVA(-NeXT, -OneVision) model and its processor in the layout HF and vLLM 0.32 load."""
    _save(model, processor, out)
    # transformers 5.19 writes the CLIP tower as ``vision_tower.*``; vLLM 0.32's LLaVA loader wants
    # ``vision_tower.vision_model.*`` (and transformers accepts both), so store the common form.
    _rename_keys(
        out,
        lambda k: (
            k.replace("vision_tower.", "vision_tower.vision_model.", 1)
            if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
            else k
        ),
    )


def _build_llava(out: Path, image_size: int = IMAGE_SIZE) -> None:
    from transformers import LlavaForConditionalGeneration

    tokenizer = _train_tokenizer(LLAVA_SPECIALS, VOCAB_SIZE)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config, processor = llava_parts(tokenizer, vision, dict(**TEXT_DIMS, head_dim=32), image_size)
    model = LlavaForConditionalGeneration(config).eval()
    _init_weights(model, SEED)
    save_llava(model, processor, out)


def build_llava_geometry(out: Path, image_size: int) -> Path:
    """The ``llava`` fixture's architecture with ``image_size`` px images, built into ``out``:
    ``(image_size // 14) ** 2`` image tokens, e.g. 336 px gives LLaVA-1.5's 576 on a 24x24 grid."""
    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    _build_llava(out, image_size)
    _strip_volatile(out)
    return out


# ------------------------------------------------------------------------------------------ Qwen2-VL

QWEN2VL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_qwen2_vl(out: Path) -> None:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer()
    config = Qwen2VLConfig(
        text_config=dict(
            **TEXT_DIMS,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
            use_sliding_window=False,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=128,
            num_heads=4,
            mlp_ratio=2,
            hidden_act="quick_gelu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=12,
        video_token_id=13,
        vision_start_token_id=9,
        vision_end_token_id=10,
        tie_word_embeddings=False,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 2, 0
    model = Qwen2VLForConditionalGeneration(config).eval()
    _init_weights(model, SEED + 1)
    pixels = dict(min_pixels=56 * 56, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    _save(model, processor, out)


# ---------------------------------------------------------------------------------------- Qwen2.5-VL


def _build_qwen2_5_vl(out: Path) -> None:
    """Qwen2.5-VL: Qwen2-VL's tokens and template; the vision tower has windowed attention (2x2
    merged patches per window, so a 112 px image has 4 windows) in block 0, full attention in block 1,
    RMSNorm/SwiGLU blocks and an MLP merger to the text width."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **TEXT_DIMS,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
            use_sliding_window=False,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=TEXT_DIMS["hidden_size"],
            num_heads=4,
            hidden_act="silu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=12,
        video_token_id=13,
        vision_start_token_id=9,
        vision_end_token_id=10,
        tie_word_embeddings=False,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 2, 0
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _init_weights(model, SEED + 2)
    pixels = dict(min_pixels=56 * 56, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    _save(model, processor, out)


# ------------------------------------------------------------------------------------------ Qwen3-VL


def _build_qwen3_vl(out: Path) -> None:
    """Qwen3-VL: Qwen2-VL's tokens and template; patch 16 with 2x2 merge (a 112 px image is resized to
    128 px: 8x8 patches, 16 merged tokens on a 4x4 grid); DeepStack: the outputs of vision blocks 0
    and 1 go through their own mergers and are added to the image tokens after decoder layers 0 and 1;
    Qwen3 text model (q/k norms) with interleaved M-RoPE."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer()
    rope = {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True, "rope_theta": 5e6}
    config = Qwen3VLConfig(
        text_config=dict(
            **TEXT_DIMS,
            head_dim=32,
            rms_norm_eps=1e-6,
            rope_parameters=rope,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=TEXT_DIMS["hidden_size"],
            num_heads=4,
            hidden_act="gelu_pytorch_tanh",
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=12,
        video_token_id=13,
        vision_start_token_id=9,
        vision_end_token_id=10,
        tie_word_embeddings=False,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 2, 0
    model = Qwen3VLForConditionalGeneration(config).eval()
    _init_weights(model, SEED + 5)
    pixels = dict(patch_size=16, min_pixels=64 * 64, max_pixels=128 * 128)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen3VLVideoProcessor(patch_size=16),
        tokenizer=tokenizer,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    _save(model, processor, out)


# ---------------------------------------------------------------------------------------- LLaVA-NeXT

#: LLaVA-NeXT's base image and tile size (px): a CLIP tower on 56 px gives 4x4 patches per crop.
NEXT_TILE = 56


def _build_llava_next(out: Path) -> None:
    """LLaVA-NeXT (any-resolution): LLaVA-1.5's tokens, template and Llama text model; the CLIP tower
    sees the base image at 56 px plus the image resized to the one grid pinpoint 112x112, cut into
    2x2 tiles of 56 px. The prompt holds the base grid (4x4 = 16 tokens), then the tiles' 8x8 grid
    with an ``image_newline`` token after each row (72 tokens): 88 image tokens for a square image.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = _train_tokenizer(LLAVA_SPECIALS, VOCAB_SIZE)
    tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = LLAVA_SPECIALS[:4]
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    pinpoints = [[2 * NEXT_TILE, 2 * NEXT_TILE]]
    vision_config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=NEXT_TILE,
        patch_size=14,
        projection_dim=64,
        hidden_act="quick_gelu",
    )
    text_config = LlamaConfig(
        **TEXT_DIMS, head_dim=32, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3
    )
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_grid_pinpoints=pinpoints,
        image_seq_length=(NEXT_TILE // 14) ** 2,
        tie_word_embeddings=False,
    )
    config.pad_token_id = 3
    model = LlavaNextForConditionalGeneration(config).eval()
    _init_weights(model, SEED + 3)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": NEXT_TILE},
        crop_size={"height": NEXT_TILE, "width": NEXT_TILE},
        image_grid_pinpoints=pinpoints,
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    save_llava(model, processor, out)


# ----------------------------------------------------------------------------------- LLaVA-OneVision

ONEVISION_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_llava_onevision(out: Path) -> None:
    """LLaVA-OneVision: a SigLIP tower (no CLS; all patch features) on the base image at 56 px and on
    2x2 tiles of 56 px from the one grid pinpoint 112x112, a Qwen2 text model, Qwen-style template with
    ``<image>``. The prompt holds the base grid (16 tokens), then the tiles' 8x8 grid with a newline
    token after each row (72): 88 image tokens for a square image.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = _train_tokenizer(ONEVISION_SPECIALS, VOCAB_SIZE)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
    pinpoints = [[2 * NEXT_TILE, 2 * NEXT_TILE]]
    vision_config = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=NEXT_TILE,
        patch_size=14,
    )
    text_config = Qwen2Config(
        **TEXT_DIMS,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=3,
        video_token_index=4,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    config.pad_token_id = 0
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _init_weights(model, SEED + 4)
    size = {"height": NEXT_TILE, "width": NEXT_TILE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(NEXT_TILE // 14) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    save_llava(model, processor, out)  # the SigLIP tower as ``vision_tower.vision_model.*`` too


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "llava": _build_llava,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "qwen3_vl": _build_qwen3_vl,
}


def _rename_keys(folder: Path, rename: Callable[[str], str]) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file({rename(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _strip_volatile(folder: Path) -> None:
    """Drop fields that would make two builds differ (none expected today; kept as a guard)."""
    for f in folder.glob("*.json"):
        data = json.loads(f.read_text())
        if isinstance(data, dict) and "transformers_version" in data:
            data.pop("transformers_version")
            f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_fixture(name: FixtureName, out: Path) -> Path:
    """Build fixture ``name`` into the empty or missing folder ``out`` and return it."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown fixture {name!r}; choose from {FIXTURES}")
    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    _BUILDERS[name](out)
    _strip_volatile(out)
    logger.info("built tiny %s fixture in %s", name, out)
    return out


def default_cache_dir() -> Path:
    env = os.environ.get("HALLUGUARD_FIXTURES")
    return Path(env) if env else Path.home() / ".cache" / "vllm-halluguard" / "fixtures"


def ensure_fixture(name: FixtureName, cache_dir: Path | None = None) -> Path:
    """Return the folder of fixture ``name``, building it atomically on first use."""
    cache_dir = cache_dir or default_cache_dir()
    import transformers

    tag = hashlib.sha256(f"{FIXTURE_VERSION}-{transformers.__version__}".encode()).hexdigest()[:8]
    final = cache_dir / f"tiny-{name}-{tag}"
    if (final / "model.safetensors").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{name}-", dir=cache_dir))
    try:
        build_fixture(name, tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_image(seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A deterministic RGB test image: a colour gradient plus a few seeded rectangles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0, 255, size=3)
    img = np.stack([base[0] * xx, base[1] * yy, base[2] * (1 - xx * yy)], axis=-1)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 16, size=2)
        w, h = rng.integers(8, size // 2, size=2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, size=3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def load_hf(name: FixtureName, attn_implementation: str = "eager") -> tuple[Any, Any]:
    """Load fixture ``name`` with HF transformers (fp32, eval mode): ``(model, processor)``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = ensure_fixture(name)
    model = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=torch.float32
    ).eval()
    return model, AutoProcessor.from_pretrained(path)


def main(argv: list[str] | None = None) -> None:
    """CLI: write the fixtures to a folder (default: the cache)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=None, help="folder to write into (default: cache)")
    parser.add_argument("--only", choices=ALL_FIXTURES, action="append", help="build only this fixture")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.only or ALL_FIXTURES:
        path = build_fixture(name, args.out / name) if args.out else ensure_fixture(name)
        logger.info("%s: %s", name, path)


if __name__ == "__main__":
    main()

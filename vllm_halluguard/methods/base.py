"""Shared pieces of every method config: the pydantic base class, layer specs and depth scaling.

A method config is model-agnostic: fields left at ``None`` mean "the paper's value for this model" and are
filled by :meth:`MethodConfig.for_model`, which also checks layer indices against the model's depth. The
resolved config is what the reference and the engine run, and its :meth:`canonical` JSON is what goes into
cache salts.

Presets use a paper's values where the paper gives them for the model (family and depth, e.g. SCR on the
40-layer LLaVA-1.5-13B) and scale the reference depth's values otherwise; :meth:`MethodConfig.provenance`
says which of the two each preset field is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

ModelFamily = Literal["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision"]
Provenance = Literal["paper", "extrapolated"]
MODEL_FAMILIES: tuple[ModelFamily, ...] = (
    "llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava_next",
    "llava_onevision",
)

#: Decoder depth of the models the papers' layer ranges were tuned on: LLaVA-1.5-7B and Qwen2-VL-7B.
#: Families no paper evaluates use their 7B model's depth: Qwen2.5-VL-7B (28), LLaVA-NeXT-7B on
#: Vicuna/Mistral (32), LLaVA-OneVision-7B on Qwen2-7B (28); their presets are all extrapolated.
#: Qwen3-VL reuses Qwen2-VL-7B's 28: its ranges are Qwen2-VL's, scaled to the model's depth.
REFERENCE_DEPTH: dict[ModelFamily, int] = {
    "llava": 32,
    "qwen2_vl": 28,
    "qwen2_5_vl": 28,
    "qwen3_vl": 28,
    "llava_next": 32,
    "llava_onevision": 28,
}

LayerSpec = tuple[int, ...]


def scale_layer_range(start: int, stop: int, ref_depth: int, depth: int) -> LayerSpec:
    """Map the half-open layer range ``[start, stop)`` of a ``ref_depth``-layer model to ``depth`` layers.

    The layers the paper leaves out on either side are scaled proportionally and rounded *up*
    (``ceil(start * depth / ref_depth)`` skipped at the front,
    ``ceil((ref_depth - stop) * depth / ref_depth)`` at the back), so an exclusion never disappears on a
    shallow model: KVSmooth's "skip 0-2 and the last of 32" becomes layers 1..2 of 4. At
    ``depth == ref_depth`` the range is unchanged. The result always holds at least one layer.
    """
    if not 0 <= start < stop <= ref_depth:
        raise ValueError(f"bad layer range [{start}, {stop}) for a {ref_depth}-layer reference model")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    new_start = min(-(-start * depth // ref_depth), depth - 1)
    new_stop = depth - (-(-(ref_depth - stop) * depth // ref_depth))
    new_stop = max(new_stop, new_start + 1)
    return tuple(range(new_start, new_stop))


#: Most layer indices a spec may hold (no served model has this many decoder layers).
MAX_LAYERS = 1024
#: Longest quote of a user's value in these errors (as ``methods.ECHO_LIMIT``).
_ECHO = 200


def _echo(value: Any) -> str:
    """``repr(value)`` cut to 200 characters (a long sequence is cut before its repr is built)."""
    text = repr(value[: _ECHO + 1] if isinstance(value, str | list | tuple | range) else value)
    return text if len(text) <= _ECHO else f"{text[:_ECHO]}...(cut)"


def parse_layer_spec(value: Any) -> LayerSpec | None:
    """Accept ``None``, an iterable of ints, a ``range`` or a ``"start:stop"`` string (slice semantics).

    At most :data:`MAX_LAYERS` indices; values are quoted back cut to 200 characters.
    """
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 2:
            raise ValueError(f"layer string must look like 'start:stop', got {_echo(value)}")
        try:
            start, stop = int(parts[0]), int(parts[1])
        except ValueError as e:
            raise ValueError(f"layer string must look like 'start:stop', got {_echo(value)}") from e
        value = range(start, stop)
    if isinstance(value, bool | int | float):
        raise ValueError(f"layers must be a list of indices or 'start:stop', got {_echo(value)}")
    if isinstance(value, range) and value.step == 1 and value.stop - value.start > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layer indices, got range({_echo(value.start)}, ...)")
    if isinstance(value, list | tuple) and len(value) > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layer indices, got {len(value)}")
    layers = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"layer indices must be ints, got {_echo(v)}")
        layers.append(v)
        if len(layers) > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} layer indices")
    if any(v < 0 for v in layers):
        raise ValueError(f"layer indices must be >= 0, got {_echo([v for v in layers if v < 0])}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layer indices in {_echo(layers)}")
    return tuple(sorted(layers))


def check_layers(layers: LayerSpec, num_layers: int, field: str) -> None:
    """Raise ``ValueError`` if any index in ``layers`` is outside a ``num_layers``-layer decoder."""
    bad = [layer for layer in layers if layer >= num_layers]
    if bad:
        raise ValueError(f"{field}: layer indices {_echo(bad)} do not exist in a {num_layers}-layer decoder")


@dataclass(frozen=True)
class Refusal:
    """A setting of a method that a composition refuses: ``field == value``, beside ``beside`` (a method
    name) or beside any other method (``None``). ``message`` is the error's text."""

    field: str
    value: Any
    beside: str | None
    message: str
    #: Words after the setting in ``GET /v1/mitigations``'s note, e.g. "(the block-reclaiming variant)".
    note: str = ""

    def describe(self, method: str) -> str:
        """The setting as ``GET /v1/mitigations`` names it: ``"farsight mode 'A'"``."""
        words = [method, self.field, repr(self.value), self.note]
        if self.beside is not None:
            words.append(f"together with {self.beside}")
        return " ".join(w for w in words if w)


class MethodConfig(BaseModel):
    """Base class of the method configs (frozen, unknown keys rejected).

    Subclasses set ``name``, ``compose_rank`` and ``composition_refusals`` (no defaults: the contract
    test names what a new method lacks), list their layer fields in ``layer_fields``, implement
    :meth:`preset`, list the fields it sets per model in ``preset_fields`` and, in ``paper_fields``,
    those a paper gives for a ``(family, num_layers)``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    name: ClassVar[str]
    #: Where the method acts in a composition, relative to the others: members act in ascending rank
    #: (methods/compose.py explains the order). Ranks are unique among the registered methods.
    compose_rank: ClassVar[int]
    #: The settings of this method that a composition refuses (``()``: every setting composes).
    composition_refusals: ClassVar[tuple[Refusal, ...]]
    #: Fields holding layer indices (validated against the model depth in :meth:`for_model`).
    layer_fields: ClassVar[tuple[str, ...]] = ()
    #: Fields whose value :meth:`preset` chooses per model (the ``None`` defaults it fills).
    preset_fields: ClassVar[tuple[str, ...]] = ()
    #: ``(family, num_layers)`` -> the preset fields whose value a paper gives for that model.
    paper_fields: ClassVar[dict[tuple[ModelFamily, int], frozenset[str]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _check_value(cls, v: Any, info: ValidationInfo) -> Any:
        """Reject NaN everywhere; parse the fields named in ``layer_fields`` as layer specs."""
        if isinstance(v, float) and math.isnan(v):
            raise ValueError("NaN is not a valid value")
        if info.field_name in cls.layer_fields:
            return parse_layer_spec(v)
        return v

    @field_validator("*", mode="after")
    @classmethod
    def _check_parsed(cls, v: Any) -> Any:
        """Reject NaN however it was written (pydantic parses the string ``"nan"`` to a float NaN)."""
        if isinstance(v, float) and math.isnan(v):
            raise ValueError("NaN is not a valid value")
        return v

    @classmethod
    def preset(cls, model_family: ModelFamily, num_layers: int) -> Self:
        """The paper's setting for ``model_family``, with layer ranges scaled to ``num_layers``."""
        raise NotImplementedError

    @classmethod
    def provenance(cls, model_family: ModelFamily, num_layers: int) -> dict[str, Provenance]:
        """Per preset field: ``"paper"`` if a paper gives the value for this model, else ``"extrapolated"``
        (scaled from the reference depth or reused from another model)."""
        given = cls.paper_fields.get((model_family, num_layers), frozenset())
        return {f: "paper" if f in given else "extrapolated" for f in cls.preset_fields}

    def for_model(self, model_family: ModelFamily, num_layers: int) -> Self:
        """Fill every ``None`` field from :meth:`preset` and check layer indices against ``num_layers``."""
        if model_family not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {model_family!r}; expected one of {MODEL_FAMILIES}")
        preset = self.preset(model_family, num_layers)
        filled = {k: getattr(preset, k) for k, v in self if v is None}
        resolved = self.model_copy(update=filled)
        # model_copy skips validation: re-validate the merged values.
        resolved = type(self).model_validate(resolved.model_dump())
        for field in self.layer_fields:
            layers = getattr(resolved, field)
            if layers is not None:
                check_layers(layers, num_layers, f"{self.name}.{field}")
        return resolved

    def is_resolved(self) -> bool:
        """True when no field is left to the preset."""
        return all(v is not None for _, v in self)

    def canonical(self) -> str:
        """Stable JSON (sorted keys, no spaces, method name included) for cache salts and logs."""
        # model_dump_json writes +-inf as "Infinity" strings (standard JSON, distinct from null).
        payload = {"method": self.name, **json.loads(self.model_dump_json())}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def is_noop(self) -> bool:
        """True when the parameters make the method an exact identity (e.g. lambda=0, r=1, K=0)."""
        return False

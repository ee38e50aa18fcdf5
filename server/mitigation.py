"""What the HTTP ``mitigation`` field means: parsing, server policy and the engine's own resolution.

A request's field (or the server default) is turned into the canonical config that the engine will run,
with the same :func:`vllm_halluguard.methods.resolve.resolve` the engine calls at admission, so a request
the server accepts is one the engine accepts. The server options (default, allow-list, preset family)
reach the API process through environment variables set by :mod:`server.cli`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_halluguard import __version__
from vllm_halluguard.engine import requests as engine_requests
from vllm_halluguard.methods import (
    METHODS,
    MODEL_FAMILIES,
    Config,
    MethodConfig,
    ModelFamily,
    SpecError,
    members_of,
    order,
    parse,
    refused_in_composition,
)
from vllm_halluguard.methods.resolve import model_family, resolve
from vllm_halluguard.plugin import vllm_version

FIELD = "mitigation"
NONE = "none"

DEFAULT_ENV = "HALLUGUARD_DEFAULT_MITIGATION"
ALLOW_ENV = "HALLUGUARD_MITIGATION_ALLOW"
PRESET_ENV = "HALLUGUARD_MITIGATION_PRESET"
#: Methods that act only on image tokens: a request without an image is a 400 for them.
IMAGE_METHODS = engine_requests.IMAGE_METHODS


class MitigationError(ValueError):
    """A bad ``mitigation`` value; ``reason`` labels the error metric."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def known_names() -> list[str]:
    return [NONE, *METHODS]


def engine_methods() -> frozenset[str]:
    """Methods the engine runs, read at call time so that new engine methods appear by themselves."""
    return engine_requests.ENGINE_METHODS


def load_spec_text(text: str) -> Any:
    """A spec written on the command line: a name, or JSON text of an object or a list."""
    text = text.strip()
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise MitigationError(f"not valid JSON: {e}", "invalid_spec") from e
    return text


def field_spec(value: Any) -> Any:
    """Check the field's shape: a name, an object, or a list of them (a list composes methods)."""
    if value is None or isinstance(value, str | Mapping | list):
        return value
    raise MitigationError(
        f"must be a method name, an object {{'method': name, ...params}} or a list of them, "
        f"got {type(value).__name__}",
        "invalid_spec",
    )


def parse_spec(value: Any) -> Config | None:
    """Parse (without the model) the field's value; ``None`` means no mitigation."""
    spec = field_spec(value)
    try:
        cfg = parse(spec)
    except SpecError as e:
        raise MitigationError(str(e), e.reason) from e
    for member in members_of(cfg) if cfg is not None else ():
        for field, v in member:
            if isinstance(v, float) and not math.isfinite(v):  # e.g. sigma "Infinity": not over HTTP
                raise MitigationError(
                    f"invalid {member.name} config: {field}: must be a finite number", "invalid_params"
                )
    return cfg


def names_of(cfg: Config | None) -> list[str]:
    """The method names of a config (each member of a composition); ``["none"]`` for no mitigation."""
    return [m.name for m in members_of(cfg)] if cfg is not None else [NONE]


@dataclass(frozen=True)
class Policy:
    """Server-wide settings: default spec, allow-list (``None`` = all) and preset family override."""

    default: Any = None
    allow: frozenset[str] | None = None
    preset: ModelFamily | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Policy:
        default = load_spec_text(environ[DEFAULT_ENV]) if environ.get(DEFAULT_ENV) else None
        allow = parse_allow(environ[ALLOW_ENV]) if environ.get(ALLOW_ENV) else None
        preset = environ.get(PRESET_ENV) or None
        if preset is not None and preset not in MODEL_FAMILIES:
            raise MitigationError(f"preset must be one of {list(MODEL_FAMILIES)}, got {preset!r}", "config")
        policy = cls(default, allow, preset)
        policy.check()
        return policy

    def check(self) -> None:
        """Model-independent checks of the settings themselves."""
        cfg = parse_spec(self.default)
        if self.allow is not None:
            for name in names_of(cfg):
                if name not in self.allow:
                    raise MitigationError(
                        f"the default mitigation {name!r} is not in the allow-list {sorted(self.allow)}",
                        "config",
                    )


def parse_allow(text: str) -> frozenset[str]:
    if not text.isascii():
        raise MitigationError(f"the allow-list must be ASCII method names, got {text!r}", "config")
    names = frozenset(n.strip().lower() for n in text.split(",") if n.strip())
    unknown = sorted(names - set(known_names()))
    if unknown:
        msg = f"unknown methods {unknown} in the allow-list; known: {known_names()}"
        raise MitigationError(msg, "config")
    return names


class Resolver:
    """The policy bound to the served model: request field → resolved config (or ``None``)."""

    def __init__(
        self, policy: Policy, hf_config: Any, cache_dtype: str = "auto", vllm_config: Any = None
    ) -> None:
        self.policy = policy
        self.vllm_config = vllm_config
        self.hf_config = hf_config
        self.cache_dtype = cache_dtype
        self.family: ModelFamily | None = policy.preset or model_family(hf_config)
        self.num_layers: int = hf_config.get_text_config().num_hidden_layers
        self.default = self.resolve(policy.default)  # a bad default fails at startup
        if self.default is not None and vllm_config is not None:  # so does one the layout refuses
            try:
                engine_requests.check_settings(self.default, vllm_config)
            except SpecError as e:
                raise MitigationError(f"the default mitigation: {e}", e.reason) from e

    def resolve(self, value: Any, has_image: bool | None = None) -> Config | None:
        """Validate a request's value (parse, allow-list, engine, image): the config the engine runs.

        A composition needs every member allowed. ``has_image=False`` (a request without an image)
        rejects the methods of :data:`IMAGE_METHODS` (and compositions holding one); ``None`` skips
        that check.
        """
        cfg = parse_spec(value)
        allow = self.policy.allow
        for name in names_of(cfg):
            if allow is not None and name not in allow:
                raise MitigationError(
                    f"method {name!r} is not allowed on this server (allowed: {', '.join(sorted(allow))})",
                    "not_allowed",
                )
        if cfg is None:
            return None
        try:
            resolved = self._engine_resolve(cfg)
        except SpecError as e:
            raise MitigationError(str(e), e.reason) from e
        require_image(cfg.name, has_image)
        return resolved

    def _engine_resolve(self, spec: Any) -> Config | None:
        """The engine's resolution of a spec or of a config :func:`parse_spec` returned (not parsed
        again), with the server's preset family."""
        return resolve(spec, self.hf_config, self.cache_dtype, family=self.policy.preset)

    def for_request(
        self, body: Mapping[str, Any], has_image: bool | None = None
    ) -> tuple[Config | None, bool]:
        """The config of a request body and whether it named one (else the server default applies).

        The field may also come as ``vllm_xargs.halluguard`` (the engine's own key), which goes through
        the same checks; giving both is an error. ``has_image`` is as in :meth:`resolve` (the server
        default is checked against it too).
        """
        xargs = body.get("vllm_xargs")
        raw_xarg = xargs.get(engine_requests.EXTRA_ARGS_KEY) if isinstance(xargs, Mapping) else None
        if FIELD in body and raw_xarg is not None:
            raise MitigationError(
                f"give either 'mitigation' or vllm_xargs.{engine_requests.EXTRA_ARGS_KEY}, not both",
                "invalid_spec",
            )
        if FIELD in body:
            value = body[FIELD]
            return self.resolve(NONE if value is None else value, has_image), True
        if raw_xarg is not None:
            return self.resolve(engine_requests.spec_of(xargs), has_image), True
        if self.default is not None:
            require_image(self.default.name, has_image, " (the server default)")
        return self.default, False

    def served(self, spec: Any) -> str | None:
        """Why this server will not run ``spec`` (the model, its engine settings), or ``None`` if it will.

        The same checks the server and the engine apply to a request (the allow-list aside)."""
        parsed = parse_spec(spec)
        if any(name not in engine_methods() for name in names_of(parsed)):
            return "the engine has no implementation of it"
        try:
            cfg = self._engine_resolve(parsed)
            if cfg is not None and self.vllm_config is not None:
                engine_requests.check_settings(cfg, self.vllm_config)
        except SpecError as e:
            return str(e)
        return None

    def describe(self) -> dict[str, Any]:
        """Content of ``GET /v1/mitigations``: what this server runs, with its defaults and rules."""
        methods = []
        for name, cls in METHODS.items():
            defaults: dict[str, Any] | None = None
            try:
                cfg = self._engine_resolve(name) if name in engine_methods() else None
                if cfg is None and self.family is not None:
                    cfg = cls().for_model(self.family, self.num_layers)
                defaults = json.loads(cfg.canonical()) if cfg is not None else None
            except ValueError:
                defaults = None
            why_not = self.served(name)
            methods.append(
                {
                    "method": name,
                    "description": _summary(cls),
                    # this server runs it (model, engine settings); the allow-list is "allowed"
                    "engine_supported": why_not is None,
                    "unsupported_reason": why_not,
                    "allowed": self.policy.allow is None or name in self.policy.allow,
                    "defaults": defaults,
                    # per preset field: "paper" (given for this model) or "extrapolated" (scaled/reused)
                    "provenance": (
                        cls.provenance(self.family, self.num_layers) if self.family is not None else None
                    ),
                    "schema": cls.model_json_schema(),
                }
            )
        return {
            "object": "list",
            "version": {"vllm_halluguard": __version__, "vllm": vllm_version()},
            "model_family": self.family,
            "num_layers": self.num_layers,
            "default": json.loads(self.default.canonical()) if self.default is not None else NONE,
            "composition": self.composition_info(),
            "data": methods,
        }

    def composition_info(self) -> dict[str, Any]:
        """The ``composition`` entry of ``GET /v1/mitigations``: the pairs this server runs, one order."""
        names = order()
        pairs = [[a, b] for i, a in enumerate(names) for b in names[i + 1 :]]
        return {
            "supported": ["+".join(p) for p in pairs if self.served(p) is None],
            "order": list(names),
            "note": "a list composes methods (each once); members act in 'order' whatever order they are "
            f"written in. Refused in any composition: {'; '.join(refused_in_composition())} "
            "(docs/methods.md, 'Composing methods')",
        }


def require_image(name: str, has_image: bool | None, origin: str = "") -> None:
    """Reject a method of :data:`IMAGE_METHODS` (or a composition ``a+b`` holding one) on a request
    known to have no image."""
    if has_image is False and any(n in IMAGE_METHODS for n in name.split("+")):
        raise MitigationError(
            f"method {name!r}{origin} acts on image tokens only and needs an image in the request; "
            f"this request has none (send an image part in a chat message; /v1/completions is text-only)",
            "needs_image",
        )


def _summary(cls: type[MethodConfig]) -> str:
    doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else cls.name


def header_value(cfg: Config | None) -> str:
    """Value of the ``x-halluguard-mitigation`` response header."""
    return cfg.canonical() if cfg is not None else NONE

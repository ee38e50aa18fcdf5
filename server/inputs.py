"""Checks of a chat request's images, done before vLLM decodes anything: size limits and presence.

An inline image (a base64 ``data:`` URL) is measured from its encoded length (bytes) and its header only
(pixels: PIL's ``Image.open`` reads the header and decodes nothing); one over the server's limits is a
400 naming the message part. Images given by URL are refused or allowed by :mod:`server.security`;
allowed ones are fetched by vLLM itself, which applies ``VLLM_MAX_IMAGE_PIXELS`` (set from
``--max-image-pixels`` by :mod:`server.cli`) and its own download limits. The limits reach the API
processes through environment variables, like the mitigation options.
"""

from __future__ import annotations

import binascii
import io
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_PIXELS_ENV = "HALLUGUARD_MAX_IMAGE_PIXELS"
MAX_BYTES_ENV = "HALLUGUARD_MAX_IMAGE_BYTES"
#: vLLM's own pixel limit, applied to every image it loads (fetched ones included).
VLLM_MAX_PIXELS_ENV = "VLLM_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # OpenAI's limit for one image

#: Chat content-part types that carry an image (vLLM's parser, ``vllm/renderers/chat_utils.py``).
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image", "image_pil", "image_embeds"})
#: Keys of an untyped part that vLLM reads as an image.
_UNTYPED_IMAGE_KEYS = ("image_url", "image_pil", "image_embeds")


class InputError(ValueError):
    """A request input the server refuses; ``reason`` labels the error metric, ``param`` the error body."""

    def __init__(self, message: str, reason: str, param: str | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.param = param


class ImageLimits(BaseModel):
    """Limits on one inline image; 0 disables a limit."""

    model_config = ConfigDict(frozen=True)

    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=0, description="width × height of one image")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=0, description="decoded size of one data: URL image")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ImageLimits:
        values = {
            key: environ[env]
            for key, env in (("max_pixels", MAX_PIXELS_ENV), ("max_bytes", MAX_BYTES_ENV))
            if environ.get(env)
        }
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ValueError(f"invalid image limits {values}: {e}") from e

    def env(self) -> dict[str, str]:
        return {MAX_PIXELS_ENV: str(self.max_pixels), MAX_BYTES_ENV: str(self.max_bytes)}

    def check(self, body: Mapping[str, Any]) -> None:
        """Raise :class:`InputError` for the first inline image of a chat body over the limits."""
        if not (self.max_pixels or self.max_bytes):
            return
        for param, url in _image_urls(body):
            if isinstance(url, str) and url[:5].lower() == "data:":
                self._check_data_url(url, param)

    def check_body(self, body: Any) -> None:
        """:meth:`check` for every inline image anywhere in a request body, whatever the route: chat
        parts, Responses ``input_image``, Anthropic base64 ``source`` blocks."""
        if not (self.max_pixels or self.max_bytes):
            return
        for param, data in inline_images(body):
            self._check_base64(data, param)

    def _check_data_url(self, url: str, param: str) -> None:
        spec, sep, data = url[5:].partition(",")
        if not sep or not spec.lower().endswith(";base64"):
            return  # vLLM rejects non-base64 data URLs itself
        self._check_base64(data, param)

    def _check_base64(self, data: str, param: str) -> None:
        size = len(data) * 3 // 4 - data[-2:].count("=")
        if self.max_bytes and size > self.max_bytes:
            raise InputError(
                f"image at {param} is {size} bytes, over this server's limit of {self.max_bytes} bytes "
                f"per image (--max-image-bytes)",
                "image_too_large",
                param,
            )
        if not self.max_pixels:
            return
        try:
            raw = binascii.a2b_base64(data, strict_mode=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                width, height = Image.open(io.BytesIO(raw)).size  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            raise InputError(
                f"image at {param} is over this server's limit of {self.max_pixels} pixels "
                f"(--max-image-pixels): {e}",
                "image_too_large",
                param,
            ) from e
        except (binascii.Error, ValueError, OSError):
            return  # not decodable: vLLM answers its own 400 for a corrupt image
        if width * height > self.max_pixels:
            raise InputError(
                f"image at {param} is {width}x{height} ({width * height} pixels), over this server's limit "
                f"of {self.max_pixels} pixels (--max-image-pixels)",
                "image_too_large",
                param,
            )


def _image_parts(body: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(param path, part)`` of each image part of a chat body's messages."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind in IMAGE_PART_TYPES or (kind is None and any(key in part for key in _UNTYPED_IMAGE_KEYS)):
                yield f"messages[{i}].content[{j}]", part


def _image_urls(body: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for param, part in _image_parts(body):
        url = part.get("image_url")
        if isinstance(url, Mapping):
            yield f"{param}.image_url.url", url.get("url")
        elif url is not None:
            yield f"{param}.image_url", url


def objects(body: Any) -> Iterator[tuple[Mapping[str, Any], str]]:
    """Every JSON object anywhere in a body with its param path (``messages[0].content[1]``), depth
    first; an iterative walk, so a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, Mapping):
            yield item, path
            stack.extend(
                (v, f"{path}.{k}" if path else str(k))
                for k, v in item.items()
                if isinstance(v, Mapping | list)
            )


def part_type(item: Mapping[str, Any]) -> str | None:
    """A part's ``type`` when it is a string (a client may send any JSON there)."""
    kind = item.get("type")
    return kind if isinstance(kind, str) else None


def inline_images(body: Any) -> Iterator[tuple[str, str]]:
    """``(param path, base64 data)`` of every inline image anywhere in a body: an ``image_url`` that is
    a base64 ``data:`` URL (a string or ``{"url": ...}``), and an Anthropic
    ``{"type": "image", "source": {"type": "base64", "data": ...}}`` block."""
    for item, path in objects(body):
        source = item.get("source")
        if (
            item.get("type") == "image"
            and isinstance(source, Mapping)
            and source.get("type") == "base64"
            and isinstance(source.get("data"), str)
        ):
            yield f"{path}.source.data".lstrip("."), source["data"]
        url = item.get("image_url")
        where = f"{path}.image_url".lstrip(".")
        if isinstance(url, Mapping):
            url, where = url.get("url"), f"{where}.url"
        if isinstance(url, str) and url[:5].lower() == "data:":
            spec, sep, data = url[5:].partition(",")
            if sep and spec.lower().endswith(";base64"):
                yield where, data


def any_image(body: Any) -> bool:
    """Whether a body holds an image part anywhere (any route's shape: chat, Responses, Anthropic)."""
    return any(
        part_type(item) in IMAGE_PART_TYPES or any(key in item for key in _UNTYPED_IMAGE_KEYS)
        for item, _ in objects(body)
    )


def has_image(body: Mapping[str, Any]) -> bool:
    """Whether a chat body has at least one image part."""
    return next(_image_parts(body), None) is not None

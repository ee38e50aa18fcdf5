"""What a client may make the server do: keyed routes, strict JSON bodies and media URLs.

* **Auth**: with an API key (``--api-key`` / ``VLLM_API_KEY``) every route needs it except
  :data:`OPEN_PATHS` (health, readiness, version; ``/metrics`` unless ``--metrics-require-key``).
* **Bodies**: JSON is parsed with a nesting limit and without ``NaN``/``Infinity`` (nor numbers that
  overflow to them); a violation is a 400, never a ``RecursionError``.
* **Media**: only inline base64 ``data:`` URLs unless the operator enables fetching
  (``--allow-media-fetch`` or vLLM's ``--allowed-media-domains``); then every address a host resolves
  to must be public (or inside ``--media-fetch-allow-net``), redirects are off, the fetch has one time
  cap and every remote failure is the same 400. ``file:`` URLs need vLLM's ``--allowed-local-media-path``.
  :func:`install_connector_guard` enforces this in vLLM's own media connector (every route), the
  middleware checks request bodies first (:func:`check_media`) so refused URLs never reach vLLM.

Settings reach every API process through environment variables set by :mod:`server.cli`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from server.inputs import InputError
from vllm_halluguard.methods import cut

logger = logging.getLogger("vllm.halluguard.server")

ALLOW_FETCH_ENV = "HALLUGUARD_ALLOW_MEDIA_FETCH"
ALLOW_NETS_ENV = "HALLUGUARD_MEDIA_FETCH_ALLOW_NETS"
FETCH_TIMEOUT_ENV = "HALLUGUARD_MEDIA_FETCH_TIMEOUT"
METRICS_KEY_ENV = "HALLUGUARD_METRICS_REQUIRE_KEY"
#: When set, the middleware writes the app's routes (JSON) to this file once serving (used by tests).
ROUTES_FILE_ENV = "HALLUGUARD_ROUTES_FILE"
DEFAULT_FETCH_TIMEOUT_S = 10.0

#: Routes that answer without the API key (plus ``/metrics`` unless ``--metrics-require-key``).
OPEN_PATHS = frozenset({"/health", "/ping", "/version"})
METRICS_PATHS = frozenset({"/metrics", "/metrics/"})
#: Deepest JSON nesting accepted in a request body (chat bodies need ~6; tool schemas a few more).
MAX_DEPTH = 64

#: Keys whose value is a media URL (a string or ``{"url": ...}``) in OpenAI / vLLM request bodies.
MEDIA_KEYS = frozenset({"image_url", "video_url", "audio_url", "file_url"})
#: Content-part types that carry media, for the role check.
MEDIA_PART_TYPES = frozenset(
    {
        "image_url",
        "input_image",
        "image",
        "image_pil",
        "image_embeds",
        "video_url",
        "audio_url",
        "input_audio",
    }
)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_open(path: str, metrics_open: bool) -> bool:
    """Whether ``path`` answers without the API key."""
    return path in OPEN_PATHS or (metrics_open and path in METRICS_PATHS)


def metrics_open(environ: Mapping[str, str] = os.environ) -> bool:
    return not _flag(environ, METRICS_KEY_ENV)


# ------------------------------------------------------------------------------------ JSON bodies


class _NonFinite(ValueError):
    pass


def _constant(name: str) -> float:
    raise _NonFinite(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NonFinite(f"{cut(text, 40)} overflows to infinity")
    return value


def load_json(raw: bytes) -> Any:
    """Parse a request body strictly; ``InputError`` (a 400) for non-finite numbers or deep nesting.

    Malformed JSON raises ``json.JSONDecodeError`` / ``UnicodeDecodeError`` as usual (vLLM answers it).
    """
    try:
        value = json.loads(raw, parse_constant=_constant, parse_float=_finite)
    except _NonFinite as e:
        raise InputError(f"invalid JSON body: {e}", "non_finite", None) from e
    except RecursionError as e:
        raise InputError(f"JSON body nested deeper than {MAX_DEPTH} levels", "too_deep", None) from e
    if depth(value) > MAX_DEPTH:
        raise InputError(f"JSON body nested deeper than {MAX_DEPTH} levels", "too_deep", None)
    return value


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item if isinstance(child, dict | list))
    return deepest


# ------------------------------------------------------------------------------------ media policy


@dataclass(frozen=True)
class MediaPolicy:
    """Which media URLs this server loads (see the module docstring)."""

    fetch: bool = False
    allow_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    local_files: bool = False
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, *, domains: Any = None, local_path: Any = None
    ) -> MediaPolicy:
        """Settings from :mod:`server.cli`'s variables and vLLM's media options of the served model."""
        nets = tuple(
            ipaddress.ip_network(n.strip(), strict=False)
            for n in environ.get(ALLOW_NETS_ENV, "").split(",")
            if n.strip()
        )
        timeout = float(environ.get(FETCH_TIMEOUT_ENV) or DEFAULT_FETCH_TIMEOUT_S)
        return cls(_flag(environ, ALLOW_FETCH_ENV) or bool(domains), nets, bool(local_path), timeout)

    def describe(self) -> str:
        if not self.fetch:
            return "inline data: URLs only"
        nets = f", also {[str(n) for n in self.allow_nets]}" if self.allow_nets else ""
        return f"fetch public addresses{nets}, {self.timeout_s:g}s cap, no redirects"

    def address_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow_nets):
            return True
        return ip.is_global and not ip.is_multicast


class MediaRefused(InputError):
    """A media URL this server does not load (a 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, "media_url", param)


FETCH_OFF = (
    "media URLs are not fetched by this server: send the image inline as a base64 data: URL "
    "(data:image/png;base64,...)"
)
FETCH_FAILED = "could not load media from the URL (refused address, unreachable, or not valid media)"


def check_url(url: str, policy: MediaPolicy, param: str | None = None) -> None:
    """Refuse (``MediaRefused``) a URL by its form alone; fetched URLs are checked again when fetched."""
    if url[:5].lower() == "data:":
        spec, sep, _ = url[5:].partition(",")
        if not sep or not spec.lower().endswith(";base64"):
            raise MediaRefused(
                "only base64 data: URLs are supported (data:<media type>;base64,<data>)", param
            )
        return
    scheme = urlsplit(url[:2048]).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.fetch:
            raise MediaRefused(FETCH_OFF, param)
        return
    if scheme == "file":
        if not policy.local_files:
            raise MediaRefused("file: URLs are not accepted by this server", param)
        return
    raise MediaRefused("a media URL must be a base64 data: URL", param)


def _media_urls(body: Any) -> Iterator[tuple[str, str]]:
    """``(param path, url)`` of every media URL anywhere in a request body (iterative walk)."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            where = f"{path}.{key}" if path else str(key)
            if key in MEDIA_KEYS or (key == "url" and item.get("type") == "url"):
                if isinstance(value, str):
                    yield cut(where), value
                elif isinstance(value, dict) and isinstance(value.get("url"), str):
                    yield cut(f"{where}.url"), value["url"]
            if isinstance(value, dict | list):
                stack.append((value, where))


def _media_in_non_user_message(body: Any) -> str | None:
    """Param path of the first media part in a message whose role is not ``user``."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, dict):
            content = item.get("content")
            if "role" in item and item.get("role") != "user" and isinstance(content, list):
                for j, part in enumerate(content):
                    if isinstance(part, dict) and (
                        part.get("type") in MEDIA_PART_TYPES or MEDIA_KEYS & part.keys()
                    ):
                        return cut(f"{path}.content[{j}]".lstrip("."))
            stack.extend((v, f"{path}.{k}") for k, v in item.items() if isinstance(v, dict | list))
    return None


def check_media(body: Any, policy: MediaPolicy) -> None:
    """Refuse media the server will not load and media outside user messages (``InputError``)."""
    for param, url in _media_urls(body):
        check_url(url, policy, param)
    where = _media_in_non_user_message(body)
    if where is not None:
        raise InputError(f"media parts are accepted in user messages only ({where})", "media_role", where)


# ------------------------------------------------------------------------------ vLLM's connector


async def _resolve_allowed(host: str, port: int, policy: MediaPolicy) -> None:
    """Raise ``ValueError`` unless every address ``host`` resolves to is allowed."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = {str(info[4][0]) for info in infos}
    refused = sorted(a for a in addresses if not policy.address_allowed(a))
    if not addresses or refused:
        raise ValueError(f"{host} resolves to addresses that are not allowed: {refused[:4]}")


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("no host")
    return parts.hostname, parts.port or (443 if parts.scheme.lower() == "https" else 80)


def install_connector_guard(policy: MediaPolicy) -> None:
    """Make vLLM's media connector (this process) follow ``policy``; every refusal is a 400."""
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal.media.connector import MediaConnector

    original = getattr(MediaConnector, "_halluguard_original", None)
    if original is None:
        original = MediaConnector._halluguard_original = (
            MediaConnector.load_from_url,
            MediaConnector.load_from_url_async,
        )
    load_sync, load_async = original

    def refuse(url: str, reason: Exception | str, message: str = FETCH_FAILED) -> VLLMValidationError:
        logger.info("halluguard: media URL %s refused: %s", cut(url[:300], 120), cut(str(reason)))
        return VLLMValidationError(message)

    def precheck(url: str) -> bool:
        """Form checks; True when the URL is fetched over the network."""
        try:
            check_url(url, policy)
        except MediaRefused as e:
            raise refuse(url, e, str(e)) from None
        return url[:5].lower() != "data:" and urlsplit(url[:2048]).scheme.lower() in ("http", "https")

    @functools.wraps(load_sync)
    def load_from_url(self: Any, url: str, media_io: Any, *, fetch_timeout: int | None = None) -> Any:
        if precheck(url):  # the server loads asynchronously; the sync path gets the same rules
            try:
                host, port = _host_port(url)
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                bad = [i[4][0] for i in infos if not policy.address_allowed(str(i[4][0]))]
                if not infos or bad:
                    raise ValueError(f"{host} resolves to addresses that are not allowed: {bad[:4]}")
                timeout = int(min(fetch_timeout or policy.timeout_s, policy.timeout_s)) or 1
                return load_sync(self, url, media_io, fetch_timeout=timeout)
            except Exception as e:  # one 400 shape whatever went wrong remotely
                raise refuse(url, e) from e
        try:
            return load_sync(self, url, media_io, fetch_timeout=fetch_timeout)
        except VLLMValidationError:
            raise
        except Exception as e:  # a bad inline or local file is the client's
            raise refuse(url, e, _load_failed(url)) from e

    @functools.wraps(load_async)
    async def load_from_url_async(
        self: Any, url: str, media_io: Any, *, fetch_timeout: int | None = None
    ) -> Any:
        if precheck(url):
            try:
                async with asyncio.timeout(policy.timeout_s):
                    await _resolve_allowed(*_host_port(url), policy)
                    return await load_async(self, url, media_io, fetch_timeout=fetch_timeout)
            except Exception as e:  # one 400 shape whatever went wrong remotely
                raise refuse(url, e) from e
        try:
            return await load_async(self, url, media_io, fetch_timeout=fetch_timeout)
        except VLLMValidationError:
            raise
        except Exception as e:  # a bad inline or local file is the client's
            raise refuse(url, e, _load_failed(url)) from e

    MediaConnector.load_from_url = load_from_url
    MediaConnector.load_from_url_async = load_from_url_async


def _load_failed(url: str) -> str:
    if url[:5].lower() == "data:":
        return "could not decode the image/media of the data: URL"
    return "could not load the local image/media file"

"""What a client may make the server do: keyed routes, strict JSON bodies and media URLs.

* **Auth**: with an API key (``--api-key`` / ``VLLM_API_KEY``) every route needs it, whatever the
  method, except :data:`OPEN_PATHS` (health, readiness, version; ``/metrics`` unless
  ``--metrics-require-key``) and real CORS preflights.
* **Bodies**: JSON is parsed with a nesting limit, without ``NaN``/``Infinity`` (nor numbers that
  overflow to them), without lone surrogates; a violation, or any other ``ValueError`` of the parser,
  is a 400, never a ``RecursionError`` or a traceback.
* **Media**: only inline base64 ``data:`` URLs unless the operator enables fetching
  (``--allow-media-fetch`` or vLLM's ``--allowed-media-domains``); then the URL must read the same to
  urllib3, yarl and ``urllib.parse`` (:func:`fetch_target`), every address a host resolves to must be
  public (or inside ``--media-fetch-allow-net``; IPv6 forms embedding IPv4 are judged by that IPv4),
  the socket connects only to a checked address (:func:`pinned_connection`), redirects are off, the
  fetch has one time cap and every remote failure is the same 400. ``file:`` URLs need vLLM's
  ``--allowed-local-media-path``.
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
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vllm_halluguard.methods import cut
from vllm_halluguard.server.inputs import InputError, objects, part_type

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
    """Parse a request body strictly; ``InputError`` (a 400) for non-finite numbers, deep nesting,
    lone surrogates (``"\\ud800"``: no UTF-8 form) and any other value Python refuses (e.g. an
    integer over 4,300 digits).

    Malformed JSON raises ``json.JSONDecodeError`` / ``UnicodeDecodeError`` as usual (vLLM answers it).
    """
    try:
        value = json.loads(raw, parse_constant=_constant, parse_float=_finite)
    except _NonFinite as e:
        raise InputError(f"invalid JSON body: {e}", "non_finite", None) from e
    except RecursionError as e:
        raise InputError(f"JSON body nested deeper than {MAX_DEPTH} levels", "too_deep", None) from e
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as e:  # int(...) over sys.get_int_max_str_digits(), and the like
        raise InputError(f"invalid JSON body: {cut(str(e), 120)}", "invalid_value", None) from e
    deepest, lone = scan(value)
    if deepest > MAX_DEPTH:
        raise InputError(f"JSON body nested deeper than {MAX_DEPTH} levels", "too_deep", None)
    if lone:
        raise InputError(
            "invalid JSON body: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without "
            "its pair), which has no UTF-8 form",
            "lone_surrogate",
            None,
        )
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def scan(value: Any) -> tuple[int, bool]:
    """``(nesting depth, whether any string or key holds a lone surrogate)`` of a parsed JSON value
    (iterative: no recursion limit)."""
    deepest, lone, stack = 0, False, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            lone = lone or _SURROGATE.search(item) is not None
            continue
        if isinstance(item, dict):
            lone = lone or any(_SURROGATE.search(k) is not None for k in item)
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item if isinstance(child, dict | list | str))
    return deepest, lone


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value."""
    return scan(value)[0]


def loggable(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters with control characters and lone surrogates escaped, so that
    a client's value can neither break a log line nor forge one."""
    return repr(cut(text[: limit + 1], limit))[1:-1]


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
        """Whether a connection to ``address`` is allowed: inside ``allow_nets``, or public. An IPv6
        address that embeds IPv4 addresses (:func:`embedded_ipv4`) needs each of them allowed too."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow_nets):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            inner = embedded_ipv4(ip)
            if inner is None or not all(self.address_allowed(str(v4)) for v4 in inner):
                return False
        return ip.is_global and not ip.is_multicast


#: IPv6 ranges whose addresses carry an IPv4 address in their last 32 bits: IPv4-compatible (::/96),
#: IPv4-translated (::ffff:0:0:0/96) and NAT64 (64:ff9b::/96); IPv4-mapped (::ffff:0:0/96) is read as IPv4.
_V4_IN_LOW_BITS = tuple(ipaddress.IPv6Network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96"))
#: NAT64 for local use (RFC 8215): the IPv4 address may sit at several offsets; refused as a whole.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...] | None:
    """IPv4 addresses a packet to ``ip`` may reach through a translator or tunnel (``()``: none);
    ``None`` for a range where they cannot be told (local-use NAT64: refused)."""
    if ip in _LOCAL_NAT64:
        return None
    if any(ip in net for net in _V4_IN_LOW_BITS):
        return (ipaddress.IPv4Address(ip.packed[12:]),)
    if ip.sixtofour is not None:  # 2002::/16
        return (ip.sixtofour,)
    if ip.teredo is not None:  # 2001::/32: (server, client)
        return ip.teredo
    return ()


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
        try:
            fetch_target(url)
        except ValueError as e:
            raise MediaRefused(f"media URL not accepted: {e}", param) from None
        return
    if scheme == "file":
        if not policy.local_files:
            raise MediaRefused("file: URLs are not accepted by this server", param)
        return
    raise MediaRefused("a media URL must be a base64 data: URL", param)


def _media_urls(body: Any) -> Iterator[tuple[str, str]]:
    """``(param path, url)`` of every media URL anywhere in a request body."""
    for item, path in objects(body):
        for key, value in item.items():
            where = f"{path}.{key}" if path else str(key)
            if key in MEDIA_KEYS or (key == "url" and item.get("type") == "url"):
                if isinstance(value, str):
                    yield cut(where), value
                elif isinstance(value, dict) and isinstance(value.get("url"), str):
                    yield cut(f"{where}.url"), value["url"]


def _media_in_non_user_message(body: Any) -> str | None:
    """Param path of the first media part in a message whose role is not ``user``."""
    for item, path in objects(body):
        content = item.get("content")
        if "role" in item and item.get("role") != "user" and isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and (
                    part_type(part) in MEDIA_PART_TYPES or MEDIA_KEYS & part.keys()
                ):
                    return cut(f"{path}.content[{j}]".lstrip("."))
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


#: Longest fetched media URL accepted.
MAX_URL = 2048


def fetch_target(url: str) -> tuple[str, int]:
    """``(host, port)`` that vLLM's media connector connects to for an http(s) URL.

    vLLM parses the URL with urllib3's ``parse_url`` and hands the result's ``.url`` to aiohttp (yarl);
    the host is read with both, and with :func:`urllib.parse.urlsplit`. ``ValueError`` when they do not
    agree, and for forms that parsers are known to read differently: backslashes, user info (``@``),
    whitespace or control characters, non-ASCII characters, an over-long URL.
    """
    import yarl
    from urllib3.util import parse_url

    if len(url) > MAX_URL:
        raise ValueError(f"over {MAX_URL} characters")
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise ValueError("non-ASCII, whitespace or control characters (percent-encode them)")
    if "\\" in url:
        raise ValueError("backslashes are not accepted in media URLs")
    split = urlsplit(url)
    if "@" in split.netloc:
        raise ValueError("user info (user@host) is not accepted in media URLs")
    spec = parse_url(url)
    if spec.auth is not None:
        raise ValueError("user info (user@host) is not accepted in media URLs")
    fetched = yarl.URL(spec.url)
    default = 443 if split.scheme.lower() == "https" else 80
    hosts = {(h or "").strip("[]").lower() for h in (split.hostname, spec.host, fetched.host)}
    ports = {split.port or default, spec.port or default, fetched.port or default}
    host = hosts.pop()
    if hosts or len(ports) != 1 or not host:
        raise ValueError("the host cannot be read unambiguously")
    return host, ports.pop()


def _host_port(url: str) -> tuple[str, int]:
    return fetch_target(url)


def pinned_connection(policy: MediaPolicy) -> Any:
    """A vLLM ``HTTPConnection`` whose sockets connect only to addresses ``policy`` allows.

    The address is checked on the very socket aiohttp connects (its ``socket_factory`` gets the resolved
    address), so what was checked is what is connected to, whatever the DNS answers in between
    (rebinding) and whatever a URL parser made of the host. Used for the asynchronous fetch (the API
    server's path); the synchronous one (``requests``) is checked before the fetch only.
    """
    import aiohttp
    from vllm.connections import HTTPConnection

    def guarded_socket(addr_info: Any) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        if not policy.address_allowed(str(sockaddr[0])):
            raise OSError(f"connection to {sockaddr[0]} refused by the media policy")
        return socket.socket(family, type_, proto)

    class PinnedConnection(HTTPConnection):
        pinned_client: aiohttp.ClientSession | None = None

        async def get_async_client(self) -> aiohttp.ClientSession:
            if self.pinned_client is None or self.pinned_client.closed:
                connector = aiohttp.TCPConnector(socket_factory=guarded_socket, use_dns_cache=False)
                self.pinned_client = aiohttp.ClientSession(connector=connector, trust_env=True)
            return self.pinned_client

    return PinnedConnection()


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
    pinned = pinned_connection(policy)

    def refuse(url: str, reason: Exception | str, message: str = FETCH_FAILED) -> VLLMValidationError:
        logger.info("halluguard: media URL %s refused: %s", loggable(url, 120), loggable(str(reason)))
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
                    await _resolve_allowed(*_host_port(url), policy)  # fail fast; the pin decides
                    self.connection = pinned
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

"""The ``mitigation`` request field, ``/v1/mitigations`` and the halluguard metrics on a real server.

Against the session's keyed server (``keyed_server``, ``helpers.server.keyed_command``: ``halluguard-serve
--fixture llava`` in vLLM's normal multi-process layout with ``--api-key``, ``--default-mitigation
kvsmooth --mitigation-allow none,kvsmooth,farsight,scr``; shared with ``tests/test_server_security.py``);
every check runs against it with the real ``openai`` client or plain HTTP. A few pure unit tests of the
parsing come first.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from openai import OpenAI

import vllm_halluguard
from helpers.images import data_url
from helpers.server import KEYED_ALLOW, KEYED_API_KEY, KEYED_DEFAULT
from vllm_halluguard.engine.requests import ENGINE_METHODS, spec_of
from vllm_halluguard.methods import METHODS
from vllm_halluguard.server.cli import mitigation_env
from vllm_halluguard.server.mitigation import MitigationError, Policy, field_spec, parse_spec

MODEL = "tiny-llava"
HEADER = "x-halluguard-mitigation"
ALLOWED = KEYED_ALLOW
API_KEY = KEYED_API_KEY
assert KEYED_DEFAULT == "kvsmooth", "the default the checks below expect"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _post(url: str, **kwargs) -> requests.Response:
    return requests.post(url, headers=AUTH, **kwargs)


def _get(url: str, **kwargs) -> requests.Response:
    return requests.get(url, headers=AUTH, **kwargs)


# ------------------------------------------------------------------------------------ unit tests


def test_spec_of_decodes_json_object_text():
    spec = {"method": "kvsmooth", "window": 8}
    assert spec_of({"halluguard": json.dumps(spec)}) == spec
    assert spec_of({"halluguard": " " + json.dumps(spec)}) == spec
    # Unchanged behaviour for everything else.
    assert spec_of(None) is None
    assert spec_of({}) is None
    assert spec_of({"other": 1}) is None
    assert spec_of({"halluguard": "kvsmooth"}) == "kvsmooth"
    assert spec_of({"halluguard": spec}) == spec
    assert spec_of({"halluguard": "{not json"}) == "{not json"  # rejected later as an unknown method


def test_list_of_methods_is_one_method_none_or_a_composition():
    assert parse_spec(["farsight"]).name == "farsight"
    assert parse_spec([]) is None
    composed = parse_spec(["kvsmooth", {"method": "farsight"}])
    assert composed.name == "kvsmooth+farsight" == parse_spec(["farsight", "kvsmooth"]).name
    assert [m["method"] for m in json.loads(composed.canonical())] == ["kvsmooth", "farsight"]
    with pytest.raises(MitigationError, match="appears twice") as e:
        parse_spec(["kvsmooth", "kvsmooth"])
    assert e.value.reason == "invalid_spec"
    with pytest.raises(MitigationError, match="got int"):
        field_spec(3)


def test_server_settings_are_checked_before_vllm_starts():
    env, rest = mitigation_env(["--default-mitigation", '{"method":"farsight","mode":"C"}', "--port", "1"])
    assert rest == ["--port", "1"]
    assert Policy.from_env(env).default == {"method": "farsight", "mode": "C"}
    for bad in (
        ["--mitigation-allow", "kvsmooth,bogus"],
        ["--default-mitigation", "bogus"],
        ["--default-mitigation", "farsight", "--mitigation-allow", "none,kvsmooth"],
        ["--mitigation-allow", "kvsmooth"],  # plain requests would get 'none', which is not allowed
        ["--default-mitigation", "{bad json"],
    ):
        with pytest.raises(SystemExit):
            mitigation_env(bad)


# ------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def base(keyed_server) -> str:
    return keyed_server.url


@pytest.fixture(scope="module")
def client(base):
    return OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)


def _messages(seed: int) -> list[dict]:
    content = [
        {"type": "image_url", "image_url": {"url": data_url(seed)}},
        {"type": "text", "text": "Describe the image."},
    ]
    return [{"role": "user", "content": content}]


def _chat(client: OpenAI, mitigation, seed: int = 0, max_tokens: int = 8) -> tuple[str, list[float], str]:
    """(text, token log-probs, echoed header) of a greedy image chat; ``mitigation=...`` omits the field."""
    extra = {"ignore_eos": True} | ({} if mitigation is ... else {"mitigation": mitigation})
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=_messages(seed), max_tokens=max_tokens, temperature=0, logprobs=True,
        extra_body=extra,
    )  # fmt: skip
    reply = raw.parse()
    choice = reply.choices[0]
    assert reply.usage.completion_tokens == max_tokens
    return choice.message.content, [t.logprob for t in choice.logprobs.content], raw.headers[HEADER]


def _header_method(header: str) -> str:
    return "none" if header == "none" else json.loads(header)["method"]


@pytest.mark.server
@pytest.mark.parametrize("method", ["kvsmooth", "farsight", "scr"])
def test_image_chat_with_a_method_streaming_and_not(client, method):
    text, logprobs, header = _chat(client, method)
    assert text
    assert _header_method(header) == method
    cfg = json.loads(header)
    assert cfg["layers"], "the header carries the config resolved for the 4-layer model"
    if method == "farsight":
        assert cfg["mode"] == "C", "the engine's default mode"
    _, plain, _ = _chat(client, "none")
    assert logprobs != plain, f"{method} must change the model's log-probs (it reached the engine)"

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=_messages(0), max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "mitigation": method},
    )  # fmt: skip
    assert raw.headers[HEADER] == header
    chunks = list(raw.parse())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == 8


@pytest.mark.server
def test_completions_endpoint_and_spec_forms(client, base):
    def complete(mitigation):
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="hello there my friend", max_tokens=6, temperature=0, logprobs=1,
            extra_body={"ignore_eos": True, "mitigation": mitigation},
        )  # fmt: skip
        return raw.parse().choices[0].logprobs.token_logprobs, json.loads(raw.headers[HEADER])

    far, cfg = complete({"method": "farsight", "mode": "C", "sigma": 0.5})
    assert (cfg["method"], cfg["mode"], cfg["sigma"]) == ("farsight", "C", 0.5)
    assert complete(["farsight"])[1]["mode"] == "C", "a 1-element list is that method"
    assert complete({"method": "FarSight"})[1]["method"] == "farsight"
    kvs, cfg = complete({"method": "kvsmooth", "window": 4})
    assert cfg["window"] == 4
    assert far != kvs

    # The engine's own key still works and goes through the same checks.
    reply = _post(
        f"{base}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"halluguard": "farsight"}},
        timeout=60,
    )
    assert reply.status_code == 200 and json.loads(reply.headers[HEADER])["method"] == "farsight"


@pytest.mark.server
def test_server_default_applies_to_requests_without_the_field(client):
    text, logprobs, header = _chat(client, ...)
    explicit = _chat(client, "kvsmooth")
    assert _header_method(header) == "kvsmooth"
    assert (text, logprobs, header) == explicit
    _, _, header = _chat(client, "none")
    assert header == "none"


BAD = [
    ("bogus", "unknown method 'bogus'"),
    ({"method": "kvsmooth", "window": "x"}, "window: Input should be a valid integer"),
    ({"method": "kvsmooth", "clip": 3}, "clip: Input should be less than or equal to 1"),
    ({"method": "kvsmooth", "nope": 1}, "nope: Extra inputs are not permitted"),
    ({"method": "kvsmooth", "layers": [9]}, "layer indices [9] do not exist"),
    ([{"method": "farsight", "mode": "A"}, "kvsmooth"], "composes with no other method"),
    ([{"method": "kvsmooth", "head_reduce": "entropy_of_mean"}, "prunehal"], "not compose with prunehal"),
    (["kvsmooth", "none"], "'none' cannot be composed"),
    (["kvsmooth", "kvsmooth"], "appears twice"),
    (["kvsmooth", "prunehal"], "method 'prunehal' is not allowed on this server"),
    (["kvsmooth", {"method": "farsight", "layers": [9]}], "layer indices [9] do not exist"),
    ({"method": "farsight", "mode": "A"}, "farsight mode 'A'"),
    ("prunehal", "method 'prunehal' is not allowed on this server"),
    ({"window": 3}, "has no 'method' key"),
    (7, "got int"),
    *[
        (name, f"method {name!r} is not available in the engine yet")
        for name in sorted(set(METHODS) - ENGINE_METHODS)
        if name in ALLOWED
    ],
]


def _check_error(reply: requests.Response, needle: str) -> None:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "mitigation", 400)
    assert needle in error["message"], error["message"]


@pytest.mark.server
@pytest.mark.parametrize(("mitigation", "needle"), BAD, ids=[repr(b[0])[:40] for b in BAD])
def test_bad_mitigation_is_an_openai_400(base, client, mitigation, needle):
    for path, body in (
        ("/v1/chat/completions", {"messages": _messages(1)}),
        ("/v1/completions", {"prompt": "hello"}),
    ):
        payload = {"model": MODEL, "max_tokens": 2, "mitigation": mitigation, **body}
        _check_error(_post(f"{base}{path}", json=payload, timeout=60), needle)
        stream = _post(f"{base}{path}", json={**payload, "stream": True}, timeout=60)
        _check_error(stream, needle)
    with pytest.raises(openai.BadRequestError, match="invalid mitigation"):
        client.chat.completions.create(
            model=MODEL, messages=_messages(1), max_tokens=2, extra_body={"mitigation": mitigation}
        )


@pytest.mark.server
def test_concurrent_mixed_methods_equal_solo_and_ignore_bad_neighbours(client, base):
    specs = [
        "none",
        "kvsmooth",
        "farsight",
        {"method": "farsight", "mode": "C"},
        {"method": "kvsmooth", "window": 4},
        "scr",
    ]
    jobs = [(spec, seed) for seed in (0, 1) for spec in specs]
    solo = {i: _chat(client, spec, seed, max_tokens=12) for i, (spec, seed) in enumerate(jobs)}
    assert len({tuple(s[1]) for s in solo.values()}) > len(jobs) // 2, "methods/images must differ"

    def bad(k: int) -> int:
        mitigation, _ = BAD[k % len(BAD)]
        payload = {"model": MODEL, "messages": _messages(k % 2), "max_tokens": 2, "mitigation": mitigation}
        return _post(f"{base}/v1/chat/completions", json=payload, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        good = {i: pool.submit(_chat, client, spec, seed, 12) for i, (spec, seed) in enumerate(jobs)}
        bads = [pool.submit(bad, k) for k in range(len(BAD))]
        assert [f.result() for f in bads] == [400] * len(BAD)
        for i, future in good.items():
            text, logprobs, header = future.result()
            assert (text, header) == (solo[i][0], solo[i][2]), f"request {jobs[i]} differs from its solo run"
            assert logprobs == pytest.approx(solo[i][1], abs=1e-4), jobs[i]
    assert requests.get(f"{base}/health", timeout=5).status_code == 200


@pytest.mark.server
def test_mitigations_endpoint(base):
    reply = _get(f"{base}/v1/mitigations", timeout=10)
    assert reply.status_code == 200
    body = reply.json()
    assert (body["model_family"], body["num_layers"]) == ("llava", 4)
    assert body["version"]["vllm_halluguard"] == vllm_halluguard.__version__
    assert body["version"]["vllm"].startswith("0.32.")
    assert body["default"]["method"] == "kvsmooth"
    pairs = body["composition"]["supported"]
    assert len(pairs) == 6 and "kvsmooth+farsight" in pairs and "scr+prunehal" in pairs
    assert all(len(set(p.split("+")) & set(METHODS)) == 2 for p in pairs)
    rows = {row["method"]: row for row in body["data"]}
    assert set(rows) == set(METHODS)
    for name, row in rows.items():
        assert row["engine_supported"] == (name in ENGINE_METHODS)
        assert row["allowed"] == (name in ALLOWED)
        assert row["description"] and "\n" not in row["description"]
        assert row["schema"] == METHODS[name].model_json_schema()
        assert row["defaults"]["method"] == name
    assert rows["farsight"]["defaults"]["mode"] == "C"
    assert rows["kvsmooth"]["defaults"] == body["default"]


def _metrics(base: str) -> dict[str, float]:
    values = {}
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("halluguard_"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


@pytest.mark.server
def test_metrics_move(client, base):
    before = _metrics(base)
    _chat(client, "farsight", max_tokens=5)
    _post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "mitigation": "bogus"}, timeout=30)
    after = _metrics(base)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('halluguard_requests_total{method="farsight"}') == 1
    assert delta('halluguard_request_errors_total{reason="unknown_method"}') == 1
    assert delta('halluguard_request_latency_seconds_count{method="farsight"}') == 1
    assert delta('halluguard_request_latency_seconds_sum{method="farsight"}') > 0
    assert delta('halluguard_generated_tokens_total{method="farsight"}') == 5
    # read from the engine's worker process at each scrape (server/engine_stats.py)
    assert delta("halluguard_engine_admitted_requests") == 1
    assert after["halluguard_prunehal_freed_blocks"] == 0  # no PruneHal on this server
    # every engine method's counters and gauges are there (server/engine_stats.py derives them)
    from vllm_halluguard.server.engine_stats import NAMES, engine_keys

    shown = {key: NAMES.get(key, f"halluguard_{key}") for key in engine_keys()}
    assert {"scr_edits", "farsight_native_rows", "prunehal_reclaimable_blocks"} <= set(shown)
    assert all(metric in after for metric in shown.values()), sorted(set(shown.values()) - set(after))


@pytest.mark.server
def test_composition_is_served_echoed_and_labelled(client, base):
    before = _metrics(base)
    text, logprobs, header = _chat(client, [{"method": "farsight", "mode": "B"}, "kvsmooth"], max_tokens=6)
    after = _metrics(base)
    members = json.loads(header)
    assert [m["method"] for m in members] == ["kvsmooth", "farsight"], "the canonical order"
    assert members[1]["mode"] == "B" and all(m["layers"] for m in members), "resolved for the model"
    label = 'halluguard_requests_total{method="kvsmooth+farsight"}'
    assert after.get(label, 0.0) - before.get(label, 0.0) == 1
    # the same composition written the other way round is the same request
    again = _chat(client, ["kvsmooth", {"method": "farsight", "mode": "B"}], max_tokens=6)
    assert again[0] == text and again[2] == header
    assert again[1] == pytest.approx(logprobs, abs=1e-5)
    members = ("kvsmooth", {"method": "farsight", "mode": "B"})
    parts = [_chat(client, spec, max_tokens=6)[1] for spec in members]
    assert all(p != logprobs for p in parts), "both members act"


def _fuzz_values(n: int, seed: int = 0) -> list:
    """Random (seeded) field values: names, objects with real and made-up keys, odd JSON types."""
    import random

    rng = random.Random(seed)
    atoms = [None, True, -1, 0, 1, 2.5, 1e308, -1e-9, "", "x", "1:3", [], [1, "a"], {"a": 1}, "Infinity"]
    names = [*METHODS, "none", "NONE", " kvsmooth ", "bogus", "", 3, None]
    keys = sorted({k for cls in METHODS.values() for k in cls.model_fields} | {"method", "extra"})
    values = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.2:
            values.append(rng.choice(names))
        elif kind < 0.3:
            values.append(rng.choice(atoms))
        else:
            obj = {"method": rng.choice(names)} if rng.random() < 0.9 else {}
            for key in rng.sample(keys, rng.randint(0, 3)):
                obj[key] = rng.choice(atoms)
            values.append([obj] * rng.randint(1, 2) if rng.random() < 0.1 else obj)
    return values


@pytest.mark.server
def test_fuzzed_mitigation_values_never_give_5xx(base):
    statuses = {}
    for value in _fuzz_values(60):
        payload = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "mitigation": value}
        reply = _post(f"{base}/v1/completions", json=payload, timeout=60)
        assert reply.status_code in (200, 400), (value, reply.status_code, reply.text)
        if reply.status_code == 400:
            assert reply.json()["error"]["message"], value
        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
    assert statuses.get(200) and statuses.get(400), statuses
    assert requests.get(f"{base}/health", timeout=5).status_code == 200


@pytest.mark.server
def test_api_key_is_checked_before_the_mitigation(base):
    payload = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "mitigation": "bogus"}
    assert requests.post(f"{base}/v1/completions", json=payload, timeout=30).status_code == 401
    assert requests.get(f"{base}/v1/mitigations", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert requests.post(f"{base}/v1/completions", json=payload, headers=wrong, timeout=30).status_code == 401
    assert _post(f"{base}/v1/completions", json=payload, timeout=30).status_code == 400


BAD_INPUTS = {
    "corrupt image": (
        [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAbm90IGFuIGltYWdl"}}],
        {},
        "image",
    ),
    "more images than allowed": ("two images", {}, "at most 1 image"),
    "absurd max_tokens": ("one image", {"max_tokens": 10**9}, "max_tokens"),
}


@pytest.mark.server
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_request_inputs_are_openai_400s_and_the_server_keeps_serving(base, client, case):
    """vLLM's own validation answers these (our layer passes them through untouched)."""
    images, extra, needle = BAD_INPUTS[case]
    if images == "two images":
        images = [{"type": "image_url", "image_url": {"url": data_url(s)}} for s in (1, 2)]
    elif images == "one image":
        images = [{"type": "image_url", "image_url": {"url": data_url(1)}}]
    body = {
        "model": MODEL,
        "max_tokens": 4,
        "mitigation": "kvsmooth",
        "messages": [{"role": "user", "content": [*images, {"type": "text", "text": "Describe."}]}],
        **extra,
    }
    r = requests.post(
        f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and needle.lower() in err["message"].lower(), err
    text, _, header = _chat(client, "kvsmooth")
    assert text and "kvsmooth" in header

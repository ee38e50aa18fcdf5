"""The load generator (``halluguard-loadtest``): pure unit tests, then one run against the real tiny server.

The end-to-end test starts ``halluguard-serve --fixture llava`` once (module scope) and runs the CLI as a
subprocess with a small plan (none + kvsmooth + a 50/50 mix, concurrency 1 and 4, 4 requests each, 8
output tokens), then checks the report it wrote.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import httpx
import pytest

import vllm_halluguard
from helpers.server import ROOT, free_port
from vllm_halluguard.loadtest import cli, report, workload
from vllm_halluguard.loadtest.client import (
    RemoteTargetError,
    RequestRecord,
    check_target,
    is_loopback_host,
    send,
)
from vllm_halluguard.loadtest.runner import Runner, Totals, count_reclaim, parse_counters
from vllm_halluguard.loadtest.stats import (
    MIN_BASELINE_MS,
    Slo,
    dist,
    mean_ci,
    percentile,
    ratio,
    ratios,
    summarize,
)

# ------------------------------------------------------------------------------------------ stats


def test_percentile_interpolates_between_closest_ranks():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)  # rank 1.5
    assert percentile(xs, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(xs, 99) == pytest.approx(3.97)  # rank 2.97
    assert percentile([10.0, 20.0, 30.0, 40.0, 50.0], 25) == pytest.approx(20.0)  # rank exactly 1
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_dist_reports_milliseconds():
    d = dist([0.001, 0.002, 0.003])
    assert d is not None
    assert (d.n, d.min, d.max) == (3, pytest.approx(1.0), pytest.approx(3.0))
    assert d.mean == pytest.approx(2.0)
    assert d.p50 == pytest.approx(2.0)
    assert d.p90 == pytest.approx(2.8)  # rank 1.8
    assert dist([]) is None


def test_mean_ci_uses_student_t():
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sample sd 1, t(2 df) = 4.303
    assert ci.mean == pytest.approx(2.0)
    assert ci.ci95 == pytest.approx(4.303 / math.sqrt(3))
    assert mean_ci([5.0]).ci95 == 0.0


def _rec(mitigation: str, ok: bool = True, ttft: float = 0.1, e2e: float = 0.8, tokens: int = 8, **kw):
    if not ok:
        return RequestRecord(mitigation=mitigation, ok=False, start=0.0, error=kw.get("error", "http_500"))
    chunk_tokens = kw.get("chunk_tokens", [1] * tokens)
    itl = [(e2e - ttft) / (len(chunk_tokens) - 1)] * (len(chunk_tokens) - 1)
    return RequestRecord(
        mitigation=mitigation, ok=True, start=0.0, ttft=ttft, e2e=e2e, itl=itl, output_tokens=tokens,
        chunk_tokens=chunk_tokens,
    )  # fmt: skip


def test_summarize_counts_errors_tpot_and_throughput():
    rep1 = [_rec("none"), _rec("none", ttft=0.3, e2e=1.0), _rec("none", ok=False, error="timeout")]
    rep2 = [_rec("none", tokens=4, e2e=0.4), _rec("none", ok=False, error="http_400")]
    s = summarize([(rep1, 2.0), (rep2, 1.0)], expected_tokens=8)
    assert (s.requests, s.ok) == (5, 3)
    assert s.errors == {"http_400": 1, "timeout": 1}
    assert s.output_len_mismatch == 1
    assert s.tpot.n == 3
    assert s.tpot.min == pytest.approx(100.0)  # (0.4 - 0.1) / 3 s
    assert s.ttft.max == pytest.approx(300.0)
    assert s.itl.n == 7 + 7 + 3
    assert s.output_tokens == 20
    assert (s.chunks, s.merged_chunks) == (8 + 8 + 4, 0)
    # Per repeat: 16 tok / 2 s and 4 tok / 1 s; 2 req / 2 s and 1 req / 1 s.
    assert s.output_throughput.values == [8.0, 4.0]
    assert s.request_throughput.mean == pytest.approx(1.0)
    assert s.goodput is None
    slo = summarize([(rep1, 2.0)], expected_tokens=8, slo=Slo(ttft=200))
    assert slo.goodput.values == [0.5]  # one of the two successes meets TTFT <= 200 ms


def test_summarize_counts_merged_chunks():
    merged = _rec("none", chunk_tokens=[1, 3, 1, 3])  # 8 tokens in 4 chunks, two of them merged
    s = summarize([([merged, _rec("none")], 1.0)], expected_tokens=8)
    assert (s.chunks, s.merged_chunks, s.itl.n, s.output_tokens) == (4 + 8, 2, 3 + 7, 16)
    assert s.tpot.n == 2 and s.output_len_mismatch == 0


def test_ratio_logic():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
    base = summarize([([_rec("none"), _rec("none", e2e=1.2)], 1.0)], 8)
    slow = summarize([([_rec("k", ttft=0.2, e2e=1.6), _rec("k", ttft=0.2, e2e=2.4)], 2.0)], 8)
    self_r = ratios(base, base)
    assert self_r and all(v == 1.0 for v in self_r.values())
    r = ratios(slow, base)
    assert r["ttft_p50"] == pytest.approx(2.0)
    assert r["e2e_mean"] == pytest.approx(2.0)
    assert r["output_throughput"] == pytest.approx(0.5)
    assert r["request_throughput"] == pytest.approx(0.5)
    part = ratios(slow, base, throughput=False)
    assert part["output_throughput"] is None and part["e2e_p50"] == pytest.approx(2.0)
    # A baseline whose tokens all arrived together (TPOT/ITL ~0) gives no ratio, and the report says so.
    burst = summarize([([_rec("none", e2e=0.1 + 1e-6), _rec("none", e2e=0.1 + 2e-6)], 1.0)], 8)
    assert burst.tpot.p50 < MIN_BASELINE_MS
    r = ratios(slow, burst)
    assert r["tpot_p50"] is None and r["ttft_p50"] is not None


# --------------------------------------------------------------------------------------- workload


def test_parse_mix_normalises_and_rejects_bad_input():
    assert workload.parse_mix("kvsmooth=0.5,none=0.5") == {"kvsmooth": 0.5, "none": 0.5}
    assert workload.parse_mix(" kvsmooth=3 , none=1 ") == {"kvsmooth": 0.75, "none": 0.25}
    assert workload.parse_mix("farsight=1,none=0") == {"farsight": 1.0}
    for bad in ("kvsmooth", "kvsmooth=x", "=1", "a=1,a=2", "a=-1,b=2", "a=0,b=0", "a=inf", "a=nan"):
        with pytest.raises(ValueError):
            workload.parse_mix(bad)


def test_assign_hits_the_proportions_exactly_and_is_seeded():
    names = workload.assign({"kvsmooth": 0.5, "none": 0.5}, 10, seed=3)
    assert sorted(names) == ["kvsmooth"] * 5 + ["none"] * 5
    assert names == workload.assign({"kvsmooth": 0.5, "none": 0.5}, 10, seed=3)
    third = workload.assign({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 4, seed=0)
    assert len(third) == 4 and {third.count(k) for k in "abc"} == {1, 2}


def test_poisson_arrivals_are_seeded():
    a = workload.arrival_offsets(2000, 4.0, seed=1)
    assert a == workload.arrival_offsets(2000, 4.0, seed=1)
    assert a != workload.arrival_offsets(2000, 4.0, seed=2)
    assert a[0] == 0.0 and a == sorted(a)
    assert a[-1] / 1999 == pytest.approx(0.25, rel=0.1)  # mean gap 1 / rate
    assert workload.arrival_offsets(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_images_are_deterministic_and_sized():
    assert workload.data_url(workload.make_image(5, 40, 30)) == workload.data_url(
        workload.make_image(5, 40, 30)
    )
    assert workload.make_image(5, 40, 30).size == (40, 30)
    pool = workload.image_pool(3, [(16, 16), (24, 8)], seed=0)
    assert len(set(pool)) == 3 and all(u.startswith("data:image/png;base64,") for u in pool)
    assert workload.parse_size("336") == (336, 336)
    assert workload.parse_size("640x480") == (640, 480)
    for bad in ("0", "ax3", "1x2x3", "100000x100000"):
        with pytest.raises(ValueError):
            workload.parse_size(bad)


def test_chat_body_fixes_the_output_length():
    body = workload.chat_body("m", "data:,", "hi", 16, "kvsmooth")
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (16, 16, True)
    assert body["stream"]
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert body["mitigation"] == "kvsmooth"
    assert "mitigation" not in workload.chat_body("m", "data:,", "hi", 16, None)


def test_scenarios_always_start_with_none():
    s = cli.scenarios(["kvsmooth,farsight", "kvsmooth"], [{"kvsmooth": 0.5, "none": 0.5}])
    assert [x.name for x in s] == ["none", "kvsmooth", "farsight", "mix(kvsmooth=0.5,none=0.5)"]
    assert [x.name for x in cli.scenarios([], [])] == ["none"]


# ------------------------------------------------------------- client and runner on a fake server

ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}


def _tok(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def _sse(*events: dict, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def _send(handler, timeout: float = 5.0) -> RequestRecord:
    async def go() -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            body = workload.chat_body("m", "data:,", "hi", 3, "kvsmooth")
            return await send(c, "http://127.0.0.1/v1/chat/completions", body, "kvsmooth", timeout)

    return asyncio.run(go())


def test_send_times_one_chunk_per_token_even_when_its_text_is_empty():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=_sse(ROLE, _tok("a"), _tok(""), _tok("b"), USAGE))

    rec = _send(handler)
    assert seen[0]["mitigation"] == "kvsmooth" and seen[0]["stream"] is True
    assert rec.ok and rec.error is None
    assert (rec.output_tokens, rec.prompt_tokens, rec.chunks, len(rec.itl)) == (3, 5, 3, 2)
    assert 0 < rec.ttft <= rec.e2e
    assert rec.tpot == pytest.approx((rec.e2e - rec.ttft) / 2)


def test_send_counts_the_tokens_of_merged_chunks():
    def usage(n: int) -> dict:
        return {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}

    def handler(request: httpx.Request) -> httpx.Response:
        # continuous_usage_stats: every chunk carries the running count; the second merges 3 deltas.
        events = [ROLE, _tok("a"), _tok("bcd")]
        events = [e | {"usage": usage(n)} for e, n in zip(events, (0, 1, 4), strict=True)]
        return httpx.Response(200, content=_sse(*events, {"choices": [], "usage": usage(4)}))

    rec = _send(handler)
    assert rec.ok and (rec.chunk_tokens, rec.chunks, len(rec.itl), rec.output_tokens) == ([1, 3], 2, 1, 4)
    assert rec.tpot == pytest.approx((rec.e2e - rec.ttft) / 3)


def test_send_classifies_failures():
    def raises(request):
        raise httpx.ConnectError("refused", request=request)

    async def slow(request):
        await asyncio.sleep(2)
        return httpx.Response(200, content=_sse(ROLE, _tok("a"), USAGE))

    cases = {
        "http_500": lambda r: httpx.Response(500, json={"error": {"message": "boom"}}),
        "incomplete_stream": lambda r: httpx.Response(200, content=_sse(ROLE, _tok("a"), done=False)),
        "stream_error": lambda r: httpx.Response(200, content=_sse(ROLE, {"error": {"message": "x"}})),
        "no_output": lambda r: httpx.Response(200, content=_sse(ROLE, USAGE)),
        "bad_event": lambda r: httpx.Response(200, content=b"data: {not json\n\n"),
        "connect": raises,
    }
    for kind, handler in cases.items():
        rec = _send(handler)
        assert (rec.ok, rec.error) == (False, kind), rec
        assert rec.tpot is None
    assert "boom" in _send(cases["http_500"]).detail
    assert _send(slow, timeout=0.2).error == "timeout"


def test_runner_stops_at_the_time_limit_and_counts_what_it_sent():
    async def slow(request):
        await asyncio.sleep(0.3)
        return httpx.Response(200, content=_sse(ROLE, _tok("a"), _tok("b"), _tok("c"), USAGE))

    args = cli.build_parser().parse_args(
        ["--mitigation", "kvsmooth", "--concurrency", "1", "--requests", "4", "--repeats", "1",
         "--warmup", "0", "--max-tokens", "3", "--image-size", "8", "--images", "1", "--max-duration", "0.45"]
    )  # fmt: skip
    cfg = cli.config_from_args(args, "m")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as c:
            return await Runner(cfg, c).run()

    points, totals = asyncio.run(go())
    assert totals.truncated
    assert 1 <= totals.sent < cfg.planned_requests() == 8
    assert totals.ok + sum(totals.errors.values()) == totals.sent
    assert totals.errors.get("aborted_at_time_limit", 0) >= 1
    assert sum(g.summary.requests for g in points[0].groups) == totals.sent


def test_rate_mode_caps_in_flight_requests_and_mixes_per_request():
    in_flight, peak, methods = 0, 0, []

    async def handler(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        methods.append(json.loads(request.content)["mitigation"])
        await asyncio.sleep(0.05)
        in_flight -= 1
        return httpx.Response(200, content=_sse(ROLE, _tok("a"), _tok("b"), _tok("c"), USAGE))

    args = cli.build_parser().parse_args(
        ["--mix", "kvsmooth=0.5,none=0.5", "--rate", "inf,50", "--max-concurrency", "2", "--requests", "6",
         "--repeats", "2", "--warmup", "0", "--max-tokens", "3", "--image-size", "8", "--images", "2"]
    )  # fmt: skip
    cfg = cli.config_from_args(args, "m")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await Runner(cfg, c).run()

    points, totals = asyncio.run(go())
    assert (totals.sent, totals.ok, totals.truncated) == (48, 48, False)  # 2 scenarios x 2 rates x 2 x 6
    assert peak == 2
    assert methods.count("kvsmooth") == 12 and methods.count("none") == 36
    assert [p.label for p in points] == ["rate=inf (max 2)", "rate=50/s (max 2)"]
    mix = {g.mitigation: g for g in points[1].groups if g.scenario.startswith("mix")}
    assert (mix["all"].summary.requests, mix["kvsmooth"].summary.requests) == (12, 6)
    assert mix["all"].ratios_vs_none["output_throughput"] is not None
    assert mix["none"].ratios_vs_none["output_throughput"] is None


# ---------------------------------------------------------------------------------- target guard


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"])
def test_loopback_targets_are_allowed(host):
    assert is_loopback_host(host)
    url_host = host if host.startswith("[") or ":" not in host else f"[{host}]"
    check_target(f"http://{url_host}:8000", allow_remote=False)


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "10.0.0.1", "192.168.1.10", "0.0.0.0", "[2001:db8::1]", "no.such.invalid"]
)
def test_remote_targets_are_refused(host):
    with pytest.raises(RemoteTargetError):
        check_target(f"http://{host}:8000", allow_remote=False)
    check_target(f"http://{host}:8000", allow_remote=True)  # the explicit opt-in


def test_cli_refuses_remote_target_and_oversized_plans(tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["--base-url", "http://10.1.2.3:8000", "--model", "m", "--out", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["--base-url", "ftp://127.0.0.1", "--model", "m", "--out", str(tmp_path)])
    assert e.value.code == 2
    # 1 scenario x 2 load points x 3 repeats x 16 requests + 2 warm-up = 98 > 50: refused before sending.
    port = free_port()
    argv = ["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--max-requests", "50"]
    with pytest.raises(SystemExit, match="98 requests"):
        cli.main([*argv, "--out", str(tmp_path), "--no-progress"])
    assert not list(tmp_path.iterdir())


def test_help_gives_each_default_once():
    text = cli.build_parser().format_help().replace("\n                        ", " ")  # joined wraps
    assert "(default: None)" not in text and "(default: [])" not in text
    for line in text.splitlines():
        assert line.count("default") <= 1, line
    assert "(default: 16)" in text, "a plain default is still shown"


def test_cli_names_what_is_wrong_before_sending(tmp_path):
    """A base URL with /v1 is the server root; no server, or a method the server does not offer,
    stops the run up front with a message that says so."""
    assert cli.server_root("http://127.0.0.1:8000/v1/") == cli.server_root("http://127.0.0.1:8000")
    assert cli.server_root("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    port = free_port()
    with pytest.raises(SystemExit, match=f"no server answered at http://127.0.0.1:{port} "):
        cli.main(["--base-url", f"http://127.0.0.1:{port}/v1", "--out", str(tmp_path), "--no-progress"])
    args = cli.build_parser().parse_args(["--mitigation", "kvsmooth,bogus", "--mix", "farsight=0.5,none=0.5"])
    cfg = cli.config_from_args(args, "m")
    listing = {"data": [{"method": "kvsmooth", "allowed": True}, {"method": "farsight", "allowed": False}]}
    assert cli.refused_methods(cfg, {"mitigations": listing}) == ["bogus", "farsight"]
    assert cli.refused_methods(cfg, {}) == [], "an older server without the listing is not second-guessed"


def test_reclaim_counters_are_read_from_metrics_and_reported():
    text = (
        "# HELP halluguard_prunehal_freed_blocks KV blocks ...\n"
        "# TYPE halluguard_prunehal_freed_blocks gauge\n"
        "halluguard_prunehal_freed_blocks 12.0\n"
        "halluguard_prunehal_freed_blocks_created 1.7e9\n"
        "halluguard_prunehal_reclaiming_requests 3.0\n"
        'halluguard_requests_total{method="prunehal"} 9.0\n'
    )
    assert parse_counters(text) == {"freed_kv_blocks": 12.0, "reclaiming_requests": 3.0}
    totals = Totals()
    count_reclaim(totals, {"freed_kv_blocks": 2.0, "reclaiming_requests": 1.0}, parse_counters(text))
    assert (totals.freed_kv_blocks, totals.reclaiming_requests) == (10.0, 2.0)
    assert "10 by 2 requests, 5.0 per request" in report._reclaim(totals)
    unread = Totals()
    count_reclaim(unread, {}, parse_counters(text))
    assert unread.freed_kv_blocks is None and "unknown" in report._reclaim(unread)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def server(plain_server):
    return plain_server.url


@pytest.fixture(scope="module")
def run(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest_out")
    cmd = [
        sys.executable, "-m", "vllm_halluguard.loadtest", "--base-url", f"{server}/v1/", "--mitigation",
        "kvsmooth",
        "--mix", "kvsmooth=0.5,none=0.5", "--concurrency", "1,4", "--requests", "4", "--repeats", "1",
        "--warmup", "1", "--max-tokens", "8", "--image-size", "64", "--image-size", "48x32",
        "--max-duration", "240", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.mark.server
def test_cli_run_counts_every_request(run):
    proc, out = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"config", "setup", "points", "totals"}
    assert report["config"]["model"] == "tiny-llava"
    assert [s["name"] for s in report["config"]["scenarios"]] == [
        "none",
        "kvsmooth",
        "mix(kvsmooth=0.5,none=0.5)",
    ]
    totals = report["totals"]
    # 3 scenarios x 2 concurrencies x 4 requests measured; 1 warm-up per method (none, kvsmooth).
    assert (totals["sent"], totals["warmup_sent"], totals["truncated"]) == (24, 2, False)
    assert totals["ok"] + sum(totals["errors"].values()) == totals["sent"]
    assert totals["freed_kv_blocks"] == 0 and totals["reclaiming_requests"] == 0  # read from /metrics
    assert [p["label"] for p in report["points"]] == ["concurrency=1", "concurrency=4"]
    counted = 0
    for point in report["points"]:
        groups = {(g["scenario"], g["mitigation"]): g for g in point["groups"]}
        assert set(groups) == {
            ("none", "none"), ("kvsmooth", "kvsmooth"), ("mix(kvsmooth=0.5,none=0.5)", "all"),
            ("mix(kvsmooth=0.5,none=0.5)", "kvsmooth"), ("mix(kvsmooth=0.5,none=0.5)", "none"),
        }  # fmt: skip
        for (scenario, method), g in groups.items():
            s = g["summary"]
            assert s["ok"] + sum(s["errors"].values()) == s["requests"]
            if method in ("all", scenario):
                counted += s["requests"]
                assert s["requests"] == 4
        assert groups[("mix(kvsmooth=0.5,none=0.5)", "none")]["summary"]["requests"] == 2
        for g in point["groups"]:
            s = g["summary"]
            assert s["errors"] == {}
            assert s["output_len_mismatch"] == 0, "ignore_eos + min_tokens fix the output length"
            assert s["output_tokens"] == 8 * s["ok"]
            for metric in ("ttft", "tpot", "itl", "e2e"):
                d = s[metric]
                assert 0 < d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
            # One gap per pair of consecutive chunks; vLLM may merge a lagging client's deltas.
            assert s["ok"] <= s["chunks"] <= 8 * s["ok"]
            assert s["itl"]["n"] == s["chunks"] - s["ok"]
            assert 0 <= s["merged_chunks"] <= s["chunks"]
            if s["merged_chunks"] == 0:
                assert s["chunks"] == 8 * s["ok"], "unmerged chunks carry one token each"
            assert s["ttft"]["p50"] < s["e2e"]["p50"]
        base = groups[("none", "none")]["summary"]
        # A ratio is withheld (None) exactly where the baseline is below MIN_BASELINE_MS: under load a
        # lagging client reads back-to-back chunks, so the baseline's ITL can be a few microseconds.
        tiny = {
            f"{m}_{stat}"
            for m in ("ttft", "tpot", "itl", "e2e")
            for stat in ("mean", "p50", "p90", "p99")
            if base[m][stat] <= MIN_BASELINE_MS
        }
        none_ratios = groups[("none", "none")]["ratios_vs_none"]
        assert none_ratios and {k for k, v in none_ratios.items() if v is None} == tiny
        assert all(v == 1.0 for v in none_ratios.values() if v is not None)
        kvs = groups[("kvsmooth", "kvsmooth")]["ratios_vs_none"]
        assert {k for k, v in kvs.items() if v is None} == tiny
        assert all(v > 0 for v in kvs.values() if v is not None)
        assert groups[("mix(kvsmooth=0.5,none=0.5)", "none")]["ratios_vs_none"]["output_throughput"] is None
    assert counted == totals["sent"]


@pytest.mark.server
def test_cli_run_writes_markdown_and_plots(run):
    proc, out = run
    md = (out / "report.md").read_text()
    assert "## concurrency=1" in md and "## concurrency=4" in md and "Overhead vs `none`" in md
    plugin = f"vllm-halluguard {vllm_halluguard.__version__}"
    assert f"{plugin}; load test {plugin};" in md, "the server's and the client's plugin versions"
    assert md in proc.stdout, "the CLI prints the same table"
    pytest.importorskip("matplotlib")
    for name in ("latency.png", "overhead.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000

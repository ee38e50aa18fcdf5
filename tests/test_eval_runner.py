"""The evaluation runner ``halluguard-eval``: sampling, resume, retries, report, and one real-server run.

The unit tests talk to a tiny ``http.server`` stub on 127.0.0.1 that answers ``/v1/models`` and
``/v1/chat/completions`` from a script (a status per request); expected metrics are computed by hand.
The end-to-end test runs the CLI against the real ``halluguard-serve --fixture llava`` (random
weights: it checks the plumbing, not the quality of the answers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

import vllm_halluguard
from helpers.server import free_port
from vllm_halluguard.eval.cli import main
from vllm_halluguard.eval.client import RetryPolicy, send
from vllm_halluguard.eval.dataset import sample_ids
from vllm_halluguard.eval.records import (
    Mitigation,
    Protocol,
    ProtocolMismatch,
    ResultRecord,
    WorkItem,
    load_results,
    merge_protocol,
    parse_mitigation,
)
from vllm_halluguard.eval.report import build_report, load_report, write_all
from vllm_halluguard.tiny_models import make_image

# ------------------------------------------------------------------------------------ helpers

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 2, "name": "bicycle"},
    {"id": 3, "name": "car"},
    {"id": 17, "name": "cat"},
    {"id": 18, "name": "dog"},
]
# image id -> category ids; every image has two objects and three absent ones.
OBJECTS = {11: [1, 2], 12: [3, 18], 13: [17, 18], 14: [1, 3]}


def make_coco(root: Path, size: int = 48) -> tuple[Path, Path]:
    """A COCO-format folder: ``root/images/*.png`` and ``root/instances.json``."""
    images = root / "images"
    images.mkdir(parents=True)
    entries, anns = [], []
    for image_id, cats in OBJECTS.items():
        name = f"{image_id:012d}.png"
        make_image(image_id, size).save(images / name)
        entries.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for c in cats:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [0, 0, 8, 8]})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": CATEGORIES}))
    return images, path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Stub:
    """A scripted OpenAI-compatible stub: ``script`` holds the status of each next chat request."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.reply = "Yes"
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                models = {
                    "object": "list",
                    "data": [{"id": "stub-model", "object": "model", "owned_by": "x"}],
                }
                self._send(200, models)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                    status = stub.script.pop(0) if stub.script else 200
                if status != 200:
                    self._send(status, {"error": {"message": f"scripted {status}", "code": status}})
                    return
                reply = {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": stub.reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
                }
                self._send(200, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    yield s
    s.close()


def _item(tmp_path: Path) -> WorkItem:
    path = tmp_path / "x.png"
    make_image(0, 32).save(path)
    return WorkItem(task="chair", item_id="1", image_id=1, image=str(path), prompt="Describe.", gt_objects=[])


def _send(url: str, item: WorkItem, retries: int = 2) -> ResultRecord:
    async def go() -> ResultRecord:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        try:
            policy = RetryPolicy(retries=retries, backoff_s=0.01, timeout_s=10)
            return await send(client, "stub-model", item, parse_mitigation("kvsmooth"), 8, policy)
        finally:
            await client.close()

    return asyncio.run(go())


# ------------------------------------------------------------------------------------ unit tests


def test_sampling_is_seeded_over_sorted_ids():
    ids = [9, 3, 7, 1, 5]
    # The documented rule: sort, then random.Random(seed).sample.
    assert sample_ids(ids, 3, seed=4) == random.Random(4).sample([1, 3, 5, 7, 9], 3)
    assert sample_ids(list(reversed(ids)), 3, seed=4) == sample_ids(ids, 3, seed=4)
    assert sample_ids(["2", 1, "10"], None, seed=0) == [1, 2, 10]  # digit strings are ids too
    draws = {tuple(sample_ids(range(100), 5, seed=s)) for s in range(5)}
    assert len(draws) == 5, "different seeds draw different samples"
    with pytest.raises(ValueError, match="only 5"):
        sample_ids(ids, 6, seed=0)


def test_parse_mitigation_forms():
    assert parse_mitigation("none") == Mitigation(label="none", spec="none")
    m = parse_mitigation('{"method": "farsight", "mode": "C"}')
    assert m.spec == {"method": "farsight", "mode": "C"}
    assert m.label == "farsight(mode=C)"
    m = parse_mitigation('fsC={"method": "farsight", "mode": "C"}')
    assert (m.label, m.spec) == ("fsC", {"method": "farsight", "mode": "C"})
    assert parse_mitigation("k=kvsmooth") == Mitigation(label="k", spec="kvsmooth")
    for bad in ('{"mode": "C"}', "{not json", "two words", "[]", '["kvsmooth", 3]'):
        with pytest.raises(ValueError):
            parse_mitigation(bad)


def test_retry_on_503_then_success(stub, tmp_path):
    stub.script = [503]
    rec = _send(stub.url, _item(tmp_path))
    assert rec.ok and rec.text == "Yes" and rec.attempts == 2
    assert len(stub.requests) == 2
    assert stub.requests[0]["mitigation"] == "kvsmooth"
    assert stub.requests[0]["temperature"] == 0
    assert stub.requests[0]["messages"][0]["content"][0]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )


def test_429_and_5xx_retried_until_the_limit(stub, tmp_path):
    stub.script = [429, 500, 502]
    rec = _send(stub.url, _item(tmp_path), retries=2)
    assert not rec.ok
    assert (rec.error, rec.retryable, rec.attempts) == ("http_502", True, 3)
    assert len(stub.requests) == 3


def test_4xx_is_recorded_not_retried(stub, tmp_path):
    stub.script = [400]
    rec = _send(stub.url, _item(tmp_path))
    assert not rec.ok
    assert (rec.error, rec.retryable, rec.attempts) == ("http_400", False, 1)
    assert "scripted 400" in rec.detail
    assert len(stub.requests) == 1


def test_connection_refused_is_retried_then_recorded(tmp_path):
    rec = _send(f"http://127.0.0.1:{free_port()}", _item(tmp_path), retries=1)
    assert (rec.ok, rec.error, rec.retryable, rec.attempts) == (False, "connect", True, 2)


def _record(**kw) -> str:
    base = {"task": "chair", "mitigation": "none", "spec": "none", "ok": True}
    return json.dumps(base | kw)


def test_resume_skips_done_keys_and_resends_transient_errors(stub, tmp_path):
    images, instances = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    out.mkdir()
    # Done before: (none, 11) ok; (none, 12) a 400 (permanent); (kvsmooth, 11) a connection error.
    lines = [
        _record(item_id="11", image_id=11, text="A person.", gt_objects=["bicycle", "person"]),
        _record(item_id="12", image_id=12, ok=False, error="http_400", retryable=False),
        _record(item_id="11", image_id=11, mitigation="kvsmooth", spec="kvsmooth", ok=False, error="connect",
                retryable=True),
    ]  # fmt: skip
    (out / "results.jsonl").write_text("\n".join(lines) + "\n" + '{"task": "chair", "mitig')  # a torn line
    args = ["chair", "--images", str(images), "--annotations", str(instances), "--out", str(out),
            "--base-url", stub.url, "--mitigation", "none", "--mitigation", "kvsmooth", "--no-progress",
            "--n-images", "3", "--seed", "1"]  # fmt: skip
    assert main(args) == 0
    sampled = random.Random(1).sample([11, 12, 13, 14], 3)
    assert sorted(sampled) == [11, 12, 13], "the documented rule: seeded sample of the sorted ids"
    # Sent: (none, 13) and kvsmooth for all three images (11 again: its error was transient).
    assert sorted(r["mitigation"] for r in stub.requests) == ["kvsmooth"] * 3 + ["none"]
    assert {r["model"] for r in stub.requests} == {"stub-model"}, "model taken from /v1/models"
    records = load_results(out / "results.jsonl")
    assert set(records) == {("chair", "", m, str(i)) for m in ("none", "kvsmooth") for i in (11, 12, 13)}
    assert records[("chair", "", "kvsmooth", "11")].ok, "the later line supersedes the connection error"
    assert not records[("chair", "", "none", "12")].ok

    n_lines = len((out / "results.jsonl").read_text().splitlines())
    assert main(args) == 0
    assert len(stub.requests) == 4, "a finished run sends nothing"
    assert len((out / "results.jsonl").read_text().splitlines()) == n_lines

    assert main([*args, "--retry-errors"]) == 0  # resends the permanent error too
    assert len(stub.requests) == 5
    assert stub.requests[-1]["mitigation"] == "none"
    assert load_results(out / "results.jsonl")[("chair", "", "none", "12")].ok

    # A changed protocol is refused instead of mixing results.
    assert main([*args[:-2], "--seed", "2"]) == 2


def test_pope_run_against_an_always_yes_stub(stub, tmp_path):
    images, instances = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    args = ["pope", "--images", str(images), "--annotations", str(instances), "--out", str(out),
            "--base-url", stub.url + "/v1", "--model", "m", "--split", "random", "--split", "adversarial",
            "--n-per-image", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    # 4 images x 2 splits x (2 yes + 2 no) questions, one mitigation (none).
    assert len(stub.requests) == 32
    assert {r["mitigation"] for r in stub.requests} == {"none"}
    assert all(r["model"] == "m" for r in stub.requests)
    texts = [r["messages"][0]["content"][1]["text"] for r in stub.requests]
    assert "Is there a person in the image? Answer yes or no." in texts
    report = json.loads((out / "report.json").read_text())
    for split in ("random", "adversarial"):
        (g,) = [g for g in report["groups"] if g["split"] == split]
        # Always "yes": TP = 8, FP = 8, TN = FN = 0.
        assert g["n_ok"] == 16
        assert g["metrics"] == pytest.approx(
            {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0}
        )
    assert report["protocols"]["pope"]["prompt"] == "{question} Answer yes or no."
    assert report["protocols"]["pope"]["n_items"] == 32


def test_none_is_sent_explicitly_unless_omitted(stub, tmp_path):
    images, instances = make_coco(tmp_path / "coco")
    args = ["chair", "--images", str(images), "--annotations", str(instances), "--base-url", stub.url,
            "--n-images", "1", "--no-progress", "--no-report", "--mitigation", "none"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--omit-none-field"]) == 0
    assert [r.get("mitigation", "<absent>") for r in stub.requests] == ["none", "<absent>"]
    assert stub.requests[0]["max_tokens"] == 512
    assert stub.requests[0]["messages"][0]["content"][1]["text"] == "Please describe this image in detail."
    assert not (tmp_path / "a" / "report.md").exists()


def test_protocol_merge_adds_mitigations_and_refuses_changes():
    kw = dict(task="chair", prompt="p", max_tokens=64, n_images=2, n_sampled_images=2, n_items=2, seed=0,
              model="m", images="i", annotations="a", base_url="u")  # fmt: skip
    old = Protocol(**kw, mitigations=[parse_mitigation("none")])
    new = Protocol(**kw | {"base_url": "v"}, mitigations=[parse_mitigation("kvsmooth")])
    assert [m.label for m in merge_protocol(old, new).mitigations] == ["none", "kvsmooth"]
    with pytest.raises(ProtocolMismatch, match="max_tokens"):
        merge_protocol(old, Protocol(**kw | {"max_tokens": 512}, mitigations=[]))
    with pytest.raises(ProtocolMismatch, match="label"):
        merge_protocol(old, Protocol(**kw, mitigations=[Mitigation(label="none", spec="kvsmooth")]))


def test_report_from_hand_written_results(tmp_path):
    def chair_rec(mitigation: str, image_id: int, gt: list[str], text: str | None, **kw) -> str:
        ok = text is not None
        tokens = 10 if ok else None
        return _record(mitigation=mitigation, spec=mitigation, item_id=str(image_id), image_id=image_id,
                       gt_objects=gt, text=text, ok=ok, completion_tokens=tokens, **kw)  # fmt: skip

    def pope_rec(mitigation: str, split: str, qid: int, label: str, answer: str) -> str:
        obj = "dog"
        q = {"question_id": qid, "image_id": 1, "image": None, "object": obj, "label": label,
             "text": f"Is there a {obj} in the image?", "split": split}  # fmt: skip
        rec = {"task": "pope", "split": split, "mitigation": mitigation, "spec": mitigation,
               "item_id": str(qid), "image_id": 1, "ok": True, "text": answer, "question": q}  # fmt: skip
        return json.dumps(rec)

    g1, g2, g3 = ["couch", "dog"], ["bicycle", "car", "person"], ["bicycle"]
    lines = [
        chair_rec("none", 1, g1, "A dog and a cat sit on a couch."),
        chair_rec("none", 2, g2, "A man stands next to a car.", finish_reason="length"),
        chair_rec("none", 3, g3, None, error="http_400", detail="not supported"),
        chair_rec("kvsmooth", 1, g1, "A dog on a couch."),
        chair_rec("kvsmooth", 2, g2, "Two people near a truck."),
        chair_rec("kvsmooth", 3, g3, None, error="connect", retryable=True),
        chair_rec("kvsmooth", 3, g3, "A bike."),  # the retry wins
        pope_rec("none", "random", 1, "yes", "Yes, there is."),
        pope_rec("none", "random", 2, "no", "No."),
        pope_rec("none", "random", 3, "yes", "No, there is not."),
        pope_rec("none", "random", 4, "no", "Yes"),
        pope_rec("none", "random", 5, "no", "There is no cat. Yes."),
        pope_rec("kvsmooth", "popular", 1, "yes", "Yes"),
        pope_rec("kvsmooth", "popular", 2, "no", "yes"),
    ]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    kw = dict(prompt="Describe.", max_tokens=64, n_images=4, n_sampled_images=4, n_items=4, seed=0, model="m",
              images="i", annotations="a", base_url="u")  # fmt: skip
    protocol = Protocol(
        task="chair", **kw, mitigations=[parse_mitigation("none"), parse_mitigation("kvsmooth")]
    )
    report = build_report(load_results(tmp_path / "results.jsonl").values(), {"chair": protocol})

    # none: 2 captions scored. Mentions dog, cat*, couch | person, car; GT 2 + 3 objects.
    none = report.group("chair", "none")
    assert (none.n_ok, none.n_errors, none.errors, none.n_missing) == (2, 1, {"http_400": 1}, 1)
    assert none.metrics == pytest.approx(
        {
            "chair_s": 1 / 2,
            "chair_i": 1 / 5,
            "recall": 4 / 5,
            "precision": 4 / 5,
            "f1": 4 / 5,
            "mean_length": 8.0,
        }
    )
    assert none.n_truncated == 1
    assert none.mean_completion_tokens == 10
    # kvsmooth: dog, couch | person, truck* | bicycle; GT 2 + 3 + 1 objects.
    kv = report.group("chair", "kvsmooth")
    assert (kv.n_ok, kv.n_errors, kv.n_missing) == (3, 0, 1)
    p, r = 4 / 5, 4 / 6
    assert kv.metrics == pytest.approx(
        {"chair_s": 1 / 3, "chair_i": 1 / 5, "recall": r, "precision": p, "f1": 2 * p * r / (p + r),
         "mean_length": 4.0}
    )  # fmt: skip
    # POPE none/random: TP 1, TN 2, FN 1, FP 1 ("There is no cat. Yes." is a no: text before the first ".").
    pr = report.group("pope", "none", "random")
    assert pr.metrics == pytest.approx(
        {"accuracy": 3 / 5, "precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "yes_ratio": 2 / 5}
    )
    pp = report.group("pope", "kvsmooth", "popular")
    assert pp.metrics == pytest.approx(
        {"accuracy": 1 / 2, "precision": 1 / 2, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0}
    )
    assert [m.label for m in report.mitigations] == ["none", "kvsmooth"]

    paths = write_all(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| none | 2 | 50.0 | 20.0 | 80.0 | 80.0 | 80.0 | 8.0 | 10.0 | 1 | http_400: 1 (+1 not run) |" in md
    assert "| kvsmooth | 3 | 33.3 | 20.0 | 66.7 | 80.0 | 72.7 | 4.0 |" in md
    assert "| random | none | 5 | 60.0 | 50.0 | 50.0 | 50.0 | 40.0 |" in md
    assert '| prompt | "Describe." |' in md
    assert f"by vllm-halluguard {vllm_halluguard.__version__}." in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]


def test_report_command_needs_results(tmp_path):
    assert main(["report", "--out", str(tmp_path)]) == 2


def test_cli_without_a_server_says_so(tmp_path, caplog):
    images, instances = make_coco(tmp_path / "coco", size=32)
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["chair", "--images", str(images), "--annotations", str(instances), "--out", str(tmp_path / "o"),
            "--base-url", url, "--mitigation", "none", "--retries", "0"]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert any(f"no server answered at {url} (is it running?" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ real server


@pytest.fixture(scope="module")
def server(plain_server) -> str:
    return plain_server.url


@pytest.mark.server
@pytest.mark.engine
def test_cli_against_the_real_server(server, tmp_path):
    images, instances = make_coco(tmp_path / "coco", size=112)
    out = tmp_path / "out"
    common = ["--images", str(images), "--annotations", str(instances), "--out", str(out),
              "--base-url", server, "--no-progress", "--concurrency", "8"]  # fmt: skip
    chair_args = ["chair", *common, "--max-tokens", "16", "--mitigation", "none", "--mitigation", "kvsmooth",
                  "--mitigation", "bogus"]  # fmt: skip
    pope_args = ["pope", *common, "--max-tokens", "4", "--mitigation", "none", "--mitigation", "kvsmooth",
                 "--split", "random", "--split", "popular", "--n-per-image", "1"]  # fmt: skip
    assert main(chair_args) == 0
    assert main(pope_args) == 0

    lines = read_lines(out / "results.jsonl")
    chair_lines = [r for r in lines if r["task"] == "chair"]
    pope_lines = [r for r in lines if r["task"] == "pope"]
    assert len(chair_lines) == 4 * 3  # 4 images x (none, kvsmooth, bogus)
    assert len(pope_lines) == 4 * 2 * 2 * 2  # 4 images x 2 questions x 2 splits x 2 mitigations
    good = [r for r in lines if r["mitigation"] != "bogus"]
    assert all(r["ok"] and r["text"] is not None and r["model"] == "tiny-llava" for r in good)
    assert all(1 <= r["completion_tokens"] <= (16 if r["task"] == "chair" else 4) for r in good)
    # The server echoes the method it applied: the field reached it.
    assert {json.loads(r["applied"])["method"] for r in good if r["mitigation"] == "kvsmooth"} == {"kvsmooth"}
    assert {r["applied"] for r in good if r["mitigation"] == "none"} == {"none"}
    # An unknown method is a 400, recorded per request and not retried.
    bogus = [r for r in chair_lines if r["mitigation"] == "bogus"]
    assert all((r["ok"], r["error"], r["attempts"]) == (False, "http_400", 1) for r in bogus)
    assert all("unknown method 'bogus'" in r["detail"] for r in bogus)

    # Resume: a second run of both commands sends nothing.
    assert main(chair_args) == 0
    assert main(pope_args) == 0
    assert len(read_lines(out / "results.jsonl")) == len(lines)

    report = json.loads((out / "report.json").read_text())
    groups = {(g["task"], g["split"], g["mitigation"]): g for g in report["groups"]}
    for m in ("none", "kvsmooth"):
        assert groups[("chair", None, m)]["n_ok"] == 4
        assert set(groups[("chair", None, m)]["metrics"]) >= {"chair_s", "chair_i", "recall", "f1"}
        for split in ("random", "popular"):
            assert groups[("pope", split, m)]["n_ok"] == 8
            assert 0 <= groups[("pope", split, m)]["metrics"]["accuracy"] <= 1
    assert groups[("chair", None, "bogus")]["errors"] == {"http_400": 4}
    assert report["protocols"]["chair"]["max_tokens"] == 16
    assert report["protocols"]["pope"]["model"] == "tiny-llava"
    md = (out / "report.md").read_text()
    assert "## CHAIR" in md and "## POPE" in md and "| kvsmooth |" in md
    assert (out / "report.png").stat().st_size > 1000
    # The report command rebuilds the same groups from the folder alone.
    (out / "report.json").unlink()
    assert main(["report", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["groups"] == report["groups"]
    assert [g.model_dump(mode="json") for g in load_report(out).groups] == report["groups"]

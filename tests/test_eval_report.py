"""``report.png`` stays readable with many methods and compositions (issue 31, item 18)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import matplotlib
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from vllm_halluguard.eval.records import Mitigation
from vllm_halluguard.eval.report import EvalReport, GroupResult, plot

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = [
    "none", "kvsmooth", "prunehal", "farsight", "farsight(mode=B)", "scr", "kvsmooth+farsight",
    "prunehal+kvsmooth", "scr+prunehal", "prunehal+farsight(mode=B)", "scr+kvsmooth",
    "scr+prunehal+kvsmooth+farsight",
]  # fmt: skip
SPLITS = ["random", "popular", "adversarial"]


def make_report(labels: list[str], seed: int = 0) -> EvalReport:
    rng = random.Random(seed)
    groups = [
        GroupResult(task="chair", mitigation=m, n_ok=10, n_errors=0,
                    metrics={k: rng.random() for k in ("chair_s", "chair_i", "recall", "f1")})
        for m in labels
    ] + [
        GroupResult(task="pope", split=s, mitigation=m, n_ok=10, n_errors=0,
                    metrics={"accuracy": rng.random(), "f1": rng.random()})
        for s, m in itertools.product(SPLITS, labels)
    ]  # fmt: skip
    return EvalReport(
        created="2026-12-07T00:00:00Z",
        protocols={},
        mitigations=[Mitigation(label=m, spec="none") for m in labels],
        groups=groups,
        n_records=len(groups) * 10,
    )


def drawn_figure(report: EvalReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run :func:`plot` and keep the figure it closes."""
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or real_close(fig))
    out = plot(report, tmp_path / "report.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    FigureCanvasAgg(fig).draw()  # plt.close detached pyplot's canvas
    return fig


def overlaps(boxes) -> list[tuple[int, int]]:
    return [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2) if a.overlaps(b)]


def test_twelve_methods_every_label_readable(tmp_path, monkeypatch):
    report = make_report(LABELS)
    fig = drawn_figure(report, tmp_path, monkeypatch)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 4 + 2 * len(SPLITS)  # CHAIR's four metrics, POPE accuracy and F1 per split
    renderer = fig.canvas.get_renderer()  # the Agg canvas of drawn_figure
    figure_box = fig.bbox
    first = panels[0]
    ticks = [t for t in first.get_yticklabels() if t.get_visible() and t.get_text()]
    assert [t.get_text() for t in ticks] == LABELS, (
        "each mitigation is named on the axis, in the report's order"
    )
    boxes = [t.get_window_extent(renderer) for t in ticks]
    assert not overlaps(boxes), "mitigation labels overlap each other"
    assert all(b.x0 >= figure_box.x0 and b.y0 >= figure_box.y0 and b.y1 <= figure_box.y1 for b in boxes)
    titles = [ax.title.get_window_extent(renderer) for ax in panels]
    assert not overlaps(titles), "panel titles overlap"
    # every panel's plotting area stays clear of the labels and of the other panels
    areas = [ax.get_window_extent(renderer) for ax in panels]
    assert not overlaps(areas)
    assert not any(b.overlaps(a) for b in boxes for a in areas)
    # the value beside each bar is that mitigation's metric (CHAIR_S: the first panel)
    shown = {round(t.get_position()[1]): t.get_text() for t in first.texts}
    chair_s = [f"{100 * report.group('chair', m).metrics['chair_s']:.1f}" for m in LABELS]
    assert [shown[i] for i in range(len(LABELS))] == chair_s


def test_height_grows_with_the_number_of_methods(tmp_path, monkeypatch):
    small = drawn_figure(make_report(LABELS[:3]), tmp_path, monkeypatch).get_size_inches()[1]
    large = drawn_figure(make_report(LABELS), tmp_path, monkeypatch).get_size_inches()[1]
    assert large > 2 * small * 0.9 and large >= 0.25 * len(LABELS) * 3

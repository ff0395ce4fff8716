"""What a user sees of a monitored run: the per-layer panel (each head's max |logit| and entropy over
the steps, warnings and interventions marked) in TensorBoard, in W&B, and as the PNG of
``attnkit monitor report``.

One short real training run (a tiny GPT-2, AdamW) with a planted head whose W_q doubles after every
step, so the monitor warns and its default policy intervenes. The references are independent of the
monitor: the planted head's largest |logit| computed from the layer's input and its own c_attn
weights in float64, every other number read straight from the JSONL lines, the warnings and
interventions as the live monitor returned them during the loop.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _ids, gpt2

from attnkit.cli.main import main
from attnkit.monitor import AttentionMonitor, Policy
from attnkit.monitor.emit import TensorBoardEmitter, WandbEmitter, series_name
from attnkit.monitor.panel import Markers, max_abs_logit
from attnkit.monitor import report
from attnkit.monitor.report import panel_data, read_run, save_panels
from attnkit.seam.layouts import qk_layout
from attnkit.seam.sites import Site

LAYERS, HEADS = 2, 4
PLANTED = (1, 2)  # (layer, head) whose W_q doubles after every step
STEPS = 8


def head_abs_logit(attn: torch.nn.Module, hidden: torch.Tensor, head: int) -> float:
    """Largest |q·k/√d| over causal pairs of ``head``, from GPT-2's c_attn in float64."""
    d, E = attn.head_dim, attn.embed_dim
    w, b = attn.c_attn.weight.double(), attn.c_attn.bias.double()  # Conv1D: (E, 3E), columns [q | k | v]
    x = hidden.double()  # (B, T, E)
    q = x @ w[:, head * d:(head + 1) * d] + b[head * d:(head + 1) * d]  # (B, T, d)
    k = x @ w[:, E + head * d:E + (head + 1) * d] + b[E + head * d:E + (head + 1) * d]  # (B, T, d)
    logits = q @ k.transpose(1, 2) / math.sqrt(d)  # (B, T, T)
    T = logits.shape[-1]
    return logits[:, torch.ones(T, T, dtype=torch.bool).tril()].abs().amax().item()


def planted_training_run(log_dir: Path, emit: tuple) -> dict:
    """Train STEPS steps observing every one; returns the reference numbers of the run."""
    model = gpt2("sdpa", layers=LAYERS, heads=HEADS).train()
    ids = _ids(2, 16)  # (2, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    layer, head = PLANTED
    attn = model.transformer.h[layer].attn
    caught = {}
    hook = attn.register_forward_pre_hook(
        lambda _m, args, kwargs: caught.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    planted_abs, warnings = [], []
    try:
        with AttentionMonitor(model, every=1, log_dir=log_dir, emit=emit, optimizer=optimizer,
                              policy=Policy()) as monitor:
            for step in range(STEPS):
                loss = model(input_ids=ids, labels=ids).loss
                with torch.no_grad():
                    planted_abs.append(head_abs_logit(attn, caught["x"], head))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                warnings += monitor.on_step(step, loss=loss).new
                with torch.no_grad():
                    qk_layout(attn).scale_query(head, 2.0)  # the planted growth
        interventions = list(monitor.interventions)
    finally:
        hook.remove()
    return {"planted_abs": planted_abs, "interventions": interventions,
            "warnings": [(w.step, w.site, w.head, w.type) for w in warnings]}


class RecordedWandbRun:
    """Stands in for a wandb run where its offline files cannot be read back: the calls to ``log``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def log(self, data: dict, step: int) -> None:
        self.calls.append((step, dict(data)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("panel")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_DIR", str(root))
        log_dir = root / "run"
        wandb, recorder = [], []
        if importlib.util.find_spec("wandb") is not None:  # the sink's charts are wandb's own objects
            recorder = [WandbEmitter(log_dir, run=RecordedWandbRun())]  # what is handed to wandb.log, in order
            try:  # and a real offline run, where its service starts (not in every sandbox)
                wandb = [WandbEmitter(log_dir)]
            except Exception:  # noqa: BLE001 - wandb.init's failure, whatever it is
                pass
        reference = planted_training_run(log_dir, emit=("tensorboard", *wandb, *recorder))
    # the monitor warned about the planted head and acted: the panel has markers to show
    assert any(site == Site(PLANTED[0]) and head == PLANTED[1] for _, site, head, _ in reference["warnings"])
    assert reference["interventions"]
    lines = [json.loads(line) for line in (log_dir / "monitor.jsonl").read_text().splitlines()]
    return {"dir": log_dir, "lines": lines, "wandb": bool(wandb), "wandb_log": recorder[0].run.calls if recorder else None, **reference}


def _jsonl_series(lines: list[dict]) -> tuple[list[int], dict[str, np.ndarray]]:
    """Observed steps and per-head metrics (steps, series), straight from the JSONL lines."""
    steps = [o for o in lines if o["type"] == "step"]
    return [o["step"] for o in steps], {m: np.array([o["metrics"][m] for o in steps], dtype=float)
                                        for m in ("logit_max", "logit_min", "entropy")}


def _tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = log_dir.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_has_each_heads_max_abs_logit_and_entropy_at_every_observed_step(run):
    acc = _tensorboard(run["dir"] / "tensorboard")
    steps, jsonl = _jsonl_series(run["lines"])
    assert steps == list(range(STEPS))
    expected_abs = np.maximum(np.abs(jsonl["logit_max"]), np.abs(jsonl["logit_min"]))  # (steps, series)
    series = run["lines"][0]["series"]
    assert series == [f"L{layer}H{head}" for layer in range(LAYERS) for head in range(HEADS)]
    for column, name in enumerate(series):
        for metric, expected in (("logit_absmax", expected_abs), ("entropy", jsonl["entropy"])):
            events = acc.Scalars(f"attnkit/{metric}/{name}")
            assert [e.step for e in events] == steps
            assert [e.value for e in events] == pytest.approx(expected[:, column], rel=1e-6)  # float32 on disk
    planted = [e.value for e in acc.Scalars(f"attnkit/logit_absmax/L{PLANTED[0]}H{PLANTED[1]}")]
    assert planted == pytest.approx(run["planted_abs"], rel=1e-3)  # what the weights give, in float64
    assert planted[-1] > 50 * planted[0]  # and it grew: the panel shows the planted head's climb


def test_tensorboard_markers_are_at_the_warning_and_intervention_steps(run):
    acc = _tensorboard(run["dir"] / "tensorboard")
    warned = Counter((step, site) for step, site, _, _ in run["warnings"])
    acted = Counter(entry["step"] for entry in run["interventions"])
    for layer in range(LAYERS):
        events = acc.Scalars(f"attnkit/markers/warnings/L{layer}")
        assert [e.step for e in events] == list(range(STEPS))  # 0 where nothing happened: a spike per event
        assert [e.value for e in events] == [warned[(s, Site(layer))] for s in range(STEPS)]
    assert [e.value for e in acc.Scalars("attnkit/markers/warnings/model")] == [warned[(s, None)] for s in range(STEPS)]
    assert [e.value for e in acc.Scalars("attnkit/markers/interventions")] == [acted[s] for s in range(STEPS)]
    assert any(v for (s, site), v in warned.items() if site == Site(PLANTED[0]))


def _layout(acc):
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_tensorboard_custom_scalars_layout_gives_a_chart_per_layer_with_a_line_per_head(run):
    acc = _tensorboard(run["dir"] / "tensorboard")
    tags = acc.Tags()["scalars"]
    layout = _layout(acc)
    assert [c.title for c in layout.category] == [f"attnkit layer {layer}" for layer in range(LAYERS)]
    for layer, category in enumerate(layout.category):
        charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
        matched = {title: sorted(t for t in tags if any(re.search(rx, t) for rx in regexes))
                   for title, regexes in charts.items()}
        assert matched == {
            f"layer {layer}: max |logit| per head": [f"attnkit/logit_absmax/L{layer}H{h}" for h in range(HEADS)],
            f"layer {layer}: entropy per head (nats)": [f"attnkit/entropy/L{layer}H{h}" for h in range(HEADS)],
            f"layer {layer}: new warnings (this layer, whole model) and interventions": sorted([
                f"attnkit/markers/warnings/L{layer}", "attnkit/markers/warnings/model",
                "attnkit/markers/interventions"]),
        }


SITES = {  # categories of model: one stack; stacks whose layer numbers repeat (T5-like); a layer 1 beside 10
    "decoder-only": [Site(0), Site(1)],
    "encoder-decoder": [Site(0, "encoder"), Site(1, "encoder"), Site(0, "decoder"), Site(0, "decoder", "cross")],
    "ten-plus-layers": [Site(layer) for layer in range(12)],
}


@pytest.mark.parametrize("kind", list(SITES))
def test_layout_regexes_pick_exactly_their_own_layers_heads(kind):
    sites = [site for site in SITES[kind] for _ in range(3)]  # 3 heads each
    series = [(site, head % 3) for head, site in enumerate(sites)]
    tags = [f"attnkit/{m}/{series_name(s, h)}" for m in ("logit_absmax", "entropy", "logit_max") for s, h in series]
    tags += [f"attnkit/markers/warnings/{series_name(s)}" for s in SITES[kind]] + ["attnkit/markers/warnings/model"]
    layout = _layout_of(sites)
    assert len(layout) == len(SITES[kind])
    for site, (_, charts) in zip(sorted(SITES[kind]), layout.items()):
        (logit_chart, entropy_chart, marker_chart) = charts.values()
        assert [t for t in tags if any(re.search(rx, t) for rx in logit_chart[1])] == \
            [f"attnkit/logit_absmax/{series_name(site, h)}" for h in range(3)]
        assert [t for t in tags if any(re.search(rx, t) for rx in entropy_chart[1])] == \
            [f"attnkit/entropy/{series_name(site, h)}" for h in range(3)]
        assert [t for t in tags if any(re.search(rx, t) for rx in marker_chart[1])] == \
            [f"attnkit/markers/warnings/{series_name(site)}", "attnkit/markers/warnings/model"]


def _layout_of(sites):
    emitter = TensorBoardEmitter.__new__(TensorBoardEmitter)  # the layout needs no writer
    emitter.prefix = "attnkit"
    return emitter.layout(sites)


# ------------------------------------------------------------------------------------ W&B
def test_wandb_has_a_line_chart_per_layer_with_each_heads_series(run):
    if not run["wandb"]:
        pytest.skip("wandb offline does not start here")
    steps, jsonl = _jsonl_series(run["lines"])
    expected = {"logit_absmax": np.maximum(np.abs(jsonl["logit_max"]), np.abs(jsonl["logit_min"])),
                "entropy": jsonl["entropy"]}
    (files,) = (run["dir"] / "wandb").glob("offline-run-*/files")
    for layer in range(LAYERS):
        for metric, values in expected.items():
            (table,) = (files / "media" / "table" / "attnkit" / "panel" / f"L{layer}").glob(f"{metric}_table_*.json")
            doc = json.loads(table.read_text())
            assert doc["columns"] == ["step", "lineKey", "lineVal"]
            got = {(step, key): value for step, key, value in doc["data"]}
            assert got == pytest.approx({(s, f"H{h}"): values[i, layer * HEADS + h]
                                         for i, s in enumerate(steps) for h in range(HEADS)})


def test_wandb_gets_the_markers_at_their_steps_and_never_a_step_back(run):
    if run["wandb_log"] is None:
        pytest.skip("wandb is not installed")
    calls = run["wandb_log"]
    steps = [step for step, _ in calls]
    assert steps == sorted(steps)  # wandb drops what is logged at a step before its current one
    logged: dict[str, dict[int, float]] = {}
    for step, data in calls:
        for key, value in data.items():
            logged.setdefault(key, {})[step] = value
    warned = Counter((step, site) for step, site, _, _ in run["warnings"])
    acted = Counter(entry["step"] for entry in run["interventions"])
    for layer in range(LAYERS):
        assert logged[f"attnkit/markers/warnings/L{layer}"] == {s: warned[(s, Site(layer))] for s in range(STEPS)}
    assert logged["attnkit/markers/interventions"] == {s: acted[s] for s in range(STEPS)}
    planted = logged[f"attnkit/logit_absmax/L{PLANTED[0]}H{PLANTED[1]}"]
    assert [planted[s] for s in range(STEPS)] == pytest.approx(run["planted_abs"], rel=1e-3)


# ------------------------------------------------------------------------------------ report PNG
def test_report_panel_data_matches_the_history(run):
    panels = panel_data(read_run(run["dir"]))
    steps, jsonl = _jsonl_series(run["lines"])
    assert [p.site for p in panels] == [Site(layer) for layer in range(LAYERS)]
    for layer, panel in enumerate(panels):
        columns = slice(layer * HEADS, (layer + 1) * HEADS)
        assert panel.heads == list(range(HEADS)) and panel.steps.tolist() == steps
        assert panel.max_abs_logit == pytest.approx(
            np.maximum(np.abs(jsonl["logit_max"]), np.abs(jsonl["logit_min"]))[:, columns])
        assert panel.entropy == pytest.approx(jsonl["entropy"][:, columns])
        assert sorted((w["step"], w["issue"], w["head"]) for w in panel.warnings) == sorted(
            (s, t, h) for s, site, h, t in run["warnings"] if site in (Site(layer), None))
        assert [e["step"] for e in panel.interventions] == [e["step"] for e in run["interventions"]]
    planted = panels[PLANTED[0]].max_abs_logit[:, PLANTED[1]]
    assert planted.tolist() == pytest.approx(run["planted_abs"], rel=1e-3)


def test_report_writes_the_panel_png_and_a_json_summary(run, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["monitor", "report", str(run["dir"]), "--out", str(out), "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    png = out / "attention_panel.png"
    assert str(png) in doc["figures"]
    import matplotlib.image

    image = matplotlib.image.imread(png)  # (H, W, 4)
    assert image.shape[0] > 300 and image.shape[1] > 800 and png.stat().st_size > 20_000
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50  # lines, text, markers: not blank
    panels = panel_data(read_run(run["dir"]))
    planted = doc["layers"][PLANTED[0]]["heads"][PLANTED[1]]
    column = panels[PLANTED[0]].max_abs_logit[:, PLANTED[1]]
    assert planted["peak_max_abs_logit"] == pytest.approx(column.max())
    assert planted["peak_step"] == int(np.argmax(column))
    assert [(w["step"], w["issue"]) for w in doc["warnings"]] == [(s, t) for s, _, _, t in run["warnings"]]
    assert [e["step"] for e in doc["interventions"]] == [e["step"] for e in run["interventions"]]


def test_many_layers_go_to_several_pngs(tmp_path, monkeypatch):
    """Past LAYERS_PER_PANEL layers the rows would be too small to read: the next page."""
    monkeypatch.setattr(report, "LAYERS_PER_PANEL", 2)
    heads = [{"layer": layer, "stack": "", "kind": "self", "head": 0} for layer in range(3)]
    lines = [{"type": "meta", "series": [f"L{h['layer']}H0" for h in heads], "heads": heads}]
    lines += [{"type": "step", "step": s, "loss": 1.0, "metrics": {
        "entropy": [1.0 + 0.1 * s] * 3, "logit_max": [2.0 * s] * 3, "logit_min": [-3.0] * 3}} for s in range(3)]
    (tmp_path / "monitor.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    written = save_panels(read_run(tmp_path), tmp_path)
    assert [p.name for p in written] == ["attention_panel.png", "attention_panel_2.png"]
    panels = panel_data(read_run(tmp_path))
    assert [p.max_abs_logit[:, 0].tolist() for p in panels][0] == [3.0, 3.0, 4.0]  # |min| wins, then |max|


def test_a_run_recorded_without_smallest_logits_shows_its_largest(tmp_path):
    """Logs written before the monitor kept each head's smallest logit: the signed largest, so labelled."""
    heads = [{"layer": 0, "stack": "", "kind": "self", "head": h} for h in range(2)]
    lines = [{"type": "meta", "series": ["L0H0", "L0H1"], "heads": heads}]
    lines += [{"type": "step", "step": s, "metrics": {"entropy": [1.0, 2.0], "logit_max": [s, -4.0]}} for s in range(3)]
    (tmp_path / "monitor.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (panel,) = panel_data(read_run(tmp_path))
    assert panel.logit_label == "max logit" and panel.max_abs_logit.tolist() == [[0, -4], [1, -4], [2, -4]]
    assert [p.name for p in save_panels(read_run(tmp_path), tmp_path)] == ["attention_panel.png"]


@pytest.mark.parametrize("logit_max, logit_min, expected", [
    ([5.0, -1.0, 2.0], [-1.0, -9.0, 2.0], [5.0, 9.0, 2.0]),  # positive largest, all negative, one value
    ([-math.inf], [math.inf], [math.nan]),  # a head that saw no logit
    ([math.nan], [1.0], [math.nan]),  # unknown
])
def test_max_abs_logit(logit_max, logit_min, expected):
    np.testing.assert_array_equal(max_abs_logit(logit_max, logit_min), expected)


def test_markers_hand_out_a_step_once_it_is_complete():
    markers = Markers([Site(0), Site(1)])
    assert markers.observed(0) == []
    markers.warning(0, Site(1))
    markers.warning(0, Site(7))  # a site not in the panel: counted for the whole model
    markers.intervention(0)
    assert markers.observed(4) == [(0, {Site(0): 0, Site(1): 1, None: 1}, 1)]
    assert markers.flush() == [(4, {Site(0): 0, Site(1): 0, None: 0}, 0)]


# ------------------------------------------------------------------------------------ bad input
def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "monitor.jsonl").write_text(text)
    return tmp_path


BAD_RUN_DIRS = {
    "missing": (lambda p: p / "nowhere", "does not exist"),
    "empty": (lambda p: p, "no monitor.jsonl"),
    "another program's files": (lambda p: (p / "notes.txt").write_text("hello") and p, "no monitor.jsonl"),
    "empty monitor.jsonl": (lambda p: _write(p, ""), "no observed step"),
    "another file given as the run": (lambda p: (p / "notes.txt").write_text("a\nb\n") and p / "notes.txt",
                                      "not a monitor log"),
    "a damaged log": (lambda p: _write(p, '{"type": "meta"}\nnot json\n{"type": "meta"}\n'), "damaged"),
    "JSON that is not a record": (lambda p: _write(p, "[1, 2]\n[3]\n"), "not a monitor record"),
    "a step without metrics": (lambda p: _write(p, '{"type": "meta"}\n{"type": "step", "step": 0}\n'), "damaged"),
    "no heads named": (lambda p: _write(p, '{"type": "meta"}\n{"type": "step", "step": 0, "metrics": '
                                           '{"entropy": [1.0]}}\n'), "does not name the heads"),
}


@pytest.mark.parametrize("case", list(BAD_RUN_DIRS))
def test_bad_run_dirs_are_one_line_and_exit_2(case, tmp_path, capsys):
    make, message = BAD_RUN_DIRS[case]
    run_dir = make(tmp_path)
    assert main(["monitor", "report", str(run_dir), "--json", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "s.json").exists() and not list(tmp_path.glob("*.png"))

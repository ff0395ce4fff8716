"""``analyze`` and ``Analyzer``: run a model through the seam and turn its attention into statistics and issues.

``Analyzer(model)`` accumulates over any number of forwards (a user's own loop, or ``attnkit
analyze --dataset``); ``analyze(model, inputs)`` is one forward through it.
"""

from __future__ import annotations

import html
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from attnkit.analyze.diagnose import ISSUE_KEYS, diagnose
from attnkit.analyze.mitigations import Mitigation, find_mitigations
from attnkit.common.findings import Finding
from attnkit.errors import UserError
from attnkit.seam import AttentionSession, NoAttentionError, StatsCollector, attach, eval_mode, forward_no_grad

SCHEMA_VERSION = "1.2"


@dataclass
class Analysis:
    model: str
    dtype: torch.dtype
    tokens: int
    batch: int
    heads: list[dict]
    issues: list[Finding]
    mitigations: list[Mitigation]
    call_order: list[int]
    sample_rows: int | None = None
    token_text: list[str] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)  # attnkit.gate gates: mean gate / share below 0.1 per head
    sequences: int = 0  # sequences (batch rows of every forward) the statistics rest on
    rows: int = 0  # their real (non-padding) tokens: the query rows of each observed call
    truncated: int = 0  # sequences cut to the longest length allowed (``seq_len``)
    seq_len: int | None = None  # the length longer texts were cut to, when they were
    processes: int = 1  # torch.distributed ranks whose sequences the statistics pool (``Analyzer.all_reduce``)

    @property
    def layers(self) -> list[int]:
        return sorted({h["layer"] for h in self.heads})

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "dtype": str(self.dtype).replace("torch.", ""),
            "tokens": self.tokens,
            "batch": self.batch,
            "sequences": self.sequences,
            "rows": self.rows,
            "truncated": self.truncated,
            "seq_len": self.seq_len,
            "sample_rows": self.sample_rows,
            "num_layers": len(self.layers),
            "layers": self.layers,
            "mitigations": [m.detail for m in self.mitigations],
            "heads": [_finite(h) for h in self.heads],
            "issues": [i.to_dict(ISSUE_KEYS) for i in self.issues],
            **({"processes": self.processes} if self.processes > 1 else {}),  # only for a run over several ranks
            **({"gates": [_finite(g) for g in self.gates]} if self.gates else {}),  # only for a gated model
        }


    def plot_heatmap(self, path: str | None = None, metric: str = "normalized_entropy") -> bytes:
        """The layer x head heatmap as PNG bytes; also written to ``path`` (atomically) when given."""
        from attnkit.analyze.plots import entropy_heatmap_png
        from attnkit.common.io import write_atomic

        png = entropy_heatmap_png(self, metric)
        if path is not None:
            write_atomic(path, png)
        return png

    def _repr_html_(self) -> str:
        """How a notebook shows the analysis: the header, the heatmap and the issues (all text escaped)."""
        import base64

        e = html.escape
        ranks = f" over {self.processes} processes" if self.processes > 1 else ""
        rests_on = f"{self.sequences} sequence{'s' if self.sequences != 1 else ''}{ranks}, {self.rows} query rows"
        parts = [f"<b>attnkit analyze</b> · {e(self.model)} · {e(str(self.dtype).replace('torch.', ''))} · "
                 f"statistics over {rests_on}"]
        if self.token_text:
            parts.append(f"<div><small>text: {e(''.join(self.token_text)[:400])}</small></div>")
        png = base64.b64encode(self.plot_heatmap()).decode("ascii")
        parts.append(f'<div><img src="data:image/png;base64,{png}" alt="normalised entropy per head"></div>')
        if self.issues:
            rows = "".join(f"<tr><td>{e(i.severity)}</td><td>{e(i.where)}</td><td>{e(i.type)}</td>"
                           f"<td>{e(i.message)}</td><td>{e(i.suggestion)}</td></tr>" for i in self.issues)
            parts.append("<table><tr><th>severity</th><th>where</th><th>issue</th><th>evidence</th><th>suggestion</th></tr>"
                         f"{rows}</table>")
        else:
            parts.append("<div>no issues found</div>")
        return "\n".join(parts)


def _finite(d: dict) -> dict:
    """JSON has no NaN or Infinity: those become null / strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and v != v:
            out[k] = None
        elif isinstance(v, float) and v in (float("inf"), float("-inf")):
            out[k] = "inf" if v > 0 else "-inf"
        else:
            out[k] = v
    return out


class Analyzer:
    """Per-head attention statistics accumulated over any number of forwards of ``model``::

        with Analyzer(model) as a:
            for batch in loader:
                model(**batch)
        analysis = a.result()  # the Analysis ``analyze`` returns: issues, to_json(), plot_heatmap()

    Every forward inside the block is observed through the seam. An ``attention_mask`` passed as
    a keyword marks padding: padding queries are left out and padding keys take no part, so a
    padded batch gives the statistics of its sequences analysed one by one. Each batch row of
    each forward is one sequence of the interval over sequences (``entropy_ci95``). Inside the
    block the model is in eval mode (no dropout); on leaving it, also through an exception, the
    model is exactly as it was found (training mode, attention implementation, hooks).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str = "model",
        layers: list[int] | None = None,
        heads: list[int] | None = None,
        sample_rows: int | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.name = name
        self.layers = layers
        self.sample_rows = sample_rows
        self.collector = StatsCollector()
        self.session = AttentionSession(taps=[self.collector], layers=layers, heads=heads,
                                        sample_rows=sample_rows, seed=seed)
        self.sequences = 0
        self.rows = 0
        self.longest = 0
        self.batch = 0
        self.truncated = 0  # counted by whoever cuts the texts (``analyze_texts``)
        self.processes = 1  # processes whose forwards the statistics pool (``all_reduce``)
        self.seq_len: int | None = None
        self.token_text: list[str] = []
        self._stack: ExitStack | None = None
        self._gate_stats = None

    def __enter__(self) -> Analyzer:
        from attnkit.gate.gating import GateStats, find_gates

        stack = ExitStack()
        try:
            stack.enter_context(eval_mode(self.model))  # undone last: every module's own flag back
            stack.enter_context(attach(self.model, self.session))
            stack.callback(self.model.register_forward_pre_hook(self._see_inputs, with_kwargs=True).remove)
            if find_gates(self.model):
                self._gate_stats = stack.enter_context(GateStats(self.model))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack, stack = None, self._stack
            stack.close()

    def _see_inputs(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before each forward: which queries are padding, and how many sequences and rows there are."""
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        mask = kwargs.get("attention_mask")
        padding = mask is not None and mask.dim() == 2 and (ids is None or mask.shape == ids.shape[:2])
        self.session.query_mask = mask.bool() if padding else None
        shape = mask.shape if padding else (ids.shape[:2] if ids is not None and ids.dim() >= 2 else None)
        if shape is not None:
            self.sequences += int(shape[0])
            self.rows += int(mask.sum()) if padding else int(shape[0] * shape[1])
            self.longest = max(self.longest, int(shape[1]))
            self.batch = max(self.batch, int(shape[0]))

    def run(self, inputs: dict):
        """One forward on ``inputs`` without gradients (inside the block); a token the model cannot embed is a ``UserError``."""
        if self._stack is None:
            raise RuntimeError("Analyzer.run is for inside its with-block")
        from attnkit.common.loading.device import model_device

        device = model_device(self.model)  # inputs follow the model, wherever it was loaded
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return forward_no_grad(self.model, **inputs)

    def all_reduce(self, group=None) -> None:
        """Pool every rank's statistics (torch.distributed, e.g. under ``torchrun``): afterwards each
        rank's ``result()`` rests on every rank's sequences, as if one process had run them all.

        Every rank must call it, after its own forwards. Sums and counts add up, extremes take the
        max or min, and each rank's per-sequence sums join the interval over sequences
        (``entropy_ci95``); a rank that ran no forward (an empty share) adds nothing. Without a
        process group (one process) it does nothing, so one script serves both.
        """
        import torch.distributed as dist

        if group is None and not (dist.is_available() and dist.is_initialized()):
            return
        self.collector.all_reduce(group)
        if self._gate_stats is not None:
            self._gate_stats.all_reduce(group)
        # on the statistics' device: a group of one's own may be NCCL alone, which reduces CUDA tensors only
        device = next((acc.rows.device for acc in self.collector.layers.values()), torch.device("cpu"))
        counts = torch.tensor([self.sequences, self.rows, self.truncated], dtype=torch.float64, device=device)
        extremes = torch.tensor([self.longest, self.batch], dtype=torch.float64, device=device)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
        self.sequences, self.rows, self.truncated = (int(v) for v in counts.tolist())
        self.longest, self.batch = (int(v) for v in extremes.tolist())
        self.processes = dist.get_world_size(group)

    def result(self) -> Analysis:
        """The statistics and diagnoses of every forward observed so far (inside the block or after it)."""
        collector = self.collector
        if not collector.layers:
            if self.layers is not None and self.session.forwards:
                raise UserError(f"none of the selected layers {sorted(self.layers)} ran; the model has layers "
                                f"{sorted({site.layer for site in self.session.sites_seen})}")
            if not self.session.forwards:
                raise UserError("no forward ran inside the Analyzer's with-block")
            raise NoAttentionError(f"{type(self.model).__name__} ran no attention call attnkit could see")
        dtype = next(iter(collector.dtypes.values()))
        call_order = [site.layer for site in collector.call_order]
        config = getattr(self.model, "config", None)
        mitigations = find_mitigations(config) if config is not None else []
        head_stats = collector.heads()
        return Analysis(
            model=self.name,
            dtype=dtype,
            tokens=self.longest,
            batch=self.batch,
            heads=head_stats,
            issues=diagnose(head_stats, dtype, mitigations, call_order),
            mitigations=mitigations,
            call_order=call_order,
            sample_rows=self.sample_rows if collector.sampled else None,
            token_text=list(self.token_text),
            gates=self._gate_stats.heads() if self._gate_stats is not None else [],
            # inputs the pre-hook could not count (embeddings only): the sequences the statistics saw
            sequences=self.sequences or max((h["sequences"] for h in head_stats), default=0),
            rows=self.rows,
            truncated=self.truncated,
            seq_len=self.seq_len,
            processes=self.processes,
        )


def analyze(
    model: nn.Module,
    inputs: dict,
    *,
    name: str = "model",
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
) -> Analysis:
    """Per-head statistics and diagnoses for one forward of ``model`` on ``inputs`` (``Analyzer`` over one forward).

    The model is left as it was found (training mode, attention implementation).
    """
    with Analyzer(model, name=name, layers=layers, heads=heads, sample_rows=sample_rows, seed=seed) as a:
        a.run(inputs)
    return a.result()

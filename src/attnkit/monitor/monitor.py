"""``AttentionMonitor``: per-head attention statistics of a training run, trends, warnings, interventions.

    monitor = AttentionMonitor(model, every=16, log_dir="runs/x", optimizer=opt)
    with monitor:
        for step, batch in enumerate(loader):
            loss = model(**batch).loss
            loss.backward(); opt.step(); opt.zero_grad()
            diagnosis = monitor.on_step(step, loss=loss)      # None on steps not observed
            if diagnosis and diagnosis.has_issues():
                intervention = monitor.get_intervention(diagnosis)
                if intervention:
                    monitor.apply(intervention)

Design: the monitor observes **the training batch itself, during the real forward**, one step
in ``every``: a seam session with a ``StatsCollector`` is attached for the whole run and
switched on (``session.active``) only for observed steps, so the other steps pay one lookup per
attention call. The statistics are computed in a separate no-grad pass from detached q/k: the
loss and every gradient are bit for bit those of the unmonitored step (tested). On an observed
step the gradient norms of each layer's query/key parameters are read by hooks as backward
writes them. ``on_step(step, loss)`` must follow the step whose forward it reports on; the loss
may be a tensor (read only at observed steps: no device sync on the others).

History is a set of fixed-size ring buffers (``history`` observed steps, ``loss_history`` steps),
so memory is flat over any run length. Every observed step goes to the emitters (JSONL always;
console, CSV, TensorBoard, W&B by name); each (site, head, type) is warned about once.
Under ``torch.distributed`` every rank must call ``on_step`` (statistics, losses and gradient
norms are reduced across ranks there) and only rank 0 emits.
"""

from __future__ import annotations

import math
import os
from collections import deque
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attnkit.errors import UserError
from attnkit.monitor.detectors import DETECTORS, Thresholds, Trends, near_limit, warmup_judged_after, warmup_observing
from attnkit.monitor.emit import EMITTERS, GATE_METRICS, HEAD_METRICS, Emitter, JSONLEmitter, StepRecord, series_name
from attnkit.monitor.grads import GradNorms
from attnkit.monitor.history import Ring
from attnkit.common.findings import Finding, threshold
from attnkit.monitor.issues import Diagnosis
from attnkit.monitor.snapshots import Snapshots
from attnkit.seam import ADAPTERS, AttentionCall, AttentionSession, NoAttentionError, Site, StatsCollector, Tap, attach, unwrap

DEFAULT_EVERY = 16  # observed steps cost ~1.3 unobserved ones on the reference model: <= 5% at 1 in 16 (BENCHMARKS.md)
NEAR_LIMIT_EVERY = int(threshold("near_limit_every"))  # one step in this many while a figure nears its format's limit
# logit_min beside logit_max: a head's largest |logit| (what overflows a float16) is max(|max|, |min|)
METRICS = (*HEAD_METRICS, "logit_min", "normalized_entropy", "log10_curvature_max", "nonfinite_logits")


class _Sites(Tap):
    """Learns which module each observed site is (for weights and dropout) from the observation
    the statistics tap gets anyway (per-row statistics or chunks: nothing extra is computed)."""

    accepts_key_prefix = True

    def __init__(self, on_new) -> None:
        self.modules: dict[Site, nn.Module] = {}
        self.formats: dict[Site, str] = {}  # the number format q·kᵀ is computed in ("fp16", "bf16", "fp32")
        self.scales: dict[Site, float] = {}  # the call's softmax scale
        self.calls = 0
        self.on_new = on_new

    def _seen(self, call: AttentionCall) -> None:
        self.calls += 1
        self.formats[call.site] = compute_format(call.query)
        self.scales[call.site] = float(call.scale)
        if call.site not in self.modules:
            self.modules[call.site] = call.module
            self.on_new(call.site, call.module)

    def observe_rows(self, rows) -> None:
        self._seen(rows.call)

    def observe(self, chunk) -> None:
        self._seen(chunk.call)


_FORMAT_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def compute_format(query: torch.Tensor) -> str:
    """The number format a call's q·kᵀ runs in: autocast's dtype where autocast is on for the query's
    device (a matmul under autocast runs in it whatever q's dtype: Llama's RoPE hands over fp32 q),
    else the query's own dtype."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return _FORMAT_NAMES.get(dtype, str(dtype).removeprefix("torch."))


class _Activations:
    """The largest |output| of the model's leaf modules on observed steps, per number format.

    A half-precision run can overflow outside attention (an MLP's output past fp16's 65,504, which
    the next layer's attention then shows as NaN): ``activation_overflow`` judges these figures
    against the format's largest value. Forward hooks on every leaf module (none by name), reading
    outputs only while the monitor's session is active (observed steps); the maxima stay tensors
    until the step is recorded (no device sync per module)."""

    def __init__(self, session) -> None:
        self.session = session
        self.largest: dict[str, torch.Tensor] = {}

    def attach(self, model: nn.Module, stack: ExitStack) -> None:
        for module in model.modules():
            if next(module.children(), None) is None:
                stack.callback(module.register_forward_hook(self._hook).remove)

    def _hook(self, _module, _inputs, output) -> None:
        if not self.session.active or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        fmt = _FORMAT_NAMES.get(output.dtype)
        if fmt is None or output.numel() == 0:
            return
        top = output.detach().abs().amax().float()
        seen = self.largest.get(fmt)
        self.largest[fmt] = top if seen is None else torch.maximum(seen, top)

    def collect(self) -> dict[str, float]:
        out = {fmt: float(v) for fmt, v in self.largest.items()}
        self.largest = {}
        dist = _dist()
        if dist:  # the largest over the ranks: every rank judges (and schedules its observations) alike
            names = sorted(set(_FORMAT_NAMES.values()))
            top = torch.tensor([out.get(f, -1.0) for f in names], dtype=torch.float64)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            out = {f: v for f, v in zip(names, top.tolist()) if v >= 0 or math.isnan(v)}
        return out


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _check_log_dir(log_dir: Path) -> None:
    if log_dir.exists() and not log_dir.is_dir():
        raise UserError(f"log directory {log_dir} is a file")
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create log directory {log_dir}: {e.strerror or e}") from e
    if not os.access(log_dir, os.W_OK | os.X_OK):
        raise UserError(f"log directory {log_dir} is not writable")


def check_every(every, observe_first: int = 0, near_limit_every: int | None = None) -> int:
    """``every`` as given, or a ``UserError`` before anything runs (``observe_first`` and
    ``near_limit_every`` too)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UserError(f"every must be a whole number of steps >= 1, got {every!r}")
    if isinstance(observe_first, bool) or not isinstance(observe_first, int) or observe_first < 0:
        raise UserError(f"observe_first must be a whole number of steps >= 0, got {observe_first!r}")
    if near_limit_every is not None and (isinstance(near_limit_every, bool) or not isinstance(near_limit_every, int)
                                         or near_limit_every < 1):
        raise UserError(f"near_limit_every must be a whole number of steps >= 1 or None, got {near_limit_every!r}")
    return every


def observes(step: int, every: int, observe_first: int = 0, near: bool = False,
             near_limit_every: int | None = None, warming_up: bool = False) -> bool:
    """Whether the monitor observes the loop's ``step``: every step before ``observe_first``, then one
    in ``every`` (steps 0, every, 2 every, ...; the first step the monitor sees is always observed),
    and one in ``near_limit_every`` while ``near`` (the latest observed step put a figure within the
    overflow floor of its format's limit: ``detectors.near_limit``), and every step while ``warming_up``
    (the optimizer's rate still rising in a run whose format's limit is reachable: ``warmup_headroom``
    judges the warm-up where it ends). Counted in the loop's own step numbers, so a resumed run does not
    observe densely again."""
    return (step < observe_first or step % every == 0 or warming_up
            or (near and near_limit_every is not None and step % near_limit_every == 0))


def _scale_now(scaler) -> Any:
    """A GradScaler's current scale without a device sync: its scale tensor copied where it has one
    (``get_scale()`` reads it to the host, a sync every step), else ``get_scale()``."""
    scale = getattr(scaler, "_scale", None)
    return scale.detach().clone() if isinstance(scale, torch.Tensor) else float(scaler.get_scale())


class AttentionMonitor:
    """Watch a model's attention while it trains (see the module docstring).

    every: observe one step in ``every`` (>= 1). observe_first: observe each of the loop's steps
    0 .. observe_first - 1, then one in ``every`` (early training is when the fastest runs break:
    an fp16 run at a too-high learning rate can overflow within 10 steps). near_limit_every: while the
    latest observed step put a head's q·kᵀ product or the largest module output within the overflow
    floor (``Thresholds.overflow_floor_bits``) of its number format's largest value, observe one step
    in this many (default ``NEAR_LIMIT_EVERY``; None: only ``every``): a figure that climbs a bit or two
    a step crosses the last bits between two sparse observations. grad_scaler: the run's
    ``torch.amp.GradScaler``: its scale is read every step (kept as a tensor until an observed step: no
    device sync) and ``grad_scaler_stall`` reports a run whose updates it keeps skipping. log_dir: where JSONL (and CSV, TensorBoard, W&B)
    go. emit: sink names in ``attnkit.monitor.emit.EMITTERS`` or ``Emitter`` objects; JSONL is
    always added. optimizer / scheduler: needed only by interventions that change the learning
    rate or clip gradients. policy: an object with ``get_intervention(diagnosis)``; when given,
    its interventions are applied automatically on each observed step. thresholds / detectors:
    see ``attnkit.monitor.detectors``. sample_rows: statistics on that many random query rows per
    call (cheaper on long sequences). trace_nonfinite: on a non-finite loss or logits, re-run the
    last batch observed and name the first site and head where NaN/Inf appear. snapshots: a
    ``Snapshots(every, keep)`` store of in-memory copies of the model, optimizer and scheduler state
    (one at start, then every ``every`` healthy steps), what the ``rollback`` intervention restores.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = DEFAULT_EVERY,
        observe_first: int = 0,
        near_limit_every: int | None = NEAR_LIMIT_EVERY,
        log_dir: str | os.PathLike = "runs/attnkit-monitor",
        emit: tuple = ("console",),
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        policy: Any = None,
        thresholds: Thresholds | None = None,
        detectors: tuple[str, ...] | None = None,
        history: int = 512,
        loss_history: int = 1024,
        sample_rows: int | None = None,
        trace_nonfinite: bool = True,
        meta: dict | None = None,
        snapshots: Snapshots | None = None,
        grad_scaler: Any = None,
    ) -> None:
        check_every(every, observe_first, near_limit_every)
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise UserError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if snapshots is not None and not isinstance(snapshots, Snapshots):
            raise UserError(f"snapshots must be attnkit.monitor.Snapshots(every=..., keep=...), got {snapshots!r}")
        if history < 2 or loss_history < 2:
            raise UserError("history and loss_history must be at least 2")
        root = unwrap(model)
        if not any(adapter.find(root) for adapter in ADAPTERS.values()):
            raise NoAttentionError(f"{type(root).__name__} has no attention attnkit can reach: nothing to monitor")
        self.thresholds = thresholds or Thresholds()
        names = tuple(detectors) if detectors is not None else tuple(DETECTORS)
        unknown = [d for d in names if d not in DETECTORS]
        if unknown:
            raise UserError(f"unknown detector(s) {', '.join(unknown)}; known: {', '.join(DETECTORS)}")
        self.detectors = [DETECTORS[d] for d in names]
        for e in emit:
            if isinstance(e, str) and e not in EMITTERS:
                raise UserError(f"unknown emitter '{e}'; known: {', '.join(EMITTERS)}")
        self.model, self.every, self.optimizer, self.scheduler, self.policy = model, every, optimizer, scheduler, policy
        self.observe_first, self.near_limit_every = observe_first, near_limit_every
        self.near_limit = False  # the latest observation put a figure within the overflow floor of its limit
        self.grad_scaler = grad_scaler
        self.grad_scales = Ring(loss_history, 1)  # every step's GradScaler scale after its update
        self._pending_scales: deque[tuple[int, Any]] = deque(maxlen=loss_history)
        self.log_dir = Path(log_dir)
        dist = _dist()
        self.rank = dist.get_rank() if dist else 0
        self.emitters: list[Emitter] = []
        if self.rank == 0:
            _check_log_dir(self.log_dir)
            self.emitters = [JSONLEmitter(self.log_dir / "monitor.jsonl")]
            self.emitters += [EMITTERS[e](self.log_dir) if isinstance(e, str) else e for e in emit if e != "jsonl"]
        self.history_size, self.loss_history, self.sample_rows = history, loss_history, sample_rows
        self.trace_nonfinite = trace_nonfinite
        self.snapshots = snapshots
        if callable(getattr(policy, "bind", None)):
            policy.bind(self)  # a Policy without rules of its own takes this monitor's defaults
        self.meta = dict(meta or {})
        self.stats = StatsCollector()
        self.grads = GradNorms()
        self.sites_tap = _Sites(self.grads.add)
        from attnkit.gate.gate_tap import GateTap, gate_owners

        # gate statistics through the seam, on the same observed calls, when the model has attnkit gates
        self.gate_tap = GateTap(root) if gate_owners(root) else None
        # activation_absmax: per series, the largest |output| of any leaf module in that head's number format
        # learning_rate: the optimizer's (first group's) rate for the next step, the same in every series (NaN
        # without the optimizer): warmup_headroom reads where its warm-up ended, and a replay reads it back
        self.metric_names = METRICS + ("activation_absmax", "learning_rate") + (GATE_METRICS if self.gate_tap else ())
        taps = [self.stats, self.sites_tap] + ([self.gate_tap] if self.gate_tap else [])
        self.session = AttentionSession(taps=taps, sample_rows=sample_rows)
        self.activations = _Activations(self.session)
        self.grads.session = self.session
        self.series: list[tuple[Site, int]] | None = None
        self.sites: list[Site] = []
        self.rings: dict[str, Ring] = {}
        self.grad_ring: Ring | None = None
        self.losses = Ring(loss_history, 1)
        self._pending: deque[tuple[int, Any]] = deque(maxlen=loss_history)  # losses not read yet
        self.warned: set[tuple] = set()
        self.warmup_judged = False  # warmup_headroom looked at the end of the warm-up, or an action changed the rate
        self._last_rate: float | None = None  # the optimizer's rate read at the previous step
        self.interventions: deque[dict] = deque(maxlen=1024)  # the latest (bounded, as all state)
        self.persistent: list[Any] = []  # interventions re-applied on every observed step (QK-clip)
        self.latest: StepRecord | None = None
        self.last_inputs: tuple | None = None
        self.traces: deque = deque(maxlen=16)
        self._stack: ExitStack | None = None
        self.step = -1

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "AttentionMonitor":
        if self._stack is not None:
            return self
        self._last_rate = self._rate()  # the first step's rate: a warm-up's second step is observed too
        stack = ExitStack()
        try:
            if self.gate_tap is not None:
                stack.enter_context(self.gate_tap)
            stack.enter_context(attach(self.model, self.session))
            self.activations.attach(self.model, stack)
            if self.trace_nonfinite:
                hook = self.model.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)
                stack.callback(hook.remove)
        except BaseException:
            stack.close()
            raise
        stack.callback(self.grads.remove)
        if _dist() and self.optimizer is not None:
            # DDP averages gradients after the accumulate hooks: read the averaged ones at the step
            self.grads.on_accumulate = False
            hook = self.optimizer.register_step_pre_hook(lambda *_: self.grads.read_now())
            stack.callback(hook.remove)
        self._stack = stack
        self.session.active = True
        if self.snapshots is not None and not len(self.snapshots):
            self.snapshots.take(self, self.step)  # the run as handed over: before any trend
        return self

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        for e in self.emitters:
            e.close()
        self.emitters = []

    def __enter__(self) -> "AttentionMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _keep_inputs(self, _module, args, kwargs) -> None:
        self.last_inputs = (args, kwargs)

    def attach_modifier(self, **session_kwargs) -> AttentionSession:
        """Attach another seam session (a soft-cap, a temperature) for the rest of the run."""
        if self._stack is None:
            raise RuntimeError("the monitor is not running")
        return self._stack.enter_context(attach(self.model, **session_kwargs))

    # ---------------------------------------------------------------- per step
    def on_step(self, step: int, loss: Any = None) -> Diagnosis | None:
        """Report the step just taken; returns its ``Diagnosis`` on observed steps, else None."""
        if self._stack is None:
            self.start()
        self.step = step
        if loss is not None:
            self.add_loss(step, loss)
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            self._pending_scales.append((step, _scale_now(self.grad_scaler)))
        observed = self.sites_tap.calls > 0
        self.sites_tap.calls = 0
        diagnosis = self._observe(step) if observed else None
        if self.snapshots is not None:
            self.snapshots.after_step(self, step, diagnosis)
        self.session.active = observes(step + 1, self.every, self.observe_first, self.near_limit, self.near_limit_every,
                                       self._warming_up())
        return diagnosis

    def _rate(self) -> float | None:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None and self.optimizer.param_groups else None

    def _warming_up(self) -> bool:
        """The optimizer's rate for the next step is above the rate of this one, in a run whose number format's
        limit a run can reach, and the warm-up is not judged yet: observe that step (``warmup_headroom`` judges
        the end of a warm-up at the step it happens, not at the next scheduled observation)."""
        rate = self._rate()
        previous, self._last_rate = self._last_rate, rate
        return self.series is not None and warmup_observing(previous, rate, self.warmup_judged, self._series_formats()[0])

    def add_loss(self, step: int, loss: Any) -> None:
        """A loss known only later (the HF Trainer logs it every ``logging_steps``)."""
        self._pending.append((step, loss.detach() if isinstance(loss, torch.Tensor) else loss))

    def _flush_scales(self) -> float | None:
        """Move the pending GradScaler scales into their ring (one transfer); the latest, or None."""
        if not self._pending_scales:
            return None
        values = torch.tensor([math.nan if isinstance(v, torch.Tensor) else float(v) for _, v in self._pending_scales],
                              dtype=torch.float64)
        tensors = [(i, v) for i, (_, v) in enumerate(self._pending_scales) if isinstance(v, torch.Tensor)]
        if tensors:  # one transfer (one device sync) for all of them
            values[[i for i, _ in tensors]] = torch.stack([v.double().reshape(()) for _, v in tensors]).cpu()
        values = values.tolist()
        for (s, _), v in zip(self._pending_scales, values):
            self.grad_scales.append(s, [v])
        self._pending_scales.clear()
        return values[-1]

    def _flush_losses(self) -> int:
        if not self._pending:
            return 0
        steps = [s for s, _ in self._pending]
        values = torch.tensor([float(v) if not isinstance(v, torch.Tensor) else math.nan for _, v in self._pending],
                              dtype=torch.float64)
        tensors = [(i, v) for i, (_, v) in enumerate(self._pending) if isinstance(v, torch.Tensor)]
        if tensors:
            # one transfer (one device sync) for all of them
            values[[i for i, _ in tensors]] = torch.stack([v.float().reshape(()) for _, v in tensors]).cpu().double()
        dist = _dist()
        if dist:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        for s, v in zip(steps, values.tolist()):
            self.losses.append(s, [v])
        self._pending.clear()
        return len(steps)

    def _observe(self, step: int) -> Diagnosis:
        dist = _dist()
        if dist:
            self.stats.all_reduce()
            if self.gate_tap is not None:
                self.gate_tap.all_reduce()
        heads = self.stats.heads()
        if self.series is None:
            self.series = [(Site(h["layer"], h["stack"], h["kind"]), h["head"]) for h in heads]
            self.sites = sorted({s for s, _ in self.series})
            self.rings = {m: Ring(self.history_size, len(self.series)) for m in self.metric_names}
            self.grad_ring = Ring(self.history_size, len(self.sites))
            for e in self.emitters:
                e.start({"every": self.every, "observe_first": self.observe_first,
                         "near_limit_every": self.near_limit_every, "series": [series_name(s, h) for s, h in self.series],
                         "heads": [{"layer": s.layer, "stack": s.stack, "kind": s.kind, "head": h,
                                    "format": self.sites_tap.formats.get(s), "scale": self.sites_tap.scales.get(s)}
                                   for s, h in self.series],
                         "sites": [series_name(s) for s in self.sites], "thresholds": vars(self.thresholds),
                         **self.meta})
        index = {k: i for i, k in enumerate(self.series)}
        values = {m: np.full(len(self.series), np.nan) for m in self.metric_names}
        for h in heads:
            i = index.get((Site(h["layer"], h["stack"], h["kind"]), h["head"]))
            if i is not None:
                for m in METRICS:
                    values[m][i] = h[m]
        if self.gate_tap is not None:
            for h in self.gate_tap.heads():
                i = index.get((Site(h["layer"], h["stack"], h["kind"]), h["head"]))
                if i is not None:
                    values["mean_gate"][i], values["gate_low_share"][i] = h["mean_gate"], h["share_below_0_1"]
            self.gate_tap.reset()
        largest = self.activations.collect()
        for i, (site, _) in enumerate(self.series):
            values["activation_absmax"][i] = largest.get(self.sites_tap.formats.get(site), math.nan)
        if (rate := self._rate()) is not None:
            values["learning_rate"][:] = rate
        for m in self.metric_names:
            self.rings[m].append(step, values[m])
        grad = self.grads.collect(self.sites)
        if grad is not None and dist and self.grads.on_accumulate:
            # local gradients (no optimizer to read the averaged ones at): their root mean square
            t = torch.tensor(grad, dtype=torch.float64).square()
            dist.all_reduce(t)
            grad = (t / dist.get_world_size()).sqrt().tolist()
        if grad is not None:
            self.grad_ring.append(step, grad)
        new_losses = self._flush_losses()
        loss = float(self.losses.last(1)[1][0, 0]) if new_losses else None
        scale = self._flush_scales()
        formats, scales = self._series_formats()
        self.near_limit = near_limit(values, formats, scales, self.thresholds.overflow_floor_bits)
        record = StepRecord(step, loss, self.series, {m: values[m].tolist() for m in self.metric_names}, self.sites, grad,
                            grad_scale=scale)
        self.latest = record
        for e in self.emitters:
            e.step(record)
        diagnosis = self._diagnose(step, new_losses, formats, scales)
        self.stats.reset()
        if self.trace_nonfinite and (diagnosis.of_type("nonfinite") or (loss is not None and not math.isfinite(loss))):
            self._trace(step)
        for p in list(self.persistent):
            p.reapply(self)
        if self.policy is not None:
            intervention = self.policy.get_intervention(diagnosis)
            if intervention is not None:
                self.apply(intervention, diagnosis)
        return diagnosis

    def _series_formats(self) -> tuple[list[str | None], list[float]]:
        """Each series' number format (None: unknown) and softmax scale, as the seam recorded them."""
        return ([self.sites_tap.formats.get(s) for s, _ in self.series],
                [self.sites_tap.scales.get(s, 1.0) for s, _ in self.series])

    def _diagnose(self, step: int, new_losses: int, formats: list[str | None], scales: list[float]) -> Diagnosis:
        steps, _ = self.rings["entropy"].last()
        gsteps, gvals = self.grad_ring.last()
        trends = Trends(self.series, self.sites, steps, {m: r.last()[1] for m, r in self.rings.items()},
                        gsteps, gvals, self.losses, new_losses, self.thresholds, formats=formats, scales=scales,
                        grad_scale=self.grad_scales if self.grad_scaler is not None else None,
                        warmup_judged=self.warmup_judged)
        issues: list[Finding] = [i for d in self.detectors for i in d(trends)]
        self.warmup_judged = warmup_judged_after(trends)
        diagnosis = Diagnosis(step, issues)
        for issue in issues:
            if issue.key not in self.warned:
                self.warned.add(issue.key)
                diagnosis.new.append(issue)
                for e in self.emitters:
                    e.issue(issue)
        return diagnosis

    # ---------------------------------------------------------------- interventions
    def get_intervention(self, diagnosis: Diagnosis):
        """The policy's intervention for ``diagnosis`` (None without a policy or when it has none)."""
        return None if self.policy is None else self.policy.get_intervention(diagnosis)

    def apply(self, intervention, diagnosis: Diagnosis | None = None) -> dict:
        """Apply an intervention now and log it (step, action, what it did, why)."""
        rate = self._rate()
        detail = intervention.apply(self)
        if (after := self._rate()) != rate:
            self.warmup_judged = True  # the rate is the monitor's now: a cut is not the end of a warm-up
            self._last_rate = after
        entry = {"step": self.step, "action": intervention.name, "detail": detail,
                 "reason": getattr(intervention, "reason", "") or "requested",
                 **getattr(intervention, "fields", {})}  # structured extras (a rollback's restored step)
        self.log_intervention(entry)
        return entry

    def keep_applying(self, intervention) -> None:
        """Re-apply ``intervention`` on every later observed step, in place of any earlier one of its
        kind (after a rollback the policy's actions are applied anew: the new QK-clip and back-off
        replace the old ones instead of stacking on them)."""
        self.persistent = [p for p in self.persistent if type(p) is not type(intervention)] + [intervention]

    def forget_history(self, keep_until: int | None = None) -> None:
        """Drop the observations, losses and warnings of the steps a rollback undid (they describe a
        trajectory that no longer exists): the detectors judge the restored run afresh and may warn
        again. ``keep_until``: the restored snapshot's step; the observations up to it are the restored
        run's own past and stay, moved to end just before the loop's next step, so a trend that resumes
        after the rollback is judged on them at once (None: drop every observation)."""
        if keep_until is None or keep_until > self.step:
            if self.series is not None:
                self.rings = {m: Ring(self.history_size, len(self.series)) for m in self.metric_names}
                self.grad_ring = Ring(self.history_size, len(self.sites))
            self.losses = Ring(self.loss_history, 1)
        else:
            shift = self.step - keep_until
            self.rings = {m: r.rewound(keep_until, shift) for m, r in self.rings.items()}
            if self.grad_ring is not None:
                self.grad_ring = self.grad_ring.rewound(keep_until, shift)
            self.losses = self.losses.rewound(keep_until, shift)
        self._pending.clear()
        self.warned.clear()
        self.latest = None

    def log_intervention(self, entry: dict, quiet: bool = False) -> None:
        """Record an intervention; ``quiet`` (repeated actions such as QK-clip): only to the sinks that
        keep every step's record (``Emitter.records_repeats``: JSONL, TensorBoard, W&B), not the console."""
        self.interventions.append(entry)
        for e in self.emitters:
            if not quiet or e.records_repeats:
                e.intervention(entry)

    def emit_issue(self, issue: Finding) -> None:
        for e in self.emitters:
            e.issue(issue)

    # ---------------------------------------------------------------- NaN/Inf
    def _trace(self, step: int) -> None:
        if self.last_inputs is None:
            return
        from attnkit.monitor.nonfinite import trace_nonfinite

        args, kwargs = self.last_inputs
        was_active = self.session.active
        self.session.active = False
        try:
            result = trace_nonfinite(self.model, args, kwargs, step=step, monitor=self)
        finally:
            self.session.active = was_active
        self.traces.append(result)
        issue = result.issue()
        if issue.key not in self.warned:
            self.warned.add(issue.key)
            self.emit_issue(issue)

    # ---------------------------------------------------------------- queries
    def modules(self) -> dict[Site, nn.Module]:
        """The attention module of each site observed so far (from the seam's calls)."""
        return dict(self.sites_tap.modules)

    def last_value(self, metric: str, site: Site, head: int) -> float:
        """The latest observed value of a head's metric (NaN if never observed)."""
        if self.series is None or (site, head) not in self.series:
            return math.nan
        _, vals = self.rings[metric].last(1)
        return float(vals[0, self.series.index((site, head))]) if len(vals) else math.nan

    def gate_change(self) -> list[dict]:
        """Per head of a gated model: mean gate and share below 0.1 at the first observed step still
        in the history and at the latest, and their change (how the gates moved in training)."""
        if self.gate_tap is None or self.series is None or not len(self.rings["mean_gate"]):
            return []
        steps, mean = self.rings["mean_gate"].last()
        _, low = self.rings["gate_low_share"].last()
        out = []
        for i, (site, head) in enumerate(self.series):
            seen = np.flatnonzero(np.isfinite(mean[:, i]))
            if not len(seen):
                continue
            a, b = seen[0], seen[-1]
            out.append({"series": series_name(site, head), "layer": site.layer, "head": head,
                        "first_step": int(steps[a]), "step": int(steps[b]),
                        "mean_gate_first": float(mean[a, i]), "mean_gate": float(mean[b, i]),
                        "mean_gate_change": float(mean[b, i] - mean[a, i]),
                        "share_below_0_1_first": float(low[a, i]), "share_below_0_1": float(low[b, i]),
                        "share_below_0_1_change": float(low[b, i] - low[a, i])})
        return out

    def memory_bytes(self) -> int:
        """Bytes held by the history: constant once the first step is observed."""
        return sum(r.nbytes for r in self.rings.values()) + self.losses.nbytes + (
            self.grad_ring.nbytes if self.grad_ring is not None else 0)

    def snapshot_bytes(self) -> int:
        """Host memory held by the rollback snapshots (0 without them)."""
        return self.snapshots.nbytes if self.snapshots is not None else 0

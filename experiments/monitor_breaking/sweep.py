"""Training runs that really break, and the monitor judged on them.

Small GPT-2 and Llama models (transformers, random init, eager attention) trained on the built-in
KJV corpus (reference tokenizer, 1,024 tokens) the way users train: AdamW, linear warm-up then
constant LR, in fp32, bf16 autocast, or fp16 autocast with ``torch.amp.GradScaler("cpu")``. Axes:
architecture (GPT-2; Llama; Llama with QK-norm = Qwen3's attention), precision, attention
temperature t (every attention module's own ``scaling`` divided by t: a fixed architectural
temperature that the model's eager kernel multiplies q·kᵀ by, logits × 1/t), learning rate and
warm-up. Eager attention because it computes q·kᵀ in the autocast dtype, as GPT-2's and Llama's
reference code do: an fp16 logit overflow is a real overflow there.

Each configuration runs in one of several **arms** (``ARMS``):

- ``plain``: an ``AttentionMonitor`` attached with no policy (bit for bit the unmonitored run; its
  JSONL is what the predictor is judged and tuned on, offline, by ``attnkit.monitor.replay``).
- ``monitor``: the same with the monitor's rescue policy (``monitor_policy``); ``monitor_<name>``: with
  the policy of that name in ``policies.POLICIES``.
- ``clip``: gradient clipping to norm 1.0 (no monitor).
- ``spike_rollback``: attention-blind loss-spike rollback (PaLM/OPT practice): in-memory snapshots,
  on a loss ≥ 1 nat above the median of the 32 before (or non-finite) restore the newest snapshot
  at least 8 steps older and go on with the next batches; at most 3 times.
- ``zloss``: PaLM's z-loss, 1e-4 · log²Z of the output softmax, added to the loss.
- ``qknorm``: the same configuration with QK-norm from the start (Llama → Qwen3 attention; GPT-2
  has no QK-norm variant in transformers: not run).
- ``half_lr``: the plain run at half the learning rate (the rescue test's reference).
- ``cut<f>_at<n>`` (e.g. ``cut0.25_at25``): the plain run with its learning rate × f from step n on, no
  monitor — what a warning at step n acted on by that cut could give at best (no rollback, no steps undone).

THE FAILURE RULE (fixed before any predictor was tuned; ``label``):
  a run FAILED when
  (a) non-finite: its training loss is non-finite at 10 consecutive steps (the run is stopped
      there) or at any of its last 20 steps; failure step = the first non-finite loss of that
      streak; kind ``nonfinite``; or
  (b) unrecovered spike: after warm-up, the 10-step mean loss rises ≥ 1.0 nat above its running
      minimum, and the final 20-step mean stays ≥ 0.5 nat above that minimum (never recovers);
      failure step = the first step of that rise; kind ``spike``.
  Every other run is HEALTHY. The loss tested is every loss the loop logged, in order (a
  rollback's jump back counts).

THE FAILURE RULE, VERSION 2 (``label_v2``; written 2026-12-07 09:45 UTC, after the second round and
before any run of seeds 3 and 4, and before the predictor's third-round tuning): rules (a) and (b)
above, and
  (c) stalled on non-finite gradients (fp16 with a GradScaler only): the GradScaler skipped the
      update (its gradients were non-finite) at ≥ 50 % of the last 50 steps; failure step = the first
      skipped update of the first 20 steps s … s + 19 of which ≥ 80 % were skipped; kind ``stalled``.
  A run whose every update is skipped has stopped training as surely as one whose loss is NaN; the
  first rule called such runs healthy because their loss stays finite (the GradScaler throws the
  non-finite gradients away). ``skipped`` is recorded per step: the scale went down at that step's
  ``scaler.update()``. Both labels are kept in ``runs.jsonl`` (``kind``/``failed_at`` by the first
  rule, ``kind_v2``/``failed_at_v2`` by this one).

    experiments/monitor_breaking/run_plain.sh    # the plain runs (the grid as run; see README.md)
    experiments/monitor_breaking/run_arms.sh     # half-LR, monitor and baseline arms on the held-out seed
    python experiments/monitor_breaking/sweep.py --out runs/x --archs gpt2 --precisions fp16 --lrs 0.2 --seeds 0

Writes ``runs.jsonl`` (one line per run; reruns skip what is there) and each plain run's monitor
JSONL under ``--out``; ``analyze.py`` makes the tables.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnkit.monitor.snapshots import _nbytes  # the monitor's own count of a snapshot's bytes

# ---------------------------------------------------------------- the failure rule (see the docstring)
NONFINITE_STREAK = 10
TAIL = 20
SPIKE_NATS = 1.0
UNRECOVERED_NATS = 0.5
SMOOTH = 10


def label(losses: list[float], warmup: int) -> tuple[str | None, int | None]:
    """(kind, failure step) by the failure rule, or (None, None) for a healthy run."""
    bad = [not math.isfinite(x) for x in losses]
    streak_start, run = None, 0
    for i, b in enumerate(bad):
        run = run + 1 if b else 0
        if run == NONFINITE_STREAK:
            streak_start = i - NONFINITE_STREAK + 1
            break
    if streak_start is None and any(bad[-TAIL:]):
        tail_start = len(bad) - TAIL
        first_bad = next(i for i in range(max(tail_start, 0), len(bad)) if bad[i])
        # the first non-finite loss of the streak that reaches the tail
        while first_bad > 0 and bad[first_bad - 1]:
            first_bad -= 1
        streak_start = first_bad
    if streak_start is not None:
        return "nonfinite", streak_start
    smooth = [statistics.fmean(losses[max(0, i - SMOOTH + 1):i + 1]) for i in range(len(losses))]
    best, rise = math.inf, None
    for i, s in enumerate(smooth):
        if i >= warmup and s >= best + SPIKE_NATS:
            rise = i
            break
        best = min(best, s)
    if rise is not None:
        final = statistics.fmean(losses[-TAIL:])
        if final >= best + UNRECOVERED_NATS:
            # the first step of the rise: where the smoothed loss left its minimum for good
            start = rise
            while start > 0 and smooth[start - 1] > best + 1e-9 and start > warmup:
                start -= 1
            return "spike", start
    return None, None


STALL_TAIL = 50
STALL_TAIL_SHARE = 0.5
STALL_WINDOW = 20
STALL_WINDOW_SHARE = 0.8


def label_v2(losses: list[float], warmup: int, skipped: list[bool] | None) -> tuple[str | None, int | None]:
    """(kind, failure step) by the second failure rule: the first rule, then (c) stalled."""
    kind, at = label(losses, warmup)
    if kind is not None or not skipped:
        return kind, at
    tail = skipped[-STALL_TAIL:]
    if len(tail) < STALL_TAIL or sum(tail) < STALL_TAIL_SHARE * STALL_TAIL:
        return None, None
    for s in range(len(skipped) - STALL_WINDOW + 1):
        if sum(skipped[s:s + STALL_WINDOW]) >= STALL_WINDOW_SHARE * STALL_WINDOW:
            return "stalled", s + skipped[s:].index(True)
    return "stalled", len(skipped) - STALL_TAIL  # ≥ 50 % of the tail skipped, never 80 % of 20 in a row


# ---------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    arch: str  # gpt2 | llama | llama_qknorm
    precision: str  # fp32 | bf16 | fp16
    temperature: float  # logits × 1/t
    lr: float
    warmup: int
    seed: int
    arm: str = "plain"

    @property
    def name(self) -> str:
        return (f"{self.arch}_{self.precision}_t{self.temperature:g}_lr{self.lr:g}_w{self.warmup}_s{self.seed}"
                f"_{self.arm}")

    def key(self) -> tuple:
        return (self.arch, self.precision, self.temperature, self.lr, self.warmup, self.seed)


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Shape:
    width: int = 64
    layers: int = 2
    heads: int = 4
    context: int = 64
    batch: int = 8
    steps: int = 150
    every: int = 4  # the monitor observes one step in this many
    observe_first: int = 0  # ... and every one of the first this many steps
    near_limit_every: int | None = None  # ... and one in this many while a figure is near its format's limit


def build_model(arch: str, seed: int, vocab: int, shape: Shape, temperature: float) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    d, L, H, T = shape.width, shape.layers, shape.heads, shape.context
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=L, n_head=H, n_embd=d, n_positions=T, vocab_size=vocab, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
    else:
        common = dict(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=H // 2, max_position_embeddings=T, vocab_size=vocab,
                      tie_word_embeddings=True)
        if arch == "llama":
            model = LlamaForCausalLM._from_config(LlamaConfig(**common), attn_implementation="eager")
        elif arch == "llama_qknorm":
            model = Qwen3ForCausalLM._from_config(Qwen3Config(head_dim=d // H, **common), attn_implementation="eager")
        else:
            raise ValueError(arch)
    # the attention temperature: each attention module's own softmax scale / t
    for m in model.modules():
        if hasattr(m, "scaling") and hasattr(m, "layer_idx"):
            m.scaling = m.scaling / temperature
    return model


def batches(ids: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        start = torch.randint(0, ids.numel() - context - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + context] for s in start.tolist()])


# ---------------------------------------------------------------- arms
def monitor_policy(cfg: Config):
    """The monitor's rescue policy (see ``policies.py``)."""
    from policies import POLICY

    return POLICY(cfg)


class SpikeRollback:
    """Attention-blind: snapshot every ``every`` steps (keep 2); on a loss spike (≥ 1 nat above the
    median of the 32 before) or a non-finite loss, restore the newest snapshot ≥ 8 steps old."""

    def __init__(self, model, opt, sched, every: int = 25, times: int = 3) -> None:
        self.model, self.opt, self.sched, self.every, self.times = model, opt, sched, every, times
        self.snaps: list[tuple[int, dict]] = []
        self.history: list[float] = []
        self.rollbacks, self.undone, self.nbytes = 0, 0, 0

    def _state(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                              "sched": self.sched.state_dict()})

    def after(self, step: int, loss: float) -> None:
        before = [x for x in self.history[-32:] if math.isfinite(x)]
        spike = (not math.isfinite(loss)) or (len(before) >= 16 and loss >= statistics.median(before) + SPIKE_NATS)
        self.history.append(loss)
        if spike and self.rollbacks < self.times:
            old = [s for s in self.snaps if s[0] <= step - 8]
            if old:
                s, state = old[-1]
                self.model.load_state_dict(state["model"])
                self.opt.load_state_dict(state["opt"])
                self.sched.load_state_dict(state["sched"])
                self.rollbacks += 1
                self.undone += step - s
                self.history = self.history[:max(0, len(self.history) - (step - s))]
                return
        if not spike and step % self.every == 0:
            self.snaps = (self.snaps + [(step, self._state())])[-2:]
            self.nbytes = max(self.nbytes, sum(_nbytes(st) for _, st in self.snaps))


ARMS = ("plain", "monitor", "clip", "spike_rollback", "zloss", "qknorm", "half_lr")  # and monitor_<policy>, cut<f>_at<n>
CUT_ARM = re.compile(r"cut([0-9.]+)_at([0-9]+)")


def check_arm(arm: str) -> str:
    """``arm`` if it names an arm this sweep runs, else a ValueError (a typo would otherwise run a plain run)."""
    from policies import POLICIES

    if arm in ARMS or arm.removeprefix("monitor_") in POLICIES or CUT_ARM.fullmatch(arm):
        return arm
    raise ValueError(f"unknown arm {arm!r}: one of {', '.join(ARMS)}, monitor_<policy> ({', '.join(POLICIES)}) "
                     f"or cut<factor>_at<step>")


def _cut(arm: str) -> tuple[float, int]:
    """``cut<f>_at<n>`` -> (f, n); any other arm: no cut."""
    m = CUT_ARM.fullmatch(arm)
    return (float(m[1]), int(m[2])) if m else (1.0, 10 ** 9)


# ---------------------------------------------------------------- one run
def evaluate(model, val: torch.Tensor, precision: str) -> float:
    dtype = AUTOCAST[precision]
    with torch.no_grad(), (torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()):
        losses = [float(model(input_ids=x, labels=x).loss) for x in val]
    return statistics.fmean(losses) if all(math.isfinite(x) for x in losses) else math.nan


def train(cfg: Config, ids: torch.Tensor, val: torch.Tensor, vocab: int, shape: Shape, out: Path) -> dict:
    from attnkit.monitor import AttentionMonitor

    arch, lr = cfg.arch, cfg.lr
    if cfg.arm == "qknorm":
        arch = "llama_qknorm"
    if cfg.arm == "half_lr":
        lr = cfg.lr / 2
    model = build_model(arch, cfg.seed, vocab, shape, cfg.temperature).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    cut, cut_at = _cut(cfg.arm)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * (cut if s >= cut_at else 1.0))
    dtype = AUTOCAST[cfg.precision]
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.precision == "fp16")
    monitor = None
    if cfg.arm == "plain" or cfg.arm.startswith("monitor"):
        policy, snapshots, thresholds = (monitor_policy(cfg) if cfg.arm != "plain" else (None, None, None))
        from policies import thresholds_for

        monitor = AttentionMonitor(model, every=shape.every, observe_first=shape.observe_first,
                                   near_limit_every=shape.near_limit_every, log_dir=out / cfg.name, emit=(), optimizer=opt,
                                   scheduler=sched, policy=policy, snapshots=snapshots,
                                   thresholds=thresholds or thresholds_for(cfg), trace_nonfinite=False,
                                   grad_scaler=scaler if cfg.arm != "plain" and scaler.is_enabled() else None,
                                   meta={**asdict(cfg), "name": cfg.name})
    rollback = SpikeRollback(model, opt, sched) if cfg.arm == "spike_rollback" else None
    losses, warnings, t0 = [], [], time.time()
    snapshot_bytes, streak = 0, 0
    skipped: list[bool] = []  # fp16: the GradScaler skipped this step's update (non-finite gradients)
    with monitor if monitor is not None else nullcontext():
        for step, x in enumerate(batches(ids, shape.steps, shape.batch, shape.context, cfg.seed)):
            with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
                output = model(input_ids=x, labels=x)
            loss = output.loss
            if cfg.arm == "zloss":
                z = torch.logsumexp(output.logits.float(), dim=-1)  # (B, T)
                loss = loss + 1e-4 * z.square().mean()
            scaler.scale(loss).backward()
            if cfg.arm == "clip":
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(opt)  # skipped (and the scale lowered) on non-finite gradients, as users' loops do
            scaler.update()
            if scale_before is not None:
                skipped.append(bool(scaler.get_scale() < scale_before))
            sched.step()
            opt.zero_grad(set_to_none=True)
            value = float(output.loss.detach())
            losses.append(value)
            if monitor is not None:
                d = monitor.on_step(step, loss=output.loss)
                snapshot_bytes = max(snapshot_bytes, monitor.snapshot_bytes())
                if d:
                    warnings += [{"type": i.type, "step": i.step, "where": i.where, "value": i.value,
                                  "started": i.started} for i in d.new]
            if rollback is not None:
                rollback.after(step, value)
            streak = streak + 1 if not math.isfinite(value) else 0
            if streak >= NONFINITE_STREAK:
                break
    kind, failed_at = label(losses, cfg.warmup)
    kind_v2, failed_at_v2 = label_v2(losses, cfg.warmup, skipped or None)
    interventions = list(monitor.interventions) if monitor is not None else []
    return {
        **asdict(cfg), "name": cfg.name, "steps": len(losses), "losses": losses, "kind": kind, "failed_at": failed_at,
        "kind_v2": kind_v2, "failed_at_v2": failed_at_v2, "skipped": skipped or None,
        "first_nonfinite": next((i for i, x in enumerate(losses) if not math.isfinite(x)), None),
        "final_loss": evaluate(model, val, cfg.precision), "train_tail": statistics.fmean(losses[-TAIL:]),
        "warnings": warnings[:300], "interventions": [i for i in interventions if not i.get("quiet")][:100],
        "undone_steps": sum(i.get("undone_steps", 0) for i in interventions) + (rollback.undone if rollback else 0),
        "rollbacks": sum("undone_steps" in i for i in interventions) + (rollback.rollbacks if rollback else 0),
        "snapshot_bytes": max(snapshot_bytes, rollback.nbytes if rollback else 0),
        "grad_scale": float(scaler.get_scale()) if cfg.precision == "fp16" else None,
        "seconds": time.time() - t0,
    }


# ---------------------------------------------------------------- the sweep
_DATA: dict = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run(cfg: Config, shape: Shape, out: Path) -> dict:
    try:
        return train(cfg, _DATA["ids"], _DATA["val"], _DATA["vocab"], shape, out)
    except Exception as e:  # a run that crashes is recorded, not lost
        return {**asdict(cfg), "name": cfg.name, "error": f"{type(e).__name__}: {e}"}


def load_data(shape: Shape) -> None:
    from transformers import AutoTokenizer

    from attnkit.common.data import encode_documents, load_corpus
    from attnkit.common.loading.registry import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("reference"))
    corpus = load_corpus("kjv")
    _DATA["ids"] = encode_documents(tok, corpus.split("train"))
    val_ids = encode_documents(tok, corpus.split("validation"))
    n = shape.context
    blocks = val_ids[: (val_ids.numel() // n) * n].view(-1, n)[:64]  # 64 fixed validation blocks
    _DATA["val"] = list(blocks.split(shape.batch))
    _DATA["vocab"] = len(tok)


def grid(args) -> list[Config]:
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    out = []
    for arch, prec, t, lr, w, seed, arm in itertools.product(
            args.archs.split(","), args.precisions.split(","), floats(args.temperatures), floats(args.lrs),
            ints(args.warmups), ints(args.seeds), [check_arm(a) for a in args.arms.split(",")]):
        if arm == "qknorm" and arch != "llama":
            continue
        out.append(Config(arch, prec, t, lr, w, seed, arm))
    return sorted(out, key=lambda c: c.seed)  # the design seed's runs first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/breaking")
    p.add_argument("--archs", default="gpt2,llama")
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--temperatures", default="0.25,1,4")
    p.add_argument("--lrs", default="0.05,0.1,0.2")
    p.add_argument("--warmups", default="10")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default="plain")
    p.add_argument("--only-failed-from", default=None,
                   help="a sweep directory: run the arms only for configurations whose plain run failed there")
    p.add_argument("--skip-failed-from", default=None,
                   help="a sweep directory: run the arms only for configurations whose plain run there was healthy")
    p.add_argument("--only-finite-ref", action="store_true",
                   help="with --only-failed-from: configurations whose half-LR run there ended with a finite loss")
    p.add_argument("--rule", choices=("v1", "v2"), default="v1",
                   help="the failure rule --only-failed-from / --skip-failed-from select by (v2: label_v2)")
    p.add_argument("--only-warned-after", type=int, default=None,
                   help="with --only-failed-from: configurations whose plain run's first predictor warning (replayed "
                        "as analyze_round3 does) came at this step or later")
    p.add_argument("--only-warned", action="store_true",
                   help="with --only-failed-from: configurations whose plain run had a predictor warning, too")
    p.add_argument("--steps", type=int, default=Shape.steps)
    p.add_argument("--observe-first", type=int, default=Shape.observe_first,
                   help="the monitor observes every one of the first this many steps, then one in --every")
    p.add_argument("--every", type=int, default=Shape.every,
                   help="the monitor observes one step in this many (1: every step, which the replay can thin "
                        "to any schedule, see analyze.py --observe)")
    p.add_argument("--near-limit-every", type=int, default=None,
                   help="the monitor observes one step in this many while a figure is near its format's limit")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    shape = Shape(steps=args.steps, every=args.every, observe_first=args.observe_first,
                  near_limit_every=args.near_limit_every)
    kind_key = "kind_v2" if args.rule == "v2" else "kind"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "runs.jsonl"
    done = set()
    if log_path.exists():
        done = {json.loads(line)["name"] for line in open(log_path)}
    configs = [c for c in grid(args) if c.name not in done]
    if args.only_failed_from:
        from analyze import load_runs, predicted_first

        source = Path(args.only_failed_from)
        plain = {r["name"].removesuffix("_plain"): r for r in load_runs(source) if r["arm"] == "plain"}
        keep = []
        for c in configs:
            r = plain.get(Config(*c.key()[:2], c.temperature, c.lr, c.warmup, c.seed).name.removesuffix("_plain"))
            if r is None:
                continue
            if r.get(kind_key) or (args.only_warned and predicted_first(r, source) is not None):
                keep.append(c)
        configs = keep
        if args.only_finite_ref:
            refs = {r["name"].removesuffix("_half_lr"): r for r in load_runs(source) if r["arm"] == "half_lr"}
            configs = [c for c in configs if (ref := refs.get(Config(*c.key()).name.removesuffix("_plain"))) is not None
                       and math.isfinite(ref["final_loss"])]
    if args.only_warned_after is not None and not args.only_failed_from:
        p.error("--only-warned-after needs --only-failed-from")
    if args.only_failed_from and args.only_warned_after is not None:
        from analyze_round3 import config_runs

        _, _, warn = config_runs(Path(args.only_failed_from), {c.seed for c in configs})
        configs = [c for c in configs if (w := warn.get(c.key())) is not None
                   and w >= args.only_warned_after]
    if args.skip_failed_from:
        from analyze import load_runs

        plain = {r["name"].removesuffix("_plain"): r for r in load_runs(Path(args.skip_failed_from)) if r["arm"] == "plain"}
        configs = [c for c in configs if (r := plain.get(
            Config(*c.key()[:2], c.temperature, c.lr, c.warmup, c.seed).name.removesuffix("_plain"))) is not None
            and not r[kind_key]]
    print(f"{len(configs)} runs to do ({len(done)} done)", flush=True)
    load_data(shape)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    with open(log_path, "a") as log, ProcessPoolExecutor(args.jobs, initializer=_init_worker,
                                                         initargs=(args.threads,)) as pool:
        futures = [pool.submit(_run, c, shape, out) for c in configs]
        for i, f in enumerate(as_completed(futures)):
            r = f.result()
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(f"[{i + 1}/{len(configs)} {time.time() - t0:.0f}s] {r['name']:48s} "
                  + (r.get("error") or f"kind={r['kind']} at={r['failed_at']} final={r['final_loss']:.3f} "
                     f"warn={len(r['warnings'])} {r['seconds']:.0f}s"), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

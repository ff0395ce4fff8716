"""Seed 001's experiments for ``attnkit monitor``: does it predict attention instabilities, and
does its intervention rescue the runs that fail?

Small GPT-2- and Llama-shaped models (and the Llama shape with QK-layernorm, i.e. Qwen3's
attention) are trained on the KJV training split (the reference corpus, reference tokenizer)
over a learning-rate sweep (Wortsman et al. 2023's small-scale proxy: AdamW β=(0.9, 0.95),
ε=1e-8, linear warmup) and several seeds, each with an ``AttentionMonitor`` attached (no
intervention). A run is **unstable** when its loss becomes non-finite or rises ≥ ``--spike``
nats above its running minimum after warmup (the divergence step is the first such step), or
when it ends ≥ ``--degrade`` nats above the best final loss of its architecture in the sweep
(stalled: its failure step is where its 20-step mean loss was lowest).
Predicted: a warning of ``--predictors`` (default ``softmax_saturation``; the first sweeps used logit
growth, overflow risk, entropy fall or collapse) was issued before the failure step; lead time =
failure step − warning step. A false alarm: such a warning on a run that stayed stable. Every run
with a warning is then re-run with the same seed and ``--policy`` applied from its first warning
(``POLICIES``; the first sweeps' ``clip_halve``: QK-clip of the heads at the max logit they had
when warned, halving the LR on entropy collapse or a loss spike); an unstable run is counted
rescued when its re-run is stable by the same criteria. ``--rescue-from DIR`` re-scores finished
base runs' traces with ``--predictors`` and runs only the rescues.

    python experiments/monitor_sweep.py --out runs/monitor_sweep          # ~30 min on 1 busy core
    python experiments/monitor_sweep.py --out runs/monitor_heldout --seeds 2,3 --horizon 1.0   # held-out seeds
    python experiments/monitor_sweep.py --out runs/monitor_s45 --seeds 4,5 --horizon 1.0 --no-rescue
    python experiments/monitor_sweep.py --out runs/monitor_s45_clip_backoff --rescue-from runs/monitor_s45 \
        --policy clip_backoff --horizon 1.0                                    # second protocol's rescues
    python experiments/monitor_sweep.py --out runs/monitor_s45_rollback --rescue-from runs/monitor_s45 \
        --policy rollback_backoff --horizon 1.0                                # rollback + clip_backoff's actions
    python experiments/monitor_sweep.py --out runs/monitor_temperature --archs gpt2,llama --lrs 3e-3 \
        --temperatures 1,0.5,0.25,0.125 --horizon 1.0                          # temperature sweep
    python experiments/monitor_sweep.py --out runs/quick --steps 60 --lrs 1e-2 --seeds 0 --archs gpt2

Writes ``runs.jsonl`` (one line per run), ``summary.json`` and loss-curve figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from attnkit.common.data import encode_documents, load_corpus
from attnkit.common.loading.registry import resolve_model_path
from attnkit.seam.mods import temperature
from attnkit.monitor import (
    AttentionMonitor, Chain, LRBackoff, LRToRate, Policy, QKClip, ReduceLR, Rollback, Snapshots, Thresholds,
)
from attnkit.monitor.replay import first_step, replay
from attnkit.seam import attach

# The warnings that count as a prediction. The first sweeps (seeds 0-3) used the per-head ones
# (OLD_PREDICTORS); softmax_saturation was then designed on seeds 0-1's recorded traces.
OLD_PREDICTORS = ("logit_growth", "overflow_risk", "entropy_fall", "entropy_collapse")
PREDICTORS = ("softmax_saturation",)


def build_model(arch: str, seed: int, vocab: int, args) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    d, L, H, T = args.width, args.layers, args.heads, args.context
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=L, n_head=H, n_embd=d, n_positions=T, vocab_size=vocab, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    common = dict(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=L, num_attention_heads=H,
                  num_key_value_heads=H // 2, max_position_embeddings=T, vocab_size=vocab, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaForCausalLM._from_config(LlamaConfig(**common), attn_implementation="sdpa")
    if arch == "llama_qknorm":
        return Qwen3ForCausalLM._from_config(Qwen3Config(head_dim=d // H, **common), attn_implementation="sdpa")
    raise ValueError(arch)


def batches(ids: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, ids.numel() - context - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + context] for s in start.tolist()])


def _clip_at_warning(tau_floor: float):
    """QK-clip at the warned head's own max logit, at most the danger threshold, never below tau_floor;
    a negative tau_floor: at exactly -tau_floor (a τ fixed to the model's scale, not the warning's)."""
    if tau_floor < 0:
        return lambda issue: QKClip(-tau_floor)
    return lambda issue: QKClip(max(min(issue.value, issue.threshold), tau_floor))


def clip_halve(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """The first sweeps' policy: QK-clip on a logit warning; the LR halved once on entropy fall or
    collapse or a loss spike."""
    clip = _clip_at_warning(tau_floor)
    rules = {t: clip for t in ("logit_growth", "overflow_risk", "softmax_saturation")}
    rules.update({t: (lambda i: ReduceLR(0.5)) for t in ("entropy_fall", "entropy_collapse", "loss_spike")})
    return Policy(rules={t: r for t, r in rules.items() if t in predictors or t == "loss_spike"})


def clip_backoff(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """From the first prediction: QK-clip (as above) and an LR back-off that halves the rate now and
    on every observed step where half the heads' max logits still grow 1.25x from where the clip
    left them (QK-norm models: the back-off alone, QK-clip cannot act there). Calibration round 1."""
    clip = _clip_at_warning(tau_floor)
    return Policy(rules={t: (lambda i: Chain((clip(i), LRBackoff(growth=1.25, floor=0.0)))) for t in predictors})


def clip_backoff_slow(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """Round 2: the back-off at the detectors' own rate (1.25x per window, 1.03x per observation),
    heads above the floor only (LRBackoff's defaults)."""
    clip = _clip_at_warning(tau_floor)
    return Policy(rules={t: (lambda i: Chain((clip(i), LRBackoff()))) for t in predictors})


def clip_rate(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """From the first prediction: QK-clip (as above) and the LR set once so the heads' measured logit
    growth would slow to the detectors' growth_min per window (LRToRate: growth rate ∝ lr)."""
    clip = _clip_at_warning(tau_floor)
    return Policy(rules={t: (lambda i: Chain((clip(i), LRToRate()))) for t in predictors})


def backoff(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """The LR back-off alone (no QK-clip), to tell the two apart."""
    return Policy(rules={t: (lambda i: LRBackoff()) for t in predictors})


@dataclass
class SetBaseLR:
    """A diagnostic, not a policy a run could use: the LR set to a rate known (from the whole sweep)
    to train well. Tells whether any LR change at the warning step could still rescue a run."""

    lr: float = 3e-3
    reason: str = ""
    name: str = "set_lr"

    def apply(self, monitor) -> str:
        from attnkit.monitor.interventions import _reduce_lr

        before, after = _reduce_lr(monitor, self.lr / monitor.scheduler.base_lrs[0])
        return f"lr {before:.3g} → {after:.3g} (base rate set to {self.lr:g})"


def oracle_lr(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """QK-clip (as above) and the base LR set to 3e-3, the sweep's best rate (an oracle bound)."""
    clip = _clip_at_warning(tau_floor)
    return Policy(rules={t: (lambda i: Chain((clip(i), SetBaseLR()))) for t in predictors})


def rollback_backoff(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """``clip_backoff``'s actions after a rollback: restore the newest in-memory snapshot taken before
    the warned trend's start (PaLM's and OPT's restart from a checkpoint before the spike), then the
    QK-clip and LR back-off act on the restored run. A warning on the restored run rolls back again
    (at most 3 times). The loop goes on with its next batches; the step budget is unchanged."""
    clip = _clip_at_warning(tau_floor)
    return Policy(rules={t: (lambda i: Chain((Rollback(i.started, times=3), clip(i),
                                              LRBackoff(growth=1.25, floor=0.0)))) for t in predictors})


def rollback_backoff10(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """Calibration round 2: as ``rollback_backoff``, but the back-off counts only heads at or above the
    detectors' ``logit_floor`` (10): on a run restored to near its initialisation every head's max logit
    grows ≥ 1.25x per observation while it learns (round 1 halved the LR to 1/64 of it there)."""
    clip = _clip_at_warning(tau_floor)
    return Policy(rules={t: (lambda i: Chain((Rollback(i.started, times=3), clip(i), LRBackoff(growth=1.25))))
                         for t in predictors})


def rollback_rate(tau_floor: float, predictors: tuple[str, ...]) -> Policy:
    """Calibration round 2: the LR set by ``LRToRate`` from the warned run's own logit growth (measured
    before the rollback: growth rate ∝ LR under Adam), then the rollback, the QK-clip and the back-off
    of round 2 (its first halving included: QK-norm heads stay below the floor, where LRToRate does
    not act)."""
    clip = _clip_at_warning(tau_floor)
    return Policy(rules={t: (lambda i: Chain((LRToRate(), Rollback(i.started, times=3), clip(i),
                                              LRBackoff(growth=1.25)))) for t in predictors})


for _policy in (rollback_backoff, rollback_backoff10, rollback_rate):
    _policy.needs_snapshots = True


POLICIES = {"clip_halve": clip_halve, "rollback_backoff": rollback_backoff, "rollback_backoff10": rollback_backoff10,
            "rollback_rate": rollback_rate, "oracle_lr": oracle_lr, "clip_backoff": clip_backoff,
            "clip_backoff_slow": clip_backoff_slow, "clip_rate": clip_rate, "backoff": backoff}


def train(arch: str, lr: float, seed: int, ids: torch.Tensor, vocab: int, args, out: Path, rescue: bool,
          temp: float = 1.0) -> dict:
    model = build_model(arch, seed, vocab, args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    name = f"{arch}_lr{lr:g}" + (f"_t{temp:g}" if temp != 1.0 else "") + f"_s{seed}" + ("_rescue" if rescue else "")
    make_policy = POLICIES[args.policy]
    # in-memory snapshots for a rollback (one at start, then every --snapshot-every healthy steps)
    snapshots = Snapshots(args.snapshot_every, args.snapshots_kept) if (
        rescue and getattr(make_policy, "needs_snapshots", False)) else None
    monitor = AttentionMonitor(model, every=args.every, log_dir=out / name, emit=(), optimizer=opt, scheduler=sched,
                               policy=make_policy(args.tau_floor, args.predictors) if rescue else None,
                               thresholds=Thresholds(horizon=args.horizon), snapshots=snapshots,
                               meta={"arch": arch, "lr": lr, "seed": seed, "rescue": rescue})
    snapshot_bytes = 0
    losses, warnings, t0 = [], [], time.time()
    # An attention temperature (seed 001's experiment 1) through the seam: logits / temp in every head.
    scaled = attach(model, score_mods=[temperature(temp)]) if temp != 1.0 else nullcontext()
    with scaled, monitor:
        for step, x in enumerate(batches(ids, args.steps, args.batch, args.context, seed)):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            d = monitor.on_step(step, loss=loss)
            snapshot_bytes = max(snapshot_bytes, monitor.snapshot_bytes())
            if d:
                warnings += [{"type": i.type, "step": i.step, "where": i.where(), "value": i.value,
                              "started": i.started, "projected_steps": i.projected_steps} for i in d.new]
            if not math.isfinite(losses[-1]):
                break
    diverged = divergence_step(losses, args.warmup, args.spike)
    first = min((w["step"] for w in warnings if w["type"] in args.predictors), default=None)
    return {"name": name, "arch": arch, "lr": lr, "temperature": temp, "seed": seed, "rescue": rescue,
            "steps": len(losses),
            "losses": losses, "diverged_at": diverged, "first_warning": first, "warnings": warnings[:200],
            "interventions": list(monitor.interventions)[:200], "seconds": time.time() - t0,
            "policy": args.policy if rescue else None, "predictors": list(args.predictors),
            # a rollback's cost: the steps it undid (lost compute: the budget is the same) and the snapshots' memory
            "undone_steps": sum(i.get("undone_steps", 0) for i in monitor.interventions),
            "rollbacks": sum("undone_steps" in i for i in monitor.interventions), "snapshot_bytes": snapshot_bytes,
            "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def divergence_step(losses: list[float], warmup: int, spike: float) -> int | None:
    best = math.inf
    for step, loss in enumerate(losses):
        if not math.isfinite(loss):
            return step
        if step >= warmup and loss >= best + spike:
            return step
        best = min(best, loss)
    return None


def stall_step(losses: list[float], width: int = 20) -> int:
    """Where a run stopped improving: the step of the lowest moving average of ``width`` losses."""
    avg = [sum(losses[max(0, i - width + 1):i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(losses))]
    return min(range(len(avg)), key=avg.__getitem__)


def lineage(r: dict) -> list[int]:
    """The loop steps the run's final state descends from: a rollback at step t to the snapshot of
    step s drops steps s+1..t (their updates were undone). Without rollbacks: every step."""
    kept: list[int] = []
    rollbacks = sorted((i["step"], i["restored_step"]) for i in r.get("interventions", []) if "restored_step" in i)
    for step in range(len(r["losses"])):
        kept.append(step)
        while rollbacks and rollbacks[0][0] == step:
            restored = rollbacks.pop(0)[1]
            kept = [x for x in kept if x <= restored]
    return kept


def rescored_divergence(r: dict, warmup: int, spike: float) -> int | None:
    """The divergence test on the losses of the run's lineage (a rollback's jump back to the restored
    state's loss is not a spike of the trained run); the loop step where it fires."""
    steps = lineage(r)
    at = divergence_step([r["losses"][x] for x in steps], warmup, spike)
    return None if at is None else steps[at]


def summarize(runs: list[dict], degrade: float, warmup: int = 40, spike: float = 1.0) -> dict:
    """A run **failed** when its loss diverged or spiked (``diverged_at``), or when it ended
    ``degrade`` nats or more above the best final loss of its architecture in the sweep (a stalled
    run: its failure step is where it stopped improving). A run that rolled back is tested on the
    losses of its lineage (``lineage``); ``diverged_at_raw`` keeps the test on every loss it logged,
    and ``rescued_raw`` counts the rescues by it."""
    base = [r for r in runs if not r["rescue"]]
    best = {a: min(r["final_loss"] for r in base if r["arch"] == a) for a in {r["arch"] for r in base}}
    for r in runs:
        if any("restored_step" in i for i in r.get("interventions", [])):
            r.setdefault("diverged_at_raw", r["diverged_at"])
            r["diverged_at"] = rescored_divergence(r, warmup, spike)
        r["degraded"] = r["final_loss"] >= best[r["arch"]] + degrade
        r["failed_at"] = r["diverged_at"] if r["diverged_at"] is not None else (
            stall_step(r["losses"]) if r["degraded"] else None)
        raw = r.get("diverged_at_raw", r["diverged_at"])
        r["failed_raw"] = raw is not None or r["degraded"]
    unstable = [r for r in base if r["failed_at"] is not None]
    stable = [r for r in base if r["failed_at"] is None]
    predicted = [r for r in unstable if r["first_warning"] is not None and r["first_warning"] < r["failed_at"]]
    leads = sorted(r["failed_at"] - r["first_warning"] for r in predicted)
    false_alarms = [r for r in stable if r["first_warning"] is not None]
    rescues = {r["name"].removesuffix("_rescue"): r for r in runs if r["rescue"]}
    tried = [r for r in unstable if r["name"] in rescues and r["first_warning"] is not None]
    rescued = [r for r in tried if rescues[r["name"]]["failed_at"] is None]
    rescued_raw = [r for r in tried if not rescues[r["name"]]["failed_raw"]]
    return {
        "runs": len(base), "unstable": len(unstable), "stable": len(stable),
        "predicted": len(predicted), "predicted_fraction": len(predicted) / len(unstable) if unstable else None,
        "median_lead_steps": leads[len(leads) // 2] if leads else None, "lead_steps": leads,
        "false_alarms": len(false_alarms), "false_alarm_fraction": len(false_alarms) / len(stable) if stable else None,
        "rescue_tried": len(tried), "rescued": len(rescued),
        "rescued_fraction": len(rescued) / len(tried) if tried else None, "rescued_raw": len(rescued_raw),
        "best_final_loss": best,
        "table": [{"name": r["name"], "failed_at": r["failed_at"], "diverged_at": r["diverged_at"],
                   "first_warning": r["first_warning"], "final_loss": r["final_loss"],
                   "warning_types": sorted({w["type"] for w in r["warnings"]}),
                   "rescue_failed_at": rescues[r["name"]]["failed_at"] if r["name"] in rescues else "n/a",
                   "rescue_final_loss": rescues[r["name"]]["final_loss"] if r["name"] in rescues else None,
                   "rescue_diverged_at_raw": rescues.get(r["name"], {}).get("diverged_at_raw"),
                   "rescue_undone_steps": rescues.get(r["name"], {}).get("undone_steps")}
                  for r in base],
    }


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(r, next((x for x in runs if x["name"] == r["name"] + "_rescue"), None)) for r in runs if not r["rescue"]
             and r["failed_at"] is not None]
    if not pairs:
        return
    cols = min(4, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (r, rescue) in zip(axes.flat, pairs):
        ax.plot(r["losses"], label="monitored only", lw=0.8)
        if rescue:
            ax.plot(rescue["losses"], label="with intervention", lw=0.8)
        if r["first_warning"] is not None:
            ax.axvline(r["first_warning"], color="orange", ls="--", lw=0.8, label="first warning")
        ax.axvline(r["failed_at"], color="red", ls=":", lw=0.8, label="failed")
        ax.set_title(r["name"], fontsize=8)
        ax.set_ylim(0, 10)
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "loss_pairs.png", dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/monitor_sweep")
    p.add_argument("--archs", default="gpt2,llama,llama_qknorm")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2,1e-1,3e-1")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--temperatures", default="1", help="attention temperatures (logits / t through the seam)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--spike", type=float, default=1.0)
    p.add_argument("--degrade", type=float, default=0.5)
    p.add_argument("--tau-floor", type=float, default=10.0,
                   help="QK-clip's τ: the warned head's max logit clamped to [this, 100]; negative: exactly -this")
    p.add_argument("--horizon", type=float, default=Thresholds().horizon,
                   help="logit_growth warns when the projected steps to the danger threshold are at most this many "
                   "window spans (the held-out run uses 1.0, chosen on the first sweep)")
    p.add_argument("--predictors", default=",".join(PREDICTORS),
                   help=f"warnings that count as a prediction (the first sweeps: {','.join(OLD_PREDICTORS)})")
    p.add_argument("--policy", default="clip_backoff", choices=sorted(POLICIES),
                   help="what the rescue re-runs apply from the first prediction (the first sweeps: clip_halve)")
    p.add_argument("--rescue-from", default=None,
                   help="a directory of finished base runs (runs.jsonl + traces): re-score their traces with "
                   "--predictors offline and run only the rescues of the warned ones, into --out")
    p.add_argument("--only", default=None, help="with --rescue-from: only these base runs (comma-separated names)")
    p.add_argument("--no-rescue", action="store_true",
                   help="base runs only (their traces can be re-scored offline; rescues run later)")
    p.add_argument("--snapshot-every", type=int, default=24,
                   help="rollback policies: an in-memory snapshot every this many healthy steps (and one at start)")
    p.add_argument("--snapshots-kept", type=int, default=4, help="rollback policies: how many snapshots are kept")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.predictors = tuple(args.predictors.split(","))
    Snapshots(args.snapshot_every, args.snapshots_kept)  # bad values fail here, before any training
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("reference"))
    ids = encode_documents(tok, load_corpus("kjv").split("train"))
    vocab = len(tok)
    runs: list[dict] = []
    log = open(out / "runs.jsonl", "w")

    def record(r: dict) -> None:
        runs.append(r)
        log.write(json.dumps(r) + "\n")
        log.flush()
        print(f"{r['name']:32s} diverged_at={r['diverged_at']} first_warning={r['first_warning']} "
              f"final={r['final_loss']:.3f} {r['seconds']:.0f}s", flush=True)

    if args.rescue_from:
        src = Path(args.rescue_from)
        for line in open(src / "runs.jsonl"):
            r = json.loads(line)
            if r["rescue"] or (args.only and r["name"] not in args.only.split(",")):
                continue
            # the base run's warnings under --predictors, from its recorded trace
            issues = replay(src / r["name"] / "monitor.jsonl", Thresholds(horizon=args.horizon), args.predictors)
            r.update(first_warning=first_step(issues, args.predictors), predictors=list(args.predictors),
                     warnings=[{"type": i.type, "step": i.step, "where": i.where(), "value": i.value} for i in issues])
            record(r)
            if r["first_warning"] is not None:
                record(train(r["arch"], r["lr"], r["seed"], ids, vocab, args, out, True, r.get("temperature", 1.0)))
    else:
        for arch in args.archs.split(","):
            for lr in [float(x) for x in args.lrs.split(",")]:
                for temp in [float(x) for x in args.temperatures.split(",")]:
                    for seed in [int(s) for s in args.seeds.split(",")]:
                        for rescue in (False,) if args.no_rescue else (False, True):
                            if rescue and runs[-1]["first_warning"] is None:
                                continue  # nothing to act on (a rescue of a run that turns out stable is not counted)
                            record(train(arch, lr, seed, ids, vocab, args, out, rescue, temp))
    summary = summarize(runs, args.degrade, args.warmup, args.spike)
    summary["args"] = vars(args)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(runs, out)
    print(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=1))


if __name__ == "__main__":
    main()

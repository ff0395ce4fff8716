"""Seed 003's experiment at small scale: which cross-path similarity makes M3PO learn best?

    python experiments/paths/run.py                       # the full experiment (one thread, ~see README)
    python experiments/paths/run.py --report-only         # table, significance and plots from results.json

A character-level Llama (~100k parameters, from scratch) learns 2-digit addition with written-out
column steps (addition_task.py). Per seed: one short supervised warm-up, then from that same checkpoint one
GRPO run per variant -- plain GRPO (λ = 0) and M3PO blending (λ, T) with each registered similarity --
on the same problem batches with the same sampling seed, so variants are paired within a seed.

RL: B prompts x N paths per step, reward 1 for the right answer, group-normalised advantages
(r - mean) / (std + 1e-4), one on-policy update per batch (the PPO ratio is 1, so clipping never
acts and no reference-model KL is used), token-mean policy-gradient loss on log-probs from
attnkit.paths.blended_logprobs: the blended policy that sampled the paths, so learnable
similarities get gradients. Evaluation: greedy single-path decoding (M3PO's test time) on 256
held-out problems.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import addition_task as task  # noqa: E402

from attnkit.errors import UserError  # noqa: E402
from attnkit.paths import blended_logprobs, generate_paths, list_similarities, make_similarity  # noqa: E402
from attnkit.common.io import write_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
LEARNABLE = {"luong": {"rank": 16}, "bahdanau": {"dim": 32}}


def build_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(task.CHARS), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=True, pad_token_id=task.PAD, bos_token_id=None, eos_token_id=task.EOS)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def warmup(model, train, args, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.warmup_lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(args.warmup_steps):
        probs = [train[i] for i in rng.choice(len(train), args.warmup_batch)]
        ids, labels = task.supervised_batch(probs)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def evaluate(model, problems) -> list[int]:
    """Greedy single-path decoding: 1/0 per problem."""
    out = generate_paths(model, task.prompt_batch(problems), n_paths=1, lam=0.0, do_sample=False,
                         think_end_id=task.THINK_END, eos_token_id=task.EOS, pad_token_id=task.PAD,
                         max_new_tokens=task.COMPLETION_LEN)
    return [int(task.reward(c, a, b)) for c, (a, b) in zip(out.completion_ids, problems)]


def variant_spec(name: str, args) -> tuple[str, float]:
    return ("cosine", 0.0) if name == "grpo" else (name, args.lam)


def disagreement(out, n: int) -> float:
    """Share of blended (group, step) cells where the group's thinking paths did not all sample the same token."""
    ids = out.completion_ids.view(-1, n, out.completion_ids.shape[-1])  # (B, N, T)
    act = out.blended_mask.view(-1, n, ids.shape[-1])
    cells = act.sum(1) >= 2  # (B, T): at least two paths blend
    if not bool(cells.any()):
        return float("nan")
    big = torch.where(act, ids, torch.full_like(ids, -1)).amax(1)
    small = torch.where(act, ids, torch.full_like(ids, 10**6)).amin(1)
    return float(((big != small) & cells).sum() / cells.sum())


def rl_run(base_state: dict, variant: str, seed: int, train, test, args) -> dict:
    model = build_model(seed)
    model.load_state_dict(base_state)
    sim_name, lam = variant_spec(variant, args)
    sim = make_similarity(sim_name, embedding=model.get_input_embeddings(), seed=seed, **LEARNABLE[sim_name]) \
        if sim_name in LEARNABLE else make_similarity(sim_name)
    sim_params = list(sim.parameters())
    start = [p.detach().clone() for p in sim_params]
    groups = [{"params": list(model.parameters()), "lr": args.lr}]
    if sim_params:
        groups.append({"params": sim_params, "lr": args.lr * args.sim_lr_mult})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = np.random.default_rng(10_000 + seed)  # the same batches for every variant of a seed
    gen = torch.Generator().manual_seed(20_000 + seed)
    n = args.paths
    common = dict(n_paths=n, lam=lam, temperature=args.temperature, think_end_id=task.THINK_END,
                  eos_token_id=task.EOS, pad_token_id=task.PAD)
    rec = {"variant": variant, "seed": seed, "similarity": sim_name, "lam": lam, "steps": [], "evals": [],
           "sim_grad_norms": []}
    t0 = time.perf_counter()
    correct = evaluate(model, test)
    rec["evals"].append([0, float(np.mean(correct))])
    for step in range(1, args.rl_steps + 1):
        probs = [train[i] for i in rng.choice(len(train), args.batch)]
        ids = task.prompt_batch(probs)
        out = generate_paths(model, ids, similarity=sim, max_new_tokens=task.COMPLETION_LEN, generator=gen, **common)
        r = torch.tensor([task.reward(c, *probs[k // n]) for k, c in enumerate(out.completion_ids)]).view(-1, n)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)  # (B*N,)
        grad_norm = float("nan")
        if bool((adv != 0).any()):
            model.train()
            lp = blended_logprobs(model, sim, ids, out.completion_ids, **common)
            mask = out.completion_mask.float()
            loss = -(adv[:, None] * lp.logprobs * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            if sim_params:
                grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in sim_params if p.grad is not None)))
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
        st = out.stats
        mean = (lambda f: float(np.nanmean([getattr(s, f) for s in st])) if st else float("nan"))
        rec["steps"].append({"reward": float(r.mean()), "reward_var": float(r.var(1, unbiased=False).mean()),
                             "entropy": mean("entropy"), "max_weight": mean("max_weight"),
                             "weight_var": mean("weight_var"), "sim_min": mean("sim_min"), "sim_max": mean("sim_max"),
                             "disagree": disagreement(out, n), "zero_adv_groups": float((r.std(1) == 0).float().mean())})
        rec["sim_grad_norms"].append(grad_norm)
        if step % args.eval_every == 0 or step == args.rl_steps:
            correct = evaluate(model, test)
            rec["evals"].append([step, float(np.mean(correct))])
    rec["final_correct"] = correct
    rec["seconds"] = time.perf_counter() - t0
    if sim_params:
        moved = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(sim_params, start)) ** 0.5
        rec["sim_param_move_rel"] = moved / max(1e-12, sum(float((s ** 2).sum()) for s in start) ** 0.5)
        rec["sim_params"] = sum(p.numel() for p in sim_params)
    return rec


# ---------------------------------------------------------------- analysis


def run_metrics(rec: dict, target: float, warm_acc: float) -> dict:
    accs = [a for _, a in rec["evals"]]
    hit = [s for s, a in rec["evals"] if a >= target]
    rewards = [s["reward"] for s in rec["steps"]]
    half = rewards[len(rewards) // 2:]
    final = accs[-1]
    return {"final": final, "best": max(accs), "auc": float(np.mean(accs[1:])) if len(accs) > 1 else final,
            "steps_to_target": hit[0] if hit else None, "reward_sd_2nd_half": float(np.std(half)),
            "within_group_var": float(np.mean([s["reward_var"] for s in rec["steps"]])),
            "collapsed": bool(final < warm_acc - 0.10 or final < max(accs) - 0.25),
            "entropy": float(np.nanmean([s["entropy"] for s in rec["steps"]])),
            "max_weight": float(np.nanmean([s["max_weight"] for s in rec["steps"]])),
            "sim_range": float(np.nanmean([s["sim_max"] - s["sim_min"] for s in rec["steps"]])),
            "disagree": float(np.nanmean([s["disagree"] for s in rec["steps"]])), "seconds": rec["seconds"]}


def sign_flip_p(diffs: np.ndarray, resamples: int = 20_000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(diffs) = 0 (exact over all 2^n flips when n <= 16)."""
    diffs = np.asarray(diffs, dtype=float)
    n = len(diffs)
    obs = abs(diffs.mean())
    if n <= 16:
        signs = np.array([[1 if (k >> i) & 1 else -1 for i in range(n)] for k in range(2**n)])
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(resamples, n))
    stats = np.abs((signs * diffs).mean(1))
    return float((stats >= obs - 1e-12).mean())


def friedman_statistic(x: np.ndarray) -> float:
    """Friedman's chi-square of ``x (blocks, treatments)``, ties given their average rank."""
    from statistics import mean

    b, k = x.shape
    ranks = np.zeros_like(x, dtype=float)
    for i, row in enumerate(x):
        order = row.argsort()
        r = np.empty(k)
        r[order] = np.arange(1, k + 1)
        for v in np.unique(row):  # average ranks of ties
            r[row == v] = mean(r[row == v])
        ranks[i] = r
    sums = ranks.sum(0)
    return float(12.0 / (b * k * (k + 1)) * (sums ** 2).sum() - 3.0 * b * (k + 1))


def friedman_permutation(x: np.ndarray, resamples: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """Friedman's statistic and its permutation p-value (treatments shuffled within each block)."""
    rng = np.random.default_rng(seed)
    obs = friedman_statistic(x)
    hits = sum(friedman_statistic(np.array([rng.permutation(row) for row in x])) >= obs - 1e-12
               for _ in range(resamples))
    return obs, float((hits + 1) / (resamples + 1))


def holm(ps: dict[str, float]) -> dict[str, float]:
    order = sorted(ps, key=ps.get)
    out, running = {}, 0.0
    for k, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * ps[name]))
        out[name] = running
    return out


def analyse(doc: dict) -> dict:
    args = doc["args"]
    warm = {int(s): v["acc"] for s, v in doc["warmups"].items()}
    per = {}
    for rec in doc["runs"]:
        per.setdefault(rec["variant"], {})[rec["seed"]] = (rec, run_metrics(rec, args["target_acc"], warm[rec["seed"]]))
    seeds = sorted(set.intersection(*[set(v) for v in per.values()])) if per else []
    summary, tests = {}, {}
    for v, runs in per.items():
        ms = [runs[s][1] for s in seeds]
        agg = {k: (float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms], ddof=1)) if len(ms) > 1 else 0.0)
               for k in ["final", "best", "auc", "reward_sd_2nd_half", "within_group_var", "entropy", "max_weight",
                         "sim_range", "disagree", "seconds"]}
        hits = [m["steps_to_target"] for m in ms]
        agg["reached"] = sum(h is not None for h in hits)
        agg["steps_to_target_median"] = float(np.median([h if h is not None else math.inf for h in hits])) if hits else None
        agg["collapsed"] = sum(m["collapsed"] for m in ms)
        moves = [runs[s][0].get("sim_param_move_rel") for s in seeds]
        agg["sim_param_move_rel"] = float(np.mean(moves)) if all(m is not None for m in moves) and moves else None
        summary[v] = agg
    if "grpo" in per:
        for metric in ["final", "auc"]:
            ps = {}
            for v in per:
                if v == "grpo":
                    continue
                d = np.array([per[v][s][1][metric] - per["grpo"][s][1][metric] for s in seeds])
                ps[v] = sign_flip_p(d)
            tests[f"seed_level_{metric}"] = {"p": ps, "p_holm": holm(ps), "min_possible_p": 2 / 2 ** len(seeds)}
        ps = {}
        for v in per:
            if v == "grpo":
                continue
            d = np.concatenate([np.array(per[v][s][0]["final_correct"]) - np.array(per["grpo"][s][0]["final_correct"])
                                for s in seeds])
            ps[v] = sign_flip_p(d)
        tests["problem_level_final"] = {"p": ps, "p_holm": holm(ps)}
    if len(per) >= 3 and len(seeds) >= 2:
        names = sorted(per)
        auc = np.array([[per[v][s][1]["auc"] for v in names] for s in seeds])  # (seeds, variants)
        stat, p = friedman_permutation(auc)
        tests["friedman_auc"] = {"statistic": stat, "p": p, "variants": names, "resamples": 20_000}
    return {"seeds": seeds, "summary": summary, "tests": tests}


def fmt(mean_sd: tuple[float, float], pct: bool = True) -> str:
    m, s = mean_sd
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def table(doc: dict, an: dict) -> str:
    s, t = an["summary"], an["tests"]
    order = ["grpo"] + [v for v in doc["args"]["variants"] if v != "grpo" and v in s]
    pf, pa, pp = (t.get(k, {}).get("p_holm", {}) for k in ["seed_level_final", "seed_level_auc", "problem_level_final"])
    lines = [f"| variant | final acc % | mean acc % over RL (AUC) | runs reaching {100 * doc['args']['target_acc']:.0f} % "
             "| median steps to it | reward sd (2nd half) | collapsed | gate entropy | max weight | sim range "
             "| paths disagree | p final (seeds / problems, Holm) | p AUC (seeds, Holm) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in order:
        a = s[v]
        st = a["steps_to_target_median"]
        lines.append(f"| {v} | {fmt(a['final'])} | {fmt(a['auc'])} | {a['reached']}/{len(an['seeds'])} | "
                     f"{'never' if st is None or math.isinf(st) else int(st)} | {a['reward_sd_2nd_half'][0]:.3f} | "
                     f"{a['collapsed']} | {a['entropy'][0]:.3f} | {a['max_weight'][0]:.3f} | {a['sim_range'][0]:.3f} | "
                     f"{a['disagree'][0]:.3f} | "
                     + ("–" if v == "grpo" else f"{pf.get(v, float('nan')):.2f} / {pp.get(v, float('nan')):.3f}")
                     + " | " + ("–" if v == "grpo" else f"{pa.get(v, float('nan')):.2f}") + " |")
    return "\n".join(lines)


def paired_table(doc: dict, an: dict) -> str:
    """Each blended variant minus plain GRPO, per seed (accuracy points), with the raw p-values."""
    per = {}
    for rec in doc["runs"]:
        accs = [a for _, a in rec["evals"]]
        per.setdefault(rec["variant"], {})[rec["seed"]] = (accs[-1], float(np.mean(accs[1:])) if len(accs) > 1 else accs[-1])
    if "grpo" not in per:
        return ""
    t = an["tests"]
    seeds = an["seeds"]
    lines = [f"| variant | Δ final, mean (per seed {seeds[0]}…{seeds[-1]}) | Δ AUC, mean (per seed) | lower AUC in | "
             "raw p final / AUC (seeds) | raw p final (problems) |", "|---|---|---|---:|---:|---:|"]
    for v in [v for v in doc["args"]["variants"] if v != "grpo" and v in per]:
        df = [100 * (per[v][s][0] - per["grpo"][s][0]) for s in seeds]
        da = [100 * (per[v][s][1] - per["grpo"][s][1]) for s in seeds]
        lines.append(f"| {v} | {np.mean(df):+.2f} ({' '.join(f'{x:+.1f}' for x in df)}) | {np.mean(da):+.2f} "
                     f"({' '.join(f'{x:+.1f}' for x in da)}) | {sum(x < 0 for x in da)}/{len(seeds)} | "
                     f"{t['seed_level_final']['p'][v]:.3f} / {t['seed_level_auc']['p'][v]:.3f} | "
                     f"{t['problem_level_final']['p'][v]:.3f} |")
    return "\n".join(lines)


def plots(doc: dict, an: dict, out: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(an["summary"])
    runs = {}
    for rec in doc["runs"]:
        runs.setdefault(rec["variant"], []).append(rec)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    smooth = max(1, doc["args"]["rl_steps"] // 20)
    for v in variants:
        recs = runs[v]
        steps = [e[0] for e in recs[0]["evals"]]
        acc = np.mean([[e[1] for e in r["evals"]] for r in recs], axis=0)
        ls = "k--" if v == "grpo" else "-"
        axes[0, 0].plot(steps, 100 * acc, ls, label=v)
        for ax, key in [(axes[0, 1], "reward"), (axes[1, 0], "entropy"), (axes[1, 1], "max_weight")]:
            y = np.mean([[s[key] for s in r["steps"]] for r in recs], axis=0)
            y = np.convolve(np.nan_to_num(y, nan=np.nan), np.ones(smooth) / smooth, mode="valid")
            ax.plot(np.arange(len(y)) + smooth, y, ls, label=v)
    for ax, title in zip(axes.flat, ["held-out accuracy % (greedy, single path)", "training reward (batch mean)",
                                     "gate entropy (nats, mean row)", "largest gate weight (mean row)"]):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"M3PO similarity variants, mean of {len(an['seeds'])} seeds (λ={doc['args']['lam']}, "
                 f"T={doc['args']['temperature']}, N={doc['args']['paths']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(out / "curves.png", buf.getvalue())


def report(doc: dict, out: Path) -> None:
    an = analyse(doc)
    md = table(doc, an)
    tests = an["tests"]
    extra = []
    if "friedman_auc" in tests:
        extra.append(f"Friedman test over all variants (AUC, blocks = seeds): chi2 = {tests['friedman_auc']['statistic']:.2f}, "
                     f"permutation p = {tests['friedman_auc']['p']:.3f} (20,000 within-seed shuffles)")
    if "seed_level_final" in tests:
        extra.append(f"seed-level sign-flip tests: smallest possible p with {len(an['seeds'])} seeds = "
                     f"{tests['seed_level_final']['min_possible_p']:.3f}")
    warm = ", ".join(f"seed {s}: {100 * w['acc']:.1f} %" for s, w in doc["warmups"].items())
    text = (f"{md}\n\nwarm-up accuracy (start of every RL run): {warm}\n\n{paired_table(doc, an)}\n\n"
            + "\n\n".join(extra)
            + f"\n\ntotal wall time: {doc.get('wall_seconds', float('nan')):.0f} s\n")
    write_atomic(out / "table.md", text)
    write_atomic(out / "analysis.json", json.dumps(an, indent=1, default=float))
    plots(doc, an, out)
    from rich.console import Console

    Console().print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="folder for results.json, table.md, curves.png")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--variants", default="grpo," + ",".join(list_similarities()),
                   help="comma-separated: grpo (λ = 0) and similarity names")
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--warmup-batch", type=int, default=32)
    p.add_argument("--warmup-lr", type=float, default=3e-3)
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8, help="prompts per RL step")
    p.add_argument("--paths", type=int, default=4, help="paths per prompt (N)")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--sim-lr-mult", type=float, default=10.0, help="learning-rate multiplier for learnable similarities")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target-acc", type=float, default=0.8, help="accuracy for 'steps to target'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="recompute table, tests and plots from results.json")
    p.add_argument("--merge", metavar="FILE,...", help="with --report-only: also read these results.json files "
                   "(more seeds of the same settings) and report all together")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if args.report_only:
            path = out / "results.json"
            if not path.exists():
                raise UserError(f"{path} does not exist: run the experiment first")
            doc = json.loads(path.read_text())
            for extra in (args.merge or "").split(","):
                if extra.strip():
                    more = json.loads(Path(extra.strip()).read_text())
                    same = {k: v for k, v in more["args"].items() if k not in ("seeds", "first_seed", "out")}
                    if same != {k: v for k, v in doc["args"].items() if k not in ("seeds", "first_seed", "out")}:
                        raise UserError(f"{extra} was run with other settings; only more seeds can be merged")
                    doc["warmups"].update(more["warmups"])
                    doc["runs"] += more["runs"]
                    doc["wall_seconds"] = doc.get("wall_seconds", 0) + more.get("wall_seconds", 0)
            report(doc, out)
            return 0
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v != "grpo" and v not in list_similarities()]
        if unknown:
            raise UserError(f"unknown variant(s) {', '.join(unknown)}; choose grpo or {', '.join(list_similarities())}")
        for name in ["seeds", "warmup_steps", "rl_steps", "batch", "eval_every", "threads"]:
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if args.paths < 2:
            raise UserError("--paths must be at least 2: one path has no one to blend with")
        out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(args.threads)
        train, test = task.split()
        doc = {"args": {**vars(args), "variants": variants}, "warmups": {}, "runs": []}
        t0 = time.perf_counter()
        from rich.console import Console

        con = Console(stderr=True)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            model = build_model(seed)
            tw = time.perf_counter()
            losses = warmup(model, train, args, seed)
            acc = float(np.mean(evaluate(model, test)))
            doc["warmups"][str(seed)] = {"acc": acc, "loss_last": losses[-1], "seconds": time.perf_counter() - tw,
                                         "params": sum(q.numel() for q in model.parameters())}
            con.log(f"seed {seed}: warm-up {args.warmup_steps} steps, loss {losses[-1]:.3f}, held-out acc {100 * acc:.1f} % "
                    f"({time.perf_counter() - tw:.0f} s)")
            base = {k: v.clone() for k, v in model.state_dict().items()}
            for v in variants:
                rec = rl_run(base, v, seed, train, test, args)
                doc["runs"].append(rec)
                doc["wall_seconds"] = time.perf_counter() - t0
                write_atomic(out / "results.json", json.dumps(doc))
                con.log(f"seed {seed} {v:>14}: acc {100 * rec['evals'][0][1]:.1f} -> {100 * rec['evals'][-1][1]:.1f} %, "
                        f"{rec['seconds']:.0f} s")
        report(doc, out)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Rendering ``attnkit check``'s ``CheckReport``: the console (rich) and the stability-region figure (PNG)."""

from __future__ import annotations

import io
import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnkit.check.run import CheckReport, LayerCheck

STATUS_STYLE = {"safe": "green", "marginal": "yellow", "unsafe": "bold red"}


def _growth(x: float) -> str:
    if x == math.inf:
        return "any"
    if x == 0:
        return "none"
    return f"{x:.2g}x" if x < 100 else f"{x:.0f}x"


def _status(s: str) -> str:
    return f"[{STATUS_STYLE.get(s, '')}]{s}[/]"


def _print_checks(console: Console, title: str, checks: list[LayerCheck]) -> None:
    """Two lines per layer type: the estimate, then the verdicts and the growth headroom (fits 80 columns)."""
    console.print(f"[bold]{title}[/bold]", highlight=False)
    for c in checks:
        e = c.estimate
        console.print(f"  {e.layers} {e.layer_type.replace('_', ' ')} layer{'s' if e.layers != 1 else ''} "
                      f"({e.keys_seen:,} keys a row): logit std {e.sigma_logit:.3g}, row max {e.row_max:.3g}, "
                      f"largest logit {e.model_max:.3g} (99 %: {e.model_max_high:.3g}), |q.k| before scaling "
                      f"{e.raw_absmax:,.4g}, curvature κ 10^{c.curvature.log10_kappa:.1f}", highlight=False)
        verdicts = " · ".join(f"{d} {_status(c.verdicts[d].status)}" for d in ("fp16", "bf16", "fp32"))
        console.print(f"    {verdicts}; survives weight growth {_growth(c.max_growth['fp16'])} in fp16, "
                      f"{_growth(c.max_growth['bf16'])} in bf16", highlight=False)


def render_check(report: CheckReport, console: Console) -> None:
    s = report.shape
    console.print(f"[bold]attnkit check[/bold] {escape(report.model)}: {report.dtype}, {report.seq_len:,} tokens, "
                  f"temperature {report.temperature:g}, weight growth {report.weight_growth:g}x -> "
                  f"{_status(report.status)}", highlight=False)
    console.print(f"{escape(s.model_type)}: {s.num_layers} layers x {s.num_heads} heads of {s.head_dim} dims "
                  f"(hidden {s.hidden_size}" + (f", {s.num_kv_heads} key heads" if s.num_kv_heads != s.num_heads else "")
                  + f"), scale {escape(s.scale_source)}, init std {s.init_std:g}, "
                  + ("causal" if s.causal else "bidirectional") + (", RoPE" if s.rope else ""), highlight=False)
    if report.mitigations:
        console.print("mitigations in the config: " + "; ".join(escape(m.detail) for m in report.mitigations), highlight=False)
    from attnkit.check.dtypes import FORMATS

    limits = {name: FORMATS[name].largest_tolerated_logit(report.tolerance) for name in ("bf16", "fp16")}
    console.print(f"verdicts: weights move by at most {100 * report.tolerance:.0f} % from rounding the largest logit "
                  f"(bf16 holds logits < {limits['bf16']:.3g}, fp16 < {limits['fp16']:.3g}), |q.k| < 65,504 in fp16; "
                  f"'growth' is the largest weight growth X (logits x X^2) that stays safe", style="dim", highlight=False)
    _print_checks(console, "for a fresh initialisation (from the config alone" +
                  (", not these weights)" if report.weights else ")"), report.init)
    if report.weights:
        _print_checks(console, "from the model's own W_q/W_k (inputs taken as isotropic, unit variance)", report.weights)
    for c in report.primary:
        for f in c.verdicts[report.dtype].findings:
            if f.severity in ("marginal", "unsafe", "advice"):
                style = "yellow" if f.severity != "unsafe" else "red"
                console.print(f"[{style}]{f.severity}[/] {f.type} ({report.dtype}, {c.estimate.layer_type}): {escape(f.message)}",
                              highlight=False)
    recs = report.recommendations
    fixes = [r for r in recs if r.fixes]
    not_enough = [r for r in recs if not r.fixes]
    if fixes:
        console.print("[bold]recommendations[/bold] (each enough alone, by the estimate)")
        for r in fixes:
            console.print(f"  - {escape(r.message)}", highlight=False)
    if not_enough:
        console.print("[bold]not enough alone[/bold]")
        for r in not_enough:
            console.print(f"  - {escape(r.message)}", highlight=False)
    elif report.safe:
        console.print(f"no change needed for {report.dtype} at {report.seq_len:,} tokens", highlight=False)
    if report.measured:
        m = report.measured
        on = f"one forward on {m.tokens} tokens" if m.blocks == 1 else f"{m.blocks} blocks of {m.tokens} tokens"
        on += f" over {m.processes} processes" if m.processes > 1 else ""  # torchrun: each its share, pooled
        t = Table(title=f"measured: {on} of {m.text} (agreement within {m.factor:g}x)",
                  title_justify="left", show_edge=False, pad_edge=False)
        for col in ("figure", "predicted", "measured", "ratio", ""):
            t.add_column(col, justify="left" if col in ("figure", "") else "right")
        for cmp in m.comparisons:
            t.add_row(cmp.figure, f"{cmp.predicted:.3g}", f"{cmp.measured:.3g}", f"{cmp.ratio:.2f}",
                      "[green]agrees[/]" if cmp.agrees else "[red]off[/]")
        console.print(t)
        verdicts = " · ".join(f"{d} {_status(report.measured_verdicts[d].status)}" for d in ("fp16", "bf16", "fp32"))
        console.print(f"  the forward's own figures: {verdicts}", highlight=False)
    for note in report.notes:
        console.print(f"note: {escape(note)}", style="dim", highlight=False)
    if report.regions:
        _render_regions(report, console)


def _render_regions(report: CheckReport, console: Console) -> None:
    r = report.regions
    tau = 1.0 if 1.0 in r.temperatures else r.temperatures[0]
    console.print(f"[bold]stability region[/bold] at temperature {tau:g}: the largest weight growth each format "
                  f"survives, fp16/bf16 ({escape(r.base)}; other temperatures in --json and --plot)", highlight=False)
    t = Table(show_edge=False, pad_edge=False)
    t.add_column("d (heads)")
    for T in r.seq_lens:
        t.add_column(f"{T:,}", justify="right")
    for d in r.head_dims:
        cells = [b for b in r.boundaries if b.temperature == tau and b.head_dim == d]
        if not cells:
            continue
        t.add_row(f"{d} ({cells[0].heads})", *(f"{_growth(b.max_growth['fp16'])}/{_growth(b.max_growth['bf16'])}"
                                                for b in sorted(cells, key=lambda b: b.seq_len)))
    console.print(t)


def regions_png(report: CheckReport) -> bytes:
    """One heatmap per (format, temperature): head dim x sequence length, coloured and labelled with
    the largest weight growth that stays safe; red below 1 (unsafe already at init / now)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    r = report.regions
    dtypes = ("fp16", "bf16")
    taus = r.temperatures
    head_dims = [d for d in r.head_dims if any(b.head_dim == d for b in r.boundaries)]
    fig, axes = plt.subplots(len(dtypes), len(taus), figsize=(3.2 * len(taus) + 1.4, 2.9 * len(dtypes) + 0.8),
                             squeeze=False)
    cmap = LinearSegmentedColormap.from_list("growth", ["#cf222e", "#f0883e", "#f6e27f", "#7fc97f", "#1a7f37"])
    norm = Normalize(vmin=-1, vmax=3)  # log10 growth: 0.1x .. 1000x
    for i, dt in enumerate(dtypes):
        for j, tau in enumerate(taus):
            ax = axes[i][j]
            grid = np.full((len(head_dims), len(r.seq_lens)), np.nan)
            for b in r.boundaries:
                if b.temperature == tau and b.head_dim in head_dims:
                    x = b.max_growth[dt]
                    grid[head_dims.index(b.head_dim), r.seq_lens.index(b.seq_len)] = (
                        3.5 if x == math.inf else -1.5 if x == 0 else math.log10(x))
            ax.imshow(np.clip(grid, -1, 3), cmap=cmap, norm=norm, aspect="auto", origin="lower")
            for (yi, xi), v in np.ndenumerate(grid):
                if np.isnan(v):
                    continue
                label = "any" if v > 3.4 else "none" if v < -1.4 else f"{10 ** v:.2g}x"
                ax.text(xi, yi, label, ha="center", va="center", fontsize=8,
                        color="white" if v < 0 or v > 2.2 else "black")
            ax.set_xticks(range(len(r.seq_lens)), [f"{T // 1024}k" if T >= 1024 else str(T) for T in r.seq_lens], fontsize=8)
            ax.set_yticks(range(len(head_dims)), [str(d) for d in head_dims], fontsize=8)
            if i == len(dtypes) - 1:
                ax.set_xlabel("sequence length")
            if j == 0:
                ax.set_ylabel(f"{dt}\nhead dimension")
            ax.set_title(f"{dt}, temperature {tau:g}", fontsize=10)
    fig.suptitle(f"{report.model} at initialisation (from the config): the largest weight growth attention "
                 f"survives\n(logits x growth^2); red < 1x = unsafe from the start", fontsize=10)
    fig.text(0.5, 0.005, f"{r.base}. Safe = |q.k| < 65,504 (fp16) and rounding moves weights < "
             f"{100 * report.tolerance:.0f} %.\nAt 1/sqrt(d) the init logit std is hidden*std^2 whatever d; "
             f"length enters as sqrt(2 ln n).", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def save_regions_png(report: CheckReport, path: str) -> None:
    from attnkit.errors import UserError
    from attnkit.common.io import write_atomic

    if report.regions is None:
        raise UserError("no stability-region sweep to plot")
    write_atomic(path, regions_png(report))

"""One small monitored training run for the tests that read a run directory (``attnkit monitor report``).

GPT-2 (2 layers × 2 heads, width 16), 8 AdamW steps observed every 2, a threshold that warns of every
head's entropy, the learning rate halved at step 4. The run is deterministic and records no path or
time, so it is trained once per process and copied into each directory that asks for it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

V, T = 64, 16
_made: Path | None = None  # the one trained run of this process


def monitored_run(log_dir) -> None:
    """The run's files (``monitor.jsonl``) in ``log_dir`` (created if absent)."""
    global _made
    if _made is None:
        home = Path(tempfile.mkdtemp(prefix="attnkit-monitored-run-"))
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        _train(home / "run")
        _made = home / "run"
    shutil.copytree(_made, log_dir, dirs_exist_ok=True)


def _train(log_dir: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from attnkit.monitor import AttentionMonitor, ReduceLR, Thresholds

    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=T, vocab_size=V),
                                         attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    t = Thresholds(entropy_collapse=10.0)  # every head "collapses": a warning to mark
    with AttentionMonitor(model, every=2, log_dir=log_dir, emit=(), optimizer=opt, thresholds=t) as monitor:
        for step in range(8):
            x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(step))
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.on_step(step, loss=loss)
            if step == 4:
                monitor.apply(ReduceLR(0.5))

"""An attachment or monitor never closed, garbage-collected, or outliving its model leaves no
trace: no output at interpreter exit, and a model still alive is left exactly as it was found.

Each case runs in a fresh interpreter (interpreter exit and the garbage collector's order are
what is tested), for every kind of model the seam reaches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# The models, one per adapter: built in the child, each with an input and the `state` the
# contract keeps (attention implementation of every config, instance forwards, hooks, training
# flags, the MultiheadAttention fast-path flag).
PRELUDE = '''
import gc, sys, weakref
import torch
import torch.nn.functional as F
from torch import nn
sys.path.insert(0, {tests!r})
from conftest import _ids, encoder, gpt2, llama
from attnkit.seam import StatsCollector, attach, attention
from attnkit.monitor import AttentionMonitor


class Protocol(nn.Module):
    is_attnkit_attention = True

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):  # (B, T, 16)
        q, k, v = (t.view(x.shape[0], x.shape[1], 4, 4).transpose(1, 2) for t in self.qkv(x).split(16, -1))
        return attention(self, q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)


class SdpaCaller(Protocol):
    is_attnkit_attention = False

    def forward(self, x):  # (B, T, 16): a hand-written module calling PyTorch's SDPA
        q, k, v = (t.view(x.shape[0], x.shape[1], 4, 4).transpose(1, 2) for t in self.qkv(x).split(16, -1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)


def build(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return gpt2("eager"), {{"input_ids": _ids(1, 6)}}
    if kind == "llama":
        return llama("sdpa"), {{"input_ids": _ids(1, 6)}}
    if kind == "mha":
        return encoder().eval(), {{"src": torch.randn(1, 6, 16)}}
    cls = Protocol if kind == "protocol" else SdpaCaller
    return nn.Sequential(cls(), nn.Linear(16, 16)).eval(), {{"input": torch.randn(1, 6, 16)}}


def state(model):
    configs = [getattr(m, "config", None) for m in model.modules()]
    return (
        [c._attn_implementation for c in configs if c is not None],
        [(type(m).__name__, "forward" in m.__dict__, len(m._forward_hooks), len(m._forward_pre_hooks))
         for m in model.modules()],
        [m.training for m in model.modules()],
        torch.backends.mha.get_fastpath_enabled(),
    )


def forward(model, inputs):
    with torch.no_grad():
        model(**inputs)
'''

# Each case is the body of `def case(kind)`, run for every kind of model in one interpreter; what
# it returns stays alive until interpreter exit.
CASES = {
    # the training script that writes `monitor = AttentionMonitor(model)` and never closes it
    "monitor_never_closed": '''
model, inputs = build(kind)
monitor = AttentionMonitor(model, log_dir=f"{LOG}/{kind}", emit=())
for step in range(2):
    forward(model, inputs)
    monitor.on_step(step)
return monitor
''',
    # the same inside a function: monitor and model die together in a garbage cycle
    "monitor_collected_with_its_model": '''
def run():
    model, inputs = build(kind)
    model.monitor = AttentionMonitor(model, log_dir=f"{LOG}/{kind}", emit=())  # a cycle through the model
    forward(model, inputs)
    model.monitor.on_step(0)
    return weakref.ref(model)
alive = run()
gc.collect()
assert alive() is None, "the model was kept alive"
''',
    # `attach` entered and never left, alive at exit
    "attach_never_left": '''
model, inputs = build(kind)
held = attach(model, taps=[StatsCollector()])
held.__enter__()
forward(model, inputs)
return held
''',
    # the attachment is dropped while the model lives on: the model is switched back at once
    "attach_dropped": '''
model, inputs = build(kind)
found = state(model)
attach(model, taps=[StatsCollector()]).__enter__()
gc.collect()
assert state(model) == found, (state(model), found)
forward(model, inputs)
return model
''',
    # the attachment outlives its model
    "model_deleted_first": '''
model, inputs = build(kind)
held = attach(model, taps=[StatsCollector()])
held.__enter__()
forward(model, inputs)
alive = weakref.ref(model)
del model, inputs
gc.collect()
assert alive() is None, "the attachment kept the model alive"
return held
''',
    # a monitor closed twice, and an attachment left twice, leave the model as found
    "closed_twice": '''
model, inputs = build(kind)
found = state(model)
monitor = AttentionMonitor(model, log_dir=f"{LOG}/{kind}", emit=())
forward(model, inputs)
monitor.on_step(0)
monitor.close()
monitor.close()
held = attach(model, taps=[StatsCollector()])
with held:
    forward(model, inputs)
held.close()
assert state(model) == found, (state(model), found)
''',
}
KINDS = ["gpt2", "llama", "mha", "protocol", "sdpa_function"]


def _run(case: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = PRELUDE.format(tests=str(TESTS)) + f"LOG = {str(tmp_path / 'log')!r}\n"
    script += "def case(kind):\n" + textwrap.indent(textwrap.dedent(CASES[case]), "    ")
    script += f"kept = [case(kind) for kind in {KINDS!r}]\nprint('done')\n"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.parametrize("case", list(CASES))
def test_nothing_on_stderr_at_exit(case, tmp_path):
    result = _run(case, tmp_path)
    assert result.stdout.strip().endswith("done"), result.stderr
    assert result.stderr == ""

"""One threshold at a time around the chosen setting, on the design seed only: the figures quoted in
the reasons of ``attnkit.common.findings.THRESHOLDS`` (``overflow_*``) and in README.md.

    PYTHONPATH=src:experiments/monitor_breaking python3 experiments/monitor_breaking/design_one_at_a_time.py
"""

from __future__ import annotations

import functools
from pathlib import Path

import design
from attnkit.monitor import replay as replay_mod

CHOSEN = {"observe_first": 16, "overflow_window": 3, "overflow_horizon": 8.0, "overflow_floor_bits": 5.0,
          "overflow_headroom_bits": 0.0, "overflow_confirm": 2}
CHANGES = [(None, None), ("overflow_horizon", 4.0), ("overflow_horizon", 16.0), ("overflow_confirm", 1),
           ("overflow_headroom_bits", 1.0), ("overflow_headroom_bits", 0.25), ("overflow_floor_bits", 3.0),
           ("overflow_floor_bits", 8.0), ("overflow_window", 2), ("overflow_window", 4), ("observe_first", 0)]


def main(out: Path = Path("runs/breaking3")) -> None:
    replay_mod.read_run = functools.lru_cache(maxsize=None)(replay_mod.read_run)
    runs = design.plain_runs(out, {0})
    for name, value in CHANGES:
        setting = dict(CHOSEN, **({name: value} if name else {}))
        x = design.evaluate(runs, out, setting)
        print(name, value, f"{x['predicted']}/{x['failed']} fa {x['false_alarms']}/{x['healthy']} "
                           f"lead {x['lead_median']} ({x['lead_min']})")


if __name__ == "__main__":
    main()

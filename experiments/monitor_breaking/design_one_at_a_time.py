# One threshold at a time around the chosen setting, on the design seed (the figures in attnkit.common.findings' reasons).
# PYTHONPATH=src:experiments/monitor_breaking python3 experiments/monitor_breaking/design_one_at_a_time.py
import functools, sys
from pathlib import Path
sys.path[:0] = ['src', 'experiments/monitor_breaking']
import design
from attnkit.monitor import replay as rm
rm.read_run=functools.lru_cache(maxsize=None)(rm.read_run)
out=Path('runs/breaking3'); runs=design.plain_runs(out,{0})
base={'observe_first':16,'overflow_window':3,'overflow_horizon':8.0,'overflow_floor_bits':5.0,'overflow_headroom_bits':0.0,'overflow_confirm':2}
for k,v in [(None,None),('overflow_horizon',4.0),('overflow_horizon',16.0),('overflow_confirm',1),('overflow_headroom_bits',1.0),('overflow_headroom_bits',0.25),('overflow_floor_bits',3.0),('overflow_floor_bits',8.0),('overflow_window',2),('overflow_window',4),('observe_first',0)]:
    s=dict(base)
    if k: s[k]=v
    x=design.evaluate(runs,out,s)
    print(k,v,f"{x['predicted']}/{x['failed']} fa {x['false_alarms']}/{x['healthy']} lead {x['lead_median']} ({x['lead_min']})")

"""Move a trained gate's budget between layers: ``attnkit.sparse.distill.calibrate_layer_shares`` on
windows of the KJV *train* split, then the gates written again with ``layer_shares`` in their config
(the same weights; ``--gates DIR`` of ``attnkit sparse eval`` runs them so).

    PYTHONPATH=src python experiments/sparse/quality/calibrate.py \\
        --gates experiments/sparse/results/far_weights/gates_0.25 --out runs/quality/previous_shares

Writes OUT/sparse_gates.safetensors + sparse_config.json (``attnkit.sparse.io.save_gates``),
OUT/train_summary.json (the source's, its "sparse" config replaced, a "calibration" entry added).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference-long")
    ap.add_argument("--gates", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--density", type=float, default=None, help="the density to calibrate at (default: the gates')")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from attnkit.common.data import encode_documents, load_corpus, random_blocks
    from attnkit.common.io import write_atomic
    from attnkit.common.loading.registry import load_model
    from attnkit.sparse.distill import SUMMARY_FILE, calibrate_layer_shares, load_trained
    from attnkit.sparse.io import save_gates

    loaded = load_model(a.model)
    model = loaded.model.eval()
    trained = load_trained(model, a.gates, density=a.density)
    stream = encode_documents(loaded.tokenizer, load_corpus("kjv").split("train"))
    ids = random_blocks(stream, a.seq_len, a.windows, torch.Generator().manual_seed(a.seed))
    t = time.time()
    cal = calibrate_layer_shares(model, trained.cfg, trained.gates, ids)
    cfg = replace(trained.cfg, layer_shares=cal.shares)
    out = Path(a.out)
    save_gates(trained.gates, cfg, out)
    info = dict(trained.info)
    info["sparse"] = cfg.to_dict()
    info["calibration"] = {**cal.as_dict(), "source": a.gates, "windows": a.windows, "seq_len": a.seq_len,
                           "split": "train", "seed": a.seed, "minutes": round((time.time() - t) / 60, 2)}
    write_atomic(out / SUMMARY_FILE, json.dumps(info, indent=1) + "\n")
    print(json.dumps({"out": a.out, "densities": cal.densities, "shares": cal.shares, "budget": cal.budget,
                      "minutes": info["calibration"]["minutes"]}), flush=True)


if __name__ == "__main__":
    main()

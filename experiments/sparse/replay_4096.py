"""Replay of the 4096-token eval sequence (window, sinks_window, moba at every density, in one process) through
attnkit.sparse.evaluate, printing each KL and the model's RoPE cache (dynamic NTK: inv_freq, max_seq_len_cached)
after each configuration: the one-process CLI run (results/eval_4096/) gave moba@0.5/0.75 KL 0.181/0.178; this
replay gives 0.0507/0.0107, as each does alone (results/eval_4096_fresh/), with the RoPE cache unchanged.

    python experiments/sparse/replay_4096.py
"""
import torch
from attnkit.common.loading.registry import load_model
from attnkit.common.data import encode_documents, load_corpus
from attnkit.sparse import SparseConfig
from attnkit.sparse.evaluate import dense_baseline, evaluate_pattern
torch.set_num_threads(1)
m = load_model('reference-long'); model, tok = m.model.eval(), m.tokenizer
ids = encode_documents(tok, load_corpus('kjv').split('test'))[:4096].view(1, 4096)
rot = model.model.rotary_emb
def st(tag): print(tag, 'cached', int(rot.max_seq_len_cached), 'inv_freq[-1]', float(rot.inv_freq[-1]), 'orig[-1]', float(rot.original_inv_freq[-1]), flush=True)
st('load')
base = dense_baseline(model, ids, grad_windows=1); st('baseline')
for pat, d in [(p, d) for p in ('window', 'sinks_window', 'moba') for d in (0.125, 0.25, 0.5, 0.75)]:
    r = evaluate_pattern(model, SparseConfig(pattern=pat, density=d, block_size=64), None, base, 1)
    st(f"{pat}@{d} kl={r['kl']:.4f}")

"""The merging objective and the collapse metrics for ``TransformerAE`` on a ``cnn_zoo.Zoo``.

A pair (A, B) of zoo CNNs from different clients goes in as ``cat(w_A, w_B)`` (2464 numbers); the
AE predicts merged weights w (1232), and the merged CNN, run with w through
``torch.func.functional_call``, should classify both clients' images:

    loss = cross-entropy of CNN(w) on images drawn half from A's client, half from B's

Metrics over a fixed set of evaluation pairs (models the AE never trained on):

- ``merged_accuracy``: per pair, mean of the merged CNN's accuracy on A's client's and on B's
  client's test images; baselines: A alone, B alone, plain averaging (w_A + w_B) / 2;
- ``uniqueness``: share of predictions whose nearest other prediction is farther than
  ``UNIQUE_REL`` (1 %) of their norm — 1.0 all distinct, 1/P all the same vector;
- ``diversity``: mean pairwise L2 distance of the predictions over that of the plain averages
  (1.0 as varied as the inputs, 0 the same output for every pair);
- ``wasserstein``: mean 1-D Wasserstein distance between the value distributions of two pairs'
  predictions, over all pairs of pairs (0: identical outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.models.cnn_zoo import Digits, Zoo, accuracy, run_cnns

UNIQUE_REL = 0.01


@dataclass
class Pairs:
    a: Tensor  # (P,) zoo indices
    b: Tensor

    def inputs(self, zoo: Zoo) -> Tensor:  # (P, 2464)
        return torch.cat([zoo.weights[self.a], zoo.weights[self.b]], 1)


def sample_pairs(zoo: Zoo, models: Tensor, n: int, gen: torch.Generator) -> Pairs:
    """``n`` pairs of distinct-client models drawn from the zoo indices ``models``."""
    a = models[torch.randint(len(models), (n,), generator=gen)]
    b = models[torch.randint(len(models), (n,), generator=gen)]
    same = zoo.client[a] == zoo.client[b]
    while same.any():
        b[same] = models[torch.randint(len(models), (int(same.sum()),), generator=gen)]
        same = zoo.client[a] == zoo.client[b]
    return Pairs(a, b)


def merge_loss(pred: Tensor, pairs: Pairs, zoo: Zoo, data: Digits, per_client: int, gen: torch.Generator) -> Tensor:
    """Cross-entropy of each merged CNN on ``per_client`` images of each of its two clients."""
    pools = [data.pool(c) for c in range(data.num_clients)]
    idx = torch.stack([torch.cat([pools[ca][torch.randint(len(pools[ca]), (per_client,), generator=gen)],
                                  pools[cb][torch.randint(len(pools[cb]), (per_client,), generator=gen)]])
                       for ca, cb in zip(zoo.client[pairs.a].tolist(), zoo.client[pairs.b].tolist())])  # (P, 2n)
    logits = run_cnns(pred, data.x_train[idx])  # (P, 2n, 10)
    return F.cross_entropy(logits.reshape(-1, 10), data.y_train[idx].reshape(-1))


def pair_accuracy(weights: Tensor, pairs: Pairs, zoo: Zoo, data: Digits) -> Tensor:
    """(P,) mean of accuracy on A's and on B's client test images, for each pair's ``weights`` (P, 1232)."""
    with torch.no_grad():
        logits = run_cnns(weights, data.x_test.unsqueeze(0).expand(len(weights), *data.x_test.shape))  # (P, N, 10)
    correct = (logits.argmax(-1) == data.y_test).double()  # (P, N)
    member = torch.stack([torch.isin(data.y_test, torch.tensor(data.classes(c))) for c in range(data.num_clients)]).double()
    acc = (correct @ member.T) / member.sum(1)  # (P, clients): each CNN on each client's test images
    rows = torch.arange(len(weights))
    return ((acc[rows, zoo.client[pairs.a]] + acc[rows, zoo.client[pairs.b]]) / 2).float()


def uniqueness(pred: Tensor) -> float:
    d = torch.cdist(pred.double(), pred.double())
    d.fill_diagonal_(float("inf"))
    norm = pred.double().norm(dim=1)
    return float((d.min(1).values > UNIQUE_REL * norm).double().mean())


def mean_pairwise(x: Tensor) -> float:
    d = torch.cdist(x.double(), x.double())
    n = x.shape[0]
    return float(d.sum() / (n * (n - 1)))


def diversity(pred: Tensor, baseline: Tensor) -> float:
    return mean_pairwise(pred) / max(mean_pairwise(baseline), 1e-12)


def wasserstein(pred: Tensor) -> float:
    """Mean 1-D Wasserstein-1 distance between the value distributions of every two predictions
    (equal sizes: the mean absolute difference of the sorted values)."""
    s = pred.double().sort(dim=1).values  # (P, 1232)
    d = (s[:, None, :] - s[None, :, :]).abs().mean(-1)
    n = s.shape[0]
    return float(d.sum() / (n * (n - 1)))

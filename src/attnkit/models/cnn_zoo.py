"""A zoo of ``ZooCNN``s (1232 parameters each) trained on scikit-learn's bundled 8x8 digits.

Clients hold different class mixes: client c has the five classes c, c+1, ..., c+4 (mod 10), so
two clients' models really differ (different data, different seeds). Every model of the zoo is
trained at once: parameters stacked along a leading dimension and run with ``torch.func.vmap``
over ``functional_call`` (each model its own minibatches from its own client; Adam is
elementwise, so this is N independent trainings).

    zoo = build_zoo(clients=10, seeds=12)        # 120 CNNs, ~1 min on one CPU core
    zoo.weights        # (120, 1232) flattened weights
    zoo.client         # (120,) client of each model;  zoo.seed: (120,)
    data = digits()    # train/test images (N, 1, 8, 8), labels, and each client's index pools
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from attnkit.errors import UserError
from attnkit.models.transformer_ae import ZooCNN, flatten_cnn, unflatten_cnn

CLASSES_PER_CLIENT = 5


@dataclass
class Digits:
    x_train: Tensor  # (N, 1, 8, 8) in [0, 1]
    y_train: Tensor  # (N,)
    x_test: Tensor
    y_test: Tensor
    num_clients: int

    def classes(self, client: int) -> list[int]:
        return [(client + i) % 10 for i in range(CLASSES_PER_CLIENT)]

    def pool(self, client: int, split: str = "train") -> Tensor:
        """Indices of the ``split`` images of ``client``'s classes."""
        y = self.y_train if split == "train" else self.y_test
        return torch.nonzero(torch.isin(y, torch.tensor(self.classes(client)))).squeeze(1)


def digits(num_clients: int = 10, test_share: float = 0.3, seed: int = 0) -> Digits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the CNN zoo trains on scikit-learn's bundled digits: pip install 'attnkit[collapse]'") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_share)
    te, tr = perm[:n_test], perm[n_test:]
    return Digits(x[tr], y[tr], x[te], y[te], num_clients)


@dataclass
class Zoo:
    weights: Tensor  # (M, 1232)
    client: Tensor  # (M,)
    seed: Tensor  # (M,)
    train_acc: Tensor  # (M,) on the model's own client's train images
    test_acc: Tensor  # (M,) on its own client's test images


def run_cnns(flat: Tensor, x: Tensor) -> Tensor:
    """flat (M, 1232) weights, x (M, N, 1, 8, 8) images -> (M, N, 10) logits, each CNN on its own images."""
    cnn = ZooCNN().to(flat.device)
    return vmap(lambda p, xi: functional_call(cnn, p, (xi,)))(unflatten_cnn(flat), x)


def accuracy(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """flat (M, 1232), one image set x (N, 1, 8, 8), labels (N,) -> (M,) accuracy of each CNN."""
    with torch.no_grad():
        logits = run_cnns(flat, x.unsqueeze(0).expand(flat.shape[0], *x.shape))
    return (logits.argmax(-1) == y).float().mean(-1)


def build_zoo(data: Digits, seeds: int = 12, steps: int = 600, batch: int = 64, lr: float = 1e-2) -> Zoo:
    """``data.num_clients`` x ``seeds`` CNNs, each trained ``steps`` Adam steps on its own client."""
    clients = torch.arange(data.num_clients).repeat(seeds)  # (M,)
    seed_of = torch.arange(seeds).repeat_interleave(data.num_clients)
    models = []
    for c, s in zip(clients.tolist(), seed_of.tolist()):
        torch.manual_seed(1000 * s + c)
        models.append(ZooCNN())
    params, _ = stack_module_state(models)  # name -> (M, ...), leaf tensors with grad
    opt = torch.optim.Adam(params.values(), lr=lr)
    pools = [data.pool(c) for c in range(data.num_clients)]
    gen = torch.Generator().manual_seed(seeds)
    cnn = ZooCNN()
    fwd = vmap(lambda p, xi: functional_call(cnn, p, (xi,)))
    for _ in range(steps):
        idx = torch.stack([pools[c][torch.randint(len(pools[c]), (batch,), generator=gen)] for c in clients.tolist()])
        logits = fwd(params, data.x_train[idx])  # (M, batch, 10)
        loss = F.cross_entropy(logits.reshape(-1, 10), data.y_train[idx].reshape(-1), reduction="sum") / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([params[k].detach().reshape(len(models), -1) for k in ZooCNN().state_dict()], 1)
    assert flat.shape[1] == 1232 and torch.equal(flat[0], _flat_of(params, 0))
    tr = torch.stack([accuracy(flat[i:i + 1], data.x_train[pools[c]], data.y_train[pools[c]])[0]
                      for i, c in enumerate(clients.tolist())])
    te_pools = [data.pool(c, "test") for c in range(data.num_clients)]
    te = torch.stack([accuracy(flat[i:i + 1], data.x_test[te_pools[c]], data.y_test[te_pools[c]])[0]
                      for i, c in enumerate(clients.tolist())])
    return Zoo(flat, clients, seed_of, tr, te)


def _flat_of(params: dict[str, Tensor], i: int) -> Tensor:
    m = ZooCNN()
    m.load_state_dict({k: v[i].detach() for k, v in params.items()})
    return flatten_cnn(m)

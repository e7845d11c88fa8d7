"""Toy models and data shared by the optimizer tests (deterministic from a seed)."""

from __future__ import annotations

import torch
from torch import nn


class ToyLM(nn.Module):
    """Embedding, uneven hidden matrices (13 and 5 rows), a norm and a 3-row matrix, and a head.

    At 4 ranks the 13-row matrix shards 4/4/4/1, the 5-row one 2/2/1/0 (an empty shard), and the
    3-row one 1/1/1/0: fewer rows than ranks.
    """

    def __init__(self, vocab: int = 17, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 13, bias=False)
        self.mid = nn.Linear(13, 5, bias=False)
        self.norm = nn.LayerNorm(5)
        self.tiny = nn.Linear(5, 3, bias=False)
        self.back = nn.Linear(3, dim, bias=False)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = torch.tanh(self.up(h))
        h = self.norm(self.mid(h))
        h = h + torch.tanh(self.back(torch.tanh(self.tiny(h)))).sum(-1, keepdim=True)
        return self.output(torch.tanh(self.back(self.tiny(h))) + self.embed(tokens))


def make_model(seed: int = 0) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM()


def batch(
    step: int, size: int = 12, seq: int = 6, vocab: int = 17
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (size, seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# hyper-parameters the numerics tests share (short warmup so post-warmup beta_t is exercised)
HP = dict(lr=0.02, warmup_steps=6, beta1=0.6, rho=0.8, momentum=0.95, weight_decay=0.05)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference |a - b| / |b| (norms), the numerics tests' one measure."""
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


# the NorMuon / AdaMuon arms of the distributed tests: baselines and AMUSE directions
DIRECTION_ARMS = ("normuon", "adamuon", "amuse_normuon", "amuse_adamuon")


def direction_optimizer(name: str, groups: list, **kwargs: object) -> torch.optim.Optimizer:
    """The optimizer of one ``DIRECTION_ARMS`` entry on ``groups`` (fp32 NS as the tests use)."""
    from amuse_dist.optim.adamuon import AdaMuon
    from amuse_dist.optim.amuse import AMUSE
    from amuse_dist.optim.normuon import NorMuon

    kwargs = {"ns_dtype": torch.float32, **kwargs}
    if name.startswith("amuse_"):
        return AMUSE(groups, direction=name.removeprefix("amuse_"), **HP, **kwargs)
    cls = {"normuon": NorMuon, "adamuon": AdaMuon}[name]
    return cls(groups, lr=0.01, weight_decay=0.05, **kwargs)

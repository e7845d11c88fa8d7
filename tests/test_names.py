"""Parameter names and resumable groups: the invariants a shipped config relies on at its first
checkpoint (compile and activation checkpointing wrap modules; a resume re-applies the config's
hyper-parameters over the loaded param groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from amuse_dist.optim import param_groups, registry
from amuse_dist.optim.names import canonical_name, named_parameters, strip_wrappers
from tests.toy import batch, loss_fn, make_model

pytestmark = pytest.mark.unit


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(8, 8, bias=False)
        self.norm = nn.RMSNorm(8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.wq(h))


class Tiny(nn.Module):
    """torchtitan's shape: blocks in a ModuleDict, each wrapped by AC and/or torch.compile."""

    def __init__(self, wrap: str) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(11, 8)
        self.layers = nn.ModuleDict()
        for i in range(2):
            block: nn.Module = Block()
            if "ac" in wrap:
                block = checkpoint_wrapper(block)
            if "compile" in wrap:
                block = torch.compile(block, backend="eager")
            self.layers[str(i)] = block
        self.output = nn.Linear(8, 11, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h)
        return self.output(h)


BARE = [
    "tok_embeddings.weight",
    "layers.0.wq.weight",
    "layers.0.norm.weight",
    "layers.1.wq.weight",
    "layers.1.norm.weight",
    "output.weight",
]


@pytest.mark.parametrize("wrap", ["none", "ac", "compile", "ac+compile"])
def test_wrapped_models_keep_their_bare_names(wrap: str) -> None:
    model = Tiny(wrap)
    raw = [n for n, _ in model.named_parameters()]
    if wrap != "none":
        assert raw != BARE  # the wrappers do rename: the reason this module exists
    assert [n for n, _ in named_parameters(model)] == BARE
    # the same keys DCP's state-dict helpers give (checkpoints, the HF adapter)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    assert sorted(get_model_state_dict(model)) == sorted(BARE)
    # and parameter grouping sees bare names (the output head stays in the AdamW branch)
    groups = param_groups(model)
    adamw = [n for g in groups if not g["use_muon"] for n, _ in g["params"]]
    muon = [n for g in groups if g["use_muon"] for n, _ in g["params"]]
    assert muon == ["layers.0.wq.weight", "layers.1.wq.weight"]
    assert "output.weight" in adamw


def test_strip_wrappers() -> None:
    name = "layers.3._orig_mod._checkpoint_wrapped_module.attention.wq.weight"
    assert strip_wrappers(name) == "layers.3.attention.wq.weight"
    assert strip_wrappers("_fsdp_wrapped_module.layers.0.w") == "layers.0.w"
    assert canonical_name(Tiny("none"), "layers.0.wq.weight") == "layers.0.wq.weight"
    assert strip_wrappers("my_orig_model.w") == "my_orig_model.w"  # whole segments only


@pytest.mark.parametrize("name", [s.name for s in registry.specs() if s.build is not None])
def test_a_step_changes_no_default(name: str) -> None:
    """A resume puts the config's hyper-parameters (the optimizer's ``defaults`` keys) back over
    the loaded param groups; a counter kept among the defaults would be reset to its initial
    value (Muon's step count was: its resumed AdamW bias correction restarted at t = 1)."""
    spec = registry.get(name)
    model = make_model()
    opt = spec.build(model, 0.01, spec.hparams())
    before = [{k: g[k] for k in opt.defaults if k != "params"} for g in opt.param_groups]
    for step in range(3):
        loss_fn(model, *batch(step)).backward()
        opt.step()
        opt.zero_grad()
    after = [{k: g[k] for k in opt.defaults if k != "params"} for g in opt.param_groups]
    assert after == before

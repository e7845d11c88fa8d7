"""The paper's model options ([model] tie_embeddings, init_std, rope_theta, rope_scaling) through
the real trainer on 2 CPU ranks: training, bitwise resume, the X export in transformers against
amuse-eval; and the authors' init and RoPE in process.

One 10-step tied run (checkpoints at 5 and 10) is shared; the resume test continues its step 5.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests._titan import (
    DEBUG_TOML,
    amuse_eval,
    eval_batches,
    read_x,
    run_args,
    tb_by_step,
    torchrun,
)

STEPS = 10
PAPER = dict(
    model__tie_embeddings=True,
    model__init_std=0.02,
    model__rope_theta=10000.0,
    model__rope_scaling=False,
)


def tied_args(dump: Path, assets: Path) -> list[str]:
    return run_args(dump, assets, steps=STEPS, checkpoint__interval=5, **PAPER)


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    dump = tmp_path_factory.mktemp("tied")
    torchrun(2, tied_args(dump, assets), dump)
    return dump


@pytest.mark.e2e
def test_tied_run_trains_and_exports_one_embedding(tied: Path) -> None:
    loss = tb_by_step(tied, "loss_metrics/global_avg_loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in loss.values())
    assert loss[STEPS] < loss[1] - 0.3, loss  # it learns
    x = tb_by_step(tied, "validation_x/loss")
    assert x[10] < x[1], x
    step = tied / "checkpoint" / f"step-{STEPS}"
    config = json.loads((step / "x" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    rope = config.get("rope_parameters") or config["rope_scaling"]
    assert rope.get("rope_theta", config.get("rope_theta")) == 10000.0
    assert rope["factor"] == 1.0  # Llama 3 scaling off: the identity
    tensors = read_x(step)
    assert "lm_head.weight" not in tensors  # tied: the head is the embedding
    assert len(tensors) == 1 + 4 * 9 + 1
    meta = json.loads((step / "amuse_meta.json").read_text())
    assert meta["config"]["model"]["tie_embeddings"] is True


@pytest.mark.e2e
def test_tied_resume_is_bitwise_identical(tied: Path, tmp_path: Path, assets: Path) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(tied / "checkpoint" / "step-5", resumed / "checkpoint" / "step-5")
    torchrun(2, tied_args(resumed, assets), tmp_path)
    a = tb_by_step(tied, "loss_metrics/global_avg_loss")
    b = tb_by_step(resumed, "loss_metrics/global_avg_loss")
    assert sorted(b) == list(range(6, STEPS + 1))
    assert all(a[s] == b[s] for s in b), (a, b)
    xa = read_x(tied / "checkpoint" / f"step-{STEPS}")
    xb = read_x(resumed / "checkpoint" / f"step-{STEPS}")
    assert xa.keys() == xb.keys()
    for k in xa:
        assert torch.equal(xa[k], xb[k]), k


@pytest.mark.e2e
def test_tied_export_in_transformers_matches_amuse_eval(
    tied: Path, tmp_path: Path, assets: Path
) -> None:
    from transformers import LlamaForCausalLM

    x_dir = tied / "checkpoint" / f"step-{STEPS}" / "x"
    rows = amuse_eval(x_dir, tmp_path / "eval", tmp_path)
    assert [(r["step"], r["source"], r["weights"]) for r in rows] == [(STEPS, "export", "x")]
    # amuse-eval runs on one process (no FSDP): X from the DCP state there agrees too
    dcp = amuse_eval(x_dir.parent, tmp_path / "eval_dcp", tmp_path, "--source", "dcp")
    assert dcp[0]["loss"] == pytest.approx(rows[0]["loss"], abs=1e-5)
    hf_model = LlamaForCausalLM.from_pretrained(x_dir, torch_dtype=torch.float32).eval()
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()

    loader = eval_batches(assets, 2)
    losses = []
    with torch.no_grad():
        for i, (inputs, labels) in enumerate(loader):
            if i == 2:
                break
            logits = hf_model(inputs["input"]).logits
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum"
            )
            losses.append(float(ce) / labels.numel())
    assert sum(losses) / len(losses) == pytest.approx(rows[0]["loss"], abs=1e-4)


def _model(*overrides: str) -> torch.nn.Module:
    """The tiny flavor built as the trainer builds it (config -> model args), on CPU."""
    from amuse_dist.titan.config import parse_job_config
    from amuse_dist.titan.model import FLAVORS, AmuseTransformer, init_params

    cfg = parse_job_config(["--job.config_file", str(DEBUG_TOML), *overrides])
    args = copy.deepcopy(FLAVORS["tiny"])  # update_from_config changes it in place
    args.update_from_config(cfg)
    torch.manual_seed(0)
    model = AmuseTransformer(args)
    init_params(model)
    return model


@pytest.mark.unit
def test_authors_init_std_and_rope() -> None:
    from torchtitan.models.llama3.model.model import precompute_freqs_cis

    model = _model(
        "--model.init_std", "0.02", "--model.rope_theta", "10000", "--model.no-rope_scaling"
    )
    weights = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    assert "output.weight" in weights  # untied here: the head is drawn too
    for name, p in weights.items():
        assert float(p.std()) == pytest.approx(0.02, rel=0.03), name
        assert abs(float(p.mean())) < 1e-3, name
    assert all(float(p.min()) == 1.0 for n, p in model.named_parameters() if "norm" in n)
    head_dim = model.model_args.dim // model.model_args.n_heads
    t = torch.arange(model.freqs_cis.shape[0]).float()
    inv = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)  # plain RoPE
    assert torch.allclose(model.freqs_cis, torch.polar(torch.ones(1), torch.outer(t, inv)))
    stock = _model()  # torchtitan's defaults: std-1 embedding, theta 5e5 with Llama 3 scaling
    assert float(stock.tok_embeddings.weight.std()) == pytest.approx(1.0, rel=0.05)
    assert not torch.allclose(stock.freqs_cis, model.freqs_cis)
    assert torch.equal(
        stock.freqs_cis, precompute_freqs_cis(head_dim, stock.freqs_cis.shape[0], 500000)
    )


@pytest.mark.unit
def test_tied_model_has_one_parameter() -> None:
    model = _model("--model.tie_embeddings", "--model.init_std", "0.02")
    assert model.output.weight is model.tok_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert "output.weight" not in names and "tok_embeddings.weight" in names


@pytest.mark.unit
def test_bad_model_options_name_the_key(tmp_path: Path) -> None:
    from amuse_dist.titan.config import ConfigError, validate_config

    toml = tmp_path / "bad.toml"
    toml.write_text(
        DEBUG_TOML.read_text().replace('flavor = "tiny"', 'flavor = "tiny"\ntie_embeddings = 1')
    )
    with pytest.raises(ConfigError, match=r"\[model\] tie_embeddings = 1: expected a bool"):
        validate_config(str(toml))

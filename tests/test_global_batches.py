"""World-size-independent global batches: same data per step and a resharding-safe state."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from amuse_dist.data.corpus import build_builtin
from amuse_dist.titan.loaders.global_batches import (
    STATE_KEY,
    GlobalBatchDataloader,
    build_global_batch_dataloader,
)

pytestmark = pytest.mark.unit

SEQ = 32
STREAM = "jsonl_stream"  # a torchtitan text dataset over local jsonl files
GBS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from amuse_dist.titan.loaders.hub import jsonl_dataset_config

    built = build_builtin(tmp_path_factory.mktemp("assets"), 1024, max_bytes=300_000)
    corpus = built.corpus / "train"  # the built-in corpus's text, streamed as a hub stand-in
    DATASETS.setdefault(STREAM, jsonl_dataset_config(corpus))
    return corpus, HuggingFaceTokenizer(str(built.tokenizer))


def _job_config(corpus: Path, local: int, gbs: int, *extra: str) -> Any:
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(
        [
            "--training.dataset",
            STREAM,
            "--training.dataset_path",
            str(corpus),
            "--training.seq_len",
            str(SEQ),
            "--training.local_batch_size",
            str(local),
            "--training.global_batch_size",
            str(gbs),
            *extra,
        ]
    )


def _loaders(assets: tuple[Path, Any], ws: int, local: int = 1, gbs: int = GBS) -> list[Any]:
    corpus, tok = assets
    jc = _job_config(corpus, local, gbs)
    return [build_global_batch_dataloader(ws, r, tok, jc) for r in range(ws)]


def _steps(loaders: list[Any], n: int, local: int = 1, gbs: int = GBS) -> list[torch.Tensor]:
    """Run ``n`` steps like torchtitan's Trainer (``accum`` micro-batches per rank per step).

    Returns per step the inputs ``[gbs, SEQ]`` concatenated in (micro-batch, rank) order."""
    ws = len(loaders)
    accum = gbs // (local * ws)
    its = [iter(dl) for dl in loaders]
    out = []
    for _ in range(n):
        per_rank: list[list[torch.Tensor]] = [[] for _ in range(ws)]
        for _ in range(accum):
            for r, it in enumerate(its):
                inputs, labels = next(it)
                x = inputs["input"]
                assert x.shape == labels.shape == (local, SEQ)
                assert torch.equal(x[:, 1:], labels[:, :-1])
                per_rank[r].append(x)
        out.append(torch.cat([per_rank[r][m] for m in range(accum) for r in range(ws)]))
        # the union in rank order is the same set of sequences
        by_rank = torch.cat([x for r in range(ws) for x in per_rank[r]])
        assert sorted(map(tuple, by_rank.tolist())) == sorted(map(tuple, out[-1].tolist()))
    return out


def _reference(assets: tuple[Path, Any], n_seq: int) -> torch.Tensor:
    """The first ``n_seq`` sequences of torchtitan's unsplit stream (one rank)."""
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    corpus, tok = assets
    ds = HuggingFaceTextDataset(STREAM, str(corpus), tok, seq_len=SEQ, infinite=True)
    it = iter(ds)
    return torch.stack([next(it)[0]["input"] for _ in range(n_seq)])


@pytest.mark.parametrize("local", [1, 2])
def test_same_global_batches_for_any_world_size(assets: tuple[Path, Any], local: int) -> None:
    gbs = GBS * local
    ref = _reference(assets, 4 * gbs)
    for ws in (1, 2, 3):
        steps = _steps(_loaders(assets, ws, local, gbs), 4, local, gbs)
        for s, batch in enumerate(steps):
            assert torch.equal(batch, ref[s * gbs : (s + 1) * gbs]), (ws, s)


@pytest.mark.parametrize("new_ws", [1, 3])
def test_reshard_resume(assets: tuple[Path, Any], new_ws: int) -> None:
    ref = _steps(_loaders(assets, 2), 4)

    old = _loaders(assets, 2)
    for got, want in zip(_steps(old, 2), ref[:2], strict=True):
        assert torch.equal(got, want)
    states = [dl.state_dict() for dl in old]
    assert set(states[0]) == {STATE_KEY}
    assert states[0] == states[1]  # rank independent: DCP keeps one copy of the same bytes
    saved = pickle.loads(states[0][STATE_KEY])
    assert saved["sequences"] == 2 * GBS and saved["consumed_in_global_batch"] == 0

    new = _loaders(assets, new_ws)
    for dl in new:
        dl.load_state_dict(states[0])
    resumed = _steps(new, 2)
    for got, want in zip(resumed, ref[2:], strict=True):
        assert torch.equal(got, want)


def test_state_is_the_stream_position(assets: tuple[Path, Any]) -> None:
    """At a step boundary the state is torchtitan's unsplit stream after ``steps * gbs``
    sequences on every rank, although each rank read its peers' shares of the last chunk too."""
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    corpus, tok = assets
    ds = HuggingFaceTextDataset(STREAM, str(corpus), tok, seq_len=SEQ, infinite=True)
    it = iter(ds)
    for _ in range(2 * GBS):
        next(it)
    for ws in (1, 2, 3):
        dls = _loaders(assets, ws)
        _steps(dls, 2)
        for dl in dls:
            assert pickle.loads(dl.state_dict()[STATE_KEY])["dataset"] == ds.state_dict()


def test_dcp_round_trip_across_world_sizes(assets: tuple[Path, Any], tmp_path: Path) -> None:
    """Through torch.distributed.checkpoint as torchtitan's CheckpointManager does it."""
    import torch.distributed.checkpoint as dcp

    ref = _steps(_loaders(assets, 1), 3)
    old = _loaders(assets, 2)
    _steps(old, 2)
    dcp.save({"dataloader": old[0]}, checkpoint_id=str(tmp_path / "ckpt"))

    new = _loaders(assets, 3)
    for dl in new:
        dcp.load({"dataloader": dl}, checkpoint_id=str(tmp_path / "ckpt"))
    assert torch.equal(_steps(new, 1)[0], ref[2])


def test_empty_state_is_a_fresh_start(
    assets: tuple[Path, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ref = _steps(_loaders(assets, 1), 1)
    dls = _loaders(assets, 3)
    caplog.set_level(logging.WARNING)
    for dl in dls:
        dl.load_state_dict({})
    dls[0].load_state_dict({"dp_rank_0": b"", "world_size": 2})  # a stock torchtitan state
    assert torch.equal(_steps(dls, 1)[0], ref[0])
    assert sum("starting from the beginning" in r.getMessage() for r in caplog.records) == 4


def test_unset_global_batch_is_local_times_dp(assets: tuple[Path, Any]) -> None:
    dls = _loaders(assets, 2, local=2, gbs=-1)
    assert isinstance(dls[0], GlobalBatchDataloader)
    assert dls[0].dataset.global_batch_size == 4
    assert torch.equal(_steps(dls, 1, local=2, gbs=4)[0], _reference(assets, 4))


def test_bad_divisibility(assets: tuple[Path, Any]) -> None:
    with pytest.raises(
        ValueError, match=r"training\.global_batch_size.*training\.local_batch_size"
    ):
        _loaders(assets, 2, local=2, gbs=6)
    with pytest.raises(ValueError, match=r"training\.global_batch_size"):
        _loaders(assets, 1, local=1, gbs=0)


def test_resume_mid_global_batch_on_incompatible_world_size(assets: tuple[Path, Any]) -> None:
    old = _loaders(assets, 2)
    its = [iter(dl) for dl in old]
    for it in its:  # one micro-batch of a 3-micro-batch step: 2 of 6 sequences consumed
        next(it)
    new = _loaders(assets, 3)
    with pytest.raises(ValueError, match="local_batch_size"):
        new[0].load_state_dict(old[0].state_dict())


def test_num_workers_rejected(assets: tuple[Path, Any]) -> None:
    corpus, tok = assets
    jc = _job_config(corpus, 1, GBS, "--training.dataloader.num_workers", "2")
    with pytest.raises(ValueError, match="num_workers"):
        build_global_batch_dataloader(1, 0, tok, jc)

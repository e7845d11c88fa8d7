"""The ``token_shards`` dataset: torchtitan dataloaders over prepared token shards.

Training: with G sequences per step (``training.global_batch_size``), W data-parallel ranks and
``a = G / (local_batch_size * W)`` micro-batches per step, rank r's micro-batch m of step s holds
global sequences ``base + s*G + r*G/W + m*local + [0, local)`` of the shards' deterministic
global order (:class:`amuse_dist.data.shards.SplitReader`). A rank reads only its own sequences,
by memory map, in DataLoader workers if ``training.dataloader.num_workers > 0``. The checkpoint
state is the next global sequence at a step boundary: one integer, the same on every rank, so a
resume on any world size continues with exactly the same data.

Validation: batch b is global sequences ``[b*Gv, (b+1)*Gv)`` of the validation split in file order,
with ``Gv = validation.local_batch_size`` taken as the *global* validation batch, split as evenly as
possible over the ranks. The validated set is therefore the same on any number of ranks, and so is
the loss (the in-training validator and amuse-eval on 1, 2 or 3 ranks agree).

Start-up checks (:func:`check_job_config`, run before any process group starts and again when the
loaders are built): the shards exist and match their index, the tokenizer at
``model.hf_assets_path`` has the shards' fingerprint, its vocab fits the model's, and the splits
hold enough sequences of ``seq_len``. Each failure is a DataError naming the file or both values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.hf_datasets.text_datasets import build_text_validation_dataloader
from torchtitan.tools.logging import logger

from amuse_dist.data.errors import DataError
from amuse_dist.data.shards import SplitReader, read_index
from amuse_dist.data.tokenizer import Encoder
from amuse_dist.titan.loaders.datasets import TOKEN_SHARDS as DATASET
from amuse_dist.titan.loaders.datasets import lookup, reads_token_shards
from amuse_dist.titan.loaders.global_batches import (
    build_global_batch_dataloader,
    resolve_global_batch_size,
)
from amuse_dist.titan.loaders.state import STATE_KEY, Batch
from amuse_dist.titan.loaders.state import STATE_VERSION as _STATE_VERSION

TRACE_ENV = "AMUSE_DATA_TRACE"
"""A folder: each rank appends ``trace-rank<r>.jsonl`` with the global sequences it consumed (and
a hash of their tokens) per micro-batch. A debugging aid; the resharding tests use it."""


# ------------------------------------------------------------------------------------ checks
def _dataset_path(job_config: Any, section: str) -> Path:
    path = getattr(job_config, section).dataset_path
    if not path:
        raise DataError(
            f'[{section}] dataset = "{DATASET}" needs [{section}] dataset_path: a folder made by '
            "amuse-prepare-data"
        )
    return Path(path)


def check_tokenizer(index: dict[str, Any], folder: Path, tokenizer_dir: str | None) -> None:
    """The tokenizer training will use must be the one the shards were made with."""
    if not tokenizer_dir:
        raise DataError(f"[model] hf_assets_path is unset; the shards in {folder} need a tokenizer")
    enc = Encoder(tokenizer_dir)
    want = index["tokenizer"]["fingerprint"]
    if enc.fingerprint != want:
        raise DataError(
            f"tokenizer mismatch: [model] hf_assets_path = {tokenizer_dir} has fingerprint "
            f"{enc.fingerprint} (vocab {enc.vocab_size}), but the token shards in {folder} were "
            f"made with {index['tokenizer'].get('path')} ({want}, vocab "
            f"{index['tokenizer']['vocab_size']}): use that tokenizer or prepare the data again"
        )


def check_vocab(
    index: dict[str, Any], folder: Path, job_config: Any, model_vocab: int | None
) -> None:
    """The shards' ids must all have an embedding (``model_vocab``: the model's vocab_size,
    passed in by the train spec that knows the flavors; None skips the check)."""
    vocab = int(index["tokenizer"]["vocab_size"])
    if model_vocab is not None and vocab > model_vocab:
        raise DataError(
            f"the token shards in {folder} use a vocab of {vocab} tokens, larger than the model's "
            f'vocab_size {model_vocab} ([model] flavor = "{job_config.model.flavor}"): ids '
            f">= {model_vocab} have no embedding; use a smaller tokenizer or a larger flavor"
        )


def _open(
    job_config: Any,
    section: str,
    split: str,
    seq_len: int,
    seed: int | None,
    model_vocab: int | None,
) -> SplitReader:
    folder = _dataset_path(job_config, section)
    index = read_index(folder)
    check_tokenizer(index, folder, job_config.model.hf_assets_path)
    check_vocab(index, folder, job_config, model_vocab)
    return SplitReader(folder, split, seq_len, seed=seed, index=index)


def data_seed(job_config: Any) -> int:
    seed = job_config.debug.seed
    return 0 if seed is None else int(seed)


def check_job_config(job_config: Any, model_vocab: int | None) -> list[str]:
    """Every token-shard problem of a (resolved) config, one message each (empty when fine or
    unused)."""
    errors: list[str] = []
    t, v = job_config.training, job_config.validation
    if reads_token_shards(t.dataset):
        try:
            reader = _open(
                job_config, "training", "train", t.seq_len, data_seed(job_config), model_vocab
            )
            gbs = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size
            if reader.num_sequences < gbs:
                raise DataError(
                    f"the train split of {reader.folder} holds {reader.num_sequences} sequences "
                    f"of seq_len {t.seq_len}, fewer than one global batch ({gbs} sequences)"
                )
        except DataError as e:
            errors.append(str(e))
    if v.enable and reads_token_shards(v.dataset):
        try:
            validation_reader(job_config, model_vocab)
        except DataError as e:
            if str(e) not in errors:
                errors.append(str(e))
    return errors


# ------------------------------------------------------------------------------------ training
def _batch(seqs: np.ndarray) -> Batch:
    t = torch.from_numpy(seqs)
    return {"input": t[:, :-1].contiguous()}, t[:, 1:].contiguous()


class MicroBatches(Dataset):
    """Map-style: item k is this rank's k-th micro-batch after global sequence ``base``."""

    def __init__(
        self, reader: SplitReader, dp_rank: int, dp_world_size: int, local: int, gbs: int
    ) -> None:
        self.reader = reader
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.local, self.gbs = local, gbs
        self.per_rank = gbs // dp_world_size
        self.accum = self.per_rank // local
        self.base = 0

    def first(self, k: int) -> int:
        """Global index of the first sequence of micro-batch k."""
        step, micro = divmod(k, self.accum)
        return self.base + step * self.gbs + self.dp_rank * self.per_rank + micro * self.local

    def __getitem__(self, k: int) -> Batch:
        return _batch(self.reader.sequences(self.first(k), self.local))

    def __len__(self) -> int:  # infinite in practice (epochs wrap); Sampler drives it
        return 1 << 62


class _CountFrom(Sampler[int]):
    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class TokenShardDataloader(BaseDataLoader):
    """This rank's micro-batches; the state is the next global sequence (world-size free).

    Workers may prefetch ahead: the position counts only the micro-batches handed to the
    trainer, so a checkpoint never skips data a worker had read but the trainer had not used.
    """

    def __init__(
        self,
        dataset: MicroBatches,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.dp_rank = dataset.dp_rank
        self.dp_world_size = dataset.dp_world_size
        self.consumed = 0  # micro-batches handed out since ``dataset.base``
        self._trace = _trace_file(dataset.dp_rank)

    def _loader(self) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return DataLoader(
            self.dataset,
            batch_size=None,
            sampler=_CountFrom(self.consumed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def __iter__(self) -> Iterator[Batch]:
        for k, batch in zip(itertools.count(self.consumed), self._loader(), strict=False):
            if self._trace is not None:
                _trace(self._trace, self.dataset.first(k), batch)
            self.consumed = k + 1
            yield batch

    def next_sequence(self) -> int:
        ds = self.dataset
        return ds.base + (self.consumed // ds.accum) * ds.gbs

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        state = {
            "version": _STATE_VERSION,
            "next_sequence": self.next_sequence(),
            "micro_in_step": self.consumed % ds.accum,
            "global_batch_size": ds.gbs,
            "local_batch_size": ds.local,
            "dp_world_size": ds.dp_world_size,
            "seq_len": ds.reader.seq_len,
            "seed": ds.reader.seed,
            "fingerprint": ds.reader.index["tokenizer"]["fingerprint"],
            "num_sequences": ds.reader.num_sequences,
        }
        return {STATE_KEY: pickle.dumps(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        payload = state_dict.get(STATE_KEY) if state_dict else None
        if not payload:
            logger.warning(
                f"token_shards dataloader: no '{STATE_KEY}' state to load (keys "
                f"{sorted(state_dict or {})}); starting from the first sequence"
            )
            return
        state = pickle.loads(payload)
        ds = self.dataset
        if state.get("version") != _STATE_VERSION or "next_sequence" not in state:
            raise DataError(
                f"the checkpoint's data position (version {state.get('version')}, keys "
                f"{sorted(state)}) was not saved by the token-shard loader (a run of an earlier "
                "amuse_dist streamed local_corpus/local_text): resume with "
                "--checkpoint.exclude_from_loading dataloader to start the data over"
            )
        same_data = (
            state["fingerprint"] == ds.reader.index["tokenizer"]["fingerprint"]
            and state["num_sequences"] == ds.reader.num_sequences
            and state["seq_len"] == ds.reader.seq_len
            and state["seed"] == ds.reader.seed
        )
        if not same_data:
            raise DataError(
                "the checkpoint's data position belongs to other data: saved seq_len "
                f"{state['seq_len']}, seed {state['seed']}, {state['num_sequences']} sequences, "
                f"tokenizer {state['fingerprint']}; now seq_len {ds.reader.seq_len}, seed "
                f"{ds.reader.seed}, {ds.reader.num_sequences} sequences, tokenizer "
                f"{ds.reader.index['tokenizer']['fingerprint']} (exclude the dataloader from "
                "loading to start the data over)"
            )
        micro = int(state["micro_in_step"])
        layout = (state["global_batch_size"], state["local_batch_size"], state["dp_world_size"])
        if micro and layout != (ds.gbs, ds.local, ds.dp_world_size):
            raise DataError(
                f"the checkpoint was saved mid step ({micro} micro-batches in) with global/local "
                f"batch and dp degree {layout}; it continues only with the same, not "
                f"{(ds.gbs, ds.local, ds.dp_world_size)}"
            )
        if state["global_batch_size"] != ds.gbs:
            logger.warning(
                f"training.global_batch_size changed from {state['global_batch_size']} to "
                f"{ds.gbs}: the data continues from global sequence {state['next_sequence']}"
            )
        ds.base = int(state["next_sequence"])
        self.consumed = micro
        logger.info(
            f"token_shards dataloader resumed at global sequence {ds.base} (saved on "
            f"{state['dp_world_size']} dp ranks, now {ds.dp_world_size})"
        )


def _trace_file(rank: int) -> Path | None:
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"trace-rank{rank}.jsonl"


def _trace(path: Path, first: int, batch: Batch) -> None:
    inputs, labels = batch
    seqs = torch.cat([inputs["input"], labels[:, -1:]], dim=1).numpy()
    hashes = [hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in seqs]
    with open(path, "a") as f:
        f.write(json.dumps({"first": first, "hashes": hashes}) + "\n")


def build_token_shard_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: Any,
    job_config: Any,
    infinite: bool = True,
    model_vocab: int | None = None,
) -> TokenShardDataloader:
    """The training loader of ``training.dataset = "token_shards"``."""
    del tokenizer, infinite  # the shards are tokenized; epochs wrap around (a new permutation)
    cfg = job_config.training
    gbs = resolve_global_batch_size(cfg.global_batch_size, cfg.local_batch_size, dp_world_size)
    reader = _open(job_config, "training", "train", cfg.seq_len, data_seed(job_config), model_vocab)
    if reader.num_sequences < gbs:
        raise DataError(
            f"the train split of {reader.folder} holds {reader.num_sequences} sequences of "
            f"seq_len {cfg.seq_len}, fewer than one global batch ({gbs})"
        )
    logger.info(
        f"token_shards: {reader.num_sequences:,} training sequences of {cfg.seq_len} tokens in "
        f"{reader.folder}; rank {dp_rank} reads {gbs // dp_world_size} of {gbs} per step"
    )
    dl = cfg.dataloader
    ds = MicroBatches(reader, dp_rank, dp_world_size, cfg.local_batch_size, gbs)
    return TokenShardDataloader(ds, dl.num_workers, dl.pin_memory, dl.prefetch_factor)


# ------------------------------------------------------------------------------------ validation
class TokenShardValidationLoader(BaseDataLoader):
    """``steps`` batches: this rank's share of global sequences ``[b*Gv, (b+1)*Gv)``.

    Each ``iter()`` starts at batch 0, so every evaluation sees the same batches."""

    def __init__(self, reader: SplitReader, dp_rank: int, dp_world_size: int, gbs: int, steps: int):
        if gbs < dp_world_size:
            raise DataError(
                f"[validation] local_batch_size = {gbs} is the global validation batch with "
                f'dataset = "{DATASET}"; it must be >= the data-parallel degree {dp_world_size}'
            )
        self.reader, self.steps, self.gbs = reader, steps, gbs
        self.lo = dp_rank * gbs // dp_world_size
        self.hi = (dp_rank + 1) * gbs // dp_world_size

    def __iter__(self) -> Iterator[Batch]:
        for b in range(self.steps):
            yield _batch(self.reader.sequences(b * self.gbs + self.lo, self.hi - self.lo))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def build_token_shard_validation_dataloader(
    dp_world_size: int, dp_rank: int, job_config: Any, model_vocab: int | None = None
) -> TokenShardValidationLoader:
    v = job_config.validation
    reader = validation_reader(job_config, model_vocab)
    return TokenShardValidationLoader(reader, dp_rank, dp_world_size, v.local_batch_size, v.steps)


def validation_reader(job_config: Any, model_vocab: int | None) -> SplitReader:
    """The validation split's reader, checked against the config (before launch and at build)."""
    v, t = job_config.validation, job_config.training
    if v.seq_len > t.seq_len:
        raise DataError(
            f"[validation] seq_len = {v.seq_len} is longer than [training] seq_len = "
            f"{t.seq_len}: the model was not trained on such positions"
        )
    reader = _open(job_config, "validation", "validation", v.seq_len, None, model_vocab)
    need = v.steps * v.local_batch_size
    if reader.num_sequences < need:
        raise DataError(
            f"the validation split of {reader.folder} holds {reader.num_sequences} "
            f"sequences of seq_len {v.seq_len}, fewer than [validation] steps x "
            f"local_batch_size = {v.steps} x {v.local_batch_size} = {need}"
        )
    return reader


def _check_resolved(name: str | None, section: str) -> None:
    kind = lookup(name)
    if kind is not None and kind.source in ("builtin", "folder"):
        raise DataError(
            f'[{section}] dataset = "{name}" is read as token shards once prepared: call '
            "amuse_dist.titan.loaders.datasets.resolve_datasets on the config first (amuse-train "
            "and amuse-eval do)"
        )


def build_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: Any,
    job_config: Any,
    infinite: bool = True,
    model_vocab: int | None = None,
) -> BaseDataLoader:
    """The train spec's ``build_dataloader_fn``: token shards, or the global-stream loader."""
    _check_resolved(job_config.training.dataset, "training")
    if reads_token_shards(job_config.training.dataset):
        return build_token_shard_dataloader(
            dp_world_size, dp_rank, tokenizer, job_config, model_vocab=model_vocab
        )
    return build_global_batch_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite)


def build_validation_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: Any,
    job_config: Any,
    model_vocab: int | None = None,
) -> BaseDataLoader:
    """Validation loader: token shards, or torchtitan's text loader for hub datasets."""
    _check_resolved(job_config.validation.dataset, "validation")
    if reads_token_shards(job_config.validation.dataset):
        return build_token_shard_validation_dataloader(
            dp_world_size, dp_rank, job_config, model_vocab
        )
    return build_text_validation_dataloader(
        job_config=job_config,
        dp_world_size=dp_world_size,
        dp_rank=dp_rank,
        tokenizer=tokenizer,
        infinite=job_config.validation.steps != -1,
    )

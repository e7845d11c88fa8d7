"""A training dataloader whose data order and checkpoint state do not depend on the world size.

torchtitan 0.2.2's ``build_text_dataloader`` splits the dataset by rank
(``split_dataset_by_node``), so which sequences a step trains on depends on the data-parallel
degree, and its ``ParallelAwareDataloader`` stores one state per rank and refuses to load a state
saved with another degree. A checkpoint saved on N ranks therefore cannot resume on M ranks with
the same data.

Here every rank reads the same, unsplit token stream (torchtitan's ``HuggingFaceTextDataset``
with ``dp_world_size=1``: same dataset registry, same ``seq_len`` packing). The stream is cut into
global batches of ``training.global_batch_size`` sequences; each global batch into micro-batch
chunks of ``local_batch_size * dp_world_size`` consecutive sequences (the Trainer draws
``global_batch_size // (local_batch_size * dp_world_size)`` micro-batches per step); each chunk
into ``dp_world_size`` contiguous slices, rank r taking slice r. Step s thus always trains on
sequences ``[s * G, (s + 1) * G)`` of the stream, whatever the world size, and the position in the
stream is the same on every rank after each micro-batch, so the checkpoint state is one
rank-independent value that loads on any world size.

The price: every rank tokenizes the whole stream (``dp_world_size`` times the tokenization work of
the stock loader), which is small next to a training step.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset
from torchtitan.tools.logging import logger

from amuse_dist.titan.loaders.state import STATE_KEY, Batch
from amuse_dist.titan.loaders.state import STATE_VERSION as _STATE_VERSION


def resolve_global_batch_size(global_batch_size: int, local_batch_size: int, dp: int) -> int:
    """The global batch in sequences, checked against what the Trainer will draw per step.

    A negative ``global_batch_size`` means ``local_batch_size * dp`` as in torchtitan's Trainer;
    it then changes with the world size, so a reshard changes the global batch (and the data
    of every later step). Set ``training.global_batch_size`` explicitly to reshard exactly.
    """
    if local_batch_size <= 0:
        raise ValueError(f"training.local_batch_size must be positive, got {local_batch_size}")
    if dp <= 0:
        raise ValueError(f"dp_world_size must be positive, got {dp}")
    if global_batch_size < 0:
        return local_batch_size * dp
    if global_batch_size == 0 or global_batch_size % (local_batch_size * dp) != 0:
        raise ValueError(
            f"training.global_batch_size ({global_batch_size}) must be a positive multiple of "
            f"training.local_batch_size ({local_batch_size}) * data-parallel degree ({dp}) "
            f"= {local_batch_size * dp}"
        )
    return global_batch_size


class GlobalBatchSlices(IterableDataset, Stateful):
    """Yields this rank's micro-batches ``({"input": [L, S]}, labels [L, S])`` of the global stream.

    For each micro-batch it reads the whole chunk of ``L * dp`` sequences (all ranks' shares)
    before yielding its own slice, so at every yield the underlying stream position, and hence
    ``state_dict()``, is identical on all ranks. A final partial chunk is dropped so that every
    rank yields the same number of micro-batches (no rank waits for a peer that ran out).
    """

    def __init__(
        self,
        dataset: HuggingFaceTextDataset,
        dp_rank: int,
        dp_world_size: int,
        local_batch_size: int,
        global_batch_size: int,
    ) -> None:
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_world_size})")
        self.dataset = dataset
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.local_batch_size = local_batch_size
        self.global_batch_size = global_batch_size
        self.sequences = 0  # sequences of the stream consumed by all ranks together
        self.consumed = 0  # of those, how many belong to the current (unfinished) global batch

    @property
    def chunk_size(self) -> int:
        return self.local_batch_size * self.dp_world_size

    def __iter__(self) -> Iterator[Batch]:
        lo = self.dp_rank * self.local_batch_size
        hi = lo + self.local_batch_size
        source = iter(self.dataset)
        while True:
            chunk: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
            for sample in source:
                chunk.append(sample)
                if len(chunk) == self.chunk_size:
                    break
            if len(chunk) < self.chunk_size:
                if chunk:
                    logger.warning(
                        f"global-batch dataloader: dropping a final partial micro-batch chunk "
                        f"of {len(chunk)} < {self.chunk_size} sequences"
                    )
                return
            # State first: the generator is suspended at the yield when state_dict() is taken.
            self.sequences += self.chunk_size
            self.consumed = (self.consumed + self.chunk_size) % self.global_batch_size
            mine = chunk[lo:hi]
            inputs = torch.stack([x["input"] for x, _ in mine])
            labels = torch.stack([y for _, y in mine])
            yield {"input": inputs}, labels

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "dataset": self.dataset.state_dict(),
            "sequences": self.sequences,
            "consumed_in_global_batch": self.consumed,
            "global_batch_size": self.global_batch_size,
            "dp_world_size": self.dp_world_size,
            "local_batch_size": self.local_batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"global-batch dataloader state version {version} is not supported")
        consumed = int(state_dict["consumed_in_global_batch"])
        saved_gbs = int(state_dict["global_batch_size"])
        if consumed % self.chunk_size != 0:
            raise ValueError(
                f"dataloader state was saved {consumed} sequences into a global batch of "
                f"{saved_gbs}, not a multiple of training.local_batch_size * dp degree "
                f"({self.local_batch_size} * {self.dp_world_size}): cannot continue it on this "
                "world size"
            )
        if consumed:
            logger.warning(
                f"dataloader state was saved mid global batch ({consumed}/{saved_gbs} sequences "
                "consumed); later steps stay shifted against the saved run's global batches"
            )
        if saved_gbs != self.global_batch_size:
            logger.warning(
                f"training.global_batch_size changed from {saved_gbs} to "
                f"{self.global_batch_size} (set it explicitly to reshard with the same batches); "
                "the token stream continues from the saved position"
            )
        self.dataset.load_state_dict(state_dict["dataset"])
        self.sequences = int(state_dict["sequences"])
        self.consumed = consumed % self.global_batch_size
        logger.info(
            f"global-batch dataloader resumed at sequence {self.sequences} "
            f"(saved on {state_dict.get('dp_world_size')} dp ranks, now {self.dp_world_size})"
        )


class GlobalBatchDataloader(StatefulDataLoader, BaseDataLoader):
    """``StatefulDataLoader`` over ``GlobalBatchSlices`` with a world-size-independent state.

    ``state_dict()`` is ``{"global": pickle.dumps(stream state)}``: one key, the same bytes on
    every rank (DCP keeps one copy), loadable on any world size. torchdata's own iterator state
    (micro-batches yielded, which depends on the world size) is not saved: the stream state is
    complete because each yield is one whole micro-batch and nothing is prefetched
    (``num_workers`` must be 0). After ``load_state_dict`` the next ``iter()`` resumes there.
    """

    dataset: GlobalBatchSlices

    def __init__(self, dataset: GlobalBatchSlices, pin_memory: bool = False) -> None:
        super().__init__(dataset, batch_size=None, num_workers=0, pin_memory=pin_memory)
        self.dp_rank = dataset.dp_rank
        self.dp_world_size = dataset.dp_world_size

    def state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: pickle.dumps(self.dataset.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Drop any iterator (and torchdata's pending state): the next iter() starts from here.
        self._iterator = None
        self._initial_iter_for_state_dict = False
        self.next_iter_state = None
        payload = state_dict.get(STATE_KEY) if state_dict else None
        if not payload:
            keys = sorted(state_dict) if state_dict else []
            logger.warning(
                f"global-batch dataloader: no '{STATE_KEY}' state to load (keys {keys}); "
                "starting from the beginning of the data"
            )
            return
        self.dataset.load_state_dict(pickle.loads(payload))


def build_global_batch_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> GlobalBatchDataloader:
    """Drop-in for torchtitan's ``build_text_dataloader`` (a ``build_dataloader_fn``).

    Reads ``training.dataset``, ``training.dataset_path``, ``training.seq_len``,
    ``training.local_batch_size``, ``training.global_batch_size`` and
    ``training.dataloader.{num_workers, pin_memory}``.
    """
    cfg = job_config.training
    local = cfg.local_batch_size
    gbs = resolve_global_batch_size(cfg.global_batch_size, local, dp_world_size)
    if cfg.global_batch_size < 0 and dp_world_size > 1:
        logger.info(
            f"training.global_batch_size is unset: using {gbs} = local * dp; resuming on another "
            "world size changes the global batch (set it explicitly to reshard exactly)"
        )
    if cfg.dataloader.num_workers != 0:
        raise ValueError(
            "the global-batch dataloader needs training.dataloader.num_workers = 0 (workers "
            f"would each replay the stream and prefetch past the saved state), got "
            f"{cfg.dataloader.num_workers}"
        )
    stream = HuggingFaceTextDataset(
        dataset_name=cfg.dataset,
        dataset_path=cfg.dataset_path,
        tokenizer=tokenizer,
        seq_len=cfg.seq_len,
        dp_rank=0,
        dp_world_size=1,  # no split by node: every rank reads the same stream
        infinite=infinite,
    )
    slices = GlobalBatchSlices(stream, dp_rank, dp_world_size, local, gbs)
    return GlobalBatchDataloader(slices, pin_memory=cfg.dataloader.pin_memory)

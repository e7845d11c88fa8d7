"""The token-shard format and its reader.

A prepared folder holds ``index.json`` and flat token files ``<split>-NNNNN.bin`` (raw
little-endian uint16 where the vocab fits, else uint32; every document is ``[BOS] ids [EOS]``,
documents back to back). The index records the tokenizer fingerprint and vocab size, the dtype,
token and document counts per shard and split, the BOS/EOS policy and the source.

Sequences: for a sequence length L, shard k holds ``(tokens_k - 1) // L`` sequences; sequence j
of a shard is tokens ``[j*L, j*L + L + 1)`` (inputs are the first L, labels the last L), so the
whole shard is used and sequences never cross shards. The global order concatenates the shards'
sequences and, for training, permutes them with a seed (a fresh permutation per epoch): global
sequence g is ``perm_e[g mod N]`` of epoch ``e = g // N``. It depends only on the data, L and the
seed, never on the number of ranks, so "the next global sequence" is the whole loader state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amuse_dist.data.errors import DataError

FORMAT = "amuse_dist.token_shards"
VERSION = 1
INDEX = "index.json"
SPLITS = ("train", "validation")


def dtype_for(vocab_size: int) -> str:
    """uint16 where every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_index(folder: Path | str) -> dict[str, Any]:
    """The index of a prepared folder, checked for format and version (errors name the file)."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise DataError(
            f"{path} not found: {folder} is not a token-shard folder "
            "(make one with amuse-prepare-data)"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise DataError(f"{path}: format version {index.get('version')}, expected {VERSION}")
    try:
        vocab = int(index["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: no tokenizer vocab_size; prepare the folder again") from None
    if index.get("dtype") != dtype_for(vocab):
        raise DataError(
            f"{path}: dtype = {index.get('dtype')!r}, but a vocab of {vocab} is stored as "
            f"{dtype_for(vocab)!r}: the index does not describe these shards (edited or from "
            "another version?); prepare the folder again with amuse-prepare-data"
        )
    return index


@dataclass
class Shard:
    path: Path
    tokens: int
    documents: int


class SplitReader:
    """Memory-mapped sequences of one split of a prepared folder.

    Opening checks every shard's size against the index (a truncated or padded file is named);
    every read checks its ids against the vocab (a corrupt file is named). Reading sequence g
    touches only its L + 1 tokens.
    """

    def __init__(
        self,
        folder: Path | str,
        split: str,
        seq_len: int,
        seed: int | None = None,
        index: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.index = index if index is not None else read_index(self.folder)
        self.split = split
        self.seq_len = int(seq_len)
        self.seed = seed
        if self.seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        info = self.index.get("splits", {}).get(split)
        if not info or not info.get("shards"):
            raise DataError(f"{self.folder / INDEX}: no '{split}' split in these token shards")
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["tokenizer"]["vocab_size"])
        self.shards: list[Shard] = []
        self._maps: list[np.memmap | None] = []
        for entry in info["shards"]:
            path = self.folder / entry["file"]
            shard = Shard(path, int(entry["tokens"]), int(entry["documents"]))
            want = shard.tokens * self.dtype.itemsize
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(
                    f"shard {path} is missing (listed in {self.folder / INDEX})"
                ) from None
            if size != want:
                raise DataError(
                    f"shard {path} is {size} bytes, expected {want} ({shard.tokens} "
                    f"{self.dtype.name} tokens per {self.folder / INDEX}): truncated or corrupt; "
                    "prepare the data again"
                )
            self.shards.append(shard)
            self._maps.append(None)
        counts = np.array([max(0, (s.tokens - 1) // self.seq_len) for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_sequences = int(self.starts[-1])
        if self.num_sequences == 0:
            raise DataError(
                f"{self.folder}: the '{split}' split ({self.tokens} tokens) holds no sequence of "
                f"seq_len {self.seq_len} + 1 tokens"
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self.tokens_read = 0  # for the loader benchmark

    def __getstate__(self) -> dict[str, Any]:
        """For DataLoader workers started by spawn: reopen the maps there, copy no tokens."""
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._maps)
        state["_perm"], state["_perm_epoch"] = None, -1
        return state

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def _map(self, k: int) -> np.memmap:
        m = self._maps[k]
        if m is None:
            m = np.memmap(self.shards[k].path, dtype=self.dtype, mode="r")
            self._maps[k] = m
        return m

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([int(self.seed or 0), epoch])
            dtype = np.uint32 if self.num_sequences < 1 << 32 else np.int64
            self._perm = rng.permutation(self.num_sequences).astype(dtype)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def locate(self, g: int) -> tuple[int, int]:
        """(shard, token offset) of global sequence ``g``."""
        if g < 0:
            raise IndexError(g)
        if self.seed is None:  # fixed order (validation): one pass, no wrap-around
            if g >= self.num_sequences:
                raise IndexError(f"sequence {g} >= {self.num_sequences}")
            j = g
        else:
            epoch, pos = divmod(g, self.num_sequences)
            j = int(self._permutation(epoch)[pos])
        k = int(np.searchsorted(self.starts, j, side="right")) - 1
        return k, (j - int(self.starts[k])) * self.seq_len

    def sequence(self, g: int) -> np.ndarray:
        """Global sequence ``g``: L + 1 token ids as int64."""
        k, off = self.locate(g)
        out = np.asarray(self._map(k)[off : off + self.seq_len + 1], dtype=np.int64)
        self.tokens_read += out.size
        if out.size and int(out.max()) >= self.vocab_size:
            raise DataError(
                f"shard {self.shards[k].path} is corrupt: token id {int(out.max())} at token "
                f"{off + int(out.argmax())} is not below the vocab size {self.vocab_size}"
            )
        return out

    def sequences(self, first: int, count: int) -> np.ndarray:
        """Global sequences ``[first, first + count)`` stacked: ``[count, L + 1]`` int64."""
        if count == 0:
            return np.empty((0, self.seq_len + 1), np.int64)
        return np.stack([self.sequence(g) for g in range(first, first + count)])

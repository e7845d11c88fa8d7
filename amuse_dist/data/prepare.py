"""Tokenize a local folder or a Hugging Face dataset into token shards, once, offline.

Work units (file pieces, or batches of streamed documents) are tokenized by a process pool and
come back in order, so the shards are byte-identical for any number of processes. Everything is
written into a hidden ``.<name>.partial-<pid>`` folder next to the output; ``index.json`` is
written last and the folder renamed into place, so an output folder either holds a complete
prepare or does not exist. A finished folder prepared with the same settings is kept as is
(a re-run is a no-op); one prepared with other settings is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from amuse_dist.data import shards as fmt
from amuse_dist.data.errors import DataError
from amuse_dist.data.sources import Unit, hf_documents, input_manifest, plan_units, read_unit
from amuse_dist.data.tokenizer import Encoder, atomic_write_text

DEFAULT_SHARD_TOKENS = 100_000_000
HF_BATCH_DOCS = 1024

# per worker process: the tokenizer, loaded once
_WORKER: dict[str, Any] = {}


def is_validation(text: str, fraction: float) -> bool:
    """Deterministic per-document split: a hash of the text (duplicates share a split)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h % 1_000_000 < fraction * 1_000_000


def _init_worker(tokenizer_dir: str, field: str, fraction: float) -> None:
    _WORKER.update(encoder=Encoder(tokenizer_dir), field=field, fraction=fraction)


def _tokenize(item: Unit | list[str]) -> dict[str, tuple[np.ndarray, int]]:
    """{split: (concatenated ids, documents)} of one work item."""
    enc: Encoder = _WORKER["encoder"]
    if isinstance(item, Unit):
        texts, forced = read_unit(item, _WORKER["field"]), item.split
    else:
        texts, forced = item, ""
    by_split: dict[str, list[str]] = {"train": [], "validation": []}
    for t in texts:
        split = forced or ("validation" if is_validation(t, _WORKER["fraction"]) else "train")
        by_split[split].append(t)
    out = {}
    for split, docs in by_split.items():
        ids = enc.encode_batch(docs) if docs else []
        out[split] = (np.concatenate(ids) if ids else np.empty(0, np.int64), len(docs))
    return out


class _ShardWriter:
    """Appends tokens to ``<split>-NNNNN.bin`` files of ``shard_tokens`` tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None
        self._tokens = 0
        self._docs = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0, "documents": 0})
        self._tokens = self._docs = 0

    def _close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.shards[-1].update(tokens=self._tokens, documents=self._docs)
            self._f = None

    def write(self, ids: np.ndarray, documents: int) -> None:
        """Documents are counted in the shard where their unit's tokens start."""
        data = ids.astype(self.dtype)
        while data.size:
            if self._f is None or self._tokens >= self.shard_tokens:
                self._close()
                self._open()
            take = min(data.size, self.shard_tokens - self._tokens)
            self._f.write(data[:take].tobytes())
            self._tokens += take
            self._docs += documents
            documents = 0
            data = data[take:]

    def finish(self) -> dict[str, Any]:
        self._close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }


def _hf_batches(texts: Iterable[str], max_documents: int | None) -> Iterator[list[str]]:
    buf: list[str] = []
    for i, t in enumerate(texts):
        if max_documents is not None and i >= max_documents:
            break
        buf.append(t)
        if len(buf) >= HF_BATCH_DOCS:
            yield buf
            buf = []
    if buf:
        yield buf


def _describe_change(key: str, there: Any, now: Any) -> str:
    """One setting that differs from the finished output's; input files by name."""
    if key == "source" and isinstance(there, dict) and isinstance(now, dict):
        old = {f[0]: f[1:] for f in there.get("files") or []}
        new = {f[0]: f[1:] for f in now.get("files") or []}
        if there.get("path") == now.get("path") and (old or new):
            parts = [f"added {n}" for n in sorted(set(new) - set(old))]
            parts += [f"removed {n}" for n in sorted(set(old) - set(new))]
            parts += [f"changed {n}" for n in sorted(set(old) & set(new)) if old[n] != new[n]]
            if parts:
                return "input files: " + ", ".join(parts[:5]) + (" ..." if len(parts) > 5 else "")
    return f"{key}: {there!r} there, {now!r} now"


def prepare(
    out: Path | str,
    tokenizer_dir: Path | str,
    *,
    input_dir: Path | str | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    text_field: str = "text",
    validation_fraction: float = 0.01,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    processes: int = 1,
    max_documents: int | None = None,
    skip_unknown: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare ``out`` from a local folder (``input_dir``) or an HF dataset (``hf_name``).

    ``max_documents`` caps a streamed HF dataset (a quick start on a slice of it).
    Returns the index. Raises DataError (naming the file or setting) on bad input; nothing is
    left behind then.
    """
    from filelock import FileLock
    from tqdm import tqdm

    out = Path(out)
    if (input_dir is None) == (hf_name is None):
        raise DataError("give exactly one input: a local folder or a Hugging Face dataset name")
    if not 0 <= validation_fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    if shard_tokens < 2:
        raise DataError(f"shard tokens must be >= 2, got {shard_tokens}")
    if processes < 1:
        raise DataError(f"processes must be >= 1, got {processes}")
    encoder = Encoder(tokenizer_dir)
    if input_dir is not None:
        source: dict[str, Any] = {
            "kind": "local",
            "path": str(Path(input_dir).resolve()),
            "files": input_manifest(input_dir, skip_unknown),  # names, sizes, SHA-256
        }
    else:
        source = {"kind": "hf", "name": hf_name, "config": hf_config, "split": hf_split}
    params = {
        "source": source,
        "text_field": text_field,
        "tokenizer_fingerprint": encoder.fingerprint,
        "validation_fraction": validation_fraction,
        "shard_tokens": shard_tokens,
        "max_documents": max_documents,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if (out / fmt.INDEX).is_file():
            done = fmt.read_index(out)
            if done.get("params") == params:
                return done
            diff = [
                _describe_change(k, done.get("params", {}).get(k), v)
                for k, v in params.items()
                if done.get("params", {}).get(k) != v
            ]
            raise DataError(
                f"{out} already holds token shards prepared with other settings "
                f"({'; '.join(diff)}): choose another output folder or delete it"
            )
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DataError(
                f"{out} exists and is not a finished token-shard folder (no {fmt.INDEX}): "
                "refusing to write into it; choose another output folder or delete it"
            )
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # an interrupted earlier prepare (ours)
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        partial.mkdir()
        try:
            index = _prepare_into(
                partial, encoder, params, source, input_dir, hf_name, hf_config, hf_split,
                text_field, validation_fraction, shard_tokens, processes, max_documents,
                skip_unknown, progress, tqdm,
            )  # fmt: skip
            if out.exists():
                out.rmdir()  # empty: checked above
            os.rename(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return index


def _prepare_into(
    partial: Path,
    encoder: Encoder,
    params: dict[str, Any],
    source: dict[str, Any],
    input_dir: Path | str | None,
    hf_name: str | None,
    hf_config: str | None,
    hf_split: str,
    text_field: str,
    validation_fraction: float,
    shard_tokens: int,
    processes: int,
    max_documents: int | None,
    skip_unknown: bool,
    progress: bool,
    tqdm: Any,
) -> dict[str, Any]:
    dtype = np.dtype(fmt.dtype_for(encoder.vocab_size))
    writers = {s: _ShardWriter(partial, s, dtype, shard_tokens) for s in fmt.SPLITS}
    items: Iterable[Unit | list[str]]
    if input_dir is not None:
        units = plan_units(Path(input_dir), skip_unknown)
        items = units
        source = {**source, "files": len({u.path for u in units}), "units": len(units)}
    else:
        assert hf_name is not None
        items = _hf_batches(hf_documents(hf_name, hf_config, hf_split, text_field), max_documents)
    init = (str(encoder.folder), text_field, validation_fraction)
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress)
    pool = None
    try:
        if processes > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = mp.get_context("spawn").Pool(processes, _init_worker, init)
            results: Iterable[dict[str, tuple[np.ndarray, int]]] = pool.imap(_tokenize, items)
        else:
            _init_worker(*init)
            results = map(_tokenize, items)
        for result in results:
            for split, (ids, docs) in result.items():
                if ids.size:
                    writers[split].write(ids, docs)
                bar.update(int(ids.size))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    splits = {s: w.finish() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise DataError(
            f"no documents found in {source.get('path') or hf_name}: nothing to train on"
        )
    if not splits["validation"]["shards"]:
        del splits["validation"]
    index = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "dtype": dtype.name,
        "tokenizer": encoder.info(),
        "bos": encoder.bos_id is not None,
        "eos": encoder.eos_id is not None,
        "source": source,
        "params": params,
        "splits": splits,
    }
    atomic_write_text(partial / fmt.INDEX, json.dumps(index, indent=1))
    return index

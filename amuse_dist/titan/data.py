"""Offline data pipeline: a local corpus, a locally trained tokenizer, torchtitan dataset names.

Tests and CPU runs must not depend on the network, so the default corpus is built from text that
is always on the machine (the Python standard library sources, docstrings included) and the
tokenizer is a small byte-level BPE trained on it in about a second. Everything is deterministic
(same machine, same bytes) and idempotent: a JSON marker written last, after every file has been
renamed into place, says a build is complete, so a crash never leaves something that looks done.

torchtitan 0.2.2 looks datasets up by name in ``torchtitan.hf_datasets.text_datasets.DATASETS``;
``register_datasets()`` adds ``local_corpus`` / ``local_corpus_validation`` (the jsonl corpus
below), ``local_text`` / ``local_text_validation`` (any folder of jsonl, parquet or txt files) and
``fineweb_edu`` (network only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from amuse_dist.data.errors import DataError
from amuse_dist.data.tokenizer import BOS_TOKEN, EOS_TOKEN, MIN_VOCAB, SPECIAL_TOKENS
from amuse_dist.data.tokenizer import atomic_write_text as _atomic_write_text

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "SPECIAL_TOKENS", "DataError", "prepare_assets"]

DEFAULT_MAX_BYTES = 6_000_000
VALIDATION_PER_MILLE = 40  # ~4% of the source files go to validation
MAX_FILE_BYTES = 256_000  # no single module dominates the corpus
CHUNK_BYTES = 8_000  # documents are chunks of a module, split on blank lines
SHARD_BYTES = 1_000_000  # several train shards so streaming readers can split by file

CORPUS_MARKER = ".corpus_complete.json"
TOKENIZER_MARKER = ".tokenizer_complete.json"
_CORPUS_VERSION = 2
_TOKENIZER_VERSION = 2  # 2: BOS post-processor, special_tokens_map.json

# Folders of the stdlib that are not ordinary prose/code (third-party packages differ between
# machines; tests and codec tables are huge and repetitive).
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "encodings",
    }
)

TEXT_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


# --------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock next to ``directory`` so concurrent ranks build once, not over each other."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.parent / f".{directory.name}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no lock, builds are still atomic per file
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------


def _stdlib_sources(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, text) of the stdlib .py files in sorted order; undecodable files skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                yield path.relative_to(root).as_posix(), text


def _chunks(text: str, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Split a module into documents of about ``chunk_bytes`` on blank lines (more, shorter
    samples shard more evenly across data-parallel ranks than a few huge modules)."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for block in text.split("\n\n"):
        cur.append(block)
        size += len(block) + 2
        if size >= chunk_bytes:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and "\n\n".join(cur).strip():
        docs.append("\n\n".join(cur))
    return docs


def _is_validation(relpath: str) -> bool:
    digest = hashlib.sha1(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < VALIDATION_PER_MILLE


def _write_jsonl_shards(directory: Path, docs: list[str], prefix: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for doc in docs:
        line = json.dumps({"text": doc}, ensure_ascii=False)
        if size and size + len(line) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(line)
        size += len(line) + 1
    paths = []
    for i, lines in enumerate(shards):
        path = directory / f"{prefix}-{i:05d}.jsonl"
        _atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(path)
    return paths


def build_local_corpus(
    assets_dir: Path | str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source_dir: Path | str | None = None,
) -> Path:
    """Build ``<assets_dir>/corpus/{train,validation}/*.jsonl`` from the stdlib sources.

    The first ``max_bytes`` of source text in sorted file order is used (each module capped at
    ``MAX_FILE_BYTES``); a module goes to validation when its path hash falls in the ~4% bucket,
    so the split is disjoint at module level. Returns the corpus folder. A second call with the
    same arguments returns at once without touching the files.
    """
    corpus = Path(assets_dir) / "corpus"
    root = Path(source_dir) if source_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    params = {"version": _CORPUS_VERSION, "max_bytes": int(max_bytes), "source": str(root)}
    marker = corpus / CORPUS_MARKER
    if (_read_marker(marker) or {}).get("params") == params:
        return corpus
    if not root.is_dir():
        raise FileNotFoundError(f"corpus source folder {root} does not exist")

    with _build_lock(corpus):
        if (_read_marker(marker) or {}).get("params") == params:
            return corpus  # another process built it while we waited
        marker.unlink(missing_ok=True)
        for split in ("train", "validation"):
            for old in (corpus / split).glob("*.jsonl"):
                old.unlink()

        files: list[tuple[str, str]] = []
        total = 0
        for relpath, text in _stdlib_sources(root):
            if total >= max_bytes:
                break
            data = text.encode("utf-8")[: min(MAX_FILE_BYTES, max_bytes - total)]
            text = data.decode("utf-8", errors="ignore")
            files.append((relpath, text))
            total += len(data)
        if len(files) < 2:
            raise ValueError(f"need at least 2 source files under {root}, found {len(files)}")

        val_ids = {i for i, (relpath, _) in enumerate(files) if _is_validation(relpath)}
        if not val_ids:  # tiny corpora: still give validation one module, chosen by hash
            val_ids = {
                min(range(len(files)), key=lambda i: hashlib.sha1(files[i][0].encode()).digest())
            }
        if len(val_ids) == len(files):
            val_ids.pop()
        train_docs = [d for i, (_, t) in enumerate(files) if i not in val_ids for d in _chunks(t)]
        val_docs = [d for i, (_, t) in enumerate(files) if i in val_ids for d in _chunks(t)]
        # a fixed shuffle: consecutive batches should not all come from one module (the
        # loaders read in order), or the training loss tracks the file, not the model
        random.Random(0).shuffle(train_docs)
        random.Random(1).shuffle(val_docs)

        train_files = _write_jsonl_shards(corpus / "train", train_docs, "train")
        val_files = _write_jsonl_shards(corpus / "validation", val_docs, "validation")
        info = {
            "params": params,
            "source_files": len(files),
            "validation_files": sorted(files[i][0] for i in val_ids),
            "bytes": total,
            "train_docs": len(train_docs),
            "validation_docs": len(val_docs),
            "train_shards": [p.name for p in train_files],
            "validation_shards": [p.name for p in val_files],
        }
        _atomic_write_text(marker, json.dumps(info, indent=1))  # last: the build is complete
    return corpus


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def _iter_jsonl_texts(files: list[Path], batch: int = 256) -> Iterator[list[str]]:
    buf: list[str] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    buf.append(json.loads(line)["text"])
                    if len(buf) >= batch:
                        yield buf
                        buf = []
    if buf:
        yield buf


def train_local_tokenizer(
    corpus_dir: Path | str, out_dir: Path | str, vocab_size: int = 2048
) -> Path:
    """Train a byte-level BPE (GPT-2 style, lossless round trip) on ``corpus_dir/train``.

    ``vocab_size`` is an upper bound that includes the 256 byte tokens and the two special tokens
    (ids 0 and 1), so pass the model's vocab size. Writes ``tokenizer.json`` and
    ``tokenizer_config.json`` into ``out_dir`` (point ``model.hf_assets_path`` at it); idempotent.
    """
    from amuse_dist.data.tokenizer import train_bpe, write_tokenizer

    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB} for a byte-level BPE, got {vocab_size}"
        )
    train_dir = corpus_dir / "train" if (corpus_dir / "train").is_dir() else corpus_dir
    files = sorted(train_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl training files in {train_dir} to train a tokenizer on")
    corpus_info = _read_marker(corpus_dir / CORPUS_MARKER) or {}
    params = {
        "version": _TOKENIZER_VERSION,
        "vocab_size": int(vocab_size),
        "corpus": str(corpus_dir.resolve()),
        "corpus_params": corpus_info.get("params"),
        "files": [[p.name, p.stat().st_size] for p in files],
    }
    marker = out_dir / TOKENIZER_MARKER
    if (_read_marker(marker) or {}).get("params") == params:
        return out_dir

    with _build_lock(out_dir):
        if (_read_marker(marker) or {}).get("params") == params:
            return out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        tok = train_bpe(_iter_jsonl_texts(files), vocab_size)  # amuse-tokenizer's trainer
        write_tokenizer(tok, out_dir)
        info = {"params": params, "trained_vocab_size": tok.get_vocab_size()}
        _atomic_write_text(marker, json.dumps(info, indent=1))
    return out_dir


def prepare_assets(
    assets_dir: Path | str, vocab_size: int, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[Path, Path]:
    """Corpus + tokenizer under ``assets_dir``: returns (corpus_dir, tokenizer_dir)."""
    assets_dir = Path(assets_dir)
    corpus = build_local_corpus(assets_dir, max_bytes=max_bytes)
    tokenizer_dir = train_local_tokenizer(corpus, assets_dir / "tokenizer", vocab_size=vocab_size)
    return corpus, tokenizer_dir


# --------------------------------------------------------------------------------------------
# torchtitan dataset registration
# --------------------------------------------------------------------------------------------

DEFAULT_CORPUS_PATH = "assets/corpus"


def _split_folder(path: str | os.PathLike[str], split: str) -> Path:
    """``path/<split>`` when it exists, else ``path`` itself (a folder of files, or one file)."""
    base = Path(path)
    if not base.exists():
        raise FileNotFoundError(
            f"dataset path {base} does not exist: expected a folder with {split}/ holding "
            "*.jsonl files (build one with amuse_dist.titan.data.prepare_assets)"
        )
    sub = base / split
    return sub if sub.is_dir() else base


def _text_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Sorted data files under ``folder``; a ``validation/`` subfolder is never training data."""
    if folder.is_file():
        files = [folder] if folder.suffix in extensions else []
    else:
        held_out = folder / "validation"
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.suffix in extensions and held_out not in p.parents
        )
    if not files:
        raise FileNotFoundError(f"no {'/'.join(extensions)} files found in {folder}")
    return files


def _load_local_corpus(path: str, split: str = "train", streaming: bool = False) -> Any:
    """jsonl files of ``path/<split>`` (or of ``path``) as one HF dataset with a ``text`` column.

    Map-style (``streaming=False``) by default: torchtitan then resumes by sample index, which is
    exact, and the corpus is small enough to memory-map.
    """
    from datasets import load_dataset

    files = _text_files(_split_folder(path, split), (".jsonl",))
    return load_dataset(
        "json", data_files=[str(p) for p in files], split="train", streaming=streaming
    )


def _load_local_text(path: str, split: str = "train", streaming: bool = False) -> Any:
    """Any mix of .jsonl/.json, .parquet and .txt (one document per file) under ``path``."""
    from datasets import concatenate_datasets, load_dataset

    files = _text_files(_split_folder(path, split), tuple(TEXT_EXTENSIONS))
    for p in files:
        if p.suffix != ".parquet":
            _check_utf8(p)
    by_builder: dict[str, list[str]] = {}
    for p in files:
        by_builder.setdefault(TEXT_EXTENSIONS[p.suffix], []).append(str(p))
    parts = []
    for builder in sorted(by_builder):
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        ds = load_dataset(
            builder, data_files=by_builder[builder], split="train", streaming=streaming, **kwargs
        )
        if "text" not in (ds.column_names or []):
            raise ValueError(
                f"{builder} files under {path} have no 'text' field: {ds.column_names}"
            )
        parts.append(ds.select_columns(["text"]))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _check_utf8(path: Path, block: int = 1 << 20) -> None:
    """Raise DataError naming ``path`` when it is not UTF-8 text (HF datasets' own error names
    neither the file nor the byte)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            try:
                decoder.decode(chunk)
                nul = chunk.find(b"\0")
                if nul >= 0:
                    raise DataError(
                        f"{path}: binary data (a NUL byte at byte {offset + nul}), not UTF-8 text"
                    )
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not UTF-8 text (invalid byte at byte {offset + e.start}); "
                    "convert it to UTF-8 or remove it from the dataset folder"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text (truncated character at the end)") from None


def _load_fineweb_edu(path: str) -> Any:
    from datasets import load_dataset

    return load_dataset(path, name="sample-10BT", split="train", streaming=True)


def _token_shards_elsewhere(path: str) -> Any:
    raise DataError(
        f"token_shards ({path}) is read by the llama3_amuse train spec's own dataloaders "
        "(amuse_dist.titan.token_shards), not by torchtitan's text datasets"
    )


def _text_field(sample: dict[str, Any]) -> str:
    return sample["text"]


def dataset_configs() -> dict[str, Any]:
    """The DatasetConfig entries this package adds, keyed by (lowercase) torchtitan name."""
    from torchtitan.hf_datasets import DatasetConfig

    def cfg(path: str, loader: Callable[[str], Any]) -> Any:
        return DatasetConfig(path=path, loader=loader, sample_processor=_text_field)

    return {
        "local_corpus": cfg(DEFAULT_CORPUS_PATH, partial(_load_local_corpus, split="train")),
        "local_corpus_validation": cfg(
            DEFAULT_CORPUS_PATH, partial(_load_local_corpus, split="validation")
        ),
        "local_text": cfg("data", partial(_load_local_text, split="train")),
        "local_text_validation": cfg("data", partial(_load_local_text, split="validation")),
        "fineweb_edu": cfg("HuggingFaceFW/fineweb-edu", _load_fineweb_edu),
        # read by amuse_dist.titan.token_shards, never through torchtitan's text datasets
        "token_shards": cfg("data/shards", _token_shards_elsewhere),
        "token_shards_validation": cfg("data/shards", _token_shards_elsewhere),
    }


def register_datasets() -> list[str]:
    """Add our names to torchtitan's DATASETS (idempotent; existing entries such as torchtitan's
    own ``c4`` / ``c4_validation`` are never replaced). Returns the names now registered by us."""
    from torchtitan.hf_datasets.text_datasets import DATASETS

    for name, config in dataset_configs().items():
        DATASETS.setdefault(name, config)
    return sorted(dataset_configs())

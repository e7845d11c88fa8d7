"""The built-in offline corpus: stdlib text, a locally trained BPE, then the token shards users get.

Tests, the demo and CPU runs must not depend on the network, so the default data is built from
text that is always on the machine (the Python standard library sources, docstrings included).
The steps are the ones a user runs on their own data: a folder of ``train/`` and
``validation/`` jsonl files, ``amuse-tokenizer``'s BPE trainer on its train split, and
:func:`amuse_dist.data.prepare.prepare` (``amuse-prepare-data``) into token shards. The result is
read by the one world-size-free token-shard loader, like any prepared folder.

The assets folder is ours only when it holds our marker (``.amuse_assets.json``): a folder that
exists with anything else in it is refused, and nothing outside the marked folder is ever
written. Inside it every piece is built in a hidden ``.<name>.partial-<pid>`` folder and renamed
into place once complete, so a finished piece is never rewritten and a crash never leaves one
that looks done; a piece built with other settings is refused, not replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amuse_dist.data.errors import DataError
from amuse_dist.data.prepare import prepare
from amuse_dist.data.sources import plan_units, read_unit
from amuse_dist.data.tokenizer import MIN_VOCAB, atomic_write_text, train_bpe, write_tokenizer

DEFAULT_MAX_BYTES = 6_000_000
VALIDATION_PER_MILLE = 40  # ~4% of the source modules go to validation
MAX_FILE_BYTES = 256_000  # no single module dominates the corpus
CHUNK_BYTES = 8_000  # documents are chunks of a module, split on blank lines
JSONL_SHARD_BYTES = 1_000_000

ASSETS_MARKER = ".amuse_assets.json"
"""Written into an assets folder we created (or found empty): only such a folder is written to."""
CORPUS_MARKER = ".corpus_complete.json"
TOKENIZER_MARKER = ".tokenizer_complete.json"
_LOCK = ".amuse_assets.lock"
_CORPUS_VERSION = 2
_TOKENIZER_VERSION = 2  # 2: BOS post-processor, special_tokens_map.json
# what an assets folder of amuse_dist <= 0.1 (corpus/ + tokenizer/, no folder marker) holds
_LEGACY_ENTRIES = frozenset({"corpus", "tokenizer", ".corpus.lock", ".tokenizer.lock"})

# Folders of the stdlib that are not ordinary prose/code (third-party packages differ between
# machines; tests and codec tables are huge and repetitive).
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
)


@dataclass(frozen=True)
class BuiltinData:
    """The built-in corpus under an assets folder: jsonl text, its tokenizer and token shards."""

    corpus: Path
    tokenizer: Path
    shards: Path


# ------------------------------------------------------------------------------ the assets folder
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _refuse(folder: Path, what: str) -> DataError:
    return DataError(
        f"[local_data] assets_dir = {folder} {what}, and amuse_dist writes only into folders it "
        f"created (marked by {ASSETS_MARKER}): point assets_dir at a new or empty folder"
    )


def claim_assets_dir(folder: Path | str) -> Path:
    """``folder`` as our assets folder: marked already, or created / found empty and marked now.

    A folder holding anything else (a user's files) is refused with a DataError, untouched. An
    assets folder of an earlier amuse_dist (``corpus/`` with our corpus marker, ``tokenizer/``)
    is adopted.
    """
    from filelock import FileLock

    folder = Path(folder)
    if (folder / ASSETS_MARKER).is_file():
        return folder
    if folder.exists() and not folder.is_dir():
        raise _refuse(folder, "is a file")
    if folder.is_dir():
        _check_claimable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / _LOCK)):
        if not (folder / ASSETS_MARKER).is_file():
            _check_claimable(folder)
            info = {"created_by": "amuse_dist", "purpose": "built-in offline corpus and shards"}
            atomic_write_text(folder / ASSETS_MARKER, json.dumps(info, indent=1))
    return folder


def _check_claimable(folder: Path) -> None:
    # our lock and marker (and the marker's temp file while another rank writes it) don't count
    ours = (".amuse_assets.", "..amuse_assets.")  # atomic_write_text's temp: ".<name>.tmp-<pid>"
    entries = {p.name for p in folder.iterdir() if not p.name.startswith(ours)}
    if not entries:
        return
    legacy = entries <= _LEGACY_ENTRIES and (folder / "corpus" / CORPUS_MARKER).is_file()
    if not legacy:
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise _refuse(folder, f"holds files amuse_dist did not write ({shown})")


def _partial(folder: Path, name: str) -> Path:
    """A fresh ``.<name>.partial-<pid>`` folder; earlier ones (interrupted builds) are removed:
    they are ours, inside our marked folder, and never published."""
    for stale in folder.glob(f".{name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = folder / f".{name}.partial-{os.getpid()}"
    path.mkdir()
    return path


def _finished(path: Path, marker: str, params: dict[str, Any]) -> bool:
    """True when ``path`` is a complete build with ``params``; a DataError when it is something
    else (other settings, or no marker): it is never replaced."""
    if not path.exists():
        return False
    info = _read_json(path / marker)
    if info is None:
        raise DataError(
            f"{path} exists but is not a finished build (no {marker}): it is left as is; "
            "delete it or use another [local_data] assets_dir"
        )
    if info.get("params") != params:
        raise DataError(
            f"{path} was built with other settings ({info.get('params')}, now {params}): it is "
            "left as is; use another [local_data] assets_dir"
        )
    return True


# ------------------------------------------------------------------------------ corpus
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
    """A module as documents of about ``chunk_bytes``, split on blank lines (more, shorter
    documents mix better in the shards' sequence order than a few huge modules)."""
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


def _write_jsonl(directory: Path, docs: list[str], prefix: str) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for doc in docs:
        line = json.dumps({"text": doc}, ensure_ascii=False)
        if size and size + len(line) > JSONL_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(line)
        size += len(line) + 1
    names = []
    for i, lines in enumerate(shards):
        name = f"{prefix}-{i:05d}.jsonl"
        atomic_write_text(directory / name, "\n".join(lines) + "\n")
        names.append(name)
    return names


def write_stdlib_corpus(out: Path, max_bytes: int, source_dir: Path) -> dict[str, Any]:
    """``out/{train,validation}/*.jsonl`` from the first ``max_bytes`` of stdlib source text.

    Modules are read in sorted order (each capped at ``MAX_FILE_BYTES``); a module goes to
    validation when its path hash falls in the ~4% bucket, so the split is disjoint at module
    level. Documents are shuffled with a fixed seed. Returns the build info.
    """
    files: list[tuple[str, str]] = []
    total = 0
    for relpath, text in _stdlib_sources(source_dir):
        if total >= max_bytes:
            break
        data = text.encode("utf-8")[: min(MAX_FILE_BYTES, max_bytes - total)]
        files.append((relpath, data.decode("utf-8", errors="ignore")))
        total += len(data)
    if len(files) < 2:
        raise DataError(f"need at least 2 source files under {source_dir}, found {len(files)}")
    val_ids = {i for i, (relpath, _) in enumerate(files) if _is_validation(relpath)}
    if not val_ids:  # tiny corpora: still give validation one module, chosen by hash
        val_ids = {
            min(range(len(files)), key=lambda i: hashlib.sha1(files[i][0].encode()).digest())
        }
    if len(val_ids) == len(files):
        val_ids.pop()
    train_docs = [d for i, (_, t) in enumerate(files) if i not in val_ids for d in _chunks(t)]
    val_docs = [d for i, (_, t) in enumerate(files) if i in val_ids for d in _chunks(t)]
    random.Random(0).shuffle(train_docs)
    random.Random(1).shuffle(val_docs)
    return {
        "source_files": len(files),
        "validation_files": sorted(files[i][0] for i in val_ids),
        "bytes": total,
        "train_docs": len(train_docs),
        "validation_docs": len(val_docs),
        "train_shards": _write_jsonl(out / "train", train_docs, "train"),
        "validation_shards": _write_jsonl(out / "validation", val_docs, "validation"),
    }


def _build_corpus(assets: Path, max_bytes: int, source_dir: Path | None) -> Path:
    root = source_dir if source_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    corpus = assets / "corpus"
    params = {"version": _CORPUS_VERSION, "max_bytes": int(max_bytes), "source": str(root)}
    if _finished(corpus, CORPUS_MARKER, params):
        return corpus
    if not root.is_dir():
        raise DataError(f"corpus source folder {root} does not exist")
    partial = _partial(assets, corpus.name)
    try:
        info = write_stdlib_corpus(partial, max_bytes, root)
        atomic_write_text(partial / CORPUS_MARKER, json.dumps({"params": params, **info}, indent=1))
        os.rename(partial, corpus)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return corpus


# ------------------------------------------------------------------------------ tokenizer
def _train_texts(corpus: Path, batch: int = 256) -> Iterator[list[str]]:
    """The train split's documents in batches, read by the prepare code's own reader."""
    buf: list[str] = []
    for unit in plan_units(corpus / "train"):
        for text in read_unit(unit):
            buf.append(text)
            if len(buf) >= batch:
                yield buf
                buf = []
    if buf:
        yield buf


def _build_tokenizer(assets: Path, corpus: Path, vocab_size: int) -> Path:
    out = assets / f"tokenizer-{vocab_size}"
    corpus_params = (_read_json(corpus / CORPUS_MARKER) or {}).get("params")
    params = {"version": _TOKENIZER_VERSION, "vocab_size": vocab_size, "corpus": corpus_params}
    if _finished(out, TOKENIZER_MARKER, params):
        return out
    partial = _partial(assets, out.name)
    try:
        tok = train_bpe(_train_texts(corpus), vocab_size)  # amuse-tokenizer's trainer
        write_tokenizer(tok, partial)
        info = {"params": params, "trained_vocab_size": tok.get_vocab_size()}
        atomic_write_text(partial / TOKENIZER_MARKER, json.dumps(info, indent=1))
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------ all of it
def build_builtin(
    assets_dir: Path | str,
    vocab_size: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source_dir: Path | str | None = None,
) -> BuiltinData:
    """The built-in corpus, its ``vocab_size`` BPE and its token shards under ``assets_dir``.

    Idempotent and safe for concurrent callers (every rank of a launch may call it: one builds
    under a lock, the others wait and reuse). Layout: ``corpus/`` (jsonl), ``tokenizer-<V>/``,
    ``shards-<V>/`` (made by :func:`amuse_dist.data.prepare.prepare`).
    """
    from filelock import FileLock

    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"[local_data] vocab_size = {vocab_size}: expected >= {MIN_VOCAB} (a byte-level BPE)"
        )
    assets = claim_assets_dir(Path(assets_dir).absolute())
    with FileLock(str(assets / _LOCK)):
        corpus = _build_corpus(assets, max_bytes, Path(source_dir) if source_dir else None)
        tokenizer = _build_tokenizer(assets, corpus, vocab_size)
    shards = assets / f"shards-{vocab_size}"
    prepare(shards, tokenizer, input_dir=corpus, shard_tokens=1 << 20, progress=False)
    return BuiltinData(corpus, tokenizer, shards)

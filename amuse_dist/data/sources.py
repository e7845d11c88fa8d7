"""Documents of a local folder (.txt, .jsonl, .json, .parquet, recursively) or a Hugging Face
dataset, cut into work units that worker processes read independently.

A unit is a byte range of a .jsonl file (lines that start inside it), a row group of a .parquet
file, or a whole .txt (one document) / .json file. Units are listed in sorted path order, so the
document order, and hence the shards, never depend on how many processes read them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amuse_dist.data.errors import DataError

KINDS = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
CHUNK_BYTES = 32 << 20  # jsonl files are read in byte ranges of this size


@dataclass(frozen=True)
class Unit:
    """One piece of one file. ``split`` is "train", "validation" or "" (decided per document)."""

    path: str
    kind: str
    start: int = 0
    end: int = -1
    row_group: int = -1
    split: str = ""


def list_files(folder: Path, skip_unknown: bool = False) -> list[Path]:
    """Every data file under ``folder`` (recursively, sorted); hidden files are skipped.

    A file with another extension is an error naming it, unless ``skip_unknown``."""
    if not folder.exists():
        raise DataError(f"input {folder} does not exist")
    if folder.is_file():
        candidates = [folder]
    else:
        candidates = sorted(
            (p for p in folder.rglob("*") if p.is_file()),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        candidates = [
            p for p in candidates if not any(s.startswith(".") for s in p.relative_to(folder).parts)
        ]
    unknown = [p for p in candidates if p.suffix.lower() not in KINDS]
    if unknown and not skip_unknown:
        names = ", ".join(str(p) for p in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DataError(
            f"{len(unknown)} file(s) with an unsupported extension under {folder}: {names} "
            f"(supported: {', '.join(KINDS)}; pass --skip-unknown to ignore them)"
        )
    files = [p for p in candidates if p.suffix.lower() in KINDS]
    if not files:
        raise DataError(
            f"input folder {folder} holds no data files (expected {', '.join(KINDS)} files)"
        )
    return files


def plan_units(folder: Path | str, skip_unknown: bool = False) -> list[Unit]:
    """The work units of a local folder. With ``train/`` and ``validation/`` subfolders their
    files go to those splits; otherwise every document is assigned by a hash of its text."""
    folder = Path(folder)
    groups: list[tuple[str, Path]]
    if (folder / "train").is_dir() and (folder / "validation").is_dir():
        groups = [("train", folder / "train"), ("validation", folder / "validation")]
    else:
        groups = [("", folder)]
    units: list[Unit] = []
    for split, sub in groups:
        for path in list_files(sub, skip_unknown):
            kind = KINDS[path.suffix.lower()]
            if kind == "jsonl":
                size = path.stat().st_size
                for start in range(0, max(size, 1), CHUNK_BYTES):
                    units.append(
                        Unit(str(path), kind, start, min(start + CHUNK_BYTES, size), -1, split)
                    )
            elif kind == "parquet":
                for rg in range(_row_groups(path)):
                    units.append(Unit(str(path), kind, row_group=rg, split=split))
            else:
                units.append(Unit(str(path), kind, split=split))
    return units


def _row_groups(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).num_row_groups
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _decode(data: bytes, path: str, offset: int) -> str:
    if b"\0" in data:
        pos = offset + data.index(b"\0")
        raise DataError(f"{path}: binary data (a NUL byte at byte {pos}), not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (invalid byte at byte {offset + e.start}); convert it to "
            "UTF-8 or remove it from the input folder"
        ) from None


def _field(obj: Any, field: str, where: str) -> str:
    if not isinstance(obj, dict) or field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{where}: no '{field}' field (found {keys}); set --text-field")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' is {type(value).__name__}, expected a string")
    return value


def read_unit(unit: Unit, field: str = "text") -> list[str]:
    """The documents of one unit, in file order."""
    path = unit.path
    try:
        if unit.kind == "text":
            return [_decode(Path(path).read_bytes(), path, 0)]
        if unit.kind == "jsonl":
            return _read_jsonl_range(path, unit.start, unit.end, field)
        if unit.kind == "json":
            text = _decode(Path(path).read_bytes(), path, 0)
            try:
                obj = json.loads(text)
            except ValueError:  # JSON Lines in a .json file, as HF datasets accepts
                return _read_jsonl_range(path, 0, len(text.encode("utf-8")), field)
            rows = obj if isinstance(obj, list) else [obj]
            return [_field(r, field, f"{path} item {i}") for i, r in enumerate(rows)]
        if unit.kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if field not in pf.schema_arrow.names:
                raise DataError(
                    f"{path}: no '{field}' column (found {pf.schema_arrow.names}); set --text-field"
                )
            col = pf.read_row_group(unit.row_group, columns=[field]).column(0)
            return [t for t in col.to_pylist() if t is not None]
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    except Exception as e:  # pyarrow / json internals: name the file
        raise DataError(
            f"{path}: cannot be read as {unit.kind} ({type(e).__name__}: {e})"
        ) from None
    raise DataError(f"{path}: unknown kind {unit.kind}")


def _read_jsonl_range(path: str, start: int, end: int, field: str) -> list[str]:
    """Lines that start in [start, end): a line crossing ``end`` belongs to this range."""
    out: list[str] = []
    with open(path, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())  # skip the line that began before start
        while pos < end:
            line = f.readline()
            if not line:
                break
            offset, pos = pos, pos + len(line)
            text = _decode(line, path, offset).strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise DataError(f"{path}: invalid JSON at byte {offset}: {e}") from None
            out.append(_field(obj, field, f"{path} (line at byte {offset})"))
    return out


def hf_documents(
    name: str, config: str | None, split: str, field: str, streaming: bool = True
) -> Iterator[str]:
    """Texts of a Hugging Face dataset (streamed by default: nothing is downloaded up front)."""
    from datasets import load_dataset

    ds = load_dataset(name, name=config, split=split, streaming=streaming)
    for i, row in enumerate(ds):
        yield _field(row, field, f"{name} row {i}")


def input_manifest(folder: Path | str, skip_unknown: bool = False) -> list[list[Any]]:
    """[relative path, size, sha256] of every input file: what a rerun into the same output must
    match exactly (a changed, added or removed file is refused, never mixed with old output)."""
    import hashlib

    folder = Path(folder)
    out: list[list[Any]] = []
    for p in list_files(folder, skip_unknown):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        rel = p.name if folder.is_file() else p.relative_to(folder).as_posix()
        out.append([rel, p.stat().st_size, h.hexdigest()])
    return out

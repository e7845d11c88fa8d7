"""The one table of dataset names, and how a job's offline names become token shards.

Every offline dataset is read by one loader, the world-size-free token-shard loader
(:mod:`amuse_dist.titan.loaders.token_shards`):

- ``token_shards``: a folder made by ``amuse-prepare-data`` (``dataset_path``);
- ``local_corpus``: the built-in offline corpus (stdlib text, a local BPE of
  ``[local_data] vocab_size``), built into ``[local_data] assets_dir`` on first use by the same
  prepare code (:func:`amuse_dist.data.corpus.build_builtin`);
- ``local_text``: a user's folder of .txt/.jsonl/.json/.parquet files (``dataset_path``),
  prepared to token shards on first use into ``[local_data] assets_dir`` with the tokenizer at
  ``[model] hf_assets_path``.

:func:`resolve_datasets` runs before any process group starts (amuse-train, amuse-eval): it
builds what is missing and rewrites the job to ``dataset = "token_shards"`` with the prepared
folder as ``dataset_path``, so the loaders, the checks and the run's config.toml only ever see
token shards. Hub datasets (``fineweb_edu``, torchtitan's ``c4``) stream through torchtitan's text
datasets and :mod:`amuse_dist.titan.loaders.global_batches`; prepare them with
``amuse-prepare-data --hf-dataset`` to read them as token shards instead.

Pure Python: importing this module imports neither torch nor torchtitan (the launcher reads it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from amuse_dist.data.errors import DataError

TOKEN_SHARDS = "token_shards"
VALIDATION_SUFFIX = "_validation"


@dataclass(frozen=True)
class DatasetKind:
    """One name of the table: what ``dataset_path`` means and whether it needs a network."""

    source: Literal["shards", "builtin", "folder", "hub"]
    offline: bool
    help: str
    hub_path: str = ""
    """hub datasets: the Hugging Face dataset torchtitan streams."""
    hub_config: str = ""


DATASETS: dict[str, DatasetKind] = {
    TOKEN_SHARDS: DatasetKind(
        "shards", True, "token shards made by amuse-prepare-data (dataset_path: that folder)"
    ),
    "local_corpus": DatasetKind(
        "builtin",
        True,
        "the built-in offline corpus (stdlib text, local BPE), built as token shards into "
        "[local_data] assets_dir on first use",
    ),
    "local_text": DatasetKind(
        "folder",
        True,
        "a folder of .txt/.jsonl/.json/.parquet files (dataset_path), prepared to token shards "
        "into [local_data] assets_dir on first use",
    ),
    "fineweb_edu": DatasetKind(
        "hub",
        False,
        "FineWeb-Edu sample-10BT, streamed from the hub",
        hub_path="HuggingFaceFW/fineweb-edu",
        hub_config="sample-10BT",
    ),
}
"""Our dataset names. ``<name>_validation`` is accepted for the offline ones: the split comes from
the section ([training] reads train, [validation] reads validation)."""


def lookup(name: str | None) -> DatasetKind | None:
    """The table entry of ``name`` (``X_validation`` of an offline X included), else None."""
    if not name:
        return None
    name = name.lower()
    if name in DATASETS:
        return DATASETS[name]
    base = name.removesuffix(VALIDATION_SUFFIX)
    kind = DATASETS.get(base) if base != name else None
    return kind if kind is not None and kind.offline else None


def names() -> list[str]:
    """Every name of the table, with the ``_validation`` aliases of the offline ones."""
    out = []
    for name, kind in DATASETS.items():
        out.append(name)
        if kind.offline:
            out.append(name + VALIDATION_SUFFIX)
    return out


def reads_token_shards(name: str | None) -> bool:
    kind = lookup(name)
    return kind is not None and kind.source == "shards"


def is_offline(name: str | None) -> bool:
    """True for names that need no network (every offline name of the table)."""
    kind = lookup(name)
    return kind is not None and kind.offline


def uses_builtin(job_config: Any) -> bool:
    return any(
        (kind := lookup(getattr(job_config, s).dataset)) is not None and kind.source == "builtin"
        for s in _sections(job_config)
    )


def _sections(job_config: Any) -> list[str]:
    return ["training"] + (["validation"] if job_config.validation.enable else [])


# ------------------------------------------------------------------------------ resolution
def resolve_datasets(job_config: Any, model_vocab: int | None) -> list[str]:
    """Build what the job's offline datasets need and point the job at token shards.

    Mutates ``job_config`` (``dataset``, ``dataset_path``, and ``model.hf_assets_path`` for the
    built-in corpus). Safe to call on every rank at once (builds are locked and idempotent).
    Returns lines worth logging; raises DataError naming the key or file on bad input.
    """
    notes: list[str] = []
    sections = _sections(job_config)
    kinds = {s: lookup(getattr(job_config, s).dataset) for s in sections}
    folders = {
        s: _user_folder(job_config, s)
        for s in sections
        if kinds[s] is not None and kinds[s].source == "folder"
    }  # before anything is rewritten: validation may default to the training folder
    if any(k is not None and k.source == "builtin" for k in kinds.values()):
        from amuse_dist.data.corpus import build_builtin

        local = job_config.local_data
        if model_vocab is not None and local.vocab_size > model_vocab:
            raise DataError(
                f"[local_data] vocab_size = {local.vocab_size}: expected <= {model_vocab}, the "
                f'vocab of [model] flavor = "{job_config.model.flavor}"'
            )
        built = build_builtin(local.assets_dir, local.vocab_size)
        job_config.model.hf_assets_path = str(built.tokenizer)
        for s in sections:
            if kinds[s] is not None and kinds[s].source == "builtin":
                _point_at(job_config, s, built.shards)
        notes.append(f"built-in corpus: token shards {built.shards}, tokenizer {built.tokenizer}")
    prepared: dict[Path, Path] = {}
    for s, folder in folders.items():
        if s == "validation" and not _has_splits(folder):
            raise DataError(
                f"[validation] dataset_path = {folder} has no train/ and validation/ "
                "subfolders, so there is no validation split: add them (held-out files in "
                "validation/), or set [validation] enable = false, or validate on another "
                "dataset"
            )
        if folder not in prepared:
            prepared[folder] = _prepare_folder(job_config, s, folder, model_vocab)
            notes.append(f"[{s}] {folder}: token shards in {prepared[folder]}")
        _point_at(job_config, s, prepared[folder])
    return notes


def _point_at(job_config: Any, section: str, shards: Path) -> None:
    cfg = getattr(job_config, section)
    cfg.dataset = TOKEN_SHARDS
    cfg.dataset_path = str(shards)


def _user_folder(job_config: Any, section: str) -> Path:
    cfg = getattr(job_config, section)
    path = cfg.dataset_path
    if not path and section == "validation":  # validate on the training folder's validation/
        path = job_config.training.dataset_path
    if not path:
        raise DataError(
            f'[{section}] dataset = "{cfg.dataset}" needs [{section}] dataset_path: a folder of '
            ".txt/.jsonl/.json/.parquet files (train/ and validation/ subfolders to validate)"
        )
    folder = Path(path).absolute()
    if not folder.exists():
        raise DataError(
            f"[{section}] dataset_path = {path} does not exist: expected a folder of "
            ".txt/.jsonl/.json/.parquet files"
        )
    return folder


def _has_splits(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "validation").is_dir()


def _prepare_folder(job_config: Any, section: str, folder: Path, model_vocab: int | None) -> Path:
    """Token shards of a user's folder under ``[local_data] assets_dir`` (once per content)."""
    from amuse_dist.data.corpus import claim_assets_dir
    from amuse_dist.data.prepare import prepare
    from amuse_dist.data.sources import list_files
    from amuse_dist.data.tokenizer import Encoder

    tokenizer = job_config.model.hf_assets_path
    if not tokenizer or not Path(tokenizer).is_dir():
        raise DataError(
            f"[model] hf_assets_path = {tokenizer!r}: local_text needs the tokenizer folder "
            "(tokenizer.json) to prepare it with; train one with amuse-tokenizer"
        )
    enc = Encoder(tokenizer)
    if model_vocab is not None and enc.vocab_size > model_vocab:
        raise DataError(
            f"[model] hf_assets_path = {tokenizer} has a vocab of {enc.vocab_size} tokens, larger "
            f'than the model\'s vocab_size {model_vocab} ([model] flavor = "{job_config.model.flavor}"):'
            " use a smaller tokenizer or a larger flavor"
        )
    files = list_files(folder)  # names a missing folder, an empty one, an unknown file type
    content = [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = json.dumps([str(folder), enc.fingerprint, content]).encode("utf-8")
    assets = claim_assets_dir(Path(job_config.local_data.assets_dir).absolute())
    out = assets / f"local_text-{hashlib.sha1(key).hexdigest()[:16]}"
    prepare(out, tokenizer, input_dir=folder, validation_fraction=0.0, progress=False)
    return out

"""Hub datasets streamed through torchtitan's text datasets (the global-batch loader reads them).

torchtitan 0.2.2 looks datasets up by name in ``torchtitan.hf_datasets.text_datasets.DATASETS``;
:func:`register_datasets` adds the hub entries of our table
(:data:`amuse_dist.titan.loaders.datasets.DATASETS`, e.g. ``fineweb_edu``). Offline data never
comes through here: it is token shards (see :mod:`amuse_dist.titan.loaders.datasets`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from amuse_dist.titan.loaders.datasets import DATASETS


def _load_hub(path: str, config: str) -> Any:
    from datasets import load_dataset

    return load_dataset(path, name=config or None, split="train", streaming=True)


def _load_jsonl(path: str) -> Any:
    from datasets import load_dataset

    files = sorted(str(p) for p in Path(path).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {path}")
    return load_dataset("json", data_files=files, split="train")


def _text_field(sample: dict[str, Any]) -> str:
    return sample["text"]


def jsonl_dataset_config(path: Path | str) -> Any:
    """A torchtitan DatasetConfig over a folder of ``{"text": ...}`` jsonl files: a local stand-in
    for a hub stream (the global-batch loader's tests and benchmark run offline on it)."""
    from torchtitan.hf_datasets import DatasetConfig

    return DatasetConfig(path=str(path), loader=_load_jsonl, sample_processor=_text_field)


def register_datasets() -> list[str]:
    """Add our hub names to torchtitan's DATASETS (idempotent; torchtitan's own entries such as
    ``c4`` are never replaced). Returns the names registered by us."""
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS as TITAN

    ours = []
    for name, kind in DATASETS.items():
        if kind.source == "hub":
            loader = partial(_load_hub, config=kind.hub_config)
            TITAN.setdefault(
                name,
                DatasetConfig(path=kind.hub_path, loader=loader, sample_processor=_text_field),
            )
            ours.append(name)
    return sorted(ours)

"""``amuse-tokenizer``: train a byte-level BPE on a folder (.txt, .jsonl, .json, .parquet).

    amuse-tokenizer --input DIR --out TOK_DIR --vocab-size 32000

The folder it writes loads in torchtitan (``--model.hf_assets_path TOK_DIR``) and in
transformers' ``AutoTokenizer``, both tokenizing as training does (BOS prepended, bos/eos ids
declared). Bad input is a message naming the file and exit status 2. An existing ``--out`` is
never overwritten: a rerun with the same input files (names, sizes, SHA-256) and settings is a
no-op (``amuse_tokenizer.json`` records them), anything else is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from amuse_dist.data import DataError
from amuse_dist.data.sources import plan_units, read_unit
from amuse_dist.data.tokenizer import Encoder, train_bpe, write_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="amuse-tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="local folder (or file) of training text")
    p.add_argument("--out", required=True, help="tokenizer folder to write")
    p.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help="upper bound incl. 256 bytes and BOS/EOS: at most the model's vocab_size",
    )
    p.add_argument("--text-field", default="text", help="field/column holding the text")
    p.add_argument("--skip-unknown", action="store_true", help="ignore files of other types")
    return p.parse_args(argv)


def texts(folder: Path, field: str, skip_unknown: bool) -> Iterator[list[str]]:
    """Batches of documents of a folder; only its train/ part when it is split."""
    for unit in plan_units(folder, skip_unknown):
        if unit.split != "validation":
            docs = read_unit(unit, field)
            if docs:
                yield docs


RECORD = "amuse_tokenizer.json"


def _settings(input_dir: Path, vocab_size: int, field: str, skip_unknown: bool) -> dict:
    from amuse_dist.data.sources import input_manifest

    return {
        "input": str(input_dir.resolve()),
        "files": input_manifest(input_dir, skip_unknown),
        "vocab_size": vocab_size,
        "text_field": field,
        "skip_unknown": skip_unknown,
    }


def _existing(out: Path, settings: dict) -> bool:
    """True if ``out`` already holds this very tokenizer; raise if it holds anything else."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DataError(f"--out {out}: not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return False
    try:
        done = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        raise DataError(
            f"--out {out} is not empty and was not written by amuse-tokenizer (no {RECORD}): "
            "refusing to overwrite it; choose an empty or new --out"
        ) from None
    if done == settings:
        return True
    diff = [k for k in settings if done.get(k) != settings[k]]
    raise DataError(
        f"--out {out} holds a tokenizer trained with other inputs or settings ({', '.join(diff)} "
        "differ): refusing to overwrite it (a changed tokenizer silently breaks token shards and "
        "checkpoints made with it); choose a new --out"
    )


def train(input_dir: Path | str, out: Path | str, vocab_size: int, field: str = "text",
          skip_unknown: bool = False) -> Path:  # fmt: skip

    out = Path(out)
    settings = _settings(Path(input_dir), vocab_size, field, skip_unknown)
    if _existing(out, settings):
        print(f"{out} already holds this tokenizer (same inputs and settings): kept")
        return out
    tok = train_bpe(texts(Path(input_dir), field, skip_unknown), vocab_size)
    write_tokenizer(tok, out)
    (out / RECORD).write_text(json.dumps(settings, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = train(args.input, args.out, args.vocab_size, args.text_field, args.skip_unknown)
    except DataError as e:
        print(f"amuse-tokenizer: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    enc = Encoder(out)
    print(f"wrote {out}: vocab {enc.vocab_size}, bos {enc.bos_id}, eos {enc.eos_id}")


if __name__ == "__main__":
    main()

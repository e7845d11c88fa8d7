"""``amuse-tokenizer``: train a byte-level BPE on a folder (.txt, .jsonl, .json, .parquet).

    amuse-tokenizer --input DIR --out TOK_DIR --vocab-size 32000

The folder it writes loads in torchtitan (``--model.hf_assets_path TOK_DIR``) and in
transformers' ``AutoTokenizer``, both tokenizing as training does (BOS prepended, bos/eos ids
declared). Bad input is a message naming the file and exit status 2.
"""

from __future__ import annotations

import argparse
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


def train(input_dir: Path | str, out: Path | str, vocab_size: int, field: str = "text",
          skip_unknown: bool = False) -> Path:  # fmt: skip
    tok = train_bpe(texts(Path(input_dir), field, skip_unknown), vocab_size)
    return write_tokenizer(tok, out)


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

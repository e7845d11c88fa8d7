"""``amuse-prepare-data``: tokenize a folder or a Hugging Face dataset into token shards.

    amuse-prepare-data --input DIR --tokenizer TOK_DIR --out SHARDS_DIR [--processes N]
    amuse-prepare-data --hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-10BT \\
        --tokenizer TOK_DIR --out SHARDS_DIR

Then train with ``--training.dataset token_shards --training.dataset_path SHARDS_DIR``.
Bad input (a file that is not UTF-8 text, an empty folder, a folder prepared with other settings)
is a message naming it and exit status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import sys

from amuse_dist.data import DataError
from amuse_dist.data.prepare import prepare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="amuse-prepare-data", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input", help="local folder (or file): .txt, .jsonl, .json, .parquet, recursively"
    )
    src.add_argument("--hf-dataset", help="Hugging Face dataset name (streamed)")
    p.add_argument("--hf-config", default=None, help="HF dataset config (subset) name")
    p.add_argument("--hf-split", default="train", help="HF dataset split (default train)")
    p.add_argument(
        "--max-documents", type=int, default=None, help="HF only: stop after N documents"
    )
    p.add_argument(
        "--tokenizer", required=True, help="folder with tokenizer.json (+ tokenizer_config.json)"
    )
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument(
        "--text-field", default="text", help="field/column holding the text (default text)"
    )
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.01,
        help="share of documents (by a hash of their text) held out for validation; ignored when "
        "the input has train/ and validation/ subfolders (default 0.01)",
    )
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--processes", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--skip-unknown", action="store_true", help="ignore files of other types")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        index = prepare(
            args.out,
            args.tokenizer,
            input_dir=args.input,
            hf_name=args.hf_dataset,
            hf_config=args.hf_config,
            hf_split=args.hf_split,
            text_field=args.text_field,
            validation_fraction=args.validation_fraction,
            shard_tokens=args.shard_tokens,
            processes=args.processes,
            max_documents=args.max_documents,
            skip_unknown=args.skip_unknown,
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"amuse-prepare-data: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for split, info in index["splits"].items():
        print(
            f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents, "
            f"{len(info['shards'])} shard(s)"
        )
    print(f"wrote {args.out} ({index['dtype']}, vocab {index['tokenizer']['vocab_size']})")


if __name__ == "__main__":
    main()

"""Byte-level BPE tokenizers: train, write a folder torchtitan and transformers both load,
fingerprint, and encode documents exactly as training does.

The BOS/EOS policy is the one torchtitan's text datasets use: every document becomes
``[BOS] + tokens + [EOS]``. The folder written here declares both tokens (with their ids) and
carries a post-processor that prepends BOS, so ``transformers.AutoTokenizer`` on the folder
tokenizes a text as ``[BOS] + tokens``, the same ids training saw (torchtitan detects that the
tokenizer adds BOS itself and does not add a second one).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from amuse_dist.data.errors import DataError

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train_bpe(texts: Iterable[list[str]], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style, lossless) trained on batches of texts.

    ``vocab_size`` is an upper bound that includes the 256 byte tokens and BOS (id 0) / EOS
    (id 1). The result prepends BOS when it encodes with special tokens (see module doc).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size must be >= {MIN_VOCAB} for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:  # the model's embedding must cover every id
        raise DataError(f"trained vocab {tok.get_vocab_size()} exceeds vocab_size {vocab_size}")
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos)],
    )
    return tok


def tokenizer_config(tok: Any) -> dict[str, Any]:
    """tokenizer_config.json as torchtitan's HuggingFaceTokenizer and transformers read it."""
    decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "added_tokens_decoder": decoder,
    }


def write_tokenizer(tok: Any, out_dir: Path | str) -> Path:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", tok.to_str())
    atomic_write_text(
        out_dir / "tokenizer_config.json", json.dumps(tokenizer_config(tok), indent=2)
    )
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(special, indent=2))
    return out_dir


def _token_name(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Encoder:
    """A tokenizer folder (``tokenizer.json`` + optional ``tokenizer_config.json``) with the
    training policy: ``encode(text) == [bos] + ids + [eos]`` (either omitted if undeclared)."""

    def __init__(self, folder: Path | str) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer {path} not found: expected a folder with tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error names neither the file nor the problem well
            raise DataError(f"tokenizer {path} cannot be loaded: {e}") from None
        config_path = self.folder / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise DataError(f"{config_path}: invalid JSON: {e}") from None
        self.bos_token = _token_name(config, "bos_token")
        self.eos_token = _token_name(config, "eos_token")
        self.bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = int(self.tokenizer.get_vocab_size())
        self.fingerprint = fingerprint(self.tokenizer, self.bos_token, self.eos_token)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text as int64 ids ``[bos] + ids + [eos]``."""
        out = []
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids
            if self.bos_id is not None:
                ids = [self.bos_id, *ids]
            if self.eos_id is not None:
                ids.append(self.eos_id)
            out.append(np.asarray(ids, dtype=np.int64))
        return out

    def info(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "path": str(self.folder.resolve()),
        }


def fingerprint(tok: Any, bos: str | None, eos: str | None) -> str:
    """sha256 of the tokenizer's canonical JSON and its BOS/EOS names: equal fingerprints give
    equal token ids for every text."""
    h = hashlib.sha256(tok.to_str().encode("utf-8"))
    h.update(f"\0bos={bos}\0eos={eos}".encode())
    return "sha256:" + h.hexdigest()

"""Offline data pipeline: stdlib corpus, local BPE tokenizer, torchtitan dataset names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amuse_dist.titan import data

pytestmark = pytest.mark.unit

MAX_BYTES = 400_000
VOCAB = 1024


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("assets")
    return data.prepare_assets(root, vocab_size=VOCAB, max_bytes=MAX_BYTES)


def _texts(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        out += [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return out


def test_corpus_split(assets: tuple[Path, Path]) -> None:
    corpus, _ = assets
    train, val = _texts(corpus / "train"), _texts(corpus / "validation")
    assert train and val
    assert not set(train) & set(val)
    info = json.loads((corpus / data.CORPUS_MARKER).read_text())
    assert info["bytes"] <= MAX_BYTES
    assert 0 < len(info["validation_files"]) < info["source_files"]
    total = sum(len(t.encode()) for t in train + val)
    assert 0.9 * MAX_BYTES <= total <= MAX_BYTES


def test_corpus_deterministic(assets: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, _ = assets
    other = data.build_local_corpus(tmp_path, max_bytes=MAX_BYTES)
    for split in ("train", "validation"):
        assert _texts(other / split) == _texts(corpus / split)


def test_idempotent(assets: tuple[Path, Path]) -> None:
    corpus, tok_dir = assets
    files = sorted(corpus.rglob("*.jsonl")) + sorted(tok_dir.glob("*.json"))
    files += [corpus / data.CORPUS_MARKER, tok_dir / data.TOKENIZER_MARKER]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = data.prepare_assets(corpus.parent, vocab_size=VOCAB, max_bytes=MAX_BYTES)
    assert again == assets
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_incomplete_build_is_redone(tmp_path: Path) -> None:
    corpus = data.build_local_corpus(tmp_path, max_bytes=100_000)
    (corpus / data.CORPUS_MARKER).unlink()  # as if the build had crashed before the marker
    (corpus / "train" / "train-00000.jsonl").write_text("garbage")
    data.build_local_corpus(tmp_path, max_bytes=100_000)
    assert (corpus / data.CORPUS_MARKER).exists()
    assert _texts(corpus / "train")


def test_tokenizer(assets: tuple[Path, Path]) -> None:
    from tokenizers import Tokenizer

    corpus, tok_dir = assets
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.get_vocab_size() <= VOCAB
    assert tok.token_to_id(data.BOS_TOKEN) is not None
    assert tok.token_to_id(data.EOS_TOKEN) is not None
    for text in _texts(corpus / "validation")[:3] + ["héllo  wörld\n\tdef f(x):  # ünïcode ✓"]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    # BPE actually merged something: code compresses well below one token per byte
    sample = _texts(corpus / "validation")[0]
    assert len(tok.encode(sample).ids) < 0.6 * len(sample.encode())


def test_vocab_too_small(assets: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        data.train_local_tokenizer(assets[0], tmp_path, vocab_size=100)


def test_torchtitan_tokenizer_loads(assets: tuple[Path, Path]) -> None:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    _, tok_dir = assets
    tok = HuggingFaceTokenizer(str(tok_dir))
    assert tok.bos_id is not None and tok.eos_id is not None and tok.bos_id != tok.eos_id
    assert tok.get_vocab_size() <= VOCAB
    ids = tok.encode("import os", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == "import os"


def test_register_idempotent() -> None:
    from torchtitan.hf_datasets.text_datasets import DATASETS

    c4 = DATASETS["c4"]
    names = data.register_datasets()
    first = {n: DATASETS[n] for n in names}
    data.register_datasets()
    assert {n: DATASETS[n] for n in names} == first
    assert DATASETS["c4"] is c4
    assert {"local_corpus", "local_corpus_validation", "local_text", "fineweb_edu"} <= set(names)


def _job_config(corpus: Path, tok_dir: Path, seq_len: int) -> object:
    from torchtitan.config import JobConfig

    jc = JobConfig()
    jc.model.hf_assets_path = str(tok_dir)
    jc.training.dataset = "local_corpus"
    jc.training.dataset_path = str(corpus)
    jc.training.seq_len = seq_len
    jc.training.local_batch_size = 2
    jc.validation.dataset = "local_corpus_validation"
    jc.validation.dataset_path = str(corpus)
    jc.validation.seq_len = seq_len
    jc.validation.local_batch_size = 2
    return jc


def test_torchtitan_dataloaders(assets: tuple[Path, Path]) -> None:
    from torchtitan.components.tokenizer import build_hf_tokenizer
    from torchtitan.hf_datasets.text_datasets import (
        build_text_dataloader,
        build_text_validation_dataloader,
    )

    corpus, tok_dir = assets
    data.register_datasets()
    seq = 64
    jc = _job_config(corpus, tok_dir, seq)
    tok = build_hf_tokenizer(jc)

    inputs, labels = next(iter(build_text_dataloader(2, 1, tok, jc)))
    assert inputs["input"].shape == labels.shape == (2, seq)
    assert (inputs["input"][:, 1:] == labels[:, :-1]).all()
    assert int(labels.max()) < VOCAB

    # validation reads validation/, not train/: its first sample starts with BOS + the first doc
    v_inputs, v_labels = next(iter(build_text_validation_dataloader(1, 0, tok, jc)))
    assert v_inputs["input"].shape == v_labels.shape == (2, seq)
    first_val = _texts(corpus / "validation")[0]
    expected = tok.encode(first_val, add_bos=True, add_eos=True)[:seq]
    assert v_inputs["input"][0].tolist() == expected


def test_local_text_mixed_formats(tmp_path: Path, assets: tuple[Path, Path]) -> None:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": "alpha " * 50, "id": 1}) + "\n")
    (folder / "b.txt").write_text("beta line one\nbeta line two\n" * 20)
    pq.write_table(pa.table({"text": ["gamma " * 50], "n": [3]}), folder / "c.parquet")
    ds = data._load_local_text(str(folder))
    texts = sorted(row["text"] for row in ds)
    assert len(texts) == 3 and texts[0].startswith("alpha") and texts[1].startswith("beta")

    data.register_datasets()
    tok = HuggingFaceTokenizer(str(assets[1]))
    hf_ds = HuggingFaceTextDataset("local_text", str(folder), tok, seq_len=16)
    x, y = next(iter(hf_ds))
    assert x["input"].shape == y.shape == (16,)


def test_missing_or_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data._load_local_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no .jsonl files"):
        data._load_local_corpus(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        data.train_local_tokenizer(tmp_path / "empty", tmp_path / "tok")


def test_offline_tokenizer_tokenizes_in_transformers_as_in_training(
    assets: tuple[Path, Path],
) -> None:
    """AutoTokenizer on the offline folder: BOS prepended, bos/eos ids declared, the same ids as
    torchtitan's training encoding (which also appends EOS per document)."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from transformers import AutoTokenizer

    corpus, tok_dir = assets
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    titan = HuggingFaceTokenizer(str(tok_dir))
    assert (hf.bos_token_id, hf.eos_token_id) == (titan.bos_id, titan.eos_id) == (0, 1)
    for text in _texts(corpus / "validation")[:2] + ["héllo  wörld ✓"]:
        training = titan.encode(text, add_bos=True, add_eos=True)
        assert training[0] == 0 and training.count(0) == 1  # one BOS, not two
        assert hf(text)["input_ids"] == training[:-1]

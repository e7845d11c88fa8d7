"""Token shards: prepare a mixed local folder, train on 2 ranks, resume on 1 and 3 ranks with the
same per-step data, validation equal on 1/2/3 ranks, and clear errors on bad input."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from amuse_dist.data import DataError
from amuse_dist.data.prepare import prepare
from amuse_dist.data.shards import SplitReader, read_index
from amuse_dist.data.tokenizer import Encoder
from tests._preload import run_cmd
from tests._titan import env, run_args, tb_scalars, torchrun, torchrun_cmd

SEQ = 32
GBS = 6
VOCAB = 512
WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be "
    "model data rank shard token step batch loss layer weight average anytime muon schedule"
).split()


def _doc(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def make_folder(root: Path) -> Path:
    """train/ with .txt, .jsonl (nested) and .parquet files; validation/ with a .jsonl file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    folder = root / "my_corpus"
    (folder / "train" / "nested").mkdir(parents=True)
    (folder / "validation").mkdir()
    for i in range(3):
        (folder / "train" / f"doc{i}.txt").write_text(_doc(rng, 400), encoding="utf-8")
    rows = [json.dumps({"text": _doc(rng, 120), "id": i}) for i in range(30)]
    (folder / "train" / "nested" / "b.jsonl").write_text("\n".join(rows) + "\n")
    table = pa.table({"text": [_doc(rng, 150) for _ in range(30)]})
    pq.write_table(table, folder / "train" / "c.parquet", row_group_size=8)
    rows = [json.dumps({"text": _doc(rng, 100)}) for _ in range(20)]
    (folder / "validation" / "v.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from amuse_dist.tokenizer import train

    root = tmp_path_factory.mktemp("token_shards")
    folder = make_folder(root)
    tok = train(folder, root / "tokenizer", VOCAB)
    shards = root / "shards"
    prepare(shards, tok, input_dir=folder, shard_tokens=4000, progress=False)
    return {"root": root, "folder": folder, "tokenizer": tok, "shards": shards}


# ------------------------------------------------------------------------------ format + prepare
@pytest.mark.unit
def test_prepare_mixed_folder(prepared: dict[str, Path]) -> None:
    index = read_index(prepared["shards"])
    enc = Encoder(prepared["tokenizer"])
    assert index["dtype"] == "uint16" and index["tokenizer"]["fingerprint"] == enc.fingerprint
    assert index["bos"] and index["eos"]
    train, val = index["splits"]["train"], index["splits"]["validation"]
    assert train["documents"] == 3 + 30 + 30 and val["documents"] == 20
    assert len(train["shards"]) > 1 and all(s["tokens"] <= 4000 for s in train["shards"])
    # the stream is every document as [BOS] ids [EOS], in sorted file order
    tokens = np.concatenate(
        [np.fromfile(prepared["shards"] / s["file"], np.uint16) for s in train["shards"]]
    )
    assert tokens.size == train["tokens"]
    first = (prepared["folder"] / "train" / "c.parquet").name  # sorted: c.parquet, doc0.txt, ...
    assert first == "c.parquet"
    assert (tokens == enc.bos_id).sum() == train["documents"]
    assert (tokens == enc.eos_id).sum() == train["documents"]
    reader = SplitReader(prepared["shards"], "train", SEQ, seed=0)
    assert reader.num_sequences == sum((s["tokens"] - 1) // SEQ for s in train["shards"])
    seqs = reader.sequences(0, 5)
    assert seqs.shape == (5, SEQ + 1) and int(seqs.max()) < enc.vocab_size


@pytest.mark.unit
def test_order_does_not_depend_on_processes(prepared: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "shards2"
    prepare(
        other,
        prepared["tokenizer"],
        input_dir=prepared["folder"],
        shard_tokens=4000,
        processes=2,
        progress=False,
    )
    a, b = read_index(prepared["shards"]), read_index(other)
    assert a["splits"] == b["splits"]
    for split in a["splits"].values():
        for s in split["shards"]:
            assert (prepared["shards"] / s["file"]).read_bytes() == (other / s["file"]).read_bytes()


@pytest.mark.unit
def test_rerun_is_a_noop_and_other_settings_are_refused(prepared: dict[str, Path]) -> None:
    shards = prepared["shards"]
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    prepare(shards, prepared["tokenizer"], input_dir=prepared["folder"], shard_tokens=4000,
            progress=False)  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == before
    with pytest.raises(DataError, match=r"other settings.*shard_tokens: 4000 there, 5000 now"):
        prepare(shards, prepared["tokenizer"], input_dir=prepared["folder"], shard_tokens=5000,
                progress=False)  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == before


@pytest.mark.unit
def test_tokenizer_folder_matches_training_in_transformers(prepared: dict[str, Path]) -> None:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from transformers import AutoTokenizer

    tok_dir = prepared["tokenizer"]
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    titan = HuggingFaceTokenizer(str(tok_dir))
    enc = Encoder(tok_dir)
    assert (hf.bos_token_id, hf.eos_token_id) == (enc.bos_id, enc.eos_id) == (0, 1)
    for text in ["the model of the data.", "héllo  wörld\n\tdef f(x): ✓", ""]:
        training = enc.encode_batch([text])[0].tolist()  # what the shards hold: [BOS] ids [EOS]
        assert training == titan.encode(text, add_bos=True, add_eos=True)
        assert hf(text)["input_ids"] == training[:-1]  # HF: BOS prepended, as in training
        assert hf.decode(training, skip_special_tokens=True) == text


# ------------------------------------------------------------------------------ bad input
def _cli(module: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return run_cmd([sys.executable, "-m", module, *args], env=env(tmp_path), timeout=300)


@pytest.mark.unit
def test_prepare_bad_input_exit_2_and_nothing_left(
    prepared: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from amuse_dist.prepare_data import main

    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = tmp_path / "mixed"
    shutil.copytree(prepared["folder"] / "train", mixed)
    (mixed / "zz_image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01binary")
    cases = [(empty, "holds no data files"), (mixed, "zz_image.txt: binary data")]
    for folder, message in cases:
        out = tmp_path / f"out_{folder.name}"
        with pytest.raises(SystemExit) as exc:
            main(["--input", str(folder), "--tokenizer", str(prepared["tokenizer"]),
                  "--out", str(out), "--no-progress"])  # fmt: skip
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
        assert not list(tmp_path.glob(f".{out.name}.partial-*"))
    with pytest.raises(DataError, match=r"zz_image\.txt: binary data"):
        prepare(tmp_path / "x", prepared["tokenizer"], input_dir=mixed, progress=False)


def _job_config(prepared: dict[str, Path], shards: Path, tokenizer: Path | None = None) -> Any:
    from amuse_dist.titan.config import parse_job_config

    return parse_job_config(
        [
            *run_args(prepared["root"] / "dump", prepared["root"] / "assets"),
            *shard_args(shards, tokenizer or prepared["tokenizer"]),
        ]
    )


@pytest.mark.unit
def test_bad_shards_tokenizer_and_vocab(prepared: dict[str, Path], tmp_path: Path) -> None:
    from amuse_dist.titan.loaders.token_shards import check_job_config
    from amuse_dist.titan.model import model_vocab_size
    from amuse_dist.tokenizer import train

    vocab = model_vocab_size(_job_config(prepared, prepared["shards"]))
    assert vocab == 2048  # the tiny flavor's, passed in: the loaders never import the spec
    assert check_job_config(_job_config(prepared, prepared["shards"]), vocab) == []
    # a truncated shard
    bad = tmp_path / "truncated"
    shutil.copytree(prepared["shards"], bad)
    shard = bad / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    errors = check_job_config(_job_config(prepared, bad), vocab)
    assert any(str(shard) in e and "truncated" in e for e in errors), errors
    # a corrupt shard (ids beyond the vocab): named when read
    bad = tmp_path / "corrupt"
    shutil.copytree(prepared["shards"], bad)
    shard = bad / "train-00000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    reader = SplitReader(bad, "train", SEQ, seed=None)
    with pytest.raises(DataError, match=rf"shard {shard} is corrupt: token id 65535"):
        reader.sequence(0)
    # an index whose dtype does not fit its vocab (was an IndexError at the first read)
    wrong = tmp_path / "wrong_dtype"
    shutil.copytree(prepared["shards"], wrong)
    index = json.loads((wrong / "index.json").read_text())
    (wrong / "index.json").write_text(json.dumps({**index, "dtype": "uint32"}))
    errors = check_job_config(_job_config(prepared, wrong), vocab)
    assert errors and "index.json: dtype = 'uint32'" in errors[0], errors
    assert "'uint16'" in errors[0] and "amuse-prepare-data" in errors[0], errors
    # a corrupt index
    (bad / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"index\.json: corrupt index"):
        read_index(bad)
    # another tokenizer: both fingerprints and paths named
    other = train(prepared["folder"], tmp_path / "other_tok", 300)
    errors = check_job_config(_job_config(prepared, prepared["shards"], other), vocab)
    assert errors and "tokenizer mismatch" in errors[0], errors
    assert str(other) in errors[0] and Encoder(other).fingerprint in errors[0]
    assert Encoder(prepared["tokenizer"]).fingerprint in errors[0]
    # a vocab larger than the model's: both values named
    errors = check_job_config(_job_config(prepared, prepared["shards"]), 300)
    assert errors and f"vocab of {Encoder(prepared['tokenizer']).vocab_size}" in errors[0]
    assert "vocab_size 300" in errors[0]


@pytest.mark.unit
def test_local_text_names_a_non_utf8_file(prepared: dict[str, Path], tmp_path: Path) -> None:
    from amuse_dist.titan.config import parse_job_config
    from amuse_dist.titan.loaders.datasets import resolve_datasets

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text", encoding="utf-8")
    (folder / "b.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    cfg = parse_job_config(
        ["--training.dataset", "local_text", "--training.dataset_path", str(folder)]
        + ["--model.hf_assets_path", str(prepared["tokenizer"]), "--validation.no-enable"]
        + ["--local_data.assets_dir", str(tmp_path / "assets")]
    )
    with pytest.raises(DataError, match=r"b\.txt: not UTF-8 text \(invalid byte at byte 3\)"):
        resolve_datasets(cfg, 2048)


# ------------------------------------------------------------------------------ through the trainer
def shard_args(shards: Path, tokenizer: Path) -> list[str]:
    return [
        "--training.dataset", "token_shards", "--training.dataset_path", str(shards),
        "--validation.dataset", "token_shards", "--validation.dataset_path", str(shards),
        "--model.hf_assets_path", str(tokenizer),
        "--training.seq_len", str(SEQ), "--validation.seq_len", str(SEQ),
        "--training.global_batch_size", str(GBS), "--validation.local_batch_size", str(GBS),
    ]  # fmt: skip


def _trace(folder: Path) -> dict[int, str]:
    """{global sequence: hash of its tokens} consumed by all ranks of a run."""
    out: dict[int, str] = {}
    for f in folder.glob("trace-rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            for i, h in enumerate(rec["hashes"]):
                assert out.setdefault(rec["first"] + i, h) == h
    return out


def _eval(step_dir: Path, nproc: int, tmp_path: Path) -> float:
    out = tmp_path / f"eval{nproc}"
    target = ["-m", "amuse_dist.eval", str(step_dir), "--out", str(out), "--no-progress"]
    cmd = torchrun_cmd(nproc, *target) if nproc > 1 else [sys.executable, *target]
    proc = run_cmd(cmd, env=env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())
    return row["loss"]


@pytest.mark.e2e
def test_train_resume_on_1_and_3_ranks_and_eval_on_any(
    prepared: dict[str, Path], tmp_path: Path
) -> None:
    """2 ranks, 4 steps (checkpoint at 2 and 4); resumes from step 2 on 1 and 3 ranks consume the
    same global sequences, bitwise, as the straight run; validation at step 4 is the same number
    in training (2 ranks) and in amuse-eval on 1, 2 and 3 ranks."""
    assets = prepared["root"] / "assets"

    def args(dump: Path, nproc: int) -> list[str]:
        return run_args(
            dump,
            assets,
            steps=4,
            checkpoint__interval=2,
            validation__freq=2,
            training__local_batch_size=GBS // nproc,
        ) + shard_args(prepared["shards"], prepared["tokenizer"])

    base = tmp_path / "two"
    torchrun(2, args(base, 2), tmp_path, {"AMUSE_DATA_TRACE": str(tmp_path / "trace2")})
    ref = _trace(tmp_path / "trace2")
    assert sorted(ref) == list(range(4 * GBS))  # each step: the next G global sequences
    for nproc in (1, 3):
        dump = tmp_path / f"on{nproc}"
        shutil.copytree(base / "checkpoint" / "step-2", dump / "checkpoint" / "step-2")
        trace = tmp_path / f"trace{nproc}"
        torchrun(nproc, args(dump, nproc), tmp_path, {"AMUSE_DATA_TRACE": str(trace)})
        got = _trace(trace)
        assert sorted(got) == list(range(2 * GBS, 4 * GBS)), (nproc, sorted(got))
        assert got == {g: ref[g] for g in got}, nproc

    val = tb_scalars(base)["validation_x/loss"]
    assert sorted(val) == [1, 2, 4]
    step4 = base / "checkpoint" / "step-4"
    for nproc in (1, 2, 3):
        assert _eval(step4, nproc, tmp_path) == pytest.approx(val[4], abs=1e-5), nproc


@pytest.mark.e2e
def test_demo_checkpoint_evaluates_the_same_on_1_2_3_ranks(straight: Path, tmp_path: Path) -> None:
    """debug_cpu.toml as shipped (the built-in corpus, read as token shards), trained on 2 ranks:
    amuse-eval of its step-20 checkpoint with the run's own validation settings gives the
    training's validation loss at X on 1, 2 and 3 ranks (issue 19: the streaming local_corpus
    gave 7.8567 on 1 rank and 7.8369 on 2)."""
    config = (straight / "config.toml").read_text()
    assert 'dataset = "token_shards"' in config and "local_corpus" not in config
    val = tb_scalars(straight)["validation_x/loss"]
    step = straight / "checkpoint" / "step-20"
    losses = {nproc: _eval(step, nproc, tmp_path) for nproc in (1, 2, 3)}
    for nproc, loss in losses.items():
        assert loss == pytest.approx(val[20], abs=1e-5), (nproc, losses, val[20])


@pytest.mark.e2e
def test_trainer_refuses_a_tokenizer_mismatch_before_starting(
    prepared: dict[str, Path], tmp_path: Path
) -> None:
    other = prepared["root"] / "other_tokenizer"
    shutil.copytree(prepared["tokenizer"], other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["bos_token"], cfg["eos_token"] = cfg["eos_token"], cfg["bos_token"]
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    dump = tmp_path / "dump"
    args = run_args(dump, prepared["root"] / "assets", steps=1)
    proc = _cli(
        "amuse_dist.train", *args, *shard_args(prepared["shards"], other), tmp_path=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tokenizer mismatch" in proc.stderr and str(other) in proc.stderr
    assert not (dump / "checkpoint").exists()


@pytest.mark.unit
def test_prepare_from_a_streamed_hf_dataset(prepared: dict[str, Path], tmp_path: Path) -> None:
    """The HF path (streaming, text field, document cap), offline on a local dataset folder."""
    out = tmp_path / "hf_shards"
    index = prepare(
        out,
        prepared["tokenizer"],
        hf_name=str(prepared["folder"] / "validation"),
        validation_fraction=0.0,
        max_documents=7,
        progress=False,
    )
    assert index["source"]["kind"] == "hf" and index["splits"]["train"]["documents"] == 7
    assert "validation" not in index["splits"]
    first = json.loads((prepared["folder"] / "validation" / "v.jsonl").read_text().split("\n")[0])
    want = Encoder(prepared["tokenizer"]).encode_batch([first["text"]])[0]
    got = np.fromfile(out / "train-00000.bin", np.uint16)[: want.size]
    assert got.tolist() == want.tolist()

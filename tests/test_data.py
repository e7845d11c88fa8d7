"""Offline data: the built-in corpus as token shards (stdlib text, local BPE, the prepare code
users run), an assets folder that never touches a user's files, the one dataset table, and
``local_text`` folders prepared to token shards with one-line errors before start-up."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amuse_dist.data import DataError
from amuse_dist.data import corpus as builtin
from amuse_dist.data.shards import SplitReader, read_index
from amuse_dist.data.tokenizer import BOS_TOKEN, EOS_TOKEN
from tests._preload import run_cmd
from tests._titan import DEBUG_TOML, REPO, env

pytestmark = pytest.mark.unit

MAX_BYTES = 400_000
VOCAB = 1024


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> builtin.BuiltinData:
    return builtin.build_builtin(tmp_path_factory.mktemp("assets"), VOCAB, max_bytes=MAX_BYTES)


def _texts(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        out += [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return out


def _tree(folder: Path) -> dict[str, str]:
    """{relative path: sha1 of the bytes} of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------ the built-in corpus
def test_corpus_split(built: builtin.BuiltinData) -> None:
    train, val = _texts(built.corpus / "train"), _texts(built.corpus / "validation")
    assert train and val
    assert not set(train) & set(val)
    info = json.loads((built.corpus / builtin.CORPUS_MARKER).read_text())
    assert info["bytes"] <= MAX_BYTES
    assert 0 < len(info["validation_files"]) < info["source_files"]
    total = sum(len(t.encode()) for t in train + val)
    assert 0.9 * MAX_BYTES <= total <= MAX_BYTES


def test_shards_are_what_amuse_prepare_data_makes(
    built: builtin.BuiltinData, tmp_path: Path
) -> None:
    """The built-in shards are the prepare CLI's output on the corpus folder, byte for byte,
    and read as any prepared folder (train/validation splits from the corpus's folders)."""
    from amuse_dist.prepare_data import main

    out = tmp_path / "by_cli"
    main(
        ["--input", str(built.corpus), "--tokenizer", str(built.tokenizer), "--out", str(out)]
        + ["--shard-tokens", str(1 << 20), "--no-progress"]
    )
    bins = sorted(p.name for p in built.shards.glob("*.bin"))
    assert bins and bins == sorted(p.name for p in out.glob("*.bin"))
    for name in bins:
        assert (out / name).read_bytes() == (built.shards / name).read_bytes(), name
    index = read_index(built.shards)
    assert index["splits"]["validation"]["documents"] == len(_texts(built.corpus / "validation"))
    seqs = SplitReader(built.shards, "validation", 32, seed=None).sequences(0, 2)
    assert seqs.shape == (2, 33) and int(seqs.max()) < VOCAB and seqs[0, 0] == 0  # BOS first


def test_build_is_deterministic_and_idempotent(built: builtin.BuiltinData, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in built.shards.parent.rglob("*") if p.is_file()}
    assert builtin.build_builtin(built.shards.parent, VOCAB, max_bytes=MAX_BYTES) == built
    after = {p: p.stat().st_mtime_ns for p in built.shards.parent.rglob("*") if p.is_file()}
    assert after == before  # a second call rewrites nothing
    other = builtin.build_builtin(tmp_path / "other", VOCAB, max_bytes=MAX_BYTES)
    for split in ("train", "validation"):
        assert _texts(other.corpus / split) == _texts(built.corpus / split)
    bins = [n for n in _tree(built.shards) if n.endswith(".bin")]
    assert bins and all(_tree(other.shards)[n] == _tree(built.shards)[n] for n in bins)
    assert _tree(other.tokenizer) == _tree(built.tokenizer)


def test_tokenizer(built: builtin.BuiltinData) -> None:
    from tokenizers import Tokenizer
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from transformers import AutoTokenizer

    tok = Tokenizer.from_file(str(built.tokenizer / "tokenizer.json"))
    assert tok.get_vocab_size() <= VOCAB
    assert (tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)) == (0, 1)
    texts = _texts(built.corpus / "validation")
    for text in texts[:3] + ["héllo  wörld\n\tdef f(x):  # ünïcode ✓"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(texts[0]).ids) < 0.6 * len(texts[0].encode())  # BPE merged something
    # torchtitan (training) and transformers (exports) tokenize alike: one BOS, EOS per document
    titan = HuggingFaceTokenizer(str(built.tokenizer))
    hf = AutoTokenizer.from_pretrained(str(built.tokenizer))
    for text in texts[:2]:
        training = titan.encode(text, add_bos=True, add_eos=True)
        assert training[0] == 0 and training.count(0) == 1
        assert hf(text)["input_ids"] == training[:-1]


def test_bad_settings_are_refused_not_rebuilt(built: builtin.BuiltinData, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vocab_size = 100"):
        builtin.build_builtin(tmp_path / "small", 100)
    before = _tree(built.corpus)
    with pytest.raises(DataError, match="built with other settings"):
        builtin.build_builtin(built.corpus.parent, VOCAB, max_bytes=MAX_BYTES // 2)
    assert _tree(built.corpus) == before


def test_crash_leftovers_are_ours_and_redone(tmp_path: Path) -> None:
    assets = builtin.claim_assets_dir(tmp_path / "a")
    stale = assets / ".corpus.partial-99999"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "x.jsonl").write_text("garbage")
    done = builtin.build_builtin(assets, 300, max_bytes=60_000)
    assert not stale.exists() and (done.corpus / builtin.CORPUS_MARKER).is_file()
    # a published piece without its marker is not ours to replace
    (done.tokenizer / builtin.TOKENIZER_MARKER).unlink()
    with pytest.raises(DataError, match="not a finished build"):
        builtin.build_builtin(assets, 300, max_bytes=60_000)


def test_ranks_build_once_together(tmp_path: Path) -> None:
    """Every rank of a launch calls the build at once (before any process group): one builds,
    the others wait and get the same folders; no rank sees a half-claimed folder as foreign."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(builtin.build_builtin, [(tmp_path / "a", 300, 60_000)] * 3)
    assert len(set(results)) == 1 and (results[0].shards / "index.json").is_file()


# ------------------------------------------------------------------------------ the assets folder
def _users_folder(root: Path) -> Path:
    """The documented local_text layout, as a user keeps it."""
    folder = root / "mine"
    (folder / "corpus" / "train").mkdir(parents=True)
    for i in range(3):
        (folder / "corpus" / "train" / f"{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}))
    return folder


def test_assets_dir_never_takes_a_users_folder(tmp_path: Path) -> None:
    folder = _users_folder(tmp_path)
    before = _tree(folder)
    with pytest.raises(DataError, match=r"holds files amuse_dist did not write \(corpus\)"):
        builtin.build_builtin(folder, 300, max_bytes=60_000)
    assert _tree(folder) == before and sorted(p.name for p in folder.iterdir()) == ["corpus"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        builtin.claim_assets_dir(tmp_path / "file")
    # an empty folder is taken, and marked
    (tmp_path / "empty").mkdir()
    builtin.claim_assets_dir(tmp_path / "empty")
    assert (tmp_path / "empty" / builtin.ASSETS_MARKER).is_file()


def test_an_earlier_versions_assets_folder_is_adopted(tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "corpus").mkdir(parents=True)
    (old / "corpus" / builtin.CORPUS_MARKER).write_text("{}")
    (old / "tokenizer").mkdir()
    builtin.claim_assets_dir(old)
    assert (old / builtin.ASSETS_MARKER).is_file()


def _cli(module: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", module, *args]
    return run_cmd(cmd, env=env(tmp_path), timeout=300)


def test_train_with_a_users_assets_dir_exits_2_and_keeps_the_files(tmp_path: Path) -> None:
    """issue 23: ``--local_data.assets_dir`` on a folder of the user's own files."""
    folder = _users_folder(tmp_path)
    before = _tree(folder)
    dump = tmp_path / "run"
    proc = _cli(
        "amuse_dist.train",
        *("--job.config_file", str(DEBUG_TOML), "--job.dump_folder", str(dump)),
        *("--local_data.assets_dir", str(folder)),
        tmp_path=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("amuse-train:")]
    assert len(errors) == 1 and "assets_dir" in errors[0] and str(folder) in errors[0], errors
    assert _tree(folder) == before
    assert not (dump / "checkpoint").exists()


def test_eval_of_a_run_naming_a_users_assets_dir_leaves_it_alone(tmp_path: Path) -> None:
    """issue 23: a shared export's meta sets ``local_data.assets_dir`` to the user's folder;
    amuse-eval resolves the data with the same refusal."""
    from amuse_dist.titan.config import parse_job_config
    from amuse_dist.titan.loaders.datasets import resolve_datasets

    folder = _users_folder(tmp_path)
    before = _tree(folder)
    cfg = parse_job_config(["--job.config_file", str(DEBUG_TOML)])
    cfg.local_data.assets_dir = str(folder)
    with pytest.raises(DataError, match="did not write"):
        resolve_datasets(cfg, 2048)
    assert _tree(folder) == before


# ------------------------------------------------------------------------------ the dataset table
def test_one_dataset_table() -> None:
    from torchtitan.hf_datasets.text_datasets import DATASETS as TITAN

    from amuse_dist.titan import launch
    from amuse_dist.titan.loaders import datasets, hub

    for name in ("token_shards", "local_corpus_validation", "local_text", "LOCAL_TEXT"):
        assert datasets.is_offline(name), name
    assert not datasets.is_offline("fineweb_edu") and not datasets.is_offline("c4")
    assert datasets.lookup("fineweb_edu_validation") is None  # no split of a hub stream
    assert datasets.reads_token_shards("token_shards_validation")
    assert not datasets.reads_token_shards("local_corpus")
    c4 = TITAN["c4"]
    assert hub.register_datasets() == ["fineweb_edu"] == hub.register_datasets()
    assert TITAN["c4"] is c4 and "local_corpus" not in TITAN  # offline data never streams
    assert launch.offline_hub_defaults(["local_corpus", "token_shards_validation"]) is not None
    assert not launch.offline_hub_defaults(["c4"])


def test_unresolved_offline_name_is_refused_by_the_loader() -> None:
    from amuse_dist.titan.config import parse_job_config
    from amuse_dist.titan.loaders.token_shards import build_dataloader

    cfg = parse_job_config(["--job.config_file", str(DEBUG_TOML)])
    with pytest.raises(DataError, match="resolve_datasets"):
        build_dataloader(1, 0, None, cfg)


# ------------------------------------------------------------------------------ local_text folders
@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (jsonl with an extra column, txt, parquet) and validation/ (jsonl)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("texts") / "texts"
    (folder / "train").mkdir(parents=True)
    (folder / "validation").mkdir()
    words = "the model of data rank shard token step batch loss layer weight".split()
    rng = np.random.default_rng(0)

    def doc(n: int) -> str:
        return " ".join(rng.choice(words, n)) + "."

    rows = [json.dumps({"text": doc(200), "id": i, "url": "x"}) for i in range(40)]
    (folder / "train" / "a.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "train" / "b.txt").write_text(doc(400))
    pq.write_table(pa.table({"text": [doc(150) for _ in range(10)], "n": list(range(10))}),
                   folder / "train" / "c.parquet")  # fmt: skip
    rows = [json.dumps({"text": doc(200), "meta": {"k": 1}}) for _ in range(20)]
    (folder / "validation" / "v.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _text_args(folder: Path, tokenizer: Path, assets: Path, dump: Path) -> list[str]:
    return [
        "--job.config_file", str(DEBUG_TOML), "--job.dump_folder", str(dump),
        "--local_data.assets_dir", str(assets), "--model.hf_assets_path", str(tokenizer),
        "--training.dataset", "local_text", "--training.dataset_path", str(folder),
        "--validation.dataset", "local_text_validation", "--training.seq_len", "64",
        "--validation.seq_len", "64", "--validation.steps", "2",
    ]  # fmt: skip


def test_local_text_is_prepared_once_to_token_shards(
    text_folder: Path, built: builtin.BuiltinData, tmp_path: Path
) -> None:
    """Extra columns and mixed file types are read (only the text field); the result is token
    shards in the assets folder, made once per content, and passes the token-shard checks."""
    from amuse_dist.titan.config import parse_job_config
    from amuse_dist.titan.loaders.datasets import resolve_datasets
    from amuse_dist.titan.loaders.token_shards import check_job_config

    before = _tree(text_folder)
    args = _text_args(text_folder, built.tokenizer, tmp_path / "assets", tmp_path / "run")
    cfg = parse_job_config(args)
    notes = resolve_datasets(cfg, 2048)
    assert len(notes) == 1
    shards = Path(cfg.training.dataset_path)
    assert cfg.training.dataset == cfg.validation.dataset == "token_shards"
    assert cfg.validation.dataset_path == str(shards) and shards.parent == tmp_path / "assets"
    index = read_index(shards)
    assert index["splits"]["train"]["documents"] == 40 + 1 + 10
    assert index["splits"]["validation"]["documents"] == 20
    assert check_job_config(cfg, 2048) == []
    again = parse_job_config(args)
    resolve_datasets(again, 2048)
    assert again.training.dataset_path == str(shards)  # prepared once
    assert _tree(text_folder) == before


def test_local_text_bad_input_is_one_line_exit_2(
    text_folder: Path, built: builtin.BuiltinData, tmp_path: Path
) -> None:
    """issue 21 item 7 through the real CLI: each case one line naming the key or file and the
    fix, exit 2, before start-up (no run folder)."""
    import shutil

    from amuse_dist.tokenizer import train

    mixed = tmp_path / "mixed"
    shutil.copytree(text_folder, mixed)
    (mixed / "train" / "d.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    flat = tmp_path / "flat"
    shutil.copytree(text_folder / "train", flat)
    big = train(built.corpus / "train", tmp_path / "big_tok", 3000)  # vocab 3000 > 2048
    assets = tmp_path / "assets"
    cases = [
        (tmp_path / "nope", built.tokenizer, ["dataset_path", "does not exist"]),
        (mixed, built.tokenizer, [str(mixed / "train" / "d.jsonl"), "no 'text' field"]),
        (flat, built.tokenizer, ["no train/ and validation/", "enable = false"]),
        (text_folder, big, ["vocab of", "vocab_size 2048", "larger flavor"]),
    ]
    for folder, tok, needles in cases:
        dump = tmp_path / f"run_{folder.name}_{tok.name}"
        proc = _cli("amuse_dist.train", *_text_args(folder, tok, assets, dump), tmp_path=tmp_path)
        assert proc.returncode == 2, (folder, proc.stderr[-3000:])
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("amuse-train:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        for needle in needles:
            assert needle in errors[0], (needle, errors[0])
        assert "Traceback" not in proc.stderr and not dump.exists(), folder


# ------------------------------------------------------------------------------ layering
def test_loaders_never_import_the_train_spec() -> None:
    """No import circle train_spec -> loaders -> train_spec (not even inside a function): the
    model's vocab size is passed in; data/ and the dataset table import no torch."""
    import ast

    for path in sorted((REPO / "amuse_dist" / "titan" / "loaders").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        up = {m for m in names if m.startswith("amuse_dist.titan.") and ".loaders" not in m}
        assert not up, (path.name, up)
    code = (
        "import sys, amuse_dist.data.corpus, amuse_dist.titan.loaders.datasets, "
        "amuse_dist.titan.launch; assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

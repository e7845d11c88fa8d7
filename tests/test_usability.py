"""Runs and exports people can use as they are (issue 13): Hugging Face and lm-eval ready X
exports, exports kept when checkpoints are purged, the progress line, the run folder's records,
the Makefile's torch handling and amuse-plot.

The export tests read the session's straight run (tests/conftest.py); one short run with
``keep_latest_k = 2`` serves the retention, progress and run-record tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import shutil
import stat
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests._titan import REPO, amuse_eval, builtin_data, eval_batches, run_args, torchrun

SAMPLE = 'def main(argv):\n    """Parse the options."""\n    return 0\n'
ANSI = re.compile(r"\x1b\[")


def _x(straight: Path) -> Path:
    return straight / "checkpoint" / "step-20" / "x"


# ----------------------------------------------------------------------------- the X export
@pytest.mark.e2e
def test_x_export_loads_in_transformers_from_the_folder_alone(
    straight: Path, assets: Path, tmp_path: Path
) -> None:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    x = _x(straight)
    for name in ("config.json", "generation_config.json", "README.md", "tokenizer.json"):
        assert (x / name).is_file(), name
    config = json.loads((x / "config.json").read_text())
    assert config["max_position_embeddings"] == 256  # training.seq_len of debug_cpu.toml
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 1)
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["tie_word_embeddings"] is False

    # tokenization: AutoTokenizer from the folder == training's (BOS + text; training also
    # ends each document with EOS, which a prompt must not have)
    training = HuggingFaceTokenizer(str(builtin_data(assets).tokenizer))
    hf_tok = AutoTokenizer.from_pretrained(x)
    doc = training.encode(SAMPLE, add_bos=True, add_eos=True)
    assert doc[0] == training.bos_id and doc[-1] == training.eos_id
    assert hf_tok(SAMPLE)["input_ids"] == doc[:-1]
    assert hf_tok.decode(doc[1:-1]) == SAMPLE

    # the loss on amuse-eval's fixed batches (2 batches of 4)
    rows = amuse_eval(x, tmp_path / "eval", tmp_path)
    assert [(r["step"], r["source"], r["weights"]) for r in rows] == [(20, "export", "x")]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained(x).eval()
            loader = eval_batches(assets, 2)
            losses = []
            with torch.no_grad():
                for i, (inputs, labels) in enumerate(loader):
                    if i == 2:
                        break
                    out = model(input_ids=inputs["input"], labels=None)
                    ce = torch.nn.functional.cross_entropy(
                        out.logits.flatten(0, 1), labels.flatten(0, 1)
                    )
                    losses.append(float(ce))
                prompt = hf_tok("def main(", return_tensors="pt")
                generated = model.generate(**prompt, max_new_tokens=8)
    finally:
        hf_logger.removeHandler(handler)
    assert sum(losses) / len(losses) == pytest.approx(rows[0]["loss"], abs=1e-4)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    about_positions = [m for m in said if re.search(r"position|rope|max_length|pad_token", m, re.I)]
    assert not about_positions, about_positions

    card = (x / "README.md").read_text()
    for text in ("step | 20", "tokens seen | 40,960", "optimizer | AMUSE", "validation loss at X"):
        assert text in card, text
    assert "| rho | 0.8 |" in card and "-m amuse_dist.train" in card
    info = json.loads((x / "amuse_export.json").read_text())
    assert info["tokens_seen"] == 20 * 8 * 256
    assert info["validation"]["step"] == 20 and math.isfinite(info["validation"]["loss"])


TINY_TASK = """task: amuse_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.mark.e2e
def test_lm_eval_hflm_on_an_export(straight: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from amuse_dist.titan.harness import lm_eval_export

    docs = [
        {"context": "def add(a, b):\n    return", "continuation": " a + b"},
        {"context": "import os\nimport", "continuation": " sys"},
        {"context": "for i in", "continuation": " range(10):"},
    ]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny.yaml").write_text(TINY_TASK.format(data=tasks / "tiny.jsonl"))
    x = _x(straight)
    assert HFLM(pretrained=str(x), device="cpu", batch_size=1).max_length == 256
    results = lm_eval_export(x, ["amuse_tiny"], include=str(tasks), bootstrap_iters=0, device="cpu")
    metrics = results["amuse_tiny"]
    assert math.isfinite(metrics["perplexity,none"]) and metrics["perplexity,none"] > 1
    assert 0.0 <= metrics["acc,none"] <= 1.0


# ----------------------------------------------------------------------------- one short run
@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> tuple[Path, str]:
    """6 steps on 2 ranks, a checkpoint every 2 steps, keep_latest_k = 2, X and Y exported."""
    dump = tmp_path_factory.mktemp("kept")
    args = run_args(
        dump,
        assets,
        steps=6,
        checkpoint__interval=2,
        checkpoint__keep_latest_k=2,
        validation__enable=False,
        anytime__export_y=True,
        metrics__log_freq=2,
    )
    proc = torchrun(2, args, dump)
    return dump, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_keep_latest_k_keeps_every_export_unless_asked(kept: tuple[Path, str]) -> None:
    from amuse_dist.anytime.targets import find_targets
    from amuse_dist.titan.checkpoint import AnytimeCheckpointManager, complete_steps

    dump, _ = kept
    ckpt = dump / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2", "step-4", "step-6"]
    assert complete_steps(ckpt) == [4, 6]
    purged = ckpt / "step-2"
    assert sorted(p.name for p in purged.iterdir()) == [
        "amuse_manifest.json",
        "amuse_meta.json",
        "x",
        "y",
    ]
    for step in (2, 4, 6):
        for which in ("x", "y"):
            info = json.loads((ckpt / f"step-{step}" / which / "amuse_export.json").read_text())
            assert (info["step"], info["weights"]) == (step, which)
    # amuse-eval finds the kept export of the purged checkpoint
    targets = [(t.step, t.kind) for t in find_targets(dump, "auto")]
    assert targets == [(2, "export"), (4, "dcp"), (6, "dcp")]

    # asked: keep only the newest export -> the purged step-2 goes whole; live ones stay
    copy = dump.parent / (dump.name + "_asked")
    shutil.copytree(ckpt, copy)
    q: queue.Queue[str] = queue.Queue()
    manager = SimpleNamespace(
        keep_latest_k=2, keep_exports=1, folder=str(copy), purge_thread=True, purge_queue=q
    )
    AnytimeCheckpointManager._purge_stale_checkpoints(manager)  # type: ignore[arg-type]
    assert q.get_nowait() == str(copy / "step-2") and q.empty()
    # and keep_latest_k = 1 strips step-4 to its exports (default keep_exports = 0)
    manager.keep_latest_k, manager.keep_exports = 1, 0
    AnytimeCheckpointManager._purge_stale_checkpoints(manager)  # type: ignore[arg-type]
    assert sorted(p.name for p in (copy / "step-4").iterdir()) == [
        "amuse_manifest.json",
        "amuse_meta.json",
        "x",
        "y",
    ]
    assert complete_steps(copy) == [6]


@pytest.mark.e2e
def test_progress_line_and_run_records(kept: tuple[Path, str]) -> None:
    from amuse_dist.titan.config import check_toml, parse_job_config
    from amuse_dist.titan.cpu import CPU_NOTE

    dump, output = kept
    line = re.search(
        r"step 6/6  loss\s+\S+  grad_norm\s+\S+  tokens (\S+)  elapsed (\S+)  eta (\S+)", output
    )
    assert line, output[-3000:]
    assert line.group(1) == "12.3k" and line.group(3) == "00:00"
    assert re.search(r"step 4/6 .* eta \d\d:\d\d", output)
    assert not ANSI.search(output)  # not a terminal: no colour codes
    # CPU noise: silenced, explained once
    assert output.count(CPU_NOTE) == 1
    for noise in (
        "Peak flops undefined",
        "DTensor random operators",
        "does not exist",
        "set_vital",
    ):
        assert noise not in output, noise

    log = (dump / "train.log").read_text()
    assert "step 6/6" in log and "Training completed" in log and not ANSI.search(log)
    config = dump / "config.toml"
    assert check_toml(str(config)) == []
    again = parse_job_config(["--job.config_file", str(config)])
    assert again.training.steps == 6 and again.checkpoint.keep_latest_k == 2
    assert again.anytime.export_y is True and again.job.dump_folder == str(dump.resolve())


@pytest.mark.unit
def test_progress_text() -> None:
    from amuse_dist.titan.metrics import progress_text

    head, tail = progress_text(40, 100, 327_680, 62.0, rate=40 / 62.0, bar=False)
    assert head == "step  40/100"
    assert tail == "tokens 328k  elapsed 01:02  eta 01:33"
    head, _ = progress_text(40, 100, 0, 62.0, rate=None, bar=True)
    assert head == "step  40/100 |" + "█" * 8 + " " * 12 + "|"
    assert progress_text(1, 100, 0, 1.0, rate=None, bar=False)[1].endswith("eta ?")


@pytest.mark.e2e
def test_amuse_plot(straight: Path, kept: tuple[Path, str], tmp_path: Path) -> None:
    from amuse_dist.plot import TOKENS, VAL_X, main, read_scalars

    scalars = read_scalars(straight)
    assert sorted(scalars[VAL_X]) == [1, 5, 10, 15, 20]
    assert scalars[TOKENS][20] == 20 * 8 * 256
    out = tmp_path / "curves.png"
    main([str(straight), str(kept[0]), "--out", str(out), "--labels", "straight,kept"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--out", str(out)])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- Makefile
FAKE_PYTHON = """#!/bin/sh
# stands in for python: records pip calls, answers the torch probe from $FAKE_TORCH
echo "$*" >> "$FAKE_LOG"
case "$*" in
  "-m pip"*) exit 0 ;;
  *"import torch"*)
    if [ -n "$FAKE_TORCH" ]; then echo "$FAKE_TORCH"; exit 0; fi
    if grep -q "torch==2.13.0" "$FAKE_LOG"; then echo 2.13.0; exit 0; fi
    exit 1 ;;
esac
exit 0
"""


@pytest.mark.e2e
@pytest.mark.parametrize("installed", ["2.7.1+cu128", ""])
def test_make_install_keeps_an_installed_torch(tmp_path: Path, installed: str) -> None:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = dict(os.environ, FAKE_LOG=str(log), FAKE_TORCH=installed)
    proc = subprocess.run(
        ["make", "-s", "install", f"PYTHON={fake}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pip = [c for c in log.read_text().splitlines() if c.startswith("-m pip install")]
    assert len(pip) == 1, pip
    if installed:  # kept: pinned to its own version, the CPU build never named
        assert f"torch=={installed}" in pip[0] and "2.13.0" not in pip[0]
        assert proc.stdout.strip() == installed  # the version after install: the same torch
    else:  # missing: the pinned CPU build
        assert "torch==2.13.0" in pip[0] and proc.stdout.strip() == "2.13.0"
    # make test installs the same way
    dry = subprocess.run(
        ["make", "-n", "test", f"PYTHON={fake}"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert ("2.13.0" in dry.stdout) == (not installed), dry.stdout

"""The records a run leaves in its folder beside the checkpoints: ``config.toml`` (what the run
used, re-runnable as ``--job.config_file``) and the last line of ``train.log`` (why it stopped).

No torchtitan and no torch: the trainer hands over plain TOML tables. ``config.toml`` is written
only once a run has really started (its checkpoint, if any, loaded and accepted), so a refused or
failed launch never rewrites the record of the run that is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_RECORD = "config.toml"
RUN_LOG = "train.log"
STOP_PREFIX = "run stopped: "


def config_text(tables: dict[str, Any], command: str) -> str:
    """The TOML text of ``config.toml``: a two-line header (who wrote it, the command), then the
    tables (``None`` values left out: TOML has no null, and unset means the default)."""
    import tomli_w

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value if v is not None]
        return value

    return (
        "# Resolved config of this run (TOML + command-line overrides), written by amuse-train.\n"
        f"# Command: {command}\n" + tomli_w.dumps(clean(tables))
    )


def write_config_record(folder: Path, text: str) -> Path:
    """``folder/config.toml`` := ``text`` (atomically). A different earlier record (a resume
    with other settings) is kept as ``config.N.toml``; the same settings leave the file as is
    (the command line in the header may differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_RECORD
    if path.is_file():
        old = path.read_text()
        if old.split("\n", 2)[2:] == text.split("\n", 2)[2:]:
            return path
        n = 1
        while (folder / f"config.{n}.toml").exists():
            n += 1
        path.rename(folder / f"config.{n}.toml")
    tmp = folder / ".config.toml.tmp"
    tmp.unlink(missing_ok=True)  # a link there goes, its target is never written
    tmp.write_text(text)
    tmp.replace(path)
    return path


def stop_line(
    kind: str, step: int | None = None, detail: str = "", tokens_seen: int | None = None
) -> str:
    """The last line of ``train.log``: ``run stopped: <kind>[ at step N][ (tokens seen T)][: detail]``.

    ``kind`` is one of finished, preempted, interrupted, aborted, diverged, refused, crashed.
    One line, so ``tail -n 1 train.log`` says it: a multi-line message is joined with " / ".
    """
    detail = " / ".join(line.strip() for line in detail.splitlines() if line.strip())
    text = STOP_PREFIX + kind
    if step is not None:
        text += f" at step {step}"
    if tokens_seen is not None:
        text += f" (tokens seen {tokens_seen:,})"
    if detail:
        text += f": {detail}"
    return text

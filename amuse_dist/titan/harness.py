"""lm-evaluation-harness glue for ``amuse-eval --lm-eval``: an export folder is a complete
Hugging Face model, so lm-eval's own ``HFLM`` loads it as is (one process, no process group).

The optional extra: ``pip install 'amuse_dist[lm_eval]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amuse_dist.anytime.targets import Target

LM_EVAL_FIELDS = ("step", "task", "metric", "value", "path")


def lm_eval_export(
    export: Path,
    tasks: list[str],
    include: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    bootstrap_iters: int = 100,
) -> dict[str, dict[str, Any]]:
    """lm-evaluation-harness on one export folder: {task: {metric: value}}.

    The folder is a complete Hugging Face model (config, tokenizer adding BOS as in training,
    ``max_position_embeddings`` = trained context), so lm-eval's own ``HFLM`` loads it as is.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            "--lm-eval needs lm-evaluation-harness: pip install 'amuse_dist[lm_eval]'"
        ) from e
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(pretrained=str(export), batch_size=batch_size, device=device, dtype="float32")
    manager = TaskManager(include_path=include) if include else TaskManager()
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
    )
    results: dict[str, dict[str, Any]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"
        }
    return results


def export_folders(targets: list[tuple[int, str, Path]]) -> list[tuple[int, Path]]:
    """The export folder of each target (a checkpoint's X export)."""
    from amuse_dist.anytime.run_format import is_complete_export, read_meta

    out = []
    for step, kind, path in targets:
        if kind == "dcp":
            path = path / (read_meta(path).get("export") or {}).get("folder", "x")
            if not is_complete_export(path):
                raise FileNotFoundError(f"{path}: no complete X export for lm-eval")
        out.append((step, path))
    return out


def run_lm_eval(
    targets: list[Target],
    tasks: list[str],
    include: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    bootstrap_iters: int = 100,
) -> list[dict[str, Any]]:
    """Rows (step, task, metric, value, path) for the X export of every target."""
    rows = []
    for t in targets:
        export = t.export_folder()
        results = lm_eval_export(export, tasks, include, limit, batch_size, device, bootstrap_iters)
        for task, metrics in results.items():
            for metric, value in sorted(metrics.items()):
                rows.append(
                    {
                        "step": t.step,
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "path": str(export),
                    }
                )
    return rows

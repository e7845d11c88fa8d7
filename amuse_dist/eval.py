"""``amuse-eval``: validation loss of checkpoints, at the averaged weights X by default.

    python -m amuse_dist.eval RUN_DIR | CHECKPOINT_DIR | STEP_DIR | X_EXPORT_DIR [options]
    torchrun --nproc_per_node N -m amuse_dist.eval ...

    amuse-eval X_EXPORT_DIR --lm-eval TASKS [--lm-eval-include DIR] [--lm-eval-limit N]

A run folder (or its ``checkpoint/``) is evaluated step by step in order. A ``step-N`` folder is a
DCP checkpoint: the model (Y) and optimizer state are loaded and X = z + (y - z)/beta_y computed
from them. An export folder (``step-N/x``) is loaded from its safetensors. The model, tokenizer and
validation data come from the checkpoint's ``amuse_meta.json`` (or ``--config``), so the loss is
measured on the same fixed batches the run validated on. Prints a table and writes CSV and JSON.

Checkpoints must be trusted: torch's DCP ``.metadata`` is a pickle, so loading a checkpoint can
run code its author put there. amuse-eval loads only step folders whose manifest is signed with
your own key (written by your runs, see ``amuse_dist.anytime.integrity``) unless ``--trust`` is
given; only evaluate folders from people you trust. Nothing a folder names is imported: a plugin
optimizer comes from ``--custom-import`` on the command line. Results go beside what was
evaluated (never inside a step folder) or to ``--out``, and never over a file amuse-eval did not
write.

With ``--lm-eval`` the exports (X, or an export folder given directly) are evaluated instead by
lm-evaluation-harness (``pip install amuse_dist[lm_eval]``) through its Hugging Face model class
``HFLM``, one process, on the tasks named (its own, or YAML tasks under ``--lm-eval-include``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from amuse_dist.anytime import targets as tg
from amuse_dist.anytime.run_format import RunError
from amuse_dist.titan import launch

if TYPE_CHECKING:
    from amuse_dist.titan.evaluate import EvalOptions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="amuse-eval",
        description=__doc__.split("\n\n")[0],
        epilog="SECURITY: checkpoints must be trusted. A DCP checkpoint's .metadata is a pickle: "
        "loading it can run arbitrary code. Folders not written by your own runs (no "
        "amuse_manifest.json signed with your key) are refused unless --trust is given.",
    )
    p.add_argument("path", help="run folder, checkpoint folder, step-N folder or X export folder")
    p.add_argument(
        "--source",
        choices=("auto", "dcp", "export"),
        default="auto",
        help="for step-N folders: compute X from the DCP state (dcp) or read step-N/x (export); "
        "auto prefers dcp",
    )
    p.add_argument(
        "--weights", choices=("x", "y"), default="x", help="X (averaged, default) or Y (DCP only)"
    )
    p.add_argument("--steps", type=int, default=None, help="validation batches (validation.steps)")
    p.add_argument("--batch-size", type=int, default=None, help="validation.local_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="validation.seq_len")
    p.add_argument("--dataset", default=None, help="validation.dataset")
    p.add_argument("--dataset-path", default=None, help="validation.dataset_path")
    p.add_argument("--config", default=None, help="training TOML, for exports without metadata")
    p.add_argument(
        "--out", default=None, help="write OUT.csv and OUT.json (default: beside PATH's steps)"
    )
    p.add_argument(
        "--custom-import",
        default=None,
        metavar="MODULE",
        help="import MODULE first (an optimizer plugin); never taken from the folder",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--trust",
        action="store_true",
        help="load step folders not signed by your own runs (copied from others, or older "
        "versions); their pickled DCP .metadata can run code: only for checkpoints you trust",
    )

    lm = p.add_argument_group("lm-evaluation-harness (optional extra: amuse_dist[lm_eval])")
    lm.add_argument(
        "--lm-eval",
        metavar="TASKS",
        default=None,
        help="comma-separated lm-eval task names: evaluate the exports with lm-eval's HFLM",
    )
    lm.add_argument("--lm-eval-include", metavar="DIR", default=None, help="extra task YAMLs")
    lm.add_argument("--lm-eval-limit", type=float, default=None, help="documents per task")
    lm.add_argument("--lm-eval-batch-size", type=int, default=8, help="HFLM batch size")
    lm.add_argument(
        "--lm-eval-bootstrap",
        type=int,
        default=100,
        help="bootstrap iterations for stderr (0: none)",
    )
    lm.add_argument("--device", default=None, help="HFLM device (default: cuda if available)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.seq_len is not None and args.seq_len < 1:
        p.error(f"--seq-len must be >= 1, got {args.seq_len}")
    return args


def options(args: argparse.Namespace) -> EvalOptions:
    from amuse_dist.titan.evaluate import EvalOptions

    return EvalOptions(
        weights=args.weights,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        config=args.config,
        custom_import=args.custom_import,
        trust=args.trust,
        progress=not args.no_progress,
    )


def _fail(e: BaseException) -> None:
    print(f"amuse-eval: {e}", file=sys.stderr)
    raise SystemExit(getattr(e, "exit_code", 2)) from None


def format_table(rows: list[dict]) -> str:
    lines = [f"{'step':>8}  {'source':>6}  {'weights':>7}  {'loss':>9}  {'ppl':>10}  {'tokens':>9}"]
    for r in rows:
        lines.append(
            f"{r['step']:>8}  {r['source']:>6}  {r['weights']:>7}  {r['loss']:>9.4f}  "
            f"{r['perplexity']:>10.2f}  {r['tokens']:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = Path(args.path)
    launch.setup_device()  # before anything imports torchtitan
    out = Path(args.out) if args.out else tg.default_out(path)
    paths = tg.result_paths(out, "_lm_eval" if args.lm_eval else "")
    try:
        targets = tg.find_targets(path, args.source)
        if args.lm_eval:
            return main_lm_eval(targets, args, paths)
        tg.check_trusted(targets, args.trust)  # before anything reads a pickled .metadata
        if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes the results
            tg.check_out(paths, given=args.out is not None)
        tg.check_weights(targets, args.weights)
        tg.check_files(targets)
        from amuse_dist.titan.evaluate import prepare

        config = prepare(targets, options(args))
    except RunError as e:
        _fail(e)

    from torchtitan.tools.logging import init_logger

    from amuse_dist.titan import cpu
    from amuse_dist.titan.evaluate import evaluate_targets

    init_logger()
    cpu.quiet_known_noise()
    launch.single_process_env()
    try:
        rows = evaluate_targets(targets, options(args), config)
    except RunError as e:
        print(f"amuse-eval: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(getattr(e, "exit_code", 2))  # as leave_process_group: no finalization abort

    import torch.distributed as dist

    if dist.get_rank() == 0:
        tg.write_rows(rows, paths, tg.RESULT_FIELDS)
        print(format_table(rows))
        for r in rows:
            if not math.isfinite(r["loss"]):
                print(
                    f"amuse-eval: warning: step {r['step']} ({r['path']}): the loss is "
                    f"{r['loss']} (non-finite weights? the checkpoint may have diverged)",
                    file=sys.stderr,
                )
        print(f"wrote {paths[0]} and {paths[1]}")
    launch.leave_process_group()


def main_lm_eval(targets: list[tg.Target], args: argparse.Namespace, paths: tuple) -> None:
    """``--lm-eval``: one process, no process group; prints and writes OUT_lm_eval.{csv,json}."""
    from amuse_dist.titan.harness import LM_EVAL_FIELDS, run_lm_eval

    tg.check_out(paths, given=args.out is not None)
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    try:
        rows = run_lm_eval(
            targets,
            tasks,
            include=args.lm_eval_include,
            limit=args.lm_eval_limit,
            batch_size=args.lm_eval_batch_size,
            device=args.device,
            bootstrap_iters=args.lm_eval_bootstrap,
        )
    except ImportError as e:
        _fail(e)
    tg.write_rows(rows, paths, LM_EVAL_FIELDS)
    for r in rows:
        print(f"{r['step']:>8}  {r['task']:>20}  {r['metric']:>20}  {r['value']:.6g}")
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()

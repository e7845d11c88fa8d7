"""``amuse-plot RUN_DIR... --out PNG``: loss curves of one or several runs from TensorBoard files.

Two panels, against optimizer steps and against tokens seen: the training loss
(``loss_metrics/global_avg_loss``) and the validation loss at X (``validation_x/loss``) and at
Y (``validation_y/loss``). Tokens come from ``progress/tokens_seen`` (the trainer's count, logged
with the loss; exact across resumes on other rank counts) or, for runs without it, from the
run's ``config.toml`` (global batch x seq_len per step).
Needs matplotlib (``pip install amuse_dist[plot]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN = "loss_metrics/global_avg_loss"
VAL_X = "validation_x/loss"
VAL_Y = "validation_y/loss"
TOKENS = "progress/tokens_seen"
CURVES = ((TRAIN, "train", "-"), (VAL_X, "val X", "o-"), (VAL_Y, "val Y", "s--"))


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every TensorBoard event file under ``run`` (later files win,
    so a resumed run's repeated steps take the newest value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run.glob("**/events.out.tfevents.*"), key=lambda f: (f.stat().st_mtime, f))
    if not files:
        raise FileNotFoundError(f"{run}: no TensorBoard event files (metrics.enable_tensorboard)")
    out: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def tokens_at(steps: list[int], logged: dict[int, float]) -> list[float]:
    """The tokens seen at each of ``steps``, from the run's own count (``progress/tokens_seen``,
    training state that stays exact across resumes on other rank counts): exact at the logged
    steps, linear in between (a step not logged lies between two that were), extrapolated
    from the nearest logged stretch outside them."""
    import numpy as np

    known = sorted(logged)
    xs = np.array([0, *known], dtype=float)
    ys = np.array([0.0, *(logged[s] for s in known)])
    out = np.interp(steps, xs, ys)
    last = len(xs) - 1
    if last >= 1:
        slope = (ys[last] - ys[last - 1]) / (xs[last] - xs[last - 1])
        out = np.where(
            np.array(steps) > xs[last], ys[last] + slope * (np.array(steps) - xs[last]), out
        )
    return [float(v) for v in out]


def tokens_per_step(run: Path) -> float | None:
    """Tokens per optimizer step from the run's config.toml (runs that logged no token count)."""
    config = run / "config.toml"
    if not config.is_file():
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    t = tomllib.loads(config.read_text()).get("training", {})
    gbs = t.get("global_batch_size", -1)
    if gbs is None or gbs <= 0:
        return None  # local * dp: the world size is not in the config
    return float(gbs * t.get("seq_len", 0)) or None


def plot_runs(runs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Draw every run's curves into one PNG with a steps panel and a tokens panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        scalars = read_scalars(run)
        label = labels[i] if labels else run.name
        color = colors[i % len(colors)]
        logged = scalars.get(TOKENS, {})
        per_step = None if logged else tokens_per_step(run)
        for tag, name, style in CURVES:
            series = scalars.get(tag)
            if not series:
                continue
            steps = sorted(series)
            values = [series[s] for s in steps]
            kwargs = dict(color=color, markersize=3, linewidth=1.2 if tag == TRAIN else 1.6)
            alpha = 0.45 if tag == TRAIN else 1.0
            ax_steps.plot(steps, values, style, label=f"{label}: {name}", alpha=alpha, **kwargs)
            if logged or per_step:
                tokens = tokens_at(steps, logged) if logged else [s * per_step for s in steps]
                ax_tokens.plot(tokens, values, style, alpha=alpha, **kwargs)
    ax_steps.set_xlabel("step")
    ax_tokens.set_xlabel("tokens seen")
    for ax in (ax_steps, ax_tokens):
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    if not ax_tokens.lines:
        ax_tokens.text(0.5, 0.5, "no token counts", ha="center", transform=ax_tokens.transAxes)
    ax_steps.legend(fontsize=8)
    fig.suptitle("training loss and validation loss at X and Y")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="amuse-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (job.dump_folder)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--labels", default=None, help="comma-separated legend names, one per run")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    try:
        out = plot_runs(args.runs, args.out, labels)
    except (FileNotFoundError, ImportError) as e:
        print(f"amuse-plot: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

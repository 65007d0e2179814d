"""Plot a TensorBoard scalar of several runs into one PNG (needs matplotlib: pip install -e ".[plot]").

    python experiments/plot_curves.py --runs runs/A runs/B --labels sa-hyper mlp --tag eval/episodic_return --out curve.png

Runs that share a label (e.g. seeds of one setting) are drawn as one curve: their mean over the steps they all
logged, with the band between their minimum and maximum.
"""

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class PlotArgs:
    runs: List[str]
    """run directories (runs/{run_name})"""
    labels: Optional[List[str]] = None
    """one legend label per run; the directory names by default"""
    tag: str = "eval/episodic_return"
    """the scalar to plot"""
    out: str = "curve.png"
    """output PNG path"""
    title: str = ""
    """figure title"""
    xlabel: str = "environment steps"
    """x-axis label (e.g. "meta-iterations" for hyper_maml.py)"""
    max_step: Optional[int] = None
    """leave out points after this step (compare runs of different lengths over a common range)"""


if __name__ == "__main__":
    args = tyro.cli(PlotArgs)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('error: plotting needs matplotlib: pip install -e ".[plot]"')
    labels = args.labels or args.runs
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(args.runs)} runs but {len(labels)} labels")
    curves = {}  # label -> one {step: value} per run
    for run, label in zip(args.runs, labels):
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        if args.tag not in acc.Tags()["scalars"]:
            raise SystemExit(f"error: {run} has no scalar {args.tag!r}")
        events = [e for e in acc.Scalars(args.tag) if args.max_step is None or e.step <= args.max_step]
        curves.setdefault(label, []).append({e.step: e.value for e in events})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, runs in curves.items():
        steps = sorted(set.intersection(*(set(run) for run in runs)))
        values = np.array([[run[step] for step in steps] for run in runs])
        name = f"{label} ({len(runs)} runs: mean, min-max)" if len(runs) > 1 else label
        (line,) = ax.plot(steps, values.mean(0), marker="o", markersize=3, label=name)
        if len(runs) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(args.xlabel)
    ax.set_ylabel(args.tag)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")

"""Plot a TensorBoard scalar of several runs into one PNG (needs matplotlib: pip install -e ".[plot]").

    python benchmarks/plot_curves.py --runs runs/A runs/B --labels sa-hyper mlp --tag eval/episodic_return --out curve.png
"""

from dataclasses import dataclass
from typing import List, Optional

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
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run, label in zip(args.runs, labels):
        acc = EventAccumulator(run)
        acc.Reload()
        events = [e for e in acc.Scalars(args.tag) if args.max_step is None or e.step <= args.max_step]
        ax.plot([e.step for e in events], [e.value for e in events], marker="o", markersize=3, label=label)
    ax.set_xlabel(args.xlabel)
    ax.set_ylabel(args.tag)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")

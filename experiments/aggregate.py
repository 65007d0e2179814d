"""Turn a sweep's runs into the paper's kind of results: learning curves per task with 95% confidence bands, a table
of final and area-under-curve returns, and rliable's aggregate metrics across tasks (agarwal et al., NeurIPS 2021).

    python experiments/aggregate.py sweeps/td3-critics-small
    python experiments/aggregate.py sweeps/maml-paper --tag eval/pre_adaptation_return --out sweeps/maml-paper/pre
    python experiments/aggregate.py sweeps/pearl-paper --tasks HalfCheetahVelMedium --out sweeps/pearl-paper/fig7

Reads the finished runs of the sweep's manifest.json (experiments/sweep.py) and their TensorBoard scalar (--tag,
default the script's evaluation return). A model is a value of the sweep's grid (e.g. a critic); its runs on one
task are its seeds. Writes into {sweep}/aggregate/ (or --out):

- curves.png: per task, each model's mean curve across seeds with a 95% bootstrap confidence band (the seeds' curves
  resampled whole);
- aggregate.png: per model, the interquartile mean (IQM) of the final scores across all runs and tasks, each task's
  scores divided by the baseline's mean there, and the probability of improvement over the baseline, with 95%
  stratified-bootstrap confidence intervals (runs resampled within each task; rliable's get_interval_estimates);
- results.md: the tables and figure links, a fragment for the docs; summary.json: every number.

A run's final score is the mean of its last --final-window logged values, its area under the curve (AUC) the
trapezoidal area divided by the steps covered, i.e. its average score over training. For grad_probe.py sweeps the
paper's Fig. 3 panels are also drawn, from all runs' grad_probe.pt files (grad_probe.py --plot-from).
"""

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep import REPO, fail, load_manifest, read_scalars


@dataclass
class AggregateArgs:
    sweep_dir: tyro.conf.Positional[str]
    """the sweep's directory (with manifest.json)"""
    out: Optional[str] = None
    """output directory; default {sweep_dir}/aggregate"""
    tag: Optional[str] = None
    """the TensorBoard scalar to aggregate; default the sweep's (the script's evaluation return)"""
    baseline: Optional[str] = None
    """the model the others are compared with; default the sweep's"""
    tasks: tuple[str, ...] = ()
    """only these tasks (env ids); default all"""
    final_window: int = 1
    """a run's final score is the mean of its last this many logged values"""
    normalize: Literal["baseline", "none"] = "baseline"
    """scores for the IQM: divided per task by the baseline's mean final score (baseline; raw where that mean is
    <= 0 on some task), or raw (none)"""
    reps: int = 2000
    """bootstrap resamples of each confidence interval"""
    seed: int = 0
    """seed of the bootstrap"""
    link_prefix: str = ""
    """prefix of the figure links in results.md (e.g. img/sweeps/ when the PNGs are copied beside the docs)"""


def load_runs(sweep_dir: str, manifest: dict, tag: str, tasks: tuple) -> list:
    """The finished runs that logged `tag`: task, model, seed and the curve (steps, values)."""
    runs = []
    for run_id, entry in manifest["runs"].items():
        if entry["status"] != "finished" or (tasks and entry["env_id"] not in tasks):
            continue
        steps, values = read_scalars(os.path.join(sweep_dir, entry["run_dir"]), tag)
        if not steps:
            print(f"warning: {run_id} logged no {tag}; left out", file=sys.stderr)
            continue
        runs.append({"id": run_id, "task": entry["env_id"], "model": entry["label"], "seed": entry["seed"],
                     "steps": np.array(steps), "values": np.array(values, dtype=np.float64)})  # fmt: skip
    return runs


def by_task_and_model(runs: list) -> dict:
    """{task: {model: [runs sorted by seed]}}, tasks and models in the order the sweep lists them."""
    groups = {}
    for run in runs:
        groups.setdefault(run["task"], {}).setdefault(run["model"], []).append(run)
    for models in groups.values():
        for model_runs in models.values():
            model_runs.sort(key=lambda r: r["seed"])
    return groups


def final_score(run: dict, window: int) -> float:
    return float(run["values"][-window:].mean())


def area_under_curve(run: dict) -> float:
    """The trapezoidal area under the curve divided by the steps it covers: the average score over training."""
    steps, values = run["steps"], run["values"]
    if len(steps) < 2:
        return float(values[0])
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def interval(scores: dict, func, args: AggregateArgs) -> tuple:
    """rliable's stratified bootstrap: ({key: point estimate}, {key: (low, high) arrays}) of func over the scores."""
    from rliable import library

    with warnings.catch_warnings():  # rliable passes a RandomState to arch's bootstrap, which arch 7 deprecates
        warnings.filterwarnings("ignore", "random_state is deprecated", FutureWarning)
        return library.get_interval_estimates(
            scores, func, reps=args.reps, random_state=np.random.RandomState(args.seed)
        )


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """rliable's metrics.probability_of_improvement, P(X > Y) + P(X = Y) / 2 per task averaged over tasks (the
    Mann-Whitney U statistic over all pairs of runs), computed for all pairs at once: the bootstrap calls it thousands
    of times, and rliable's one scipy test per task makes that the slowest part of this script."""
    diff = scores_x[:, None, :] - scores_y[None, :, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def mean_curve(model_runs: list, args: AggregateArgs) -> tuple:
    """(steps, mean, low, high) over the steps every run logged; the band resamples whole curves (runs)."""
    steps = sorted(set.intersection(*(set(r["steps"].tolist()) for r in model_runs)))
    curves = np.array([[dict(zip(r["steps"].tolist(), r["values"]))[s] for s in steps] for r in model_runs])
    points, cis = interval({"curve": curves[:, None, :]}, lambda x: x.mean(axis=(0, 1)), args)
    return np.array(steps), points["curve"], cis["curve"][0], cis["curve"][1]


def score_matrix(groups: dict, model: str, window: int, scale: dict) -> np.ndarray:
    """(runs, tasks) final scores of a model, divided by scale[task]; runs beyond the fewest any task has are left
    out (rliable's matrices are rectangular)."""
    per_task = [
        [final_score(r, window) / scale[task] for r in models.get(model, [])] for task, models in groups.items()
    ]
    n = min(len(scores) for scores in per_task)
    return np.array([scores[:n] for scores in per_task]).T


def aggregate(args: AggregateArgs) -> dict:
    """Computes every number of the outputs; returns them as the summary."""
    from rliable import metrics

    manifest = load_manifest(args.sweep_dir)
    if not manifest["runs"]:
        fail(f"{args.sweep_dir} has no runs")
    sweep = manifest["sweep"]
    tag = args.tag or sweep["tag"]
    runs = load_runs(args.sweep_dir, manifest, tag, args.tasks)
    if not runs:
        fail(f"no finished run of {args.sweep_dir} logged {tag}")
    groups = by_task_and_model(runs)
    models = list(dict.fromkeys(r["model"] for r in runs))
    baseline = args.baseline or sweep.get("baseline")
    if baseline is not None and baseline not in models:
        fail(f"the baseline {baseline!r} has no finished runs; models: {', '.join(models)}")
    summary = {"sweep": args.sweep_dir, "tag": tag, "x_label": sweep.get("x_label", "step"), "baseline": baseline,
               "final_window": args.final_window, "reps": args.reps, "normalize": args.normalize, "tasks": {},
               "aggregate": {}}  # fmt: skip
    for task, task_models in groups.items():
        summary["tasks"][task] = {}
        for model, model_runs in task_models.items():
            finals = np.array([[final_score(r, args.final_window)] for r in model_runs])
            aucs = np.array([[area_under_curve(r)] for r in model_runs])
            points, cis = interval({"final": finals, "auc": aucs}, lambda x: np.array([x.mean()]), args)
            steps, mean, low, high = mean_curve(model_runs, args)
            summary["tasks"][task][model] = {
                "runs": len(model_runs), "seeds": [r["seed"] for r in model_runs],
                **{key: {"mean": float(points[key][0]), "ci": [float(cis[key][0][0]), float(cis[key][1][0])]}
                   for key in ("final", "auc")},
                "curve": {"steps": steps.tolist(), "mean": mean.tolist(), "low": low.tolist(), "high": high.tolist()},
            }  # fmt: skip
    complete = [m for m in models if all(m in task_models for task_models in groups.values())]
    if args.normalize == "baseline" and baseline is not None:
        scale = {task: summary["tasks"][task][baseline]["final"]["mean"] for task in groups}
        if any(value <= 0 for value in scale.values()):
            print(f"warning: {baseline}'s mean final score is <= 0 on some task ({scale}); the IQM uses raw scores",
                  file=sys.stderr)  # fmt: skip
            summary["normalize"], scale = "none", {task: 1.0 for task in groups}
    else:
        scale = {task: 1.0 for task in groups}
    matrices = {model: score_matrix(groups, model, args.final_window, scale) for model in complete}
    points, cis = interval(matrices, lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)]), args)
    for model in complete:
        summary["aggregate"][model] = {
            "runs_per_task": int(matrices[model].shape[0]),
            "iqm": {"value": float(points[model][0]), "ci": [float(cis[model][0][0]), float(cis[model][1][0])]},
            "mean": {"value": float(points[model][1]), "ci": [float(cis[model][0][1]), float(cis[model][1][1])]},
        }
    if baseline in complete:
        raw = {model: score_matrix(groups, model, args.final_window, {t: 1.0 for t in groups}) for model in complete}
        pairs = {model: (raw[model], raw[baseline]) for model in complete if model != baseline}
        if pairs:
            points, cis = interval(pairs, probability_of_improvement, args)
            for model in pairs:
                summary["aggregate"][model]["improvement"] = {
                    "value": float(points[model]), "ci": np.ravel(cis[model]).tolist()}  # fmt: skip
    return summary


# --- outputs ----------------------------------------------------------------------------------------------------------
def write_figures(summary: dict, out: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    models = list(dict.fromkeys(m for task in tasks for m in summary["tasks"][task]))
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    cols = min(len(tasks), 4)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for model, result in summary["tasks"][task].items():
            c = result["curve"]
            ax.plot(c["steps"], c["mean"], color=colors[model], label=f"{model} ({result['runs']})")
            ax.fill_between(c["steps"], c["low"], c["high"], color=colors[model], alpha=0.2, linewidth=0)
        ax.set_title(task)
        ax.set_xlabel(summary["x_label"])
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks) :]:
        ax.axis("off")
    axes[0][0].set_ylabel(summary["tag"])
    axes[0][0].legend(fontsize=8, title="model (runs)", title_fontsize=8)
    fig.suptitle("mean across seeds, 95% bootstrap confidence band", fontsize=9)
    fig.tight_layout()
    written = [os.path.join(out, "curves.png")]
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    agg = summary["aggregate"]
    if agg:
        improved = [m for m in agg if "improvement" in agg[m]]
        fig, axes = plt.subplots(
            1, 2 if improved else 1, figsize=(9 if improved else 4.5, 0.5 + 0.45 * len(agg)), squeeze=False
        )
        names = list(agg)
        for y, model in enumerate(names):
            value, (low, high) = agg[model]["iqm"]["value"], agg[model]["iqm"]["ci"]
            axes[0][0].errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o", color=colors[model], capsize=4)
        axes[0][0].set_yticks(range(len(names)), names)
        norm = (
            "final score / baseline's mean"
            if summary["normalize"] == "baseline" and summary["baseline"]
            else "final score"
        )
        axes[0][0].set_xlabel(f"IQM of {norm}")
        if improved:
            for y, model in enumerate(improved):
                value, (low, high) = agg[model]["improvement"]["value"], agg[model]["improvement"]["ci"]
                axes[0][1].errorbar(
                    value, y, xerr=[[value - low], [high - value]], fmt="o", color=colors[model], capsize=4
                )
            axes[0][1].set_yticks(range(len(improved)), improved)
            axes[0][1].axvline(0.5, color="gray", linestyle="--", linewidth=1)
            axes[0][1].set_xlabel(f"P(model > {summary['baseline']})")
        for ax in axes.flat:
            ax.grid(alpha=0.3, axis="x")
            ax.set_ylim(-0.6, len(names) - 0.4)
        fig.tight_layout()
        written.append(os.path.join(out, "aggregate.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def fmt(result: dict, key: str = "value") -> str:
    return f"{result[key]:.4g} [{result['ci'][0]:.4g}, {result['ci'][1]:.4g}]"


def markdown(summary: dict, figures: list, link_prefix: str) -> str:
    window, x_label = summary["final_window"], summary["x_label"]
    final = "last logged value" if window == 1 else f"mean of the last {window} logged values"
    intro = (
        f"Score: `{summary['tag']}`. Final: each run's {final}; AUC: its average over training (area under the curve "
        f"divided by the {x_label} covered). Brackets: 95% bootstrap confidence intervals ({summary['reps']} "
        "resamples of the runs)."
    )
    lines = [f"<!-- written by experiments/aggregate.py from {summary['sweep']} -->", intro, "",
             f"![learning curves]({link_prefix}{os.path.basename(figures[0])})", "",
             "| task | model | runs | final | AUC |", "|---|---|---|---|---|"]  # fmt: skip
    for task, models in summary["tasks"].items():
        for model, r in models.items():
            lines.append(f"| {task} | {model} | {r['runs']} | {fmt(r['final'], 'mean')} | {fmt(r['auc'], 'mean')} |")
    agg, base = summary["aggregate"], summary["baseline"]
    if not agg:
        return "\n".join(lines) + "\n"
    scores = f"final scores divided per task by {base}'s mean" if summary["normalize"] == "baseline" and base else None
    about = f"Across {len(summary['tasks'])} task(s), stratified bootstrap (rliable): IQM and mean of the "
    about += scores or "final scores"
    if base:
        about += (f"; P(model > {base}): the probability that a run of the model scores above a run of {base} on the "
                  "same task, averaged over tasks")  # fmt: skip
    lines += ["", about + ".", "", "| model | runs per task | IQM | mean |" + (f" P(model > {base}) |" if base else ""),
              "|---|---|---|---|" + ("---|" if base else "")]  # fmt: skip
    for model, a in agg.items():
        row = f"| {model} | {a['runs_per_task']} | {fmt(a['iqm'])} | {fmt(a['mean'])} |"
        if base:
            row += f" {fmt(a['improvement']) if 'improvement' in a else '(baseline)' if model == base else ''} |"
        lines.append(row)
    if len(figures) > 1:
        lines += ["", f"![aggregate metrics]({link_prefix}{os.path.basename(figures[1])})"]
    return "\n".join(lines) + "\n"


def plot_gradient_accuracy(sweep_dir: str, manifest: dict, out: str) -> None:
    """Fig. 3 (a-d) from every finished grad_probe.py run, pooled by critic, drawn by grad_probe.py itself."""
    files = [os.path.join(sweep_dir, e["run_dir"], "grad_probe.pt") for e in manifest["runs"].values()
             if e["status"] == "finished"]  # fmt: skip
    files = [f for f in files if os.path.exists(f)]
    if files:
        command = [sys.executable, os.path.join(REPO, "grad_probe.py"), "--plot-from", *files, "--plot-dir", out]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"warning: grad_probe.py --plot-from failed: {proc.stderr.strip()}", file=sys.stderr)


if __name__ == "__main__":
    args = tyro.cli(AggregateArgs)
    if args.final_window < 1 or args.reps < 1:
        fail("--final-window and --reps must be positive")
    try:
        import matplotlib  # noqa: F401
        import rliable  # noqa: F401
    except ImportError as e:
        fail(f'aggregate.py needs the sweep extra ({e.name} is missing): pip install -e ".[sweep]"')
    summary = aggregate(args)
    out = args.out or os.path.join(args.sweep_dir, "aggregate")
    os.makedirs(out, exist_ok=True)
    figures = write_figures(summary, out)
    text = markdown(summary, figures, args.link_prefix)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    manifest = load_manifest(args.sweep_dir)
    if manifest["sweep"].get("script") == "grad_probe.py":
        plot_gradient_accuracy(args.sweep_dir, manifest, out)
    print(text)
    print(f"wrote {', '.join(os.path.join(out, n) for n in sorted(os.listdir(out)))}")

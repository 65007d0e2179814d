"""experiments/sweep.py and experiments/aggregate.py (issue 14), on a real Ray (no mocks): a local sweep that finishes,
writes its manifest and skips its finished runs when run again; a run killed partway that is retried, resumes and
ends with the weights of an uninterrupted run; a simulated 2-node cluster that loses a node mid-run; aggregate.py's
numbers against hand computations and its outputs for a real sweep; every paper experiment's commands accepted by its
script. Skipped when the sweep extra (Ray, rliable) is not installed."""

import fcntl
import glob
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tyro

from tests.cli import ROOT, run_script

ray = pytest.importorskip("ray")
pytest.importorskip("rliable")
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import aggregate
import sweep

SWEEP = os.path.join(ROOT, "experiments", "sweep.py")
AGGREGATE = os.path.join(ROOT, "experiments", "aggregate.py")
TINY = ["--learning-starts", "100", "--batch-size", "16", "--buffer-size", "2000", "--eval-freq", "200",
        "--eval-episodes", "1", "--checkpoint-freq", "100", "--progress-freq", "200", "--save-model",
        "--hyper-embedding-dim", "16", "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "50"]  # fmt: skip
STEPS = ["--total-timesteps", "400"]
KILLED = "InvertedPendulum-v4__critic=mlp__seed1"
CRITICS = ["--critic", "mlp", "mlp-small"]  # the fastest critics: the sweep, not the critic, is tested here


def sweep_command(sweep_dir, *args):
    return [sys.executable, SWEEP, "--sweep-dir", str(sweep_dir), *args]


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def manifest_of(sweep_dir):
    with open(os.path.join(sweep_dir, "manifest.json")) as f:
        return json.load(f)


def script_process(folder):
    """The pid of the script process running in a run's folder (its working directory), or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.realpath(f"/proc/{pid}/cwd") == os.path.realpath(folder) and "hyper_td3.py" in read(
                f"/proc/{pid}/cmdline"
            ):
                return int(pid)
        except OSError:
            continue
    return None


def wait_for_checkpoint(folder, proc, timeout=600):  # a guard against a hang, not a speed test
    deadline = time.time() + timeout
    while not glob.glob(os.path.join(folder, "runs", "*", "checkpoint.pt")):
        assert proc.poll() is None and time.time() < deadline, "the run never wrote a checkpoint"
        time.sleep(0.02)


def same_weights(model_a, model_b):
    a, b = torch.load(model_a, weights_only=True), torch.load(model_b, weights_only=True)
    return all(torch.equal(a[net][key], b[net][key]) for net in ("actor", "qf1", "qf2") for key in a[net])


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory):
    """A local sweep (Ray with 2 CPUs) of hyper_td3.py, 2 critics x 2 seeds (the first critic is the baseline), in which
    one run's process is killed (SIGKILL) after its first checkpoint: (sweep dir, the sweep's stdout). Made once per
    test session: pytest-xdist workers share it through the session's base directory."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own base directory inside the session's
        shared = shared.parent
    with open(shared / "killed_sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "killed_sweep.json").exists():
            sweep_dir, out = make_killed_sweep(shared / "killed_sweep" / "tiny")
            (shared / "killed_sweep.json").write_text(json.dumps([str(sweep_dir), out]))
        sweep_dir, out = json.loads((shared / "killed_sweep.json").read_text())
    return sweep_dir, out


def make_killed_sweep(sweep_dir):
    command = sweep_command(sweep_dir, "--script", "hyper_td3.py", "--env-ids", "InvertedPendulum-v4", "--seeds", "1",
                            "2", "--num-cpus", "2", "--", *CRITICS, *STEPS, *TINY)  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(os.path.join(sweep_dir, KILLED), proc)
    pid = script_process(os.path.join(sweep_dir, KILLED))
    assert pid is not None, "the run finished before it could be killed"
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return sweep_dir, out


def test_a_tiny_local_sweep_finishes_every_run_and_writes_the_manifest(killed_sweep):
    sweep_dir, out = killed_sweep
    manifest = manifest_of(sweep_dir)
    assert manifest["sweep"]["script"] == "hyper_td3.py" and manifest["sweep"]["baseline"] == "mlp"
    runs = manifest["runs"]
    assert sorted((r["label"], r["seed"]) for r in runs.values()) == [
        ("mlp", 1),
        ("mlp", 2),
        ("mlp-small", 1),
        ("mlp-small", 2),
    ]
    for run_id, run in runs.items():
        assert run["status"] == "finished" and run["returncode"] == 0
        assert f"--critic {run['label']}" in run["command"] and f"--seed {run['seed']}" in run["command"]
        run_dir = os.path.join(sweep_dir, run["run_dir"])
        assert os.path.dirname(run_dir) == os.path.join(sweep_dir, run_id, "runs")
        steps, values = sweep.read_scalars(run_dir, "eval/episodic_return")
        assert steps == [200, 400] and run["final"]["eval/episodic_return"] == {"step": 400, "value": values[-1]}
    assert "[4/4 finished, 0 failed]" in out and "4 of 4 runs finished, 0 failed" in out
    assert out.count(" finished in ") == 4 and "ETA" in out


def test_a_second_invocation_skips_finished_runs_and_does_no_new_work(killed_sweep):
    sweep_dir, _ = killed_sweep
    logs = {p: read(p) for p in glob.glob(os.path.join(sweep_dir, "*", "output.log"))}
    files = sorted(glob.glob(os.path.join(sweep_dir, "*", "runs", "**"), recursive=True))
    command = sweep_command(sweep_dir, "--script", "hyper_td3.py", "--env-ids", "InvertedPendulum-v4", "--seeds", "1",
                            "2", "--num-cpus", "2", "--", *CRITICS, *STEPS, *TINY)  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "all 4 runs have finished; nothing to do" in proc.stdout and "Ray has" not in proc.stdout
    assert {p: read(p) for p in logs} == logs  # no attempt started
    assert sorted(glob.glob(os.path.join(sweep_dir, "*", "runs", "**"), recursive=True)) == files
    # other settings for the same runs are refused rather than mixed into this sweep
    changed = [*command[: command.index("--")], "--", *CRITICS, "--total-timesteps", "2000", *TINY]
    proc = subprocess.run(changed, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 1 and "with other settings" in proc.stderr


def test_a_killed_run_is_retried_from_its_checkpoint_and_ends_with_the_weights_of_an_uninterrupted_run(
    killed_sweep, tmp_path
):
    sweep_dir, _ = killed_sweep
    run = manifest_of(sweep_dir)["runs"][KILLED]
    assert run["attempts"] == 2 and run["status"] == "finished"
    log = read(os.path.join(sweep_dir, KILLED, "output.log"))
    assert "=== exit -9" in log and "resumed InvertedPendulum-v4__tiny__mlp__1__" in log and "--resume runs/" in log
    others = [r for name, r in manifest_of(sweep_dir)["runs"].items() if name != KILLED]
    assert all(r["attempts"] == 1 for r in others)
    run_script(os.path.join(ROOT, "hyper_td3.py"), ["--env-id", "InvertedPendulum-v4", "--seed", "1", "--critic", "mlp",
                                                    "--exp-name", "tiny", *STEPS, *TINY], tmp_path)  # fmt: skip
    (uninterrupted,) = glob.glob(os.path.join(tmp_path, "runs", "*", "tiny.cleanrl_model"))
    assert same_weights(os.path.join(sweep_dir, run["run_dir"], "tiny.cleanrl_model"), uninterrupted)


def test_aggregate_writes_figures_and_table_for_a_real_sweep(killed_sweep, tmp_path):
    sweep_dir, _ = killed_sweep
    proc = subprocess.run([sys.executable, AGGREGATE, str(sweep_dir), "--out", str(tmp_path), "--reps", "200"],
                          capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["aggregate.png", "curves.png", "results.md", "summary.json"]
    summary = json.loads(read(tmp_path / "summary.json"))
    finals = {}
    for run in manifest_of(sweep_dir)["runs"].values():
        finals.setdefault(run["label"], []).append(run["final"]["eval/episodic_return"]["value"])
    for label, values in finals.items():
        result = summary["tasks"]["InvertedPendulum-v4"][label]
        assert result["runs"] == 2 and result["final"]["mean"] == pytest.approx(np.mean(values))
        assert result["curve"]["steps"] == [200, 400]
    assert "improvement" in summary["aggregate"]["mlp-small"] and "improvement" not in summary["aggregate"]["mlp"]
    table = read(tmp_path / "results.md")
    assert "| InvertedPendulum-v4 | mlp | 2 |" in table and "![learning curves](curves.png)" in table


def test_ctrl_c_stops_the_runs_with_a_checkpoint_and_marks_them_interrupted(tmp_path):
    sweep_dir = tmp_path / "stopped"
    command = sweep_command(sweep_dir, "--script", "hyper_td3.py", "--env-ids", "InvertedPendulum-v4", "--seeds", "1",
                            "--num-cpus", "1", "--", "--critic", "mlp", "--total-timesteps", "100000", *TINY)  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = os.path.join(sweep_dir, "InvertedPendulum-v4__seed1")
    try:
        wait_for_checkpoint(folder, proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted: each run under way writes a checkpoint" in out and "stopped: the next invocation" in out
    run = manifest_of(sweep_dir)["runs"]["InvertedPendulum-v4__seed1"]
    assert run["status"] == "interrupted" and run["returncode"] == 130
    log = read(os.path.join(folder, "output.log"))
    assert "interrupted at step" in log and "checkpoint written" in log and script_process(folder) is None
    assert not os.path.exists(os.path.join(sweep_dir, sweep.STOP_FILE))


def test_a_two_node_cluster_runs_on_both_nodes_and_survives_losing_one_mid_run(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        sweep_dir = tmp_path / "cluster"
        command = sweep_command(sweep_dir, "--address", cluster.address, "--script", "hyper_td3.py", "--env-ids",
                                "InvertedPendulum-v4", "--seeds", "1", "2", "--", "--critic", "mlp", *STEPS,
                                *TINY)  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        folders = [os.path.join(sweep_dir, f"InvertedPendulum-v4__seed{seed}") for seed in (1, 2)]
        for folder in folders:  # both runs are under way, one on each node (one CPU each)
            wait_for_checkpoint(folder, proc)
        on_worker = [f for f in folders if worker.node_id in read(os.path.join(f, "output.log"))]
        assert len(on_worker) == 1
        cluster.remove_node(worker)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    finally:
        cluster.shutdown()
    runs = manifest_of(sweep_dir)["runs"]
    assert all(r["status"] == "finished" for r in runs.values())
    assert len({node for r in runs.values() for node in r["nodes"]}) == 2
    moved = runs[os.path.basename(on_worker[0])]
    assert moved["nodes"][0] == worker.node_id and moved["nodes"][-1] != worker.node_id
    assert "resumed InvertedPendulum-v4__cluster__mlp__" in read(os.path.join(on_worker[0], "output.log"))


# --- aggregate.py against hand computations ---------------------------------------------------------------------------
def write_synthetic_sweep(sweep_dir, finals):
    """A sweep directory with a manifest and one TensorBoard run per (task, model, seed): evaluations 0, final / 2 and
    final at steps 10, 20, 30."""
    from torch.utils.tensorboard import SummaryWriter

    runs = {}
    for (task, model), values in finals.items():
        for seed, final in enumerate(values, start=1):
            run_id = f"{task}__{model}__seed{seed}"
            run_dir = os.path.join(sweep_dir, run_id, "runs", f"{task}__x__{model}__{seed}__0")
            writer = SummaryWriter(run_dir)
            for step, value in zip((10, 20, 30), (0.0, final / 2, final)):
                writer.add_scalar("eval/episodic_return", value, step)
            writer.close()
            runs[run_id] = {"status": "finished", "env_id": task, "label": model, "seed": seed,
                            "run_dir": os.path.relpath(run_dir, sweep_dir)}  # fmt: skip
    manifest = {"format": sweep.MANIFEST_FORMAT, "runs": runs,
                "sweep": {"tag": "eval/episodic_return", "baseline": "base",
                          "x_label": "environment steps"}}  # fmt: skip
    with open(os.path.join(sweep_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def test_aggregate_means_cis_iqm_and_improvement_match_hand_computations(tmp_path):
    finals = {("A", "new"): [1.0] * 5 + [0.0] * 5, ("A", "base"): [float(s) for s in range(1, 11)],
              ("B", "new"): [2.0 * s for s in range(1, 11)], ("B", "base"): [2.0] * 10}  # fmt: skip
    write_synthetic_sweep(tmp_path, finals)
    summary = aggregate.aggregate(tyro.cli(aggregate.AggregateArgs, args=[str(tmp_path), "--reps", "2000"]))
    for (task, model), values in finals.items():
        result = summary["tasks"][task][model]
        assert result["final"]["mean"] == pytest.approx(np.mean(values))
        # AUC: trapezoids over 0 -> final/2 -> final, 10 steps each, divided by the 20 steps covered
        assert result["auc"]["mean"] == pytest.approx(np.mean([(f / 4 * 10 + 3 * f / 4 * 10) / 20 for f in values]))
        assert result["curve"]["mean"] == pytest.approx([0.0, np.mean(values) / 2, np.mean(values)])
    # equal runs: no spread; five 1s and five 0s: the bootstrap mean is Binomial(10, 1/2) / 10, whose 2.5% and 97.5%
    # quantiles are 0.2 and 0.8 (P(<= 0.1) = 1.1%, P(<= 0.2) = 5.5%, P(<= 0.7) = 94.5%, P(<= 0.8) = 98.9%)
    assert summary["tasks"]["B"]["base"]["final"]["ci"] == pytest.approx([2.0, 2.0])
    assert summary["tasks"]["A"]["new"]["final"]["ci"] == pytest.approx([0.2, 0.8])
    assert summary["tasks"]["A"]["new"]["curve"]["low"][-1] == pytest.approx(0.2)
    # IQM of the scores divided by the baseline's mean per task (5.5 on A, 2 on B): the mean of the middle half
    for model in ("new", "base"):
        normalized = sorted([f / 5.5 for f in finals[("A", model)]] + [f / 2.0 for f in finals[("B", model)]])
        assert summary["aggregate"][model]["iqm"]["value"] == pytest.approx(np.mean(normalized[5:15]))
        assert summary["aggregate"][model]["mean"]["value"] == pytest.approx(np.mean(normalized))
    # P(new > base): over all pairs of runs of a task, 1 if new's is higher, 1/2 if equal; averaged over tasks
    per_task = [np.mean([[1.0 if x > y else 0.5 if x == y else 0.0 for y in finals[(t, "base")]]
                         for x in finals[(t, "new")]]) for t in ("A", "B")]  # fmt: skip
    assert per_task == pytest.approx([0.025, 0.95])
    assert summary["aggregate"]["new"]["improvement"]["value"] == pytest.approx(np.mean(per_task))
    low, high = summary["aggregate"]["new"]["improvement"]["ci"]
    assert low < np.mean(per_task) < high and "improvement" not in summary["aggregate"]["base"]


def test_probability_of_improvement_equals_rliables():
    from rliable import metrics

    rng = np.random.default_rng(0)
    for shape_x, shape_y in (((5, 3), (4, 3)), ((10, 1), (10, 1))):
        x, y = rng.integers(0, 4, shape_x).astype(float), rng.integers(0, 4, shape_y).astype(float)  # with ties
        assert aggregate.probability_of_improvement(x, y) == pytest.approx(metrics.probability_of_improvement(x, y))
    assert aggregate.probability_of_improvement(x, x) == 0.5


# --- the sweep's command line and the paper's experiments -------------------------------------------------------------
def test_flags_given_several_values_make_the_grid_and_list_flags_pass_whole():
    grid, fixed = sweep.parse_script_flags(
        "hyper_maml.py", ["--policy", "context", "hyper", "--variance-iters", "1", "100", "--save-model", "--gamma=0.9"]
    )
    assert grid == {"policy": ("context", "hyper")}
    assert fixed == {"variance-iters": ("1", "100"), "save-model": None, "gamma": "0.9"}
    runs = sweep.make_runs("hyper_maml.py", ("AntVel",), (1, 2), grid, fixed, "x", 2)
    assert [(r["label"], r["seed"]) for r in runs] == [("context", 1), ("context", 2), ("hyper", 1), ("hyper", 2)]
    assert runs[0]["flags"] == ["--env-id", "AntVel", "--seed", "1", "--exp-name", "x", "--num-threads", "2",
                                "--variance-iters", "1", "100", "--save-model", "--gamma", "0.9", "--policy",
                                "context"]  # fmt: skip
    with pytest.raises(SystemExit):
        sweep.parse_script_flags("hyper_td3.py", ["--seed", "3"])  # the sweep sets it (--seeds)


@pytest.mark.parametrize("name", sorted(sweep.EXPERIMENTS))
def test_every_paper_experiment_at_every_scale_gives_commands_its_script_accepts(name):
    for scale in sweep.EXPERIMENTS[name]:
        d = sweep.experiment_definition(name, scale)
        module = importlib.import_module(d["script"][:-3])
        runs = sweep.make_runs(d["script"], d["env_ids"], d["seeds"], d["grid"], d["fixed"], f"{name}-{scale}", 1)
        assert len(runs) == len(d["env_ids"]) * len(d["seeds"]) * int(np.prod([len(v) for v in d["grid"].values()]))
        assert len(d["grid"]) == 1 and d["baseline"] in {r["label"] for r in runs}
        for run in runs:
            args = tyro.cli(module.Args, args=run["flags"])
            module.check_args(args)
            assert args.seed == run["seed"] and args.env_id == run["env_id"]


def test_flags_after_the_separator_override_an_experiments_settings():
    d = sweep.experiment_definition("td3-critics", "small", ["--critic", "mlp", "--total-timesteps", "500"])
    assert d["grid"] == {} and d["fixed"]["critic"] == "mlp" and d["fixed"]["total-timesteps"] == "500"
    d = sweep.experiment_definition("grad-accuracy", "paper", ["--critics", "mlp"])
    assert d["grid"] == {} and d["fixed"]["critics"] == ("mlp",)
    assert sweep.experiment_definition("maml", "paper")["grid"] == {"policy": ("vanilla", "context", "hyper")}

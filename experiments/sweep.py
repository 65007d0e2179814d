"""Run a grid of this project's scripts as independent runs on Ray, and the paper's experiments by name.

    python experiments/sweep.py --list                                          # the paper's experiments
    python experiments/sweep.py --experiment td3-critics --scale small          # one figure, laptop-sized, local Ray
    python experiments/sweep.py --experiment td3-critics --address auto         # the paper's size, on a Ray cluster
    python experiments/sweep.py --script hyper_td3.py --env-ids Hopper-v4 --seeds 1 2 3 -- --critic sa-hyper mlp
    python experiments/aggregate.py sweeps/td3-critics-small                    # figures, table, IQM (aggregate.py)

Each run is the unmodified script in a subprocess, in its own folder `{sweep dir}/{run id}/` (the script's `runs/`
inside holds exactly that run), with `--num-threads` set to its CPUs and its CPUs / GPUs requested from Ray. After
`--` come the script's own flags: a flag given several values is an axis of the grid (`--critic sa-hyper mlp`: one
run per critic), except flags that take a list (`--variance-iters 1 100`), which are passed whole. The cross product
of env ids, seeds and the grid is the sweep.

The sweep directory (default `sweeps/{experiment}-{scale}`, or `sweeps/{script name}`) holds `manifest.json`: the
sweep's settings and, per run, its command, run directory, status, attempts, nodes and final metrics. Running the
same command again skips finished runs and resumes unfinished ones from their checkpoints; new seeds or grid values
are added to it. A run whose process is killed, or whose worker or node dies, is retried by Ray (`--max-retries`)
and continues with `--resume` from its last checkpoint; the scripts resume exactly, so its result equals that of an
uninterrupted run. A run that ends with an error (exit 1, e.g. a bad flag or a non-finite loss) is not retried; its
`error:` line is in the manifest and its output in `{run id}/output.log`. grad_probe.py has no --resume: its runs
restart from the beginning. The scripts never import Ray; this file needs `pip install -e ".[sweep]"`. On a cluster
every node needs this checkout and the sweep directory at the same paths (a shared filesystem): docs/sweeps.md.
"""

import ast
import ctypes
import dataclasses
import fcntl
import glob
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST_FORMAT = "hyperl-sweep/1"
STOP_FILE = ".stop"  # in the sweep directory while a Ctrl-C'd sweep stops its runs
ScriptName = Literal["hyper_sac.py", "hyper_td3.py", "grad_probe.py", "hyper_maml.py", "hyper_pearl.py"]
# the flag that sets a run's length, and the x axis of its curves
LENGTH_FLAG = {"hyper_sac.py": "total-timesteps", "hyper_td3.py": "total-timesteps", "grad_probe.py": "total-timesteps",
               "hyper_maml.py": "num-batches", "hyper_pearl.py": "num-iterations"}  # fmt: skip
X_LABEL = {"hyper_sac.py": "environment steps", "hyper_td3.py": "environment steps",
           "grad_probe.py": "environment steps", "hyper_maml.py": "meta-iterations",
           "hyper_pearl.py": "environment steps"}  # fmt: skip
# the scalars whose last value the manifest keeps; the first is the score aggregate.py uses by default
FINAL_TAGS = {"hyper_sac.py": ("eval/episodic_return",), "hyper_td3.py": ("eval/episodic_return",),
              "grad_probe.py": ("eval/episodic_return", "grad/cosine_similarity"),
              "hyper_maml.py": ("eval/post_adaptation_return", "eval/pre_adaptation_return"),
              "hyper_pearl.py": ("eval/average_return_all_test_tasks",
                                 "eval/average_return_all_train_tasks")}  # fmt: skip
# set by the sweep for every run (--env-ids, --seeds, the sweep directory, --cpus-per-run); --resume on retries
RESERVED_FLAGS = ("env-id", "seed", "exp-name", "num-threads", "resume")


# --- the paper's experiments (Keynan, Sarafian & Kraus, ICML 2021, Sec. 3-5) ------------------------------------------
@dataclass(frozen=True)
class Experiment:
    figures: str
    """the paper's figures (and sections) the runs are for"""
    script: str
    env_ids: tuple
    seeds: tuple
    flags: str
    """the script's flags as typed after `--`: a flag given several values (--critic sa-hyper mlp) is a grid axis"""
    baseline: str
    """the model aggregate.py compares the others with (probability of improvement, normalized scores)"""
    list_grid: tuple = ()
    """(flag, values): a grid axis over a flag that takes a list, one value per run (grad_probe.py's --critics)"""


MUJOCO = ("Hopper-v4", "Walker2d-v4", "Ant-v4", "HalfCheetah-v4")  # paper Sec. 5.1 (v2 there; v4 on gymnasium 1.x)
META = ("HalfCheetahFwdBack", "AntFwdBack", "HalfCheetahVel", "AntVel", "HalfCheetahVelMedium")  # Sec. 5.1
SEEDS = (1, 2, 3, 4, 5)  # "5 seeds each" (Sec. 5)
CRITICS = "--critic sa-hyper as-hyper mlp mlp-small mlp-large resnet-features res35 d2rl"  # Sec. 5.2's baselines
PROBE_CRITICS = ("critics", (("sa-hyper",), ("as-hyper",), ("mlp",)))  # one critic per grad_probe.py run
SMALL_TD3 = "--critic sa-hyper mlp --total-timesteps 20000 --eval-freq 1000 --hyper-embedding-dim 256 --hyper-blocks 1"
TINY_TD3 = ("--critic sa-hyper mlp --total-timesteps 300 --learning-starts 100 --batch-size 16 --buffer-size 1000 "
            "--eval-freq 100 --eval-episodes 1 --progress-freq 100 --hyper-embedding-dim 16 --hyper-dynamic-hidden 8 "
            "--hyper-init-samples 50")  # fmt: skip
_grad = Experiment("Figs. 3-4 (gradient accuracy, learning curves)", "grad_probe.py", MUJOCO, SEEDS,
                   "--total-timesteps 1000000", "mlp", PROBE_CRITICS)  # fmt: skip
_td3 = Experiment("Fig. 6a and the Sec. 5.2 baselines (TD3)", "hyper_td3.py", MUJOCO, SEEDS,
                  f"{CRITICS} --total-timesteps 1000000", "mlp")  # fmt: skip
_sac = dataclasses.replace(_td3, figures="Fig. 6b and the Sec. 5.2 baselines (SAC)", script="hyper_sac.py")
_maml = Experiment("Figs. 5 (gradient variance) and 6c (MAML)", "hyper_maml.py", META[:4], SEEDS,
                   "--policy vanilla context hyper --num-batches 400 --variance-iters 1 100 200 400",
                   "context")  # fmt: skip
_pearl = Experiment("Figs. 6d (PEARL) and 7 (out of distribution: HalfCheetahVelMedium)", "hyper_pearl.py", META,
                    SEEDS, "--model mlp hyper --num-iterations 400", "mlp")  # fmt: skip
replace = dataclasses.replace

# name -> scale -> Experiment. "paper": the paper's tasks, models, seeds and lengths. "small": one task, the proposal
# against its baseline (all three critics or policies where the figure compares three), 2-3 seeds, short runs and the
# docs' reduced hypernetworks: about an hour on a 4-core laptop (docs/sweeps.md). "tiny": minutes, a pipeline check.
EXPERIMENTS = {
    "grad-accuracy": {
        "paper": _grad,
        "small": replace(_grad, env_ids=("Hopper-v4",), seeds=(1, 2),
                         flags=f"{SMALL_TD3.removeprefix('--critic sa-hyper mlp ')} --probe-freq 5000"),
        "tiny": replace(_grad, env_ids=("Hopper-v4",), seeds=(1, 2), list_grid=("critics", (("sa-hyper",), ("mlp",))),
                        flags=f"{TINY_TD3.removeprefix('--critic sa-hyper mlp ')} --probe-freq 150 --probe-states 2 "
                        "--probe-actions 5 --probe-start-steps 5"),
    },
    "td3-critics": {
        "paper": _td3,
        "small": replace(_td3, env_ids=("Hopper-v4",), seeds=(1, 2, 3), flags=f"{SMALL_TD3} --checkpoint-freq 2000"),
        "tiny": replace(_td3, env_ids=("Hopper-v4",), seeds=(1, 2), flags=f"{TINY_TD3} --checkpoint-freq 100"),
    },
    "sac-critics": {
        "paper": _sac,
        "small": replace(_sac, env_ids=("Hopper-v4",), seeds=(1, 2, 3), flags=f"{SMALL_TD3} --checkpoint-freq 2000"),
        "tiny": replace(_sac, env_ids=("Hopper-v4",), seeds=(1, 2), flags=f"{TINY_TD3} --checkpoint-freq 100"),
    },
    "maml": {
        "paper": _maml,
        "small": replace(_maml, env_ids=("HalfCheetahFwdBack",), seeds=(1, 2),
                         flags="--policy vanilla context hyper --num-batches 30 --meta-batch-size 10 "
                         "--fast-batch-size 10 --eval-freq 10 --eval-tasks 10 --checkpoint-freq 5 "
                         "--variance-iters 1 10 20 30 --variance-samples 10 --variance-tasks 5"),
        "tiny": replace(_maml, env_ids=("HalfCheetahFwdBack",), seeds=(1, 2),
                        flags="--policy context hyper --num-batches 2 --meta-batch-size 2 --fast-batch-size 2 "
                        "--num-train-tasks 6 --num-test-tasks 3 --eval-freq 1 --eval-tasks 2 --checkpoint-freq 1 "
                        "--variance-iters 2 --variance-samples 3 --variance-tasks 2 --hidden-sizes 8 "
                        "--hyper-embedding-dim 16 --hyper-blocks 1 --hyper-dynamic-hidden 8"),
    },
    "pearl": {
        "paper": _pearl,
        "small": replace(_pearl, env_ids=("HalfCheetahFwdBack",), seeds=(1, 2),
                         flags="--model mlp hyper --num-iterations 20 --num-tasks-sample 1 "
                         "--num-train-steps-per-itr 500 --batch-size 128 --checkpoint-freq 5 "
                         "--hyper-embedding-dim 256 --hyper-blocks 1 --hyper-dynamic-hidden 64"),
        "tiny": replace(_pearl, env_ids=("HalfCheetahVel",), seeds=(1, 2),
                        flags="--model mlp hyper --num-iterations 2 --num-train-tasks 3 --num-test-tasks 2 "
                        "--num-initial-steps 200 --num-steps-prior 200 --num-extra-rl-steps-posterior 200 "
                        "--num-tasks-sample 1 --num-train-steps-per-itr 3 --meta-batch 2 --batch-size 16 "
                        "--embedding-batch-size 8 --num-steps-per-eval 400 --net-size 16 --encoder-hidden 16 "
                        "--hyper-embedding-dim 16 --hyper-blocks 1 --hyper-dynamic-hidden 8 --hyper-init-samples 64 "
                        "--checkpoint-freq 1"),
    },
}  # fmt: skip
ExperimentName = Literal["grad-accuracy", "td3-critics", "sac-critics", "maml", "pearl"]


@dataclass
class SweepArgs:
    experiment: Optional[ExperimentName] = None
    """one of the paper's experiments (--list shows them); the script's flags after -- override its settings"""
    scale: Literal["paper", "small", "tiny"] = "paper"
    """with --experiment: the paper's size, about a laptop hour (small), or a pipeline check (tiny)"""
    script: Optional[ScriptName] = None
    """without --experiment: the script to run"""
    env_ids: tuple[str, ...] = ()
    """without --experiment: the environments (task families for hyper_maml.py and hyper_pearl.py)"""
    seeds: tuple[int, ...] = ()
    """without --experiment: the seeds"""
    sweep_dir: Optional[str] = None
    """the sweep's directory (manifest and runs); default sweeps/{experiment}-{scale} or sweeps/{script name}"""
    address: Optional[str] = None
    """Ray cluster to use: auto (the cluster this machine belongs to), host:port or ray://host:10001; none: start a
    local Ray on this machine"""
    num_cpus: Optional[int] = None
    """CPUs of the local Ray (default: all cores); ignored with --address"""
    cpus_per_run: int = 1
    """CPUs Ray reserves for each run, also passed to the script as --num-threads"""
    gpus_per_run: float = 0.0
    """GPUs Ray reserves for each run (e.g. 0.5 for two runs per GPU); with 0 the run sees no GPU"""
    max_retries: int = 3
    """how often Ray restarts a run whose process, worker or node died (it resumes from its last checkpoint)"""
    baseline: Optional[str] = None
    """the model aggregate.py compares with (default: the experiment's; for a grid, its first model)"""
    list: bool = False
    """list the paper's experiments with their runs at each scale, and exit"""
    dry_run: bool = False
    """print each run's folder and command, and exit"""


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# --- the runs of a sweep ----------------------------------------------------------------------------------------------
def list_flags(script: str) -> set:
    """The flags of `script` that take a list of values (tuple / list fields of its Args), read from its source."""
    with open(os.path.join(REPO, script)) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            return {
                field.target.id.replace("_", "-")
                for field in node.body
                if isinstance(field, ast.AnnAssign)
                and re.match(r"(tuple|Tuple|list|List)\[", ast.unparse(field.annotation))
            }
    fail(f"{script} has no Args class")


def parse_script_flags(script: str, tokens: list) -> tuple:
    """The tokens after `--` -> (grid, fixed): grid {flag: (value, ...)} for flags given several values, fixed
    {flag: value} for the others (value: a string, a tuple of strings for a list flag, None for a switch)."""
    grid, fixed, lists, flag = {}, {}, list_flags(script), None
    values = {}
    for token in tokens:
        if token.startswith("--"):
            flag, _, value = token[2:].partition("=")
            flag = flag.replace("_", "-")
            if flag in values:
                fail(f"--{flag} is given twice")
            values[flag] = [value] if value else []
        elif flag is None:
            fail(f"the script's flags must start with a --flag, got {token!r}")
        else:
            values[flag].append(token)
    for flag, given in values.items():
        if flag in RESERVED_FLAGS:
            fail(f"--{flag} is set by the sweep (use --env-ids, --seeds, --cpus-per-run); do not pass it to the script")
        if flag in lists:
            fixed[flag] = tuple(given)
        elif len(given) > 1:
            grid[flag] = tuple(given)
        else:
            fixed[flag] = given[0] if given else None
    return grid, fixed


def flag_tokens(flag: str, value) -> list:
    if value is None:
        return [f"--{flag}"]
    return [f"--{flag}", *value] if isinstance(value, tuple) else [f"--{flag}", value]


def value_text(value) -> str:
    return "-".join(value) if isinstance(value, tuple) else ("" if value is None else value)


def label_of(choice: dict) -> str:
    """A model's name in tables and legends: the grid's value(s), e.g. "sa-hyper" or "critic=mlp,q-lr=1e-3"."""
    if len(choice) == 1:
        return value_text(next(iter(choice.values())))
    return ",".join(f"{flag}={value_text(value)}" for flag, value in choice.items())


def make_runs(script: str, env_ids: tuple, seeds: tuple, grid: dict, fixed: dict, exp_name: str, cpus: int) -> list:
    """The cross product env ids x grid x seeds, one dict per run: its id (also its folder), settings and flags."""
    runs = []
    for env_id in env_ids:
        for combo in itertools.product(*grid.values()):
            choice = dict(zip(grid, combo))
            for seed in seeds:
                parts = [env_id, *(f"{flag}={value_text(value)}" for flag, value in choice.items()), f"seed{seed}"]
                run_id = re.sub(r"[^A-Za-z0-9._=-]", "_", "__".join(parts))
                flags = ["--env-id", env_id, "--seed", str(seed), "--exp-name", exp_name, "--num-threads", str(cpus)]
                for flag, value in {**fixed, **choice}.items():
                    flags += flag_tokens(flag, value)
                runs.append({"id": run_id, "script": script, "env_id": env_id, "seed": seed,
                             "label": label_of(choice) or script[:-3], "flags": flags,
                             "grid": {flag: value_text(value) for flag, value in choice.items()}})  # fmt: skip
    if len({run["id"] for run in runs}) != len(runs):
        fail("two runs of this sweep would share a folder name; make the grid's values distinct")
    return runs


def experiment_definition(name: str, scale: str, tokens: list = (), baseline: Optional[str] = None) -> dict:
    """What to run for a paper experiment at a scale; flags in `tokens` override the experiment's."""
    exp = EXPERIMENTS[name][scale]
    grid, fixed = parse_script_flags(exp.script, shlex.split(exp.flags))
    if exp.list_grid:
        grid[exp.list_grid[0]] = exp.list_grid[1]
    new_grid, new_fixed = parse_script_flags(exp.script, list(tokens))
    grid = {**{k: v for k, v in grid.items() if k not in new_fixed}, **new_grid}
    fixed = {**{k: v for k, v in fixed.items() if k not in new_grid}, **new_fixed}
    return {"name": f"{name}-{scale}", "experiment": name, "scale": scale, "figures": exp.figures,
            "script": exp.script, "env_ids": exp.env_ids, "seeds": exp.seeds, "grid": grid, "fixed": fixed,
            "baseline": baseline or exp.baseline}  # fmt: skip


def sweep_definition(args: SweepArgs, tokens: list) -> dict:
    """What to run: the experiment at its scale with the given flags overriding it, or the script's grid."""
    if args.experiment:
        if args.script or args.env_ids or args.seeds:
            fail("--experiment sets the script, env ids and seeds; leave out --script, --env-ids and --seeds")
        return experiment_definition(args.experiment, args.scale, tokens, args.baseline)
    if not args.script or not args.env_ids or not args.seeds:
        fail("give --experiment NAME, or --script, --env-ids and --seeds (and the script's flags after --)")
    grid, fixed = parse_script_flags(args.script, tokens)
    baseline = args.baseline or (label_of({k: v[0] for k, v in grid.items()}) if grid else None)
    return {"name": args.script[:-3], "experiment": None, "scale": None, "figures": None, "script": args.script,
            "env_ids": args.env_ids, "seeds": args.seeds, "grid": grid, "fixed": fixed,
            "baseline": baseline}  # fmt: skip


def print_experiments() -> None:
    for name, scales in EXPERIMENTS.items():
        print(f"{name}: {scales['paper'].figures}")
        for scale in scales:
            d = experiment_definition(name, scale)
            models = " ".join(label_of({k: v}) for k, values in d["grid"].items() for v in values)
            n = len(d["env_ids"]) * len(d["seeds"]) * math.prod(len(v) for v in d["grid"].values())
            length = LENGTH_FLAG[d["script"]]
            print(f"  --scale {scale:5s} {n:3d} runs of {d['script']}: {' '.join(d['env_ids'])} | {models} | seeds "
                  f"{' '.join(map(str, d['seeds']))} | --{length} {d['fixed'].get(length, '(default)')}")  # fmt: skip


# --- one run, on a Ray worker -----------------------------------------------------------------------------------------
def prepare_run_process() -> None:
    """In the run's process before exec. Ray workers block SIGINT, and the block would be inherited: unblock it, so
    the script can be stopped with a checkpoint. On Linux, have the process killed when the Ray worker that started
    it dies (a node lost, a worker killed), so a retry never shares its run directory with a stray process."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def find_run_dir(folder: str) -> Optional[str]:
    """The run directory a script created under folder/runs/ (at most one: each run has a folder of its own)."""
    found = sorted(glob.glob(os.path.join(folder, "runs", "*")))
    if len(found) > 1:
        raise RuntimeError(f"{folder}/runs holds {len(found)} runs; expected one")
    return found[0] if found else None


def event_dir(run_dir: str) -> str:
    """Where the run's TensorBoard events are: the run directory, or its one subdirectory (grad_probe.py's critic)."""
    if glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        return run_dir
    found = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(run_dir, "*", "events.out.tfevents.*"))})
    if len(found) != 1:
        raise FileNotFoundError(f"{run_dir} has {len(found)} TensorBoard subdirectories, expected one")
    return found[0]


def read_scalars(run_dir: str, tag: str) -> tuple:
    """(steps, values) of one TensorBoard scalar of a run, in step order; empty if the run never logged it."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # not its notes on the steps a resumed run purged
    events = EventAccumulator(event_dir(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return [], []
    points = {e.step: e.value for e in events.Scalars(tag)}  # a resumed run's re-logged steps count once
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def execute_run(run: dict, sweep_dir: str, repo: str, gpus: float) -> dict:
    """Runs (or resumes) one run as a subprocess and returns its outcome. Raises, so that Ray retries it, when the
    process was killed or interrupted (a signal, exit 130): the retry resumes from the last checkpoint. When the
    sweep is being stopped (its STOP_FILE exists) it sends the script SIGINT, which checkpoints and exits."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    stop_file = os.path.join(sweep_dir, STOP_FILE)
    if os.path.exists(stop_file):
        return {"status": "interrupted", "node": node}
    folder = os.path.join(sweep_dir, run["id"])
    os.makedirs(folder, exist_ok=True)
    run_dir = find_run_dir(folder)
    command = [sys.executable, os.path.join(repo, run["script"]), *run["flags"]]
    checkpoint = os.path.join(run_dir, "checkpoint.pt") if run_dir else None
    if checkpoint and os.path.exists(checkpoint) and run["script"] != "grad_probe.py":
        command += ["--resume", os.path.relpath(checkpoint, folder)]
    elif run_dir:  # died before its first checkpoint (or grad_probe.py, which cannot resume): start again
        os.makedirs(os.path.join(folder, "discarded"), exist_ok=True)
        shutil.move(run_dir, os.path.join(folder, "discarded", os.path.basename(run_dir)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # Ray reserved no GPU for this run
    start = time.time()
    with open(os.path.join(folder, "output.log"), "a") as log:
        log.write(f"=== attempt on node {node} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command[1:])}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=prepare_run_process)  # fmt: skip
        returncode, stopped = None, False
        while returncode is None:
            try:
                returncode = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if not stopped and os.path.exists(stop_file):
                    proc.send_signal(signal.SIGINT)  # the script writes a checkpoint at the end of this step, exits 130
                    stopped = True
        log.write(f"=== exit {returncode} after {time.time() - start:.1f} s\n")
    if returncode < 0 or (returncode == 130 and not stopped):
        raise RuntimeError(f"{run['id']}: the process was stopped (exit {returncode}); Ray retries it")
    status = {0: "finished", 130: "interrupted"}.get(returncode, "failed")
    return {"status": status, "returncode": returncode, "node": node, "seconds": round(time.time() - start, 1),
            **final_outcome(run, folder, sweep_dir, returncode)}  # fmt: skip


def final_outcome(run: dict, folder: str, sweep_dir: str, returncode: int) -> dict:
    """The run directory, and the `error:` line of a failed run or the last values of a finished run's scalars."""
    run_dir = find_run_dir(folder)
    outcome = {"run_dir": os.path.relpath(run_dir, sweep_dir) if run_dir else None, "error": None, "final": {}}
    if returncode not in (0, 130):
        outcome["error"] = last_error_line(os.path.join(folder, "output.log"))
    elif run_dir:
        for tag in FINAL_TAGS[run["script"]]:
            steps, values = read_scalars(run_dir, tag)
            if steps:
                outcome["final"][tag] = {"step": steps[-1], "value": values[-1]}
    return outcome


def last_error_line(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()[-200:]
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-2] if len(lines) > 1 else "no output")


# --- the manifest -----------------------------------------------------------------------------------------------------
def load_manifest(sweep_dir: str) -> dict:
    path = os.path.join(sweep_dir, "manifest.json")
    if not os.path.exists(path):
        return {"format": MANIFEST_FORMAT, "sweep": {}, "runs": {}}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")
    if manifest.get("format") != MANIFEST_FORMAT:
        fail(f"{path} is not a manifest written by this version of experiments/sweep.py")
    return manifest


def save_manifest(sweep_dir: str, manifest: dict) -> None:
    path = os.path.join(sweep_dir, "manifest.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(f"{path}.tmp", path)


def attempts_of(sweep_dir: str, run_id: str) -> list:
    """The nodes of every attempt of a run, from the headers its attempts wrote to output.log."""
    path = os.path.join(sweep_dir, run_id, "output.log")
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return re.findall(r"^=== attempt on node (\S+)", f.read(), flags=re.MULTILINE)


def settings_of(command: str) -> list:
    """A run's command without --num-threads, which a run may change when it resumes."""
    tokens = shlex.split(command)
    i = tokens.index("--num-threads")
    return tokens[:i] + tokens[i + 2 :]


def is_finished(sweep_dir: str, entry: Optional[dict]) -> bool:
    return bool(entry) and entry["status"] == "finished" and os.path.isdir(os.path.join(sweep_dir, entry["run_dir"]))


# --- the driver -------------------------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def start_ray(args: SweepArgs):
    try:
        import ray
    except ImportError:
        fail('sweeps need Ray: pip install -e ".[sweep]"')
    if __name__ != "__main__":  # imported (e.g. by a test): ship this module's code to the workers by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if args.address:
        ray.init(address=args.address, logging_level="WARNING")
    else:
        # "local": a new Ray of its own, even where another one runs (ray.init() alone would join the latest one)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    return ray


def run_sweep(args: SweepArgs, definition: dict, runs: list, sweep_dir: str) -> int:
    """Submits every run that has not finished, records each outcome in the manifest as it comes, prints progress."""
    manifest = load_manifest(sweep_dir)
    for run in runs:
        entry = manifest["runs"].get(run["id"])
        if entry and settings_of(entry["command"]) != settings_of(shlex.join([run["script"], *run["flags"]])):
            fail(f"{sweep_dir} already holds run {run['id']} with other settings ({entry['command']}); "
                 "use another --sweep-dir")  # fmt: skip
    manifest["sweep"] = {k: v for k, v in definition.items()}
    manifest["sweep"].update(x_label=X_LABEL[definition["script"]], tag=FINAL_TAGS[definition["script"]][0],
                             command=shlex.join(["python", "experiments/sweep.py", *sys.argv[1:]]))  # fmt: skip
    todo = [run for run in runs if not is_finished(sweep_dir, manifest["runs"].get(run["id"]))]
    for run in runs:
        entry = manifest["runs"].setdefault(run["id"], {"status": "pending", "attempts": 0, "nodes": []})
        entry.update({k: run[k] for k in ("script", "env_id", "seed", "label", "grid")},
                     command=shlex.join([run["script"], *run["flags"]]), folder=run["id"])  # fmt: skip
    save_manifest(sweep_dir, manifest)
    done_before = len(runs) - len(todo)
    if not todo:
        print(f"{sweep_dir}: all {len(runs)} runs have finished; nothing to do")
        return 0
    resuming = sum(1 for run in todo if (d := find_run_dir(os.path.join(sweep_dir, run["id"])))
                   and os.path.exists(os.path.join(d, "checkpoint.pt")))  # fmt: skip
    if os.path.exists(os.path.join(sweep_dir, STOP_FILE)):  # left by an earlier sweep stopped at once
        os.remove(os.path.join(sweep_dir, STOP_FILE))
    ray = start_ray(args)
    cpus = ray.cluster_resources().get("CPU", 1)
    parallel = max(1, min(len(todo), int(cpus // args.cpus_per_run)))
    print(f"{sweep_dir}: {len(runs)} runs, {done_before} finished before, {resuming} to resume from a checkpoint, "
          f"{len(todo) - resuming} to start; Ray has {cpus:g} CPUs, {parallel} runs at a time", flush=True)  # fmt: skip
    task = ray.remote(execute_run).options(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run,
                                           max_retries=args.max_retries, retry_exceptions=True)  # fmt: skip
    pending = {task.remote(run, sweep_dir, REPO, args.gpus_per_run): run for run in todo}
    for run in todo:
        manifest["runs"][run["id"]]["status"] = "submitted"
    save_manifest(sweep_dir, manifest)
    start, finished, failed, seconds = time.time(), done_before, 0, []
    stop_file = os.path.join(sweep_dir, STOP_FILE)
    while pending:
        try:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # returns now and then to see Ctrl-C
        except KeyboardInterrupt:
            if os.path.exists(stop_file):
                print(f"{sweep_dir}: stopped at once; the next invocation resumes the runs from their checkpoints")
                return 130
            open(stop_file, "w").close()
            print("interrupted: each run under way writes a checkpoint at the end of its current step and stops; "
                  "queued runs do not start (Ctrl-C again to stop at once)", flush=True)  # fmt: skip
            continue
        if not ready:
            continue
        run = pending.pop(ready[0])
        try:
            outcome = ray.get(ready[0])
        except ray.exceptions.RayError as e:  # retries exhausted: the process or its worker or node kept dying
            outcome = {"status": "failed", "returncode": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        entry = manifest["runs"][run["id"]]
        entry.update(outcome)
        entry["nodes"] = attempts_of(sweep_dir, run["id"])
        entry["attempts"] = len(entry["nodes"])
        save_manifest(sweep_dir, manifest)
        if outcome["status"] == "finished":
            finished += 1
            seconds.append(outcome["seconds"])
        elif outcome["status"] == "failed":
            failed += 1
        if outcome["status"] != "interrupted":
            print(progress_line(run, entry, finished, failed, len(runs), pending, parallel, seconds), flush=True)
    stopped = os.path.exists(stop_file)
    if stopped:
        os.remove(stop_file)
    print(f"{sweep_dir}: {finished} of {len(runs)} runs finished, {failed} failed, in {duration(time.time() - start)}"
          + (f"; failed runs' output: {sweep_dir}/<run>/output.log" if failed else "")
          + ("; stopped: the next invocation resumes the others" if stopped else ""))  # fmt: skip
    return 130 if stopped else 1 if failed else 0


def progress_line(run, entry, finished, failed, total, pending, parallel, seconds) -> str:
    head = f"[{finished}/{total} finished, {failed} failed] {run['env_id']} {run['label']} seed {run['seed']}"
    attempts = f", {entry['attempts']} attempts" if entry["attempts"] > 1 else ""
    if entry["status"] == "finished":
        metric = ", ".join(f"{tag} {v['value']:.4g} at {v['step']}" for tag, v in list(entry["final"].items())[:1])
        body = f"finished in {duration(entry['seconds'])} on node {entry['node'][:8]}{attempts}; {metric}"
    else:
        body = f"FAILED{attempts}: {entry['error']}"
    eta = ""
    if pending and seconds:
        eta = f", ETA {duration(sum(seconds) / len(seconds) * math.ceil(len(pending) / parallel))}"
    return f"{head}: {body}; {len(pending)} left{eta}"


def main(argv: list) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    args = tyro.cli(SweepArgs, args=argv[:split])
    tokens = argv[split + 1 :]
    if args.list:
        print_experiments()
        return 0
    if args.cpus_per_run < 1 or args.gpus_per_run < 0 or args.max_retries < 0:
        fail("--cpus-per-run must be >= 1, --gpus-per-run and --max-retries >= 0")
    definition = sweep_definition(args, tokens)
    sweep_dir = os.path.abspath(args.sweep_dir or os.path.join("sweeps", definition["name"]))
    exp_name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(sweep_dir))
    runs = make_runs(definition["script"], definition["env_ids"], definition["seeds"], definition["grid"],
                     definition["fixed"], exp_name, args.cpus_per_run)  # fmt: skip
    if args.dry_run:
        for run in runs:
            print(f"(cd {os.path.join(sweep_dir, run['id'])} && python {os.path.join(REPO, run['script'])} "
                  f"{shlex.join(run['flags'])})")  # fmt: skip
        return 0
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fail(f"another experiments/sweep.py is running on {sweep_dir}")
        return run_sweep(args, definition, runs, sweep_dir)


if __name__ == "__main__":
    # A shell without job control starts background jobs (`sweep.py ... &`) with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: restore it, so `kill -INT` stops such a sweep as Ctrl-C stops one in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main(sys.argv[1:]))

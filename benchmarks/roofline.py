"""Roofline of every hypernetwork update: analytic FLOPs, time, achieved GFLOP/s and the ratio to a matmul peak
measured in the same process, and the MLP path's wall time against a baseline command.

    python benchmarks/roofline.py                                   # all updates, paper sizes, --threads 1 2
    python benchmarks/roofline.py --only sac td3 --profile          # also the top ops of each update
    python benchmarks/roofline.py --only maml --repeats 3 --warmup 0   # minutes per meta-update, see Duration
    python benchmarks/roofline.py --only sac --baseline-cmd \\
        "python /abs/path/to/cleanrl/sac_continuous_action.py --env-id HalfCheetah-v4 --total-timesteps 7000"
    python benchmarks/roofline.py --hyper-embedding-dim 16 --hyper-blocks 1 --hyper-dynamic-hidden 8 --batch-size 8 \\
        --pearl-meta-batch 2 --pearl-context 8 --maml-meta-batch 2 --maml-episodes 2 --maml-episode-length 10 \\
        --threads 1 --repeats 1 --warmup 0 --peak-size 64           # smoke test, a few seconds

Run it on a quiet machine: every number here is a time, and other processes on the cores slow all of them (the
header prints the load average).

Duration at paper sizes, per thread count: SAC, TD3 and grad_probe seconds; PEARL (918 GFLOP per step) a few minutes;
MAML (about 570 GFLOP, but mostly memory-bound parameter-sized vector work) about 5 minutes per meta-update on one
core of this 2-core machine (measured for 1 task of 40 while it was busy, times 40). Each row runs --warmup +
--repeats + 1 (the breakdown) steps, and the FLOP count one more step per update: about 40 minutes per thread count
for MAML at the defaults, hence --only maml with fewer --repeats.

Updates. Each is built by the script's own classes at the script's default Args (paper sizes; the size flags below
shrink them), HalfCheetah shapes (obs 17, act 6, action bounds +-1), on synthetic data of the right shapes (unit
Gaussian states and rewards, uniform actions; one fixed batch, reused by every step: the work does not depend on the
values), so no environment is created or simulated. --hyper-init pytorch calibrates on synthetic states instead of
collected ones; that changes the weights, not the work.
- sac: `hyper_sac.SAC(args, ...).update` on a batch of 256: critic step (targets from the actor and both target
  critics), actor step through the frozen critics, alpha step, Polyak update of both target critics.
- sac_reuse: the same with --reuse-critic-weights: the actor step runs only the dynamic networks that the critic step
  generated for the same states (a change of update order, off by default; docs/hyper_sac.md).
- sac_mlp: the same SAC update with --critic mlp (MLP-Standard, 2x256): the MLP path's update, for reference, not a
  hypernetwork.
- td3: `hyper_td3.TD3(args, ...).update`, batch 100. One timed step is a full policy-delay cycle, --policy-frequency
  (2) consecutive updates (two critic steps, one actor step through the frozen Q1, the Polyak updates of the three
  targets); FLOPs and time are reported per update, i.e. averaged over the cycle.
- grad_probe: `grad_probe.TD3(args, "sa-hyper", ...).update`, the same TD3 in grad_probe.py (its probes, which roll
  out the simulator, are not part of the update and not timed).
- pearl: `hyper_pearl.PEARL(Args(model="hyper"), make_agent(...)).update` (`train_step`) on HalfCheetahVel's meta-batch
  (the default family): 16 tasks x 256 transitions and a context of 100 transitions per task. make_agent's
  --hyper-init pytorch calibrates on a random context (as benchmarks/pearl_update_time.py does).
- maml: `hyper_maml.MAML(Args(policy="hyper"), make_policy(...)).update`, the TRPO meta-update with its second-order
  inner steps (one adaptation per task inside every objective evaluation, the Fisher-vector products of 10
  conjugate-gradient iterations, the line search), plus the valid episodes' advantages (linear baseline fit) that
  update computes. Data: 40 tasks of HalfCheetahVel's train pool x 20 episodes x 200 steps, train and valid; states
  are random, actions drawn from the policy at init, rewards random. Sampling is separate from the update and not
  timed. What cannot be separated from the data is the line search: how many candidates it evaluates depends on the
  episodes (real ones would differ), so the output reports the line-search step k accepted in the counted update
  (k + 1 candidate evaluations, each a forward pass over all tasks; or none accepted, all 20 evaluated). The policy is
  restored before every repetition, so every repetition does the same work.

FLOPs. Counted from shapes, not measured: `torch.utils.flop_counter.FlopCounterMode` over one step counts every
matmul (mm, addmm, bmm, baddbmm; 2 FLOPs per multiply-add) of the forward and backward passes, double backward
included. Elementwise work (activations, losses, Adam, Polyak, the log-prob) is not counted as FLOPs; its time is in
the breakdown below. For SAC and TD3 a hand formula from the network shapes is printed beside the count (they agree
exactly; tests/test_benchmarks.py checks it). Per sample, in multiply-adds, with obs o, act n, embedding d, blocks k,
dynamic hidden h and the primary network's stages d/4, d/2, d:
    primary   P = o d/4 + (d/4)(d/2) + (d/2) d + 2k ((d/4)^2 + (d/2)^2 + d^2)
    heads     H = d (h n + 2h) + d (h + 2)          (W, b, g of the hidden layer; of the output layer)
    dynamic   D = h n + h
    critic    C = P + H + D                         (one SA-Hyper forward)
    actor     A = 256 o + 256^2 + 2 * 256 n (SAC: mean and log-std heads), A' = 256 o + 256^2 + 256 n (TD3)
A backward pass costs twice its forward (the gradients of each weight and of each input) minus the input gradients
nothing needs: of the state (first primary and actor layers), and of the action in the critic step. So
    SAC update  = 2B [ (A + 2C)                                target: actor and both target critics
                     + 2 (3C - o d/4 - h n)                    critic step: Q1, Q2 forward and backward
                     + (A + 2C + 2 (h n + h) + 2A - 256 o) ]   actor step: critics frozen, grad w.r.t. the action
                = 2B (10C + 4A - o d/2 - 256 o + 2h)
    sac_reuse   = SAC update - 2B 2 (P + H)                the actor step's two primary networks and heads
    TD3 cycle   = 2B [ f (A' + 2C + 2 (3C - o d/4 - h n))     f critic steps (f = policy frequency, 2)
                     + (A' + C + h n + h + 2A' - 256 o) ]      one actor step through Q1
    TD3 update  = TD3 cycle / f
At paper sizes C = 8.53 M multiply-adds, so SAC is 43.81 GFLOP per update (10C 2B = 43.66 of it the critics) and
TD3 (batch 100) 14.53, both exactly FlopCounterMode's count. PEARL counts 918 GFLOP per step; MAML 14.3 GFLOP per task
at line-search step 1, about 573 for 40 tasks (counted for 2 and 4 tasks: linear in the tasks).

Peak. The fp32 matmul torch.mm of two --peak-size square matrices (2048: compute-bound), the fastest of
--peak-repeats, at the same thread count, in this process. Roofline time = FLOPs / peak; the table's last column is
time / roofline time (1 = the update runs at the matmul peak).

Timing. torch.set_num_threads(t) for each t in --threads; two warm-up matmuls and --warmup steps, then --repeats
rounds of (peak, one step), alternated. The table gives the median step time, the median peak and the median of
each step's ratio to the peak measured just before it. Alternating matters on a shared virtual CPU: on the 2-vCPU
machine of docs/speed.md the peak varied between about 150 and 370 GFLOP/s at 2 threads from one minute to the next.
The big matmul just before each step leaves the caches cold for it, as other work would in a training run.

Where the time goes. One more step runs under `OpTimer`, a TorchDispatchMode that times every aten op, forward and
backward: `matmul` is the time inside the matmul ops (and their GFLOP/s, the FLOPs over that time), `Polyak` inside
the target updates (`torch._foreach_lerp_` outside an optimizer step); `Adam` is the wall time of the optimizer steps
(torch.optim's global step hooks) in a further step without the timer, and `other` the timed median minus those
three: elementwise ops, the non-finite guards, autograd and Python overhead. `page faults` and `system ms` are the
minor page faults and the system CPU time of the process (getrusage) during the OpTimer step. A fault is a page of
fresh memory the allocator took from the OS, which the kernel zeroes on first touch; near zero faults means the
update's tensors reuse memory the allocator already holds. System time is the kernel's work for the faults plus, at 2
threads, for putting the second thread to sleep and waking it, so it bounds what allocations cost from above.
--profile also prints the top ops by time. Not torch.profiler: MAML's meta-update runs over a million ops at paper
size, and torch.profiler's event list for that takes minutes and gigabytes to build.

MLP path vs a baseline (only with --baseline-cmd). The project's command (--ours-cmd; default hyper_sac.py --critic
mlp on HalfCheetah-v4, 5000 random steps then 2000 SAC updates: --learning-starts 5000 --total-timesteps 7000, no
evaluation, no checkpoints) and the baseline command (e.g. CleanRL's sac_continuous_action.py with
--total-timesteps 7000, whose learning starts at 5000 by default) run as subprocesses in --pairs alternating pairs
(ours first in odd pairs, the baseline first in even ones), each timed as a whole process; it prints every time, both
medians and the ratio baseline / ours. Both run in --workdir (default: a new temporary directory, deleted
afterwards, which keeps their runs/ directories), so give the baseline's script as an absolute path.
"""

import collections
import contextlib
import dataclasses
import functools
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import resource
except ImportError:  # Windows
    resource = None
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
import tyro
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import grad_probe  # noqa: E402
import hyper_maml  # noqa: E402
import hyper_pearl  # noqa: E402
import hyper_sac  # noqa: E402
import hyper_td3  # noqa: E402

UpdateName = Literal["sac", "sac_reuse", "sac_mlp", "td3", "grad_probe", "pearl", "maml"]
UPDATES: tuple = ("sac", "sac_reuse", "sac_mlp", "td3", "grad_probe", "pearl", "maml")
OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah-v4
ACTOR_HIDDEN = 256  # the SAC and TD3 actors are 256-256 MLPs
MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.addbmm", "aten._addmm_activation"}


@dataclass
class Bench:
    only: tuple[UpdateName, ...] = UPDATES
    """updates to measure"""
    threads: tuple[int, ...] = (1, 2)
    """torch CPU thread counts, one table row per update and count"""
    repeats: int = 5
    """timed steps per row; the median is reported"""
    warmup: int = 1
    """untimed steps before them (the FLOP count's step also runs first, at the first thread count)"""
    hyper_embedding_dim: Optional[int] = None
    """primary network output width; None: the scripts' (1024)"""
    hyper_blocks: Optional[int] = None
    """residual blocks per stage; None: the scripts' (2)"""
    hyper_dynamic_hidden: Optional[int] = None
    """dynamic hidden layer width; None: the scripts' (256)"""
    batch_size: Optional[int] = None
    """minibatch (SAC, TD3, grad_probe) and transitions per task (PEARL); None: the scripts' (256, 100, 100, 256)"""
    pearl_meta_batch: Optional[int] = None
    """PEARL tasks per step; None: HalfCheetahVel's 16"""
    pearl_context: Optional[int] = None
    """PEARL context transitions per task; None: HalfCheetahVel's 100"""
    maml_meta_batch: Optional[int] = None
    """MAML tasks per meta-update; None: hyper_maml.py's 40"""
    maml_episodes: Optional[int] = None
    """MAML episodes per task, train and valid each; None: hyper_maml.py's 20"""
    maml_episode_length: int = hyper_maml.EPISODE_STEPS
    """steps of each synthetic MAML episode (the scripts' 200)"""
    peak_size: int = 2048
    """side of the square fp32 matmul that measures the peak"""
    peak_repeats: int = 3
    """timed matmuls per peak measurement, before each timed step; the fastest counts"""
    profile: bool = False
    """also print the top ops of each row's timed-op step"""
    baseline_cmd: Optional[str] = None
    """baseline command to time against --ours-cmd, e.g. "python /abs/cleanrl/sac_continuous_action.py ..." """
    ours_cmd: Optional[str] = None
    """the project's command; None: hyper_sac.py --critic mlp, 5000 random steps + 2000 updates, no eval"""
    pairs: int = 2
    """alternating (ours, baseline) pairs of the command comparison"""
    workdir: Optional[str] = None
    """working directory of both commands; None: a new temporary directory, deleted afterwards"""
    seed: int = 0
    """seed of the networks and the synthetic data"""


@dataclass
class Workload:
    """One update kind, ready to run: `step` is one timed unit of `updates_per_step` updates, `reset` runs before
    every step, untimed."""

    name: str
    what: str
    step: Callable[[], None]
    updates_per_step: int = 1
    reset: Callable[[], None] = lambda: None
    hand_flops: Optional[float] = None
    """per update, from the formula in the module docstring (SAC and TD3 only)"""
    notes: Callable[[], str] = lambda: ""
    """what to say about the counted step (MAML: its line search)"""


# --- hand FLOP formulas (module docstring) ---
def hyper_critic_macs(obs_dim: int, act_dim: int, embedding_dim: int, blocks: int, hidden: int) -> dict:
    """Multiply-adds per sample of one SA-Hyper critic forward: primary network, heads and dynamic network."""
    d = embedding_dim
    primary = (
        obs_dim * d // 4 + (d // 4) * (d // 2) + (d // 2) * d + 2 * blocks * ((d // 4) ** 2 + (d // 2) ** 2 + d**2)
    )
    heads = d * (hidden * act_dim + 2 * hidden) + d * (hidden + 2)
    dynamic = hidden * act_dim + hidden
    return {"primary": primary, "heads": heads, "dynamic": dynamic, "total": primary + heads + dynamic}


def sac_update_flops(obs_dim: int, act_dim: int, batch: int, embedding_dim: int, blocks: int, hidden: int,
                     reuse: bool = False) -> int:  # fmt: skip
    """Matmul FLOPs of one hyper_sac.py update with SA-Hyper critics (module docstring); `reuse`: with
    --reuse-critic-weights, whose actor loss runs only the two dynamic networks."""
    macs = hyper_critic_macs(obs_dim, act_dim, embedding_dim, blocks, hidden)
    c = macs["total"]
    a = ACTOR_HIDDEN * obs_dim + ACTOR_HIDDEN**2 + 2 * ACTOR_HIDDEN * act_dim
    target = a + 2 * c
    critic_step = 2 * (3 * c - obs_dim * embedding_dim // 4 - hidden * act_dim)
    actor_step = a + 2 * c + 2 * (hidden * act_dim + hidden) + 2 * a - ACTOR_HIDDEN * obs_dim
    if reuse:
        actor_step -= 2 * (macs["primary"] + macs["heads"])
    return 2 * batch * (target + critic_step + actor_step)


def td3_update_flops(obs_dim: int, act_dim: int, batch: int, embedding_dim: int, blocks: int, hidden: int,
                     policy_frequency: int) -> float:  # fmt: skip
    """Matmul FLOPs of one hyper_td3.py (or grad_probe.py) update, averaged over a policy-delay cycle."""
    c = hyper_critic_macs(obs_dim, act_dim, embedding_dim, blocks, hidden)["total"]
    a = ACTOR_HIDDEN * obs_dim + ACTOR_HIDDEN**2 + ACTOR_HIDDEN * act_dim
    critic_update = a + 2 * c + 2 * (3 * c - obs_dim * embedding_dim // 4 - hidden * act_dim)
    actor_step = a + c + hidden * act_dim + hidden + 2 * a - ACTOR_HIDDEN * obs_dim
    return 2 * batch * (policy_frequency * critic_update + actor_step) / policy_frequency


# --- the updates, built as the scripts build them ---
def with_sizes(args, bench: Bench, **fields):
    """The script's Args with the sizes the bench overrides (None keeps the script's default)."""
    sizes = {name: getattr(bench, name) for name in ("hyper_embedding_dim", "hyper_blocks", "hyper_dynamic_hidden")}
    changes = {name: value for name, value in {**sizes, **fields}.items() if value is not None}
    return dataclasses.replace(args, cuda=False, **changes)


def replay_batch(batch_size: int) -> list:
    """A synthetic minibatch in the order of ReplayBuffer.sample: obs, actions, rewards, next_obs, terminations."""
    obs, next_obs = torch.randn(batch_size, OBS_DIM), torch.randn(batch_size, OBS_DIM)
    actions = torch.rand(batch_size, ACT_DIM) * 2 - 1
    return [obs, actions, torch.randn(batch_size, 1), next_obs, torch.zeros(batch_size, 1)]


def sizes_text(args) -> str:
    return f"hyper {args.hyper_embedding_dim}/{args.hyper_blocks}/{args.hyper_dynamic_hidden}"


def build_sac(bench: Bench, reuse: bool = False, critic: str = "sa-hyper") -> Workload:
    flag = {"reuse_critic_weights": True} if reuse else {}  # not set otherwise: runs on revisions before the flag
    args = with_sizes(hyper_sac.Args(critic=critic), bench, batch_size=bench.batch_size, **flag)
    agent = hyper_sac.SAC(args, OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), None, "cpu")
    batch = replay_batch(args.batch_size)
    what = f"hyper_sac.SAC.update, critic {args.critic}, batch {args.batch_size}"
    if critic == "mlp":
        return Workload("sac_mlp", what, lambda: agent.update(*batch))
    hand = sac_update_flops(OBS_DIM, ACT_DIM, args.batch_size, args.hyper_embedding_dim, args.hyper_blocks,
                            args.hyper_dynamic_hidden, reuse)  # fmt: skip
    what += f", {sizes_text(args)}" + (", --reuse-critic-weights" if reuse else "")
    return Workload("sac_reuse" if reuse else "sac", what, lambda: agent.update(*batch), hand_flops=hand)


def build_td3_like(name: str, args, agent, entry: str) -> Workload:
    """TD3 of hyper_td3.py or grad_probe.py: one step is a full policy-delay cycle of updates."""
    batch, cycle = replay_batch(args.batch_size), args.policy_frequency

    def step():
        for _ in range(cycle):
            agent.update(*batch)

    hand = td3_update_flops(OBS_DIM, ACT_DIM, args.batch_size, args.hyper_embedding_dim, args.hyper_blocks,
                            args.hyper_dynamic_hidden, cycle)  # fmt: skip
    what = f"{entry}, critic sa-hyper, batch {args.batch_size}, {sizes_text(args)}, per update over a cycle of {cycle}"
    return Workload(name, what, step, updates_per_step=cycle, hand_flops=hand)


def build_td3(bench: Bench) -> Workload:
    args = with_sizes(hyper_td3.Args(), bench, batch_size=bench.batch_size)
    agent = hyper_td3.TD3(args, OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), None, "cpu")
    return build_td3_like("td3", args, agent, "hyper_td3.TD3.update")


def build_grad_probe(bench: Bench) -> Workload:
    args = with_sizes(grad_probe.Args(), bench, batch_size=bench.batch_size)
    agent = grad_probe.TD3(args, "sa-hyper", OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), None, "cpu")
    return build_td3_like("grad_probe", args, agent, "grad_probe.TD3.update")


def build_pearl(bench: Bench) -> Workload:
    args = with_sizes(hyper_pearl.Args(model="hyper"), bench, batch_size=bench.batch_size,
                      meta_batch=bench.pearl_meta_batch, embedding_batch_size=bench.pearl_context)  # fmt: skip
    tasks, n = hyper_pearl.schedule(args, "meta_batch"), args.batch_size
    context_size, width = hyper_pearl.schedule(args, "embedding_batch_size"), hyper_pearl.context_dim(OBS_DIM, ACT_DIM)
    init_context = 3.0 * torch.randn(args.hyper_init_samples, width)  # stands in for collected (s, a, r) rows
    learner = hyper_pearl.PEARL(args, hyper_pearl.make_agent(args, OBS_DIM, ACT_DIM, init_context))
    obs, next_obs = torch.randn(tasks, n, OBS_DIM), torch.randn(tasks, n, OBS_DIM)
    actions = torch.rand(tasks, n, ACT_DIM) * 2 - 1
    batch = hyper_pearl.Batch(obs, actions, torch.randn(tasks, n, 1), next_obs, torch.zeros(tasks, n, 1))
    context = torch.randn(tasks, context_size, width)
    what = (f"hyper_pearl.PEARL.update (train_step), {args.env_id}: {tasks} tasks x {n} transitions, "
            f"context {context_size}, {sizes_text(args)}")  # fmt: skip
    return Workload("pearl", what, lambda: learner.update(batch, context))


def synthetic_episodes(policy, context: torch.Tensor, n_episodes: int, length: int) -> hyper_maml.Episodes:
    """n_episodes full episodes of random states, with actions drawn from the policy at those states."""
    obs = torch.randn(n_episodes, length, OBS_DIM)
    with torch.no_grad():
        distribution = policy.distribution(obs, context)
        actions = distribution.loc + distribution.scale * torch.randn(distribution.loc.shape)
    return hyper_maml.Episodes(obs, actions, torch.randn(n_episodes, length), torch.ones(n_episodes, length))


def build_maml(bench: Bench) -> Workload:
    args = with_sizes(hyper_maml.Args(policy="hyper"), bench, meta_batch_size=bench.maml_meta_batch,
                      fast_batch_size=bench.maml_episodes)  # fmt: skip
    train_tasks, _ = hyper_maml.make_task_pool(args.env_id, args.seed, args.num_train_tasks, args.num_test_tasks)
    policy = hyper_maml.make_policy(args, OBS_DIM, ACT_DIM, hyper_maml.task_contexts(args.env_id, train_tasks))
    learner = hyper_maml.MAML(args, policy, hyper_maml.effective_fast_lr(args))
    draws = np.random.default_rng(bench.seed).integers(0, len(train_tasks), size=args.meta_batch_size)
    tasks = [train_tasks[i] for i in draws]
    contexts = hyper_maml.task_contexts(args.env_id, tasks)
    length = bench.maml_episode_length
    train = [synthetic_episodes(policy, c, args.fast_batch_size, length) for c in contexts]
    valid = [synthetic_episodes(policy, c, args.fast_batch_size, length) for c in contexts]
    advantages = [hyper_maml.episode_advantages(e, args.gamma, args.gae_lambda) for e in train]
    initial = {name: value.clone() for name, value in policy.state_dict().items()}
    last = {}

    def step():
        last.update(learner.update(tasks, train, advantages, valid))

    def notes() -> str:
        k = last.get("ls_steps")
        if k == -1:
            return "no step taken (the line search rejected every candidate); data-dependent, see the docstring"
        return f"line search accepted step {k}: {k + 1} candidate evaluations; data-dependent, see the docstring"

    what = (f"hyper_maml.MAML.update (TRPO, second-order), {args.env_id}: {args.meta_batch_size} tasks x "
            f"{args.fast_batch_size} episodes x {length} steps, train and valid, {sizes_text(args)}")  # fmt: skip
    return Workload("maml", what, step, reset=lambda: policy.load_state_dict(initial), notes=notes)


BUILDERS = {"sac": build_sac, "sac_reuse": functools.partial(build_sac, reuse=True),
            "sac_mlp": functools.partial(build_sac, critic="mlp"), "td3": build_td3, "grad_probe": build_grad_probe,
            "pearl": build_pearl, "maml": build_maml}  # fmt: skip


# --- measurements ---
def counted_flops(workload: Workload) -> float:
    """Matmul FLOPs per update of one step, counted by FlopCounterMode from the shapes of the ops that run."""
    workload.reset()
    with FlopCounterMode(display=False) as counter:
        workload.step()
    return counter.get_total_flops() / workload.updates_per_step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def roofline_ratio(seconds: list, peaks: list, flops: float) -> float:
    """Median over the steps of (step time) / (roofline time at the peak measured just before that step)."""
    return statistics.median(t / (flops / (p * 1e9)) for t, p in zip(seconds, peaks))


def interleaved_times(workload: Workload, bench: Bench) -> tuple[list, list]:
    """Seconds per update and matmul-peak GFLOP/s, one of each per repeat, measured alternately (peak, update, peak,
    update, ...) after --warmup steps: a shared or throttled CPU changes speed by tens of percent within a minute, and
    alternating lets each update be compared with a peak measured under the same conditions."""
    size = bench.peak_size
    a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    for _ in range(2):
        torch.mm(a, b, out=out)
    for _ in range(bench.warmup):
        workload.reset()
        workload.step()
    seconds, peaks = [], []
    for _ in range(bench.repeats):
        peak_seconds = min(timed(lambda: torch.mm(a, b, out=out)) for _ in range(bench.peak_repeats))
        peaks.append(2 * size**3 / peak_seconds / 1e9)
        workload.reset()
        seconds.append(timed(workload.step) / workload.updates_per_step)
    return seconds, peaks


class OpTimer(TorchDispatchMode):
    """Wall time and calls of every aten op that runs inside it, forward and backward, by op name (an op's own
    decomposition runs below the mode, so nothing is counted twice). `in_optimizer` is set by optimizer_steps."""

    def __init__(self):
        super().__init__()
        self.ms, self.calls = collections.Counter(), collections.Counter()
        self.polyak_ms, self.in_optimizer = 0.0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        ms, name = 1000 * (time.perf_counter() - start), str(func.overloadpacket)
        self.ms[name] += ms
        self.calls[name] += 1
        if name == "aten._foreach_lerp_" and not self.in_optimizer:  # Polyak; Adam's own lerps are Adam's
            self.polyak_ms += ms
        return out


@contextlib.contextmanager
def optimizer_steps(timer: Optional[OpTimer] = None):
    """Times every torch.optim step (global step hooks) into the yielded {"ms", "steps"}; flags `timer` meanwhile."""
    total, started = {"ms": 0.0, "steps": 0}, []

    def pre(optimizer, args, kwargs):
        started.append(time.perf_counter())
        if timer is not None:
            timer.in_optimizer = True

    def post(optimizer, args, kwargs):
        total["ms"] += 1000 * (time.perf_counter() - started.pop())
        total["steps"] += 1
        if timer is not None:
            timer.in_optimizer = False

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def kernel_work() -> tuple:
    """(minor page faults, system CPU seconds) of this process so far; nan where the OS does not report them."""
    if resource is None:
        return float("nan"), float("nan")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def time_breakdown(workload: Workload) -> tuple[dict, OpTimer]:
    """Per update: ms in matmuls, Adam and Polyak, and the minor page faults and system CPU ms of memory the
    allocator takes from the OS; with the op timer of the step that measured them. One step under OpTimer gives the
    matmul and Polyak times and the kernel's work; Adam's is its optimizer steps' wall time in a second step without
    the timer (whose per-op overhead would inflate Adam's many small ops)."""
    workload.reset()
    faults, system = kernel_work()
    with OpTimer() as timer, optimizer_steps(timer) as adam:
        workload.step()
    faults, system = (after - before for after, before in zip(kernel_work(), (faults, system)))
    if adam["steps"]:
        workload.reset()
        with optimizer_steps() as adam:
            workload.step()
    matmul = sum(ms for name, ms in timer.ms.items() if name in MATMUL_OPS)
    parts = {"matmul": matmul, "Adam": adam["ms"], "Polyak": timer.polyak_ms, "faults": faults, "system": 1000 * system}
    return {part: value / workload.updates_per_step for part, value in parts.items()}, timer


def print_top_ops(timer: OpTimer, updates: int, rows: int = 15) -> None:
    total = sum(timer.ms.values())
    calls = sum(timer.calls.values()) / updates
    print(f"op | calls per update | ms per update | share of the ops' time (total {total / updates:.1f} ms in "
          f"{calls:g} calls)")
    for name, ms in timer.ms.most_common(rows):
        print(f"{name} | {timer.calls[name] / updates:g} | {ms / updates:.2f} | {100 * ms / total:.1f}%")


# --- output ---
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_machine(bench: Bench) -> None:
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__} (BLAS {blas.group(1) if blas else 'unknown'}), Python {platform.python_version()}"
    )
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; torch's default threads {torch.get_num_threads()}; "
          f"measured at threads {' '.join(map(str, bench.threads))}; 1-min load average {load:.2f}")  # fmt: skip


def print_table(header: list, rows: list) -> None:
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))


def describe(workload: Workload, flops: float) -> str:
    line = f"{workload.name}: {workload.what}; {flops / 1e9:.4g} GFLOP counted by FlopCounterMode"
    if workload.hand_flops is not None:
        line += f", hand formula {workload.hand_flops / 1e9:.4g} (x{workload.hand_flops / flops:.4f})"
    return line + (f"; {workload.notes()}" if workload.notes() else "")


def measure_row(bench: Bench, workload: Workload, flops: float, threads: int) -> tuple[list, list]:
    """The roofline row and the breakdown row of one update at one thread count."""
    torch.set_num_threads(threads)
    seconds, peaks = interleaved_times(workload, bench)
    ms, peak, ratio = 1000 * statistics.median(seconds), statistics.median(peaks), roofline_ratio(seconds, peaks, flops)
    achieved = flops / (ms / 1000) / 1e9
    roofline = [f"{flops / 1e9:.4g}", f"{ms:.1f}", f"{achieved:.3g}", f"{peak:.1f}", f"{ratio:.2f}"]
    parts, timer = time_breakdown(workload)
    matmul_rate = flops / (parts["matmul"] / 1000) / 1e9 if parts["matmul"] else float("nan")
    other = ms - parts["matmul"] - parts["Adam"] - parts["Polyak"]
    breakdown = [f"{parts['matmul']:.2f}", f"{matmul_rate:.3g}", f"{parts['Adam']:.2f}", f"{parts['Polyak']:.2f}",
                 f"{other:.2f}", f"{parts['faults']:.0f}", f"{parts['system']:.2f}"]  # fmt: skip
    if bench.profile:
        print(f"\ntop ops of {workload.name} at threads={threads} (OpTimer, one step):")
        print_top_ops(timer, workload.updates_per_step)
        print()
    return roofline, breakdown


def measure_updates(bench: Bench) -> None:
    roofline, breakdown = [], []
    print("\nupdates (synthetic data, HalfCheetah shapes obs 17 / act 6; FLOPs are matmul FLOPs per update):")
    for name in bench.only:
        torch.manual_seed(bench.seed)
        workload = BUILDERS[name](bench)
        torch.set_num_threads(bench.threads[0])
        flops = counted_flops(workload)
        print(describe(workload, flops), flush=True)
        for threads in bench.threads:
            roofline_row, breakdown_row = measure_row(bench, workload, flops, threads)
            roofline.append([name, str(threads), *roofline_row])
            breakdown.append([name, str(threads), *breakdown_row])
        del workload
    print(f"\nroofline (peak: fp32 {bench.peak_size}^3 torch.mm before each step; time: median of {bench.repeats} "
          f"after {bench.warmup} warm-up steps; time / roofline: median over the steps of time / (FLOPs / the peak "
          f"before that step)):")  # fmt: skip
    print_table(["update", "threads", "GFLOP", "ms", "GFLOP/s", "peak GFLOP/s", "time / roofline"], roofline)
    print("\nwhere the time goes, per update (OpTimer and optimizer hooks; other = timed ms - matmul - Adam - Polyak; "
          "page faults and system ms: memory taken from the OS, in the OpTimer step):")  # fmt: skip
    print_table(["update", "threads", "matmul ms", "matmul GFLOP/s", "Adam ms", "Polyak ms", "other ms", "page faults",
                 "system ms"], breakdown)  # fmt: skip


def default_ours_cmd() -> list:
    script = os.path.abspath(os.path.join(ROOT, "hyper_sac.py"))
    return [sys.executable, script, "--critic", "mlp", "--env-id", "HalfCheetah-v4", "--learning-starts", "5000",
            "--total-timesteps", "7000", "--eval-freq", "0", "--checkpoint-freq", "0"]  # fmt: skip


def wall_seconds(argv: list, cwd: str) -> float:
    """Wall time of one run of argv as a subprocess; exits with its output's tail if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        sys.exit(f"error: {shlex.join(argv)} exited with {proc.returncode}:\n{tail}")
    return seconds


def compare_commands(ours: list, baseline: list, pairs: int, cwd: str) -> None:
    print(f"\nMLP path vs baseline, whole processes in {pairs} alternating pairs (cwd {cwd}):")
    print(f"  ours:     {shlex.join(ours)}\n  baseline: {shlex.join(baseline)}")
    seconds = {"ours": [], "baseline": []}
    for pair in range(pairs):
        order = [("ours", ours), ("baseline", baseline)]
        for label, argv in order if pair % 2 == 0 else order[::-1]:
            seconds[label].append(wall_seconds(argv, cwd))
            print(f"pair {pair + 1}: {label} {seconds[label][-1]:.1f} s", flush=True)
    ours_s, baseline_s = statistics.median(seconds["ours"]), statistics.median(seconds["baseline"])
    print(f"median: ours {ours_s:.1f} s, baseline {baseline_s:.1f} s; baseline / ours {baseline_s / ours_s:.2f}")


def main(bench: Bench) -> None:
    default_threads = torch.get_num_threads()
    try:
        print_machine(bench)
        if bench.only:
            measure_updates(bench)
        if bench.baseline_cmd:
            ours = shlex.split(bench.ours_cmd) if bench.ours_cmd else default_ours_cmd()
            if bench.workdir:
                compare_commands(ours, shlex.split(bench.baseline_cmd), bench.pairs, bench.workdir)
            else:
                with tempfile.TemporaryDirectory(prefix="roofline-") as workdir:
                    compare_commands(ours, shlex.split(bench.baseline_cmd), bench.pairs, workdir)
    finally:
        torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main(tyro.cli(Bench))

# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch>=2.2",
#     "gymnasium[mujoco]>=1.0",
#     "mujoco>=3.0",
#     "numpy>=1.25",
#     "tyro>=0.8.4",
#     "tensorboard>=2.10",
# ]
# ///
# docs and measured results: docs/hyper_maml.md
"""MAML with Vanilla, Context and Hyper policies on the paper's meta-RL task families.

Implements the MAML experiments of Sarafian, Keynan & Kraus, "Recomposing the Reinforcement Learning Building Blocks
with Hypernetworks" (ICML 2021), Sec. 4-5: MAML-TRPO (Finn, Abbeel & Levine, ICML 2017) meta-trains a Gaussian policy
that is either a plain MLP (Vanilla), an MLP fed the oracle task context (Context), or a hypernetwork whose dynamic
policy weights are generated from the context (Hyper, paper eq. 16), on Half-Cheetah-Fwd-Back, Ant-Fwd-Back,
Half-Cheetah-Vel, Ant-Vel and the out-of-distribution Half-Cheetah-Vel-Medium. Each meta-iteration draws 40 tasks,
samples 20 episodes per task, adapts with one policy-gradient step per task, samples 20 more episodes with the adapted
policy and takes one TRPO step on the meta-objective; the test tasks are scored before and after one adaptation step
(the paper: Hyper-MAML needs no adaptation step). The gradient-variance experiment of Fig. 5 runs with
--variance-iters (see `variance_experiment`).

    python hyper_maml.py --env-id HalfCheetahVel --policy hyper       # Hyper-MAML (default)
    python hyper_maml.py --env-id HalfCheetahVel --policy context     # Context-MAML
    python hyper_maml.py --env-id AntFwdBack --policy vanilla         # Vanilla-MAML
    python hyper_maml.py --policy context --variance-iters 1 100 200 400   # with the Fig. 5 experiment
    python hyper_maml.py --help                                       # every flag, with its meaning

Defaults are the authors' (github keynans/HypeRL, MAML/main.py): meta-batch 40, 20 episodes per task, 400
meta-iterations, gamma 0.95, GAE lambda 1, inner step 0.1 for the MLPs, max KL 0.01, 10 CG iterations, damping 1e-5, 20
line-search steps of 0.8, 100-100 MLPs, 100 train and 20 test tasks, seed 0. Hyper's inner step is not theirs: it
goes with the initialization (`default_fast_lr`).

Device: the policy, the inner steps and the meta-update run on CUDA when it is available (--cuda, the default;
--no-cuda for the CPU); the envs step on the CPU. Per lockstep step, the observations of all the batch's envs go to the
device in one copy and the actions come back in one; each sampling call's episodes go to the device once. The policy is
initialized on the CPU and every random draw of training comes from numpy generators, so a run draws the same tasks,
resets and noise on either device, and only floating-point rounding differs between a CPU and a GPU run. A CPU run is
bit-exact and resumes exactly; --cuda may differ on resume.

Where this differs from the authors' MAML code (HypeRL MAML/, a fork of pytorch-maml-rl v1):

- Truly second-order meta-gradient and Fisher (the graph runs through the inner step) unless --first-order; the
  authors' policies ignored the adapted params (MAML/maml_rl/policies/normal_mlp.py and hyper_normal_mlp.py read
  their own parameters; metalearner.py loads the adapted ones and restores them), so their meta-update was
  effectively first-order.
- Ant-Fwd-Back is a true forward/backward task (theirs rewarded running at +-1 rad); the contact cost is non-zero
  here (`TaskEnv`).
- Gymnasium v4 observations (HalfCheetah 17-D, without their appended torso x, y, z), MuJoCo 3+, explicit 200-step
  episodes, actions clipped to [-1, 1] before the env as their NormalizedActionWrapper did.
- Oracle context: velocities map [0, 3) onto [-1, 1) with a fixed affine map (theirs: min-max over the train pool onto
  [0, 1], so Vel-Medium's test goals land near 1.0-1.2); directions are +-1 in both.
- The inner step updates all parameters, as theirs (the whole primary network and heads for Hyper, and log-std).
- TRPO's KL is KL(pi_old || pi_new), the direction of the TRPO paper; theirs was KL(pi_new || pi_old) (same Fisher).
- Hyper initialization and inner step: --hyper-init pytorch (default) makes the generated weights and biases match
  PyTorch's default nn.Linear init on the train tasks' contexts, gains 1, and pairs it with an inner step of
  0.05 / embedding_norm^2 = 7.8e-4, at which one inner step moves Hyper 1.2-2.3x as far (in KL) as Vanilla's 0.1 moves
  Vanilla (`init_hypernetwork`, `default_fast_lr`). --hyper-init authors reproduces their constants with their inner
  step 5e-5, at which the inner step barely changes the policy (KL ~1e-6).
- Task pools come from our own seeded generator, so the goals differ from theirs.
- Test evaluation (their protocol: 20 stochastic episodes per test task, before and after one inner step) runs every
  --eval-freq meta-iterations after the update, not every iteration; its env resets and noise are the same at every
  evaluation, and it does not touch the training randomness.
- All env resets are seeded (their worker envs were not), so a run is reproducible and resumes exactly.

Where it differs from pytorch-maml-rl (tristandeleu, v1): all envs of a meta-batch step in lockstep in one process
with one batched policy call per step (instead of a pool of worker processes); the authors' values above (20
line-search steps instead of 15, inner step 0.1 instead of 0.5 for the MLPs, 400 meta-iterations instead of 200);
float32 observations; exact checkpoint/resume and a non-finite guard.
"""

import contextlib
import dataclasses
import hashlib
import os
import random
import shlex
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Optional, get_args

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call
from torch.utils.tensorboard import SummaryWriter

# Two known-harmless third-party warnings are silenced, nothing else: gymnasium's "-v4 is out of date" (v4 is kept
# on purpose, see README) and MuJoCo's C-level deprecation of `settotalmass`, still applied, in gymnasium's XML.
warnings.filterwarnings("ignore", r".*The environment \S+-v4 is out of date", DeprecationWarning, r"gymnasium\.")


def mujoco_warning(message: str) -> None:
    """MuJoCo's C-level warnings, printed as its default handler prints them, except the harmless one above."""
    if "'settotalmass' is deprecated" not in message:
        print(f"WARNING: {message}\n", file=sys.stderr, flush=True)


mujoco.set_mju_user_warning(mujoco_warning)

FamilyName = Literal["HalfCheetahFwdBack", "AntFwdBack", "HalfCheetahVel", "AntVel", "HalfCheetahVelMedium"]


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "hyper_maml"
    """the name of this experiment (part of the run name)"""
    seed: int = 0
    """seed of the task pools, the networks, task draws, env resets and action noise (the authors' default 0)"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True` (disable with --no-torch-deterministic)"""
    cuda: bool = True
    """use CUDA when it is available (disable with --no-cuda)"""
    num_threads: int = 0
    """torch CPU threads; 0 keeps torch's default (all cores)"""
    track: bool = False
    """track the run with Weights and Biases (mirrors TensorBoard; needs `pip install wandb`)"""
    wandb_project_name: str = "hyperl"
    """the W&B project name"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team); None uses your default entity"""
    eval_freq: int = 10
    """evaluate on the test tasks (pre and post adaptation) every this many meta-iterations and at the end (0: never)"""
    eval_tasks: Optional[int] = None
    """test tasks per evaluation, the first of the test pool; None uses all --num-test-tasks (the authors' 20)"""
    variance_iters: tuple[int, ...] = ()
    """meta-iterations at which to run the gradient-variance experiment (paper Fig. 5) first, e.g. 1 100 200 400"""
    variance_samples: int = 50
    """independent inner gradient steps per variance experiment (paper: 50)"""
    variance_tasks: int = 10
    """train tasks of the variance experiment, the first of the train pool"""
    progress_freq: int = 1
    """print a progress line (iteration, s/it, env steps/s, ETA, returns) every this many meta-iterations"""
    save_model: bool = False
    """save the final policy to runs/{run_name}/{exp_name}.cleanrl_model"""
    checkpoint_freq: int = 10
    """write a resumable runs/{run_name}/checkpoint.pt every this many meta-iterations and at the end (0: never)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue from; pass the same settings as the original run"""

    # --- algorithm (MAML-TRPO; the authors' defaults, keynans/HypeRL MAML/main.py) ---
    env_id: FamilyName = "HalfCheetahVel"
    """the task family"""
    num_batches: int = 400
    """meta-iterations (one TRPO meta-update each)"""
    meta_batch_size: int = 40
    """tasks per meta-iteration, drawn from the train pool with replacement"""
    fast_batch_size: int = 20
    """episodes per task, both before (train) and after (valid) the inner step"""
    num_train_tasks: int = 100
    """size of the fixed train task pool"""
    num_test_tasks: int = 20
    """size of the fixed test task pool"""
    gamma: float = 0.95
    """discount factor of the advantages and the linear baseline"""
    gae_lambda: float = 1.0
    """lambda of generalized advantage estimation (the authors' tau)"""
    fast_lr: Optional[float] = None
    """inner policy-gradient step; default 0.1 (MLPs), 0.05 / norm^2 (hyper, pytorch init), 5e-5 (hyper, authors)"""
    first_order: bool = False
    """first-order MAML: no graph through the inner step (the authors' code was effectively first-order)"""
    max_kl: float = 0.01
    """TRPO's bound on the mean KL of the meta-update"""
    cg_iters: int = 10
    """conjugate-gradient iterations of the TRPO step"""
    cg_damping: float = 1e-5
    """damping added to the Fisher-vector products"""
    ls_max_steps: int = 20
    """backtracking line-search steps of the TRPO step"""
    ls_backtrack_ratio: float = 0.8
    """step shrink factor per line-search step"""

    # --- model ---
    policy: Literal["vanilla", "context", "hyper"] = "hyper"
    """vanilla: MLP of the state; context: MLP of state and oracle context; hyper: hypernetwork of the context"""
    hidden_sizes: tuple[int, ...] = (100, 100)
    """hidden layers of the vanilla and context MLPs"""
    hyper_embedding_dim: int = 1024
    """width of the primary network's output embedding; its stages are dim/4, dim/2, dim (paper: 256, 512, 1024)"""
    hyper_blocks: int = 2
    """residual blocks per stage of the primary network (paper: 2)"""
    hyper_dynamic_hidden: int = 256
    """hidden units of the single hidden layer of the dynamic network (paper: 256)"""
    hyper_init: Literal["pytorch", "authors"] = "pytorch"
    """pytorch: generated weights and biases like nn.Linear's init on the train contexts, gains 1; authors: theirs"""
    hyper_embedding_norm: float = 8.0
    """--hyper-init pytorch: rms norm of the embedding on the train contexts; Hyper's default --fast-lr 0.05/norm^2"""


# Task families (paper Sec. 5.1)
#
# Each family is gymnasium's HalfCheetah-v4 or Ant-v4 (dt = 5 x 0.01 s = 0.05 s) under `TaskEnv`, a wrapper that
# clips the action, recomputes the reward for the current task, and ends episodes after 200 steps. Rewards, and where
# they differ from the authors' code (github keynans/HypeRL, MAML/maml_rl/envs/mujoco/), are in `TaskEnv`'s docstring;
# the task pools in `make_task_pool`'s; the oracle context of the Context and Hyper policies in `task_context`'s.
#
# Observations are gymnasium's, not the authors': HalfCheetah-v4 gives 17-D (qpos[1:], qvel), where the authors' code
# gave 20-D by appending the absolute torso com (x, y, z), so the x position was observable there and is not here;
# Ant-v4 gives 27-D (qpos[2:], qvel, no contact forces), the same layout as theirs. Ours are float64, theirs float32.

FAMILIES: tuple[str, ...] = get_args(FamilyName)
EPISODE_STEPS = 200  # maml-rl v1 registers its MuJoCo task envs with max_episode_steps=200
CHEETAH_CTRL_COST = 0.05  # 0.5 * 1e-1 in the authors' HalfCheetah envs
ANT_CTRL_COST = 0.005
ANT_CONTACT_COST = 0.5e-3
ANT_SURVIVE_REWARD = 0.05
ANT_VEL_BONUS = 1.0  # the "+ 1.0" inside AntVel's forward term
ANT_HEALTHY_Z = (0.2, 1.0)
CONTEXT_VELOCITIES = (0.0, 3.0)  # the velocity range that task_context maps onto [-1, 1), for every velocity family


@dataclass(frozen=True)
class FamilySpec:
    robot: Literal["HalfCheetah", "Ant"]
    goal: Literal["direction", "velocity"]
    train_velocities: tuple[float, float] = (0.0, 3.0)
    """[low, high) of the train pool's goal velocities (velocity families only)"""
    test_velocities: tuple[float, float] = (0.0, 3.0)
    """[low, high) of the test pool's goal velocities (velocity families only)"""


FAMILY_SPECS = {
    "HalfCheetahFwdBack": FamilySpec("HalfCheetah", "direction"),
    "AntFwdBack": FamilySpec("Ant", "direction"),
    "HalfCheetahVel": FamilySpec("HalfCheetah", "velocity"),
    "AntVel": FamilySpec("Ant", "velocity"),
    "HalfCheetahVelMedium": FamilySpec(
        "HalfCheetah", "velocity", train_velocities=(0.0, 2.5), test_velocities=(2.5, 3.0)
    ),
}


@dataclass(frozen=True)
class Task:
    goal: float
    """the direction d in {-1, +1} for the Fwd-Back families, the goal velocity v_goal (m/s) for the Vel families"""


def family_spec(family: str) -> FamilySpec:
    if family not in FAMILY_SPECS:
        fail(f"unknown task family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILY_SPECS[family]


def ant_is_healthy(qpos: np.ndarray, qvel: np.ndarray) -> bool:
    """The authors' (and Ant-v4's) alive test: a finite state and the torso z, qpos[2], within [0.2, 1.0]."""
    low, high = ANT_HEALTHY_Z
    return bool(np.isfinite(qpos).all() and np.isfinite(qvel).all() and low <= qpos[2] <= high)


class TaskEnv(gym.Wrapper):
    """One task family on its MuJoCo env; `set_task` switches the task (it applies from the next step on).

    With v the torso's x velocity over the step, a the action clipped to [-1, 1] and F = data.cfrc_ext after the step:

        HalfCheetahFwdBack          d * v - 0.05 * sum(a^2)                                  d in {-1, +1}
        HalfCheetahVel(Medium)      -|v - v_goal| - 0.05 * sum(a^2)
        AntFwdBack                  d * v - 0.005 * sum(a^2) - 0.5e-3 * sum(clip(F, -1, 1)^2) + 0.05
        AntVel                      (-|v - v_goal| + 1.0) - 0.005 * sum(a^2) - 0.5e-3 * sum(clip(F, -1, 1)^2) + 0.05

    v = (x_after - x_before) / dt, with x the rootx joint qpos[0] for HalfCheetah and the torso body's com x (xpos, as
    the authors' get_body_com("torso")) for Ant. HalfCheetah never terminates; Ant terminates when `ant_is_healthy`
    fails. Both are truncated after 200 steps. The action is clipped before it reaches the env, as MAML's
    NormalizedActionWrapper does, so the control cost is that of the clipped action.

    Where this differs from the authors' code:
    - AntFwdBack is a true forward/backward task (d * v_x, as the paper describes it and upstream maml-rl v1 had). The
      authors' AntDirEnv uses d = +-1 as an angle in radians, rewarding 0.540 v_x +- 0.841 v_y (running at +-57 deg);
      that bug is not inherited.
    - The contact term is tiny but non-zero here: gymnasium fills cfrc_ext after each step (mj_rnePostConstraint),
      while under the authors' mujoco-py 2.0 it was most likely always 0.
    - Physics is MuJoCo 3+, not 1.5/2.0; observations are gymnasium's (see the section comment above).
    """

    def __init__(self, env: gym.Env, family: str, task: Task):
        super().__init__(env)
        self.family = family
        self.family_spec = family_spec(family)
        self.set_task(task)

    def set_task(self, task: Task) -> None:
        if self.family_spec.goal == "direction" and task.goal not in (-1.0, 1.0):
            raise ValueError(f"{self.family} needs a direction goal of -1 or +1, got {task.goal}")
        if self.family_spec.goal == "velocity" and not np.isfinite(task.goal):
            raise ValueError(f"{self.family} needs a finite goal velocity, got {task.goal}")
        self.task = task

    def _x_position(self) -> float:
        data = self.env.unwrapped.data
        return float(data.body("torso").xpos[0] if self.family_spec.robot == "Ant" else data.qpos[0])

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        x_before = self._x_position()
        obs, _, _, truncated, _ = self.env.step(action)
        x_velocity = (self._x_position() - x_before) / self.env.unwrapped.dt
        goal = self.task.goal
        forward = goal * x_velocity if self.family_spec.goal == "direction" else -abs(x_velocity - goal)
        if self.family_spec.robot == "HalfCheetah":
            ctrl, contact, survive, terminated = CHEETAH_CTRL_COST * np.sum(action**2), 0.0, 0.0, False
        else:
            data = self.env.unwrapped.data
            forward += ANT_VEL_BONUS if self.family_spec.goal == "velocity" else 0.0
            ctrl = ANT_CTRL_COST * np.sum(action**2)
            contact = ANT_CONTACT_COST * np.sum(np.clip(data.cfrc_ext, -1.0, 1.0) ** 2)
            survive, terminated = ANT_SURVIVE_REWARD, not ant_is_healthy(data.qpos, data.qvel)
        reward = float(forward - ctrl - contact + survive)
        info = {"x_velocity": x_velocity, "reward_forward": float(forward), "reward_ctrl": -float(ctrl),
                "reward_contact": -float(contact), "reward_survive": survive}  # fmt: skip
        return obs, reward, terminated, truncated, info


def make_task_env(family: str, task: Task) -> TaskEnv:
    """The family's env, 200-step episodes, set to `task`."""
    env = gym.make(f"{family_spec(family).robot}-v4", max_episode_steps=EPISODE_STEPS)
    return TaskEnv(env, family, task)


def make_task_pool(family: str, seed: int, n_train: int = 100, n_test: int = 20) -> tuple[list[Task], list[Task]]:
    """The fixed train and test tasks of a family (the authors' MAML pools: 100 train, 20 test).

    Direction families draw d = +-1 with equal probability for both pools (the authors' test directions are the same
    two tasks). Velocity families draw v_goal uniformly from the family's train and test ranges: [0, 3) for both pools,
    except HalfCheetahVelMedium, whose train goals lie in [0, 2.5) and test goals in [2.5, 3.0), out of distribution.
    Both pools come from np.random.default_rng(seed), each from its own spawned stream, so the test tasks do not depend
    on n_train. The authors drew from the env's seeded RNG instead, so the goals themselves differ from theirs.
    """
    spec = family_spec(family)
    if n_train < 0 or n_test < 0:
        fail(f"task pool sizes must be non-negative, got n_train={n_train}, n_test={n_test}")
    pools = []
    for rng, n, (low, high) in zip(np.random.default_rng(seed).spawn(2), (n_train, n_test),
                                   (spec.train_velocities, spec.test_velocities)):  # fmt: skip
        goals = 2.0 * rng.integers(0, 2, size=n) - 1.0 if spec.goal == "direction" else rng.uniform(low, high, size=n)
        pools.append([Task(float(goal)) for goal in goals])
    return pools[0], pools[1]


def task_context(family: str, task: Task) -> np.ndarray:
    """The oracle task context of the Context and Hyper policies, a float32 vector of size 1.

    Direction families: d itself, -1 or +1. Velocity families: 2 * v_goal / 3 - 1, the affine map of [0, 3) (the
    train range of HalfCheetahVel and AntVel) onto [-1, 1). HalfCheetahVelMedium uses the same map, so its train goals
    [0, 2.5) give contexts in [-1, 2/3) and its out-of-distribution test goals [2.5, 3.0) give [2/3, 1): contexts the
    policies never saw in training.
    """
    if family_spec(family).goal == "direction":
        return np.array([task.goal], dtype=np.float32)
    low, high = CONTEXT_VELOCITIES
    return np.array([2.0 * (task.goal - low) / (high - low) - 1.0], dtype=np.float32)


# Policies (paper Sec. 4, eq. 16; keynans/HypeRL, MAML/maml_rl/policies/normal_mlp.py and hyper_normal_mlp.py)
#
# All three are Gaussian, pi(a|s, c) = N(mu(s, c), diag(sigma^2)), with a state- and task-independent log-std parameter
# (init 0, clamped below at log 1e-6, the authors' NormalMLPPolicy and Hyper_Policy). Each is used in two stages, the
# paper's view of a context-conditioned policy: `policy(context)` returns the task's policy over states, a `TaskPolicy`,
# and that maps observations to the action distribution. The Hyper policy runs its primary network in the first stage,
# so its dynamic weights are computed once per task (or once per batch of tasks), never per state; a sampler that steps
# many task envs in lockstep calls `policy.condition(contexts)` once and the returned TaskPolicy at every step.
#
# Shapes: context (*tasks, context_dim); obs (*tasks, *states, obs_dim), with the same leading task dims. One task:
# context (1,) and obs (T, obs_dim) or (N, T, obs_dim). A meta-batch in lockstep: context (B, 1), obs (B, E, obs_dim).
#
# Explicit parameters: `condition`, `distribution` and `log_prob` take `params`, a dict name -> tensor in the naming of
# `named_parameters()` (missing names fall back to the module's own). They run `policy(context)` under
# torch.func.functional_call, and every forward reads its parameters there and binds them into the TaskPolicy it
# returns, so MAML's adapted parameters theta' = theta - alpha grad L keep their graph to theta (second-order MAML).
# A TaskPolicy's mean is always functools.partial(pure function, *tensors); `stack_task_policies` relies on it to run
# tasks conditioned on different parameters (each task's adapted theta'_i) in one vmapped call.

LOG_STD_MIN = float(np.log(1e-6))


@dataclass(frozen=True)
class TaskPolicy:
    """pi(.|s, c) for fixed tasks c: `mean` maps obs (*tasks, *states, obs_dim) to (*tasks, *states, act_dim)."""

    mean: Callable[[torch.Tensor], torch.Tensor]
    std: torch.Tensor

    def __call__(self, obs: torch.Tensor) -> Normal:
        # no argument validation: a NaN candidate in TRPO's line search must be rejected there, not raise here
        return Normal(self.mean(obs), self.std, validate_args=False)


class GaussianPolicy(nn.Module):
    """The interface MAML uses. Subclasses implement forward(context) -> TaskPolicy, reading every parameter they
    need inside forward (so that functional_call's explicit parameters are the ones bound into the TaskPolicy)."""

    def __init__(self, act_dim: int):
        super().__init__()
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def std(self) -> torch.Tensor:
        return self.log_std.clamp(min=LOG_STD_MIN).exp()

    def condition(self, context: torch.Tensor, params: Optional[dict] = None) -> TaskPolicy:
        return self(context) if params is None else functional_call(self, params, (context,))

    def distribution(self, obs: torch.Tensor, context: torch.Tensor, params: Optional[dict] = None) -> Normal:
        return self.condition(context, params)(obs)

    def log_prob(self, obs, actions, context, params: Optional[dict] = None) -> torch.Tensor:
        """log pi(a|s, c), summed over the action dimensions: shape obs.shape[:-1]."""
        return self.distribution(obs, context, params).log_prob(actions).sum(-1)


def mlp_forward(layers, x):
    """Linear-ReLU-...-Linear with the given (weight, bias) pairs."""
    for i, (weight, bias) in enumerate(layers):
        x = F.linear(x, weight, bias)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x


class VanillaPolicy(GaussianPolicy):
    """Vanilla-MAML: mu(s) = MLP(s), 100-100 ReLU, xavier-uniform weights, zero biases (authors' NormalMLPPolicy).
    The context is ignored."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple = (100, 100)):
        super().__init__(act_dim)
        sizes = (obs_dim, *hidden, act_dim)
        self.fcs = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        for fc in self.fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, context: torch.Tensor) -> TaskPolicy:
        layers = [(fc.weight, fc.bias) for fc in self.fcs]
        return TaskPolicy(partial(mlp_forward, layers), self.std())


class ContextPolicy(VanillaPolicy):
    """Context-MAML: mu(s, c) = MLP(concat(s, c)), the Vanilla MLP with the oracle context appended to the state."""

    def __init__(self, obs_dim: int, act_dim: int, context_dim: int = 1, hidden: tuple = (100, 100)):
        super().__init__(obs_dim + context_dim, act_dim, hidden)

    def forward(self, context: torch.Tensor) -> TaskPolicy:
        layers = [(fc.weight, fc.bias) for fc in self.fcs]
        return TaskPolicy(partial(context_mlp_forward, layers, context), self.std())


def context_mlp_forward(layers, context, obs):
    """mlp_forward on concat(s, c), with each task's context c (*tasks, context_dim) repeated over its states."""
    state_dims = (1,) * (obs.dim() - context.dim())
    per_state = context.reshape(*context.shape[:-1], *state_dims, context.shape[-1])
    return mlp_forward(layers, torch.cat([obs, per_state.expand(*obs.shape[:-1], -1)], -1))


class ResBlock(nn.Module):
    """Pre-activation residual block x + W2 relu(W1 relu(x)) (paper Sec. 2; no normalization layers)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


class PrimaryNetwork(nn.Module):
    """Maps the meta variable to an embedding e(z): Linear(z, d/4), blocks, Linear(d/4, d/2), blocks,
    Linear(d/2, d), blocks; the raw residual stream, no final activation (paper Fig. 1, d = 1024)."""

    def __init__(self, meta_dim: int, embedding_dim: int, blocks: int):
        super().__init__()
        if embedding_dim < 4 or embedding_dim % 4:
            raise ValueError(f"hyper embedding dim must be a positive multiple of 4, got {embedding_dim}")
        layers, width_in = [], meta_dim
        for width in (embedding_dim // 4, embedding_dim // 2, embedding_dim):
            layers.append(nn.Linear(width_in, width))
            layers.extend(ResBlock(width) for _ in range(blocks))
            width_in = width
        self.net = nn.Sequential(*layers)
        self.embedding_dim = embedding_dim

    def forward(self, meta):
        return self.net(meta)


class DynamicLayerHeads(nn.Module):
    """Three parallel linear heads of the embedding that give one dynamic layer's weight W(z) (out x in), bias b(z)
    and gain g(z) (paper Sec. 2)."""

    def __init__(self, embedding_dim: int, fan_in: int, fan_out: int):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.weight = nn.Linear(embedding_dim, fan_out * fan_in)
        self.bias = nn.Linear(embedding_dim, fan_out)
        self.gain = nn.Linear(embedding_dim, fan_out)

    def forward(self, e):
        return self.weight(e).view(*e.shape[:-1], self.fan_out, self.fan_in), self.bias(e), self.gain(e)


def dynamic_forward(layers, base):
    """The dynamic network (paper eq. 1): x_{l+1} = relu((1 + g_l) * (W_l x_l) + b_l), no non-linearity after the last
    layer. `layers` is a list of (W, b, g) of shapes (*tasks, out, in), (*tasks, out), (*tasks, out); base is
    (*tasks, *states, in): each task's weights are applied to all of that task's states."""
    tasks = layers[0][0].shape[:-2]
    if base.shape[: len(tasks)] != tasks:
        raise ValueError(f"states of shape {tuple(base.shape)} do not start with the task dims {tuple(tasks)}")
    x = base.reshape(tasks.numel(), -1, base.shape[-1])
    for i, (weight, bias, gain) in enumerate(layers):
        weight = weight.reshape(-1, *weight.shape[-2:])
        bias, gain = (v.reshape(-1, 1, v.shape[-1]) for v in (bias, gain))
        x = (1 + gain) * torch.bmm(x, weight.transpose(1, 2)) + bias
        if i < len(layers) - 1:
            x = F.relu(x)
    return x.reshape(*base.shape[:-1], -1)


class HyperPolicy(GaussianPolicy):
    """Hyper-MAML (paper eq. 16): pi(a|s, c) = N(f_{theta_w(c)}(s), sigma^2). Meta variable = the oracle context c,
    base variable = the state s. The primary network maps c to an embedding, the heads turn it into the weights, biases
    and gains of a dynamic network over the state with one hidden layer (256, ReLU) whose linear output is the mean.
    sigma is a free parameter, not generated (as the authors' Hyper_Policy). Initialize with `init_hypernetwork`."""

    def __init__(self, obs_dim: int, act_dim: int, context_dim: int = 1, embedding_dim: int = 1024, blocks: int = 2,
                 dynamic_hidden: int = 256):  # fmt: skip
        super().__init__(act_dim)
        self.primary = PrimaryNetwork(context_dim, embedding_dim, blocks)
        self.heads = nn.ModuleList([DynamicLayerHeads(embedding_dim, obs_dim, dynamic_hidden),
                                    DynamicLayerHeads(embedding_dim, dynamic_hidden, act_dim)])  # fmt: skip

    def forward(self, context: torch.Tensor) -> TaskPolicy:
        e = self.primary(context)  # once per task: the dynamic network below is shared by all of the task's states
        return TaskPolicy(partial(dynamic_forward, [head(e) for head in self.heads]), self.std())


def init_hypernetwork(policy: HyperPolicy, scheme: Literal["pytorch", "authors"], meta_samples: torch.Tensor,
                      embedding_norm: float = 8.0) -> None:  # fmt: skip
    """Initialize the primary network and heads (log_std keeps 0).

    pytorch (default). The paper (Sec. 5.2) initializes the primary network so that "the initial dynamic weights
    distribution resembles, on average, Kaiming-uniform". We take that to be PyTorch's default nn.Linear init,
    U(+-1/sqrt(n)) for weights AND biases (n = fan-in), and match it on average over `meta_samples`, the oracle contexts
    of the train task pool (for a direction family that is +-1 only, in the pool's proportions):
    1. Primary layers keep PyTorch's default init, biases included. With zero biases every layer would be positively
       homogeneous, so e(c) = |c| e(sign c) for a 1-D context: all velocity tasks on one side of c = 0 would get one
       dynamic network up to scale, and v_goal = 1.5 (c = 0) the all-zero network. With the biases, e(c) is close to
       e_0 + c e_1 with e_0 and e_1 of similar size: tasks get distinct networks, forward and backward nearly
       unrelated ones. Then the last stage is rescaled so that the embedding has root-mean-square norm
       `embedding_norm` over the samples: scaling a ReLU stage's input projection and every bias in it by k > 0
       scales its output by exactly k.
    2. Weight and bias heads: weights U(+-h), biases 0. A generated weight is W_ij = sum_k H_ijk e_k, so over the
       contexts E[W_ij^2] = (h^2 / 3) E|e|^2, and h = 1 / (sqrt(n) * embedding_norm) gives 1 / (3n), the variance of
       U(+-1/sqrt(n)). The dynamic network then starts like a 1-hidden-layer MLP with PyTorch's init; on HalfCheetah
       states its mean |mu| is about 0.7x the Vanilla policy's (xavier weights, zero biases, 100-100), where the zero-
       bias Kaiming init gave 3x and the authors' constants 0.1x.
    3. Gain heads start at zero: every gain 1 + g(c) starts at exactly 1.
    The embedding norm also sets the inner step: a plain gradient step of size alpha on the weight head moves the
    generated weights by alpha |e|^2 times their own gradient (`default_fast_lr`).

    authors: the constants of the authors' Hyper_Policy (keynans/HypeRL, MAML/maml_rl/policies/hyper_normal_mlp.py):
    primary weights U(+-1/(2 sqrt(fan_in))) with PyTorch's default biases, every head weight U(+-0.05) (first layer) or
    U(+-0.008) (output layer), head biases 0.
    """
    with torch.no_grad():
        if scheme == "authors":
            for module in policy.primary.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / (2.0 * np.sqrt(module.in_features))
                    nn.init.uniform_(module.weight, -bound, bound)  # the bias keeps PyTorch's default
            for head, bound in zip(policy.heads, (0.05, 0.008)):
                for fc in (head.weight, head.bias, head.gain):
                    nn.init.uniform_(fc.weight, -bound, bound)
                    nn.init.zeros_(fc.bias)
            return
        if scheme != "pytorch":
            raise ValueError(f"unknown hyper init scheme {scheme!r}; choose pytorch or authors")
        for module in policy.primary.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        scale = embedding_norm / policy.primary(meta_samples).pow(2).sum(-1).mean().sqrt().item()
        layers = list(policy.primary.net)
        last_stage = layers[max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)) :]
        last_stage[0].weight.mul_(scale)
        for module in (m for layer in last_stage for m in layer.modules()):
            if isinstance(module, nn.Linear):
                module.bias.mul_(scale)
        for head in policy.heads:
            bound = 1.0 / (np.sqrt(head.fan_in) * embedding_norm)
            for fc in (head.weight, head.bias):
                nn.init.uniform_(fc.weight, -bound, bound)
            nn.init.zeros_(head.gain.weight)
            for fc in (head.weight, head.bias, head.gain):
                nn.init.zeros_(fc.bias)


MLP_FAST_LR = 0.1  # the authors' fast-lr of Vanilla and Context (keynans/HypeRL, MAML/main.py)
AUTHORS_HYPER_FAST_LR = 5e-5  # the authors' fast-hyper-lr, tuned with their Hyper_Policy constants
HYPER_GENERATED_STEP = 0.05  # fast_lr * |e|^2 for --hyper-init pytorch, see default_fast_lr


def default_fast_lr(policy: str, hyper_init: str = "pytorch", embedding_norm: float = 8.0) -> float:
    """The inner step size when --fast-lr is not given.

    Vanilla and Context: the authors' 0.1. Hyper with --hyper-init pytorch: 0.05 / embedding_norm^2 (7.8e-4 at the
    default norm 8). The inner step is plain gradient descent on all parameters, and its step on a weight head H moves
    the generated weights W = H e by -alpha (dL/dW e^T) e = -alpha |e|^2 dL/dW: the dynamic network takes a gradient
    step of its own of size alpha |e|^2 where an MLP takes alpha. The heads carry nearly all of the step (the primary
    network's share of the inner-step KL is about 1% at norm 8), so alpha |e|^2 = 0.05 fixes it whatever the norm.
    0.05 rather than Vanilla's 0.1 because, measured at init on HalfCheetah, alpha |e|^2 = 0.1 moves Hyper about 5x as
    far in KL(pre || post) as fast_lr 0.1 moves Vanilla, and 0.05 1.2-2.3x as far (docs/hyper_maml.md,
    adaptation/inner_kl).

    Hyper with --hyper-init authors: their 5e-5. Their constants give an embedding of rms norm about 2 on these
    contexts, so alpha |e|^2 is about 2e-4 and one inner step barely moves the policy (KL about 1e-6).
    """
    if policy != "hyper":
        return MLP_FAST_LR
    return AUTHORS_HYPER_FAST_LR if hyper_init == "authors" else HYPER_GENERATED_STEP / embedding_norm**2


def effective_fast_lr(args: Args) -> float:
    return args.fast_lr if args.fast_lr is not None else default_fast_lr(args.policy, args.hyper_init,
                                                                         args.hyper_embedding_norm)  # fmt: skip


def make_policy(args: Args, obs_dim: int, act_dim: int, train_contexts: torch.Tensor) -> GaussianPolicy:
    if args.policy == "vanilla":
        return VanillaPolicy(obs_dim, act_dim, args.hidden_sizes)
    if args.policy == "context":
        return ContextPolicy(obs_dim, act_dim, train_contexts.shape[-1], args.hidden_sizes)
    policy = HyperPolicy(obs_dim, act_dim, train_contexts.shape[-1], args.hyper_embedding_dim, args.hyper_blocks,
                         args.hyper_dynamic_hidden)  # fmt: skip
    init_hypernetwork(policy, args.hyper_init, train_contexts, args.hyper_embedding_norm)
    return policy


# MAML-TRPO building blocks (Finn, Abbeel & Levine 2017, Sec. 3.2 and 5.3; Schulman et al. 2015; keynans/HypeRL,
# MAML/maml_rl/metalearner.py)
#
# One meta-iteration: for each task of the meta-batch, adapt theta with one policy-gradient step on its train episodes
# (eq. 1 of MAML: theta'_i = theta - alpha grad L_i(theta)); then one TRPO step on theta for the mean over tasks of the
# surrogate loss of theta'_i(theta) on the task's valid episodes, under a mean-KL trust region. The graph runs through
# the inner step, so the meta-gradient and the Fisher are second-order (the authors' code silently made them first-
# order, see the module docstring); first_order=True gives FOMAML. All tensors of one task: N episodes padded to T
# steps.

BASELINE_REG = 1e-5  # ridge coefficient of the authors' LinearFeatureBaseline
BASELINE_REG_TRIES = 10  # multiply it by 10 while the regularized Gram matrix is numerically not positive definite


@dataclass
class Episodes:
    """N episodes of one task padded to T steps; mask is 1 at valid steps and 0 after an early termination.
    Padding must be finite (zeros): masked steps are multiplied by 0, not skipped."""

    obs: torch.Tensor  # (N, T, obs_dim)
    actions: torch.Tensor  # (N, T, act_dim)
    rewards: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T)


@dataclass
class MetaTask:
    """One task of the meta-batch: its oracle context, the episodes the inner step adapts on (train) and those of the
    adapted policy that the meta-update evaluates (valid), each with its advantages (`episode_advantages`)."""

    context: torch.Tensor  # (context_dim,)
    train: Episodes
    train_advantages: torch.Tensor
    valid: Episodes
    valid_advantages: torch.Tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_k gamma^k r_{t+k} within each episode (N, T); 0 at padded steps."""
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def linear_feature_baseline(obs, rewards, mask, gamma: float) -> torch.Tensor:
    """Value predictions (N, T) of the authors' LinearFeatureBaseline, fit to this task's episodes: ridge regression
    of the discounted returns on the features [s, s^2, t/100, (t/100)^2, (t/100)^3, 1] (Duan et al. 2016's linear
    baseline), w = (X^T X + reg I)^-1 X^T R with reg 1e-5, raised tenfold while the Cholesky solve fails. Padded steps
    have zero features and zero returns, so they do not affect the fit. Solved in float64."""
    n, t = rewards.shape
    obs64, mask64 = obs.double(), mask.double()
    time = (torch.arange(t, dtype=torch.float64, device=obs.device) / 100.0).view(1, t, 1).expand(n, t, 1)
    features = torch.cat([obs64, obs64**2, time, time**2, time**3, torch.ones_like(time)], -1) * mask64[..., None]
    x = features.reshape(n * t, -1)
    y = discounted_returns(rewards.double(), mask64, gamma).reshape(-1)
    gram, target, reg = x.T @ x, x.T @ y, BASELINE_REG
    eye = torch.eye(len(gram), dtype=torch.float64, device=x.device)
    for _ in range(BASELINE_REG_TRIES):
        cholesky, info = torch.linalg.cholesky_ex(gram + reg * eye)
        coefficients = torch.cholesky_solve(target[:, None], cholesky)[:, 0]  # garbage if info != 0, then unused
        if ((info == 0) & torch.isfinite(coefficients).all()).item():  # one host sync: retrying is a Python decision
            return (features @ coefficients).to(rewards.dtype)
        reg *= 10.0
    raise RuntimeError(f"cannot fit the linear baseline (ridge up to {reg / 10:g}); are the observations finite?")


def gae_advantages(rewards, values, mask, gamma: float = 0.95, lam: float = 1.0, normalize: bool = True):
    """Generalized advantage estimates (Schulman et al. 2016, eq. 16), (N, T): A_t = sum_k (gamma lam)^k delta_{t+k},
    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after an episode's last valid step (the authors bootstrap nothing
    at the 200-step limit either). With lam = 1, A_t = R_t - V_t. normalize: (A - mean) / (std + 1e-8) with the mean
    and std over valid steps, then 0 at padded steps (the authors' weighted_normalize)."""
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = (rewards + gamma * next_values - values) * mask
    advantages, running = torch.zeros_like(deltas), torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    if not normalize:
        return advantages
    mean = masked_mean(advantages, mask)
    std = masked_mean((advantages - mean) ** 2, mask).sqrt()
    return (advantages - mean) / (std + 1e-8) * mask


def episode_advantages(episodes: Episodes, gamma: float = 0.95, lam: float = 1.0) -> torch.Tensor:
    """Normalized GAE with the linear baseline fit to the same episodes, as the authors' adapt() does."""
    values = linear_feature_baseline(episodes.obs, episodes.rewards, episodes.mask, gamma)
    return gae_advantages(episodes.rewards, values, episodes.mask, gamma, lam)


def inner_loss(policy: GaussianPolicy, params: Optional[dict], episodes: Episodes, context, advantages):
    """The REINFORCE loss of the inner step (MAML Sec. 3.2): -mean over valid steps of log pi(a|s, c) * A."""
    log_probs = policy.log_prob(episodes.obs, episodes.actions, context, params)
    return -masked_mean(log_probs * advantages, episodes.mask)


def adapt(policy: GaussianPolicy, params: Optional[dict], episodes: Episodes, context, advantages, step_size: float,
          first_order: bool) -> dict:  # fmt: skip
    """theta' = theta - alpha grad_theta L_inner(theta) for ALL parameters (MAML eq. 1). Second order (default): the
    inner gradient keeps its graph (create_graph), so d theta'/d theta = I - alpha Hessian reaches the meta-gradient.
    first_order: the inner gradient is a constant, d theta'/d theta = I (FOMAML). params None: the policy's own.
    Also works under torch.no_grad() and for params that do not require grad (evaluation on test tasks, line-search
    candidates); then no second-order graph is built, since nothing can differentiate through it."""
    params = dict(policy.named_parameters()) if params is None else params
    # the second-order graph is only worth building if someone can differentiate w.r.t. the given params
    create_graph = not first_order and torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
    with torch.enable_grad():
        params = {name: p if p.requires_grad else p.detach().requires_grad_() for name, p in params.items()}
        loss = inner_loss(policy, params, episodes, context, advantages)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, materialize_grads=True)
        return {name: p - step_size * g for (name, p), g in zip(params.items(), grads)}


def surrogate_loss(policy: GaussianPolicy, adapted_params: dict, episodes: Episodes, context, advantages,
                   old_log_probs) -> torch.Tensor:  # fmt: skip
    """TRPO's surrogate (Schulman et al. 2015, eq. 14), to minimize: -mean over valid steps of
    exp(log pi_theta'(a|s) - log pi_old(a|s)) * A."""
    log_probs = policy.log_prob(episodes.obs, episodes.actions, context, adapted_params)
    return -masked_mean(torch.exp(log_probs - old_log_probs) * advantages, episodes.mask)


def mean_kl(policy: GaussianPolicy, adapted_params: dict, episodes: Episodes, context, old_distribution: Normal):
    """KL(pi_old || pi_theta') over the action dims, averaged over valid steps: the direction of TRPO's constraint
    (Schulman et al. 2015, eq. 12). Its Hessian at theta' = theta_old is the Fisher in either direction; the authors
    (maml-rl) used KL(pi_theta' || pi_old), which differs only at third order in the step."""
    kl = kl_divergence(old_distribution, policy.distribution(episodes.obs, context, adapted_params)).sum(-1)
    return masked_mean(kl, episodes.mask)


def meta_objective(policy: GaussianPolicy, params: dict, tasks: list[MetaTask], step_size: float, first_order: bool):
    """The meta-batch closure TRPO works on: theta -> (surrogate, kl), both means over tasks, where each task adapts
    theta on its train episodes and is scored on its valid episodes. pi_old is the adapted policy at `params` (the
    current theta), fixed here: surrogate(params) = -mean A, kl(params) = 0."""
    olds = []
    for task in tasks:
        adapted = adapt(policy, params, task.train, task.context, task.train_advantages, step_size, first_order=True)
        with torch.no_grad():
            olds.append(policy.distribution(task.valid.obs, task.context, adapted))

    def objective(theta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        surrogates, kls = [], []
        for task, old in zip(tasks, olds):
            adapted = adapt(policy, theta, task.train, task.context, task.train_advantages, step_size, first_order)
            old_log_probs = old.log_prob(task.valid.actions).sum(-1)
            surrogates.append(
                surrogate_loss(policy, adapted, task.valid, task.context, task.valid_advantages, old_log_probs)
            )
            kls.append(mean_kl(policy, adapted, task.valid, task.context, old))
        return torch.stack(surrogates).mean(), torch.stack(kls).mean()

    return objective


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def conjugate_gradient(fvp: Callable, b: torch.Tensor, iters: int = 10, residual_tol: float = 1e-10) -> torch.Tensor:
    """Solves F x = b for SPD F given only x -> F x (Hestenes-Stiefel; TRPO App. C), from x = 0; stops once the
    squared residual is below residual_tol."""
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    r_dot_r = r @ r
    for _ in range(iters):
        if r_dot_r < residual_tol:
            break
        f_p = fvp(p)
        alpha = r_dot_r / (p @ f_p)
        x, r = x + alpha * p, r - alpha * f_p
        new_r_dot_r = r @ r
        p, r_dot_r = r + (new_r_dot_r / r_dot_r) * p, new_r_dot_r
    return x


def fisher_vector_product(kl: torch.Tensor, params: dict, damping: float = 1e-5) -> Callable:
    """v -> (H + damping I) v, H the Hessian of the mean KL w.r.t. params (at theta_old, the Fisher; TRPO App. C),
    by double backward. `kl` must be computed from `params`; its first gradient is built once and every conjugate-
    gradient iteration differentiates it again."""
    grads = torch.autograd.grad(kl, list(params.values()), create_graph=True, materialize_grads=True)
    flat_grad = flatten(grads)

    def fvp(vector: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad @ vector, list(params.values()), retain_graph=True, materialize_grads=True)
        return flatten(hv) + damping * vector

    return fvp


def add_step(params: dict, step: torch.Tensor) -> dict:
    """New leaf tensors params + step (the step flattened in params' order)."""
    chunks = torch.split(step, [p.numel() for p in params.values()])
    return {name: (p.detach() + chunk.view_as(p)).requires_grad_(p.requires_grad)
            for (name, p), chunk in zip(params.items(), chunks)}  # fmt: skip


def line_search(
    objective: Callable,
    params: dict,
    full_step: torch.Tensor,
    surrogate_before: float,
    max_kl: float = 0.01,
    max_steps: int = 20,
    backtrack_ratio: float = 0.8,
) -> tuple[dict, dict]:
    """Backtracking (TRPO Sec. 6 / App. C): try params + ratio^k * full_step for k = 0 .. max_steps - 1 and accept the
    first whose surrogate is lower than surrogate_before and whose mean KL is <= max_kl; if none, keep params.
    Returns (params, stats) with stats surrogate, kl (of the returned params) and ls_steps (k, or -1 if rejected)."""
    for k in range(max_steps):
        candidate = add_step(params, backtrack_ratio**k * full_step)
        with torch.no_grad():  # only values here: no second-order graph, no graph of the surrogate or the KL
            surrogate, kl = torch.stack(objective(candidate)).tolist()  # the accept test needs both: one host sync
        if surrogate < surrogate_before and kl <= max_kl:  # False for NaN as well
            return candidate, {"surrogate": surrogate, "kl": kl, "ls_steps": k}
    return params, {"surrogate": surrogate_before, "kl": 0.0, "ls_steps": -1}


def trpo_step(params: dict, objective: Callable, max_kl: float = 0.01, damping: float = 1e-5, cg_iters: int = 10,
              ls_max_steps: int = 20, ls_backtrack_ratio: float = 0.8) -> tuple[dict, dict]:  # fmt: skip
    """One TRPO update (Schulman et al. 2015, App. C) of params for objective(theta) -> (surrogate, kl), e.g. from
    `meta_objective`: s = F^-1 g by conjugate gradient, scaled to the trust-region boundary of the quadratic KL model,
    step = -s / sqrt(0.5 s^T F s / max_kl), then `line_search`. Returns (params, stats) as line_search, stats also
    with surrogate_before; the policy takes the result with policy.load_state_dict(params)."""
    surrogate, kl = objective(params)
    grad = flatten(torch.autograd.grad(surrogate, list(params.values()), retain_graph=True, materialize_grads=True))
    fvp = fisher_vector_product(kl, params, damping)
    direction = conjugate_gradient(fvp, grad, cg_iters)
    shs = 0.5 * (direction @ fvp(direction))
    before = surrogate.item()
    if not shs > 0:  # zero gradient, or a Fisher that is not positive along it: no step
        return params, {"surrogate": before, "kl": 0.0, "ls_steps": -1, "surrogate_before": before}
    full_step = -direction / torch.sqrt(shs / max_kl)
    new_params, stats = line_search(objective, params, full_step, before, max_kl, ls_max_steps, ls_backtrack_ratio)
    return new_params, {**stats, "surrogate_before": before}


class MAML:
    """The learner: the meta-policy theta and its inner step size alpha (`effective_fast_lr`). `update` is one
    MAML-TRPO meta-update (MAML Sec. 3.2 and 5.3) on a meta-batch's episodes. TRPO keeps no optimizer state, so the
    policy's parameters are all there is to restore."""

    def __init__(self, args: Args, policy: GaussianPolicy, fast_lr: float):
        self.args, self.policy, self.fast_lr = args, policy, fast_lr

    def update(self, tasks: list[Task], train: list[Episodes], train_advantages: list, valid: list[Episodes]) -> dict:
        """One TRPO step on the meta-objective of the tasks' train (pre-adaptation) and valid (post-adaptation)
        episodes; returns trpo_step's stats. The policy takes the new parameters only if the guard accepts them."""
        args = self.args
        contexts = task_contexts(args.env_id, tasks).to(self.policy.log_std.device)
        meta_tasks = [MetaTask(context, train_episodes, advantages, valid_episodes,
                               episode_advantages(valid_episodes, args.gamma, args.gae_lambda))
                      for context, train_episodes, advantages, valid_episodes
                      in zip(contexts, train, train_advantages, valid)]  # fmt: skip
        params = dict(self.policy.named_parameters())
        objective = meta_objective(self.policy, params, meta_tasks, self.fast_lr, args.first_order)
        new_params, stats = trpo_step(params, objective, args.max_kl, args.cg_damping, args.cg_iters,
                                      args.ls_max_steps, args.ls_backtrack_ratio)  # fmt: skip
        guarded_step(self.policy, new_params, "TRPO", surrogate=stats["surrogate_before"], kl=stats["kl"])
        return stats

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "fast_lr": self.fast_lr}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.fast_lr = state["fast_lr"]


# Sampling (keynans/HypeRL, MAML/maml_rl/sampler.py and metalearner.py)
#
# The authors sample each task's 20 episodes in cpu_count - 1 worker processes. Here all B tasks x E episodes of a
# call run in lockstep in this process, one env per episode (the envs are made once and reused), and the policy is
# called once per step for all of them: `policy.condition` once per call (one primary-network pass for all B tasks),
# then the TaskPolicy on obs (B, E, obs_dim). Env resets and action noise come from one numpy Generator, so sampling
# is reproducible and a checkpoint that saves the Generator's state resumes it exactly.


def make_task_envs(family: str, n: int) -> list[TaskEnv]:
    """n envs of the family for the lockstep sampler (their tasks are set per call)."""
    return [make_task_env(family, Task(1.0)) for _ in range(n)]


def task_contexts(family: str, tasks: list[Task]) -> torch.Tensor:
    """The tasks' oracle contexts (`task_context`), float32 (len(tasks), context_dim)."""
    return torch.as_tensor(np.stack([task_context(family, task) for task in tasks]))


def stack_trees(trees: list):
    """torch.stack along a new leading dim of the matching tensors of equally nested lists/tuples of tensors."""
    if isinstance(trees[0], torch.Tensor):
        return torch.stack(trees)
    return type(trees[0])(stack_trees(list(parts)) for parts in zip(*trees))


def stack_task_policies(task_policies: list[TaskPolicy]) -> TaskPolicy:
    """One TaskPolicy for B tasks that were each conditioned on their own parameters (MAML's adapted theta'_i): the
    per-state networks' tensors are stacked over the tasks and every call runs them in one torch.vmap call on obs
    (B, E, obs_dim). The std becomes (B, 1, act_dim), so it broadcasts over exactly one state dim. Needs every mean
    to be functools.partial of the same function (true for all three policies, see the Policies section comment)."""
    means = [task_policy.mean for task_policy in task_policies]
    func = means[0].func if isinstance(means[0], partial) else None
    if func is None or any(not isinstance(mean, partial) or mean.func is not func or mean.keywords for mean in means):
        raise ValueError("stack_task_policies needs TaskPolicy means that are partials of one function")
    args = stack_trees([mean.args for mean in means])
    std = torch.stack([task_policy.std for task_policy in task_policies]).unsqueeze(1)
    return TaskPolicy(partial(vmapped_mean, func, args), std)


def vmapped_mean(func, args, obs):
    return torch.vmap(func)(*args, obs)


def sample_episodes(envs: list[TaskEnv], tasks: list[Task], policy: GaussianPolicy, params, n_episodes: int,
                    rng: np.random.Generator) -> list[Episodes]:  # fmt: skip
    """n_episodes episodes of each of the B tasks, sampled stochastically from the policy (as the authors, both in
    training and evaluation), all B x n_episodes envs in lockstep: env b * n_episodes + e runs episode e of task b.

    params: None (the policy's own) or one dict for all tasks, conditioned once on the B contexts (B, 1); or one dict
    per task (a list, or an iterator, so that e.g. adapted parameters are made one at a time and dropped once
    conditioned), conditioned task by task and stacked with `stack_task_policies`. At each step, one policy call on
    obs (B, n_episodes, obs_dim) gives Normal(mu, sigma); the action is mu + sigma * eps with eps ~ N(0, I) drawn from
    `rng`, as are the seeds of the env resets. The action stored is the sampled one; the env clips it (TaskEnv).

    Returns one `Episodes` per task, float32 on the policy's device, padded to the longest episode (200 steps unless
    every episode ended earlier by an Ant termination); the mask is 0 after an episode's last step. Raises NonFinite on a
    non-finite action, observation or reward, before the env is stepped with it."""
    n_tasks, n_envs = len(tasks), len(tasks) * n_episodes
    if len(envs) < n_envs:
        raise ValueError(f"{n_tasks} tasks x {n_episodes} episodes need {n_envs} envs, got {len(envs)}")
    envs = envs[:n_envs]
    device = policy.log_std.device
    contexts = task_contexts(envs[0].family, tasks).to(device)
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    obs = np.zeros((n_envs, EPISODE_STEPS, obs_dim), dtype=np.float32)
    actions = np.zeros((n_envs, EPISODE_STEPS, act_dim), dtype=np.float32)
    rewards = np.zeros((n_envs, EPISODE_STEPS), dtype=np.float32)
    mask = np.zeros((n_envs, EPISODE_STEPS), dtype=np.float32)
    for i, env in enumerate(envs):
        env.set_task(tasks[i // n_episodes])
    seeds = rng.integers(0, 2**31 - 1, size=n_envs)
    current = np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)]).astype(np.float32)
    alive = np.ones(n_envs, dtype=bool)
    with torch.no_grad():
        if params is None or isinstance(params, dict):
            task_policy = policy.condition(contexts, params)
        else:
            task_policy = stack_task_policies([policy.condition(c, p) for c, p in zip(contexts, params)])
        for t in range(EPISODE_STEPS):
            if not alive.any():
                break
            # one copy of all envs' observations to the device and one of their actions back per step
            distribution = task_policy(torch.from_numpy(current).to(device).view(n_tasks, n_episodes, obs_dim))
            noise = torch.from_numpy(rng.standard_normal((n_tasks, n_episodes, act_dim), dtype=np.float32))
            action = (distribution.loc + distribution.scale * noise.to(device)).reshape(n_envs, act_dim).cpu().numpy()
            for i in np.flatnonzero(alive):
                if not np.isfinite(action[i]).all():
                    raise NonFinite(f"non-finite action {action[i]} from the policy")
                next_obs, reward, terminated, truncated, _ = envs[i].step(action[i])
                if not (np.isfinite(next_obs).all() and np.isfinite(reward)):
                    raise NonFinite(f"non-finite observation or reward ({reward}) from {envs[i].family}")
                obs[i, t], actions[i, t], rewards[i, t], mask[i, t] = current[i], action[i], reward, 1.0
                current[i] = next_obs
                alive[i] = not (terminated or truncated)
    length = int(mask.sum(1).max())
    shape = (n_tasks, n_episodes, length)
    tensors = [torch.from_numpy(np.ascontiguousarray(a[:, :length]).reshape(*shape, *a.shape[2:])).to(device)
               for a in (obs, actions, rewards, mask)]  # fmt: skip
    return [Episodes(*(tensor[b] for tensor in tensors)) for b in range(n_tasks)]


def mean_return(episodes: list[Episodes]) -> float:
    """The mean undiscounted episode return over all tasks' episodes (keynans/HypeRL, MAML/main.py: total_rewards)."""
    return float(torch.cat([e.rewards.sum(1) for e in episodes]).double().mean())


def env_steps(episodes: list[Episodes]) -> int:
    return int(torch.stack([e.mask.sum() for e in episodes]).sum().item())  # exact: counts far below 2^24


def inner_step_stats(
    policy: GaussianPolicy, adapted: dict, episodes: Episodes, context, on_device: bool = False
) -> dict:
    """How far one inner step moved the policy on the states it adapted on (a step that is too small leaves MAML
    nothing to meta-learn; one that is too large makes the adapted policy, and so the meta-objective, hypersensitive):
    inner_kl = KL(pi_theta || pi_theta') summed over the action dims and averaged over valid steps, and the mean |mu|
    over action dims and valid steps before (pre_mean_abs_mu) and after (post_mean_abs_mu) the step. Floats, or with
    on_device 0-dim tensors on the policy's device (the sampler's: no host sync per task)."""
    with torch.no_grad():
        pre, post = policy.distribution(episodes.obs, context), policy.distribution(episodes.obs, context, adapted)
        stats = {"inner_kl": masked_mean(kl_divergence(pre, post).sum(-1), episodes.mask),
                 "pre_mean_abs_mu": masked_mean(pre.mean.abs().mean(-1), episodes.mask),
                 "post_mean_abs_mu": masked_mean(post.mean.abs().mean(-1), episodes.mask)}  # fmt: skip
    return stats if on_device else {key: value.item() for key, value in stats.items()}


def adapted_for_sampling(policy: GaussianPolicy, contexts, episodes: list[Episodes], advantages, step_size: float,
                         inner_steps: list):  # fmt: skip
    """Yields each task's theta'_i = theta - alpha grad L_i(theta) (`adapt`), detached, one task at a time, and
    appends its `inner_step_stats` (0-dim tensors on the policy's device) to inner_steps."""
    for context, task_episodes, task_advantages in zip(contexts, episodes, advantages):
        adapted = adapt(policy, None, task_episodes, context, task_advantages, step_size, first_order=True)
        adapted = {name: p.detach() for name, p in adapted.items()}
        inner_steps.append(inner_step_stats(policy, adapted, task_episodes, context, on_device=True))
        yield adapted


def pre_and_post_adaptation(envs, tasks, policy, n_episodes, rng, step_size, gamma, lam):
    """MAML's per-task data (keynans/HypeRL, MAML/maml_rl/metalearner.py: sample): n_episodes episodes with theta
    (pre-adaptation), their advantages, one inner step per task on them, and n_episodes episodes with each task's
    theta'_i (post-adaptation). Returns (pre episodes, pre advantages, post episodes, inner steps): lists over the
    tasks, and a dict of float64 CPU tensors over the tasks with the keys of `inner_step_stats`."""
    contexts = task_contexts(envs[0].family, tasks).to(policy.log_std.device)
    pre = sample_episodes(envs, tasks, policy, None, n_episodes, rng)
    pre_advantages = [episode_advantages(episodes, gamma, lam) for episodes in pre]
    inner_steps = []
    adapted = adapted_for_sampling(policy, contexts, pre, pre_advantages, step_size, inner_steps)
    post = sample_episodes(envs, tasks, policy, adapted, n_episodes, rng)
    stats = {key: torch.stack([step[key] for step in inner_steps]).double().cpu() for key in inner_steps[0]}
    return pre, pre_advantages, post, stats


def evaluate(envs, tasks, policy, n_episodes, rng, step_size, gamma, lam) -> tuple[float, float, int]:
    """The authors' test protocol (keynans/HypeRL, MAML/maml_rl/metalearner.py: evaluate_task) on the given test
    tasks: the mean undiscounted return of n_episodes stochastic episodes per task with theta (pre-adaptation) and with
    theta'_i after one inner step on those episodes (post-adaptation). Returns (pre return, post return, env steps)."""
    pre, _, post, _ = pre_and_post_adaptation(envs, tasks, policy, n_episodes, rng, step_size, gamma, lam)
    return mean_return(pre), mean_return(post), env_steps(pre) + env_steps(post)


def variance_experiment(envs, tasks, policy, n_samples, n_episodes, rng, step_size, gamma, lam) -> dict:
    """The gradient-noise experiment of the paper's Fig. 5 (Sec. 4), for the current meta-policy theta on fixed tasks.

    The gradient step is MAML's inner policy-gradient step, the one the meta-policy is trained to take: for sample
    s = 1 .. n_samples, sample n_episodes fresh episodes per task with theta, take theta'_{s,i} = theta - fast_lr *
    grad L_i(theta) per task (`adapt`, REINFORCE loss with the linear-baseline advantages, all parameters, fast_lr the
    run's inner step size, `default_fast_lr` unless given), then score the updated policies by R_s, the mean
    undiscounted return of n_episodes fresh episodes per task with theta'_{s,i}. The spread of R_s over the samples is
    the paper's surrogate for the gradient noise. The return of the pre-update episodes is kept too: its spread is the
    evaluation noise alone, the floor under the spread of R_s. So is the size of each step, the mean over tasks of
    KL(pi_theta || pi_theta'_{s,i}): a policy whose steps barely move it shows little spread for that reason alone.

    Returns float64 tensors: post_returns (S,), pre_returns (S,), post_task_returns (S, n_tasks), inner_kl (S,), and
    env_steps."""
    post_returns, pre_returns, post_task_returns, inner_kl, steps = [], [], [], [], 0
    for _ in range(n_samples):
        pre, _, post, inner = pre_and_post_adaptation(envs, tasks, policy, n_episodes, rng, step_size, gamma, lam)
        pre_returns.append(mean_return(pre))
        post_returns.append(mean_return(post))
        post_task_returns.append(torch.stack([e.rewards.sum(1).double().mean() for e in post]).tolist())
        inner_kl.append(inner["inner_kl"].mean().item())
        steps += env_steps(pre) + env_steps(post)
    as_tensor = partial(torch.tensor, dtype=torch.float64)
    return {"post_returns": as_tensor(post_returns), "pre_returns": as_tensor(pre_returns),
            "post_task_returns": as_tensor(post_task_returns), "inner_kl": as_tensor(inner_kl),
            "env_steps": steps}  # fmt: skip


# independent numpy streams: np.random.default_rng([seed, stream]) (the task pools use default_rng(seed) itself)
TASK_STREAM, SAMPLER_STREAM, EVAL_STREAM, VARIANCE_STREAM = 1, 2, 3, 4


def lockstep_envs(args: Args) -> int:
    """The envs the sampler needs: one per episode of the largest lockstep batch (training, evaluation, variance)."""
    eval_tasks = (args.eval_tasks or args.num_test_tasks) if args.eval_freq else 0
    return (
        max(args.meta_batch_size, eval_tasks, args.variance_tasks if args.variance_iters else 0) * args.fast_batch_size
    )


class MetaBatchSampler:
    """The data of each meta-iteration (keynans/HypeRL, MAML/main.py): draws the meta-batch from the train pool with
    replacement and samples its episodes before and after adaptation (`pre_and_post_adaptation`) on the lockstep
    envs. The draws and the sampling have a stream each; every sampling call reseeds every env it steps, so the envs
    carry nothing from one meta-iteration to the next and the streams' states are all there is to restore."""

    def __init__(self, envs: list[TaskEnv], train_tasks: list[Task], args: Args):
        self.envs, self.train_tasks, self.args = envs, train_tasks, args
        self.task_rng = np.random.default_rng([args.seed, TASK_STREAM])
        self.rng = np.random.default_rng([args.seed, SAMPLER_STREAM])

    def sample(self, policy: GaussianPolicy, fast_lr: float):
        """Returns (tasks, pre episodes, pre advantages, post episodes, inner steps), as pre_and_post_adaptation."""
        args = self.args
        tasks = [
            self.train_tasks[i] for i in self.task_rng.integers(0, len(self.train_tasks), size=args.meta_batch_size)
        ]
        episodes = pre_and_post_adaptation(self.envs, tasks, policy, args.fast_batch_size, self.rng, fast_lr,
                                           args.gamma, args.gae_lambda)  # fmt: skip
        return (tasks, *episodes)

    def state_dict(self) -> dict:
        return {"task_rng": self.task_rng.bit_generator.state, "sampler_rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.task_rng.bit_generator.state = state["task_rng"]
        self.rng.bit_generator.state = state["sampler_rng"]


# ======================================================================================================================
# RUN INFRASTRUCTURE: not the algorithm. Argument checks, the run directory, checkpoints and exact resume, the
# non-finite guard, Ctrl-C, the progress line.
# ======================================================================================================================
SCRIPT = "hyper_maml.py"
FILE_FORMAT = "hyper_maml/2"  # checkpoints, models and variance files carry it; other scripts' or versions' are refused
ENV_BYTES = 5 * 2**18  # 1.25 MiB per lockstep env: its MuJoCo model and data (measured 1.1 MiB) and episode buffers


def fail(message: str, code: int = 1) -> None:
    """One clear error line and a non-zero exit, instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_args(args: Args) -> None:
    positive = ["num_batches", "meta_batch_size", "fast_batch_size", "num_train_tasks", "num_test_tasks", "max_kl",
                "cg_iters", "ls_max_steps", "hyper_embedding_dim", "hyper_dynamic_hidden", "variance_samples",
                "variance_tasks", "progress_freq"]  # fmt: skip
    for name in positive:
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["seed", "eval_freq", "checkpoint_freq", "num_threads", "hyper_blocks", "cg_damping"]:
        if not getattr(args, name) >= 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and not np.isfinite(value):
            fail(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        fail(f"--hidden-sizes must be one or more positive widths, got {args.hidden_sizes}")
    if args.hyper_embedding_dim % 4:
        fail(
            f"--hyper-embedding-dim must be a multiple of 4 (stages dim/4, dim/2, dim), got {args.hyper_embedding_dim}"
        )
    if not 0.0 < args.gamma <= 1.0 or not 0.0 <= args.gae_lambda <= 1.0:
        fail(f"--gamma must be in (0, 1] and --gae-lambda in [0, 1], got {args.gamma} and {args.gae_lambda}")
    if not 0.0 < args.ls_backtrack_ratio < 1.0:
        fail(f"--ls-backtrack-ratio must be in (0, 1), got {args.ls_backtrack_ratio}")
    if args.fast_lr is not None and not args.fast_lr > 0:
        fail(f"--fast-lr must be positive, got {args.fast_lr}")
    if not 0.0 < args.hyper_embedding_norm < float("inf"):
        fail(f"--hyper-embedding-norm must be positive and finite, got {args.hyper_embedding_norm}")
    if args.eval_tasks is not None and not 0 < args.eval_tasks <= args.num_test_tasks:
        fail(f"--eval-tasks must be in [1, --num-test-tasks {args.num_test_tasks}], got {args.eval_tasks}")
    if args.variance_tasks > args.num_train_tasks:
        fail(f"--variance-tasks {args.variance_tasks} is larger than --num-train-tasks {args.num_train_tasks}")
    outside = [i for i in args.variance_iters if not 1 <= i <= args.num_batches]
    if outside:
        fail(f"--variance-iters must lie in [1, --num-batches {args.num_batches}], got {', '.join(map(str, outside))}")
    if not args.exp_name or os.sep in args.exp_name or (os.altsep and os.altsep in args.exp_name):
        fail(f"--exp-name must be a plain name (it becomes part of a directory name), got {args.exp_name!r}")


def check_memory(args: Args) -> None:
    """Refuse, before building any, more lockstep envs than the machine's memory holds (one per episode of a
    meta-batch: --meta-batch-size x --fast-batch-size)."""
    n_envs = lockstep_envs(args)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if memory and n_envs * ENV_BYTES > memory:
        fail(f"{n_envs:,} lockstep envs (tasks x --fast-batch-size {args.fast_batch_size}) need about "
             f"{n_envs * ENV_BYTES / 2**30:,.1f} GiB; this machine has {memory / 2**30:.1f} GiB")  # fmt: skip


# Settings that may differ between a run and its resumption; every other setting changes what the run computes.
# --cuda may differ so that a run can move to another device; from there on its rounding is that device's.
RESUME_MAY_DIFFER = ("num_batches", "progress_freq", "checkpoint_freq", "num_threads", "cuda", "track",
                     "wandb_project_name", "wandb_entity", "save_model", "resume", "exp_name")  # fmt: skip


def check_resume_settings(checkpoint: dict, args: Args, fast_lr: float) -> None:
    """Also compares the inner step size as used (explicit or default), since the default can change between
    versions; a setting the checkpoint lacks differs too."""
    saved = checkpoint["args"]
    differing = [(name, saved.get(name), getattr(args, name)) for name in (f.name for f in dataclasses.fields(args))
                 if name not in RESUME_MAY_DIFFER and saved.get(name) != getattr(args, name)]  # fmt: skip
    if checkpoint["learner"]["fast_lr"] != fast_lr:
        differing.append(("fast_lr", checkpoint["learner"]["fast_lr"], fast_lr))
    if differing:
        listing = ", ".join(f"--{name.replace('_', '-')} {made} (given {given})" for name, made, given in differing)
        fail(f"the checkpoint was made with different settings: {listing}; pass the same settings to resume")
    if checkpoint["iteration"] >= args.num_batches:
        fail(f"the checkpoint is at meta-iteration {checkpoint['iteration']}; pass --num-batches above it to continue")


class GlobalRNGs:
    """The global random streams: Python's, NumPy's legacy one, torch's CPU and CUDA generators."""

    def state_dict(self) -> dict:
        name, key, pos, has_gauss, cached = np.random.get_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        numpy_state = [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached]
        return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict) -> None:
        name, key, pos, has_gauss, cached = state["numpy"]
        random.setstate(state["python"])
        np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class Progress:
    """The console line every --progress-freq meta-iterations: iteration, seconds per iteration and env steps/s since
    the last line, the ETA, the latest train and evaluation returns and the inner step's KL. The ETA adds two phases
    at their own rates since the start or the resume: meta-iterations (sampling, update, evaluation) and variance
    experiments (each as long as 2 x --variance-samples meta-batches of sampling), so that one variance experiment
    does not inflate the ETA of the meta-iterations."""

    def __init__(self, total: int, iteration: int, variance_iters: tuple):
        self.total, self.variance_iters, self.last_eval = total, variance_iters, (float("nan"), float("nan"))
        self.new_phase(iteration)

    def new_phase(self, iteration: int) -> None:
        self.start_iteration, self.seconds, self.variance_seconds, self.variance_runs = iteration, 0.0, 0.0, 0
        self.line_time, self.line_iteration, self.line_steps = time.time(), iteration, 0

    def record(self, steps: int, seconds: float, variance_seconds: float = 0.0) -> None:
        """One meta-iteration's env steps and seconds, variance_seconds of them in a variance experiment."""
        self.line_steps += steps
        self.seconds += seconds - variance_seconds
        if variance_seconds:
            self.variance_seconds, self.variance_runs = self.variance_seconds + variance_seconds, self.variance_runs + 1

    def eta_seconds(self, iteration: int) -> Optional[float]:
        """None while a variance experiment is still to come and none has been timed."""
        remaining_variance = sum(i > iteration for i in self.variance_iters)
        if remaining_variance and not self.variance_runs:
            return None
        per_variance = self.variance_seconds / max(self.variance_runs, 1)
        per_iteration = self.seconds / max(iteration - self.start_iteration, 1)
        return (self.total - iteration) * per_iteration + remaining_variance * per_variance

    def print(self, iteration: int, pre_return: float, post_return: float, inner_kl: float) -> None:
        now = time.time()
        seconds_per_iteration = (now - self.line_time) / max(iteration - self.line_iteration, 1)
        sps = self.line_steps / max(now - self.line_time, 1e-9)
        eta = self.eta_seconds(iteration)
        fields = [f"iteration {iteration}/{self.total}", f"{seconds_per_iteration:.1f} s/it", f"{sps:.0f} env steps/s",
                  f"ETA {format_duration(eta)}" if eta is not None else "ETA after the first variance experiment",
                  f"pre {pre_return:.1f}", f"post {post_return:.1f}", f"inner KL {inner_kl:.3g}"]  # fmt: skip
        if np.isfinite(self.last_eval[0]):
            fields.append(f"eval pre {self.last_eval[0]:.1f} post {self.last_eval[1]:.1f}")
        print(" | ".join(fields), flush=True)
        self.line_time, self.line_iteration, self.line_steps = now, iteration, 0

    def state_dict(self) -> dict:
        return {"last_eval": list(self.last_eval)}

    def load_state_dict(self, state: dict) -> None:
        self.last_eval = tuple(state["last_eval"])


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class NonFinite(FloatingPointError):
    """A loss, an action, observation or reward, or after the TRPO step a weight is NaN or infinite."""


def guarded_step(policy: nn.Module, new_params: dict, name: str, **losses: float) -> None:
    """The policy takes the parameters that its `name` step computed, with the run's guard: the named losses must be
    finite, and so must every new parameter. Otherwise NonFinite is raised and the policy keeps its parameters."""
    for loss_name, value in losses.items():
        if not np.isfinite(value):
            raise NonFinite(f"non-finite {loss_name} ({value})")
    finite = torch.stack([torch.isfinite(p).all() for p in new_params.values()]).tolist()  # one host sync
    bad = [param_name for param_name, ok in zip(new_params, finite) if not ok]
    if bad:
        raise NonFinite(f"non-finite weights after the {name} step ({', '.join(bad)})")
    policy.load_state_dict(new_params)


def content_digest(obj) -> str:
    """SHA-256 over every tensor's bytes and every plain value of a nested checkpoint, in a fixed order."""
    digest = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            digest.update(f"tensor{x.dtype}{tuple(x.shape)}".encode())
            digest.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for key in sorted(x, key=repr):
                digest.update(repr(key).encode())
                visit(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__}{len(x)}".encode())
            for item in x:
                visit(item)
        else:
            digest.update(repr(x).encode())

    visit(obj)
    return digest.hexdigest()


def save_file(contents: dict, path: str, kind: str) -> None:
    """Write a checkpoint, model or variance file: tensors and plain containers only (so it loads with
    torch.load(weights_only=True)), with its format, kind and a digest of its contents. Written to a temporary file,
    flushed to disk, then renamed over `path`: a crash or a full disk mid-write leaves the previous file intact."""
    contents = {**contents, "format": FILE_FORMAT, "kind": kind}
    contents["sha256"] = content_digest(contents)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(contents, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            fail(f"cannot write {path}: {e.strerror or e}; the previous file there, if any, is intact")
        raise


def load_file(path: str, kinds: tuple) -> dict:
    """Load a file written by save_file without running any code from it (weights_only), and refuse anything else:
    another script's or version's file, a corrupted one (its digest differs), or one of another kind."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"cannot load {path}: no such file")
    except Exception as e:  # unpickling errors, foreign pickles, truncated or random bytes: all end the same way
        fail(f"cannot load {path}: not a checkpoint, model or variance file written by {SCRIPT} "
             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")  # fmt: skip
    if not isinstance(contents, dict) or contents.get("format") != FILE_FORMAT:
        fail(f"cannot load {path}: not a checkpoint, model or variance file written by this version of {SCRIPT}")
    digest = contents.pop("sha256", None)
    if digest != content_digest(contents):
        fail(f"cannot load {path}: its contents do not match their checksum (the file is corrupted)")
    if contents["kind"] not in kinds:
        fail(f"cannot load {path}: it is a {contents['kind']} file, expected a {' or '.join(kinds)}")
    return contents


def make_run_dir(args: Args) -> tuple:
    """A new directory runs/{env}__{exp_name}__{policy}__{seed}__{unix time}, suffixed -1, -2, ... when runs started in
    the same second took the name (mkdir is atomic, so two runs never share one)."""
    base = f"{args.env_id}__{args.exp_name}__{args.policy}__{args.seed}__{int(time.time())}"
    for i in range(1000):
        run_name = base if i == 0 else f"{base}-{i}"
        try:
            os.makedirs(os.path.join("runs", run_name))
            return run_name, os.path.join("runs", run_name)
        except FileExistsError:
            continue
        except OSError as e:
            fail(f"cannot create the run directory runs/{run_name}: {e.strerror or e}")
    fail(f"cannot find a free run directory name for {base}")


def save_checkpoint(path, args, run_name, iteration, train_tasks, test_tasks, learner, sampler, rngs, progress) -> None:
    """Everything a resumed run needs, each part from its object's state_dict, and the task pools."""
    objects = {"learner": learner, "sampler": sampler, "rngs": rngs, "progress": progress}
    tasks = {"train": [task.goal for task in train_tasks], "test": [task.goal for task in test_tasks]}
    contents = {"args": vars(args), "run_name": run_name, "iteration": iteration, "tasks": tasks}
    save_file({**contents, **{name: obj.state_dict() for name, obj in objects.items()}}, path, kind="checkpoint")


def restore_checkpoint(checkpoint, learner, sampler, rngs, progress) -> int:
    """Puts every object back where the checkpoint left it; returns its meta-iteration."""
    try:
        learner.load_state_dict(checkpoint["learner"])
    except (RuntimeError, KeyError, ValueError) as e:
        fail(f"the checkpoint's policy does not fit these settings: {str(e).splitlines()[0][:200]}")
    sampler.load_state_dict(checkpoint["sampler"])
    rngs.load_state_dict(checkpoint["rngs"])
    progress.load_state_dict(checkpoint["progress"])
    return checkpoint["iteration"]


def save_variance(path: str, args: Args, results: dict, tasks: list[Task], fast_lr: float) -> None:
    """variance.pt: the variance experiments' raw numbers by meta-iteration (`variance_experiment`)."""
    contents = {"iterations": results, "tasks": [task.goal for task in tasks], "fast_lr": fast_lr, "args": vars(args)}
    save_file(contents, path, kind="variance")


def load_variance(path: str, iteration: int) -> dict:
    """The variance experiments a resumed run keeps: those up to its checkpoint's meta-iteration."""
    if not os.path.exists(path):
        return {}
    return {i: result for i, result in load_file(path, kinds=("variance",))["iterations"].items() if i <= iteration}


def variance_scalars(result: dict) -> dict:
    return {"return_mean": result["post_returns"].mean().item(),
            "return_std": result["post_returns"].std(unbiased=False).item(),
            "pre_return_std": result["pre_returns"].std(unbiased=False).item(),
            "inner_kl": result["inner_kl"].mean().item()}  # fmt: skip


class StopRequest:
    """Ctrl-C (SIGINT) asks the run to stop at the end of the current meta-iteration, where its state is consistent
    and can be checkpointed; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            fail("interrupted twice; stopped without writing a checkpoint", code=130)
        self.requested = True
        print("stopping at the end of this meta-iteration (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def resume_command(checkpoint_path: str) -> str:
    """This run's command line with --resume pointing at `checkpoint_path`."""
    flags, skip_next = [], False
    for arg in sys.argv[1:]:
        if skip_next or arg.startswith("--resume="):
            skip_next = False
            continue
        if arg == "--resume":
            skip_next = True
            continue
        flags.append(arg)
    return shlex.join(["python", SCRIPT, *flags, "--resume", checkpoint_path])


@contextlib.contextmanager
def out_of_memory_fails(what: str):
    """A failed allocation (MemoryError, or torch's RuntimeError) ends the run with one error line."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "alloc" not in str(e):
            raise
        fail(f"not enough memory for {what} at these sizes ({type(e).__name__})")


def open_writer(args: Args, run_name: str, run_dir: str, resumed_at: Optional[int], fast_lr: float,
                device: torch.device) -> SummaryWriter:  # fmt: skip
    """The TensorBoard writer (mirrored to Weights and Biases with --track), the hyperparameter table first. A resumed
    run purges what the interrupted one logged after its checkpoint."""
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs Weights and Biases: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)  # fmt: skip
    writer = SummaryWriter(run_dir, purge_step=resumed_at + 1 if resumed_at is not None else None)
    settings = {**vars(args), "fast_lr (effective)": fast_lr, "device": device}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in settings.items()))
    return writer


def checkpoint_due(args: Args, iteration: int) -> bool:
    return bool(args.checkpoint_freq) and (iteration % args.checkpoint_freq == 0 or iteration == args.num_batches)


def exit_interrupted(writer: SummaryWriter, iteration: int, checkpoint_path: str) -> None:
    writer.close()
    command = resume_command(checkpoint_path)
    print(f"interrupted at meta-iteration {iteration}; checkpoint written; resume with: {command}", file=sys.stderr)
    sys.exit(130)


def exit_non_finite(writer: SummaryWriter, error: NonFinite, iteration: int, checkpoint_path: str) -> None:
    writer.close()
    intact = os.path.exists(checkpoint_path)
    saved = f"the last checkpoint ({checkpoint_path}) is intact" if intact else "no checkpoint was written"
    fail(f"{error} at meta-iteration {iteration}; stopping, {saved}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    fast_lr = effective_fast_lr(args)
    checkpoint = load_file(args.resume, kinds=("checkpoint",)) if args.resume else None
    if checkpoint is not None:
        check_resume_settings(checkpoint, args, fast_lr)
    stop = StopRequest()

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # task pools and the lockstep envs, one per episode of the largest batch (training, evaluation, variance)
    train_tasks, test_tasks = make_task_pool(args.env_id, args.seed, args.num_train_tasks, args.num_test_tasks)
    if checkpoint is not None:
        train_tasks, test_tasks = ([Task(goal) for goal in checkpoint["tasks"][key]] for key in ("train", "test"))
    check_memory(args)
    with out_of_memory_fails("the lockstep envs"):
        envs = make_task_envs(args.env_id, lockstep_envs(args))
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]

    # ALGO LOGIC: initialize agent here
    with out_of_memory_fails("the policy"):
        # made on the CPU and then moved, so that its initialization is the same on every device
        policy = make_policy(args, obs_dim, act_dim, task_contexts(args.env_id, train_tasks)).to(device)
        learner = MAML(args, policy, fast_lr)
    sampler = MetaBatchSampler(envs, train_tasks, args)
    rngs, progress = GlobalRNGs(), Progress(args.num_batches, 0, args.variance_iters)
    eval_tasks, variance_tasks = test_tasks[: args.eval_tasks or len(test_tasks)], train_tasks[: args.variance_tasks]

    start_iteration, variance_results = 0, {}
    if checkpoint is not None:
        run_name, run_dir = checkpoint["run_name"], os.path.dirname(os.path.abspath(args.resume))
        start_iteration = restore_checkpoint(checkpoint, learner, sampler, rngs, progress)
        variance_results = load_variance(os.path.join(run_dir, "variance.pt"), start_iteration)
        progress.new_phase(start_iteration)
        print(f"resumed {run_name} at meta-iteration {start_iteration} from {args.resume}")
    else:
        run_name, run_dir = make_run_dir(args)
    checkpoint_path, variance_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "variance.pt")
    writer = open_writer(args, run_name, run_dir, start_iteration if checkpoint is not None else None, fast_lr, device)
    n_params = sum(p.numel() for p in learner.policy.parameters())
    print(f"{run_name}: {args.policy} policy ({n_params:,} parameters), fast_lr {fast_lr:g}, {len(envs)} lockstep envs, "
          f"device {device}")  # fmt: skip

    iteration = start_iteration
    try:
        for iteration in range(start_iteration + 1, args.num_batches + 1):
            iteration_start, steps, variance_seconds = time.time(), 0, 0.0
            if iteration in args.variance_iters:  # paper Fig. 5, on the meta-policy before this iteration's update
                variance_rng = np.random.default_rng([args.seed, VARIANCE_STREAM, iteration])
                result = variance_experiment(
                    envs,
                    variance_tasks,
                    learner.policy,
                    args.variance_samples,
                    args.fast_batch_size,
                    variance_rng,
                    fast_lr,
                    args.gamma,
                    args.gae_lambda,
                )
                steps += result.pop("env_steps")
                variance_results[iteration] = result
                for name, value in variance_scalars(result).items():
                    writer.add_scalar(f"variance/{name}", value, iteration)
                save_variance(variance_path, args, variance_results, variance_tasks, fast_lr)
                variance_seconds = time.time() - iteration_start

            # ALGO LOGIC: one MAML-TRPO meta-iteration (MAML Sec. 3.2 and 5.3)
            sampling_start = time.time()
            tasks, train, train_advantages, valid, inner_steps = sampler.sample(learner.policy, fast_lr)
            update_start = time.time()
            with out_of_memory_fails("the meta-update (--first-order keeps no second-order graph)"):
                stats = learner.update(tasks, train, train_advantages, valid)
            update_seconds = time.time() - update_start
            steps += env_steps(train) + env_steps(valid)

            if args.eval_freq and (iteration % args.eval_freq == 0 or iteration == args.num_batches):
                eval_pre, eval_post, eval_steps = evaluate(envs, eval_tasks, learner.policy, args.fast_batch_size,
                                                           np.random.default_rng([args.seed, EVAL_STREAM]), fast_lr,
                                                           args.gamma, args.gae_lambda)  # fmt: skip
                progress.last_eval, steps = (eval_pre, eval_post), steps + eval_steps
                writer.add_scalar("eval/pre_adaptation_return", eval_pre, iteration)
                writer.add_scalar("eval/post_adaptation_return", eval_post, iteration)

            # TRY NOT TO MODIFY: record rewards for plotting purposes
            iteration_seconds = time.time() - iteration_start
            pre_return, post_return = mean_return(train), mean_return(valid)
            writer.add_scalar("charts/pre_adaptation_return", pre_return, iteration)
            writer.add_scalar("charts/post_adaptation_return", post_return, iteration)
            for key, values in inner_steps.items():  # means over the meta-batch's tasks
                writer.add_scalar(f"adaptation/{key}", values.mean().item(), iteration)
            writer.add_scalar("losses/surrogate_before", stats["surrogate_before"], iteration)
            writer.add_scalar("losses/surrogate_after", stats["surrogate"], iteration)
            writer.add_scalar("losses/kl", stats["kl"], iteration)
            writer.add_scalar("losses/line_search_steps", stats["ls_steps"], iteration)
            writer.add_scalar("charts/SPS", int(steps / iteration_seconds), iteration)
            writer.add_scalar("charts/iteration_seconds", iteration_seconds, iteration)
            writer.add_scalar("charts/sampling_seconds", update_start - sampling_start, iteration)
            writer.add_scalar("charts/update_seconds", update_seconds, iteration)
            progress.record(steps, iteration_seconds, variance_seconds)
            if iteration % args.progress_freq == 0 or iteration == args.num_batches:
                progress.print(iteration, pre_return, post_return, inner_steps["inner_kl"].mean().item())
            if stop.requested or checkpoint_due(args, iteration):
                save_checkpoint(checkpoint_path, args, run_name, iteration, train_tasks, test_tasks, learner, sampler,
                                rngs, progress)  # fmt: skip
            if stop.requested and iteration < args.num_batches:
                exit_interrupted(writer, iteration, checkpoint_path)
    except NonFinite as e:
        exit_non_finite(writer, e, iteration, checkpoint_path)

    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        save_file({"args": vars(args), "iteration": args.num_batches, "fast_lr": fast_lr,
                   "policy": learner.policy.state_dict()}, model_path, kind="model")  # fmt: skip
        print(f"model saved to {model_path}")
    for env in envs:
        env.close()
    writer.close()

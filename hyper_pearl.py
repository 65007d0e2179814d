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
# docs, measured results, the checkpoint format and failures: docs/hyper_pearl.md
"""PEARL with MLP or hypernetwork policy and critic on the paper's meta-RL task families.

Implements the PEARL experiments of Sarafian, Keynan & Kraus, "Recomposing the Reinforcement Learning Building Blocks
with Hypernetworks" (ICML 2021), Sec. 5, Figs. 6d and 7: PEARL (Rakelly, Zhou, Quillen, Finn & Levine, "Efficient
Off-Policy Meta-Reinforcement Learning via Probabilistic Context Variables", ICML 2019) infers a task latent z from
transitions with a probabilistic context encoder and trains a soft actor-critic conditioned on z, whose policy and
critic are either plain MLPs (PEARL) or hypernetworks (Hyper-PEARL: the policy's meta variable is z, the Q and V
networks' meta variable is the state), on Half-Cheetah-Fwd-Back, Ant-Fwd-Back, Half-Cheetah-Vel, Ant-Vel and the
out-of-distribution Half-Cheetah-Vel-Medium.

    python hyper_pearl.py --env-id HalfCheetahVel --model hyper     # Hyper-PEARL (paper Fig. 6d)
    python hyper_pearl.py --env-id HalfCheetahVel --model mlp       # PEARL
    python hyper_pearl.py --env-id HalfCheetahVelMedium --model hyper   # out-of-distribution test tasks (Fig. 7)

Defaults are PEARL's (github katerakelly/oyster, configs/default.py and configs/*.json) with the authors' changes
(github keynans/HypeRL, PEARL/configs/ and PEARL/torch/sac/sac.py): latent 5, context encoder 3 x 200 over (s, a, r),
KL weight 0.1, 200-step episodes, 100 train and 30 test tasks for the velocity families, the two directions as both
train and test tasks for the direction families.

Device: the networks and the gradient steps run on CUDA when it is available (--cuda, the default; --no-cuda for the
CPU); the env and the replay buffers stay on the CPU. Each gradient step's replay and context batches go to the device
once, through pinned memory without waiting for the GPU, and the step's losses stay there until the iteration's mean
is logged; rollouts move one observation to the device and one action back per env step. The networks are initialized
on the CPU, and the replay draws, env resets and evaluation z come from numpy generators, so those are the same on
either device. The draws of torch's global generator (the policy's action noise, z from the prior and posterior in
collection and training) come from its CPU generator on the CPU and from the CUDA generator on a GPU, so a GPU run
differs from a CPU run beyond rounding; both generators are checkpointed. A CPU run is bit-exact and resumes exactly;
--cuda may differ on resume.

Where this differs from the authors' PEARL code (HypeRL PEARL/, a fork of oyster):

- Velocity task pools come from our own seeded generator; theirs were unseeded (in their
  torch/envs/mojoco/half_cheetah_vel*.py and ant_vel.py the seeding line is commented out, and launch_experiment.py
  builds the env before it sets the global seed), so their goals changed from run to run.
- The velocity families train on 100 tasks and evaluate on 30. Their launch_experiment.py reads the task counts from
  the top-level config keys (2 and 2 in configs/default.py) while their JSONs set 100/30 only inside env_params, so
  their released code trained on tasks[0:2] and evaluated on tasks[128:130]; that bug is not inherited.
- Ant-Fwd-Back is a true forward/backward task (theirs rewarded running at +-1 rad), and the contact cost is non-zero
  here (`TaskEnv`).
- Gymnasium v4 observations (HalfCheetah 17-D, without their appended torso x, y, z), MuJoCo 3+, explicit 200-step
  episodes, actions clipped to [-1, 1] before the env as their NormalizedBoxEnv did.
- A trajectory that ends by termination (Ant falling) keeps its last transition, stored with d = 1; their rollout
  (PEARL/torch/samplers/util.py) dropped it.
- Hyper-PEARL's policy generates its dynamic weights once per task (per trajectory when acting, per task of the
  meta-batch when training), where theirs generated them per transition; the numbers are the same. The V target and
  the policy loss evaluate Q with its parameters frozen (theirs also disabled Q's grads there). Their
  torch.autograd.set_detect_anomaly(True), which only slows training, is not carried over.
- The tanh log-prob correction is exact (no 1e-6 inside the log).
- Initialization (`init_hypernetwork`): by default the generated weights and biases match PyTorch's default
  nn.Linear init on the meta variables each network first sees (states for Q and V; prior and posterior z for the
  policy, whose input projection is scaled so that both generate networks of the same scale), gains start at 1, and
  the generated output layers start like the PEARL layers they replace (U(+-3e-3) for Q and V, U(+-1e-3) for the
  policy's mean and log-std); `--hyper-init authors` gives the released constants.
- rlkit's `fanin_init`, PEARL's hidden-layer init, is read as written (`fanin_uniform_`).
- Not logged: oyster's AverageTrainReturn_all_train_tasks (train tasks with a posterior from the encoder buffer) and
  its per-iteration online-return files; eval/test_return_trajectory_k gives the online returns instead.
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
from typing import Literal, Optional, get_args

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Normal
from torch.utils.tensorboard import SummaryWriter

# Two known-harmless third-party warnings are silenced, nothing else: gymnasium's "-v4 is out of date" (v4 is kept
# on purpose, see README) and MuJoCo's C-level deprecation of `settotalmass`, still applied, in gymnasium's XML.
warnings.filterwarnings("ignore", r".*The environment \S+-v4 is out of date", DeprecationWarning, r"gymnasium\.")


def mujoco_warning(message: str) -> None:
    """MuJoCo's C-level warnings, printed as its default handler prints them, except the harmless one above."""
    if "'settotalmass' is deprecated" not in message:
        print(f"WARNING: {message}\n", file=sys.stderr, flush=True)


mujoco.set_mju_user_warning(mujoco_warning)


# Task families (paper Sec. 5)
#
# Each family is gymnasium's HalfCheetah-v4 or Ant-v4 (dt = 5 x 0.01 s = 0.05 s) under `TaskEnv`, a wrapper that
# clips the action, recomputes the reward for the current task, and ends episodes after 200 steps (PEARL's
# max_path_length). Rewards, and where they differ from the authors' code (github keynans/HypeRL,
# PEARL/torch/envs/mojoco/), are in `TaskEnv`'s docstring; PEARL's task pools in `make_task_pool`'s. The families,
# rewards and wrapper are those of hyper_maml.py; only the task pools differ (PEARL's, not MAML's), and there is no
# oracle task context: PEARL infers the task from transitions (`ContextEncoder`).
#
# Observations are gymnasium's, not the authors': HalfCheetah-v4 gives 17-D (qpos[1:], qvel), where the authors' code
# gave 20-D by appending the absolute torso com (x, y, z), so the x position was observable there and is not here;
# Ant-v4 gives 27-D (qpos[2:], qvel, no contact forces), the same layout as theirs. Ours are float64, theirs float32.

FamilyName = Literal["HalfCheetahFwdBack", "AntFwdBack", "HalfCheetahVel", "AntVel", "HalfCheetahVelMedium"]
FAMILIES: tuple[str, ...] = get_args(FamilyName)
EPISODE_STEPS = 200  # PEARL's max_path_length (oyster configs/default.py)
CHEETAH_CTRL_COST = 0.05  # 0.5 * 1e-1 in the authors' HalfCheetah envs
ANT_CTRL_COST = 0.005
ANT_CONTACT_COST = 0.5e-3
ANT_SURVIVE_REWARD = 0.05
ANT_VEL_BONUS = 1.0  # the "+ 1.0" inside AntVel's forward term
ANT_HEALTHY_Z = (0.2, 1.0)


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
    fails. Both are truncated after 200 steps. The action is clipped before it reaches the env, as PEARL's
    NormalizedBoxEnv does, so the control cost is that of the clipped action.

    Where this differs from the authors' code:
    - AntFwdBack is a true forward/backward task (d * v_x, as the paper describes it). The authors' PEARL AntDirEnv
      (like their MAML one) uses d = +-1 as an angle in radians, rewarding 0.540 v_x +- 0.841 v_y (running at
      +-57 deg); that bug is not inherited. Its cost terms are theirs (ctrl 0.005, survive 0.05), not oyster's
      (ctrl 0.5, survive 1.0, random headings in [0, 2 pi)).
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


DIRECTIONS = (-1.0, 1.0)  # PEARL's cheetah-dir / ant-dir tasks; n_train = n_eval = 2, the same two tasks
VELOCITY_TASKS = (100, 30)  # PEARL's n_train_tasks / n_eval_tasks: oyster's cheetah-vel, HypeRL's ant-vel, vel-medium


def make_task_pool(family: str, seed: int, n_train: int = VELOCITY_TASKS[0],
                   n_test: int = VELOCITY_TASKS[1]) -> tuple[list[Task], list[Task]]:  # fmt: skip
    """The fixed train and test tasks of a family (PEARL's pools).

    Direction families: the two directions d = -1 and +1, as both the train and the test tasks (PEARL's
    n_train = n_eval = 2, so its eval tasks are its train tasks); n_train and n_test do not apply to them.
    Velocity families: n_train (100) train and n_test (30) test goals drawn uniformly from the family's train and test
    ranges: [0, 3) for both pools, except HalfCheetahVelMedium, whose train goals lie in [0, 2.5) and test goals in
    [2.5, 3.0), out of distribution. Both pools come from np.random.default_rng(seed), each from its own spawned
    stream, so the test tasks do not depend on n_train.

    Where this differs from the authors' PEARL code: their velocity goals came from the unseeded global numpy RNG
    (oyster's cheetah-vel seeded it with 1337), so they differ from ours and from run to run; and their launcher's
    task-count bug trained on tasks[0:2] and evaluated on tasks[128:130] (module docstring), where here the velocity
    families really train on 100 tasks and evaluate on 30 others.
    """
    spec = family_spec(family)
    if spec.goal == "direction":
        return [Task(d) for d in DIRECTIONS], [Task(d) for d in DIRECTIONS]
    if n_train < 0 or n_test < 0:
        fail(f"task pool sizes must be non-negative, got n_train={n_train}, n_test={n_test}")
    pools = []
    for rng, n, (low, high) in zip(np.random.default_rng(seed).spawn(2), (n_train, n_test),
                                   (spec.train_velocities, spec.test_velocities)):  # fmt: skip
        pools.append([Task(float(goal)) for goal in rng.uniform(low, high, size=n)])
    return pools[0], pools[1]


# Context encoder (PEARL Sec. 4)
#
# PEARL infers a posterior q(z | c) over a task latent z from a context c of the task's transitions (s, a, r) (oyster's
# MlpEncoder; use_next_obs_in_context False). Each transition gives an independent Gaussian factor N(mu_n, sigma_n^2);
# the posterior is their product (the information bottleneck, use_information_bottleneck True), which is invariant to
# the order of the transitions; the prior is N(0, I), and KL_LAMBDA * KL(q(z | c) || N(0, I)) joins the critic's loss
# (the encoder is trained by the Q loss and this KL only). The encoder stays an MLP in Hyper-PEARL (HypeRL
# PEARL/launch_experiment.py builds MlpEncoder in both cases).

LATENT_DIM = 5  # PEARL's latent_size (oyster configs/default.py)
KL_LAMBDA = 0.1  # PEARL's kl_lambda, the weight of the KL term (oyster configs/default.py; unchanged in HypeRL)
ENCODER_HIDDEN, ENCODER_LAYERS = 200, 3  # oyster launch_experiment.py: MlpEncoder(hidden_sizes=[200, 200, 200])
MIN_VARIANCE = 1e-7  # oyster clamps the softplus variances at 1e-7


def context_dim(obs_dim: int, act_dim: int) -> int:
    """The width of one context transition (s, a, r)."""
    return obs_dim + act_dim + 1


def make_context(obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """(tasks, N, obs_dim), (tasks, N, act_dim), (tasks, N) or (tasks, N, 1) -> context (tasks, N, obs + act + 1)."""
    if rewards.dim() == obs.dim() - 1:
        rewards = rewards.unsqueeze(-1)
    return torch.cat([obs, actions, rewards], dim=-1)


def per_row(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """z (tasks, latent) repeated for each of a task's rows: rows (tasks, N, dim) -> (tasks, N, latent), a view."""
    return z.unsqueeze(-2).expand(*rows.shape[:-1], z.shape[-1])


def product_of_gaussians(mus: torch.Tensor, sigmas_squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product of N Gaussian factors per task, normalised: (tasks, N, latent) twice -> (tasks, latent) twice.

    Closed form: sigma^2 = 1 / sum_n (1 / sigma_n^2) and mu = sigma^2 * sum_n (mu_n / sigma_n^2). The variances are
    clamped at 1e-7 first, as in oyster's _product_of_gaussians.
    """
    sigmas_squared = torch.clamp(sigmas_squared, min=MIN_VARIANCE)
    sigma_squared = 1.0 / torch.sum(torch.reciprocal(sigmas_squared), dim=-2)
    mu = sigma_squared * torch.sum(mus / sigmas_squared, dim=-2)
    return mu, sigma_squared


def sample_z(posterior: Normal) -> torch.Tensor:
    """One reparameterised sample z ~ q(z | c) per task, (tasks, latent); gradients reach the encoder."""
    return posterior.rsample()


def kl_to_prior(posterior: Normal) -> torch.Tensor:
    """KL(q(z | c) || N(0, I)) per task, (tasks,): sum over latent dims of (sigma^2 + mu^2 - 1 - log sigma^2) / 2."""
    mu, variance = posterior.loc, posterior.scale**2
    return 0.5 * torch.sum(variance + mu**2 - 1.0 - torch.log(variance), dim=-1)


def fanin_uniform_(weight: torch.Tensor) -> None:
    """rlkit's fanin_init (oyster rlkit/torch/pytorch_util.py), PEARL's hidden-layer init, as written: U(+-1/sqrt(f))
    with f = weight.size(0) for a 2-D weight. rlkit calls f "fan_in", but nn.Linear stores its weight as (out, in), so
    f is the layer's output width: a 24 -> 200 encoder layer gets bound 1/sqrt(200), not 1/sqrt(24)."""
    bound = 1.0 / np.sqrt(weight.shape[0])
    nn.init.uniform_(weight, -bound, bound)


class ContextEncoder(nn.Module):
    """PEARL's context encoder: an MLP over single transitions (s, a, r) giving each a Gaussian factor over z.

    `layers` hidden layers of `hidden` units with ReLU (3 x 200), then a linear head of 2 * latent_dim: the factor's
    mean, and its variance through softplus, clamped at 1e-7. Initialised as rlkit's Mlp: hidden weights
    `fanin_uniform_` with bias 0.1, the head U(-3e-3, 3e-3) for weights and bias.
    """

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int = LATENT_DIM, hidden: int = ENCODER_HIDDEN,
                 layers: int = ENCODER_LAYERS):  # fmt: skip
        super().__init__()
        self.obs_dim, self.act_dim, self.latent_dim = obs_dim, act_dim, latent_dim
        widths = [context_dim(obs_dim, act_dim)] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], 2 * latent_dim)
        for layer in self.hidden:
            fanin_uniform_(layer.weight)
            nn.init.constant_(layer.bias, 0.1)
        nn.init.uniform_(self.head.weight, -3e-3, 3e-3)
        nn.init.uniform_(self.head.bias, -3e-3, 3e-3)

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (..., obs + act + 1) -> per-transition factors: mean and variance, each (..., latent_dim)."""
        x = context
        for layer in self.hidden:
            x = F.relu(layer(x))
        out = self.head(x)
        mus, raw = out[..., : self.latent_dim], out[..., self.latent_dim :]
        return mus, torch.clamp(F.softplus(raw), min=MIN_VARIANCE)

    def posterior(self, context: torch.Tensor) -> Normal:
        """context (tasks, N, obs + act + 1) -> q(z | c), a Normal with loc and scale (tasks, latent_dim)."""
        if context.dim() != 3 or context.shape[-1] != context_dim(self.obs_dim, self.act_dim):
            raise ValueError(f"context must be (tasks, N, {context_dim(self.obs_dim, self.act_dim)}), "
                             f"got {tuple(context.shape)}")  # fmt: skip
        mu, sigma_squared = product_of_gaussians(*self(context))
        return Normal(mu, torch.sqrt(sigma_squared), validate_args=False)

    def prior(self, n_tasks: int) -> Normal:
        """The prior N(0, I) for n_tasks tasks, (n_tasks, latent_dim)."""
        zeros = torch.zeros(n_tasks, self.latent_dim, device=self.head.weight.device)
        return Normal(zeros, torch.ones_like(zeros), validate_args=False)


# Networks: PEARL's MLPs and Hyper-PEARL's hypernetworks (paper Sec. 5)
#
# PEARL (oyster launch_experiment.py, rlkit/torch/networks.py, rlkit/torch/sac/policies.py): Q1, Q2 over [s, a, z],
# V over [s, z] and a tanh-Gaussian policy over [s, z], each 3 x 300 ReLU, initialised as rlkit's Mlp (hidden weights
# `fanin_uniform_`, bias 0.1; last layer U(+-3e-3), the policy's mean and log-std heads U(+-1e-3), TanhGaussianPolicy's
# init_w). Hyper-PEARL (HypeRL PEARL/torch/sac/hyper_*.py): the policy's meta variable is z and its base the state;
# Q's meta variable is the state and its base [a, z]; V's meta the state and base z. Each has the primary network of
# hyper_td3.py / hyper_maml.py (stages d/4, d/2, d with 2 residual blocks each, d = 1024) and a dynamic network with one
# 256-unit hidden layer; the policy has two output layers, a mean and a generated (state- and task-dependent) log-std.
# The policy's dynamic weights depend on z only, so they are computed once per task (`HyperPolicy.task_weights`) and
# applied to all of that task's states (`forward_with_weights`); the authors generated them per sample (bmm), which
# gives the same numbers at meta_batch x 256 times the primary-network cost.

REWARD_SCALE = 5.0  # PEARL's reward_scale (oyster configs/default.py; no env overrides it; unchanged in HypeRL)
PEARL_LR = 3e-4  # PEARL's policy_lr = qf_lr = vf_lr = context_lr (oyster configs/default.py)
HYPER_CRITIC_LR = 5e-5  # Hyper-PEARL's Q1, Q2 and V lr, HypeRL's hyper_lr (PEARL/configs/default.py, sac.py)
HYPER_POLICY_LR = 1e-4  # Hyper-PEARL's policy lr, hard-coded in HypeRL PEARL/torch/sac/sac.py
HYPER_CONTEXT_LR = 3e-4  # Hyper-PEARL keeps PEARL's context_lr (HypeRL PEARL/torch/sac/sac.py)
NET_SIZE, NET_LAYERS = 300, 3  # PEARL's net_size: 3 hidden layers of 300 for policy, Q1, Q2 and V
LAST_LAYER_INIT = 3e-3  # rlkit Mlp's init_w: Q and V output layers U(+-3e-3)
POLICY_HEAD_INIT = 1e-3  # rlkit TanhGaussianPolicy's init_w: mean and log-std heads U(+-1e-3)
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # TanhGaussianPolicy's clamp (also HypeRL's Hyper_Policy)
HYPER_EMBEDDING_DIM, HYPER_BLOCKS, DYNAMIC_HIDDEN = 1024, 2, 256  # HypeRL hyper_network.py; one 256 dynamic layer


def tanh_gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(a) for a = tanh(u), u ~ N(mean, exp(log_std)^2), summed over the last dim, keepdim: (..., 1).

    Change of variables: log pi(a) = log N(u) - sum log(1 - tanh(u)^2), with log(1 - tanh(u)^2) written as
    2 (log 2 - u - softplus(-2u)), exact and finite for saturated u (oyster adds 1e-6 inside the log instead).
    """
    log_det = 2.0 * (np.log(2.0) - u - F.softplus(-2.0 * u))
    return (Normal(mean, log_std.exp(), validate_args=False).log_prob(u) - log_det).sum(-1, keepdim=True)


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A reparameterised sample a = tanh(u), u ~ N(mean, std^2): (action, log-prob (..., 1), pre-tanh mean).
    The deterministic (evaluation) action is tanh(mean); actions are in [-1, 1], the task envs' action box."""
    # noise in row-major order whatever mean's memory layout (randn_like follows its strides, and torch 2.1's einsum
    # returns a transposed layout), so a batched and a per-sample call draw the same noise on every torch version
    u = mean + log_std.exp() * torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    return torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std), mean


def rlkit_mlp(in_dim: int, hidden: int, layers: int) -> nn.Sequential:
    """`layers` hidden ReLU layers of `hidden` units, `fanin_uniform_` weights, bias 0.1 (rlkit's Mlp hidden layers)."""
    modules, width_in = [], in_dim
    for _ in range(layers):
        fc = nn.Linear(width_in, hidden)
        fanin_uniform_(fc.weight)
        nn.init.constant_(fc.bias, 0.1)
        modules += [fc, nn.ReLU()]
        width_in = hidden
    return nn.Sequential(*modules)


def small_uniform_linear(in_dim: int, out_dim: int, bound: float) -> nn.Linear:
    """A linear output layer with weight and bias U(-bound, bound) (rlkit's last_fc init)."""
    fc = nn.Linear(in_dim, out_dim)
    nn.init.uniform_(fc.weight, -bound, bound)
    nn.init.uniform_(fc.bias, -bound, bound)
    return fc


class MLPQ(nn.Module):
    """PEARL's Q(s, a, z): rlkit FlattenMlp over [s, a, z], 3 x 300 ReLU, one output."""

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int = LATENT_DIM, hidden: int = NET_SIZE,
                 layers: int = NET_LAYERS):  # fmt: skip
        super().__init__()
        self.body = rlkit_mlp(obs_dim + act_dim + latent_dim, hidden, layers)
        self.last = small_uniform_linear(hidden, 1, LAST_LAYER_INIT)

    def forward(self, obs, act, z):
        """(..., obs_dim), (..., act_dim), (..., latent) -> (..., 1)."""
        return self.last(self.body(torch.cat([obs, act, z], dim=-1)))


class MLPV(nn.Module):
    """PEARL's V(s, z): rlkit FlattenMlp over [s, z], 3 x 300 ReLU, one output."""

    def __init__(self, obs_dim: int, latent_dim: int = LATENT_DIM, hidden: int = NET_SIZE, layers: int = NET_LAYERS):
        super().__init__()
        self.body = rlkit_mlp(obs_dim + latent_dim, hidden, layers)
        self.last = small_uniform_linear(hidden, 1, LAST_LAYER_INIT)

    def forward(self, obs, z):
        """(..., obs_dim), (..., latent) -> (..., 1)."""
        return self.last(self.body(torch.cat([obs, z], dim=-1)))


class MLPPolicy(nn.Module):
    """PEARL's TanhGaussianPolicy over [s, z]: 3 x 300 ReLU, linear mean and log-std heads (U(+-1e-3)), the log-std
    clamped to [-20, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int = LATENT_DIM, hidden: int = NET_SIZE,
                 layers: int = NET_LAYERS):  # fmt: skip
        super().__init__()
        self.body = rlkit_mlp(obs_dim + latent_dim, hidden, layers)
        self.mean = small_uniform_linear(hidden, act_dim, POLICY_HEAD_INIT)
        self.log_std = small_uniform_linear(hidden, act_dim, POLICY_HEAD_INIT)

    def dist_params(self, obs, z):
        """(..., obs_dim), (..., latent) -> pre-tanh mean and clamped log-std, each (..., act_dim)."""
        h = self.body(torch.cat([obs, z], dim=-1))
        return self.mean(h), torch.clamp(self.log_std(h), LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, obs, z):
        """-> (action in [-1, 1], log-prob (..., 1), pre-tanh mean)."""
        return tanh_gaussian_sample(*self.dist_params(obs, z))

    def task_weights(self, z: torch.Tensor) -> torch.Tensor:
        """The MLP's per-task conditioning is z itself, concatenated to every state (HyperPolicy's interface, so the
        sampler and the SAC update treat both policies alike)."""
        return z

    def dist_params_with_weights(self, z: torch.Tensor, obs: torch.Tensor):
        """z (tasks, latent), obs (tasks, N, obs_dim) -> mean and log-std (tasks, N, act_dim)."""
        return self.dist_params(obs, per_row(z, obs))


class ResBlock(nn.Module):
    """Pre-activation residual block x + W2 relu(W1 relu(x)) (paper Sec. 2; as in hyper_td3.py)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


class PrimaryNetwork(nn.Module):
    """Maps the meta variable to an embedding e: Linear(meta, d/4), blocks, Linear(d/4, d/2), blocks, Linear(d/2, d),
    blocks; the raw residual stream, no final activation (paper Fig. 1, d = 1024; as in hyper_td3.py)."""

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
    """Three parallel linear heads of the embedding giving one dynamic layer's weight W (out x in), bias b and gain g
    (paper Sec. 2)."""

    def __init__(self, embedding_dim: int, fan_in: int, fan_out: int):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.weight = nn.Linear(embedding_dim, fan_out * fan_in)
        self.bias = nn.Linear(embedding_dim, fan_out)
        self.gain = nn.Linear(embedding_dim, fan_out)

    def forward(self, e):
        """e (..., d) -> W (..., out, in), b (..., out), g (..., out)."""
        lead = e.shape[:-1]
        return self.weight(e).view(*lead, self.fan_out, self.fan_in), self.bias(e), self.gain(e)


def dynamic_layer(params, x: torch.Tensor) -> torch.Tensor:
    """One dynamic layer (paper eq. 1, before its non-linearity): (1 + g) * (W x) + b. W (..., out, in) with x
    (..., in) is per sample; W (tasks, out, in) with x (tasks, N, in) applies each task's weights to its N rows."""
    weight, bias, gain = params
    if x.dim() == weight.dim():  # (tasks, N, in): one weight per task, shared by its N inputs
        return (1 + gain.unsqueeze(-2)) * torch.einsum("toi,tni->tno", weight, x) + bias.unsqueeze(-2)
    return (1 + gain) * torch.einsum("...oi,...i->...o", weight, x) + bias


class HyperPolicy(nn.Module):
    """Hyper-PEARL's policy: meta z -> primary network -> a dynamic network over the state with one hidden ReLU layer
    and two output layers, the pre-tanh mean and a generated log-std (clamped to [-20, 2]); tanh-Gaussian as PEARL's.
    heads = [hidden, mean, log-std]."""

    output_init = POLICY_HEAD_INIT  # the generated output layers start like PEARL's mean and log-std heads

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int = LATENT_DIM,
                 embedding_dim: int = HYPER_EMBEDDING_DIM, blocks: int = HYPER_BLOCKS,
                 dynamic_hidden: int = DYNAMIC_HIDDEN):  # fmt: skip
        super().__init__()
        self.primary = PrimaryNetwork(latent_dim, embedding_dim, blocks)
        self.heads = nn.ModuleList(
            [
                DynamicLayerHeads(embedding_dim, obs_dim, dynamic_hidden),
                DynamicLayerHeads(embedding_dim, dynamic_hidden, act_dim),
                DynamicLayerHeads(embedding_dim, dynamic_hidden, act_dim),
            ]
        )

    def task_weights(self, z: torch.Tensor):
        """z (tasks, latent) -> the dynamic network's [(W, b, g)] per task: run the primary network once per task."""
        e = self.primary(z)
        return [head(e) for head in self.heads]

    def dist_params_with_weights(self, weights, obs: torch.Tensor):
        """weights from `task_weights`, obs (tasks, N, obs_dim) -> pre-tanh mean and log-std (tasks, N, act_dim).
        Also accepts per-sample weights (B, ...) with obs (B, obs_dim)."""
        hidden, mean, log_std = weights
        h = F.relu(dynamic_layer(hidden, obs))
        return dynamic_layer(mean, h), torch.clamp(dynamic_layer(log_std, h), LOG_STD_MIN, LOG_STD_MAX)

    def forward_with_weights(self, weights, obs: torch.Tensor):
        """-> (action, log-prob (tasks, N, 1), pre-tanh mean) for obs (tasks, N, obs_dim)."""
        return tanh_gaussian_sample(*self.dist_params_with_weights(weights, obs))

    def dist_params(self, obs: torch.Tensor, z: torch.Tensor):
        """Per sample: obs (B, obs_dim), z (B, latent) -> mean and log-std (B, act_dim)."""
        return self.dist_params_with_weights(self.task_weights(z), obs)

    def forward(self, obs: torch.Tensor, z: torch.Tensor):
        """Per sample (one primary-network pass per row): -> (action, log-prob (B, 1), pre-tanh mean)."""
        return tanh_gaussian_sample(*self.dist_params(obs, z))


class HyperQ(nn.Module):
    """Hyper-PEARL's Q(s, a, z): meta = state, base = [a, z]; one dynamic hidden ReLU layer, one output."""

    output_init = LAST_LAYER_INIT  # the generated output layer starts like PEARL's Q output layer

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int = LATENT_DIM,
                 embedding_dim: int = HYPER_EMBEDDING_DIM, blocks: int = HYPER_BLOCKS,
                 dynamic_hidden: int = DYNAMIC_HIDDEN):  # fmt: skip
        super().__init__()
        self.primary = PrimaryNetwork(obs_dim, embedding_dim, blocks)
        self.heads = nn.ModuleList(
            [
                DynamicLayerHeads(embedding_dim, act_dim + latent_dim, dynamic_hidden),
                DynamicLayerHeads(embedding_dim, dynamic_hidden, 1),
            ]
        )

    def forward(self, obs, act, z):
        """(..., obs_dim), (..., act_dim), (..., latent) -> (..., 1); dynamic weights per sample (from its state)."""
        e = self.primary(obs)  # once per state, shared by both dynamic layers' heads
        hidden, out = [head(e) for head in self.heads]
        return dynamic_layer(out, F.relu(dynamic_layer(hidden, torch.cat([act, z], dim=-1))))


class HyperV(nn.Module):
    """Hyper-PEARL's V(s, z): meta = state, base = z; one dynamic hidden ReLU layer, one output."""

    output_init = LAST_LAYER_INIT

    def __init__(self, obs_dim: int, latent_dim: int = LATENT_DIM, embedding_dim: int = HYPER_EMBEDDING_DIM,
                 blocks: int = HYPER_BLOCKS, dynamic_hidden: int = DYNAMIC_HIDDEN):  # fmt: skip
        super().__init__()
        self.primary = PrimaryNetwork(obs_dim, embedding_dim, blocks)
        self.heads = nn.ModuleList(
            [
                DynamicLayerHeads(embedding_dim, latent_dim, dynamic_hidden),
                DynamicLayerHeads(embedding_dim, dynamic_hidden, 1),
            ]
        )

    def forward(self, obs, z):
        """(..., obs_dim), (..., latent) -> (..., 1)."""
        e = self.primary(obs)
        hidden, out = [head(e) for head in self.heads]
        return dynamic_layer(out, F.relu(dynamic_layer(hidden, z)))


AUTHORS_HEAD_INIT = (0.05, 0.008, 0.001)  # HypeRL hyper_network.py: U(+-c) head weights for [hidden, output, log-std]
HYPER_EMBEDDING_NORM = 8.0  # rms norm of the embedding under --hyper-init pytorch (as hyper_sac.py's)
MAX_EMBEDDING_NORM_RATIO = 1.25  # the policy's embedding norms at prior and at posterior z differ by at most this


def rms_norm(e: torch.Tensor) -> float:
    """The root-mean-square norm of a batch of embeddings (..., d)."""
    return e.pow(2).sum(-1).mean().sqrt().item()


@torch.no_grad()
def balance_input_scale(primary: PrimaryNetwork, groups: tuple, max_ratio: float = MAX_EMBEDDING_NORM_RATIO,
                        steps: int = 8) -> float:  # fmt: skip
    """Scale the input projection's weights (not its bias) by the largest g in (0, 1], found by bisection to 2^-steps,
    for which the embedding's rms norms on the groups of meta samples differ by at most max_ratio; returns g. At g = 0
    the embedding does not depend on the meta variable, so the ratio is 1 there and the search always succeeds."""
    first = primary.net[0]
    weight = first.weight.clone()

    def ratio(g: float) -> float:
        first.weight.copy_(g * weight)
        norms = [rms_norm(primary(group)) for group in groups]
        return max(norms) / min(norms)

    low, high = 0.0, 1.0
    if ratio(high) <= max_ratio:
        low = high
    for _ in range(steps if low < high else 0):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio(middle) <= max_ratio else (low, middle)
    first.weight.copy_(low * weight)
    return low


def init_hypernetwork(module: nn.Module, meta_samples: Optional[torch.Tensor],
                      scheme: Literal["pytorch", "authors"] = "pytorch", embedding_norm: float = HYPER_EMBEDDING_NORM,
                      balance: Optional[tuple] = None) -> None:  # fmt: skip
    """Initialise a module with `.primary`, `.heads` (hidden layer first) and `.output_init` (HyperPolicy, HyperQ,
    HyperV).

    pytorch (default), the principle of hyper_sac.py's init. The paper (Sec. 2) initializes the primary network so
    that the initial dynamic weights resemble, on average, Kaiming-uniform; we match PyTorch's default nn.Linear init,
    U(+-1/sqrt(n)) for weights AND biases (n = fan-in), on average over `meta_samples`, the meta variables the network
    first sees (states for Q and V; for the policy, z as it is used: from the prior and from posteriors):
    1. Primary layers keep PyTorch's default init, nonzero biases included. With `balance`, groups of meta samples
       that must give embeddings of about the same norm (the policy's prior and posterior z), the input projection's
       weights are then scaled down by `balance_input_scale`. Under PyTorch's default a prior z (|z| ~ sqrt(5))
       outweighs the first layer's bias by sqrt(5), the embedding at prior z is about twice as large as at posterior
       z (|z| ~ 0.1 at first), and at paper size 15 updates on posterior z left 10-20% of the policy's means
       saturated at prior z. Scaled, z changes the generated network about as much as the released init lets it.
       Then the last stage is rescaled so that the embedding e has root-mean-square norm `embedding_norm` over
       `meta_samples`: scaling a ReLU stage's input projection and every bias in it by c > 0 scales its output by
       exactly c (and leaves the ratio of step 1 as it is).
    2. Weight and bias heads: weights U(+-h), biases 0. A generated entry is sum_k H_k e_k, so its mean square over
       the samples is (h^2 / 3) E|e|^2, and h = bound / embedding_norm gives U(+-bound)'s variance bound^2 / 3. The
       hidden layer's bound is PyTorch's 1/sqrt(n); the output layers' is `module.output_init`, that of the PEARL
       layer they stand for (Q and V U(+-3e-3), the policy's mean and log-std U(+-1e-3)), so Hyper-PEARL's critics
       and policy start as flat as PEARL's.
    3. Gain heads start at zero: every gain 1 + g starts at exactly 1.
    The generated biases are nonzero and depend on the meta variable. With zero biases (and a bias-free primary
    network) the network would be positively homogeneous: Q(s, k a, k z) = k Q(s, a, z) for k > 0, and the policy's
    generated weights would scale with |z|, its mean with |z|^2, so a policy trained on posterior z (|z| ~ 0.1 at
    first) would act saturated at prior z (|z| ~ sqrt(latent_dim)).
    The embedding norm sets the step size in generated-weight space: one Adam step moves each head weight by about
    the lr, so a generated entry moves by up to lr * sum_k |e_k|. With norm 8 the hidden heads' bounds, 1/(8 sqrt(n))
    for fan-ins n = 5 to 27, are 0.024 to 0.056, about the released 0.05, where the authors' learning rates were
    tuned.

    authors: the released code's constants (HypeRL PEARL/torch/sac/hyper_network.py): primary weights
    U(+-1 / (2 sqrt(fan_in))) with torch's default biases; the weight, bias and gain heads' weights U(+-c) with c = 0.05
    (hidden layer), 0.008 (output) and 0.001 (the policy's log-std), zero head biases.
    """
    with torch.no_grad():
        if scheme == "authors":
            for layer in module.primary.modules():
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / (2.0 * np.sqrt(layer.in_features))
                    nn.init.uniform_(layer.weight, -bound, bound)  # the bias keeps torch's default
            for head, bound in zip(module.heads, AUTHORS_HEAD_INIT):
                for fc in (head.weight, head.bias, head.gain):
                    nn.init.uniform_(fc.weight, -bound, bound)
                    nn.init.zeros_(fc.bias)
            return
        for layer in module.primary.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        if balance is not None:
            balance_input_scale(module.primary, balance)
        scale = embedding_norm / rms_norm(module.primary(meta_samples))
        layers = list(module.primary.net)
        last_stage = layers[max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)) :]
        last_stage[0].weight.mul_(scale)
        for layer in (m for stage_layer in last_stage for m in stage_layer.modules()):
            if isinstance(layer, nn.Linear):
                layer.bias.mul_(scale)
        for i, head in enumerate(module.heads):
            bound = (1.0 / np.sqrt(head.fan_in) if i == 0 else module.output_init) / embedding_norm
            for fc in (head.weight, head.bias):
                nn.init.uniform_(fc.weight, -bound, bound)
            nn.init.zeros_(head.gain.weight)
            for fc in (head.weight, head.bias, head.gain):
                nn.init.zeros_(fc.bias)


# Soft actor-critic with a task latent (PEARL Sec. 4-5; oyster rlkit/torch/sac/sac.py)
#
# PEARL's SAC has twin Q networks, a V network and a Polyak-averaged target V, and no entropy temperature: the reward is
# scaled by 5 instead (the entropy weight is effectively 1/5). One training step, on a meta-batch of train tasks with
# 256 transitions and a context batch per task:
#   z ~ q(z | c)                                   one reparameterised sample per task, from its context batch
#   Q target   y   = 5 r + gamma (1 - d) V_target(s', z)
#   Q loss         = mean (Q1(s, a, z) - y)^2 + mean (Q2(s, a, z) - y)^2
#                    + 0.1 * sum over tasks KL(q(z|c) || N(0, I))
#   V target       = min(Q1, Q2)(s, a~, z) - log pi(a~ | s, z),   a~ ~ pi(. | s, z)
#   policy loss    = mean(log pi(a~ | s, z) - min(Q1, Q2)(s, a~, z)) + 1e-3 mean(mean^2) + 1e-3 mean(log_std^2)
# The encoder is trained by the Q loss and the KL term only: V, V_target and the policy see z.detach(). As in oyster,
# the Q and encoder step comes first, and V's target and the policy loss use the updated Q networks. Those two evaluate
# Q with its parameters frozen, so no graph is built for Q's weights (for Hyper-PEARL: Q's dynamic weights are computed
# without grad, and only the dynamic network is differentiated, with respect to the action).

TAU = 0.005  # PEARL's soft_target_tau
GAMMA = 0.99  # PEARL's discount
POLICY_MEAN_REG, POLICY_STD_REG = 1e-3, 1e-3  # PEARL's policy_mean_reg_weight and policy_std_reg_weight


class frozen:
    """Context manager: the modules' parameters stop requiring grad, so a loss that goes through them builds no
    autograd graph for their weights."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam with PyTorch's fused kernel: one pass over each tensor where the default for-loop version makes ~6, about
    3x faster on the hypernetworks' millions of parameters (docs/speed.md). Same update rule; results differ from the
    for-loop version by float rounding only."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # torch < 2.4 has no fused Adam on the CPU; the for-loop one makes the same update
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def soft_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def q_target(rewards, terminals, next_v, reward_scale: float, gamma: float) -> torch.Tensor:
    """y = reward_scale * r + gamma * (1 - d) * V_target(s', z). Only true terminations set d; the 200-step time
    limit does not (oyster's rollouts just stop at max_path_length)."""
    return reward_scale * rewards + gamma * (1.0 - terminals) * next_v


class PEARLAgent(nn.Module):
    """The context encoder, the policy, Q1, Q2, V and the target V of one run (MLP or hypernetwork models)."""

    def __init__(self, encoder: ContextEncoder, policy: nn.Module, qf1: nn.Module, qf2: nn.Module, vf: nn.Module,
                 target_vf: nn.Module):  # fmt: skip
        super().__init__()
        self.encoder, self.policy, self.qf1, self.qf2, self.vf, self.target_vf = (
            encoder,
            policy,
            qf1,
            qf2,
            vf,
            target_vf,
        )
        self.target_vf.load_state_dict(self.vf.state_dict())
        self.target_vf.requires_grad_(False)


@dataclass
class Batch:
    """A meta-batch of transitions, every field (tasks, N, dim); rewards and terminals are (tasks, N, 1)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminals: torch.Tensor


def critic_loss(
    agent: PEARLAgent, batch: Batch, context: torch.Tensor, reward_scale: float, gamma: float, kl_lambda: float
):
    """Q loss plus kl_lambda * KL, the one loss that reaches the encoder. Returns (loss, z (tasks, latent), stats)."""
    posterior = agent.encoder.posterior(context)
    z = sample_z(posterior)
    kl = kl_to_prior(posterior).sum()  # summed over tasks, as oyster's compute_kl_div
    z_rows = per_row(z, batch.obs)
    q1 = agent.qf1(batch.obs, batch.actions, z_rows)
    q2 = agent.qf2(batch.obs, batch.actions, z_rows)
    with torch.no_grad():
        target = q_target(batch.rewards, batch.terminals, agent.target_vf(batch.next_obs, z_rows), reward_scale, gamma)
    qf1_loss, qf2_loss = F.mse_loss(q1, target), F.mse_loss(q2, target)
    stats = {"qf1_loss": qf1_loss, "qf2_loss": qf2_loss, "qf1_values": q1.mean(), "qf2_values": q2.mean(),
             "kl_div": kl, "z_mean": posterior.loc.abs().mean(), "z_var": posterior.scale.pow(2).mean(),
             "q_target": target}  # fmt: skip
    return qf1_loss + qf2_loss + kl_lambda * kl, z, stats


def value_and_policy_losses(agent: PEARLAgent, batch: Batch, z: torch.Tensor):
    """V loss and policy loss on the detached z; Q is evaluated frozen. Returns (vf_loss, policy_loss, stats)."""
    z = z.detach()
    weights = agent.policy.task_weights(z)  # Hyper-PEARL: the dynamic weights once per task, not per transition
    mean, log_std = agent.policy.dist_params_with_weights(weights, batch.obs)
    new_actions, log_pi, _ = tanh_gaussian_sample(mean, log_std)
    z_rows = per_row(z, batch.obs)
    with frozen(agent.qf1, agent.qf2):
        min_q_new = torch.min(agent.qf1(batch.obs, new_actions, z_rows), agent.qf2(batch.obs, new_actions, z_rows))
    vf_loss = F.mse_loss(agent.vf(batch.obs, z_rows), (min_q_new - log_pi).detach())
    regulariser = POLICY_MEAN_REG * mean.pow(2).mean() + POLICY_STD_REG * log_std.pow(2).mean()
    policy_loss = (log_pi - min_q_new).mean() + regulariser
    return vf_loss, policy_loss, {"vf_loss": vf_loss, "actor_loss": policy_loss, "log_pi": log_pi.mean()}


SATURATED_PRE_TANH = 3.0  # tanh'(3) = 0.01: beyond this a squashed action barely follows its gradient


@torch.no_grad()
def policy_saturation(policy: nn.Module, obs: torch.Tensor, z: torch.Tensor) -> float:
    """The fraction of pre-tanh means with |mean| > 3 for obs (tasks, N, obs_dim) under z (tasks, latent)."""
    mean, _ = policy.dist_params_with_weights(policy.task_weights(z), obs)
    return (mean.abs() > SATURATED_PRE_TANH).float().mean().item()


@torch.no_grad()
def saturation_diagnostics(agent: PEARLAgent, batch: Batch, context: torch.Tensor, rng: np.random.Generator) -> dict:
    """Policy saturation on a meta-batch's states, with one z per task drawn from the prior (as when the policy explores
    and collects) and from the posterior of the task's context batch (as in the gradient steps). Noise from `rng`, so
    the diagnostic leaves the training's random streams untouched."""
    prior, posterior = agent.encoder.prior(len(context)), agent.encoder.posterior(context)
    noise = torch.as_tensor(rng.standard_normal((2, *prior.loc.shape)), dtype=torch.float32, device=prior.loc.device)
    return {
        f"policy_saturation_{name}_z": policy_saturation(agent.policy, batch.obs, q.loc + q.scale * eps)
        for name, q, eps in (("prior", prior, noise[0]), ("posterior", posterior, noise[1]))
    }


def train_step(agent: PEARLAgent, optimizers: dict, batch: Batch, context: torch.Tensor,
               reward_scale: float = REWARD_SCALE, gamma: float = GAMMA, tau: float = TAU,
               kl_lambda: float = KL_LAMBDA) -> dict:  # fmt: skip
    """One PEARL gradient step (see the section comment), each optimizer step guarded (`guarded_step`): a non-finite
    loss stops the step before it reaches the weights, a non-finite weight right after it. Returns the step's
    scalars as detached 0-dim tensors on the networks' device, so that a step needs no host sync beyond the guard's."""
    loss, z, stats = critic_loss(agent, batch, context, reward_scale, gamma, kl_lambda)
    guarded_step([optimizers[name] for name in ("context", "qf1", "qf2")], loss, "Q and encoder", {"Q loss + KL": loss})

    vf_loss, policy_loss, more = value_and_policy_losses(agent, batch, z)
    # one backward for both: disjoint parameters, V's loss has a detached target and the policy's no V
    guarded_step([optimizers["vf"], optimizers["policy"]], vf_loss + policy_loss, "V and policy",
                 {"V loss": vf_loss, "policy loss": policy_loss})  # fmt: skip
    soft_update(agent.vf, agent.target_vf, tau)
    stats.pop("q_target")
    return {k: v.detach() for k, v in {**stats, **more, "qf_loss": stats["qf1_loss"] + stats["qf2_loss"]}.items()}


class PEARL:
    """The learner: the agent's networks and an Adam optimizer for each of the encoder, the policy, Q1, Q2 and V
    (PEARL's or Hyper-PEARL's learning rates). `update` is one PEARL gradient step (`train_step`)."""

    def __init__(self, args, agent: PEARLAgent):
        self.args, self.agent, lrs = args, agent, learning_rates(args)
        modules = {"policy": agent.policy, "qf1": agent.qf1, "qf2": agent.qf2, "vf": agent.vf, "context": agent.encoder}
        self.optimizers = {
            name: adam(module.parameters(), lr=lrs[name]) for name, module in modules.items()
        }

    def update(self, batch: Batch, context: torch.Tensor) -> dict:
        args = self.args
        return train_step(self.agent, self.optimizers, batch, context, args.reward_scale, args.gamma, args.tau,
                          args.kl_lambda)  # fmt: skip

    def state_dict(self) -> dict:
        optimizers = {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}
        return {"agent": self.agent.state_dict(), "optimizers": optimizers}

    def load_state_dict(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])


# Replay: per-task buffers (oyster MultiTaskReplayBuffer)
#
# Each train task has an RL buffer, which keeps everything collected for it (up to --buffer-size, then oldest first),
# and an encoder buffer, cleared each time the task is sampled for collection, so the context that trains the encoder
# comes from recent prior (and posterior) rollouts only. Transitions ending an episode by termination are stored with
# d = 1 (the authors' rollout, HypeRL PEARL/torch/samplers/util.py, dropped them).

FIELDS = ("obs", "actions", "rewards", "next_obs", "terminals")


def to_device(array: np.ndarray, device=None) -> torch.Tensor:
    """A numpy batch as a tensor on `device` (None: the CPU, sharing the array's memory). To CUDA it is copied through
    pinned memory asynchronously, so the host queues the copy behind the GPU's work instead of waiting for it."""
    tensor = torch.as_tensor(array)
    if device is None or tensor.device == torch.device(device):
        return tensor
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class TaskBuffer:
    """One task's transitions in growing float32 numpy arrays, FIFO once `capacity` is reached."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int):
        self.widths = {"obs": obs_dim, "actions": act_dim, "rewards": 1, "next_obs": obs_dim, "terminals": 1}
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        self.data = {k: np.zeros((0, w), dtype=np.float32) for k, w in self.widths.items()}
        self.size, self.pos = 0, 0

    def add_path(self, path: dict) -> None:
        n = len(path["rewards"])
        for i in range(n):  # a path is at most 200 rows; the per-row loop keeps FIFO wrap-around simple
            if self.size < self.capacity and self.size == len(self.data["obs"]):
                grow = min(max(2 * self.size, 1024), self.capacity) - self.size
                for k, w in self.widths.items():
                    self.data[k] = np.concatenate([self.data[k], np.zeros((grow, w), dtype=np.float32)])
            for k in FIELDS:
                self.data[k][self.pos] = path[k][i]
            self.pos = (self.pos + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> dict:
        """n transitions uniformly with replacement (rlkit's random_batch)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty task buffer")
        idx = rng.integers(0, self.size, size=n)
        return {k: self.data[k][idx] for k in FIELDS}

    def state_dict(self) -> dict:
        data = {k: torch.from_numpy(v[: self.size].copy()) for k, v in self.data.items()}
        return {"data": data, "pos": self.pos, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        self.data = {k: v.numpy() for k, v in state["data"].items()}
        self.size, self.pos = state["size"], state["pos"]


class MultiTaskBuffer:
    """A TaskBuffer per task index."""

    def __init__(self, n_tasks: int, obs_dim: int, act_dim: int, capacity: int):
        self.tasks = [TaskBuffer(obs_dim, act_dim, capacity) for _ in range(n_tasks)]

    def sample_batch(self, task_indices, n: int, rng: np.random.Generator, device=None) -> Batch:
        """n transitions from each listed task -> a Batch of (tasks, n, dim) tensors on `device` (None: the CPU)."""
        samples = [self.tasks[i].sample(n, rng) for i in task_indices]
        return Batch(*(to_device(np.stack([s[k] for s in samples]), device) for k in FIELDS))

    def sample_context(self, task_indices, n: int, rng: np.random.Generator, device=None) -> torch.Tensor:
        """n transitions from each listed task -> a context (tasks, n, obs + act + 1) of (s, a, r) on `device`."""
        samples = [self.tasks[i].sample(n, rng) for i in task_indices]
        return make_context(
            *(to_device(np.stack([s[k] for s in samples]), device) for k in ("obs", "actions", "rewards"))
        )

    def state_dict(self) -> list:
        return [buffer.state_dict() for buffer in self.tasks]

    def load_state_dict(self, state: list) -> None:
        for buffer, s in zip(self.tasks, state):
            buffer.load_state_dict(s)


# Sampling and evaluation (oyster rlkit/samplers/in_place.py, rl_algorithm.py: collect_data, collect_paths, _do_eval)
#
# The latent z is fixed for a whole trajectory, so Hyper-PEARL's policy generates its dynamic weights once per
# trajectory (`task_weights`), not once per step.


@torch.no_grad()
def rollout(env: gym.Env, policy: nn.Module, z: torch.Tensor, deterministic: bool, seed: int) -> dict:
    """One episode (at most the env's 200 steps) with a fixed z (1, latent): a path of float32 arrays in FIELDS order,
    rewards and terminals (T, 1). Stochastic actions tanh(u), u ~ N(mean, std^2), or tanh(mean) when deterministic."""
    weights = policy.task_weights(z)
    obs, _ = env.reset(seed=seed)
    path = {k: [] for k in FIELDS}
    while True:  # one observation to z's device and one action back per step
        mean, log_std = policy.dist_params_with_weights(
            weights, torch.as_tensor(obs, dtype=torch.float32, device=z.device).view(1, 1, -1)
        )
        action = torch.tanh(mean if deterministic else mean + log_std.exp() * torch.randn_like(mean))
        action = action.view(-1).cpu().numpy()
        if not np.isfinite(action).all():
            raise NonFinite("non-finite action from the policy")
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(FIELDS, (obs, action, [reward], next_obs, [float(terminated)])):
            path[k].append(np.asarray(v, dtype=np.float32))
        obs = next_obs
        if terminated or truncated:
            return {k: np.stack(v) for k, v in path.items()}


def new_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def draw_z(q: Normal, rng: np.random.Generator) -> torch.Tensor:
    """z ~ q with its noise from `rng`, not from torch's stream: evaluation leaves the training's streams untouched."""
    noise = torch.as_tensor(rng.standard_normal(tuple(q.loc.shape)), dtype=q.loc.dtype, device=q.loc.device)
    return q.loc + q.scale * noise


def buffer_context(buffer: TaskBuffer, n: int, rng: np.random.Generator, device=None) -> torch.Tensor:
    """A context of n transitions (s, a, r) sampled from one task's buffer, (1, n, obs + act + 1), on `device`."""
    sample = buffer.sample(n, rng)
    return make_context(*(to_device(sample[k], device).unsqueeze(0) for k in ("obs", "actions", "rewards")))


def collect(env: TaskEnv, task: Task, agent: PEARLAgent, n_steps: int, rl_buffer: TaskBuffer,
            encoder_buffer: TaskBuffer, add_to_encoder: bool, use_posterior: bool, context_batch: int,
            rng: np.random.Generator) -> list:  # fmt: skip
    """oyster's collect_data: whole trajectories until at least n_steps transitions, starting from z ~ prior. With
    use_posterior, z is re-inferred after every trajectory from a context batch of the task's encoder buffer (the
    prior while that buffer is empty); otherwise z is redrawn from the prior. Paths go to the RL buffer, and to the
    encoder buffer if add_to_encoder. Returns the paths."""
    env.set_task(task)
    z, paths, steps = agent.encoder.prior(1).sample(), [], 0
    while steps < n_steps:
        path = rollout(env, agent.policy, z, deterministic=False, seed=new_seed(rng))
        paths.append(path)
        steps += len(path["rewards"])
        rl_buffer.add_path(path)
        if add_to_encoder:
            encoder_buffer.add_path(path)
        if use_posterior and encoder_buffer.size > 0:
            with torch.no_grad():
                context = buffer_context(encoder_buffer, context_batch, rng, z.device)
                z = sample_z(agent.encoder.posterior(context))
        else:
            z = agent.encoder.prior(1).sample()
    return paths


@torch.no_grad()
def adaptation_returns(env: TaskEnv, task: Task, agent: PEARLAgent, n_steps: int, n_exploration: int,
                       rng: np.random.Generator) -> list:  # fmt: skip
    """PEARL's evaluation of one task (oyster collect_paths): deterministic trajectories until at least n_steps
    transitions, accumulating the context online. The first n_exploration trajectories use z drawn from the prior
    (a new draw per trajectory); from then on z is drawn from the posterior given all context so far, re-inferred
    after every trajectory. Every z is drawn with `rng`. Returns the undiscounted return of each trajectory; the last
    is the adapted one."""
    env.set_task(task)
    z, context, returns, steps = draw_z(agent.encoder.prior(1), rng), [], [], 0
    while steps < n_steps:
        path = rollout(env, agent.policy, z, deterministic=True, seed=new_seed(rng))
        returns.append(float(path["rewards"].sum()))
        steps += len(path["rewards"])
        context.append(make_context(*(to_device(path[k], z.device) for k in ("obs", "actions", "rewards"))))
        if len(returns) >= n_exploration:
            z = draw_z(agent.encoder.posterior(torch.cat(context).unsqueeze(0)), rng)
        else:
            z = draw_z(agent.encoder.prior(1), rng)
    return returns


def evaluate(env: TaskEnv, tasks: list, agent: PEARLAgent, runs: int, n_steps: int, n_exploration: int,
             rng: np.random.Generator) -> tuple[float, list]:  # fmt: skip
    """oyster's _do_eval over `tasks`: the mean over tasks of (the mean over `runs` runs of the last trajectory's
    return), and the online returns (mean over tasks and runs of the k-th trajectory's return, for every k that all
    runs reach)."""
    final, online = [], []
    for task in tasks:
        per_run = [adaptation_returns(env, task, agent, n_steps, n_exploration, rng) for _ in range(runs)]
        final.append(np.mean([returns[-1] for returns in per_run]))
        online.extend(per_run)
    shortest = min(len(returns) for returns in online)
    return float(np.mean(final)), [float(np.mean([r[k] for r in online])) for k in range(shortest)]


# The run's settings: the collection schedule and the command line

# PEARL's data-collection schedule and evaluation per family (oyster configs/*.json and HypeRL PEARL/configs/*.json):
# meta_batch, num_steps_prior, num_extra_rl_steps_posterior, num_evals, embedding_batch_size,
# num_train_steps_per_itr. Ant-Fwd-Back's 2 evals per task are HypeRL's (oyster's ant-dir had 4); Ant-Vel and
# Half-Cheetah-Vel-Medium (HypeRL's additions) use cheetah-vel's schedule, as their JSONs do.
FAMILY_SCHEDULES = {
    "HalfCheetahFwdBack": dict(meta_batch=4, num_steps_prior=1000, num_extra_rl_steps_posterior=1000, num_evals=4,
                               embedding_batch_size=256, num_train_steps_per_itr=2000),
    "AntFwdBack": dict(meta_batch=4, num_steps_prior=400, num_extra_rl_steps_posterior=600, num_evals=2,
                       embedding_batch_size=256, num_train_steps_per_itr=4000),
    "HalfCheetahVel": dict(meta_batch=16, num_steps_prior=400, num_extra_rl_steps_posterior=600, num_evals=1,
                           embedding_batch_size=100, num_train_steps_per_itr=2000),
}  # fmt: skip
FAMILY_SCHEDULES["AntVel"] = FAMILY_SCHEDULES["HalfCheetahVelMedium"] = FAMILY_SCHEDULES["HalfCheetahVel"]


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "hyper_pearl"
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
    eval_freq: int = 1
    """evaluate on the test tasks and as many train tasks every this many iterations and at the last (0 disables)"""
    progress_freq: int = 1
    """print a progress line (iteration, s/it, env steps/s, ETA, returns) every this many iterations"""
    save_model: bool = False
    """save the final models to runs/{run_name}/{exp_name}.cleanrl_model"""
    checkpoint_freq: int = 10
    """write a resumable checkpoint (models, optimizers, buffers, RNGs) every this many iterations and at the end
    (0 disables)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue from; pass the same settings as the original run"""

    # --- algorithm (PEARL; oyster's configs/default.py with HypeRL's changes) ---
    env_id: FamilyName = "HalfCheetahVel"
    """the task family (PEARL's cheetah-dir, ant-dir, cheetah-vel; HypeRL's ant-vel and cheetah-vel-medium)"""
    num_iterations: int = 400
    """training iterations: collection, then gradient steps, then evaluation (HypeRL's 400; oyster 500)"""
    num_train_tasks: int = 100
    """train tasks of the velocity families (the direction families always use the two directions)"""
    num_test_tasks: int = 30
    """test tasks of the velocity families (Half-Cheetah-Vel-Medium's lie out of distribution, in [2.5, 3.0))"""
    num_initial_steps: int = 2000
    """transitions collected with z ~ prior for every train task before the first iteration"""
    num_tasks_sample: int = 5
    """train tasks (drawn with replacement) collected for in every iteration"""
    num_steps_prior: Optional[int] = None
    """transitions per sampled task with z ~ prior, into both buffers; None: the family's (1000 cheetah fwd-back,
    else 400)"""
    num_extra_rl_steps_posterior: Optional[int] = None
    """transitions per sampled task with z ~ posterior, RL buffer only; None: the family's (1000 cheetah fwd-back,
    else 600)"""
    num_train_steps_per_itr: Optional[int] = None
    """gradient steps per iteration; None: the family's (4000 ant fwd-back, else 2000)"""
    meta_batch: Optional[int] = None
    """tasks per gradient step (with replacement); None: the family's (4 for fwd-back, 16 for the velocity families)"""
    batch_size: int = 256
    """RL transitions per task per gradient step"""
    embedding_batch_size: Optional[int] = None
    """context transitions per task per gradient step and per posterior; None: the family's (256 fwd-back,
    100 velocity)"""
    buffer_size: int = 1_000_000
    """capacity of each task's RL buffer"""
    gamma: float = GAMMA
    """discount factor"""
    tau: float = TAU
    """soft update rate of the target V network"""
    reward_scale: float = REWARD_SCALE
    """multiplier of the reward in the Q target (PEARL's stand-in for SAC's entropy temperature, 1 / alpha)"""
    kl_lambda: float = KL_LAMBDA
    """weight of KL(q(z | c) || N(0, I)) in the encoder's loss"""
    num_evals: Optional[int] = None
    """evaluation runs per task; None: the family's (4 cheetah fwd-back, 2 ant fwd-back, 1 velocity)"""
    num_steps_per_eval: int = 600
    """transitions per evaluation run (three 200-step trajectories)"""
    num_exp_traj_eval: int = 2
    """evaluation trajectories with z ~ prior before z is drawn from the posterior of the accumulated context"""

    # --- model ---
    model: Literal["mlp", "hyper"] = "hyper"
    """mlp: PEARL's 3 x 300 MLP policy, Q and V; hyper: Hyper-PEARL's hypernetwork policy (meta z), Q and V
    (meta state)"""
    policy_lr: Optional[float] = None
    """policy learning rate; None: 3e-4 for mlp, 1e-4 for hyper"""
    qf_lr: Optional[float] = None
    """Q1 and Q2 learning rate; None: 3e-4 for mlp, 5e-5 for hyper"""
    vf_lr: Optional[float] = None
    """V learning rate; None: 3e-4 for mlp, 5e-5 for hyper"""
    context_lr: float = PEARL_LR
    """context encoder learning rate (3e-4 for both models)"""
    latent_dim: int = LATENT_DIM
    """size of the task latent z"""
    net_size: int = NET_SIZE
    """hidden width of the MLP policy, Q and V (3 layers)"""
    encoder_hidden: int = ENCODER_HIDDEN
    """hidden width of the context encoder (3 layers)"""
    hyper_embedding_dim: int = HYPER_EMBEDDING_DIM
    """width of the primary network's output embedding; its stages are dim/4, dim/2, dim (paper: 256, 512, 1024)"""
    hyper_blocks: int = HYPER_BLOCKS
    """residual blocks per stage of the primary network (paper: 2)"""
    hyper_dynamic_hidden: int = DYNAMIC_HIDDEN
    """hidden units of the single hidden layer of the dynamic networks (paper: 256)"""
    hyper_init: Literal["pytorch", "authors"] = "pytorch"
    """pytorch: generated weights and biases match PyTorch's default nn.Linear init on average over the first meta
    variables, gains 1, output layers as PEARL's (paper Sec. 2); authors: the released code's constants"""
    hyper_embedding_norm: float = HYPER_EMBEDDING_NORM
    """--hyper-init pytorch: rms norm of the primary networks' embeddings over the first meta variables; sets how far
    one Adam step moves the generated weights (8: about as far as with the released constants)"""
    hyper_init_samples: int = 1000
    """--hyper-init pytorch: random-action transitions whose states (Q, V) and latents (policy: half prior, half
    posteriors of their contexts) calibrate the init"""


def schedule(args: Args, name: str) -> int:
    """An Args value that defaults (None) to the family's schedule."""
    value = getattr(args, name)
    return FAMILY_SCHEDULES[args.env_id][name] if value is None else value


def learning_rates(args: Args) -> dict:
    """The optimizers' learning rates: PEARL's 3e-4, or Hyper-PEARL's 5e-5 for Q and V and 1e-4 for the policy."""
    hyper = args.model == "hyper"
    return {"policy": args.policy_lr if args.policy_lr is not None else (HYPER_POLICY_LR if hyper else PEARL_LR),
            "qf1": args.qf_lr if args.qf_lr is not None else (HYPER_CRITIC_LR if hyper else PEARL_LR),
            "qf2": args.qf_lr if args.qf_lr is not None else (HYPER_CRITIC_LR if hyper else PEARL_LR),
            "vf": args.vf_lr if args.vf_lr is not None else (HYPER_CRITIC_LR if hyper else PEARL_LR),
            "context": args.context_lr}  # fmt: skip


def collect_init_context(family: str, task: Task, n: int, seed: int) -> torch.Tensor:
    """n transitions (s, a, r) of uniformly random actions in the family's env (its own seed), (n, obs + act + 1): the
    sample on which --hyper-init pytorch calibrates Q's and V's init (their states) and the policy's (the posteriors
    of contexts drawn from it)."""
    env, rng, transitions = make_task_env(family, task), np.random.default_rng(seed), []
    obs, _ = env.reset(seed=seed)
    while len(transitions) < n:
        action = rng.uniform(-1.0, 1.0, size=env.action_space.shape)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        transitions.append(np.concatenate([obs, action, [reward]]))
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset(seed=new_seed(rng))
    env.close()
    return torch.as_tensor(np.stack(transitions), dtype=torch.float32)


@torch.no_grad()
def policy_init_latents(encoder: ContextEncoder, init_context: torch.Tensor,
                        context_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The latents Hyper-PEARL's policy first sees, (prior z, posterior z), half as many as init_context has rows each:
    z ~ N(0, I), as when it explores and collects with the prior, and z ~ q(z | c) for contexts c of `context_size`
    transitions drawn from init_context, as in its gradient steps and posterior rollouts. At init a posterior
    multiplies hundreds of broad factors, so its z is near 0 (|z| ~ 0.1), while |z| ~ sqrt(latent_dim) under the
    prior."""
    n = len(init_context) // 2
    rows = torch.randint(0, len(init_context), (n, context_size))
    return encoder.prior(n).sample(), sample_z(encoder.posterior(init_context[rows]))


def make_agent(args: Args, obs_dim: int, act_dim: int, init_context: Optional[torch.Tensor]) -> PEARLAgent:
    """The encoder and the mlp or hyper policy, Q1, Q2, V and target V (PEARL's or the paper's initialization).
    init_context, from `collect_init_context`, calibrates --hyper-init pytorch."""
    encoder = ContextEncoder(obs_dim, act_dim, args.latent_dim, args.encoder_hidden)
    if args.model == "mlp":
        nets = [MLPPolicy(obs_dim, act_dim, args.latent_dim, args.net_size),
                MLPQ(obs_dim, act_dim, args.latent_dim, args.net_size),
                MLPQ(obs_dim, act_dim, args.latent_dim, args.net_size), MLPV(obs_dim, args.latent_dim, args.net_size),
                MLPV(obs_dim, args.latent_dim, args.net_size)]  # fmt: skip
        return PEARLAgent(encoder, *nets)
    sizes = dict(
        embedding_dim=args.hyper_embedding_dim, blocks=args.hyper_blocks, dynamic_hidden=args.hyper_dynamic_hidden
    )
    policy = HyperPolicy(obs_dim, act_dim, args.latent_dim, **sizes)
    critics = [HyperQ(obs_dim, act_dim, args.latent_dim, **sizes), HyperQ(obs_dim, act_dim, args.latent_dim, **sizes),
               HyperV(obs_dim, args.latent_dim, **sizes), HyperV(obs_dim, args.latent_dim, **sizes)]  # fmt: skip
    if args.hyper_init == "pytorch":
        latents = policy_init_latents(encoder, init_context, schedule(args, "embedding_batch_size"))
        init_hypernetwork(policy, torch.cat(latents), "pytorch", args.hyper_embedding_norm, balance=latents)
        for critic in critics[:3]:  # the target V starts as a copy of V (PEARLAgent)
            init_hypernetwork(critic, init_context[:, :obs_dim], "pytorch", args.hyper_embedding_norm)
    else:
        for net in [policy, *critics[:3]]:
            init_hypernetwork(net, None, "authors")
    return PEARLAgent(encoder, policy, *critics)


# ======================================================================================================================
# RUN INFRASTRUCTURE: not the algorithm. Argument checks, the run directory, checkpoints and exact resume, the
# non-finite guard, Ctrl-C, the progress line.
# ======================================================================================================================
SCRIPT = "hyper_pearl.py"
FILE_FORMAT = "hyper_pearl/2"  # checkpoints and models carry it; files of other scripts or versions are refused
# independent numpy streams: np.random.default_rng([seed, stream]) (the task pools use default_rng(seed) itself)
TASK_STREAM, SAMPLER_STREAM, REPLAY_STREAM, EVAL_STREAM, INIT_STREAM, DIAGNOSTIC_STREAM = 1, 2, 3, 4, 5, 6


def fail(message: str, code: int = 1) -> None:
    """One clear error line and a non-zero exit, instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_args(args: Args) -> None:
    positive = ["num_iterations", "num_tasks_sample", "batch_size", "buffer_size", "num_steps_per_eval",
                "progress_freq", "latent_dim", "net_size", "encoder_hidden", "hyper_embedding_dim",
                "hyper_dynamic_hidden", "hyper_init_samples", "meta_batch", "embedding_batch_size",
                "num_train_steps_per_itr", "num_evals", "num_train_tasks", "num_test_tasks"]  # fmt: skip
    for name in positive:
        value = getattr(args, name)
        if value is not None and not value > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ["seed", "eval_freq", "checkpoint_freq", "num_threads", "hyper_blocks", "num_initial_steps",
                 "num_steps_prior", "num_extra_rl_steps_posterior", "num_exp_traj_eval"]:  # fmt: skip
        value = getattr(args, name)
        if value is not None and not value >= 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and not np.isfinite(value):
            fail(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if args.hyper_embedding_dim % 4:
        fail(
            f"--hyper-embedding-dim must be a multiple of 4 (stages dim/4, dim/2, dim), got {args.hyper_embedding_dim}"
        )
    if args.num_initial_steps + schedule(args, "num_steps_prior") + schedule(args, "num_extra_rl_steps_posterior") == 0:
        fail("--num-initial-steps, --num-steps-prior and --num-extra-rl-steps-posterior are all 0: no data to train on")
    if not 0.0 < args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        fail(f"--gamma and --tau must be in (0, 1], got {args.gamma} and {args.tau}")
    for name in ["policy_lr", "qf_lr", "vf_lr", "context_lr", "reward_scale", "hyper_embedding_norm"]:
        value = getattr(args, name)
        if value is not None and not value > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.kl_lambda >= 0:
        fail(f"--kl-lambda must be >= 0, got {args.kl_lambda}")
    if args.hyper_init_samples < 2:
        fail(f"--hyper-init-samples must be at least 2 (half calibrate on prior z, half on posteriors), "
             f"got {args.hyper_init_samples}")  # fmt: skip
    if not args.exp_name or os.sep in args.exp_name or (os.altsep and os.altsep in args.exp_name):
        fail(f"--exp-name must be a plain name (it becomes part of a directory name), got {args.exp_name!r}")


def check_memory(args: Args, obs_dim: int, act_dim: int) -> None:
    """Refuse a run whose buffers cannot fit in this machine's memory before collecting anything. Every transition the
    run collects stays in its task's RL buffer (up to --buffer-size per task), and at most once more in an encoder
    buffer; collection rounds each request up to whole 200-step trajectories."""
    velocity = family_spec(args.env_id).goal == "velocity"
    n_train, n_test = (args.num_train_tasks, args.num_test_tasks) if velocity else (len(DIRECTIONS), len(DIRECTIONS))
    per_sample = schedule(args, "num_steps_prior") + schedule(args, "num_extra_rl_steps_posterior") + 2 * EPISODE_STEPS
    collected = (
        n_train * (args.num_initial_steps + EPISODE_STEPS) + args.num_iterations * args.num_tasks_sample * per_sample
    )
    rows = min(collected, n_train * args.buffer_size)
    needed = 2 * rows * 4 * (2 * obs_dim + act_dim + 2) + (n_train + n_test) * TASK_BYTES
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if memory and needed > memory:
        fail(f"these sizes need {needed / 2**30:.1f} GiB for the task pools and replay buffers; this machine has "
             f"{memory / 2**30:.1f} GiB")  # fmt: skip


TASK_BYTES = 4096  # about what a task and its two empty buffers cost in Python objects


# Settings that may differ between a run and its resumption; every other setting changes what the run computes.
# --cuda may differ so that a run can move to another device; from there on its rounding and its torch draws (the
# other device's generator, as that device's checkpointed state, or as seeded if the checkpoint has none) differ.
RESUME_MAY_DIFFER = ("num_iterations", "progress_freq", "checkpoint_freq", "num_threads", "cuda", "track",
                     "wandb_project_name", "wandb_entity", "save_model", "resume", "exp_name")  # fmt: skip


def check_resume_settings(checkpoint: dict, args: Args) -> None:
    saved = checkpoint["args"]
    differing = [f.name for f in dataclasses.fields(args)
                 if f.name not in RESUME_MAY_DIFFER and saved.get(f.name) != getattr(args, f.name)]  # fmt: skip
    if differing:
        listing = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (given {getattr(args, k)})" for k in differing)
        fail(f"the checkpoint was made with different settings: {listing}; pass the same settings to resume")
    if checkpoint["iteration"] >= args.num_iterations:
        fail(f"the checkpoint is at iteration {checkpoint['iteration']}; pass --num-iterations above it to continue")


class GlobalRNGs:
    """The global random streams training draws from: Python's, NumPy's legacy one, torch's CPU and CUDA generators."""

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


class RNGStreams:
    """The run's own numpy streams: `task` (which tasks to collect for and to train on), `sampler` (env reset seeds and
    the samplers' context draws), `replay` (the gradient steps' replay and context batches) and `eval` (evaluation
    only, so evaluating changes no training stream)."""

    STREAMS = {"task": TASK_STREAM, "sampler": SAMPLER_STREAM, "replay": REPLAY_STREAM, "eval": EVAL_STREAM}

    def __init__(self, seed: int):
        for name, stream in self.STREAMS.items():
            setattr(self, name, np.random.default_rng([seed, stream]))

    def state_dict(self) -> dict:
        return {name: getattr(self, name).bit_generator.state for name in self.STREAMS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.STREAMS:
            getattr(self, name).bit_generator.state = state[name]


class Progress:
    """The console line every --progress-freq iterations: iteration, s/it and ETA over the current phase (the first
    iteration also collects the initial pool, so it gives no ETA, and a resumed run starts a new phase), the last
    iteration's collection, update and evaluation seconds, env steps/s, the iteration's training return and the latest
    evaluation."""

    def __init__(self, total_iterations: int, every: int, iteration: int):
        self.total, self.every, self.last_eval = total_iterations, every, (float("nan"), float("nan"))
        self.new_phase(iteration)

    def new_phase(self, iteration: int) -> None:
        self.since_time, self.since_iteration, self.steps = time.time(), iteration, 0

    def end_iteration(self, iteration: int, steps: int, seconds: dict, train_return: float) -> None:
        self.steps += steps
        if iteration % self.every and iteration != self.total:
            return
        elapsed = max(time.time() - self.since_time, 1e-9)
        per_iteration = elapsed / max(iteration - self.since_iteration, 1)
        eta = format_duration((self.total - iteration) * per_iteration)
        if iteration == 1 < self.total:
            eta = "from iteration 2"  # iteration 1's rate, with the initial pool, says nothing about the others'
        fields = [f"iteration {iteration}/{self.total}", f"{per_iteration:.1f} s/it",
                  "last: " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()),
                  f"{self.steps / elapsed:.0f} env steps/s",
                  f"ETA {eta}",
                  f"train return {train_return:.1f}"]  # fmt: skip
        if np.isfinite(self.last_eval[0]):
            fields.append(f"eval test {self.last_eval[0]:.1f} train {self.last_eval[1]:.1f}")
        print(" | ".join(fields), flush=True)
        self.new_phase(iteration)

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
    """A loss, an action or, after an optimizer step, a weight is NaN or infinite."""


def guarded_step(optimizers: list, loss: torch.Tensor, name: str, losses: dict) -> None:
    """zero_grad, backward, step, with the run's guard: the named losses must be finite before the step (so a NaN never
    reaches the weights) and every weight the optimizers own must be finite after it. One host sync per check; the
    losses are checked once backward is queued, so that on a GPU the backward runs while the host waits."""
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    finite = torch.stack([torch.isfinite(value).all() for value in losses.values()]).tolist()
    for (loss_name, value), ok in zip(losses.items(), finite):
        if not ok:
            raise NonFinite(f"non-finite {loss_name} ({value.item()})")
    for optimizer in optimizers:
        optimizer.step()
    params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    if not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():
        raise NonFinite(f"non-finite weights after the {name} step")


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
    """Write a checkpoint or model: tensors and plain containers only (so it loads with torch.load(weights_only=True)),
    with its format, kind and a digest of its contents. Written to a temporary file, flushed to disk, then renamed
    over `path`: a crash or a full disk mid-write leaves the previous file intact."""
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
    what = " or ".join(kinds)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"cannot load {what} {path}: no such file")
    except Exception as e:  # unpickling errors, foreign pickles, truncated or random bytes: all end the same way
        fail(f"cannot load {what} {path}: not a checkpoint or model written by {SCRIPT} "
             f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")  # fmt: skip
    if not isinstance(contents, dict) or contents.get("format") != FILE_FORMAT:
        fail(f"cannot load {what} {path}: not a checkpoint or model written by this version of {SCRIPT}")
    digest = contents.pop("sha256", None)
    if digest != content_digest(contents):
        fail(f"cannot load {what} {path}: its contents do not match their checksum (the file is corrupted)")
    if contents["kind"] not in kinds:
        fail(f"cannot load {path}: it is a {contents['kind']}, expected a {what}")
    return contents


def make_run_dir(args: Args) -> tuple:
    """A new directory runs/{family}__{exp_name}__{model}__{seed}__{unix time}, suffixed -1, -2, ... when runs started
    in the same second took the name (mkdir is atomic, so two runs never share one)."""
    base = f"{args.env_id}__{args.exp_name}__{args.model}__{args.seed}__{int(time.time())}"
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


def save_checkpoint(path, args, run_name, iteration, global_step, learner, rl_buffer, encoder_buffer, rngs, streams,
                    progress) -> None:  # fmt: skip
    """Everything a resumed run needs, each part from its object's state_dict. Rollouts reset the env with their own
    seeds and set its task, so the env carries nothing from one iteration to the next."""
    objects = {"learner": learner, "rl_buffer": rl_buffer, "encoder_buffer": encoder_buffer, "rngs": rngs,
               "streams": streams, "progress": progress}  # fmt: skip
    contents = {"args": vars(args), "run_name": run_name, "iteration": iteration, "global_step": global_step}
    save_file({**contents, **{name: obj.state_dict() for name, obj in objects.items()}}, path, kind="checkpoint")


def restore_checkpoint(checkpoint, learner, rl_buffer, encoder_buffer, rngs, streams, progress) -> tuple:
    """Puts every object back where the checkpoint left it; returns (iteration, global step)."""
    try:
        learner.load_state_dict(checkpoint["learner"])
    except (RuntimeError, KeyError, ValueError) as e:
        fail(f"the checkpoint's networks do not fit these settings: {str(e).splitlines()[0][:200]}")
    rl_buffer.load_state_dict(checkpoint["rl_buffer"])
    encoder_buffer.load_state_dict(checkpoint["encoder_buffer"])
    rngs.load_state_dict(checkpoint["rngs"])
    streams.load_state_dict(checkpoint["streams"])
    progress.load_state_dict(checkpoint["progress"])
    progress.new_phase(checkpoint["iteration"])
    return checkpoint["iteration"], checkpoint["global_step"]


class StopRequest:
    """Ctrl-C (SIGINT) asks the run to stop at the end of the current iteration, where its state is consistent and can
    be checkpointed; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            fail("interrupted twice; stopped without writing a checkpoint", code=130)
        self.requested = True
        print("stopping at the end of this iteration (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


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


def open_writer(args: Args, run_name: str, run_dir: str, resumed_at: Optional[int],
                device: torch.device) -> SummaryWriter:  # fmt: skip
    """The TensorBoard writer (mirrored to Weights and Biases with --track), the hyperparameter table first, with the
    family's schedule and the learning rates in effect. A resumed run purges what the interrupted one logged after its
    checkpoint."""
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs Weights and Biases: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)  # fmt: skip
    writer = SummaryWriter(run_dir, purge_step=resumed_at + 1 if resumed_at is not None else None)
    effective = {**{name: schedule(args, name) for name in FAMILY_SCHEDULES[args.env_id]},
                 **{f"{name}_lr": lr for name, lr in learning_rates(args).items()}}  # fmt: skip
    settings = {**vars(args), **{f"{k} (effective)": v for k, v in effective.items()}, "device": device}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in settings.items()))
    return writer


def trainable_tasks(rl_buffer: MultiTaskBuffer, encoder_buffer: MultiTaskBuffer) -> np.ndarray:
    """The train tasks with both RL and encoder data, the ones a meta-batch can draw."""
    tasks = [i for i, buffer in enumerate(rl_buffer.tasks) if buffer.size > 0 and encoder_buffer.tasks[i].size > 0]
    if not tasks:
        fail("no train task has both RL and encoder data (is --num-steps-prior 0 with --num-initial-steps 0?)")
    return np.array(tasks)


def checkpoint_due(args: Args, iteration: int) -> bool:
    return bool(args.checkpoint_freq) and (iteration % args.checkpoint_freq == 0 or iteration == args.num_iterations)


def exit_interrupted(writer: SummaryWriter, iteration: int, checkpoint_path: str) -> None:
    writer.close()
    print(f"interrupted at iteration {iteration}; checkpoint written; resume with: {resume_command(checkpoint_path)}",
          file=sys.stderr)  # fmt: skip
    sys.exit(130)


def exit_non_finite(writer: SummaryWriter, error: NonFinite, iteration: int, checkpoint_path: str) -> None:
    writer.close()
    intact = os.path.exists(checkpoint_path)
    fail(f"{error} in iteration {iteration}; stopping, "
         + (f"the last checkpoint ({checkpoint_path}) is intact"
            if intact else "no checkpoint was written"))  # fmt: skip


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = load_file(args.resume, kinds=("checkpoint",)) if args.resume else None
    if checkpoint is not None:
        check_resume_settings(checkpoint, args)
    stop = StopRequest()
    meta_batch, train_steps = schedule(args, "meta_batch"), schedule(args, "num_train_steps_per_itr")
    steps_prior, steps_extra = schedule(args, "num_steps_prior"), schedule(args, "num_extra_rl_steps_posterior")
    embedding_batch, num_evals = schedule(args, "embedding_batch_size"), schedule(args, "num_evals")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # env setup: one env of the family (every rollout sets its task and resets it with its own seed), the task pools
    env = make_task_env(args.env_id, Task(1.0))
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    check_memory(args, obs_dim, act_dim)
    train_tasks, test_tasks = make_task_pool(args.env_id, args.seed, args.num_train_tasks, args.num_test_tasks)

    # ALGO LOGIC: initialize agent here
    init_context = None
    if args.model == "hyper" and args.hyper_init == "pytorch":
        init_seed = new_seed(np.random.default_rng([args.seed, INIT_STREAM]))
        init_context = collect_init_context(args.env_id, train_tasks[0], args.hyper_init_samples, init_seed)
    with out_of_memory_fails("the networks"):
        # made on the CPU and then moved, so that the initialization is the same on every device
        learner = PEARL(args, make_agent(args, obs_dim, act_dim, init_context).to(device))
    agent = learner.agent
    rl_buffer = MultiTaskBuffer(len(train_tasks), obs_dim, act_dim, args.buffer_size)
    encoder_buffer = MultiTaskBuffer(len(train_tasks), obs_dim, act_dim, args.buffer_size)
    rngs, streams, progress = GlobalRNGs(), RNGStreams(args.seed), Progress(args.num_iterations, args.progress_freq, 0)

    start_iteration = global_step = 0
    if checkpoint is not None:
        run_name, run_dir = checkpoint["run_name"], os.path.dirname(os.path.abspath(args.resume))
        start_iteration, global_step = restore_checkpoint(checkpoint, learner, rl_buffer, encoder_buffer, rngs, streams,
                                                          progress)  # fmt: skip
        print(f"resumed {run_name} at iteration {start_iteration} from {args.resume}")
    else:
        run_name, run_dir = make_run_dir(args)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    writer = open_writer(args, run_name, run_dir, global_step if checkpoint is not None else None, device)
    n_params = {name: sum(p.numel() for p in getattr(agent, name).parameters()) for name in ("policy", "qf1", "vf")}
    print(f"{run_name}: {args.model} models (policy {n_params['policy']:,}, Q {n_params['qf1']:,} x 2, V "
          f"{n_params['vf']:,} parameters), {len(train_tasks)} train / {len(test_tasks)} test tasks, meta-batch "
          f"{meta_batch}, {train_steps} gradient steps per iteration, device {device}")  # fmt: skip

    iteration = start_iteration
    try:
        for iteration in range(start_iteration + 1, args.num_iterations + 1):
            iteration_start, paths = time.time(), []
            # ALGO LOGIC: data collection (oyster rl_algorithm.train)
            collect_for = {"agent": agent, "context_batch": embedding_batch, "rng": streams.sampler}
            if iteration == 1:  # the initial pool: every train task, z ~ prior
                print(f"collecting the initial pool: {len(train_tasks)} x {args.num_initial_steps} steps", flush=True)
                for index, task in enumerate(train_tasks):
                    paths += collect(env, task, n_steps=args.num_initial_steps, rl_buffer=rl_buffer.tasks[index],
                                     encoder_buffer=encoder_buffer.tasks[index], add_to_encoder=True,
                                     use_posterior=False, **collect_for)  # fmt: skip
            for index in streams.task.integers(0, len(train_tasks), size=args.num_tasks_sample):
                encoder_buffer.tasks[index].clear()
                for n_steps, posterior in [(steps_prior, False), (steps_extra, True)]:
                    if n_steps:
                        paths += collect(env, train_tasks[index], n_steps=n_steps, rl_buffer=rl_buffer.tasks[index],
                                         encoder_buffer=encoder_buffer.tasks[index], add_to_encoder=not posterior,
                                         use_posterior=posterior, **collect_for)  # fmt: skip
            steps = sum(len(path["rewards"]) for path in paths)
            global_step += steps
            collection_seconds = time.time() - iteration_start

            # ALGO LOGIC: gradient steps on meta-batches of train tasks that have data
            update_start, total, trainable = time.time(), 0.0, trainable_tasks(rl_buffer, encoder_buffer)
            for _ in range(train_steps):
                indices = trainable[streams.task.integers(0, len(trainable), size=meta_batch)]
                context = encoder_buffer.sample_context(indices, embedding_batch, streams.replay, device)
                batch = rl_buffer.sample_batch(indices, args.batch_size, streams.replay, device)
                stats = learner.update(batch, context)
                # the iteration's mean of each loss, summed on the device in float64 (as Python floats were)
                total = total + torch.stack(list(stats.values())).double() / train_steps
            totals = dict(zip(stats, total.tolist()))  # the update's one host sync for its logged means
            update_seconds = time.time() - update_start
            # the last gradient step's states and contexts; a stream per iteration, so a resumed run logs the same
            diagnostic_rng = np.random.default_rng([args.seed, DIAGNOSTIC_STREAM, iteration])
            diagnostics = saturation_diagnostics(agent, batch, context, diagnostic_rng)

            eval_start = time.time()
            if args.eval_freq and (iteration % args.eval_freq == 0 or iteration == args.num_iterations):
                eval_args = (agent, num_evals, args.num_steps_per_eval, args.num_exp_traj_eval, streams.eval)
                test_return, online = evaluate(env, test_tasks, *eval_args)
                eval_train_tasks = [train_tasks[i] for i in streams.eval.integers(0, len(train_tasks), len(test_tasks))]
                progress.last_eval = (test_return, evaluate(env, eval_train_tasks, *eval_args)[0])
                writer.add_scalar("eval/average_return_all_test_tasks", progress.last_eval[0], global_step)
                writer.add_scalar("eval/average_return_all_train_tasks", progress.last_eval[1], global_step)
                for k, value in enumerate(online):
                    writer.add_scalar(f"eval/test_return_trajectory_{k + 1}", value, global_step)
            eval_seconds = time.time() - eval_start

            # TRY NOT TO MODIFY: record rewards for plotting purposes
            iteration_seconds = time.time() - iteration_start
            train_return = float(np.mean([path["rewards"].sum() for path in paths]))
            writer.add_scalar("charts/episodic_return", train_return, global_step)
            episodic_length = float(np.mean([len(path["rewards"]) for path in paths]))
            writer.add_scalar("charts/episodic_length", episodic_length, global_step)
            writer.add_scalar("charts/iteration", iteration, global_step)
            for key, value in {**{f"losses/{k}": v for k, v in totals.items()},
                               **{f"charts/{k}": v for k, v in diagnostics.items()}}.items():  # fmt: skip
                writer.add_scalar(key, value, global_step)
            writer.add_scalar("charts/SPS", int(steps / iteration_seconds), global_step)
            seconds = {"collection": collection_seconds, "update": update_seconds, "eval": eval_seconds}
            for name, value in {"iteration": iteration_seconds, **seconds}.items():
                writer.add_scalar(f"charts/{name}_seconds", value, global_step)
            progress.end_iteration(iteration, steps, seconds, train_return)
            if iteration == 1:
                progress.new_phase(iteration)  # from here the rate, and so the ETA, is that of ordinary iterations
            if stop.requested or checkpoint_due(args, iteration):
                save_checkpoint(checkpoint_path, args, run_name, iteration, global_step, learner, rl_buffer,
                                encoder_buffer, rngs, streams, progress)  # fmt: skip
            if stop.requested:
                exit_interrupted(writer, iteration, checkpoint_path)
    except NonFinite as e:
        exit_non_finite(writer, e, iteration, checkpoint_path)

    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        save_file({"args": vars(args), "iteration": args.num_iterations, "agent": agent.state_dict()}, model_path,
                  kind="model")  # fmt: skip
        print(f"model saved to {model_path}")
    env.close()
    writer.close()

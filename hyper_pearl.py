# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch>=2.1",
#     "gymnasium[mujoco]>=1.0",
#     "mujoco>=3.0",
#     "numpy>=1.24",
#     "tyro>=0.8",
#     "tensorboard>=2.10",
# ]
# ///
"""PEARL with MLP or hypernetwork policy and critic on the paper's meta-RL task families.

Implements the PEARL experiments of Keynan, Sarafian & Kraus, "Recomposing the Reinforcement Learning Building Blocks
with Hypernetworks" (ICML 2021), Sec. 5, Figs. 6d and 7: PEARL (Rakelly, Zhou, Quillen, Finn & Levine, "Efficient
Off-Policy Meta-Reinforcement Learning via Probabilistic Context Variables", ICML 2019) infers a task latent z from
transitions with a probabilistic context encoder and trains a soft actor-critic conditioned on z, whose policy and
critic are either plain MLPs (PEARL) or hypernetworks (Hyper-PEARL: the policy's meta variable is z, the Q and V
networks' meta variable is the state), on Half-Cheetah-Fwd-Back, Ant-Fwd-Back, Half-Cheetah-Vel, Ant-Vel and the
out-of-distribution Half-Cheetah-Vel-Medium.
So far this file holds the task families, the context encoder and the networks (PEARL's MLPs and Hyper-PEARL's
hypernetworks); the SAC updates, the sampler and the training loop are not in it yet.

Defaults are PEARL's (github katerakelly/oyster, configs/default.py and configs/*.json; research notes §3.1) with the
authors' changes (github keynans/HypeRL, PEARL/; notes §3.2): latent 5, context encoder 3 x 200 over (s, a, r), KL
weight 0.1, 200-step episodes, 100 train and 30 test tasks for the velocity families, the two directions as both train
and test tasks for the direction families. CPU only.

Where this differs from the authors' PEARL code (HypeRL PEARL/, a fork of oyster):

- Velocity task pools come from our own seeded generator; theirs were unseeded (the seeding line is commented out and
  the env is built before the global seed is set), so their goals changed from run to run (notes §1.3-1.5).
- The velocity families train on 100 tasks and evaluate on 30. The authors' launcher read the task counts from the
  top-level config keys (2 and 2) while their JSONs set 100/30 only inside env_params, so their released code trained
  on tasks[0:2] and evaluated on tasks[128:130] (notes §1.6); that bug is not inherited.
- Ant-Fwd-Back is a true forward/backward task (theirs rewarded running at +-1 rad), and the contact cost is non-zero
  here (`TaskEnv`).
- Gymnasium v4 observations (HalfCheetah 17-D, without their appended torso x, y, z), MuJoCo 3+, explicit 200-step
  episodes, actions clipped to [-1, 1] before the env as their NormalizedBoxEnv did.
"""

import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Optional, get_args

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call
from torch.utils.tensorboard import SummaryWriter


# Task families (paper Sec. 5; research notes §1)
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
    "HalfCheetahVelMedium": FamilySpec("HalfCheetah", "velocity", train_velocities=(0.0, 2.5), test_velocities=(2.5, 3.0)),
}


@dataclass(frozen=True)
class Task:
    goal: float
    """the direction d in {-1, +1} for the Fwd-Back families, the goal velocity v_goal (m/s) for the Vel families"""


def fail(message: str) -> None:
    """One clear error line and a non-zero exit, instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


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
    task-count bug trained on tasks[0:2] and evaluated on tasks[128:130] (notes §1.6), where here the velocity
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
# (the encoder is trained by the Q loss and this KL only). The encoder stays an MLP in Hyper-PEARL (notes §3.2).

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
    """rlkit's fanin_init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in the layer's input width."""
    bound = 1.0 / np.sqrt(weight.shape[1])
    nn.init.uniform_(weight, -bound, bound)


class ContextEncoder(nn.Module):
    """PEARL's context encoder: an MLP over single transitions (s, a, r) giving each a Gaussian factor over z.

    `layers` hidden layers of `hidden` units with ReLU (3 x 200), then a linear head of 2 * latent_dim: the factor's
    mean, and its variance through softplus, clamped at 1e-7. Initialised as rlkit's Mlp: hidden weights fan-in
    uniform with bias 0.1, the head U(-3e-3, 3e-3) for weights and bias.
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
        return Normal(mu, torch.sqrt(sigma_squared))

    def prior(self, n_tasks: int) -> Normal:
        """The prior N(0, I) for n_tasks tasks, (n_tasks, latent_dim)."""
        zeros = torch.zeros(n_tasks, self.latent_dim, device=self.head.weight.device)
        return Normal(zeros, torch.ones_like(zeros))


# Networks: PEARL's MLPs and Hyper-PEARL's hypernetworks (paper Sec. 5)
#
# PEARL (oyster launch_experiment.py, rlkit networks.py / sac/policies.py; notes §3.1): Q1, Q2 over [s, a, z], V over
# [s, z] and a tanh-Gaussian policy over [s, z], each 3 x 300 ReLU, initialised as rlkit's Mlp (hidden weights fan-in
# uniform, bias 0.1; last layer U(+-3e-3), the policy's mean and log-std heads U(+-1e-3), TanhGaussianPolicy's init_w).
# Hyper-PEARL (HypeRL PEARL/torch/sac/hyper_*.py; notes §3.2): the policy's meta variable is z and its base the state;
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
HYPER_CONTEXT_LR = 3e-4  # Hyper-PEARL keeps PEARL's context_lr (notes §3.2)
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
    return (Normal(mean, log_std.exp()).log_prob(u) - log_det).sum(-1, keepdim=True)


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A reparameterised sample a = tanh(u), u ~ N(mean, std^2): (action, log-prob (..., 1), pre-tanh mean).
    The deterministic (evaluation) action is tanh(mean); actions are in [-1, 1], the task envs' action box."""
    u = mean + log_std.exp() * torch.randn_like(mean)
    return torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std), mean


def rlkit_mlp(in_dim: int, hidden: int, layers: int) -> nn.Sequential:
    """`layers` hidden ReLU layers of `hidden` units, fan-in uniform weights and bias 0.1 (rlkit's Mlp hidden layers)."""
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
    (paper Sec. 2). `relu_after` says whether a ReLU follows the layer (it sets the layer's Kaiming gain)."""

    def __init__(self, embedding_dim: int, fan_in: int, fan_out: int, relu_after: bool):
        super().__init__()
        self.fan_in, self.fan_out, self.relu_after = fan_in, fan_out, relu_after
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

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int = LATENT_DIM,
                 embedding_dim: int = HYPER_EMBEDDING_DIM, blocks: int = HYPER_BLOCKS,
                 dynamic_hidden: int = DYNAMIC_HIDDEN):  # fmt: skip
        super().__init__()
        self.primary = PrimaryNetwork(latent_dim, embedding_dim, blocks)
        self.heads = nn.ModuleList([DynamicLayerHeads(embedding_dim, obs_dim, dynamic_hidden, relu_after=True),
                                    DynamicLayerHeads(embedding_dim, dynamic_hidden, act_dim, relu_after=False),
                                    DynamicLayerHeads(embedding_dim, dynamic_hidden, act_dim, relu_after=False)])

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

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int = LATENT_DIM,
                 embedding_dim: int = HYPER_EMBEDDING_DIM, blocks: int = HYPER_BLOCKS,
                 dynamic_hidden: int = DYNAMIC_HIDDEN):  # fmt: skip
        super().__init__()
        self.primary = PrimaryNetwork(obs_dim, embedding_dim, blocks)
        self.heads = nn.ModuleList([DynamicLayerHeads(embedding_dim, act_dim + latent_dim, dynamic_hidden, True),
                                    DynamicLayerHeads(embedding_dim, dynamic_hidden, 1, False)])

    def forward(self, obs, act, z):
        """(..., obs_dim), (..., act_dim), (..., latent) -> (..., 1); dynamic weights per sample (from its state)."""
        hidden, out = [head(self.primary(obs)) for head in self.heads]
        return dynamic_layer(out, F.relu(dynamic_layer(hidden, torch.cat([act, z], dim=-1))))


class HyperV(nn.Module):
    """Hyper-PEARL's V(s, z): meta = state, base = z; one dynamic hidden ReLU layer, one output."""

    def __init__(self, obs_dim: int, latent_dim: int = LATENT_DIM, embedding_dim: int = HYPER_EMBEDDING_DIM,
                 blocks: int = HYPER_BLOCKS, dynamic_hidden: int = DYNAMIC_HIDDEN):  # fmt: skip
        super().__init__()
        self.primary = PrimaryNetwork(obs_dim, embedding_dim, blocks)
        self.heads = nn.ModuleList([DynamicLayerHeads(embedding_dim, latent_dim, dynamic_hidden, True),
                                    DynamicLayerHeads(embedding_dim, dynamic_hidden, 1, False)])

    def forward(self, obs, z):
        """(..., obs_dim), (..., latent) -> (..., 1)."""
        hidden, out = [head(self.primary(obs)) for head in self.heads]
        return dynamic_layer(out, F.relu(dynamic_layer(hidden, z)))


def init_hypernetwork(module: nn.Module, meta_samples: torch.Tensor) -> None:
    """The paper's initialization (Sec. 5.2: the initial dynamic weights resemble, on average, Kaiming-uniform), as
    hyper_td3.py's "kaiming" scheme, for any module with `.primary` and `.heads` (HyperPolicy, HyperQ, HyperV).

    A generated weight is w = sum_k H_k e_k with head weights H_k ~ U(-c, c) independent of the embedding e, so over
    the meta variable's distribution E[w^2] = (c^2 / 3) d E[e_k^2] (d the embedding width). Kaiming-uniform for a
    dynamic layer of fan-in n has variance gain^2 / n (gain sqrt(2) before a ReLU, 1 for an output layer), hence
        c = gain * sqrt(3 / n) / (sqrt(d) * rms(e)),
    with rms(e) measured on `meta_samples` (states for Q and V, z ~ N(0, I) for the policy), drawn as the network
    will first see them. Primary layers are Kaiming-uniform (gain sqrt(2) after a ReLU, 1 for the stage projections
    reading the raw residual stream) with zero biases. The bias and gain heads start at zero, so every meta variable
    first generates a Kaiming-uniform network with zero biases and unit gains. (The authors initialised the policy's
    log-std head U(+-1e-3); here it is an output layer like the mean's.)
    """
    with torch.no_grad():
        for layer in module.primary.net:
            fcs = [(layer, "linear")] if isinstance(layer, nn.Linear) else [(layer.fc1, "relu"), (layer.fc2, "relu")]
            for fc, nonlinearity in fcs:
                nn.init.kaiming_uniform_(fc.weight, nonlinearity=nonlinearity)
                nn.init.zeros_(fc.bias)
        e_rms = module.primary(meta_samples).pow(2).mean().sqrt().item()
        for head in module.heads:
            gain = np.sqrt(2.0) if head.relu_after else 1.0
            bound = gain * np.sqrt(3.0 / head.fan_in) / (np.sqrt(module.primary.embedding_dim) * e_rms)
            nn.init.uniform_(head.weight.weight, -bound, bound)
            for fc in (head.bias, head.gain):
                nn.init.zeros_(fc.weight)
            for fc in (head.weight, head.bias, head.gain):
                nn.init.zeros_(fc.bias)


if __name__ == "__main__":
    print("hyper_pearl.py: training is not in this file yet (task families, context encoder and networks only)", file=sys.stderr)
    sys.exit(2)

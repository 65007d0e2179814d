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
The SAC part, the sampler and the training loop are not in this file yet: it holds the task families and the context
encoder only.

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


if __name__ == "__main__":
    print("hyper_pearl.py: training is not in this file yet (task families and context encoder only)", file=sys.stderr)
    sys.exit(2)

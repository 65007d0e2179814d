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
"""MAML with Vanilla, Context and Hyper policies on the paper's meta-RL task families.

Implements the MAML experiments of Keynan, Sarafian & Kraus, "Recomposing the Reinforcement Learning Building Blocks
with Hypernetworks" (ICML 2021), Sec. 5: MAML-TRPO (Finn, Abbeel & Levine, ICML 2017) meta-trains a Gaussian policy
that is either a plain MLP (Vanilla), an MLP fed the oracle task context (Context), or a hypernetwork whose dynamic
policy weights are generated from the context (Hyper), on Half-Cheetah-Fwd-Back, Ant-Fwd-Back, Half-Cheetah-Vel,
Ant-Vel and the out-of-distribution Half-Cheetah-Vel-Medium. So far this file holds the task families, the three
policies and the MAML-TRPO building blocks; sampling and the training loop are not in yet.
"""

import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Optional, get_args

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call


# Task families (paper Sec. 5; research notes §1)
#
# Each family is gymnasium's HalfCheetah-v4 or Ant-v4 (dt = 5 x 0.01 s = 0.05 s) under `TaskEnv`, a wrapper that
# clips the action, recomputes the reward for the current task, and ends episodes after 200 steps. Rewards, and where
# they differ from the authors' code (github keynans/HypeRL, MAML/maml_rl/envs/mujoco/), are in `TaskEnv`'s docstring;
# the task pools in `make_task_pool`'s; the oracle context of the Context and Hyper policies in `task_context`'s.
#
# Observations are gymnasium's, not the authors': HalfCheetah-v4 gives 17-D (qpos[1:], qvel), where the authors' code
# gave 20-D by appending the absolute torso com (x, y, z), so the x position was observable there and is not here;
# Ant-v4 gives 27-D (qpos[2:], qvel, no contact forces), the same layout as theirs. Ours are float64, theirs float32.

FamilyName = Literal["HalfCheetahFwdBack", "AntFwdBack", "HalfCheetahVel", "AntVel", "HalfCheetahVelMedium"]
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


# Policies (paper Sec. 4, eq. 16; research notes §2.3)
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

        def mean(obs):
            state_dims = (1,) * (obs.dim() - context.dim())
            per_state = context.reshape(*context.shape[:-1], *state_dims, context.shape[-1])
            return mlp_forward(layers, torch.cat([obs, per_state.expand(*obs.shape[:-1], -1)], -1))

        return TaskPolicy(mean, self.std())


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


def init_hypernetwork(policy: HyperPolicy, scheme: Literal["kaiming", "authors"], meta_samples: torch.Tensor) -> None:
    """Initialize the primary network and heads (log_std keeps 0).

    kaiming (the paper, Sec. 5.2: "the initial dynamic weights distribution resembles, on average, Kaiming-uniform").
    A generated weight is w = sum_k H_k e_k, with head weights H_k ~ U(-c, c) independent of the embedding e, so
    averaged over tasks E[w^2] = (c^2 / 3) * d * E[e_k^2], with d the embedding width and E[e_k^2] the embedding's mean
    square over the contexts. Kaiming-uniform for a dynamic layer with fan-in n has variance gain^2 / n (gain sqrt(2)
    before a ReLU, 1 for the linear output layer). Equating the two gives
        c = gain * sqrt(3 / n) / (sqrt(d) * rms(e)),
    with rms(e) measured on `meta_samples`, the contexts of the train task pool. The primary layers use Kaiming-uniform
    themselves (gain sqrt(2) after a ReLU, 1 for the stage projections that read the raw residual stream), with zero
    biases. The bias and gain heads start at zero, so every task starts from a Kaiming-uniform dynamic network with
    zero biases and unit gains, i.e. a freshly initialized MLP.

    authors: the constants of the authors' Hyper_Policy (research notes §2.3): primary weights U(+-1/(2 sqrt(fan_in)))
    with PyTorch's default biases, every head weight U(+-0.05) (first layer) or U(+-0.008) (output layer), head
    biases 0.
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
        if scheme != "kaiming":
            raise ValueError(f"unknown hyper init scheme {scheme!r}; choose kaiming or authors")
        for layer in policy.primary.net:
            # stage projections read the raw residual stream (gain 1); residual branches read ReLU outputs
            fcs = [(layer, "linear")] if isinstance(layer, nn.Linear) else [(layer.fc1, "relu"), (layer.fc2, "relu")]
            for fc, nonlinearity in fcs:
                nn.init.kaiming_uniform_(fc.weight, nonlinearity=nonlinearity)
                nn.init.zeros_(fc.bias)
        e_rms = policy.primary(meta_samples).pow(2).mean().sqrt().item()
        for i, head in enumerate(policy.heads):
            gain = np.sqrt(2.0) if i < len(policy.heads) - 1 else 1.0
            bound = gain * np.sqrt(3.0 / head.fan_in) / (np.sqrt(policy.primary.embedding_dim) * e_rms)
            nn.init.uniform_(head.weight.weight, -bound, bound)
            for fc in (head.bias, head.gain):
                nn.init.zeros_(fc.weight)
            for fc in (head.weight, head.bias, head.gain):
                nn.init.zeros_(fc.bias)


# MAML-TRPO building blocks (Finn, Abbeel & Levine 2017, Sec. 3.2 and 5.3; Schulman et al. 2015; research notes §2.2)
#
# One meta-iteration: for each task of the meta-batch, adapt theta with one policy-gradient step on its train episodes
# (eq. 1 of MAML: theta'_i = theta - alpha grad L_i(theta)); then one TRPO step on theta for the mean over tasks of the
# surrogate loss of theta'_i(theta) on the task's valid episodes, under a mean-KL trust region. The graph runs through
# the inner step, so the meta-gradient and the Fisher are second-order (the authors' code silently made them first-
# order, research notes §2.4); first_order=True gives FOMAML. All tensors of one task: N episodes padded to T steps.

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
    time = (torch.arange(t, dtype=torch.float64) / 100.0).view(1, t, 1).expand(n, t, 1)
    features = torch.cat([obs64, obs64**2, time, time**2, time**3, torch.ones_like(time)], -1) * mask64[..., None]
    x = features.reshape(n * t, -1)
    y = discounted_returns(rewards.double(), mask64, gamma).reshape(-1)
    gram, target, reg = x.T @ x, x.T @ y, BASELINE_REG
    for _ in range(BASELINE_REG_TRIES):
        cholesky, info = torch.linalg.cholesky_ex(gram + reg * torch.eye(len(gram), dtype=torch.float64))
        if info == 0:
            coefficients = torch.cholesky_solve(target[:, None], cholesky)[:, 0]
            if torch.isfinite(coefficients).all():
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
    Also works under torch.no_grad() and for params that do not require grad (evaluation on test tasks)."""
    params = dict(policy.named_parameters()) if params is None else params
    with torch.enable_grad():
        params = {name: p if p.requires_grad else p.detach().requires_grad_() for name, p in params.items()}
        loss = inner_loss(policy, params, episodes, context, advantages)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order, materialize_grads=True)
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


def line_search(objective: Callable, params: dict, full_step: torch.Tensor, surrogate_before: float,
                max_kl: float = 0.01, max_steps: int = 20, backtrack_ratio: float = 0.8) -> tuple[dict, dict]:
    """Backtracking (TRPO Sec. 6 / App. C): try params + ratio^k * full_step for k = 0 .. max_steps - 1 and accept the
    first whose surrogate is lower than surrogate_before and whose mean KL is <= max_kl; if none, keep params.
    Returns (params, stats) with stats surrogate, kl (of the returned params) and ls_steps (k, or -1 if rejected)."""
    for k in range(max_steps):
        candidate = add_step(params, backtrack_ratio**k * full_step)
        surrogate, kl = (v.item() for v in objective(candidate))
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


if __name__ == "__main__":
    print("hyper_maml.py: MAML training is not implemented yet (only the task families are)", file=sys.stderr)
    sys.exit(2)

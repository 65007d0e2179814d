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
Ant-Vel and the out-of-distribution Half-Cheetah-Vel-Medium. So far this file holds only the task families; the
algorithm (policies, MAML, TRPO) follows below them.
"""

import sys
from dataclasses import dataclass
from typing import Literal, get_args

import gymnasium as gym
import numpy as np


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


if __name__ == "__main__":
    print("hyper_maml.py: MAML training is not implemented yet (only the task families are)", file=sys.stderr)
    sys.exit(2)

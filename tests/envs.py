"""Tiny deterministic environments for the scripts' end-to-end tests; gym.make("tests.envs:<id>")
imports this module, which registers them."""

import gymnasium as gym
import numpy as np


class CountingEnv(gym.Env):
    """obs = [t, episode parity]. Even episodes terminate at t = 3; odd ones run into the time limit
    (max_episode_steps = 5) and are truncated. Reward 1 per step."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.episode = -1
        self.t = 0

    def _obs(self):
        return np.array([self.t, self.episode % 2], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        terminated = self.episode % 2 == 0 and self.t == 3
        return self._obs(), 1.0, terminated, False, {}


class NaNRewardEnv(gym.Env):
    """Pendulum-like dummy whose reward turns NaN from the 150th step on."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.steps = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.normal(size=3).astype(np.float32), {}

    def step(self, action):
        self.steps += 1
        reward = float("nan") if self.steps >= 150 else -float(np.square(action).sum())
        return self.np_random.normal(size=3).astype(np.float32), reward, False, False, {}


class MatrixActionEnv(gym.Env):
    """A 2x2 Box action space: not a flat action vector."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2, 2), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(3, dtype=np.float32), 0.0, False, False, {}


gym.register("CountingEnv-v0", entry_point=CountingEnv, max_episode_steps=5)
gym.register("NaNRewardEnv-v0", entry_point=NaNRewardEnv, max_episode_steps=50)
gym.register("MatrixActionEnv-v0", entry_point=MatrixActionEnv, max_episode_steps=50)

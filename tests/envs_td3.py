"""Tiny deterministic environments for hyper_td3.py's end-to-end tests; gym.make("tests.envs_td3:<id>")
imports this module, which registers them."""

import gymnasium as gym
import numpy as np


class AsymmetricBoundsEnv(gym.Env):
    """Random Gaussian observations, a 2-d action with different bounds per dimension ([-3, 3] and
    [0, 2]: scale (3, 1), bias (0, 1)), reward -|a - (1, 1.5)|^2. Episodes are cut at 20 steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Box(np.array([-3.0, 0.0], dtype=np.float32), np.array([3.0, 2.0], dtype=np.float32))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.normal(size=3).astype(np.float32), {}

    def step(self, action):
        reward = -float(np.square(np.asarray(action) - np.array([1.0, 1.5])).sum())
        return self.np_random.normal(size=3).astype(np.float32), reward, False, False, {}


gym.register("AsymmetricBoundsEnv-v0", entry_point=AsymmetricBoundsEnv, max_episode_steps=20)

"""A tiny environment whose discounted return is an exactly known function of the actions, for grad_probe.py's
tests; gym.make("tests.envs_probe:<id>") imports this module, which registers it. It implements the probe's
snapshot protocol (get_sim_state / set_sim_state) instead of being a MuJoCo env."""

import gymnasium as gym
import numpy as np

WEIGHTS = np.array([2.0, -1.0], dtype=np.float64)


class LinearRewardEnv(gym.Env):
    """Reward w . a with w = (2, -1); the observation is (t / 10, 0), so it never depends on the actions.
    Action bounds [-3, 3] x [0, 2]. `terminate_at` ends episodes early (terminated=True) at that step."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(np.array([-3.0, 0.0], dtype=np.float32), np.array([3.0, 2.0], dtype=np.float32))

    def __init__(self, terminate_at=None):
        self.terminate_at, self.t = terminate_at, 0

    def _obs(self):
        return np.array([self.t / 10.0, 0.0], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        reward = float(WEIGHTS @ np.asarray(action, dtype=np.float64))
        self.t += 1
        return self._obs(), reward, self.terminate_at is not None and self.t >= self.terminate_at, False, {}

    def get_sim_state(self):
        return np.array([self.t])

    def set_sim_state(self, state):
        self.t = int(state[0])
        return self._obs()


gym.register("LinearRewardEnv-v0", entry_point=LinearRewardEnv, max_episode_steps=10)

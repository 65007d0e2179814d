"""How far a trained critic's Q-values are from the returns, and how much it prefers the policy's action.

    python benchmarks/critic_bias.py runs/<run_name>/checkpoint.pt [more checkpoints ...]

Reads checkpoints of hyper_sac.py or hyper_td3.py (any critic) and, on the last --window transitions of the replay
buffer that belong to episodes which ended by termination (so their discounted return-to-go is exact, no time-limit
cut), prints:
- MC: the mean discounted return-to-go G_t = sum_k gamma^k r_{t+k} of those transitions, from the buffer itself;
- Q(s, a): min(Q1, Q2) at the buffer's actions, and its bias Q(s, a) - G_t. The buffer's actions come from slightly
  older policies plus exploration noise, so the bias of a well-fitted critic is small but not zero;
- Q(s, pi) - Q(s, a): how much higher the critic values the current policy's deterministic action than the action
  taken. A TD target bootstraps from the policy's action, so a critic that overvalues it by x per state lets the
  error compound over the horizon, to about x / (1 - gamma) in the worst case;
- Q1's range and standard deviation over --action-samples uniform actions in the action box, per state (mean over
  --range-states states): how strongly Q depends on the action;
- |Q1 - Q2| at the buffer's actions: how far the twin critics disagree;
- off the data: the largest |Q1(mu + k (s - mu), a)| over the window's states s and actions a, mu their mean state, at
  k = --stretch (each state moved k times as far from the mean): how wildly the critic extrapolates to states a
  little outside the ones it was trained on, which the policy reaches as it improves and the TD target then
  bootstraps from (at k = 1: the largest |Q1| on the data itself);
- the policy's mean log-std (SAC) and the fraction of saturated pre-tanh outputs (|u| > 2.5 for SAC's mean, > 3 for
  TD3's action, as the scripts' `charts/actor_saturation`).
Episode boundaries are found from the buffer (terminated, or the next transition's state is not this one's next
state), so the buffer must not have wrapped around inside the window.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hyper_sac  # noqa: E402
import hyper_td3  # noqa: E402


@dataclass
class Bench:
    checkpoints: tyro.conf.Positional[tuple[str, ...]]
    """checkpoint.pt files of hyper_sac.py or hyper_td3.py runs"""
    window: int = 5000
    """the most recent transitions to use"""
    range_states: int = 200
    """states at which Q1 is evaluated over the action box"""
    action_samples: int = 64
    """uniform actions per state for the range over the action box"""
    stretch: float = 2.0
    """k of the off-data measure: states moved k times as far from the window's mean state"""
    seed: int = 0


def load(path: str):
    """The checkpoint's script module, learner (weights loaded) and replay buffer arrays."""
    try:  # only to read which script wrote it; load_file below checks and loads it without running code
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: cannot load {path}: {type(e).__name__}")
    written_by = contents.get("format") if isinstance(contents, dict) else None
    modules = {m.FILE_FORMAT: m for m in (hyper_sac, hyper_td3)}
    if written_by not in modules:
        sys.exit(f"error: {path} is not a checkpoint of hyper_sac.py or hyper_td3.py")
    module = modules[written_by]
    contents = module.load_file(path, ("checkpoint",))
    args = module.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in contents["args"].items()})
    rb = {k: v.numpy() for k, v in contents["replay_buffer"].items() if isinstance(v, torch.Tensor)}
    obs_dim, act_dim = rb["obs"].shape[1], rb["actions"].shape[1]
    low, high = -np.ones(act_dim), np.ones(act_dim)  # replaced by the checkpoint's action_scale / action_bias buffers
    learner_class = hyper_sac.SAC if module is hyper_sac else hyper_td3.TD3
    meta = torch.randn(8, obs_dim if args.critic != "as-hyper" else act_dim)  # the init is overwritten by the weights
    learner = learner_class(args, obs_dim, act_dim, low, high, meta, "cpu")
    learner.load_state_dict(contents["agent"])
    return module, args, learner, rb, contents["global_step"]


def off_data_max_abs_q(qf, obs: torch.Tensor, actions: torch.Tensor, k: float) -> float:
    """max over the batch of |Q(mu + k (s - mu), a)|, mu the batch's mean state."""
    mu = obs.mean(0)
    return qf(mu + k * (obs - mu), actions).abs().max().item()


def returns_to_go(rb: dict, gamma: float):
    """Discounted return-to-go per transition, and whether its episode ended by termination."""
    obs, next_obs, rewards, terminated = rb["obs"], rb["next_obs"], rb["rewards"][:, 0], rb["terminations"][:, 0] > 0
    n = len(obs)
    ends = terminated.copy()
    ends[:-1] |= np.any(next_obs[:-1] != obs[1:], axis=1)
    ends[-1] = True
    g, exact = np.zeros(n, np.float64), np.zeros(n, bool)
    running, running_exact = 0.0, False
    for i in range(n - 1, -1, -1):
        if ends[i]:
            running, running_exact = 0.0, bool(terminated[i])
        running = rewards[i] + gamma * running
        g[i], exact[i] = running, running_exact
    return g, exact


@torch.no_grad()
def probe(path: str, bench: Bench) -> str:
    module, args, learner, rb, step = load(path)
    g, exact = returns_to_go(rb, args.gamma)
    idx = np.arange(max(0, len(g) - bench.window), len(g))
    idx = idx[exact[idx]]
    if len(idx) == 0:
        return f"{path}: no terminated episode in the last {bench.window} transitions"
    obs, actions = torch.as_tensor(rb["obs"][idx]), torch.as_tensor(rb["actions"][idx])
    q1, q2 = learner.qf1(obs, actions)[:, 0], learner.qf2(obs, actions)[:, 0]
    q_data = torch.min(q1, q2)
    if module is hyper_sac:
        mean, log_std = learner.actor(obs)
        pi = torch.tanh(mean) * learner.actor.action_scale + learner.actor.action_bias
        saturated, log_std_text = (mean.abs() > 2.5).float().mean(), f" | log-std {log_std.mean().item():5.2f}"
    else:
        pre_tanh = learner.actor.pre_tanh(obs)
        pi = learner.actor(obs)
        saturated, log_std_text = (pre_tanh.abs() > 3.0).float().mean(), ""
    q_pi = torch.min(learner.qf1(obs, pi), learner.qf2(obs, pi))[:, 0]
    generator = torch.Generator().manual_seed(bench.seed)
    states = obs[: bench.range_states]
    low, high = (
        learner.actor.action_bias - learner.actor.action_scale,
        learner.actor.action_bias + learner.actor.action_scale,
    )
    uniform = torch.rand(bench.action_samples, len(states), actions.shape[1], generator=generator)
    q_box = torch.stack([learner.qf1(states, low + (high - low) * u)[:, 0] for u in uniform], 1)
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return (
        f"{name}: step {step}, {len(idx)} transitions | MC {g[idx].mean():7.1f} | Q(s, a) {q_data.mean().item():8.1f}"
        f" bias {(q_data.numpy() - g[idx]).mean():8.1f} | Q(s, pi) - Q(s, a) {(q_pi - q_data).mean().item():7.2f}"
        f" | Q1 over the box: range {(q_box.max(1).values - q_box.min(1).values).mean().item():7.2f}"
        f" std {q_box.std(1).mean().item():6.2f} | |Q1 - Q2| {(q1 - q2).abs().mean().item():6.2f}"
        f" | max |Q1| on the data {q1.abs().max().item():.4g}, at {bench.stretch:g}x off it"
        f" {off_data_max_abs_q(learner.qf1, obs, actions, bench.stretch):.4g}{log_std_text}"
        f" | saturated {saturated.item():.2f}"
    )


def main(bench: Bench) -> None:
    torch.set_num_threads(1)
    for path in bench.checkpoints:
        print(probe(path, bench), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Bench))

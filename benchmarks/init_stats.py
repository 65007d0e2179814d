"""What a hypernetwork critic sees at initialization, and how far its optimizer moves it.

    python benchmarks/init_stats.py --critic sa-hyper --hyper-init pytorch
    python benchmarks/init_stats.py --critic sa-hyper --hyper-init authors
    python benchmarks/init_stats.py --critic mlp
    python benchmarks/init_stats.py --algo td3 --critic sa-hyper --batch-size 100

On states visited by uniform-random actions in --env-id (what the critic first trains on), it reports
- the embedding's rms and mean norm, and the rms over states of every generated tensor (W1, b1, g1 of
  the hidden dynamic layer; W2, b2, g2 of the output layer), beside PyTorch's default nn.Linear init
  (weights and biases U(+-1/sqrt(fan_in)), rms 1/sqrt(3 fan_in));
- the spread of Q over actions at a state and whether Q(s, .) is positively homogeneous in the action
  (Q(s, k a) - Q(s, 0) = k (Q(s, a) - Q(s, 0)), which puts the maximum over the action box on its boundary);
- the relative change |dW| / |W| of the generated tensors (over the same states) after --updates critic
  updates at the script's default critic lr on that data, with TD targets bootstrapped through a target
  copy at uniform-random next actions. For `--critic mlp` the same is reported for its own layers.
"""

import copy
import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hyper_sac  # noqa: E402
import hyper_td3  # noqa: E402


@dataclass
class Bench:
    algo: Literal["sac", "td3"] = "sac"
    """which script's critic and defaults (SAC: batch 256; TD3: the authors' TD3 constants for --hyper-init authors)"""
    env_id: str = "HalfCheetah-v4"
    """environment whose random-action states are measured"""
    critic: Literal["sa-hyper", "as-hyper", "mlp"] = "sa-hyper"
    """critic model"""
    hyper_init: str = "pytorch"
    """the script's --hyper-init value"""
    hyper_embedding_dim: int = 1024
    """primary network width (paper: 1024)"""
    hyper_blocks: int = 2
    """residual blocks per stage (paper: 2)"""
    batch_size: int = 256
    """minibatch of each measured update"""
    updates: int = 100
    """critic updates whose total change is measured"""
    q_lr: Optional[float] = None
    """critic lr; default: the script's (5e-5 hyper, 3e-4 MLP)"""
    transitions: int = 2000
    """random-action transitions collected as the replay data"""
    seed: int = 0
    """seed of data collection, init and minibatches"""
    num_threads: int = 0
    """torch CPU threads; 0 keeps torch's default"""


def collect(env_id: str, n: int, seed: int):
    env = hyper_sac.make_env(env_id)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    data = {k: [] for k in ("obs", "act", "rew", "next_obs", "term")}
    for _ in range(n):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(data, (obs, action, reward, next_obs, float(terminated))):
            data[k].append(v)
        obs = next_obs if not (terminated or truncated) else env.reset()[0]
    space = env.action_space
    env.close()
    return {k: torch.as_tensor(np.array(v), dtype=torch.float32) for k, v in data.items()}, space


def generated(critic, meta) -> dict:
    """The generated tensors of every dynamic layer, flattened per state."""
    with torch.no_grad():
        out = {}
        for i, (w, b, g) in enumerate(critic.dynamic_weights(meta), start=1):
            out[f"W{i}"], out[f"b{i}"], out[f"g{i}"] = w.flatten(1).clone(), b.clone(), g.clone()
        return out


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


if __name__ == "__main__":
    bench = tyro.cli(Bench)
    if bench.num_threads:
        torch.set_num_threads(bench.num_threads)
    script = hyper_sac if bench.algo == "sac" else hyper_td3
    args = script.Args(env_id=bench.env_id, critic=bench.critic, hyper_init=bench.hyper_init, batch_size=bench.batch_size,
                       hyper_embedding_dim=bench.hyper_embedding_dim, hyper_blocks=bench.hyper_blocks)  # fmt: skip
    torch.manual_seed(bench.seed)
    data, space = collect(bench.env_id, bench.transitions, bench.seed)
    obs_dim, act_dim = data["obs"].shape[1], data["act"].shape[1]
    hyper = bench.critic != "mlp"
    meta_samples = None
    if hyper:
        meta_samples = script.collect_meta_samples(args, bench.env_id, args.hyper_init_samples, bench.seed + 200)
    qf = script.make_critic(args, obs_dim, act_dim, meta_samples)
    q_lr = bench.q_lr if bench.q_lr is not None else (5e-5 if hyper else 3e-4)
    print(f"{bench.algo} {bench.critic} --hyper-init {bench.hyper_init} on {bench.env_id} "
          f"(obs {obs_dim}, act {act_dim}), q_lr {q_lr:g}, batch {bench.batch_size}, {bench.updates} updates")  # fmt: skip

    probe_obs, probe_act = data["obs"][:500], data["act"][:500]
    meta = probe_obs if bench.critic != "as-hyper" else probe_act
    if hyper:
        e = qf.primary(meta).detach()
        print(f"embedding: rms {rms(e):.4f}, rms norm {e.pow(2).sum(1).mean().sqrt().item():.3f} (width {e.shape[1]})")
        before = generated(qf, meta)
        fan_ins = {"1": qf.heads[0].fan_in, "2": qf.heads[1].fan_in}
        for name, x in before.items():
            target = f" (nn.Linear default {1 / np.sqrt(3 * fan_ins[name[1]]):.4f})" if name[0] in "Wb" else ""
            print(f"  {name}: rms {rms(x):.4f}{target}")
    with torch.no_grad():  # Q over actions at fixed states
        low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
        actions = low + (high - low) * torch.rand(64, act_dim)
        obs64 = probe_obs[:64]
        q = torch.stack([qf(obs64, a.expand(64, -1)).squeeze(1) for a in actions], 1)  # (states, actions)
        print(f"Q at init: mean {q.mean().item():.4f}, std over actions per state {q.std(1).mean().item():.4f}")
        k, a = 0.5, probe_act[:64]
        q0 = qf(obs64, torch.zeros_like(a))
        homogeneity_gap = (qf(obs64, k * a) - q0 - k * (qf(obs64, a) - q0)).abs().mean().item()
        print(f"|Q(s, a/2) - Q(s, 0) - (Q(s, a) - Q(s, 0))/2| mean {homogeneity_gap:.2e} (0: homogeneous in the action)")

    layers = [m for m in qf.modules() if isinstance(m, nn.Linear)]
    mlp_before = [m.weight.detach().clone() for m in layers]
    target = copy.deepcopy(qf).requires_grad_(False)
    optimizer = torch.optim.Adam(qf.parameters(), lr=q_lr)
    gen = torch.Generator().manual_seed(bench.seed)
    for _ in range(bench.updates):
        idx = torch.randint(0, len(data["obs"]), (bench.batch_size,), generator=gen)
        with torch.no_grad():
            next_act = low + (high - low) * torch.rand(bench.batch_size, act_dim, generator=gen)
            y = data["rew"][idx, None] + 0.99 * (1 - data["term"][idx, None]) * target(data["next_obs"][idx], next_act)
        loss = F.mse_loss(qf(data["obs"][idx], data["act"][idx]), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hyper_sac.polyak_update(qf, target, 0.005)
    print(f"relative change after {bench.updates} updates (final TD loss {loss.item():.4f}):")
    if hyper:
        after = generated(qf, meta)
        for name in ("W1", "b1", "W2"):
            change = (after[name] - before[name]).norm() / before[name].norm()
            print(f"  {name}: |dW|/|W| {change.item():.4f}")
        for name in ("g1", "g2"):
            print(f"  {name}: rms change {rms(after[name] - before[name]):.4f}")
    else:
        for i, (m, w) in enumerate(zip(layers, mlp_before), start=1):
            print(f"  layer {i} weight: |dW|/|W| {((m.weight.detach() - w).norm() / w.norm()).item():.4f}")

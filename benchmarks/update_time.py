"""Time one update of hyper_sac.py or hyper_td3.py at the paper's sizes, split into its parts.

    python benchmarks/update_time.py --critic sa-hyper                          # SAC, batch 256
    python benchmarks/update_time.py --algo td3 --critic sa-hyper --batch-size 100

Reports milliseconds per critic step (target + forward + backward + Adam), per actor step with the
critics frozen (no graph through their weights, as the scripts do) and per actor step built the
naive way (graph through the critics' weights), on HalfCheetah-v4 shapes (obs 17, act 6). SAC's actor
uses min(Q1, Q2) every step; TD3's uses Q1 every --policy-frequency (2) steps, so its full update is
critic + actor / 2.
"""

import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hyper_sac  # noqa: E402
import hyper_td3  # noqa: E402


@dataclass
class Bench:
    algo: Literal["sac", "td3"] = "sac"
    """sac or td3"""
    critic: hyper_sac.CriticName = "sa-hyper"
    """critic model to time"""
    batch_size: int = 256
    """minibatch size"""
    repeats: int = 20
    """timed repetitions per part (after 3 warm-up ones)"""
    num_threads: int = 0
    """torch CPU threads; 0 keeps torch's default"""


def timed(fn, repeats):
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    bench = tyro.cli(Bench)
    if bench.num_threads:
        torch.set_num_threads(bench.num_threads)
    torch.manual_seed(0)
    obs_dim, act_dim, n = 17, 6, bench.batch_size
    sac = bench.algo == "sac"
    script = hyper_sac if sac else hyper_td3
    args = script.Args(critic=bench.critic)
    actor = script.Actor(obs_dim, act_dim, -torch.ones(act_dim), torch.ones(act_dim))
    actor_t = copy.deepcopy(actor)
    qf1, qf2 = (script.make_critic(args, obs_dim, act_dim) for _ in range(2))
    qf1_t, qf2_t = copy.deepcopy(qf1), copy.deepcopy(qf2)
    q_opt = script.adam(list(qf1.parameters()) + list(qf2.parameters()), lr=5e-5)  # the script's (fused) Adam
    a_opt = script.adam(actor.parameters(), lr=3e-4)
    obs, act, rew, next_obs, term = torch.randn(n, obs_dim), torch.rand(n, act_dim) * 2 - 1, torch.randn(n, 1), torch.randn(n, obs_dim), torch.zeros(n, 1)

    def critic_step():
        with torch.no_grad():
            if sac:
                next_a, next_logp, _ = actor.get_action(next_obs)
                y = hyper_sac.soft_td_target(rew, term, qf1_t(next_obs, next_a), qf2_t(next_obs, next_a), next_logp, 0.2, 0.99)
            else:
                next_a = hyper_td3.smoothed_target_action(actor_t, next_obs, 0.2, 0.5)
                y = hyper_td3.td3_target(rew, term, qf1_t(next_obs, next_a), qf2_t(next_obs, next_a), 0.99)
        loss = F.mse_loss(qf1(obs, act), y) + F.mse_loss(qf2(obs, act), y)
        q_opt.zero_grad()
        loss.backward()
        q_opt.step()

    def actor_step(freeze):
        if sac:
            pi, logp, _ = actor.get_action(obs)
            critics, bonus = (qf1, qf2), 0.2 * logp
        else:
            pi, critics, bonus = actor(obs), (qf1,), 0.0
        if freeze:
            with script.frozen(*critics):
                q = torch.stack([qf(obs, pi) for qf in critics]).min(0).values
        else:
            q = torch.stack([qf(obs, pi) for qf in critics]).min(0).values
        loss = (bonus - q).mean()
        a_opt.zero_grad()
        loss.backward()
        a_opt.step()
        qf1.zero_grad(set_to_none=True)
        qf2.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in qf1.parameters())
    c = timed(critic_step, bench.repeats)
    a_frozen = timed(lambda: actor_step(True), bench.repeats)
    a_naive = timed(lambda: actor_step(False), bench.repeats)
    per_update = 1.0 if sac else 0.5
    print(f"{bench.algo}: critic {bench.critic} ({params:,} params per Q), batch {n}, {torch.get_num_threads()} threads")
    print(f"  critic step        {c:8.1f} ms")
    print(f"  actor step, frozen {a_frozen:8.1f} ms")
    print(f"  actor step, naive  {a_naive:8.1f} ms")
    print(f"  per env step       {c + per_update * a_frozen:8.1f} ms  (naive actor: {c + per_update * a_naive:.1f} ms)")

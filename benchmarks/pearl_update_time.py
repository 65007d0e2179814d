"""Time hyper_pearl.py's gradient step and Hyper-PEARL's policy with per-task versus per-transition dynamic weights.

    python benchmarks/pearl_update_time.py --model hyper --meta-batch 16          # paper sizes, HalfCheetahVel
    python benchmarks/pearl_update_time.py --model mlp --meta-batch 16

Reports milliseconds per full PEARL step (`train_step`: Q1, Q2 and encoder step, V and policy step, target V update)
on HalfCheetah shapes (obs 17, act 6), meta-batch x batch-size transitions and a context of embedding-batch-size per
task. For --model hyper it also times the policy's part of the step (forward, tanh-Gaussian sample, backward of the
mean log-prob) with the dynamic weights generated once per task (`task_weights`, as hyper_pearl.py does) and once per
transition (z repeated per row, as the authors' code did); both give the same numbers.
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hyper_pearl  # noqa: E402


@dataclass
class Bench:
    model: Literal["mlp", "hyper"] = "hyper"
    """mlp or hyper models"""
    meta_batch: int = 16
    """tasks per step (HalfCheetahVel: 16, Fwd-Back: 4)"""
    batch_size: int = 256
    """transitions per task"""
    embedding_batch_size: int = 100
    """context transitions per task"""
    hyper_embedding_dim: int = 1024
    """primary network output width"""
    hyper_blocks: int = 2
    """residual blocks per stage"""
    hyper_dynamic_hidden: int = 256
    """dynamic hidden layer width"""
    repeats: int = 5
    """timed repetitions per part (after one warm-up)"""
    num_threads: int = 1
    """torch CPU threads; 0 keeps torch's default"""


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


if __name__ == "__main__":
    bench = tyro.cli(Bench)
    if bench.num_threads:
        torch.set_num_threads(bench.num_threads)
    obs_dim, act_dim, tasks, n = 17, 6, bench.meta_batch, bench.batch_size
    args = hyper_pearl.Args(model=bench.model, hyper_embedding_dim=bench.hyper_embedding_dim, hyper_blocks=bench.hyper_blocks,
                            hyper_dynamic_hidden=bench.hyper_dynamic_hidden)  # fmt: skip
    torch.manual_seed(0)
    init_context = 3.0 * torch.randn(1000, hyper_pearl.context_dim(obs_dim, act_dim))  # stands in for (s, a, r) rows
    agent = hyper_pearl.make_agent(args, obs_dim, act_dim, init_context)
    lrs = hyper_pearl.learning_rates(args)
    modules = {"policy": agent.policy, "qf1": agent.qf1, "qf2": agent.qf2, "vf": agent.vf, "context": agent.encoder}
    optimizers = {name: hyper_pearl.adam(m.parameters(), lr=lrs[name]) for name, m in modules.items()}
    batch = hyper_pearl.Batch(torch.randn(tasks, n, obs_dim), torch.rand(tasks, n, act_dim) * 2 - 1, torch.randn(tasks, n, 1),
                              torch.randn(tasks, n, obs_dim), torch.zeros(tasks, n, 1))  # fmt: skip
    context = torch.randn(tasks, bench.embedding_batch_size, hyper_pearl.context_dim(obs_dim, act_dim))
    step = timed(lambda: hyper_pearl.train_step(agent, optimizers, batch, context), bench.repeats)
    print(f"{bench.model}, meta-batch {tasks} x {n}: {step:.0f} ms per PEARL step")
    if bench.model == "hyper":
        z = torch.randn(tasks, args.latent_dim)
        policy = agent.policy

        def per_task():
            mean, log_std = policy.dist_params_with_weights(policy.task_weights(z), batch.obs)
            hyper_pearl.tanh_gaussian_sample(mean, log_std)[1].mean().backward()

        def per_transition():
            z_rows = z.unsqueeze(1).expand(tasks, n, -1).reshape(tasks * n, -1)
            mean, log_std = policy.dist_params(batch.obs.reshape(tasks * n, -1), z_rows)
            hyper_pearl.tanh_gaussian_sample(mean, log_std)[1].mean().backward()

        print(f"policy forward + backward: {timed(per_task, bench.repeats):.0f} ms with weights per task, "
              f"{timed(per_transition, bench.repeats):.0f} ms per transition")  # fmt: skip

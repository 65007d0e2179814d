"""How far MAML's inner step moves each policy at init: hyper_maml.py's first meta-iteration, measured.

    python benchmarks/maml_inner_kl.py --policy hyper --seed 0     # HalfCheetahFwdBack, 10 tasks x 20 episodes
    python benchmarks/maml_inner_kl.py --policy vanilla --seed 0   # and --policy context, --seed 1
    python benchmarks/maml_inner_kl.py --policy hyper --fast-lr 1.5625e-3
    python benchmarks/maml_inner_kl.py --policy hyper --hyper-init authors
    python benchmarks/maml_inner_kl.py --policy hyper --env-id HalfCheetahVel --trpo

The policy, the task draws and the episodes are those of the first meta-iteration of

    python hyper_maml.py --env-id <env> --policy <policy> --seed <seed> --meta-batch-size 10 --fast-batch-size 20 ...

(hyper_maml.py's seeding, `make_policy`, `MetaBatchSampler` streams, `sample_episodes`, `episode_advantages`,
`adapt`, `inner_step_stats`), so `inner KL` is that run's adaptation/inner_kl and `mean |mu| before` its
adaptation/pre_mean_abs_mu (means over the meta-batch's tasks). For each task, theta' = theta - fast_lr grad L(theta)
on all parameters; besides the full step the KL(pi_theta || pi_theta') is measured with only a part of theta moved
to theta' (the rest kept at theta): for Hyper the primary network, the heads and the log-std; for the MLPs the log-std.
For Hyper it also prints the embedding's rms norm on the train pool's contexts and fast_lr |e|^2, the step size the
inner step gives the generated weights. `vanilla mean |mu|` is the mean |mu| of a Vanilla policy, initialized as
hyper_maml.py does with the same seed, on the same states. With --trpo the post-adaptation episodes are sampled too
and the meta-update (`MAML.update`) is taken: its line-search steps, mean KL and the norm of the change of theta are
reported.
"""

import os
import random
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hyper_maml  # noqa: E402


@dataclass
class Bench:
    policy: Literal["vanilla", "context", "hyper"] = "hyper"
    """hyper_maml.py's --policy"""
    env_id: hyper_maml.FamilyName = "HalfCheetahFwdBack"
    """the task family"""
    seed: int = 0
    """hyper_maml.py's --seed"""
    meta_batch_size: int = 10
    """tasks of the meta-iteration (the paper's: 40)"""
    fast_batch_size: int = 20
    """episodes per task (the paper's 20)"""
    fast_lr: Optional[float] = None
    """inner step; default hyper_maml.py's (0.1 MLPs, 0.05 / norm^2 hyper pytorch, 5e-5 hyper authors)"""
    hyper_init: Literal["pytorch", "authors"] = "pytorch"
    """hyper_maml.py's --hyper-init"""
    hyper_embedding_dim: int = 1024
    """primary network output width (paper: 1024)"""
    hyper_blocks: int = 2
    """residual blocks per stage (paper: 2)"""
    hyper_dynamic_hidden: int = 256
    """dynamic hidden layer width (paper: 256)"""
    hyper_embedding_norm: float = 8.0
    """hyper_maml.py's --hyper-embedding-norm"""
    hidden_sizes: tuple[int, ...] = (100, 100)
    """hidden layers of the Vanilla and Context MLPs"""
    trpo: bool = False
    """also sample the post-adaptation episodes and take the TRPO meta-update"""
    num_threads: int = 1
    """torch CPU threads; 0 keeps torch's default"""


def parts(policy: hyper_maml.GaussianPolicy) -> dict:
    """The parameter groups whose inner step is measured alone: name -> prefixes of parameter names."""
    if isinstance(policy, hyper_maml.HyperPolicy):
        return {"primary only": ("primary.",), "heads only": ("heads.",), "log-std only": ("log_std",)}
    return {"log-std only": ("log_std",)}


def main(bench: Bench) -> None:
    if bench.num_threads:
        torch.set_num_threads(bench.num_threads)
    args = hyper_maml.Args(env_id=bench.env_id, seed=bench.seed, policy=bench.policy,
                           meta_batch_size=bench.meta_batch_size, fast_batch_size=bench.fast_batch_size,
                           fast_lr=bench.fast_lr, hyper_init=bench.hyper_init,
                           hyper_embedding_dim=bench.hyper_embedding_dim, hyper_blocks=bench.hyper_blocks,
                           hyper_dynamic_hidden=bench.hyper_dynamic_hidden,
                           hyper_embedding_norm=bench.hyper_embedding_norm, hidden_sizes=bench.hidden_sizes,
                           eval_freq=0)  # fmt: skip
    fast_lr = hyper_maml.effective_fast_lr(args)

    # as hyper_maml.py's main: global seeds, the task pools, the envs, the policy, the sampler's streams
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_tasks, _ = hyper_maml.make_task_pool(args.env_id, args.seed, args.num_train_tasks, args.num_test_tasks)
    envs = hyper_maml.make_task_envs(args.env_id, args.meta_batch_size * args.fast_batch_size)
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    train_contexts = hyper_maml.task_contexts(args.env_id, train_tasks)
    policy = hyper_maml.make_policy(args, obs_dim, act_dim, train_contexts)
    torch.manual_seed(args.seed)
    vanilla = hyper_maml.make_policy(hyper_maml.Args(policy="vanilla", hidden_sizes=bench.hidden_sizes), obs_dim,
                                     act_dim, train_contexts)  # fmt: skip
    sampler = hyper_maml.MetaBatchSampler(envs, train_tasks, args)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"{bench.policy}{f', {bench.hyper_init}' if bench.policy == 'hyper' else ''} ({n_params:,} parameters), "
          f"fast_lr {fast_lr:g}, {args.env_id}, seed {args.seed}: {args.meta_batch_size} tasks x "
          f"{args.fast_batch_size} episodes")  # fmt: skip
    if isinstance(policy, hyper_maml.HyperPolicy):
        with torch.no_grad():
            norm = policy.primary(train_contexts).pow(2).sum(-1).mean().sqrt().item()
        print(f"embedding rms norm on the train contexts: {norm:.3g} (fast_lr |e|^2 = {fast_lr * norm**2:.3g})")

    if bench.trpo:  # exactly sampler.sample: the pre-adaptation episodes are the same as without --trpo
        tasks, pre, advantages, post, _ = sampler.sample(policy, fast_lr)
    else:
        draws = sampler.task_rng.integers(0, len(train_tasks), size=args.meta_batch_size)
        tasks = [train_tasks[i] for i in draws]
        pre = hyper_maml.sample_episodes(envs, tasks, policy, None, args.fast_batch_size, sampler.rng)
        advantages = [hyper_maml.episode_advantages(e, args.gamma, args.gae_lambda) for e in pre]
    for env in envs:
        env.close()

    theta = {name: p.detach().clone() for name, p in policy.named_parameters()}
    groups = parts(policy)
    rows = {key: [] for key in ("inner KL", *groups, "mean |mu| before", "mean |mu| after", "vanilla mean |mu|")}
    for context, episodes, task_advantages in zip(hyper_maml.task_contexts(args.env_id, tasks), pre, advantages):
        adapted = hyper_maml.adapt(policy, None, episodes, context, task_advantages, fast_lr, first_order=True)
        adapted = {name: p.detach() for name, p in adapted.items()}
        full = hyper_maml.inner_step_stats(policy, adapted, episodes, context)
        rows["inner KL"].append(full["inner_kl"])
        rows["mean |mu| before"].append(full["pre_mean_abs_mu"])
        rows["mean |mu| after"].append(full["post_mean_abs_mu"])
        for group, prefixes in groups.items():
            partial = {name: adapted[name] if name.startswith(prefixes) else p for name, p in theta.items()}
            rows[group].append(hyper_maml.inner_step_stats(policy, partial, episodes, context)["inner_kl"])
        rows["vanilla mean |mu|"].append(
            hyper_maml.inner_step_stats(vanilla, dict(vanilla.named_parameters()), episodes, context)["pre_mean_abs_mu"]
        )
    kl = np.mean(rows["inner KL"])
    for key, values in rows.items():
        share = f" ({100 * np.mean(values) / kl:.2g}% of the full step's)" if key in groups else ""
        print(f"{key}: {np.mean(values):.3g}{share}  [tasks: {min(values):.3g} to {max(values):.3g}]")
    ratio = np.mean(rows["mean |mu| before"]) / np.mean(rows["vanilla mean |mu|"])
    print(f"mean |mu| / vanilla's on the same states: {ratio:.3g}")

    if bench.trpo:
        learner = hyper_maml.MAML(args, policy, fast_lr)
        stats = learner.update(tasks, pre, advantages, post)
        change = torch.cat([(p.detach() - theta[name]).flatten() for name, p in policy.named_parameters()]).norm()
        print(f"TRPO step: line-search steps {stats['ls_steps']}, mean KL {stats['kl']:.4g}, |theta change| "
              f"{change.item():.3g}, pre / post-adaptation return {hyper_maml.mean_return(pre):.1f} / "
              f"{hyper_maml.mean_return(post):.1f}")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Bench))

"""Hyper-PEARL's and PEARL's networks at init, and how saturated the policy gets in its first gradient steps.

    python benchmarks/pearl_init_stats.py --model hyper --hyper-init pytorch --seed 0        # paper sizes 1024/2/256
    python benchmarks/pearl_init_stats.py --model hyper --hyper-init pytorch --no-input-scaling
    python benchmarks/pearl_init_stats.py --model hyper --hyper-init authors
    python benchmarks/pearl_init_stats.py --model hyper --hyper-embedding-dim 256 --hyper-blocks 1 \
        --hyper-dynamic-hidden 64                                                         # reduced sizes 256/1/64
    python benchmarks/pearl_init_stats.py --model mlp                                     # PEARL, rlkit's fanin_init
    python benchmarks/pearl_init_stats.py --model mlp --earlier-mlp-bounds --steps        # at init only

The agent is hyper_pearl.py's (`make_agent`, seeded and, for --hyper-init pytorch, calibrated exactly as a run with
the same --seed and --env-id), trained by its learner (`PEARL.update`) with the default learning rates. Data: every
train task's buffers (both directions for the Fwd-Back families) get --transitions transitions of uniformly random
actions in 200-step episodes. Probes, drawn once from the buffers: --probe-z tasks, each with --probe-states states,
a context of the family's embedding-batch-size transitions, a prior z and a posterior z (fixed noise; the posterior
is re-inferred from the probe contexts by the current encoder at every report).

At init it reports Q1's spread over actions (std of Q(s, a, z) over --probe-actions uniform actions at the first
probe state of each probe task, z from the posterior; mean over states), the mean |Q(s, 0, 0)| over the probe
states, for --model hyper the rms norm of the policy's embedding at the prior and at the posterior z and the rms of
Q1's generated output-layer weights at the probe states, and the mean |z| of the probe z. Then, after every gradient
step in --steps (and at init, step 0), the fraction of saturated pre-tanh means (|mu| > 3,
hyper_pearl.policy_saturation) at the prior and at the posterior z over all probe states, and the mean log-std at
the prior z. A second table gives how far one gradient step moves the networks, averaged over the steps of each
interval: the rms change of the first layer's weights relative to their rms before the step, for the policy and Q1
(generated at the probe posterior z and at the probe states for --model hyper; the layer's own for mlp), and the
absolute rms change of the policy's pre-tanh mean at the probe states and posterior z.

--no-input-scaling replaces hyper_pearl.balance_input_scale by a no-op in this process, so --hyper-init pytorch keeps
PyTorch's default input projection in the policy's primary network. --earlier-mlp-bounds re-draws every hidden
layer of the MLP models and of the encoder with bound 1/sqrt(in_features) (the earlier reading of rlkit's
fanin_init) instead of 1/sqrt(out_features).
"""

import os
import random
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hyper_pearl  # noqa: E402

DATA_STREAM, PROBE_STREAM, TRAIN_STREAM = 101, 102, 103  # numpy streams default_rng([seed, stream]) of this benchmark


@dataclass
class Bench:
    model: Literal["mlp", "hyper"] = "hyper"
    """mlp: PEARL's 3 x 300 MLPs; hyper: Hyper-PEARL"""
    hyper_init: Literal["pytorch", "authors"] = "pytorch"
    """hyper_pearl.py's --hyper-init"""
    no_input_scaling: bool = False
    """--hyper-init pytorch without `balance_input_scale` (monkeypatched to a no-op here)"""
    earlier_mlp_bounds: bool = False
    """--model mlp: hidden layers (and the encoder's) U(+-1/sqrt(in_features)), the earlier fanin_init reading"""
    hyper_embedding_dim: int = hyper_pearl.HYPER_EMBEDDING_DIM
    """primary network output width (paper: 1024)"""
    hyper_blocks: int = hyper_pearl.HYPER_BLOCKS
    """residual blocks per stage (paper: 2)"""
    hyper_dynamic_hidden: int = hyper_pearl.DYNAMIC_HIDDEN
    """dynamic hidden layer width (paper: 256)"""
    env_id: hyper_pearl.FamilyName = "HalfCheetahFwdBack"
    """the task family"""
    num_train_tasks: int = 100
    """train tasks of the velocity families (the direction families always use the two directions)"""
    transitions: int = 2000
    """random-action transitions per train task, into its RL and encoder buffers"""
    steps: tuple[int, ...] = (5, 15, 50)
    """gradient steps after which saturation is reported (none: at init only)"""
    batch_size: int = 128
    """RL transitions per task per gradient step"""
    meta_batch: Optional[int] = None
    """tasks per gradient step; None: the family's (4 for Fwd-Back)"""
    embedding_batch_size: Optional[int] = None
    """context transitions per task (steps and probes); None: the family's (256 for Fwd-Back)"""
    probe_z: int = 64
    """probe tasks, each with one prior z and one posterior z"""
    probe_states: int = 64
    """buffer states per probe z"""
    probe_actions: int = 64
    """uniform actions for Q's spread over actions"""
    hyper_init_samples: int = 1000
    """hyper_pearl.py's --hyper-init-samples"""
    seed: int = 0
    """seed of the init (as hyper_pearl.py's --seed), the data, the probes and the gradient steps"""
    num_threads: int = 1
    """torch CPU threads; 0 keeps torch's default"""


def random_paths(family: str, task, n: int, rng: np.random.Generator) -> list:
    """Whole episodes of uniformly random actions until n transitions, as hyper_pearl.rollout's paths."""
    env, paths, steps = hyper_pearl.make_task_env(family, task), [], 0
    while steps < n:
        obs, _ = env.reset(seed=hyper_pearl.new_seed(rng))
        path = {k: [] for k in hyper_pearl.FIELDS}
        for _ in range(n - steps):
            action = rng.uniform(-1.0, 1.0, size=env.action_space.shape).astype(np.float32)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            for k, v in zip(hyper_pearl.FIELDS, (obs, action, [reward], next_obs, [float(terminated)])):
                path[k].append(np.asarray(v, dtype=np.float32))
            obs = next_obs
            if terminated or truncated:
                break
        paths.append({k: np.stack(v) for k, v in path.items()})
        steps += len(paths[-1]["rewards"])
    env.close()
    return paths


def earlier_mlp_bounds_(agent: hyper_pearl.PEARLAgent) -> None:
    """Re-draw the hidden layers of the encoder and the MLPs with U(+-1/sqrt(in_features)), bias 0.1 kept."""
    hidden = [*agent.encoder.hidden, *(m for net in (agent.policy, agent.qf1, agent.qf2, agent.vf) for m in net.body)]
    with torch.no_grad():
        for layer in (m for m in hidden if isinstance(m, nn.Linear)):
            bound = 1.0 / np.sqrt(layer.in_features)
            nn.init.uniform_(layer.weight, -bound, bound)
    agent.target_vf.load_state_dict(agent.vf.state_dict())


@torch.no_grad()
def policy_report(agent, probe) -> dict:
    """Saturated fraction at the prior and the posterior z, and the mean log-std at the prior z, over the probes."""
    posterior = agent.encoder.posterior(probe["context"])
    z = {"prior": probe["prior_noise"], "posterior": posterior.loc + posterior.scale * probe["posterior_noise"]}
    _, log_std = agent.policy.dist_params_with_weights(agent.policy.task_weights(z["prior"]), probe["obs"])
    return {**{name: hyper_pearl.policy_saturation(agent.policy, probe["obs"], z[name]) for name in z},
            "log_std": log_std.mean().item()}  # fmt: skip


@torch.no_grad()
def init_report(agent, probe, n_actions: int, generator: torch.Generator) -> dict:
    """Q1's spread over actions and |Q1(s, 0, 0)|, and the policy's embedding norms (hyper) at prior / posterior z."""
    posterior = agent.encoder.posterior(probe["context"])
    z_post = posterior.loc + posterior.scale * probe["posterior_noise"]
    obs = probe["obs"][:, 0]  # the first probe state of each probe task, (tasks, obs_dim)
    actions = torch.rand(len(obs), n_actions, probe["act_dim"], generator=generator) * 2 - 1
    per_action = (obs.unsqueeze(1).expand(-1, n_actions, -1), z_post.unsqueeze(1).expand(-1, n_actions, -1))
    q = agent.qf1(per_action[0], actions, per_action[1]).squeeze(-1)  # (states, actions)
    q0 = agent.qf1(probe["obs"], torch.zeros(*probe["obs"].shape[:-1], probe["act_dim"]),
                   torch.zeros(*probe["obs"].shape[:-1], probe["prior_noise"].shape[-1]))  # fmt: skip
    out = {
        "q_spread": q.std(1).mean().item(),
        "q_zero": q0.abs().mean().item(),
        "z_prior": probe["prior_noise"].norm(dim=-1).mean().item(),
        "z_posterior": z_post.norm(dim=-1).mean().item(),
    }
    if hasattr(agent.qf1, "primary"):  # Q's generated output-layer weights at the probe states
        out["q_out_rms"] = agent.qf1.heads[1](agent.qf1.primary(obs))[0].pow(2).mean().sqrt().item()
    if hasattr(agent.policy, "primary"):
        out["norm_prior"] = hyper_pearl.rms_norm(agent.policy.primary(probe["prior_noise"]))
        out["norm_posterior"] = hyper_pearl.rms_norm(agent.policy.primary(z_post))
    return out


STEP_PROBES = {
    "policy_w": "policy's first layer weights",
    "policy_mean": "policy's pre-tanh mean (absolute: rms of the change)",
    "q_w": "Q1's first layer weights",
}


@torch.no_grad()
def step_probe(agent, probe) -> dict:
    """What one gradient step moves: the first layer weights of the policy and of Q1, generated (hyper: at the probe
    posterior z, at the probe states) or the layer's own (mlp), and the policy's pre-tanh mean at the probe states and
    posterior z."""
    posterior = agent.encoder.posterior(probe["context"])
    z = posterior.loc + posterior.scale * probe["posterior_noise"]
    policy_weights = agent.policy.task_weights(z)
    if hasattr(agent.policy, "primary"):
        policy_w, q_w = policy_weights[0][0], agent.qf1.heads[0](agent.qf1.primary(probe["obs"]))[0]
    else:
        policy_w, q_w = agent.policy.body[0].weight.clone(), agent.qf1.body[0].weight.clone()
    mean, _ = agent.policy.dist_params_with_weights(policy_weights, probe["obs"])
    return {"policy_w": policy_w, "policy_mean": mean, "q_w": q_w}


def step_change(before: torch.Tensor, after: torch.Tensor, relative: bool) -> float:
    """rms(after - before), divided by rms(before) if relative."""
    change = (after - before).pow(2).mean().sqrt()
    return (change / before.pow(2).mean().sqrt() if relative else change).item()


def main(bench: Bench) -> None:
    if bench.num_threads:
        torch.set_num_threads(bench.num_threads)
    if bench.no_input_scaling:
        hyper_pearl.balance_input_scale = lambda primary, groups, *rest, **kw: 1.0
    args = hyper_pearl.Args(env_id=bench.env_id, seed=bench.seed, model=bench.model, hyper_init=bench.hyper_init,
                            hyper_embedding_dim=bench.hyper_embedding_dim, hyper_blocks=bench.hyper_blocks,
                            hyper_dynamic_hidden=bench.hyper_dynamic_hidden, batch_size=bench.batch_size,
                            meta_batch=bench.meta_batch, embedding_batch_size=bench.embedding_batch_size,
                            num_train_tasks=bench.num_train_tasks,
                            hyper_init_samples=bench.hyper_init_samples)  # fmt: skip
    meta_batch, embedding_batch = (hyper_pearl.schedule(args, k) for k in ("meta_batch", "embedding_batch_size"))

    # as hyper_pearl.py's main: global seeds, the task pools, the init sample, the agent
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = hyper_pearl.make_task_env(args.env_id, hyper_pearl.Task(1.0))
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    train_tasks, _ = hyper_pearl.make_task_pool(args.env_id, args.seed, args.num_train_tasks, args.num_test_tasks)
    init_context = None
    if args.model == "hyper" and args.hyper_init == "pytorch":
        init_seed = hyper_pearl.new_seed(np.random.default_rng([args.seed, hyper_pearl.INIT_STREAM]))
        init_context = hyper_pearl.collect_init_context(args.env_id, train_tasks[0], args.hyper_init_samples, init_seed)
    agent = hyper_pearl.make_agent(args, obs_dim, act_dim, init_context)
    if bench.earlier_mlp_bounds:
        if args.model != "mlp":
            raise SystemExit("--earlier-mlp-bounds applies to --model mlp")
        earlier_mlp_bounds_(agent)
    learner = hyper_pearl.PEARL(args, agent)

    data_rng = np.random.default_rng([args.seed, DATA_STREAM])
    rl_buffer, encoder_buffer = (hyper_pearl.MultiTaskBuffer(len(train_tasks), obs_dim, act_dim, args.buffer_size)
                                 for _ in range(2))  # fmt: skip
    for index, task in enumerate(train_tasks):
        for path in random_paths(args.env_id, task, bench.transitions, data_rng):
            rl_buffer.tasks[index].add_path(path)
            encoder_buffer.tasks[index].add_path(path)

    probe_rng = np.random.default_rng([args.seed, PROBE_STREAM])
    indices = probe_rng.integers(0, len(train_tasks), size=bench.probe_z)
    noise = torch.as_tensor(probe_rng.standard_normal((2, bench.probe_z, args.latent_dim)), dtype=torch.float32)
    probe = {"obs": rl_buffer.sample_batch(indices, bench.probe_states, probe_rng).obs,
             "context": encoder_buffer.sample_context(indices, embedding_batch, probe_rng),
             "prior_noise": noise[0], "posterior_noise": noise[1], "act_dim": act_dim}  # fmt: skip

    sizes = f"{bench.hyper_embedding_dim}/{bench.hyper_blocks}/{bench.hyper_dynamic_hidden}"
    name = (
        f"hyper, {bench.hyper_init}{' without the input scaling' if bench.no_input_scaling else ''}, {sizes}"
        if args.model == "hyper"
        else f"mlp{', earlier input-width bounds' if bench.earlier_mlp_bounds else ''}"
    )
    print(f"{name}, seed {args.seed}, {args.env_id}: {len(train_tasks)} tasks x {bench.transitions} random-action "
          f"transitions, meta-batch {meta_batch} x {args.batch_size}, context {embedding_batch}, "
          f"probes {bench.probe_z} z x {bench.probe_states} states")  # fmt: skip
    at_init = init_report(agent, probe, bench.probe_actions, torch.Generator().manual_seed(args.seed))
    norms = f"{at_init['norm_prior']:.2f} / {at_init['norm_posterior']:.2f}" if "norm_prior" in at_init else "-"
    print(f"at init: Q spread over actions {at_init['q_spread']:.3g} | mean |Q(s, 0, 0)| {at_init['q_zero']:.3g} | "
          f"policy embedding norm prior / posterior z {norms}")  # fmt: skip
    q_out = f"{at_init['q_out_rms']:.3g}" if "q_out_rms" in at_init else "-"
    print(f"at init: mean |z| prior / posterior {at_init['z_prior']:.2f} / {at_init['z_posterior']:.2f} | rms of Q's "
          f"generated output-layer weights {q_out} (U(+-3e-3): {3e-3 / np.sqrt(3):.3g})")  # fmt: skip

    print("steps | saturated at prior z | saturated at posterior z | mean log-std at prior z")
    step_rows = []
    train_rng, done, before, changes = np.random.default_rng([args.seed, TRAIN_STREAM]), 0, step_probe(agent, probe), []
    for target in sorted({0, *bench.steps}):
        for _ in range(target - done):
            step_indices = train_rng.integers(0, len(train_tasks), size=meta_batch)
            context = encoder_buffer.sample_context(step_indices, embedding_batch, train_rng)
            learner.update(rl_buffer.sample_batch(step_indices, args.batch_size, train_rng), context)
            after = step_probe(agent, probe)
            changes.append({k: step_change(before[k], after[k], relative=k != "policy_mean") for k in after})
            before = after
        if target > done:
            interval = {k: np.mean([c[k] for c in changes[done:target]]) for k in changes[0]}
            step_rows.append(f"{done + 1}-{target} | " + " | ".join(f"{interval[k]:.2e}" for k in STEP_PROBES))
        done = target
        report = policy_report(agent, probe)
        print(f"{target} | {100 * report['prior']:.2f}% | {100 * report['posterior']:.2f}% | {report['log_std']:.2f}",
              flush=True)  # fmt: skip
    if step_rows:
        print("\nchange per step (relative: rms of one step's change / rms before it), mean over the steps")
        print("steps | " + " | ".join(STEP_PROBES.values()))
        print("\n".join(step_rows))


if __name__ == "__main__":
    main(tyro.cli(Bench))

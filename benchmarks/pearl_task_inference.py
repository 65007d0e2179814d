"""How a PEARL or Hyper-PEARL checkpoint infers the task and how its policy and Q1 use the inferred z.

    python benchmarks/pearl_task_inference.py runs/<run_name>/checkpoint.pt [more checkpoints ...]

Reads checkpoints of hyper_pearl.py (either model) and compares two of its train tasks (--tasks; on a direction
family the two directions). Contexts come from the checkpoint's encoder buffer, states and actions from its RL buffer,
all drawn with --seed. Per checkpoint it prints:
- encoder: for --contexts contexts of --context-size transitions per task, the posterior mean mu of each. `between` is
  the distance between the two tasks' average mu, `within` the rms distance of a context's mu from its own task's
  average (how much z moves from one context of the same task to the next), `posterior std` the mean std of the
  posteriors (the noise of the z samples that Q, V and the policy train on).
- z use by the policy and by Q1, on --states states of the first task's RL buffer (Q1 at their buffer actions): the rms
  change of the deterministic action tanh(mean), and of Q1, when z moves from the first context's mu of task A to
  - the first context's mu of task B (`between tasks`),
  - the second context's mu of task A (`within task`),
  - a sample z ~ q(z | that first context) (`posterior sample`, rms over --z-samples samples),
  and the std of the action and of Q1 over the states at the first z, for scale. A critic that has inferred the task
  changes a lot between tasks and little within one.
- actor against Q1, per task, with z the task's average mu, on --states states of that task's RL buffer: Q1 at the
  policy's deterministic action, at the best of --random-actions uniform actions per state, and their mean, as
  differences from Q1's mean over the random actions; and the fraction of states where the policy's action scores at
  least as high as every random action. How well the policy climbs its own critic.
- the return of one deterministic episode per task with z the task's average mu (the env's 200 steps).
"""

import dataclasses
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hyper_pearl  # noqa: E402


@dataclass
class Bench:
    checkpoints: tyro.conf.Positional[tuple[str, ...]]
    """checkpoint.pt files of hyper_pearl.py runs"""
    tasks: tuple[int, int] = (0, 1)
    """the two train-task indices to compare (A, B)"""
    contexts: int = 16
    """contexts per task for the encoder's figures"""
    context_size: int = 256
    """transitions per context (the direction families' embedding batch)"""
    states: int = 256
    """states per task for the policy's and Q1's figures"""
    z_samples: int = 16
    """posterior samples for the `posterior sample` column"""
    random_actions: int = 64
    """uniform random actions per state for the actor-against-Q1 figures"""
    seed: int = 0
    """seed of the buffer draws, the posterior samples, the random actions and the episodes"""


def load(path: str) -> tuple:
    """(args, agent with the checkpoint's weights, encoder buffer, RL buffer, train tasks) of a hyper_pearl.py
    checkpoint; refuses anything else with one error line."""
    checkpoint = hyper_pearl.load_file(path, ("checkpoint",))
    names = {field.name for field in dataclasses.fields(hyper_pearl.Args)}
    args = hyper_pearl.Args(**{k: v for k, v in checkpoint["args"].items() if k in names})
    env = hyper_pearl.make_task_env(args.env_id, hyper_pearl.Task(1.0))
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    init_context = None  # the init is overwritten by the checkpoint's weights; --hyper-init pytorch needs a sample
    if args.model == "hyper" and args.hyper_init == "pytorch":
        init_context = torch.randn(2 * hyper_pearl.schedule(args, "embedding_batch_size"), obs_dim + act_dim + 1)
    agent = hyper_pearl.make_agent(args, obs_dim, act_dim, init_context)
    learner = hyper_pearl.PEARL(args, agent)
    learner.load_state_dict(checkpoint["learner"])
    train_tasks, _ = hyper_pearl.make_task_pool(args.env_id, args.seed, args.num_train_tasks, args.num_test_tasks)
    buffers = []
    for name in ("encoder_buffer", "rl_buffer"):
        buffer = hyper_pearl.MultiTaskBuffer(len(train_tasks), obs_dim, act_dim, args.buffer_size)
        buffer.load_state_dict(checkpoint[name])
        buffers.append(buffer)
    return args, checkpoint["iteration"], agent, *buffers, train_tasks


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


@torch.no_grad()
def posteriors(agent, encoder_buffer, task: int, bench: Bench, rng) -> torch.distributions.Normal:
    """q(z | c) for --contexts contexts of the task, batched: loc and scale (contexts, latent)."""
    context = encoder_buffer.sample_context([task] * bench.contexts, bench.context_size, rng)
    return agent.encoder.posterior(context)


def encoder_figures(q_a, q_b) -> dict:
    mean_a, mean_b = q_a.loc.mean(0), q_b.loc.mean(0)
    within = torch.cat([q_a.loc - mean_a, q_b.loc - mean_b]).pow(2).sum(-1).mean().sqrt().item()
    scale = torch.cat([q_a.scale, q_b.scale]).mean().item()
    return {"between": (mean_a - mean_b).norm().item(), "within": within, "posterior std": scale}


@torch.no_grad()
def z_use(f, q_a, q_b, z_samples: int) -> dict:
    """f(z (latent,)) -> outputs over the states. The rms change of f from the first context's mean of task A to the
    first of task B, to the second of task A and to samples of the first posterior; and f's std over the states."""
    start = f(q_a.loc[0])
    samples = q_a.sample((z_samples,))[:, 0]
    return {"between tasks": rms(f(q_b.loc[0]) - start), "within task": rms(f(q_a.loc[1]) - start),
            "posterior sample": float(np.sqrt(np.mean([rms(f(z) - start) ** 2 for z in samples]))),
            "std over states": start.std().item()}  # fmt: skip


def deterministic_action(policy, obs, z):
    """tanh(mean) at each state (states, obs_dim) for one z (latent,), (states, act_dim). The policy's dynamic weights
    (Hyper-PEARL) depend on z only, so they are generated once for all the states."""
    mean, _ = policy.dist_params_with_weights(policy.task_weights(z.view(1, -1)), obs.unsqueeze(0))
    return torch.tanh(mean[0])


def policy_action(agent, obs):
    """z (latent,) -> the deterministic action tanh(mean) at each state, (states, act_dim)."""
    return lambda z: deterministic_action(agent.policy, obs, z)


def q1_value(agent, obs, actions):
    """z (latent,) -> Q1(s, a, z) at each state and action, (states, 1)."""
    return lambda z: agent.qf1(obs, actions, z.expand(len(obs), -1))


@torch.no_grad()
def actor_against_q1(agent, obs, z, random_actions: int, generator: torch.Generator) -> dict:
    """Q1 at the policy's deterministic action and at the best of uniform random actions, relative to the random
    actions' mean, and the fraction of states where the policy's action is at least as good as every random one."""
    action = deterministic_action(agent.policy, obs, z)
    z = z.expand(len(obs), -1)
    policy = agent.qf1(obs, action, z).squeeze(-1)
    uniform = torch.rand(random_actions, *action.shape, generator=generator) * 2 - 1
    random = torch.stack([agent.qf1(obs, a, z).squeeze(-1) for a in uniform])
    mean, best = random.mean(0), random.max(0).values
    return {"policy": (policy - mean).mean().item(), "best random": (best - mean).mean().item(),
            "policy beats all": (policy >= best).float().mean().item()}  # fmt: skip


@torch.no_grad()
def episode_return(args, agent, task, z, seed: int) -> float:
    env = hyper_pearl.make_task_env(args.env_id, task)
    path = hyper_pearl.rollout(env, agent.policy, z.view(1, -1), deterministic=True, seed=seed)
    env.close()
    return float(path["rewards"].sum())


def report(path: str, bench: Bench) -> None:
    args, iteration, agent, encoder_buffer, rl_buffer, train_tasks = load(path)
    agent.eval()
    if max(bench.tasks) >= len(train_tasks):
        sys.exit(f"error: --tasks {bench.tasks[0]} {bench.tasks[1]}: the run has {len(train_tasks)} train tasks")
    rng, generator = np.random.default_rng(bench.seed), torch.Generator().manual_seed(bench.seed)
    torch.manual_seed(bench.seed)
    q_a, q_b = (posteriors(agent, encoder_buffer, task, bench, rng) for task in bench.tasks)
    print(f"{path}: {args.model}, iteration {iteration}, tasks {bench.tasks[0]} / {bench.tasks[1]} = "
          f"{train_tasks[bench.tasks[0]].goal} / {train_tasks[bench.tasks[1]].goal}")  # fmt: skip
    print("encoder: " + ", ".join(f"{k} {v:.3f}" for k, v in encoder_figures(q_a, q_b).items()))
    batch = rl_buffer.sample_batch([bench.tasks[0]], bench.states, rng)
    obs, actions = batch.obs[0], batch.actions[0]
    print("z use | between tasks | within task | posterior sample | std over states")
    for name, f in (("policy action", policy_action(agent, obs)), ("Q1", q1_value(agent, obs, actions))):
        figures = z_use(f, q_a, q_b, bench.z_samples)
        print(f"{name} | " + " | ".join(f"{v:.4f}" for v in figures.values()))
    print("task | Q1 at the policy's action | at the best random action | policy beats all random | "
          "deterministic return")
    for task, q in zip(bench.tasks, (q_a, q_b)):
        z = q.loc.mean(0)
        states = rl_buffer.sample_batch([task], bench.states, rng).obs[0]
        figures = actor_against_q1(agent, states, z, bench.random_actions, generator)
        ret = episode_return(args, agent, train_tasks[task], z, bench.seed)
        print(f"{task} | {figures['policy']:+.3f} | {figures['best random']:+.3f} | "
              f"{figures['policy beats all']:.2f} | {ret:.1f}")


def main(bench: Bench) -> None:
    torch.set_num_threads(1)
    for path in bench.checkpoints:
        report(path, bench)
        print()


if __name__ == "__main__":
    main(tyro.cli(Bench))

import copy
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import hyper_maml
from hyper_maml import (FAMILIES, FAMILY_SPECS, LOG_STD_MIN, Args, ContextPolicy, Episodes, HyperPolicy, MetaTask, Task,
                        VanillaPolicy, adapt, ant_is_healthy, check_args, conjugate_gradient, default_fast_lr,
                        episode_advantages, family_spec, fisher_vector_product, gae_advantages, init_hypernetwork,
                        inner_loss, inner_step_stats, line_search, linear_feature_baseline, make_policy, make_task_env,
                        make_task_envs, make_task_pool, masked_mean, mean_kl, mean_return, meta_objective,
                        pre_and_post_adaptation, sample_episodes, stack_task_policies, surrogate_loss, task_context,
                        task_contexts, trpo_step, variance_experiment)
from functools import partial

from tests.cli import ROOT, cached_runs, only_run_dir, run_script, tensorboard_events

DT = 0.05
# Ant's is mild so that it keeps its feet on the floor and the contact term is non-zero
ACTION = {"HalfCheetah": np.array([0.3, -0.7, 0.5, 0.9, -0.2, 0.1]), "Ant": np.linspace(0.2, -0.3, 8)}
ROBOT = {family: FAMILY_SPECS[family].robot for family in FAMILIES}


def cheetah_state(env):
    qpos, qvel = env.unwrapped.init_qpos.copy(), env.unwrapped.init_qvel.copy()
    qvel[0] = 2.0  # running forward at 2 m/s
    return qpos, qvel


def ant_state(env):
    """A landed ant (feet on the floor, so contact forces are non-zero) moving forward at about 1 m/s."""
    env.reset(seed=0)
    for _ in range(30):
        env.step(np.zeros(8))
    qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
    qvel[0] = 1.0
    return qpos, qvel


def step_from(env, state, action):
    """Step from a fixed MuJoCo state; returns the step's outputs and the hand-computed x velocity and contact sum."""
    env.reset(seed=0)
    env.unwrapped.set_state(*state)
    data = env.unwrapped.data
    torso_x = lambda: data.body("torso").xpos[0] if env.family_spec.robot == "Ant" else data.qpos[0]  # noqa: E731
    x_before = float(torso_x())
    obs, reward, terminated, truncated, info = env.step(action)
    velocity = (float(torso_x()) - x_before) / DT
    contact = np.sum(np.clip(data.cfrc_ext, -1.0, 1.0) ** 2)
    return reward, velocity, contact, obs, terminated


def expected_reward(family, goal, velocity, action, contact):
    clipped = np.clip(action, -1.0, 1.0)
    if family == "HalfCheetahFwdBack":
        return goal * velocity - 0.05 * np.sum(clipped**2)
    if family in ("HalfCheetahVel", "HalfCheetahVelMedium"):
        return -abs(velocity - goal) - 0.05 * np.sum(clipped**2)
    if family == "AntFwdBack":
        return goal * velocity - 0.005 * np.sum(clipped**2) - 0.5e-3 * contact + 0.05
    assert family == "AntVel"
    return (-abs(velocity - goal) + 1.0) - 0.005 * np.sum(clipped**2) - 0.5e-3 * contact + 0.05


def state_for(env):
    return ant_state(env) if env.family_spec.robot == "Ant" else cheetah_state(env)


# --- rewards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,goal", [("HalfCheetahFwdBack", 1.0), ("HalfCheetahFwdBack", -1.0), ("AntFwdBack", 1.0),
                                         ("AntFwdBack", -1.0), ("HalfCheetahVel", 0.4), ("HalfCheetahVel", 2.9),
                                         ("HalfCheetahVelMedium", 2.7), ("AntVel", 0.3), ("AntVel", 2.8)])  # fmt: skip
def test_reward_equals_the_familys_formula(family, goal):
    env = make_task_env(family, Task(goal))
    action = ACTION[ROBOT[family]]
    reward, velocity, contact, _, _ = step_from(env, state_for(env), action)
    assert abs(velocity) > 0.5  # the state really moves, so the velocity term is tested
    if ROBOT[family] == "Ant":
        assert 0.5e-3 * contact > 1e-6  # feet on the floor, so the contact term is tested
    assert reward == pytest.approx(expected_reward(family, goal, velocity, action, contact), abs=1e-9, rel=0)


@pytest.mark.parametrize("family", ["HalfCheetahFwdBack", "AntFwdBack"])
def test_direction_sign_flips_the_velocity_term(family):
    env = make_task_env(family, Task(1.0))
    state, action = state_for(env), ACTION[ROBOT[family]]
    forward, velocity, _, obs_forward, _ = step_from(env, state, action)
    env.set_task(Task(-1.0))
    backward, _, _, obs_backward, _ = step_from(env, state, action)
    np.testing.assert_array_equal(obs_forward, obs_backward)  # same physics, only the reward changes
    assert forward - backward == pytest.approx(2.0 * velocity, abs=1e-9, rel=0)


def test_ant_fwd_back_rewards_x_not_a_one_radian_heading():
    env = make_task_env("AntFwdBack", Task(1.0))
    qpos, qvel = ant_state(env)
    qvel[:2] = (0.0, 2.0)  # moving sideways along y: the authors' +-1 rad task would pay 0.84 * v_y for it
    reward, velocity, contact, _, _ = step_from(env, (qpos, qvel), np.zeros(8))
    assert abs(velocity) < 0.2
    assert reward == pytest.approx(velocity - 0.5e-3 * contact + 0.05, abs=1e-9, rel=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_control_cost_is_that_of_the_clipped_action(family):
    env = make_task_env(family, Task(1.0))
    state, size = state_for(env), ACTION[ROBOT[family]].size
    reward_clipped, _, _, obs_clipped, _ = step_from(env, state, np.ones(size))
    reward_large, _, _, obs_large, _ = step_from(env, state, np.full(size, 2.0))
    np.testing.assert_array_equal(obs_clipped, obs_large)
    assert reward_large == reward_clipped
    reward_zero, velocity_zero, contact_zero, _, _ = step_from(env, state, np.zeros(size))
    assert reward_zero == pytest.approx(expected_reward(family, 1.0, velocity_zero, np.zeros(size), contact_zero), abs=1e-9)


# --- episodes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("z,vz,terminated", [(0.55, 0.0, False), (0.21, -1.0, True), (1.3, 0.0, True)])
def test_ant_terminates_when_torso_z_leaves_its_range(z, vz, terminated):
    for family in ("AntFwdBack", "AntVel"):
        env = make_task_env(family, Task(1.0))
        model = env.unwrapped.model
        model.geom_contype[0] = model.geom_conaffinity[0] = 0  # no floor, so the torso can sink below z = 0.2
        qpos, qvel = env.unwrapped.init_qpos.copy(), np.zeros(model.nv)
        qpos[2], qvel[2] = z, vz
        done = step_from(env, (qpos, qvel), np.zeros(8))[4]
        z_after = env.unwrapped.data.qpos[2]
        assert bool(z_after < 0.2 or z_after > 1.0) is terminated
        assert done is terminated


def test_ant_health_needs_torso_z_in_range_and_a_finite_state():
    qpos, qvel = np.zeros(15), np.zeros(14)
    for z, healthy in [(0.19, False), (0.2, True), (0.5, True), (1.0, True), (1.01, False)]:
        qpos[2] = z
        assert ant_is_healthy(qpos, qvel) is healthy
    qpos[2] = 0.5
    qvel[3] = np.nan
    assert not ant_is_healthy(qpos, qvel)
    qvel[3], qpos[7] = 0.0, np.inf
    assert not ant_is_healthy(qpos, qvel)


def test_half_cheetah_never_terminates_even_upside_down():
    env = make_task_env("HalfCheetahVel", Task(1.0))
    qpos, qvel = cheetah_state(env)
    qpos[1], qpos[2] = -0.4, np.pi  # low and flipped over
    assert step_from(env, (qpos, qvel), np.zeros(6))[4] is False


@pytest.mark.parametrize("family", ["HalfCheetahFwdBack", "AntVel"])
def test_episodes_are_truncated_after_200_steps(family):
    env = make_task_env(family, Task(1.0))
    env.reset(seed=0)
    size = ACTION[ROBOT[family]].size
    flags = [env.step(np.zeros(size))[2:4] for _ in range(200)]
    assert flags[:-1] == [(False, False)] * 199
    assert flags[-1] == (False, True)


@pytest.mark.parametrize("family,obs_size", [("HalfCheetahFwdBack", 17), ("HalfCheetahVelMedium", 17), ("AntVel", 27)])
def test_observations_are_gymnasiums(family, obs_size):
    env = make_task_env(family, Task(1.0))
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (obs_size,)
    assert env.step(np.zeros(env.action_space.shape))[0].shape == (obs_size,)


def test_set_task_refuses_a_goal_of_the_wrong_kind():
    env = make_task_env("HalfCheetahFwdBack", Task(1.0))
    with pytest.raises(ValueError, match="direction"):
        env.set_task(Task(0.5))
    with pytest.raises(ValueError, match="velocity"):
        make_task_env("AntVel", Task(float("nan")))


# --- task pools and context -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_task_pools_are_deterministic_per_seed_with_the_right_sizes(family):
    train, test = make_task_pool(family, seed=3)
    assert (len(train), len(test)) == (100, 20)
    assert make_task_pool(family, seed=3) == (train, test)
    assert make_task_pool(family, seed=4) != (train, test)
    assert make_task_pool(family, seed=3, n_train=7, n_test=20) == (train[:7], test)  # test tasks do not depend on n_train
    assert all(isinstance(task.goal, float) for task in train + test)


@pytest.mark.parametrize("family", ["HalfCheetahFwdBack", "AntFwdBack"])
def test_direction_pools_draw_both_directions_for_train_and_test(family):
    train, test = make_task_pool(family, seed=0)
    for pool in (train, test):
        goals = [task.goal for task in pool]
        assert set(goals) == {-1.0, 1.0}
    assert 35 <= sum(task.goal == 1.0 for task in train) <= 65


@pytest.mark.parametrize("family,train_range,test_range", [("HalfCheetahVel", (0.0, 3.0), (0.0, 3.0)),
                                                           ("AntVel", (0.0, 3.0), (0.0, 3.0)),
                                                           ("HalfCheetahVelMedium", (0.0, 2.5), (2.5, 3.0))])  # fmt: skip
def test_velocity_pools_lie_in_their_ranges(family, train_range, test_range):
    train, test = make_task_pool(family, seed=0)
    for pool, (low, high) in ((train, train_range), (test, test_range)):
        goals = np.array([task.goal for task in pool])
        assert np.all((goals >= low) & (goals < high))
        assert goals.max() - goals.min() > 0.6 * (high - low)  # spread over the range, not a constant


def test_direction_context_is_the_direction():
    for family in ("HalfCheetahFwdBack", "AntFwdBack"):
        for goal in (-1.0, 1.0):
            context = task_context(family, Task(goal))
            assert context.dtype == np.float32 and context.shape == (1,)
            assert context[0] == goal


def test_velocity_context_maps_zero_to_three_onto_minus_one_to_one():
    for family in ("HalfCheetahVel", "AntVel", "HalfCheetahVelMedium"):
        contexts = [task_context(family, Task(v))[0] for v in (0.0, 1.5, 2.5, 3.0)]
        assert contexts == pytest.approx([-1.0, 0.0, 2.0 / 3.0, 1.0])
    for family in ("HalfCheetahVel", "AntVel"):
        train, test = make_task_pool(family, seed=0)
        contexts = np.array([task_context(family, task)[0] for task in train + test])
        assert np.all((contexts >= -1.0) & (contexts < 1.0))


def test_medium_test_contexts_fall_outside_the_train_context_range():
    train, test = make_task_pool("HalfCheetahVelMedium", seed=0)
    train_contexts = np.array([task_context("HalfCheetahVelMedium", task)[0] for task in train])
    test_contexts = np.array([task_context("HalfCheetahVelMedium", task)[0] for task in test])
    assert train_contexts.min() >= -1.0 and test_contexts.max() < 1.0
    assert test_contexts.min() > train_contexts.max()
    assert test_contexts.min() >= np.float32(2.0 / 3.0) - 1e-6


# --- errors and CLI ---------------------------------------------------------------------------


def test_families_are_the_papers_five():
    assert FAMILIES == ("HalfCheetahFwdBack", "AntFwdBack", "HalfCheetahVel", "AntVel", "HalfCheetahVelMedium")
    assert tuple(FAMILY_SPECS) == FAMILIES


@pytest.mark.parametrize("call", [lambda: family_spec("HopperVel"), lambda: make_task_pool("HopperVel", 0),
                                  lambda: task_context("HopperVel", Task(1.0)), lambda: make_task_env("HopperVel", Task(1.0))])  # fmt: skip
def test_unknown_family_fails_with_one_error_line(call, capsys):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: unknown task family 'HopperVel'") and "HalfCheetahVelMedium" in err


# --- policies ---------------------------------------------------------------------------------

OBS, ACT = 3, 2
SIZES = {"HalfCheetah": (17, 6), "Ant": (27, 8)}  # observation and action sizes of the robots


def tiny_policy(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    if kind == "vanilla":
        policy = VanillaPolicy(OBS, ACT, hidden=(5, 4))
    elif kind == "context":
        policy = ContextPolicy(OBS, ACT, hidden=(5, 4))
    else:
        policy = HyperPolicy(OBS, ACT, embedding_dim=16, blocks=1, dynamic_hidden=5)
        init_hypernetwork(policy, "pytorch", torch.linspace(-1.0, 1.0, 9).view(-1, 1))
    with torch.no_grad():
        policy.log_std.copy_(torch.linspace(-0.5, 0.3, ACT))
    return policy.to(dtype)


def random_episodes(n=3, t=6, seed=0, terminated_at=4, dtype=torch.float64):
    """n random episodes of t steps; the last one terminates after `terminated_at` steps (zero padding after)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=dtype)
    mask[-1, terminated_at:] = 0.0
    obs = torch.randn(n, t, OBS, generator=g, dtype=dtype) * mask[..., None]
    actions = torch.randn(n, t, ACT, generator=g, dtype=dtype) * mask[..., None]
    rewards = torch.randn(n, t, generator=g, dtype=dtype) * mask
    return Episodes(obs, actions, rewards, mask)


def meta_task(seed, context):
    train, valid = random_episodes(seed=2 * seed), random_episodes(seed=2 * seed + 1)
    context = torch.tensor([context], dtype=torch.float64)
    return MetaTask(context, train, episode_advantages(train, gamma=0.9), valid, episode_advantages(valid, gamma=0.9))


def manual_mean(policy, obs, context):
    """The policy mean computed by hand from its parameters, independently of its forward."""
    if isinstance(policy, HyperPolicy):
        e = policy.primary(context)
        x = obs
        for i, head in enumerate(policy.heads):
            weight = head.weight(e).view(head.fan_out, head.fan_in)
            x = (1 + head.gain(e)) * (x @ weight.T) + head.bias(e)
            x = torch.relu(x) if i == 0 else x
        return x
    x = torch.cat([obs, context.expand(*obs.shape[:-1], -1)], -1) if isinstance(policy, ContextPolicy) else obs
    for i, fc in enumerate(policy.fcs):
        x = x @ fc.weight.T + fc.bias
        x = torch.relu(x) if i < len(policy.fcs) - 1 else x
    return x


@pytest.mark.parametrize("kind", ["vanilla", "context", "hyper"])
def test_log_prob_is_the_normal_log_density_summed_over_action_dims(kind):
    policy, episodes, context = tiny_policy(kind), random_episodes(), torch.tensor([0.3], dtype=torch.float64)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-20.0, 0.4]))  # the first is clamped to log(1e-6)
    std = torch.tensor([1e-6, np.exp(0.4)], dtype=torch.float64)
    expected = Normal(manual_mean(policy, episodes.obs, context), std).log_prob(episodes.actions).sum(-1)
    log_probs = policy.log_prob(episodes.obs, episodes.actions, context)
    assert log_probs.shape == (3, 6)
    torch.testing.assert_close(log_probs, expected, rtol=1e-10, atol=1e-6)
    assert LOG_STD_MIN == pytest.approx(np.log(1e-6))


@pytest.mark.parametrize("kind", ["vanilla", "context", "hyper"])
def test_explicit_params_act_as_loaded_params_and_keep_their_graph(kind):
    policy, episodes, context = tiny_policy(kind), random_episodes(), torch.tensor([-0.4], dtype=torch.float64)
    torch.manual_seed(1)
    params = {name: (p.detach() + 0.1 * torch.randn_like(p)).requires_grad_() for name, p in policy.named_parameters()}
    own = {name: p.detach().clone() for name, p in policy.named_parameters()}
    loaded = copy.deepcopy(policy)
    loaded.load_state_dict(params)
    log_probs = policy.log_prob(episodes.obs, episodes.actions, context, params)
    torch.testing.assert_close(log_probs, loaded.log_prob(episodes.obs, episodes.actions, context), rtol=1e-12, atol=0)
    assert not torch.allclose(log_probs, policy.log_prob(episodes.obs, episodes.actions, context))
    grads = torch.autograd.grad(log_probs.sum(), list(params.values()))
    assert all(g.abs().sum() > 0 for g in grads)  # every explicit parameter is in the graph
    for name, p in policy.named_parameters():
        assert torch.equal(p, own[name])  # the module's own parameters are untouched


def test_vanilla_and_context_policies_are_the_authors_mlp():
    vanilla, context = VanillaPolicy(20, 6), ContextPolicy(20, 6, context_dim=1)
    # the authors' NormalMLPPolicy (keynans/HypeRL, MAML/maml_rl/policies/normal_mlp.py): 12,812 (obs 20, act 6) and
    # 13,716 (27, 8) parameters
    assert sum(p.numel() for p in vanilla.parameters()) == 12812
    assert sum(p.numel() for p in VanillaPolicy(27, 8).parameters()) == 13716
    assert sum(p.numel() for p in context.parameters()) == 12812 + 100
    for policy, fan_in in ((vanilla, 20), (context, 21)):
        assert [fc.weight.shape for fc in policy.fcs] == [(100, fan_in), (100, 100), (6, 100)]
        for fc in policy.fcs:
            assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
            bound = np.sqrt(6.0 / (fc.in_features + fc.out_features))  # xavier-uniform
            assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.9 * bound
        assert torch.equal(policy.log_std, torch.zeros(6))
        dist = policy.distribution(torch.randn(4, 200, 20), torch.tensor([0.5]))
        assert dist.mean.shape == dist.stddev.shape == (4, 200, 6)
        torch.testing.assert_close(dist.stddev, torch.ones(4, 200, 6))


def test_context_policy_depends_on_the_context_and_vanilla_does_not():
    obs = torch.randn(2, 5, OBS, dtype=torch.float64)
    for kind, depends in (("vanilla", False), ("context", True), ("hyper", True)):
        policy = tiny_policy(kind)
        means = [policy.distribution(obs, torch.tensor([c], dtype=torch.float64)).mean for c in (-1.0, 1.0)]
        assert (not torch.allclose(*means)) is depends


def test_hyper_policy_has_the_authors_architecture():
    policy = HyperPolicy(20, 6)
    # the authors' Hyper_Policy (keynans/HypeRL, MAML/maml_rl/policies/hyper_normal_mlp.py): 13.53 M parameters for
    # obs 20, act 6, of which the primary network is 6.17 M
    assert sum(p.numel() for p in policy.parameters()) == 13529106
    assert sum(p.numel() for p in policy.primary.parameters()) == 6169600
    assert [(h.fan_in, h.fan_out) for h in policy.heads] == [(20, 256), (256, 6)]
    assert policy.log_std.shape == (6,) and torch.equal(policy.log_std, torch.zeros(6))
    dist = policy.distribution(torch.randn(4, 200, 20), torch.tensor([0.5]))
    assert dist.mean.shape == dist.stddev.shape == (4, 200, 6)


def train_pool_policy(family, seed=0, **settings):
    """A Hyper policy for the family's observations and actions as `make_policy` builds it (paper sizes unless
    `settings` say otherwise), calibrated on the contexts of the family's train pool; returns (policy, contexts)."""
    train, _ = make_task_pool(family, seed=0)
    contexts = task_contexts(family, train)
    torch.manual_seed(seed)
    obs_dim, act_dim = SIZES[ROBOT[family]]
    return make_policy(Args(policy="hyper", **settings), obs_dim, act_dim, contexts), contexts


def generated(policy, contexts):
    """[(W, b, g) of each dynamic layer] for each context of contexts (B, 1)."""
    with torch.no_grad():
        return [head(policy.primary(contexts)) for head in policy.heads]


def rms(x):
    return x.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("family", ["HalfCheetahVel", "HalfCheetahFwdBack"])
def test_pytorch_hyper_init_generates_nn_linear_like_weights_and_biases_on_the_train_contexts(family):
    policy, contexts = train_pool_policy(family)
    (w1, b1, g1), (w2, b2, g2) = generated(policy, contexts)
    assert w1.shape == (100, 256, 17) and w2.shape == (100, 6, 256)
    with torch.no_grad():
        assert policy.primary(contexts).pow(2).sum(-1).mean().sqrt().item() == pytest.approx(8.0, rel=1e-4)
    # nn.Linear's default U(+-1/sqrt(fan_in)) for weights and biases: rms 1/sqrt(3 fan_in), on average over the tasks
    for tensor in (w1, b1):
        assert rms(tensor) == pytest.approx(1 / np.sqrt(3 * 17), rel=0.1)
    assert rms(w2) == pytest.approx(1 / np.sqrt(3 * 256), rel=0.1)
    assert 0.3 / np.sqrt(3 * 256) < rms(b2) < 3 / np.sqrt(3 * 256)  # 6 numbers per task: a loose check
    for gain in (g1, g2):  # every gain 1 + g starts at exactly 1
        assert gain.abs().max().item() == 0.0


def test_pytorch_hyper_init_keeps_nn_linear_scale_at_another_embedding_norm():
    policy, contexts = train_pool_policy("HalfCheetahVel", hyper_embedding_dim=256, hyper_embedding_norm=2.0)
    with torch.no_grad():
        assert policy.primary(contexts).pow(2).sum(-1).mean().sqrt().item() == pytest.approx(2.0, rel=1e-4)
    (w1, b1, _), (w2, _, _) = generated(policy, contexts)
    for tensor in (w1, b1):
        assert rms(tensor) == pytest.approx(1 / np.sqrt(3 * 17), rel=0.1)
    assert rms(w2) == pytest.approx(1 / np.sqrt(3 * 256), rel=0.1)


def test_contexts_give_distinct_dynamic_networks_not_rescaled_copies():
    # With zero biases in the primary network, e(c) = |c| e(sign c): velocity tasks on one side of 1.5 m/s (context 0)
    # shared one dynamic network up to scale, and 1.5 m/s got the all-zero network.
    policy, contexts = train_pool_policy("HalfCheetahVel")
    (w1_pool, b1_pool, _), _ = generated(policy, contexts)
    velocities = torch.tensor([[2 * v / 3 - 1] for v in (0.3, 0.9, 1.5, 2.0, 2.9)])
    (w1, b1, _), (w2, _, _) = generated(policy, velocities)
    for weights in (w1.flatten(1), w2.flatten(1)):
        for i, j in [(0, 1), (3, 4)]:  # two tasks below 1.5 m/s, two above
            a, b = weights[i], weights[j]
            sine = (1 - (a @ b / (a.norm() * b.norm())) ** 2).clamp(min=0).sqrt().item()
            assert sine > 0.1  # |b - s a| > 0.1 |b| for every scale s: not a rescaled copy
    assert rms(w1[2]) > 0.5 * rms(w1_pool) and rms(b1[2]) > 0.5 * rms(b1_pool)  # 1.5 m/s has a network of its own
    # forward and backward get nearly unrelated networks
    policy, _ = train_pool_policy("HalfCheetahFwdBack", hyper_embedding_dim=256)
    (w1, _, _), _ = generated(policy, torch.tensor([[1.0], [-1.0]]))
    forward, backward = w1.flatten(1)
    assert (forward @ backward / (forward.norm() * backward.norm())).abs().item() < 0.5


def test_authors_hyper_init_uses_their_constants():
    torch.manual_seed(0)
    policy = HyperPolicy(OBS, ACT, embedding_dim=32, blocks=1, dynamic_hidden=16)
    init_hypernetwork(policy, "authors", torch.zeros(1, 1))
    for module in policy.primary.modules():
        if isinstance(module, torch.nn.Linear):
            bound = 1.0 / (2.0 * np.sqrt(module.in_features))
            assert module.weight.abs().max() <= bound and module.weight.abs().max() > 0.8 * bound
    for head, bound in zip(policy.heads, (0.05, 0.008)):
        for fc in (head.weight, head.bias, head.gain):
            assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.8 * bound
            assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    with pytest.raises(ValueError, match="pytorch or authors"):
        init_hypernetwork(policy, "xavier", torch.zeros(1, 1))


def test_hyper_primary_network_runs_once_per_task_for_a_batch_of_states():
    policy = tiny_policy("hyper")
    calls = []
    policy.primary.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    episodes, context = random_episodes(n=4, t=200), torch.tensor([0.2], dtype=torch.float64)
    log_probs = policy.log_prob(episodes.obs, episodes.actions, context)
    log_probs.sum().backward()
    assert calls == [(1,)]
    params = dict(policy.named_parameters())
    adapted = adapt(policy, params, episodes, context, torch.ones(4, 200, dtype=torch.float64), 0.1, first_order=False)
    policy.log_prob(episodes.obs, episodes.actions, context, adapted)
    assert calls == [(1,)] * 3  # the inner loss and the adapted policy: one primary call each
    # a lockstep sampler: one call for 3 tasks, then the conditioned policy is reused at every step
    contexts = torch.tensor([[-1.0], [0.2], [1.0]], dtype=torch.float64)
    task_policy = policy.condition(contexts)
    steps = [task_policy(torch.randn(3, 7, OBS, dtype=torch.float64)) for _ in range(5)]
    assert calls == [(1,)] * 3 + [(3, 1)] and steps[0].mean.shape == (3, 7, ACT)
    # the batched tasks give each task's own distribution
    obs = torch.randn(3, 4, 200, OBS, dtype=torch.float64)
    batched = policy.distribution(obs, contexts).mean
    for i in range(3):
        torch.testing.assert_close(batched[i], policy.distribution(obs[i], contexts[i]).mean)


# --- MAML-TRPO building blocks ----------------------------------------------------------------


def test_conjugate_gradient_solves_an_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a, b = m @ m.T + 0.5 * torch.eye(8, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(a, b)
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, iters=20), expected, rtol=1e-8, atol=1e-8)
    # 10 iterations of CG are exact for an n = 8 system up to rounding, and stop early at a zero residual
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, iters=10), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(conjugate_gradient(lambda v: a @ v, torch.zeros(8, dtype=torch.float64)), torch.zeros(8, dtype=torch.float64))


def flat_to_params(flat, like):
    chunks = torch.split(flat, [p.numel() for p in like.values()])
    return {name: c.view_as(p) for (name, p), c in zip(like.items(), chunks)}


@pytest.mark.parametrize("at_old", [True, False])
def test_fisher_vector_product_is_the_kl_hessian_times_v_plus_damping(at_old):
    policy, episodes, context = tiny_policy("context"), random_episodes(), torch.tensor([0.7], dtype=torch.float64)
    params = dict(policy.named_parameters())
    with torch.no_grad():
        old = policy.distribution(episodes.obs, context)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    if not at_old:
        flat = flat + 0.05 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kl_of_flat = lambda x: mean_kl(policy, flat_to_params(x, params), episodes, context, old)  # noqa: E731
    hessian = torch.autograd.functional.hessian(kl_of_flat, flat)
    point = {name: p.detach().clone().requires_grad_() for name, p in flat_to_params(flat, params).items()}
    fvp = fisher_vector_product(kl_of_flat(torch.cat([p.reshape(-1) for p in point.values()])), point, damping=1e-3)
    for seed in range(3):
        v = torch.randn(flat.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        torch.testing.assert_close(fvp(v), hessian @ v + 1e-3 * v, rtol=1e-8, atol=1e-10)
    if at_old:  # at theta_old the KL Hessian is the Fisher: positive semi-definite, with a non-trivial spectrum
        eigenvalues = torch.linalg.eigvalsh(hessian)
        assert eigenvalues.min() > -1e-10 and eigenvalues.max() > 1e-2


def quadratic_objective(direction, x0, kl_scale=1.0, kl_offset=0.0):
    """surrogate(x) = -direction . x; kl(x) = kl_offset + kl_scale * 0.5 |x - x0|^2."""
    return lambda theta: (-(direction @ theta["x"]), kl_offset + kl_scale * 0.5 * (theta["x"] - x0).pow(2).sum())


def test_line_search_backtracks_to_the_first_step_inside_the_trust_region():
    x0, direction = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.6, 0.8], dtype=torch.float64)
    params, full_step = {"x": x0.clone().requires_grad_()}, 1.0 * direction  # full step: kl 0.5 > max_kl 0.01
    new, stats = line_search(quadratic_objective(direction, x0), params, full_step, -(direction @ x0).item(), max_kl=0.01)
    k = next(k for k in range(20) if 0.5 * 0.8 ** (2 * k) <= 0.01)  # the first backtrack inside the trust region
    assert k > 0 and stats["ls_steps"] == k
    torch.testing.assert_close(new["x"].detach(), x0 + 0.8**k * full_step)
    assert stats["kl"] <= 0.01 and stats["kl"] == pytest.approx(0.5 * 0.8 ** (2 * k))
    assert stats["surrogate"] < -(direction @ x0).item()


@pytest.mark.parametrize("case", ["never_improves", "kl_always_too_large", "nan"])
def test_line_search_keeps_the_old_params_when_no_step_is_acceptable(case):
    x0, direction = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.6, 0.8], dtype=torch.float64)
    params = {"x": x0.clone().requires_grad_()}
    objective = {
        "never_improves": quadratic_objective(-direction, x0),  # the step goes uphill at every scale
        "kl_always_too_large": quadratic_objective(direction, x0, kl_offset=0.02),
        "nan": lambda theta: (theta["x"].sum() * float("nan"), theta["x"].sum() * 0.0),
    }[case]
    surrogate_before = objective(params)[0].item()
    new, stats = line_search(objective, params, 1e-3 * direction, surrogate_before, max_kl=0.01, max_steps=20)
    assert new is params and torch.equal(new["x"], x0)
    assert stats["ls_steps"] == -1


def test_trpo_step_takes_the_natural_gradient_step_to_the_kl_boundary():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    fisher, grad = m @ m.T + torch.eye(4, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    x0 = torch.randn(4, generator=g, dtype=torch.float64)
    objective = lambda theta: (grad @ theta["x"], 0.5 * (theta["x"] - x0) @ fisher @ (theta["x"] - x0))  # noqa: E731
    new, stats = trpo_step({"x": x0.clone().requires_grad_()}, objective, max_kl=0.01, damping=1e-8)
    natural = torch.linalg.solve(fisher, grad)
    expected = x0 - torch.sqrt(2 * 0.01 / (grad @ natural)) * natural  # 0.5 s^T F s = max_kl exactly
    assert stats["ls_steps"] == 0
    torch.testing.assert_close(new["x"].detach(), expected, rtol=1e-6, atol=1e-8)
    assert stats["kl"] == pytest.approx(0.01, rel=1e-5) and stats["surrogate"] < stats["surrogate_before"]


def test_linear_baseline_fits_a_return_that_is_linear_in_its_features():
    n, t, gamma = 4, 200, 0.9
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(n, t, OBS, generator=g, dtype=torch.float64)
    time = (torch.arange(t, dtype=torch.float64) / 100.0).view(1, t, 1).expand(n, t, 1)
    features = torch.cat([obs, obs**2, time, time**2, time**3, torch.ones_like(time)], -1)
    mask = torch.ones(n, t, dtype=torch.float64)
    mask[1, 120:] = 0.0  # an episode that terminated after 120 steps
    returns = features @ torch.randn(features.shape[-1], generator=g, dtype=torch.float64) * mask
    rewards = (returns - gamma * torch.cat([returns[:, 1:], torch.zeros(n, 1, dtype=torch.float64)], 1)) * mask
    values = linear_feature_baseline(obs * mask[..., None], rewards, mask, gamma)
    assert values.shape == (n, t)
    torch.testing.assert_close(values * mask, returns, rtol=0, atol=1e-4)
    assert torch.equal(values[1, 120:], torch.zeros(80, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="linear baseline"):
        linear_feature_baseline(obs * float("nan"), rewards, mask, gamma)


def test_gae_with_lambda_one_is_discounted_return_minus_value_and_ignores_padding():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)  # episode 2 terminated after 2 steps
    values = torch.tensor([[0.5, 1.0, -1.0], [2.0, 3.0, 100.0]], dtype=torch.float64)  # 100: padding, must not leak
    # gamma 0.5: returns 1 + 0.5 * 2 + 0.25 * 3 = 2.75, 2 + 1.5 = 3.5, 3; and 4 + 2.5 = 6.5, 5
    expected = torch.tensor([[2.75 - 0.5, 3.5 - 1.0, 3.0 + 1.0], [6.5 - 2.0, 5.0 - 3.0, 0.0]], dtype=torch.float64)
    raw = gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0, normalize=False)
    torch.testing.assert_close(raw, expected)
    normalized = gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0)
    valid = expected[mask.bool()]
    torch.testing.assert_close(normalized[mask.bool()], (valid - valid.mean()) / (valid.std(unbiased=False) + 1e-8))
    assert normalized[1, 2] == 0.0
    # lam < 1 really discounts the TD errors: lam = 0 gives the one-step TD error
    td0 = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.0, normalize=False)
    torch.testing.assert_close(td0[0], torch.tensor([1.0 + 0.5 - 0.5, 2.0 - 0.5 - 1.0, 3.0 + 1.0], dtype=torch.float64))
    assert td0[1, 1] == 5.0 - 3.0


def test_adapt_takes_one_gradient_step_on_every_parameter():
    policy, episodes, context = tiny_policy("hyper"), random_episodes(), torch.tensor([0.1], dtype=torch.float64)
    advantages = episode_advantages(episodes)
    params = dict(policy.named_parameters())
    grads = torch.autograd.grad(inner_loss(policy, params, episodes, context, advantages), list(params.values()))
    for first_order in (False, True):
        adapted = adapt(policy, params, episodes, context, advantages, 0.3, first_order)
        assert adapted.keys() == params.keys()
        for (name, p), g in zip(params.items(), grads):
            torch.testing.assert_close(adapted[name], p - 0.3 * g)
            assert g.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["vanilla", "context", "hyper"])
def test_second_order_meta_gradient_matches_finite_differences_and_differs_from_first_order(kind):
    policy = tiny_policy(kind)
    params = dict(policy.named_parameters())
    tasks, step_size = [meta_task(0, -0.5), meta_task(1, 0.8)], 0.02 if kind == "hyper" else 0.1
    exact = meta_objective(policy, params, tasks, step_size, first_order=False)
    first = meta_objective(policy, params, tasks, step_size, first_order=True)
    grad = torch.autograd.grad(exact(params)[0], list(params.values()))
    grad_first = torch.autograd.grad(first(params)[0], list(params.values()))
    g = torch.Generator().manual_seed(0)
    eps = 1e-7  # the hyper objective has large third derivatives: central differences need a small step
    for _ in range(3):
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params.values()]
        shifted = lambda s: {n: p.detach() + s * eps * d for (n, p), d in zip(params.items(), v)}  # noqa: E731
        numeric = (exact(shifted(1.0))[0] - exact(shifted(-1.0))[0]).item() / (2 * eps)
        second_order = sum((a * d).sum() for a, d in zip(grad, v)).item()
        first_order = sum((a * d).sum() for a, d in zip(grad_first, v)).item()
        assert second_order == pytest.approx(numeric, rel=1e-5, abs=1e-8)
        assert abs(first_order - numeric) > 1e-3 * max(1.0, abs(numeric))


def test_kl_is_from_old_to_new_summed_over_actions_and_surrogate_weights_advantages_by_the_ratio():
    policy, episodes, context = tiny_policy("vanilla"), random_episodes(), torch.tensor([0.0], dtype=torch.float64)
    params = dict(policy.named_parameters())
    mean_old, std_old = torch.randn(3, 6, ACT, dtype=torch.float64), torch.tensor([0.3, 2.0], dtype=torch.float64)
    old = Normal(mean_old, std_old)
    new = policy.distribution(episodes.obs, context)
    mean_new, std_new = new.mean, new.stddev
    # closed form KL(N_old || N_new) per dimension, summed over the action dims, averaged over the 16 valid steps
    kl = torch.log(std_new / std_old) + (std_old**2 + (mean_old - mean_new) ** 2) / (2 * std_new**2) - 0.5
    expected = (kl.sum(-1) * episodes.mask).sum() / 16
    torch.testing.assert_close(mean_kl(policy, params, episodes, context, old), expected)
    advantages = torch.randn(3, 6, dtype=torch.float64) * episodes.mask
    old_log_probs = policy.log_prob(episodes.obs, episodes.actions, context) - np.log(2.0)  # ratio 2 everywhere
    loss = surrogate_loss(policy, params, episodes, context, advantages, old_log_probs.detach())
    torch.testing.assert_close(loss, -2.0 * advantages.sum() / 16)


def test_inner_step_stats_are_the_kl_from_before_to_after_the_step_and_the_mean_abs_mu():
    policy, episodes, context = tiny_policy("context"), random_episodes(), torch.tensor([0.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    adapted = {k: v.detach() + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in policy.named_parameters()}
    stats = inner_step_stats(policy, adapted, episodes, context)
    with torch.no_grad():
        pre, post = policy.distribution(episodes.obs, context), policy.distribution(episodes.obs, context, adapted)
    mu_pre, mu_post, std_pre, std_post = pre.mean, post.mean, pre.stddev, post.stddev
    assert not torch.allclose(std_pre, std_post)  # so that the direction of the KL matters
    valid_mean = lambda x: ((x * episodes.mask).sum() / 16).item()  # noqa: E731  (16 valid steps)
    # closed form KL(N_pre || N_post) per dimension, summed over the action dims
    kl = torch.log(std_post / std_pre) + (std_pre**2 + (mu_pre - mu_post) ** 2) / (2 * std_post**2) - 0.5
    assert stats["inner_kl"] == pytest.approx(valid_mean(kl.sum(-1)), rel=1e-9)
    assert stats["pre_mean_abs_mu"] == pytest.approx(valid_mean(mu_pre.abs().mean(-1)), rel=1e-9)
    assert stats["post_mean_abs_mu"] == pytest.approx(valid_mean(mu_post.abs().mean(-1)), rel=1e-9)


def test_meta_objective_starts_at_ratio_one_with_zero_kl():
    policy = tiny_policy("context")
    params = dict(policy.named_parameters())
    tasks = [meta_task(0, -0.5), meta_task(1, 0.8)]
    surrogate, kl = meta_objective(policy, params, tasks, step_size=0.5, first_order=False)(params)
    expected = -np.mean([(t.valid_advantages * t.valid.mask).sum().item() / t.valid.mask.sum().item() for t in tasks])
    assert surrogate.item() == pytest.approx(expected, abs=1e-12)
    assert kl.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["vanilla", "hyper"])
def test_trpo_step_on_a_meta_batch_improves_the_surrogate_within_the_trust_region(kind):
    policy = tiny_policy(kind)
    params = dict(policy.named_parameters())
    tasks = [meta_task(0, -0.5), meta_task(1, 0.8)]
    objective = meta_objective(policy, params, tasks, step_size=0.5, first_order=False)
    new, stats = trpo_step(params, objective, max_kl=0.01)
    assert stats["ls_steps"] >= 0
    surrogate, kl = objective(new)
    assert surrogate.item() == pytest.approx(stats["surrogate"]) and surrogate.item() < stats["surrogate_before"]
    assert 0.0 < kl.item() <= 0.01
    policy.load_state_dict(new)
    torch.testing.assert_close(objective(dict(policy.named_parameters()))[0], surrogate)


# --- sampler ----------------------------------------------------------------------------------


def env_policy(kind, family="HalfCheetahVel", seed=0):
    """A small policy with the family's real observation and action sizes."""
    obs_dim, act_dim = SIZES[ROBOT[family]]
    torch.manual_seed(seed)
    if kind == "hyper":
        policy = HyperPolicy(obs_dim, act_dim, embedding_dim=16, blocks=1, dynamic_hidden=8)
        init_hypernetwork(policy, "pytorch", torch.linspace(-1.0, 1.0, 9).view(-1, 1))
        return policy
    return (VanillaPolicy if kind == "vanilla" else ContextPolicy)(obs_dim, act_dim, hidden=(8,))


def record_steps(envs):
    """Wraps every env's reset and step: logs[i] gets the reset observation, then (action, obs, reward, terminated,
    truncated) of every step of env i."""
    logs = [[] for _ in envs]
    for env, log in zip(envs, logs):
        reset, step = env.reset, env.step

        def recording_reset(*a, reset=reset, log=log, **kw):
            out = reset(*a, **kw)
            log.append(out[0].copy())
            return out

        def recording_step(action, step=step, log=log):
            out = step(action)
            log.append((np.array(action), *out[:4]))
            return out

        env.reset, env.step = recording_reset, recording_step
    return logs


def test_sampler_runs_200_step_half_cheetah_episodes_and_stores_what_the_envs_returned():
    tasks, n = [Task(0.5), Task(2.0)], 2
    envs = make_task_envs("HalfCheetahVel", 5)  # one more than needed: the extra env stays unused
    logs = record_steps(envs)
    policy = env_policy("vanilla")
    episodes = sample_episodes(envs, tasks, policy, None, n, np.random.default_rng(0))
    assert len(episodes) == 2 and logs[4] == []
    for b, task_episodes in enumerate(episodes):
        assert task_episodes.obs.shape == (n, 200, 17) and task_episodes.actions.shape == (n, 200, 6)
        assert task_episodes.rewards.shape == task_episodes.mask.shape == (n, 200)
        assert all(t.dtype == torch.float32 for t in (task_episodes.obs, task_episodes.actions, task_episodes.rewards))
        assert torch.equal(task_episodes.mask, torch.ones(n, 200))
        for e in range(n):
            env, (reset_obs, *steps) = envs[b * n + e], logs[b * n + e]
            assert env.task == tasks[b] and len(steps) == 200
            assert [s[3:] for s in steps] == [(False, False)] * 199 + [(False, True)]
            expected_obs = np.stack([reset_obs] + [s[1] for s in steps[:-1]]).astype(np.float32)
            np.testing.assert_array_equal(task_episodes.obs[e].numpy(), expected_obs)
            np.testing.assert_array_equal(task_episodes.actions[e].numpy(), np.stack([s[0] for s in steps]))
            rewards = np.array([s[2] for s in steps])
            np.testing.assert_array_equal(task_episodes.rewards[e].numpy(), rewards.astype(np.float32))
            assert task_episodes.rewards[e].sum().item() == pytest.approx(rewards.sum(), rel=1e-5)
    assert mean_return(episodes) == pytest.approx(np.mean([sum(s[2] for s in log[1:]) for log in logs[:4]]), rel=1e-5)
    # the actions are mu + sigma * eps with eps the generator's N(0, I) draws, one batch per step after the reset seeds
    rng = np.random.default_rng(0)
    rng.integers(0, 2**31 - 1, size=4)
    noise = torch.from_numpy(np.stack([rng.standard_normal((2, n, 6), dtype=np.float32) for _ in range(200)], 2))
    with torch.no_grad():
        for b, task_episodes in enumerate(episodes):
            distribution = policy.distribution(task_episodes.obs, torch.zeros(1))
            torch.testing.assert_close(task_episodes.actions, distribution.mean + distribution.stddev * noise[b])


def test_sampler_masks_the_rest_of_an_ant_episode_after_termination():
    envs = make_task_envs("AntVel", 2)
    model = envs[0].unwrapped.model
    model.geom_contype[0] = model.geom_conaffinity[0] = 0  # no floor: the ant falls below z = 0.2 and terminates
    logs = record_steps(envs)
    episodes = sample_episodes(envs, [Task(1.0), Task(2.0)], env_policy("context", "AntVel"), None, 1, np.random.default_rng(0))
    lengths = [len(log) - 1 for log in logs]
    assert 0 < lengths[0] < lengths[1] and logs[0][-1][3] is True  # terminated, not truncated
    assert episodes[0].obs.shape == (1, lengths[1], 27) and episodes[1].obs.shape[1] == lengths[1]
    for task_episodes, length, log in zip(episodes, lengths, logs):
        expected_mask = torch.zeros(1, lengths[1])
        expected_mask[0, :length] = 1.0
        assert torch.equal(task_episodes.mask, expected_mask)
        for tensor in (task_episodes.obs, task_episodes.actions, task_episodes.rewards):
            assert not tensor[0, length:].any()  # zero padding
        assert task_episodes.rewards.sum().item() == pytest.approx(sum(step[2] for step in log[1:]), rel=1e-5)


def test_sampler_calls_the_policy_once_per_step_for_all_envs(monkeypatch):
    policy, tasks, n = env_policy("hyper"), [Task(0.3), Task(2.4)], 3
    primary_calls, dynamic_calls = [], []
    policy.primary.register_forward_hook(lambda module, inputs, output: primary_calls.append(tuple(inputs[0].shape)))
    original = hyper_maml.dynamic_forward

    def counting_dynamic_forward(layers, base):
        dynamic_calls.append(tuple(base.shape))
        return original(layers, base)

    monkeypatch.setattr(hyper_maml, "dynamic_forward", counting_dynamic_forward)
    envs = make_task_envs("HalfCheetahVel", 6)
    sample_episodes(envs, tasks, policy, None, n, np.random.default_rng(0))
    assert primary_calls == [(2, 1)]  # once for both tasks, not per step or per env
    assert dynamic_calls == [(2, 3, 17)] * 200  # once per step for all 6 envs
    # one parameter set per task (adapted params): each task is conditioned once, and every step is one vmapped call
    primary_calls.clear(), dynamic_calls.clear()
    params = [{k: v.detach() + 0.01 * i for k, v in policy.named_parameters()} for i in range(2)]
    sample_episodes(envs, tasks, policy, iter(params), n, np.random.default_rng(0))
    assert primary_calls == [(1,), (1,)]
    assert dynamic_calls == [(3, 17)] * 200  # the per-task shape seen inside torch.vmap


@pytest.mark.parametrize("kind", ["vanilla", "context", "hyper"])
def test_stacked_task_policies_give_each_task_its_own_parameters(kind):
    policy = tiny_policy(kind)
    contexts = torch.tensor([[-0.4], [0.9]], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    params = [{k: v.detach() + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in policy.named_parameters()}
              for _ in range(2)]  # fmt: skip
    obs = torch.randn(2, 5, OBS, generator=g, dtype=torch.float64)
    stacked = stack_task_policies([policy.condition(c, p) for c, p in zip(contexts, params)])(obs)
    assert stacked.mean.shape == (2, 5, ACT)
    for i in range(2):
        own = policy.distribution(obs[i], contexts[i], params[i])
        torch.testing.assert_close(stacked.mean[i], own.mean)
        torch.testing.assert_close(stacked.stddev[i], own.stddev)
    assert not torch.allclose(stacked.mean[0], policy.distribution(obs[0], contexts[0], params[1]).mean)


def test_sampling_is_reproducible_from_the_generator_alone():
    policy, tasks = env_policy("context"), [Task(1.0), Task(0.2)]
    envs = make_task_envs("HalfCheetahVel", 4)
    first = sample_episodes(envs, tasks, policy, None, 2, np.random.default_rng(7))
    again = sample_episodes(make_task_envs("HalfCheetahVel", 4), tasks, policy, None, 2, np.random.default_rng(7))
    reused = sample_episodes(envs, tasks, policy, None, 2, np.random.default_rng(7))  # envs that already ran
    other = sample_episodes(envs, tasks, policy, None, 2, np.random.default_rng(8))
    for a, b, c, d in zip(first, again, reused, other):
        for field in ("obs", "actions", "rewards", "mask"):
            assert torch.equal(getattr(a, field), getattr(b, field)) and torch.equal(getattr(a, field), getattr(c, field))
        assert not torch.equal(a.obs, d.obs) and not torch.equal(a.actions, d.actions)


def test_post_adaptation_episodes_come_from_each_tasks_adapted_policy():
    policy, tasks, n = env_policy("context"), [Task(0.5), Task(2.5)], 2
    envs = make_task_envs("HalfCheetahVel", 4)
    pre, advantages, post, inner = pre_and_post_adaptation(envs, tasks, policy, n, np.random.default_rng(3), 0.1, 0.95, 1.0)
    rng = np.random.default_rng(3)
    pre_again = sample_episodes(envs, tasks, policy, None, n, rng)
    contexts = task_contexts("HalfCheetahVel", tasks)
    adapted = [adapt(policy, None, e, c, episode_advantages(e), 0.1, first_order=False) for e, c in zip(pre_again, contexts)]
    # replay the generator: the post-adaptation sampling draws the env seeds, then one N(0, I) batch per step
    rng.integers(0, 2**31 - 1, size=2 * n)
    noise = np.stack([rng.standard_normal((2, n, 6), dtype=np.float32) for _ in range(200)], 2)  # (task, episode, step, act)
    for b, (a, c) in enumerate(zip(pre, pre_again)):
        assert torch.equal(a.actions, c.actions)
        torch.testing.assert_close(advantages[b], episode_advantages(c))
        with torch.no_grad():
            own = policy.distribution(post[b].obs, contexts[b], adapted[b])  # task b's context and theta'_b
            theta = policy.distribution(post[b].obs, contexts[b])
        torch.testing.assert_close(post[b].actions, own.mean + own.stddev * torch.from_numpy(noise[b]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(post[b].actions, theta.mean + theta.stddev * torch.from_numpy(noise[b]), rtol=1e-3, atol=1e-3)
        stats = inner_step_stats(policy, adapted[b], pre_again[b], contexts[b])  # each task's own step, on its own states
        assert {key: values[b].item() for key, values in inner.items()} == pytest.approx(stats, rel=1e-6)


def test_sampler_refuses_a_non_finite_action_before_stepping_the_env():
    policy = env_policy("vanilla")
    with torch.no_grad():
        policy.log_std[2] = float("nan")
    envs = make_task_envs("HalfCheetahVel", 1)
    logs = record_steps(envs)
    with pytest.raises(hyper_maml.NonFinite, match="non-finite action"):
        sample_episodes(envs, [Task(1.0)], policy, None, 1, np.random.default_rng(0))
    assert len(logs[0]) == 1  # reset only


def test_variance_experiment_scores_each_sample_after_its_own_inner_step():
    policy, tasks, n, fast_lr = env_policy("hyper"), [Task(0.5), Task(2.5)], 2, default_fast_lr("hyper")
    envs = make_task_envs("HalfCheetahVel", 4)
    result = variance_experiment(envs, tasks, policy, 2, n, np.random.default_rng(0), fast_lr, 0.95, 1.0)
    assert result["post_returns"].shape == result["pre_returns"].shape == result["inner_kl"].shape == (2,)
    assert result["post_task_returns"].shape == (2, 2) and result["env_steps"] == 2 * 2 * 4 * 200
    torch.testing.assert_close(result["post_task_returns"].mean(1), result["post_returns"])
    # replay the generator: each sample draws fresh episodes with theta, steps every task on its own episodes, and
    # scores the stepped policies on fresh episodes
    rng, contexts = np.random.default_rng(0), task_contexts("HalfCheetahVel", tasks)
    for s in range(2):
        pre = sample_episodes(envs, tasks, policy, None, n, rng)
        adapted = [adapt(policy, None, e, c, episode_advantages(e), fast_lr, first_order=True) for e, c in zip(pre, contexts)]
        unadapted = sample_episodes(envs, tasks, policy, None, n, copy.deepcopy(rng))
        post = sample_episodes(envs, tasks, policy, adapted, n, rng)
        assert result["pre_returns"][s].item() == pytest.approx(mean_return(pre), rel=1e-9)
        own = torch.tensor([e.rewards.sum(1).double().mean().item() for e in post], dtype=torch.float64)
        torch.testing.assert_close(result["post_task_returns"][s], own)
        without_step = torch.tensor([e.rewards.sum(1).double().mean().item() for e in unadapted], dtype=torch.float64)
        assert (result["post_task_returns"][s] - without_step).abs().max() > 1.0  # the step changed what was scored
        kls = [inner_step_stats(policy, a, e, c)["inner_kl"] for a, e, c in zip(adapted, pre, contexts)]
        assert result["inner_kl"][s].item() == pytest.approx(np.mean(kls), rel=1e-6) and min(kls) > 0


# --- the policies at initialization, at the defaults -------------------------------------------


def default_policy(kind, family, seed=0):
    """The policy `make_policy` builds at the default settings (paper sizes) for the family, and its fast_lr."""
    args = Args(policy=kind, env_id=family)
    obs_dim, act_dim = SIZES[ROBOT[family]]
    torch.manual_seed(seed)
    policy = make_policy(args, obs_dim, act_dim, task_contexts(family, make_task_pool(family, seed=args.seed)[0]))
    return policy, default_fast_lr(kind, args.hyper_init, args.hyper_embedding_norm)


def mean_abs_mu(policy, episodes, contexts):
    with torch.no_grad():
        means = [policy.distribution(e.obs, c).mean.abs().mean(-1) for e, c in zip(episodes, contexts)]
    return np.mean([masked_mean(m, e.mask).item() for m, e in zip(means, episodes)])


def test_untrained_hyper_acts_on_the_scale_of_vanilla():
    # Mean |mu| on the same states (where an untrained Vanilla policy goes), averaged over three inits. The zero-bias
    # kaiming init started Hyper at 3x Vanilla's (actions clipped, a higher control cost), the authors' constants at a
    # tenth of it.
    family, tasks = "HalfCheetahFwdBack", [Task(1.0), Task(-1.0)]
    contexts = task_contexts(family, tasks)
    episodes = sample_episodes(make_task_envs(family, 4), tasks, default_policy("vanilla", family)[0], None, 2,
                               np.random.default_rng(0))  # fmt: skip
    scale = {kind: np.mean([mean_abs_mu(default_policy(kind, family, seed)[0], episodes, contexts) for seed in range(3)])
             for kind in ("vanilla", "hyper")}  # fmt: skip
    assert 0.5 < scale["hyper"] / scale["vanilla"] < 2.0, scale


def test_default_inner_step_moves_hyper_about_as_far_as_vanilla():
    # KL(pre || post) of one inner step at the defaults, each policy on its own episodes. The zero-bias kaiming init
    # with the authors' 5e-5 moved Hyper by KL ~1e5 (a bang-bang adapted policy that froze the meta-update); the
    # authors' constants with 5e-5 move it by ~1e-6 (no adaptation at all).
    family, tasks, args = "HalfCheetahVel", [Task(0.5), Task(2.5)], Args()
    envs, kl = make_task_envs(family, 2 * args.fast_batch_size), {}
    for kind in ("vanilla", "hyper"):
        policy, fast_lr = default_policy(kind, family)
        *_, inner = pre_and_post_adaptation(envs, tasks, policy, args.fast_batch_size, np.random.default_rng(0), fast_lr,
                                            args.gamma, args.gae_lambda)  # fmt: skip
        kl[kind] = inner["inner_kl"].mean().item()
    assert 0.1 < kl["hyper"] / kl["vanilla"] < 10.0, kl


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"meta_batch_size": 0}, "--meta-batch-size must be positive"),
        ({"fast_batch_size": -2}, "--fast-batch-size must be positive"),
        ({"num_batches": 0}, "--num-batches must be positive"),
        ({"num_train_tasks": 0}, "--num-train-tasks must be positive"),
        ({"variance_samples": 0}, "--variance-samples must be positive"),
        ({"cg_damping": -1e-5}, "--cg-damping must be >= 0"),
        ({"hidden_sizes": (100, 0)}, "--hidden-sizes must be one or more positive widths"),
        ({"hidden_sizes": ()}, "--hidden-sizes must be one or more positive widths"),
        ({"hyper_embedding_dim": 30}, "multiple of 4"),
        ({"gamma": 0.0}, "--gamma must be in (0, 1]"),
        ({"ls_backtrack_ratio": 1.0}, "--ls-backtrack-ratio must be in (0, 1)"),
        ({"fast_lr": 0.0}, "--fast-lr must be positive"),
        ({"hyper_embedding_norm": 0.0}, "--hyper-embedding-norm must be positive and finite"),
        ({"eval_tasks": 21}, "--eval-tasks must be in [1, --num-test-tasks 20]"),
        ({"variance_tasks": 101}, "larger than --num-train-tasks 100"),
        ({"variance_iters": (1, 401)}, "--variance-iters must lie in [1, --num-batches 400], got 401"),
        ({"seed": -1}, "--seed must be >= 0, got -1"),
        ({"max_kl": float("inf")}, "--max-kl must be a finite number, got inf"),
        ({"cg_damping": float("inf")}, "--cg-damping must be a finite number, got inf"),
        ({"fast_lr": float("nan")}, "--fast-lr must be a finite number, got nan"),
        ({"exp_name": "a/b"}, "--exp-name must be a plain name"),
    ],
)
def test_impossible_settings_fail_with_one_error_line(overrides, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_args(dataclasses.replace(Args(), **overrides))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_default_args_are_the_authors_and_pass_the_checks():
    args = Args()
    check_args(args)
    assert (args.seed, args.env_id, args.policy, args.num_batches, args.meta_batch_size, args.fast_batch_size) == (0, "HalfCheetahVel", "hyper", 400, 40, 20)
    assert (args.gamma, args.gae_lambda, args.max_kl, args.cg_iters, args.cg_damping, args.ls_max_steps, args.ls_backtrack_ratio) == (0.95, 1.0, 0.01, 10, 1e-5, 20, 0.8)
    assert args.hidden_sizes == (100, 100) and (args.num_train_tasks, args.num_test_tasks) == (100, 20)
    assert args.hyper_init == "pytorch" and args.hyper_embedding_norm == 8.0 and args.fast_lr is None
    assert default_fast_lr("vanilla") == default_fast_lr("context") == 0.1
    assert default_fast_lr("hyper", "authors", 8.0) == 5e-5  # the released inner step, with the released constants
    # the generated weights' step is fast_lr * norm^2 (default_fast_lr), kept at 0.05 whatever the norm
    assert default_fast_lr("hyper", "pytorch", 8.0) == pytest.approx(0.05 / 64)
    assert default_fast_lr("hyper", "pytorch", 4.0) == pytest.approx(4 * default_fast_lr("hyper", "pytorch", 8.0))


# --- end to end through the CLI ---------------------------------------------------------------

SCRIPT = os.path.join(ROOT, "hyper_maml.py")
SMALL_RUN = ["--meta-batch-size", "2", "--fast-batch-size", "2", "--num-batches", "2", "--num-train-tasks", "6",
             "--num-test-tasks", "3", "--eval-freq", "1", "--eval-tasks", "2", "--variance-iters", "2",
             "--variance-samples", "3", "--variance-tasks", "2", "--checkpoint-freq", "2", "--save-model",
             "--hyper-embedding-dim", "16", "--hyper-blocks", "1", "--hyper-dynamic-hidden", "8"]  # fmt: skip
TRAIN_TAGS = ["charts/pre_adaptation_return", "charts/post_adaptation_return", "losses/surrogate_before",
              "losses/surrogate_after", "losses/kl", "losses/line_search_steps", "charts/SPS", "charts/iteration_seconds",
              "adaptation/inner_kl", "adaptation/pre_mean_abs_mu", "adaptation/post_mean_abs_mu"]  # fmt: skip


run = partial(run_script, SCRIPT)


def scalars(run_dir):
    events = tensorboard_events(run_dir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events.Tags()["tensors"]


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """One SMALL_RUN per policy, made on first use: (stdout, run dir)."""
    return cached_runs(tmp_path_factory, run, SMALL_RUN, "--policy")


@pytest.mark.parametrize("policy", ["vanilla", "context", "hyper"])
def test_cli_run_trains_evaluates_and_logs_every_tag(policy, small_runs):
    stdout, run_dir = small_runs(policy)
    assert os.path.basename(run_dir).startswith(f"HalfCheetahVel__hyper_maml__{policy}__0__")
    assert "iteration 2/2" in stdout and "s/it" in stdout and "env steps/s" in stdout and "ETA" in stdout and "eval pre" in stdout
    tags, tensor_tags = scalars(run_dir)
    assert "hyperparameters/text_summary" in tensor_tags
    for tag in TRAIN_TAGS + ["eval/pre_adaptation_return", "eval/post_adaptation_return"]:
        assert [step for step, _ in tags[tag]] == [1, 2], tag
        assert all(np.isfinite(value) for _, value in tags[tag]), tag
    for (_, before), (_, after), (_, kl), (_, steps) in zip(*(tags[f"losses/{k}"] for k in ("surrogate_before", "surrogate_after", "kl", "line_search_steps"))):
        assert abs(before) < 1e-5  # at theta_old the surrogate is -mean(normalized advantages) = 0
        assert (after < before and 0 < kl <= 0.01) if steps >= 0 else (after == before and kl == 0)
    assert all(-1500 < value < 0 for _, value in tags["charts/pre_adaptation_return"])  # -|v - v_goal| - ctrl over 200 steps
    assert all(0 < value < 100 for _, value in tags["adaptation/inner_kl"])  # every inner step moved the policy
    model = torch.load(os.path.join(run_dir, "hyper_maml.cleanrl_model"), weights_only=True)
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert model["args"]["policy"] == policy and model["fast_lr"] == default_fast_lr(policy)
    policy_state = checkpoint["learner"]["policy"]
    assert checkpoint["iteration"] == 2 and all(torch.equal(model["policy"][k], v) for k, v in policy_state.items())
    assert len(checkpoint["tasks"]["train"]) == 6 and len(checkpoint["tasks"]["test"]) == 3
    assert (model["format"], model["kind"], checkpoint["kind"]) == ("hyper_maml/2", "model", "checkpoint")


@pytest.mark.parametrize("policy", ["context", "hyper"])
def test_cli_variance_experiment_saves_its_samples_and_logs_mean_and_std(policy, small_runs):
    _, run_dir = small_runs(policy)
    saved = torch.load(os.path.join(run_dir, "variance.pt"), weights_only=True)
    assert list(saved["iterations"]) == [2] and len(saved["tasks"]) == 2
    result = saved["iterations"][2]
    assert result["post_returns"].shape == result["pre_returns"].shape == (3,) and result["post_task_returns"].shape == (3, 2)
    tags, _ = scalars(run_dir)
    assert tags["variance/return_mean"] == [(2, pytest.approx(result["post_returns"].mean().item(), rel=1e-5))]
    assert tags["variance/return_std"] == [(2, pytest.approx(result["post_returns"].std(unbiased=False).item(), rel=1e-5))]
    assert tags["variance/inner_kl"] == [(2, pytest.approx(result["inner_kl"].mean().item(), rel=1e-5))]


def signed(contents):
    """A file's contents with its digest recomputed, as if the script had written them."""
    contents = {key: value for key, value in contents.items() if key != "sha256"}
    return {**contents, "sha256": hyper_maml.content_digest(contents)}


def test_resumed_run_equals_an_uninterrupted_one(small_runs, tmp_path):
    _, run_dir = small_runs("hyper")  # 2 meta-iterations, checkpoint at 2
    shutil.copytree(os.path.dirname(run_dir), tmp_path / "b" / "runs")
    (tmp_path / "a").mkdir()
    longer = [*SMALL_RUN, "--policy", "hyper", "--num-batches", "3"]
    run(longer, tmp_path / "a")
    checkpoint = os.path.join(only_run_dir(tmp_path / "b"), "checkpoint.pt")
    proc = run([*longer, "--resume", checkpoint], tmp_path / "b")
    assert "resumed" in proc.stdout and "iteration 3/3" in proc.stdout
    a = torch.load(os.path.join(only_run_dir(tmp_path / "a"), "hyper_maml.cleanrl_model"), weights_only=True)["policy"]
    b = torch.load(os.path.join(only_run_dir(tmp_path / "b"), "hyper_maml.cleanrl_model"), weights_only=True)["policy"]
    original = torch.load(os.path.join(run_dir, "hyper_maml.cleanrl_model"), weights_only=True)["policy"]
    assert not all(torch.equal(a[k], original[k]) for k in a)  # the third meta-update changed the policy
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    assert list(torch.load(os.path.join(only_run_dir(tmp_path / "b"), "variance.pt"), weights_only=True)["iterations"]) == [2]


def test_resume_refuses_different_settings(small_runs, tmp_path):
    _, run_dir = small_runs("hyper")
    proc = run([*SMALL_RUN, "--policy", "hyper", "--num-batches", "3", "--gamma", "0.9", "--max-kl", "0.02",
                "--hyper-embedding-norm", "4", "--resume", os.path.join(run_dir, "checkpoint.pt")],
               tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    # the inner step size is compared as used: here the default, 0.05 / norm^2, changes with the norm
    assert proc.stderr.startswith("error: the checkpoint was made with different settings: --gamma 0.95 (given 0.9), "
                                  "--max-kl 0.01 (given 0.02), --hyper-embedding-norm 8.0 (given 4.0), "
                                  "--fast-lr 0.00078125 (given 0.003125)")  # fmt: skip


def test_resume_refuses_a_checkpoint_without_a_newer_setting(small_runs, tmp_path):
    _, run_dir = small_runs("hyper")
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    del checkpoint["args"]["hyper_embedding_norm"]  # as written before the setting existed
    torch.save(signed(checkpoint), tmp_path / "checkpoint.pt")
    resume = ["--resume", str(tmp_path / "checkpoint.pt")]
    proc = run([*SMALL_RUN, "--policy", "hyper", "--num-batches", "3", *resume], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == ("error: the checkpoint was made with different settings: --hyper-embedding-norm None (given 8.0); "
                           "pass the same settings to resume\n")  # fmt: skip


def test_non_finite_policy_stops_the_run_naming_the_iteration_and_keeps_the_checkpoint(small_runs, tmp_path):
    _, run_dir = small_runs("vanilla")
    shutil.copytree(run_dir, tmp_path / "run")
    checkpoint_path = str(tmp_path / "run" / "checkpoint.pt")
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    checkpoint["learner"]["policy"]["log_std"][0] = 1e38  # std = inf: the next sampled action is not finite
    torch.save(signed(checkpoint), checkpoint_path)
    proc = run([*SMALL_RUN, "--policy", "vanilla", "--num-batches", "4", "--checkpoint-freq", "1", "--resume", checkpoint_path], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite action" in errors[0]
    assert errors[0].endswith(f"at meta-iteration 3; stopping, the last checkpoint ({checkpoint_path}) is intact")
    after = torch.load(checkpoint_path, weights_only=True)
    assert after["iteration"] == 2 and after["learner"]["policy"]["log_std"][0] == 1e38


def test_cli_bad_input_fails_cleanly(tmp_path):
    proc = run(["--meta-batch-size", "0"], tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr == "error: --meta-batch-size must be positive, got 0\n"
    proc = run(["--env-id", "HopperVel"], tmp_path, check=False)  # tyro refuses a value outside the Literal
    assert proc.returncode != 0 and "HalfCheetahVelMedium" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_help_lists_the_flags(tmp_path):
    proc = run(["--help"], tmp_path)
    for flag in ("--env-id", "--policy", "--fast-lr", "--meta-batch-size", "--variance-iters", "--resume", "--first-order"):
        assert flag in proc.stdout


# --- run infrastructure: safe files, unique run directories, Ctrl-C, the guard, one error line -------------------

TINY_RUN = ["--policy", "vanilla", "--meta-batch-size", "1", "--fast-batch-size", "1", "--num-train-tasks", "2",
            "--num-test-tasks", "1", "--variance-tasks", "1", "--eval-freq", "0", "--hidden-sizes", "8"]  # fmt: skip


class _Payload:
    """Unpickling it would create a marker file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_one_error_line(proc, message):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


@pytest.mark.parametrize("path", ["checkpoint.pt", "variance.pt"])
def test_a_malicious_checkpoint_or_variance_file_runs_nothing(path, small_runs, tmp_path):
    _, run_dir = small_runs("vanilla")
    shutil.copytree(run_dir, tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"format": "hyper_maml/2", "iterations": _Payload(str(marker))}, tmp_path / "run" / path)
    resume = ["--resume", str(tmp_path / "run" / "checkpoint.pt")]
    proc = run([*SMALL_RUN, "--policy", "vanilla", "--num-batches", "3", *resume], tmp_path, check=False)
    assert not marker.exists()
    assert_one_error_line(proc, f"cannot load {tmp_path / 'run' / path}")


def test_random_bytes_foreign_corrupted_and_wrong_kind_files_are_refused(small_runs, tmp_path):
    _, run_dir = small_runs("vanilla")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    torch.save({"policy": {}, "sampler_rng": {}}, tmp_path / "foreign.pt")  # an older version's or another script's
    contents = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    contents["learner"]["policy"]["fcs.0.weight"][0, 0] += 1.0  # one weight changed, the stored digest kept
    torch.save(contents, tmp_path / "corrupted.pt")
    expected = {"random.pt": "not a checkpoint, model or variance file", "foreign.pt": "written by this version",
                "corrupted.pt": "corrupted",
                os.path.join(run_dir, "hyper_maml.cleanrl_model"): "expected a checkpoint"}  # fmt: skip
    for path, message in expected.items():
        proc = run([*SMALL_RUN, "--policy", "vanilla", "--num-batches", "3", "--resume", path], tmp_path, check=False)
        assert_one_error_line(proc, message)


def test_runs_started_together_get_their_own_directories(tmp_path):
    command = [sys.executable, SCRIPT, "--num-threads", "1", *TINY_RUN, "--num-batches", "1"]
    procs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(2)]  # fmt: skip
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    run_dirs = sorted(os.listdir(tmp_path / "runs"))
    assert len(run_dirs) == 2 and all(os.path.exists(tmp_path / "runs" / d / "checkpoint.pt") for d in run_dirs)
    assert all("__hyper_maml__vanilla__0__" in d for d in run_dirs)  # the run name says which policy


def test_ctrl_c_writes_a_checkpoint_and_its_resume_command_finishes_the_run_exactly(tmp_path):
    common = [*TINY_RUN, "--num-batches", "3", "--checkpoint-freq", "0", "--save-model"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(common, tmp_path / "a")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--num-threads", "1", *common], cwd=tmp_path / "b",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("iteration 1/3"):
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=300)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in stderr and last.startswith("interrupted at meta-iteration ")
    python, script, *flags = shlex.split(last.split("resume with: ")[1])
    assert (python, script) == ("python", "hyper_maml.py") and flags[-2] == "--resume"
    assert torch.load(tmp_path / "b" / flags[-1], weights_only=True)["iteration"] in (1, 2)
    subprocess.run([sys.executable, SCRIPT, *flags], cwd=tmp_path / "b", check=True, capture_output=True, timeout=300)
    models = [os.path.join(only_run_dir(tmp_path / d), "hyper_maml.cleanrl_model") for d in ("a", "b")]
    a, b = (torch.load(model, weights_only=True)["policy"] for model in models)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_refuses_a_different_evaluation_setting(small_runs, tmp_path):
    _, run_dir = small_runs("hyper")
    resume = ["--resume", os.path.join(run_dir, "checkpoint.pt")]
    flags = [*SMALL_RUN, "--policy", "hyper", "--num-batches", "3", "--eval-tasks", "1", *resume]
    proc = run(flags, tmp_path, check=False)
    assert_one_error_line(proc, "--eval-tasks 2 (given 1)")


def test_the_guard_refuses_non_finite_losses_and_weights_from_the_trpo_step():
    policy = tiny_policy("vanilla", dtype=torch.float32)
    before = copy.deepcopy(policy.state_dict())
    new_params = {name: p.detach() + 1.0 for name, p in policy.named_parameters()}
    new_params["log_std"][0] = float("inf")
    with pytest.raises(hyper_maml.NonFinite, match=r"non-finite weights after the TRPO step \(log_std\)"):
        hyper_maml.guarded_step(policy, new_params, "TRPO", surrogate=0.5, kl=0.01)
    with pytest.raises(hyper_maml.NonFinite, match=r"non-finite surrogate \(nan\)"):
        hyper_maml.guarded_step(policy, new_params, "TRPO", surrogate=float("nan"), kl=0.01)
    assert all(torch.equal(before[key], value) for key, value in policy.state_dict().items())  # nothing taken


def test_a_huge_meta_batch_is_refused_before_building_any_env(tmp_path):
    proc = run(["--meta-batch-size", str(10**9)], tmp_path, check=False)
    assert_one_error_line(proc, "20,000,000,000 lockstep envs")
    assert not os.path.exists(tmp_path / "runs")


def test_runs_being_a_file_gives_one_error_line(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    proc = run([*TINY_RUN, "--num-batches", "1"], tmp_path, check=False)
    assert_one_error_line(proc, "cannot create the run directory")


def test_the_eta_counts_variance_experiments_at_their_own_rate():
    progress = hyper_maml.Progress(total=10, iteration=0, variance_iters=(1, 5))
    assert progress.eta_seconds(0) is None  # a variance experiment is due and none has been timed
    progress.record(steps=100, seconds=101.0, variance_seconds=100.0)  # iteration 1: 1 s, and 100 s of variance
    progress.record(steps=100, seconds=3.0)  # iteration 2
    assert progress.eta_seconds(2) == pytest.approx(8 * 2.0 + 1 * 100.0)


# --- the device: --cuda ------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def hyperparameter_texts(run_dir):
    """The hyperparameter tables the run (and each resumption of it) logged, oldest first."""
    events = tensorboard_events(run_dir).Tensors("hyperparameters/text_summary")
    return [event.tensor_proto.string_val[0].decode() for event in events]


@pytest.mark.parametrize("device", DEVICES)
def test_the_learner_and_its_data_live_on_the_selected_device(device):
    args = Args(policy="hyper", meta_batch_size=2, fast_batch_size=2, num_train_tasks=4, hyper_embedding_dim=16,
                hyper_blocks=1, hyper_dynamic_hidden=8)  # fmt: skip
    train, _ = make_task_pool(args.env_id, args.seed, args.num_train_tasks, 1)
    fast_lr = hyper_maml.effective_fast_lr(args)
    torch.manual_seed(0)
    policy = make_policy(args, 17, 6, task_contexts(args.env_id, train)).to(device)
    learner = hyper_maml.MAML(args, policy, fast_lr)
    envs = make_task_envs(args.env_id, 4)
    sampler = hyper_maml.MetaBatchSampler(envs, train, args)
    tasks, pre, pre_advantages, post, inner_steps = sampler.sample(learner.policy, fast_lr)
    stats = learner.update(tasks, pre, pre_advantages, post)
    for env in envs:
        env.close()
    on_device = [*policy.parameters(), *learner.state_dict()["policy"].values(), *pre_advantages]
    on_device += [tensor for episodes in pre + post for tensor in vars(episodes).values()]
    assert on_device and all(tensor.device.type == device for tensor in on_device)
    assert all(values.device.type == "cpu" and values.shape == (2,) for values in inner_steps.values())  # for logging
    assert np.isfinite(stats["surrogate_before"]) and np.isfinite(stats["kl"])


def test_cuda_uses_cuda_when_available_else_the_cpu_and_a_run_resumes_with_either_setting(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = run([*TINY_RUN, "--num-batches", "1", "--checkpoint-freq", "1", "--cuda"], tmp_path)
    assert f"device {device}" in proc.stdout.splitlines()[0]
    checkpoint = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")
    proc = run([*TINY_RUN, "--num-batches", "2", "--no-cuda", "--resume", checkpoint], tmp_path)  # --cuda may differ
    assert "resumed" in proc.stdout and "device cpu" in proc.stdout and "iteration 2/2" in proc.stdout
    first, resumed = hyperparameter_texts(only_run_dir(tmp_path))
    assert "|cuda|True|" in first and f"|device|{device}|" in first
    assert "|cuda|False|" in resumed and "|device|cpu|" in resumed

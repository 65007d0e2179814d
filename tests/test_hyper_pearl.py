import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from hyper_pearl import (FAMILIES, FAMILY_SPECS, KL_LAMBDA, LATENT_DIM, ContextEncoder, Task, context_dim,
                         kl_to_prior, make_context, make_task_env, make_task_pool, product_of_gaussians, sample_z)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DT = 0.05
# Ant's is mild so that it keeps its feet on the floor and the contact term is non-zero
ACTION = {"HalfCheetah": np.array([0.3, -0.7, 0.5, 0.9, -0.2, 0.1]), "Ant": np.linspace(0.2, -0.3, 8)}
ROBOT = {family: FAMILY_SPECS[family].robot for family in FAMILIES}
VELOCITY_FAMILIES = [family for family in FAMILIES if FAMILY_SPECS[family].goal == "velocity"]
DIRECTION_FAMILIES = [family for family in FAMILIES if FAMILY_SPECS[family].goal == "direction"]


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
    """Step from a fixed MuJoCo state; returns the reward, the hand-computed x velocity and contact sum, and done."""
    env.reset(seed=0)
    env.unwrapped.set_state(*state)
    data = env.unwrapped.data
    torso_x = lambda: data.body("torso").xpos[0] if env.family_spec.robot == "Ant" else data.qpos[0]  # noqa: E731
    x_before = float(torso_x())
    _, reward, terminated, _, _ = env.step(action)
    velocity = (float(torso_x()) - x_before) / DT
    contact = np.sum(np.clip(data.cfrc_ext, -1.0, 1.0) ** 2)
    return reward, velocity, contact, terminated


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


# --- task families ----------------------------------------------------------------------------


@pytest.mark.parametrize("family,goal", [("HalfCheetahFwdBack", 1.0), ("HalfCheetahFwdBack", -1.0), ("AntFwdBack", 1.0),
                                         ("AntFwdBack", -1.0), ("HalfCheetahVel", 0.4), ("HalfCheetahVelMedium", 2.7),
                                         ("AntVel", 2.8)])  # fmt: skip
def test_reward_equals_the_familys_formula(family, goal):
    env = make_task_env(family, Task(goal))
    # HalfCheetah's is partly outside [-1, 1], so the control cost is that of the clipped action (Ant's stays mild)
    action = ACTION[ROBOT[family]] * (1.5 if ROBOT[family] == "HalfCheetah" else 1.0)
    state = ant_state(env) if ROBOT[family] == "Ant" else cheetah_state(env)
    reward, velocity, contact, terminated = step_from(env, state, action)
    assert abs(velocity) > 0.5  # the state really moves, so the velocity term is tested
    if ROBOT[family] == "Ant":
        assert 0.5e-3 * contact > 1e-6  # feet on the floor, so the contact term is tested
    assert not terminated
    assert reward == pytest.approx(expected_reward(family, goal, velocity, action, contact), abs=1e-9, rel=0)


def test_ant_fwd_back_rewards_x_not_a_one_radian_heading():
    env = make_task_env("AntFwdBack", Task(1.0))
    qpos, qvel = ant_state(env)
    qvel[:2] = (0.0, 2.0)  # moving sideways along y: the authors' +-1 rad task would pay 0.84 * v_y for it
    reward, velocity, contact, _ = step_from(env, (qpos, qvel), np.zeros(8))
    assert abs(velocity) < 0.2
    assert reward == pytest.approx(velocity - 0.5e-3 * contact + 0.05, abs=1e-9, rel=0)


def test_episodes_are_truncated_after_200_steps():
    env = make_task_env("HalfCheetahVel", Task(1.0))
    env.reset(seed=0)
    flags = [env.step(np.zeros(6))[2:4] for _ in range(200)]
    assert flags[:-1] == [(False, False)] * 199 and flags[-1] == (False, True)


@pytest.mark.parametrize("family", DIRECTION_FAMILIES)
def test_direction_pools_are_the_two_directions_for_train_and_test(family):
    for seed in (0, 1):
        train, test = make_task_pool(family, seed=seed)
        assert [task.goal for task in train] == [-1.0, 1.0]
        assert [task.goal for task in test] == [-1.0, 1.0]


@pytest.mark.parametrize("family,train_range,test_range", [("HalfCheetahVel", (0.0, 3.0), (0.0, 3.0)),
                                                           ("AntVel", (0.0, 3.0), (0.0, 3.0)),
                                                           ("HalfCheetahVelMedium", (0.0, 2.5), (2.5, 3.0))])  # fmt: skip
def test_velocity_pools_have_pearls_sizes_and_ranges(family, train_range, test_range):
    train, test = make_task_pool(family, seed=3)
    assert (len(train), len(test)) == (100, 30)
    for pool, (low, high) in ((train, train_range), (test, test_range)):
        goals = np.array([task.goal for task in pool])
        assert np.all((goals >= low) & (goals < high))
        assert goals.max() - goals.min() > 0.6 * (high - low)  # spread over the range, not a constant
        assert all(isinstance(task.goal, float) for task in pool)


@pytest.mark.parametrize("family", VELOCITY_FAMILIES)
def test_velocity_pools_are_deterministic_per_seed(family):
    train, test = make_task_pool(family, seed=3)
    assert make_task_pool(family, seed=3) == (train, test)
    assert make_task_pool(family, seed=4) != (train, test)
    assert make_task_pool(family, seed=3, n_train=7) == (train[:7], test)  # test tasks do not depend on n_train
    assert not set(task.goal for task in train) & set(task.goal for task in test)


# --- context encoder --------------------------------------------------------------------------


def test_pearls_defaults():
    assert (LATENT_DIM, KL_LAMBDA) == (5, 0.1)
    encoder = ContextEncoder(17, 6)
    assert [layer.out_features for layer in encoder.hidden] == [200, 200, 200]
    assert encoder.hidden[0].in_features == context_dim(17, 6) == 24
    assert encoder.head.out_features == 2 * 5


def test_product_of_gaussians_equals_the_closed_form():
    torch.manual_seed(0)
    mus, variances = torch.randn(3, 7, 5, dtype=torch.float64), torch.rand(3, 7, 5, dtype=torch.float64) + 0.1
    mu, variance = product_of_gaussians(mus, variances)
    assert mu.shape == variance.shape == (3, 5)
    for t in range(3):
        for d in range(5):
            precision = sum(1.0 / variances[t, n, d].item() for n in range(7))
            expected_mu = sum(mus[t, n, d].item() / variances[t, n, d].item() for n in range(7)) / precision
            assert variance[t, d].item() == pytest.approx(1.0 / precision, rel=1e-12)
            assert mu[t, d].item() == pytest.approx(expected_mu, rel=1e-12)
    # the product is invariant to the order of the transitions
    order = torch.randperm(7)
    permuted = product_of_gaussians(mus[:, order], variances[:, order])
    torch.testing.assert_close(permuted, (mu, variance))


def test_product_of_one_factor_is_the_identity_and_of_n_equal_factors_divides_the_variance():
    torch.manual_seed(1)
    mus, variances = torch.randn(4, 1, 5), torch.rand(4, 1, 5) + 0.1
    mu, variance = product_of_gaussians(mus, variances)
    torch.testing.assert_close(mu, mus[:, 0])
    torch.testing.assert_close(variance, variances[:, 0])
    mu, variance = product_of_gaussians(mus.expand(4, 8, 5), variances.expand(4, 8, 5))
    torch.testing.assert_close(mu, mus[:, 0])
    torch.testing.assert_close(variance, variances[:, 0] / 8)


def test_kl_to_prior_equals_torch_kl_summed_over_latent_dims():
    torch.manual_seed(2)
    posterior = Normal(torch.randn(6, 5, dtype=torch.float64), torch.rand(6, 5, dtype=torch.float64) + 0.05)
    prior = Normal(torch.zeros(6, 5, dtype=torch.float64), torch.ones(6, 5, dtype=torch.float64))
    kl = kl_to_prior(posterior)
    assert kl.shape == (6,)
    torch.testing.assert_close(kl, kl_divergence(posterior, prior).sum(-1))
    torch.testing.assert_close(kl_to_prior(prior), torch.zeros(6, dtype=torch.float64))


def test_encoder_shapes_positive_variance_and_gradients():
    torch.manual_seed(3)
    encoder = ContextEncoder(obs_dim=27, act_dim=8)
    obs, actions, rewards = torch.randn(4, 10, 27), torch.randn(4, 10, 8), torch.randn(4, 10)
    context = make_context(obs, actions, rewards)
    assert context.shape == (4, 10, 36)
    torch.testing.assert_close(context[..., -1], rewards)
    mus, variances = encoder(context)
    assert mus.shape == variances.shape == (4, 10, 5)
    assert torch.all(variances > 0)
    # huge negative pre-activations: the softplus underflows, the clamp keeps the variance positive
    with torch.no_grad():
        encoder.head.bias[5:] = -1e4
    assert torch.all(encoder(context)[1] >= 1e-7)
    with torch.no_grad():
        encoder.head.bias[5:] = 0.0
    posterior = encoder.posterior(context)
    assert isinstance(posterior, Normal)
    assert posterior.loc.shape == posterior.scale.shape == (4, 5) and torch.all(posterior.scale > 0)
    z = sample_z(posterior)
    assert z.shape == (4, 5)
    loss = z.pow(2).sum() + KL_LAMBDA * kl_to_prior(posterior).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    assert encoder.head.weight.grad.abs().sum() > 0  # rsample: gradients reach the encoder
    prior = encoder.prior(4)
    assert prior.loc.shape == (4, 5) and torch.all(prior.scale == 1)
    with pytest.raises(ValueError, match="context"):
        encoder.posterior(context[0])


def test_posterior_is_per_task_and_independent_of_other_tasks():
    torch.manual_seed(4)
    encoder = ContextEncoder(obs_dim=17, act_dim=6)
    context = torch.randn(3, 5, 24)
    posterior = encoder.posterior(context)
    single = encoder.posterior(context[1:2])
    torch.testing.assert_close(posterior.loc[1:2], single.loc)
    torch.testing.assert_close(posterior.scale[1:2], single.scale)


def test_main_says_training_is_not_here_yet():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "hyper_pearl.py")], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert "hyper_pearl.py: training is not in this file yet (task families, context encoder and networks only)" in result.stderr


# Networks: PEARL's MLPs and Hyper-PEARL's hypernetworks

from hyper_pearl import (HyperPolicy, HyperQ, HyperV, MLPPolicy, MLPQ, MLPV, init_hypernetwork,  # noqa: E402
                         tanh_gaussian_log_prob)

OBS, ACT, LAT = 17, 6, LATENT_DIM
SMALL = dict(embedding_dim=64, blocks=1, dynamic_hidden=32)


def small_hyper_nets(seed=0):
    torch.manual_seed(seed)
    policy, q, v = HyperPolicy(OBS, ACT, LAT, **SMALL), HyperQ(OBS, ACT, LAT, **SMALL), HyperV(OBS, LAT, **SMALL)
    init_hypernetwork(policy, torch.randn(512, LAT))
    init_hypernetwork(q, 4.0 * torch.randn(512, OBS))
    init_hypernetwork(v, 4.0 * torch.randn(512, OBS))
    return policy, q, v


def test_network_output_shapes():
    torch.manual_seed(0)
    b = 7
    obs, act, z = torch.randn(b, OBS), torch.rand(b, ACT) * 2 - 1, torch.randn(b, LAT)
    policy, q, v = small_hyper_nets()
    for mlp_policy, mlp_q, mlp_v in [(MLPPolicy(OBS, ACT, LAT, hidden=32), MLPQ(OBS, ACT, LAT, hidden=32),
                                      MLPV(OBS, LAT, hidden=32)), (policy, q, v)]:
        action, log_prob, mean = mlp_policy(obs, z)
        assert action.shape == mean.shape == (b, ACT) and log_prob.shape == (b, 1)
        assert action.abs().max() <= 1.0 and torch.isfinite(log_prob).all()
        assert mlp_q(obs, act, z).shape == (b, 1) and mlp_v(obs, z).shape == (b, 1)
    tasks, n = 3, 5
    action, log_prob, mean = policy.forward_with_weights(policy.task_weights(torch.randn(tasks, LAT)),
                                                         torch.randn(tasks, n, OBS))
    assert action.shape == mean.shape == (tasks, n, ACT) and log_prob.shape == (tasks, n, 1)


def test_tanh_gaussian_log_prob_equals_direct_computation_and_is_finite_when_saturated():
    torch.manual_seed(0)
    mean, log_std = torch.randn(64, ACT), torch.rand(64, ACT) - 0.5
    u = mean + log_std.exp() * torch.randn(64, ACT)
    u64, mean64, log_std64 = u.double(), mean.double(), log_std.double()
    direct = (Normal(mean64, log_std64.exp()).log_prob(u64) - torch.log(1 - torch.tanh(u64) ** 2)).sum(-1, keepdim=True)
    torch.testing.assert_close(tanh_gaussian_log_prob(u, mean, log_std).double(), direct, rtol=1e-5, atol=1e-4)
    saturated = torch.full((4, ACT), 30.0) * torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1)
    assert torch.isfinite(tanh_gaussian_log_prob(saturated, saturated, torch.zeros(4, ACT))).all()


def test_hyper_policy_runs_the_primary_once_per_task_batch_and_matches_per_sample_forward():
    policy, _, _ = small_hyper_nets()
    tasks, n = 4, 9
    z, obs = torch.randn(tasks, LAT), torch.randn(tasks, n, OBS)
    calls = []
    handle = policy.primary.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    weights = policy.task_weights(z)
    mean, log_std = policy.dist_params_with_weights(weights, obs)
    handle.remove()
    assert calls == [(tasks, LAT)]
    per_mean, per_log_std = policy.dist_params(obs.reshape(-1, OBS), z.repeat_interleave(n, dim=0))
    torch.testing.assert_close(mean.reshape(-1, ACT), per_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_std.reshape(-1, ACT), per_log_std, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    batched = policy.forward_with_weights(weights, obs)
    torch.manual_seed(1)
    per_sample = policy(obs.reshape(-1, OBS), z.repeat_interleave(n, dim=0))
    for x, y in zip(batched, per_sample):
        torch.testing.assert_close(x.reshape(y.shape), y, rtol=1e-5, atol=1e-5)


def test_hyper_q_action_gradient_depends_on_the_state():
    _, q, _ = small_hyper_nets()
    torch.manual_seed(2)
    states, z = 4.0 * torch.randn(2, OBS), torch.randn(1, LAT).expand(2, LAT)
    act = torch.rand(1, ACT).expand(2, ACT).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(q(states, act, z).sum(), act)
    assert not torch.allclose(grad[0], grad[1], atol=1e-6)


@pytest.mark.parametrize("which", ["policy", "q", "v"])
def test_kaiming_init_gives_kaiming_first_layer_weights_and_zero_bias_gain_heads(which):
    policy, q, v = small_hyper_nets()
    net = {"policy": policy, "q": q, "v": v}[which]
    torch.manual_seed(3)
    meta = torch.randn(256, LAT) if which == "policy" else 4.0 * torch.randn(256, OBS)
    with torch.no_grad():
        e = net.primary(meta)
        weight, bias, gain = net.heads[0](e)
    rms = weight.pow(2).mean().sqrt().item()
    expected = np.sqrt(2.0 / net.heads[0].fan_in)
    assert abs(rms / expected - 1) < 0.2, (rms, expected)
    assert torch.count_nonzero(bias) == 0 and torch.count_nonzero(gain) == 0
    for head in net.heads:
        for fc in (head.bias, head.gain):
            assert torch.count_nonzero(fc.weight) == 0 and torch.count_nonzero(fc.bias) == 0


def test_mlp_init_last_layers_are_small_uniform():
    torch.manual_seed(0)
    policy, q, v = MLPPolicy(OBS, ACT, LAT), MLPQ(OBS, ACT, LAT), MLPV(OBS, LAT)
    assert len([m for m in q.body if isinstance(m, torch.nn.Linear)]) == 3 and q.body[0].out_features == 300
    for fc in (policy.mean, policy.log_std, q.last, v.last):
        assert fc.weight.abs().max() <= 3e-3 and fc.bias.abs().max() <= 3e-3
    for fc in (m for m in q.body if isinstance(m, torch.nn.Linear)):
        assert fc.weight.abs().max() <= 1 / np.sqrt(fc.in_features) and torch.all(fc.bias == 0.1)


def test_full_size_hyper_networks_build_with_the_papers_shape():
    policy = HyperPolicy(OBS, ACT)
    assert policy.primary.embedding_dim == 1024 and policy.heads[0].fan_out == 256
    widths = [m.out_features for m in policy.primary.net if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 512, 1024]
    assert sum(isinstance(m, torch.nn.Module) and type(m).__name__ == "ResBlock" for m in policy.primary.net) == 6


def test_hyper_parameter_counts_match_the_authors():
    """Notes §3.2: Hyper_Policy 15.1 M (their cheetah obs is 20-D) and 18.0 M (ant, 27-D); Hyper_QNetwork 9.9 M."""
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert round(count(HyperPolicy(20, 6)), 1) == 15.1 and round(count(HyperPolicy(27, 8)), 1) == 18.0
    assert round(count(HyperQ(20, 6)), 1) == 9.9

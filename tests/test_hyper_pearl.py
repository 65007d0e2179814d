import os
import shutil

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from hyper_pearl import (FAMILIES, FAMILY_SPECS, KL_LAMBDA, LATENT_DIM, ContextEncoder, Task, context_dim,
                         kl_to_prior, make_context, make_task_env, make_task_pool, product_of_gaussians, sample_z)
from functools import partial

from tests.cli import (
    ROOT, assert_same_up_to_rounding, cached_runs, count_host_reads, for_loop_adam_twin, only_run_dir, run_script,
    tensorboard_events
)

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


# Networks: PEARL's MLPs and Hyper-PEARL's hypernetworks

from hyper_pearl import (FAMILY_SCHEDULES, HYPER_EMBEDDING_NORM, MAX_EMBEDDING_NORM_RATIO, HyperPolicy,  # noqa: E402
                         HyperQ, HyperV, MLPPolicy, MLPQ, MLPV, balance_input_scale, collect_init_context,
                         fanin_uniform_, init_hypernetwork, policy_init_latents, rms_norm, tanh_gaussian_log_prob)

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


def test_hyper_q_and_v_run_the_primary_network_once_per_forward():
    _, q, v = small_hyper_nets()
    calls = []
    for net in (q, v):
        net.primary.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    q(torch.randn(9, OBS), torch.randn(9, ACT), torch.randn(9, LAT))
    v(torch.randn(9, OBS), torch.randn(9, LAT))
    assert calls == [9, 9]  # one pass over the 9 states each, shared by the hidden and output layers' heads


def test_hyper_q_action_gradient_depends_on_the_state():
    _, q, _ = small_hyper_nets()
    torch.manual_seed(2)
    states, z = 4.0 * torch.randn(2, OBS), torch.randn(1, LAT).expand(2, LAT)
    act = torch.rand(1, ACT).expand(2, ACT).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(q(states, act, z).sum(), act)
    assert not torch.allclose(grad[0], grad[1], atol=1e-6)


# --hyper-init pytorch: PyTorch's default nn.Linear init on the meta variables the networks first see

_CONTEXTS = {}


def cheetah_context(n, seed):
    """n random-action transitions (s, a, r) of HalfCheetahFwdBack's forward task, (n, 24), as make_agent gets them."""
    if (n, seed) not in _CONTEXTS:
        _CONTEXTS[n, seed] = collect_init_context("HalfCheetahFwdBack", Task(1.0), n, seed)
    return _CONTEXTS[n, seed]


def rms(x):
    return x.pow(2).mean().sqrt().item()


CONTEXT_SIZE = FAMILY_SCHEDULES["HalfCheetahFwdBack"]["embedding_batch_size"]


_CALIBRATED = {}  # (which, norm) -> calibrated()'s result


def calibrated(which, norm=HYPER_EMBEDDING_NORM):
    """A SMALL hyper policy, Q or V calibrated on 1000 cheetah transitions: (net, its calibration meta variables, meta
    variables drawn the same way from 1000 other transitions). The policy's are `policy_init_latents`, the critics'
    the states. Made once per (which, norm); callers must not modify the net."""
    if (which, norm) not in _CALIBRATED:
        _CALIBRATED[which, norm] = _calibrate(which, norm)
    return _CALIBRATED[which, norm]


def _calibrate(which, norm):
    torch.manual_seed(0)
    contexts = cheetah_context(1000, 0), cheetah_context(1000, 1)
    if which == "policy":
        encoder = ContextEncoder(OBS, ACT)
        net = HyperPolicy(OBS, ACT, LAT, **SMALL)
        groups = [policy_init_latents(encoder, c, CONTEXT_SIZE) for c in contexts]
        init_hypernetwork(net, torch.cat(groups[0]), "pytorch", norm, balance=groups[0])
        return net, torch.cat(groups[0]), torch.cat(groups[1])
    net = HyperQ(OBS, ACT, LAT, **SMALL) if which == "q" else HyperV(OBS, LAT, **SMALL)
    calibration, held_out = (c[:, :OBS] for c in contexts)
    init_hypernetwork(net, calibration, "pytorch", norm)
    return net, calibration, held_out


@pytest.mark.parametrize("which", ["policy", "q", "v"])
def test_pytorch_init_generates_pytorchs_linear_init_and_pearls_output_layers(which):
    net, _, meta = calibrated(which)
    with torch.no_grad():
        generated = [head(net.primary(meta)) for head in net.heads]
    (w1, b1, _), outputs = generated[0], generated[1:]
    # the hidden layer: nn.Linear's default U(+-1/sqrt(fan_in)) for weights and biases, rms 1/sqrt(3 fan_in)
    for t in (w1, b1):
        assert rms(t) == pytest.approx(1 / np.sqrt(3 * net.heads[0].fan_in), rel=0.15)
    assert b1.std(0).mean().item() > 0.1 * rms(b1)  # the biases depend on the meta variable
    # the output layers: PEARL's U(+-3e-3) for Q and V, U(+-1e-3) for the policy's mean and log-std heads
    for weight, bias, _ in outputs:
        assert rms(weight) == pytest.approx(net.output_init / np.sqrt(3), rel=0.15)
        assert 0.3 < rms(bias) / (net.output_init / np.sqrt(3)) < 3  # one value per output and meta variable: loose
    for _, _, gain in generated:  # every gain 1 + g starts at exactly 1
        assert gain.abs().max().item() == 0.0
    assert (HyperPolicy.output_init, HyperQ.output_init, HyperV.output_init) == (1e-3, 3e-3, 3e-3)


@pytest.mark.parametrize("which", ["policy", "q"])
def test_embedding_has_the_set_norm_on_the_calibration_samples_and_close_to_it_on_others(which):
    for norm in (8.0, 2.0):
        net, calibration, held_out = calibrated(which, norm)
        with torch.no_grad():
            assert rms_norm(net.primary(calibration)) == pytest.approx(norm, rel=1e-4)  # the rescale is exact
            assert rms_norm(net.primary(held_out)) == pytest.approx(norm, rel=0.15)


def test_policy_init_latents_are_prior_and_init_posterior_z():
    torch.manual_seed(0)
    prior, posterior = policy_init_latents(ContextEncoder(OBS, ACT), cheetah_context(1000, 0), CONTEXT_SIZE)
    assert prior.shape == posterior.shape == (500, LAT)
    assert prior.std().item() == pytest.approx(1.0, rel=0.1)  # N(0, I)
    assert posterior.norm(dim=-1).mean().item() < 0.1 * prior.norm(dim=-1).mean().item()  # an init posterior: near 0


def test_policy_generates_networks_of_the_same_scale_at_prior_and_posterior_z():
    # With PyTorch's default input projection a prior z outweighs the bias and the embedding is larger at prior z
    # than at posterior z; `balance_input_scale` brings the two within MAX_EMBEDDING_NORM_RATIO.
    net, calibration, held_out = calibrated("policy")
    target = 1 / np.sqrt(3 * net.heads[0].fan_in)
    with torch.no_grad():
        for latents, tolerance in ((calibration, 1.0), (held_out, 1.05)):
            prior, posterior = latents[:500], latents[500:]
            ratio = rms_norm(net.primary(prior)) / rms_norm(net.primary(posterior))
            assert ratio <= MAX_EMBEDDING_NORM_RATIO * tolerance
            for z in (prior, posterior):
                weight, bias, _ = net.heads[0](net.primary(z))
                assert 0.7 < rms(weight) / target < 1.4 and 0.7 < rms(bias) / target < 1.4
        # z still selects the network: two prior z give embeddings that differ by a sizeable fraction of their norm
        e = net.primary(held_out[:500])
        assert (e[:250] - e[250:]).norm(dim=-1).mean() > 0.2 * e.norm(dim=-1).mean()


def test_balance_input_scale_finds_the_largest_scale_that_meets_the_ratio():
    torch.manual_seed(0)
    primary = HyperPolicy(OBS, ACT, LAT, **SMALL).primary
    groups = (3.0 * torch.randn(200, LAT), 0.01 * torch.randn(200, LAT))
    weight = primary.net[0].weight.detach().clone()

    def ratio():
        norms = [rms_norm(primary(group)) for group in groups]
        return max(norms) / min(norms)

    with torch.no_grad():
        assert ratio() > 1.5  # unbalanced at PyTorch's default
        g = balance_input_scale(primary, groups, max_ratio=1.2, steps=10)
        assert 0 < g < 1 and torch.allclose(primary.net[0].weight, g * weight)
        assert ratio() <= 1.2
        primary.net[0].weight.copy_((g + 2**-10) * weight)  # one search step more breaks the ratio
        assert ratio() > 1.2
        primary.net[0].weight.copy_(weight)
        assert balance_input_scale(primary, groups, max_ratio=100.0) == 1.0  # already within the ratio: unchanged
        assert torch.equal(primary.net[0].weight, weight)


def test_q_and_v_are_not_positively_homogeneous_in_their_base_variable():
    # With zero generated biases Q(s, k a, k z) = k Q(s, a, z) for k > 0 and Q(s, 0, 0) = 0 (V likewise in z)
    q, states, _ = calibrated("q")
    v, _, _ = calibrated("v")
    torch.manual_seed(1)
    s, a, z = states[:200], torch.rand(200, ACT) * 2 - 1, 0.5 * torch.randn(200, LAT)
    with torch.no_grad():
        for f in (lambda k: q(s, k * a, k * z), lambda k: v(s, k * z)):
            at_zero, change = f(0.0), f(1.0) - f(0.0)
            assert at_zero.abs().mean().item() > 0.1 * change.abs().mean().item()
            gap = f(0.5) - at_zero - 0.5 * change
            assert gap.abs().mean().item() > 0.05 * change.abs().mean().item()


def q_spread_over_actions(q, states, z, n_actions=64):
    """The std of Q(s, ., z) over uniformly random actions, averaged over the states."""
    actions = torch.rand(n_actions, ACT, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        values = torch.stack([q(states, a.expand(len(states), ACT), z).squeeze(-1) for a in actions], 1)
    return values.std(1).mean().item()


def test_hyper_q_starts_about_as_flat_over_actions_as_pearls_mlp():
    q, states, _ = calibrated("q")
    torch.manual_seed(0)
    mlp = MLPQ(OBS, ACT, LAT)
    s, z = states[:64], 0.1 * torch.randn(64, LAT)
    hyper_spread, mlp_spread = q_spread_over_actions(q, s, z), q_spread_over_actions(mlp, s, z)
    # a Kaiming-like output layer instead of PEARL's U(+-3e-3) made it ~1000 times the MLP's
    assert hyper_spread < 30 * mlp_spread, (hyper_spread, mlp_spread)


def test_authors_init_uses_the_released_constants():
    torch.manual_seed(0)
    policy = HyperPolicy(OBS, ACT, LAT, **SMALL)
    init_hypernetwork(policy, None, scheme="authors")
    for head, bound in zip(policy.heads, (0.05, 0.008, 0.001)):
        for fc in (head.weight, head.bias, head.gain):
            assert 0.9 * bound < fc.weight.abs().max() <= bound and torch.count_nonzero(fc.bias) == 0
    first = policy.primary.net[0]
    assert first.weight.abs().max() <= 1 / (2 * np.sqrt(LAT)) and torch.count_nonzero(first.bias) > 0


def rlkit_fanin_bound(weight):
    """The bound of rlkit's fanin_init (oyster rlkit/torch/pytorch_util.py) by its definition: fan_in = size[0] for a
    2-D tensor, prod(size[1:]) beyond, bound 1 / sqrt(fan_in)."""
    size = weight.size()
    fan_in = size[0] if len(size) == 2 else np.prod(size[1:])
    return 1.0 / np.sqrt(fan_in)


def test_fanin_uniform_follows_rlkits_definition():
    torch.manual_seed(0)
    for in_dim, out_dim in ((7, 300), (300, 7), (24, 200)):
        layer = torch.nn.Linear(in_dim, out_dim)
        fanin_uniform_(layer.weight)
        bound = rlkit_fanin_bound(layer.weight)
        assert bound == pytest.approx(1 / np.sqrt(out_dim))  # size(0) of an (out, in) weight: the output width
        assert 0.95 * bound < layer.weight.abs().max().item() <= bound
        assert rms(layer.weight) == pytest.approx(bound / np.sqrt(3), rel=0.1)
    # every hidden layer of PEARL's encoder, Q, V and policy, the first ones (input width != output width) included
    encoder, q, v, policy = ContextEncoder(OBS, ACT), MLPQ(OBS, ACT, LAT), MLPV(OBS, LAT), MLPPolicy(OBS, ACT, LAT)
    layers = [*encoder.hidden, *(m for net in (q, v, policy) for m in net.body if isinstance(m, torch.nn.Linear))]
    assert len(layers) == 12 and any(fc.in_features != fc.out_features for fc in layers)
    for fc in layers:
        bound = rlkit_fanin_bound(fc.weight)
        assert 0.9 * bound < fc.weight.abs().max().item() <= bound and torch.all(fc.bias == 0.1)


def test_mlp_init_last_layers_are_small_uniform():
    torch.manual_seed(0)
    policy, q, v = MLPPolicy(OBS, ACT, LAT), MLPQ(OBS, ACT, LAT), MLPV(OBS, LAT)
    assert len([m for m in q.body if isinstance(m, torch.nn.Linear)]) == 3 and q.body[0].out_features == 300
    for fc, bound in ((policy.mean, 1e-3), (policy.log_std, 1e-3), (q.last, 3e-3), (v.last, 3e-3)):
        assert 0.5 * bound < fc.weight.abs().max() <= bound and fc.bias.abs().max() <= bound


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


# SAC with a task latent

import gymnasium as gym  # noqa: E402

from hyper_pearl import (Args, Batch, MultiTaskBuffer, PEARLAgent, TaskBuffer,  # noqa: E402
                         adaptation_returns, collect, critic_loss, evaluate, learning_rates, make_agent,
                         policy_saturation, q_target, rollout, saturation_diagnostics, train_step,
                         value_and_policy_losses)


def small_agent(model="mlp", seed=0, obs=OBS, act=ACT):
    torch.manual_seed(seed)
    encoder = ContextEncoder(obs, act, LAT, hidden=16)
    if model == "mlp":
        nets = [MLPPolicy(obs, act, LAT, 32), MLPQ(obs, act, LAT, 32), MLPQ(obs, act, LAT, 32), MLPV(obs, LAT, 32), MLPV(obs, LAT, 32)]
    else:
        nets = [HyperPolicy(obs, act, LAT, **SMALL), HyperQ(obs, act, LAT, **SMALL), HyperQ(obs, act, LAT, **SMALL),
                HyperV(obs, LAT, **SMALL), HyperV(obs, LAT, **SMALL)]  # fmt: skip
        init_hypernetwork(nets[0], torch.randn(256, LAT))
        for net in nets[1:4]:
            init_hypernetwork(net, torch.randn(256, obs))
    agent = PEARLAgent(encoder, *nets)
    with torch.no_grad():  # a target V that differs from V, so that a test can tell them apart
        for p in agent.target_vf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return agent


def random_batch(tasks=3, n=8, seed=1, obs=OBS, act=ACT):
    g = torch.Generator().manual_seed(seed)
    terminals = (torch.rand(tasks, n, 1, generator=g) < 0.3).float()
    return Batch(torch.randn(tasks, n, obs, generator=g), torch.rand(tasks, n, act, generator=g) * 2 - 1,
                 torch.randn(tasks, n, 1, generator=g), torch.randn(tasks, n, obs, generator=g), terminals)  # fmt: skip


def random_context(tasks=3, n=5, seed=2):
    return torch.randn(tasks, n, context_dim(OBS, ACT), generator=torch.Generator().manual_seed(seed))


def optimizers_for(agent, lr=1e-3):
    modules = {"policy": agent.policy, "qf1": agent.qf1, "qf2": agent.qf2, "vf": agent.vf, "context": agent.encoder}
    return {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in modules.items()}


def test_q_target_by_hand():
    rewards, terminals, next_v = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([10.0, 10.0, -4.0])
    expected = torch.tensor([5 * 1.0 + 0.99 * 10.0, 5 * -2.0, 5 * 0.5 + 0.99 * -4.0])
    torch.testing.assert_close(q_target(rewards, terminals, next_v, 5.0, 0.99), expected)


@pytest.mark.parametrize("model", ["mlp", "hyper"])
def test_critic_loss_uses_the_target_v_at_the_next_state_and_the_kl_summed_over_tasks(model):
    agent, batch, context = small_agent(model), random_batch(), random_context()
    torch.manual_seed(3)
    loss, z, stats = critic_loss(agent, batch, context, 5.0, 0.99, 0.1)
    z_rows = z.detach().unsqueeze(1).expand(3, 8, LAT)
    with torch.no_grad():
        next_v = agent.target_vf(batch.next_obs, z_rows)
        target = 5.0 * batch.rewards + 0.99 * (1 - batch.terminals) * next_v
        q1, q2 = agent.qf1(batch.obs, batch.actions, z_rows), agent.qf2(batch.obs, batch.actions, z_rows)
        posterior = agent.encoder.posterior(context)
        kl = sum(kl_divergence(Normal(posterior.loc[t], posterior.scale[t]), Normal(0.0, 1.0)).sum() for t in range(3))
        expected = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean() + 0.1 * kl
    torch.testing.assert_close(stats["q_target"], target)
    torch.testing.assert_close(loss.detach(), expected)
    assert not torch.allclose(next_v, agent.vf(batch.next_obs, z_rows))  # the target V, not V


@pytest.mark.parametrize("model", ["mlp", "hyper"])
def test_encoder_gets_gradients_from_the_q_loss_and_kl_only(model):
    agent, batch, context = small_agent(model), random_batch(), random_context()
    loss, z, _ = critic_loss(agent, batch, context, 5.0, 0.99, 0.1)
    vf_loss, policy_loss, _ = value_and_policy_losses(agent, batch, z)
    (vf_loss + policy_loss).backward(retain_graph=True)
    assert all(p.grad is None for p in agent.encoder.parameters())  # V and the policy see z.detach()
    assert all(p.grad is None for m in (agent.qf1, agent.qf2) for p in m.parameters())  # Q frozen in those losses
    assert all(p.grad is not None for m in (agent.vf, agent.policy) for p in m.parameters())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.encoder.parameters())


@pytest.mark.parametrize("model", ["mlp", "hyper"])
def test_v_target_and_policy_loss_by_hand(model):
    agent, batch = small_agent(model), random_batch()
    z = torch.randn(3, LAT)
    torch.manual_seed(5)
    vf_loss, policy_loss, _ = value_and_policy_losses(agent, batch, z)
    torch.manual_seed(5)
    z_rows = z.unsqueeze(1).expand(3, 8, LAT)
    with torch.no_grad():
        if model == "mlp":
            mean, log_std = agent.policy.dist_params(batch.obs, z_rows)
        else:
            mean, log_std = agent.policy.dist_params(batch.obs.reshape(24, -1), z_rows.reshape(24, -1))
            mean, log_std = mean.view(3, 8, -1), log_std.view(3, 8, -1)
        u = mean + log_std.exp() * torch.randn(mean.shape)
        action = torch.tanh(u)
        log_pi = (Normal(mean.double(), log_std.exp().double()).log_prob(u.double())
                  - torch.log(1 - torch.tanh(u.double()) ** 2)).sum(-1, keepdim=True).float()  # fmt: skip
        min_q = torch.min(agent.qf1(batch.obs, action, z_rows), agent.qf2(batch.obs, action, z_rows))
        v_target = min_q - log_pi
        expected_vf = ((agent.vf(batch.obs, z_rows) - v_target) ** 2).mean()
        expected_policy = (log_pi - min_q).mean() + 1e-3 * (mean**2).mean() + 1e-3 * (log_std**2).mean()
    torch.testing.assert_close(vf_loss.detach(), expected_vf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(policy_loss.detach(), expected_policy, rtol=1e-4, atol=1e-5)


class ActionLinearQ(torch.nn.Module):
    """Q(s, a, z) = c . a: a critic whose action-gradient is c everywhere."""

    def __init__(self, slopes):
        super().__init__()
        self.slopes = torch.nn.Parameter(slopes)

    def forward(self, obs, act, z):
        return (act * self.slopes).sum(-1, keepdim=True)


@pytest.mark.parametrize("model", ["mlp", "hyper"])
def test_policy_loss_follows_the_critics_action_gradient(model):
    # The reparameterised action carries d min(Q1, Q2) / da back into the policy (PEARL's policy loss); critics with a
    # steep known action-gradient make that term dominate the policy's gradient.
    agent, batch, z = small_agent(model), random_batch(), torch.randn(3, LAT)
    slopes = torch.linspace(-20.0, 20.0, ACT)
    agent.qf1, agent.qf2 = ActionLinearQ(slopes), ActionLinearQ(-slopes)
    params = list(agent.policy.parameters())
    torch.manual_seed(5)
    _, policy_loss, _ = value_and_policy_losses(agent, batch, z)
    grads = torch.autograd.grad(policy_loss, params)
    torch.manual_seed(5)
    mean, log_std = agent.policy.dist_params_with_weights(agent.policy.task_weights(z), batch.obs)
    u = mean + log_std.exp() * torch.randn(mean.shape)
    log_pi = tanh_gaussian_log_prob(u, mean, log_std)
    regulariser = 1e-3 * mean.pow(2).mean() + 1e-3 * log_std.pow(2).mean()
    action = torch.tanh(u)
    min_q = torch.min(agent.qf1(batch.obs, action, None), agent.qf2(batch.obs, action, None))
    expected = torch.autograd.grad((log_pi - min_q).mean() + regulariser, params, retain_graph=True)
    without_critic = torch.autograd.grad(log_pi.mean() + regulariser, params)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    critic_part = sum((e - w).norm() for e, w in zip(expected, without_critic))
    assert critic_part > 0.5 * sum(e.norm() for e in expected)
    assert all(p.grad is None for p in (agent.qf1.slopes, agent.qf2.slopes))  # Q stays frozen


def test_hyper_policy_generates_weights_once_per_task_in_the_update():
    agent, batch = small_agent("hyper"), random_batch(tasks=4, n=16)
    rows = []
    handle = agent.policy.primary.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    value_and_policy_losses(agent, batch, torch.randn(4, LAT))
    handle.remove()
    assert rows == [4]  # one primary-network row per task, not 4 x 16


def test_train_step_updates_every_model_and_soft_updates_the_target_v():
    agent, batch, context = small_agent("mlp"), random_batch(), random_context()
    before = {name: [p.detach().clone() for p in getattr(agent, name).parameters()] for name in ("encoder", "policy", "qf1", "qf2", "vf", "target_vf")}
    stats = train_step(agent, optimizers_for(agent), batch, context, tau=0.005)
    for name in ("encoder", "policy", "qf1", "qf2", "vf"):
        assert any(not torch.equal(a, b) for a, b in zip(before[name], getattr(agent, name).parameters())), name
    for old_target, new_v, new_target in zip(before["target_vf"], agent.vf.parameters(), agent.target_vf.parameters()):
        torch.testing.assert_close(new_target, 0.995 * old_target + 0.005 * new_v)
    assert stats["qf_loss"] == pytest.approx(stats["qf1_loss"] + stats["qf2_loss"])
    assert {"qf1_values", "qf2_values", "vf_loss", "actor_loss", "kl_div", "z_mean", "z_var"} <= set(stats)


def test_fused_adam_steps_like_the_for_loop_adam_up_to_rounding():
    """The optimizers are PyTorch's fused Adam (docs/speed.md): five Hyper-PEARL steps end within float rounding of
    the same steps with the for-loop Adam."""
    learner = hyper_pearl.PEARL(Args(env_id="HalfCheetahFwdBack", model="hyper"), small_agent("hyper"))
    twin, start = for_loop_adam_twin(learner), [p.clone() for p in learner.agent.policy.parameters()]
    for each in (learner, twin):
        torch.manual_seed(1)
        for _ in range(5):
            each.update(random_batch(), random_context())
    assert_same_up_to_rounding(learner.agent.state_dict(), twin.agent.state_dict())
    assert all(not torch.equal(a, b) for a, b in zip(start, learner.agent.policy.parameters()))  # every weight moved


def test_train_step_validates_no_distribution_arguments(monkeypatch):
    """torch.distributions' argument checks read a value on the host (on a GPU each waits for the device); the
    posterior, the prior and the policy's log-prob skip them."""
    agent, batch, context = small_agent("hyper"), random_batch(), random_context()
    checks = count_host_reads(monkeypatch, torch.distributions.distribution)
    train_step(agent, optimizers_for(agent), batch, context, tau=0.005)
    agent.encoder.prior(3).sample()
    assert not checks


def test_train_step_stops_before_the_optimizer_step_on_a_non_finite_loss():
    agent, batch, context = small_agent("mlp"), random_batch(), random_context()
    with torch.no_grad():
        agent.qf1.last.bias.fill_(float("nan"))
    before = [p.detach().clone() for p in agent.encoder.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite Q loss"):
        train_step(agent, optimizers_for(agent), batch, context)
    assert all(torch.equal(a, b) for a, b in zip(before, agent.encoder.parameters()))


def test_policy_saturation_counts_pre_tanh_means_beyond_3():
    torch.manual_seed(0)
    policy = MLPPolicy(OBS, ACT, LAT, 16)
    with torch.no_grad():
        policy.mean.weight.zero_()
        policy.mean.bias.copy_(torch.tensor([5.0, -5.0, 0.5, 0.0, 2.9, -3.1]))
    assert policy_saturation(policy, torch.randn(2, 10, OBS), torch.randn(2, LAT)) == 0.5


def test_saturation_diagnostics_draw_z_from_the_prior_and_from_the_posterior_without_touching_torchs_rng():
    agent, tasks = small_agent("mlp"), 400
    batch, context = random_batch(tasks=tasks, n=2), random_context(tasks=tasks)
    latents = []
    original = agent.policy.task_weights
    agent.policy.task_weights = lambda z: latents.append(z) or original(z)
    rng_state = torch.get_rng_state()
    stats = saturation_diagnostics(agent, batch, context, np.random.default_rng(0))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the training's random stream is untouched
    assert set(stats) == {"policy_saturation_prior_z", "policy_saturation_posterior_z"}
    prior_z, posterior_z = latents
    assert prior_z.shape == posterior_z.shape == (tasks, LAT)
    with torch.no_grad():
        posterior = agent.encoder.posterior(context)
    for z, loc, scale in ((prior_z, 0.0, 1.0), (posterior_z, posterior.loc, posterior.scale)):
        standardised = (z - loc) / scale
        assert abs(standardised.mean().item()) < 0.1 and standardised.std().item() == pytest.approx(1.0, rel=0.1)
    assert posterior.scale.max() < 0.6  # so the two are told apart
    assert saturation_diagnostics(agent, batch, context, np.random.default_rng(0)) == stats


def test_make_agent_calibrates_the_policy_on_prior_and_posterior_z_and_the_critics_on_states():
    args = Args(env_id="HalfCheetahFwdBack", model="hyper", **{f"hyper_{k}": v for k, v in SMALL.items()})
    torch.manual_seed(0)
    agent = make_agent(args, OBS, ACT, cheetah_context(1000, 0))
    held_out = cheetah_context(1000, 1)
    prior, posterior = policy_init_latents(agent.encoder, held_out, CONTEXT_SIZE)
    with torch.no_grad():
        assert rms_norm(agent.policy.primary(torch.cat([prior, posterior]))) == pytest.approx(8.0, rel=0.05)
        ratio = rms_norm(agent.policy.primary(prior)) / rms_norm(agent.policy.primary(posterior))
        assert ratio <= 1.05 * MAX_EMBEDDING_NORM_RATIO
        for critic in (agent.qf1, agent.qf2, agent.vf):
            assert rms_norm(critic.primary(held_out[:, :OBS])) == pytest.approx(8.0, rel=0.05)
    assert not torch.equal(agent.qf1.heads[0].weight.weight, agent.qf2.heads[0].weight.weight)  # independent twins
    assert all(torch.equal(a, b) for a, b in zip(agent.vf.parameters(), agent.target_vf.parameters()))


def test_hyper_policy_trained_on_posterior_z_is_not_saturated_at_prior_z():
    # PEARL trains the policy on posterior z (|z| ~ 0.1 at first) but explores with prior z (|z| ~ 2.2). With a
    # homogeneous (bias-free) hypernetwork the policy's mean scales with |z|^2, and a few updates at posterior z left
    # it saturated at prior z, with log-std near -16.
    sizes = {f"hyper_{k}": v for k, v in SMALL.items()}
    args = Args(env_id="HalfCheetahFwdBack", model="hyper", batch_size=64, **sizes)
    torch.manual_seed(0)
    agent = make_agent(args, 17, 6, cheetah_context(1000, 0))
    modules = {"policy": agent.policy, "qf1": agent.qf1, "qf2": agent.qf2, "vf": agent.vf, "context": agent.encoder}
    lrs = learning_rates(args)
    optimizers = {name: torch.optim.Adam(module.parameters(), lr=lrs[name]) for name, module in modules.items()}
    env, rng = make_task_env("HalfCheetahFwdBack", Task(1.0)), np.random.default_rng(0)
    rl, encoder_buffers = MultiTaskBuffer(2, 17, 6, 10_000), MultiTaskBuffer(2, 17, 6, 10_000)
    for index, goal in enumerate((-1.0, 1.0)):  # the initial pool: the policy's own actions, z ~ prior
        collect(env, Task(goal), agent, 400, rl.tasks[index], encoder_buffers.tasks[index], add_to_encoder=True,
                use_posterior=False, context_batch=CONTEXT_SIZE, rng=rng)  # fmt: skip
    obs = rl.sample_batch([0, 1] * 8, 64, rng).obs
    prior_z, noise = torch.randn(16, LAT), torch.randn(16, LAT)
    before = agent.policy.dist_params_with_weights(agent.policy.task_weights(prior_z), obs)[0].detach()
    for _ in range(15):
        indices = rng.integers(0, 2, size=4)
        train_step(agent, optimizers, rl.sample_batch(indices, 64, rng),
                   encoder_buffers.sample_context(indices, CONTEXT_SIZE, rng))  # fmt: skip
    with torch.no_grad():
        posterior = agent.encoder.posterior(encoder_buffers.sample_context([0, 1] * 8, CONTEXT_SIZE, rng))
        posterior_z = posterior.loc + posterior.scale * noise
        means, log_stds = zip(*(agent.policy.dist_params_with_weights(agent.policy.task_weights(z), obs)
                                for z in (prior_z, posterior_z)))  # fmt: skip
    assert (means[0] - before).abs().mean() > 0.01  # the updates did move the policy at prior z
    assert policy_saturation(agent.policy, obs, prior_z) < 0.01 and log_stds[0].mean() > -2.0
    assert means[0].abs().mean() < 10 * means[1].abs().mean()  # homogeneity in z gave (2.2 / 0.1)^2 ~ 500


# Replay and sampling


def path_of(n, value, terminal_last=False, obs=OBS, act=ACT):
    terminals = np.zeros((n, 1), np.float32)
    terminals[-1] = float(terminal_last)
    return {"obs": np.full((n, obs), value, np.float32), "actions": np.full((n, act), value, np.float32),
            "rewards": np.full((n, 1), value, np.float32), "next_obs": np.full((n, obs), value, np.float32),
            "terminals": terminals}  # fmt: skip


def test_per_task_buffers_keep_tasks_apart():
    buffers = MultiTaskBuffer(3, OBS, ACT, capacity=1000)
    for task in range(3):
        buffers.tasks[task].add_path(path_of(50, float(task)))
    rng = np.random.default_rng(0)
    batch = buffers.sample_batch([2, 0, 2, 1], 64, rng)
    assert batch.obs.shape == (4, 64, OBS) and batch.rewards.shape == (4, 64, 1)
    for row, task in enumerate([2, 0, 2, 1]):
        assert torch.all(batch.obs[row] == task) and torch.all(batch.rewards[row] == task)
    context = buffers.sample_context([1], 10, rng)
    assert context.shape == (1, 10, context_dim(OBS, ACT)) and torch.all(context == 1.0)


def test_task_buffer_is_fifo_at_capacity_clears_and_round_trips():
    buffer = TaskBuffer(OBS, ACT, capacity=100)
    buffer.add_path(path_of(80, 1.0))
    buffer.add_path(path_of(50, 2.0))
    assert buffer.size == 100 and (buffer.data["rewards"][:100] == 2.0).sum() == 50  # the 30 oldest were overwritten
    copy = TaskBuffer(OBS, ACT, capacity=100)
    copy.load_state_dict(buffer.state_dict())
    copy.add_path(path_of(10, 3.0))
    buffer.add_path(path_of(10, 3.0))
    assert all(np.array_equal(copy.data[k][:100], buffer.data[k][:100]) for k in buffer.data)
    buffer.clear()
    assert buffer.size == 0
    with pytest.raises(ValueError):
        buffer.sample(1, np.random.default_rng(0))


class TerminatesAt(gym.Env):
    """A 2-D env that terminates at step `n`; reward = step index."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS,))
    action_space = gym.spaces.Box(-1.0, 1.0, (ACT,))

    def __init__(self, n):
        self.n = n

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(OBS), {}

    def step(self, action):
        self.t += 1
        return np.full(OBS, self.t, np.float64), float(self.t), self.t == self.n, False, {}


def test_terminal_transitions_are_stored_and_time_limits_are_not_terminal():
    agent = small_agent("mlp")
    path = rollout(TerminatesAt(5), agent.policy, torch.zeros(1, LAT), deterministic=False, seed=0)
    assert len(path["rewards"]) == 5 and path["terminals"][:, 0].tolist() == [0, 0, 0, 0, 1]
    assert path["rewards"][-1, 0] == 5 and np.all(path["next_obs"][-1] == 5)
    buffer = TaskBuffer(OBS, ACT, 100)
    buffer.add_path(path)
    assert buffer.size == 5 and buffer.data["terminals"][4, 0] == 1.0
    env = make_task_env("HalfCheetahVel", Task(1.0))
    cheetah = ContextEncoder(17, 6, LAT, 16)
    path = rollout(env, MLPPolicy(17, 6, LAT, 16), cheetah.prior(1).sample(), deterministic=True, seed=0)
    assert len(path["rewards"]) == 200 and not path["terminals"].any()  # truncated by the 200-step limit only


def test_rollout_generates_hyper_policy_weights_once_per_trajectory():
    agent = small_agent("hyper")
    rows = []
    handle = agent.policy.primary.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    rollout(TerminatesAt(30), agent.policy, torch.zeros(1, LAT), deterministic=True, seed=0)
    handle.remove()
    assert rows == [1]


def test_collect_fills_the_buffers_as_pearl_does():
    agent = small_agent("mlp", obs=17, act=6)
    agent.encoder = ContextEncoder(17, 6, LAT, 16)
    env, rng = make_task_env("HalfCheetahVel", Task(1.0)), np.random.default_rng(0)
    rl, enc = TaskBuffer(17, 6, 10_000), TaskBuffer(17, 6, 10_000)
    agent.policy, agent.qf1 = MLPPolicy(17, 6, LAT, 16), None
    paths = collect(env, Task(2.0), agent, 400, rl, enc, add_to_encoder=True, use_posterior=False, context_batch=8, rng=rng)
    assert len(paths) == 2 and rl.size == enc.size == 400 and env.task == Task(2.0)
    posteriors = []
    original = agent.encoder.posterior
    agent.encoder.posterior = lambda c: posteriors.append(tuple(c.shape)) or original(c)
    collect(env, Task(2.0), agent, 600, rl, enc, add_to_encoder=False, use_posterior=True, context_batch=8, rng=rng)
    assert rl.size == 1000 and enc.size == 400  # posterior rollouts feed the RL buffer only
    assert posteriors == [(1, 8, context_dim(17, 6))] * 3  # z re-inferred after every trajectory from a context batch


def test_evaluation_explores_with_the_prior_then_adapts_on_the_accumulated_context():
    agent = small_agent("mlp", obs=17, act=6)
    agent.encoder, agent.policy = ContextEncoder(17, 6, LAT, 16), MLPPolicy(17, 6, LAT, 16)
    posteriors = []
    original = agent.encoder.posterior
    agent.encoder.posterior = lambda c: posteriors.append(tuple(c.shape)) or original(c)
    env = make_task_env("HalfCheetahVel", Task(1.0))
    returns = adaptation_returns(env, Task(0.5), agent, 600, 2, np.random.default_rng(0))
    assert len(returns) == 3 and env.task == Task(0.5)
    assert posteriors == [(1, 400, context_dim(17, 6)), (1, 600, context_dim(17, 6))]  # after trajectories 2 and 3


def test_evaluate_averages_the_last_trajectory_over_runs_then_tasks(monkeypatch):
    import hyper_pearl

    scripted = {0.0: iter([[1.0, 2.0, 3.0], [1.0, 2.0, 5.0]]), 1.0: iter([[0.0, 0.0, 10.0], [0.0, 4.0, 6.0, 8.0]])}
    monkeypatch.setattr(hyper_pearl, "adaptation_returns", lambda env, task, *a: next(scripted[task.goal]))
    final, online = evaluate(None, [Task(0.0), Task(1.0)], None, 2, 600, 2, None)
    assert final == pytest.approx(((3 + 5) / 2 + (10 + 8) / 2) / 2)
    assert online == pytest.approx([0.5, 2.0, 6.0])


def test_family_schedules_are_pearls():
    """Notes §3.1 table (oyster JSONs) with HypeRL's ant-dir num_evals 2; the HypeRL vel JSONs for the rest."""
    assert FAMILY_SCHEDULES["HalfCheetahFwdBack"] == dict(meta_batch=4, num_steps_prior=1000, num_extra_rl_steps_posterior=1000,
                                                          num_evals=4, embedding_batch_size=256, num_train_steps_per_itr=2000)  # fmt: skip
    assert FAMILY_SCHEDULES["AntFwdBack"]["num_train_steps_per_itr"] == 4000 and FAMILY_SCHEDULES["AntFwdBack"]["num_steps_prior"] == 400
    for family in ("HalfCheetahVel", "AntVel", "HalfCheetahVelMedium"):
        assert FAMILY_SCHEDULES[family] == dict(meta_batch=16, num_steps_prior=400, num_extra_rl_steps_posterior=600, num_evals=1,
                                                embedding_batch_size=100, num_train_steps_per_itr=2000)  # fmt: skip


# End to end through the CLI

import hyper_pearl  # noqa: E402

SCRIPT = os.path.join(ROOT, "hyper_pearl.py")
SMALL_RUN = ["--env-id", "HalfCheetahVel", "--num-iterations", "2", "--num-train-tasks", "3", "--num-test-tasks", "2",
             "--num-initial-steps", "200", "--num-steps-prior", "200", "--num-extra-rl-steps-posterior", "200",
             "--num-tasks-sample", "1", "--num-train-steps-per-itr", "3", "--meta-batch", "2", "--batch-size", "16",
             "--embedding-batch-size", "8", "--num-steps-per-eval", "400", "--net-size", "16", "--encoder-hidden", "16",
             "--hyper-embedding-dim", "16", "--hyper-blocks", "1", "--hyper-dynamic-hidden", "8",
             "--hyper-init-samples", "64", "--checkpoint-freq", "2", "--save-model"]  # fmt: skip
TAGS = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf1_loss", "losses/qf2_loss",
        "losses/qf_loss", "losses/qf1_values", "losses/qf2_values", "losses/vf_loss", "losses/actor_loss", "losses/kl_div",
        "eval/average_return_all_test_tasks", "eval/average_return_all_train_tasks", "eval/test_return_trajectory_1",
        "eval/test_return_trajectory_2", "charts/policy_saturation_prior_z",
        "charts/policy_saturation_posterior_z"]  # fmt: skip


run = partial(run_script, SCRIPT)


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """One SMALL_RUN per model, made on first use: (stdout, run dir)."""
    return cached_runs(tmp_path_factory, run, SMALL_RUN, "--model")


@pytest.fixture(scope="module")
def longer_runs(tmp_path_factory):
    """One SMALL_RUN of 3 iterations per model, made on first use: (stdout, run dir)."""
    return cached_runs(tmp_path_factory, run, [*SMALL_RUN, "--num-iterations", "3"], "--model")


def load(path):
    return torch.load(path, weights_only=True)


def save_signed(contents, path):
    """Save a checkpoint edited by a test with its digest recomputed, as hyper_pearl.py would have written it."""
    contents = {k: v for k, v in contents.items() if k != "sha256"}
    torch.save({**contents, "sha256": hyper_pearl.content_digest(contents)}, path)


def assert_same_models(run_dir_a, run_dir_b):
    a = load(os.path.join(run_dir_a, "hyper_pearl.cleanrl_model"))["agent"]
    b = load(os.path.join(run_dir_b, "hyper_pearl.cleanrl_model"))["agent"]
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def assert_one_error_line(proc, message, code=1):
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("model", ["mlp", "hyper"])
def test_cli_run_trains_evaluates_logs_and_saves(model, small_runs):
    stdout, run_dir = small_runs(model)
    assert os.path.basename(run_dir).startswith(f"HalfCheetahVel__hyper_pearl__{model}__0__")
    assert "iteration 2/2" in stdout and "s/it" in stdout and "env steps/s" in stdout and "ETA" in stdout and "eval test" in stdout
    events = tensorboard_events(run_dir)
    # global step = training env steps: 3 tasks x 200 initial + 200 prior + 200 posterior, then 400 more
    for tag in TAGS:
        assert [e.step for e in events.Scalars(tag)] == [1000, 1400], tag
        assert all(np.isfinite(e.value) for e in events.Scalars(tag)), tag
    assert all(-1500 < e.value < 0 for e in events.Scalars("eval/average_return_all_test_tasks"))
    model_file = load(os.path.join(run_dir, "hyper_pearl.cleanrl_model"))
    checkpoint = load(os.path.join(run_dir, "checkpoint.pt"))
    assert checkpoint["iteration"] == 2 and checkpoint["global_step"] == 1400
    assert all(torch.equal(model_file["agent"][k], v) for k, v in checkpoint["learner"]["agent"].items())
    assert sum(buffer["size"] for buffer in checkpoint["rl_buffer"]) == 1400
    assert ("hyper" if model == "hyper" else "mlp") in model_file["args"]["model"]


def test_resumed_run_equals_an_uninterrupted_one(small_runs, longer_runs, tmp_path):
    _, run_dir = small_runs("hyper")  # 2 iterations, checkpoint at 2
    shutil.copytree(os.path.dirname(run_dir), tmp_path / "b" / "runs")
    longer = [*SMALL_RUN, "--model", "hyper", "--num-iterations", "3"]
    proc = run([*longer, "--resume", os.path.join(only_run_dir(tmp_path / "b"), "checkpoint.pt")], tmp_path / "b")
    assert "resumed" in proc.stdout and "iteration 3/3" in proc.stdout
    a = load(os.path.join(longer_runs("hyper")[1], "hyper_pearl.cleanrl_model"))["agent"]
    original = load(os.path.join(run_dir, "hyper_pearl.cleanrl_model"))["agent"]
    assert not all(torch.equal(a[k], original[k]) for k in a)
    assert_same_models(longer_runs("hyper")[1], only_run_dir(tmp_path / "b"))


def test_resume_refuses_different_settings(small_runs, tmp_path):
    _, run_dir = small_runs("mlp")
    proc = run([*SMALL_RUN, "--model", "mlp", "--num-iterations", "3", "--reward-scale", "1",
                "--resume", os.path.join(run_dir, "checkpoint.pt")], tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: the checkpoint was made with different settings: --reward-scale 5.0 (given 1.0)")


def test_resume_refuses_a_checkpoint_from_before_a_setting_existed(small_runs, tmp_path):
    _, run_dir = small_runs("hyper")
    checkpoint = load(os.path.join(run_dir, "checkpoint.pt"))
    del checkpoint["args"]["hyper_embedding_norm"]  # as written before the flag existed, with the old default init
    checkpoint["args"]["hyper_init"] = "kaiming"
    save_signed(checkpoint, tmp_path / "old.pt")
    resume = ["--model", "hyper", "--num-iterations", "3", "--resume", str(tmp_path / "old.pt")]
    proc = run([*SMALL_RUN, *resume], tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: the checkpoint was made with different settings: ")
    assert "--hyper-init kaiming (given pytorch)" in proc.stderr
    assert "--hyper-embedding-norm None (given 8.0)" in proc.stderr


def test_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(small_runs, tmp_path):
    _, run_dir = small_runs("mlp")
    shutil.copytree(run_dir, tmp_path / "run")
    checkpoint_path = str(tmp_path / "run" / "checkpoint.pt")
    checkpoint = load(checkpoint_path)
    checkpoint["learner"]["agent"]["qf1.last.bias"][0] = float("nan")
    save_signed(checkpoint, checkpoint_path)
    proc = run([*SMALL_RUN, "--model", "mlp", "--num-iterations", "4", "--checkpoint-freq", "1", "--resume", checkpoint_path], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite Q loss + KL" in errors[0]
    assert errors[0].endswith(f"in iteration 3; stopping, the last checkpoint ({checkpoint_path}) is intact")
    after = load(checkpoint_path)
    assert after["iteration"] == 2 and torch.isnan(after["learner"]["agent"]["qf1.last.bias"][0])


def test_cli_bad_input_fails_cleanly(tmp_path):
    proc = run(["--meta-batch", "0"], tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr == "error: --meta-batch must be positive, got 0\n"
    proc = run(["--num-initial-steps", "0", "--num-steps-prior", "0", "--num-extra-rl-steps-posterior", "0"], tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    proc = run(["--env-id", "HopperVel"], tmp_path, check=False)  # tyro refuses a value outside the Literal
    assert proc.returncode != 0 and "HalfCheetahVelMedium" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(["--resume", str(tmp_path / "missing.pt")], tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot load checkpoint")
    assert not os.path.exists(tmp_path / "runs")


def test_help_lists_the_flags(tmp_path):
    proc = run(["--help"], tmp_path)
    for flag in ("--env-id", "--model", "--num-train-steps-per-itr", "--meta-batch", "--reward-scale", "--kl-lambda",
                 "--num-exp-traj-eval", "--resume", "--save-model", "--qf-lr"):  # fmt: skip
        assert flag in proc.stdout


# Run infrastructure: safe and verified files, unique run directories, exact resume, evaluation that leaves training
# alone, the non-finite guard, Ctrl-C, one `error:` line for bad input

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


class _Payload:
    """Unpickling it would create a marker file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_checkpoint_runs_nothing_and_gets_one_error_line(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": hyper_pearl.FILE_FORMAT, "learner": _Payload(str(marker))}, tmp_path / "evil.pt")
    proc = run([*SMALL_RUN, "--resume", "evil.pt"], tmp_path, check=False)
    assert_one_error_line(proc, "error: cannot load checkpoint evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("name, message", [("random.pt", "not a checkpoint or model written by hyper_pearl.py"),
                                           ("foreign.pt", "not a checkpoint or model written by this version"),
                                           ("corrupted.pt", "the file is corrupted")])  # fmt: skip
def test_random_bytes_foreign_and_corrupted_checkpoints_are_refused(name, message, small_runs, tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    torch.save({"format": "hyper_sac/2", "args": {}, "agent": {}}, tmp_path / "foreign.pt")  # another script's file
    contents = load(os.path.join(small_runs("mlp")[1], "checkpoint.pt"))
    contents["learner"]["agent"]["qf1.last.bias"][0] += 1.0  # one weight changed, the stored digest kept
    torch.save(contents, tmp_path / "corrupted.pt")
    proc = run([*SMALL_RUN, "--model", "mlp", "--num-iterations", "3", "--resume", name], tmp_path, check=False)
    assert_one_error_line(proc, message)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hyper_pearl.time, "time", lambda: 1.7e9)
    names = [hyper_pearl.make_run_dir(Args(model="mlp"))[0] for _ in range(3)]
    assert len(set(names)) == 3 and sorted(os.listdir(tmp_path / "runs")) == sorted(names)
    assert all(name.startswith("HalfCheetahVel__hyper_pearl__mlp__0__1700000000") for name in names)


def test_evaluation_does_not_change_training(small_runs, tmp_path):
    run([*SMALL_RUN, "--model", "mlp", "--eval-freq", "0"], tmp_path)  # small_runs evaluate every iteration
    assert_same_models(small_runs("mlp")[1], only_run_dir(tmp_path))


def test_resume_refuses_a_different_evaluation_setting(small_runs, tmp_path):
    checkpoint = os.path.join(small_runs("mlp")[1], "checkpoint.pt")
    resume = ["--model", "mlp", "--num-iterations", "3", "--num-steps-per-eval", "600", "--resume", checkpoint]
    proc = run([*SMALL_RUN, *resume], tmp_path, check=False)
    assert_one_error_line(proc, "--num-steps-per-eval 400 (given 600)")


def test_the_guard_stops_on_weights_that_a_step_made_non_finite():
    weight = torch.nn.Parameter(torch.tensor([3.3e38]))
    optimizer = torch.optim.Adam([weight], lr=3e37)
    loss = -weight.sum()  # finite, and its step pushes the weight past the largest float32 (3.4e38)
    with pytest.raises(hyper_pearl.NonFinite, match="non-finite weights after the V and policy step"):
        hyper_pearl.guarded_step([optimizer], loss, "V and policy", {"V loss": loss})
    with pytest.raises(hyper_pearl.NonFinite, match="non-finite V loss"):
        hyper_pearl.guarded_step([optimizer], loss, "V and policy", {"V loss": torch.tensor(float("nan"))})


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(longer_runs, tmp_path):
    longer = [*SMALL_RUN, "--model", "hyper", "--num-iterations", "3"]
    proc = subprocess.Popen([sys.executable, SCRIPT, "--num-threads", "1", *longer, "--checkpoint-freq", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("iteration 1/3"):
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    checkpoint = os.path.join("runs", os.path.basename(only_run_dir(tmp_path)), "checkpoint.pt")
    assert last.startswith("interrupted at iteration ") and last.endswith(f"--resume {checkpoint}")
    assert load(tmp_path / checkpoint)["iteration"] in (1, 2)
    run([*longer, "--resume", checkpoint], tmp_path)
    assert_same_models(longer_runs("hyper")[1], only_run_dir(tmp_path))


@pytest.mark.parametrize("flags, message", [(["--seed", "-1"], "--seed must be >= 0"),
                                            (["--kl-lambda", "inf"], "--kl-lambda must be a finite number"),
                                            (["--exp-name", "a/b"], "--exp-name must be a plain name"),
                                            (["--num-train-tasks", str(10**12)], "GiB for the task pools and replay buffers"),
                                            (["--latent-dim", str(10**12)], "not enough memory for the networks")])  # fmt: skip
def test_more_bad_input_gives_one_error_line(flags, message, tmp_path):
    proc = run([*SMALL_RUN, "--model", "mlp", *flags], tmp_path, check=False)
    assert_one_error_line(proc, message)
    assert not os.path.exists(tmp_path / "runs")


def test_runs_being_a_file_gives_one_error_line(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    proc = run([*SMALL_RUN, "--model", "mlp"], tmp_path, check=False)
    assert_one_error_line(proc, "cannot create the run directory")


def test_the_first_eta_after_iteration_1_comes_from_the_later_iterations_rate(monkeypatch, capsys):
    """The training loop's calls to Progress on a clock where iteration 1, with the initial pool, takes 100 s and each
    later iteration 2 s."""
    clock = [0.0]
    monkeypatch.setattr(hyper_pearl, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    progress = hyper_pearl.Progress(10, 1, 0)
    for iteration in range(1, 4):
        clock[0] += 100.0 if iteration == 1 else 2.0
        progress.end_iteration(iteration, 200, {"collection": 1.0}, 0.0)
        if iteration == 1:
            progress.new_phase(iteration)
    lines = capsys.readouterr().out.splitlines()
    assert "ETA from iteration 2" in lines[0]
    assert "iteration 2/10 | 2.0 s/it" in lines[1] and "ETA 0m16s" in lines[1]  # 8 iterations at 2 s
    assert "ETA 0m14s" in lines[2]


# The device: --cuda

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def hyperparameter_texts(run_dir):
    """The hyperparameter tables the run (and each resumption of it) logged, oldest first."""
    events = tensorboard_events(run_dir).Tensors("hyperparameters/text_summary")
    return [event.tensor_proto.string_val[0].decode() for event in events]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["mlp", "hyper"])
def test_the_learner_and_its_data_live_on_the_selected_device(model, device):
    sizes = {f"hyper_{k}": v for k, v in SMALL.items()}
    args = Args(env_id="HalfCheetahFwdBack", model=model, net_size=16, encoder_hidden=16, **sizes)
    torch.manual_seed(0)
    learner = hyper_pearl.PEARL(args, make_agent(args, OBS, ACT, cheetah_context(64, 0)).to(device))
    env, rng = make_task_env("HalfCheetahFwdBack", Task(1.0)), np.random.default_rng(0)
    rl, encoder_buffers = MultiTaskBuffer(2, OBS, ACT, 1000), MultiTaskBuffer(2, OBS, ACT, 1000)
    for index, goal in enumerate((-1.0, 1.0)):  # rollouts with prior z, then a posterior from the encoder buffer
        collect(env, Task(goal), learner.agent, 200, rl.tasks[index], encoder_buffers.tasks[index], add_to_encoder=True,
                use_posterior=True, context_batch=8, rng=rng)  # fmt: skip
    batch, context = rl.sample_batch([0, 1], 16, rng, device), encoder_buffers.sample_context([0, 1], 8, rng, device)
    stats = learner.update(batch, context)
    saturation_diagnostics(learner.agent, batch, context, rng)
    evaluate(env, [Task(1.0)], learner.agent, 1, 400, 1, rng)  # posterior z from the context of the first trajectory
    env.close()
    state = learner.state_dict()
    moments = [
        value
        for optimizer in state["optimizers"].values()
        for param_state in optimizer["state"].values()
        for key, value in param_state.items()
        if key != "step"
    ]  # Adam keeps its step count on the CPU
    on_device = [*state["agent"].values(), *moments, *vars(batch).values(), context, *stats.values()]
    assert moments and all(tensor.device.type == device for tensor in on_device)
    assert all(stat.dim() == 0 and torch.isfinite(stat) for stat in stats.values())


def test_cuda_uses_cuda_when_available_else_the_cpu_and_a_run_resumes_with_either_setting(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = [*SMALL_RUN, "--model", "mlp", "--eval-freq", "0", "--checkpoint-freq", "1"]
    proc = run([*tiny, "--num-iterations", "1", "--cuda"], tmp_path)
    assert f"device {device}" in proc.stdout.splitlines()[0]
    checkpoint = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")
    proc = run([*tiny, "--num-iterations", "2", "--no-cuda", "--resume", checkpoint], tmp_path)  # --cuda may differ
    assert "resumed" in proc.stdout and "device cpu" in proc.stdout and "iteration 2/2" in proc.stdout
    first, resumed = hyperparameter_texts(only_run_dir(tmp_path))
    assert "|cuda|True|" in first and f"|device|{device}|" in first
    assert "|cuda|False|" in resumed and "|device|cpu|" in resumed

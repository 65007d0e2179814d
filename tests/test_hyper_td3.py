import math
import os

import numpy as np
import pytest
import torch

import hyper_td3
from hyper_td3 import Actor, Args, HyperCritic, make_critic
from functools import partial

from tests.cli import (
    ROOT, assert_same_up_to_rounding, count_host_reads, for_loop_adam_twin, only_run_dir, run_script, scalar_tags
)

SCRIPT = os.path.join(ROOT, "hyper_td3.py")
CRITICS = ["sa-hyper", "as-hyper", "mlp", "mlp-small", "mlp-large", "resnet-features", "res35", "d2rl"]
TINY = ["--hyper-embedding-dim", "16", "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "50", "--mlp-large-width", "64",
        "--res35-blocks", "3"]  # fmt: skip
NETS = ("actor", "actor_target", "qf1", "qf2", "qf1_target", "qf2_target")
LOW, HIGH = np.array([-3.0, 0.0]), np.array([3.0, 2.0])  # asymmetric bounds: scale (3, 1), bias (0, 1)


run = partial(run_script, SCRIPT)



def load(path):
    return torch.load(path, weights_only=True)


def replay_buffer(run_dir):
    saved = load(os.path.join(run_dir, "checkpoint.pt"))["replay_buffer"]
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def constant_actor(fraction):
    """An actor on LOW/HIGH whose output is bias + fraction * scale for every state."""
    actor = Actor(4, 2, LOW, HIGH)
    with torch.no_grad():
        actor.fc_mu.weight.zero_()
        actor.fc_mu.bias.fill_(math.atanh(fraction))
    return actor


# --- networks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("critic", CRITICS)
def test_every_critic_maps_a_batch_to_one_q_value_each(critic):
    args = Args(critic=critic, hyper_embedding_dim=16, hyper_dynamic_hidden=8, mlp_large_width=64, res35_blocks=3)
    q = make_critic(args, 17, 6)
    assert q(torch.randn(5, 17), torch.rand(5, 6)).shape == (5, 1)


def test_twin_critics_are_independent_networks():
    args = Args(critic="sa-hyper", hyper_embedding_dim=16, hyper_dynamic_hidden=8)
    qf1, qf2 = make_critic(args, 17, 6), make_critic(args, 17, 6)
    assert not any(p1.data_ptr() == p2.data_ptr() for p1, p2 in zip(qf1.parameters(), qf2.parameters()))
    assert not torch.equal(qf1.heads[0].weight.weight, qf2.heads[0].weight.weight)


def test_paper_size_critics_have_the_papers_parameter_counts():
    count = lambda name: sum(p.numel() for p in make_critic(Args(critic=name), 17, 6).parameters())  # noqa: E731
    # HalfCheetah (obs 17, act 6): 8,537,346 per SA-Hyper Q (authors' shapes), 72,193 per 2x256 MLP
    assert count("sa-hyper") == 8_537_346
    assert count("mlp") == 72_193
    assert 8.4e6 < count("mlp-large") < 9.5e6  # 2x2900: "about 9M weights"
    assert 4.4e6 < count("res35") < 4.8e6  # "about 4.5M weights"


def test_generated_weights_have_the_dynamic_networks_shapes():
    critic = HyperCritic(17, 6, meta_is_state=True, embedding_dim=32, blocks=2, dynamic_hidden=8)
    (w1, b1, g1), (w2, b2, g2) = critic.dynamic_weights(torch.randn(4, 17))
    assert w1.shape == (4, 8, 6) and b1.shape == (4, 8) and g1.shape == (4, 8)
    assert w2.shape == (4, 1, 8) and b2.shape == (4, 1) and g2.shape == (4, 1)
    reverse = HyperCritic(17, 6, meta_is_state=False, embedding_dim=32, blocks=2, dynamic_hidden=8)
    (w1, _, _), _ = reverse.dynamic_weights(torch.randn(4, 6))
    assert w1.shape == (4, 8, 17)  # AS-Hyper: the action generates weights over the state


def test_dynamic_forward_is_equation_1():
    torch.manual_seed(0)
    critic = HyperCritic(5, 3, meta_is_state=True, embedding_dim=16, blocks=1, dynamic_hidden=4)
    for p in critic.parameters():  # leave the zero-init heads of the default init
        torch.nn.init.normal_(p, std=0.3)
    s, a = torch.randn(2, 5), torch.randn(2, 3)
    (w1, b1, g1), (w2, b2, g2) = critic.dynamic_weights(s)
    for i in range(2):
        h = torch.relu((1 + g1[i]) * (w1[i] @ a[i]) + b1[i])
        q = (1 + g2[i]) * (w2[i] @ h) + b2[i]
        torch.testing.assert_close(critic(s, a)[i], q)


def test_authors_init_uses_the_td3_folders_constants():
    torch.manual_seed(0)
    critic = make_critic(Args(critic="sa-hyper", hyper_init="authors", hyper_embedding_dim=64), 17, 6)
    first, block = critic.primary.net[0], critic.primary.net[1].fc1  # fan-in 17 and 16
    for fc in (first, block):
        bound = 1 / (2 * math.sqrt(fc.in_features))  # TD3/hyper_network.py; SAC's is 1/sqrt(2 fan_in)
        assert 0.9 * bound < fc.weight.abs().max().item() <= bound
        # biases keep PyTorch's default U(+-1/sqrt(fan_in)), twice the weights' range
        assert bound < fc.bias.abs().max().item() <= 2 * bound
    for head, bound in zip(critic.heads, (0.05, 0.008)):
        for fc in (head.weight, head.bias, head.gain):
            assert 0.9 * bound < fc.weight.abs().max().item() <= bound
            assert fc.bias.abs().max().item() == 0.0


def test_actor_is_deterministic_and_stays_within_per_dimension_bounds():
    torch.manual_seed(0)
    actor = Actor(4, 2, LOW, HIGH)
    obs = 1e3 * torch.randn(256, 4)
    action = actor(obs)
    torch.testing.assert_close(action, actor(obs))
    torch.testing.assert_close(actor.action_scale, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(actor.action_bias, torch.tensor([0.0, 1.0]))
    assert torch.all(action >= torch.tensor(LOW, dtype=torch.float32)) and torch.all(action <= torch.tensor(HIGH, dtype=torch.float32))
    torch.testing.assert_close(constant_actor(0.5)(obs[:3]), torch.tensor([[1.5, 1.5]] * 3))


# --- TD3 pieces -------------------------------------------------------------------------------


def test_target_smoothing_clips_the_noise_and_the_action():
    torch.manual_seed(0)
    target_actor = constant_actor(0.9)  # outputs (2.7, 1.9), near the upper bounds (3, 2)
    mu = torch.tensor([2.7, 1.9])
    obs = torch.randn(4096, 4)
    with torch.no_grad():  # as in the critic target
        action = hyper_td3.smoothed_target_action(target_actor, obs, policy_noise=1e6, noise_clip=0.5)
        small = hyper_td3.smoothed_target_action(target_actor, obs, policy_noise=1e6, noise_clip=0.01)
    scale = target_actor.action_scale
    assert torch.all((action - mu).abs() <= 0.5 * scale + 1e-5)  # |noise| <= noise_clip * scale
    assert torch.all(action >= torch.tensor(LOW, dtype=torch.float32)) and torch.all(action <= torch.tensor(HIGH, dtype=torch.float32))
    # huge noise is clipped to +-noise_clip * scale, and mu + clipped noise is clipped to the bounds
    for dim, values in ((0, (3.0, 2.7 - 1.5)), (1, (2.0, 1.9 - 0.5))):
        upper = torch.isclose(action[:, dim], torch.tensor(values[0]))
        lower = torch.isclose(action[:, dim], torch.tensor(values[1]))
        assert torch.all(upper | lower) and upper.float().mean() == pytest.approx(0.5, abs=0.05)
    assert torch.all((small - mu).abs() <= 0.01 * scale + 1e-5)


def test_target_smoothing_noise_has_policy_noise_std_in_each_dimensions_scale():
    torch.manual_seed(0)
    target_actor = constant_actor(0.0)  # outputs the bias (0, 1), 5 sigma from either bound
    with torch.no_grad():  # as in the critic target
        action = hyper_td3.smoothed_target_action(target_actor, torch.randn(20000, 4), policy_noise=0.2, noise_clip=10.0)
    noise = action - torch.tensor([0.0, 1.0])
    np.testing.assert_allclose(noise.std(0).numpy(), [0.6, 0.2], rtol=0.05)  # 0.2 * scale (3, 1)
    assert noise.mean(0).abs().max() < 0.02
    assert abs(np.corrcoef(noise.numpy().T)[0, 1]) < 0.05  # independent per dimension


def test_exploration_noise_is_per_dimension_and_clipped_to_the_bounds():
    np.random.seed(0)
    scale, action = (HIGH - LOW) / 2, np.array([0.0, 1.0], dtype=np.float32)
    noisy = np.array([hyper_td3.exploration_action(action, 0.1 * scale, LOW, HIGH) for _ in range(20000)])
    assert noisy.dtype == np.float32
    np.testing.assert_allclose(noisy.std(0), [0.3, 0.1], rtol=0.05)
    huge = np.array([hyper_td3.exploration_action(action, 100 * scale, LOW, HIGH) for _ in range(2000)])
    assert np.all(huge >= LOW) and np.all(huge <= HIGH)
    assert np.mean(huge == HIGH) == pytest.approx(0.5, abs=0.05)


def test_td3_target_bootstraps_unless_terminated():
    r = torch.tensor([[1.0], [1.0]])
    terminated = torch.tensor([[0.0], [1.0]])  # a truncated transition has terminated = 0
    q1, q2 = torch.tensor([[10.0], [10.0]]), torch.tensor([[8.0], [8.0]])
    y = hyper_td3.td3_target(r, terminated, q1, q2, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([[1.0 + 0.9 * 8.0], [1.0]]))  # the smaller of the twin targets


def test_polyak_update_moves_targets_by_tau():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.1 * p + 0.9 * t for p, t in zip(online.parameters(), target.parameters())]
    hyper_td3.polyak_update(online, target, 0.1)
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t, e)


def test_actor_steps_are_every_policy_frequency_critic_updates():
    assert [n for n in range(1, 13) if hyper_td3.is_actor_step(n, 2)] == [2, 4, 6, 8, 10, 12]
    assert [n for n in range(1, 13) if hyper_td3.is_actor_step(n, 3)] == [3, 6, 9, 12]
    assert all(hyper_td3.is_actor_step(n, 1) for n in range(1, 13))


def test_an_update_reads_nothing_on_the_host_but_the_guards_two_checks_per_step(monkeypatch):
    """On a GPU every read on the host waits for the device: per optimizer step (critic, and actor every
    --policy-frequency updates) one check of its losses and one of its weights, and nothing else (the actor loss
    stays a tensor until it is logged)."""
    torch.manual_seed(0)
    agent = hyper_td3.TD3(Args(critic="mlp", policy_frequency=2), 4, 2, LOW, HIGH, None, "cpu")
    batch = [torch.randn(8, 4), torch.rand(8, 2), torch.randn(8, 1), torch.randn(8, 4), torch.zeros(8, 1)]
    reads = count_host_reads(monkeypatch, hyper_td3)
    for steps in (1, 2, 1, 2):  # critic only, then critic and actor
        reads.clear()
        agent.update(*batch)
        assert reads == {"tolist": steps, "__bool__": steps}


def test_fused_adam_steps_like_the_for_loop_adam_up_to_rounding():
    """The optimizers are PyTorch's fused Adam (docs/speed.md): six SA-Hyper updates (three actor steps) end within
    float rounding of the same updates with the for-loop Adam."""
    torch.manual_seed(0)
    agent = hyper_td3.TD3(Args(critic="sa-hyper", hyper_embedding_dim=32, hyper_dynamic_hidden=16), 4, 2, LOW, HIGH,
                          None, "cpu")  # fmt: skip
    twin, start = for_loop_adam_twin(agent), [p.clone() for p in agent.actor.parameters()]
    batch = [torch.randn(8, 4), torch.rand(8, 2), torch.randn(8, 1), torch.randn(8, 4), torch.zeros(8, 1)]
    for learner in (agent, twin):
        torch.manual_seed(1)
        for _ in range(6):
            learner.update(*batch)
    fused, for_loop = agent.state_dict(), twin.state_dict()
    for part in ("actor", "qf1", "qf2", "actor_target", "qf1_target", "qf2_target"):
        assert_same_up_to_rounding(fused[part], for_loop[part])
    assert all(not torch.equal(a, b) for a, b in zip(start, agent.actor.parameters()))  # every weight did move


class HugeConstantCritic(torch.nn.Module):
    """A Q-network far below any other, so min(Q1, Q2) would follow it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, obs, act):
        return -1e6 + 100.0 * (act * self.w).sum(1, keepdim=True)


def test_actor_loss_follows_q1_only():
    torch.manual_seed(0)
    args = Args(critic="mlp")
    actor, qf1, qf2 = Actor(4, 2, LOW, HIGH), make_critic(args, 4, 2), HugeConstantCritic()
    obs = torch.randn(32, 4)

    def grads(loss):
        actor.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in actor.parameters()]

    td3 = grads(hyper_td3.td3_actor_loss(actor, qf1, obs))
    q1_only = grads(-qf1(obs, actor(obs)).mean())
    with_min = grads(-torch.min(qf1(obs, actor(obs)), qf2(obs, actor(obs))).mean())
    for a, b in zip(td3, q1_only):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(td3[-1], with_min[-1])  # min(Q1, Q2) would have followed the huge constant critic


class _LinearInAction(torch.nn.Module):
    """Q(s, a) = a . v(s): v is a fixed direction, or the state's first coordinates when None."""

    def __init__(self, direction=None):
        super().__init__()
        self.direction = direction
        self.unused = torch.nn.Linear(1, 1)  # a parameter for frozen() to freeze

    def forward(self, obs, act):
        v = self.direction.expand_as(act) if self.direction is not None else obs[:, : act.shape[1]]
        return (act * v).sum(1, keepdim=True)


def test_saturation_diagnostics_count_saturated_outputs_and_measure_gradient_agreement():
    torch.manual_seed(0)
    actor = Actor(4, 2, LOW, HIGH)
    obs = torch.randn(512, 4)
    with torch.no_grad():
        actor.fc_mu.weight.zero_()
        actor.fc_mu.bias.copy_(torch.tensor([-5.0, 0.0]))  # first dimension saturated everywhere, second not
    saturation, agreement = hyper_td3.actor_saturation_diagnostics(actor, _LinearInAction(torch.tensor([1.0, -1.0])), obs)
    assert saturation == 0.5 and agreement == 1.0  # every state pushes every dimension the same way
    _, agreement = hyper_td3.actor_saturation_diagnostics(actor, _LinearInAction(), obs)
    assert agreement < 0.15  # the direction is the state's: random signs


@pytest.mark.parametrize("critic", ["sa-hyper", "as-hyper", "mlp"])
def test_frozen_critic_actor_gradient_equals_the_naive_one(critic):
    torch.manual_seed(0)
    args = Args(critic=critic, hyper_embedding_dim=32, hyper_dynamic_hidden=16)
    actor, qf1 = Actor(17, 6, -np.ones(6), np.ones(6)), make_critic(args, 17, 6)
    obs = torch.randn(32, 17)

    def actor_grads(loss):
        actor.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in actor.parameters()]

    naive = actor_grads(-qf1(obs, actor(obs)).mean())
    assert any(p.grad is not None for p in qf1.parameters())  # the naive loss did reach the critic
    qf1.zero_grad(set_to_none=True)
    fast = actor_grads(hyper_td3.td3_actor_loss(actor, qf1, obs))
    for a, b in zip(naive, fast):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in qf1.parameters())
    assert all(p.requires_grad for p in qf1.parameters())  # restored after the block


def test_replay_buffer_round_trips_through_its_state_dict():
    rb = hyper_td3.ReplayBuffer(10, 2, 1, seed=0)
    for i in range(13):  # wraps around
        rb.add(np.full(2, i), np.full(2, i + 1), np.full(1, -i), float(i), i % 2 == 0)
    copy = hyper_td3.ReplayBuffer(10, 2, 1, seed=99)
    copy.load_state_dict(rb.state_dict())
    for a, b in zip(rb.sample(6, "cpu"), copy.sample(6, "cpu")):
        torch.testing.assert_close(a, b)
    obs, actions, rewards, next_obs, terms = rb.sample(50, "cpu")
    torch.testing.assert_close(next_obs, obs + 1)
    torch.testing.assert_close(actions[:, 0], -obs[:, 0])
    assert rb.size == 10 and rewards.min() >= 3  # the three oldest were overwritten


def test_save_file_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    hyper_td3.save_file({"step": 1}, path, kind="checkpoint")
    with pytest.raises(Exception):
        hyper_td3.save_file({"step": 2, "bad": lambda: None}, path, kind="checkpoint")  # lambdas cannot be pickled
    assert hyper_td3.load_file(path, kinds=("checkpoint",))["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


# --- end to end through the CLI ---------------------------------------------------------------

SMALL_RUN = ["--env-id", "InvertedPendulum-v4", "--total-timesteps", "300", "--learning-starts", "100", "--batch-size", "16",
             "--eval-freq", "250", "--eval-episodes", "1", "--checkpoint-freq", "200", "--progress-freq", "100", *TINY]  # fmt: skip


@pytest.mark.parametrize("critic", CRITICS)
def test_cli_run_crosses_learning_start_an_eval_and_a_checkpoint(critic, tmp_path):
    proc = run([*SMALL_RUN, "--critic", critic, "--save-model", "--snapshot-freq", "100"], tmp_path)
    assert "steps/s" in proc.stdout and "ETA" in proc.stdout
    run_dir = only_run_dir(tmp_path)
    tags = scalar_tags(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf1_values", "losses/qf2_values",
                "losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/actor_loss", "eval/episodic_return",
                "charts/actor_saturation", "charts/action_grad_sign_agreement"]:  # fmt: skip
        assert tag in tags
    checkpoint = load(os.path.join(run_dir, "checkpoint.pt"))
    assert checkpoint["global_step"] == 300 and checkpoint["agent"]["critic_updates"] == 200
    assert all(key in checkpoint["agent"] for key in (*NETS, "q_optimizer", "actor_optimizer"))
    snapshots = sorted(os.listdir(os.path.join(run_dir, "snapshots")))
    assert snapshots == ["step_100.cleanrl_model", "step_200.cleanrl_model", "step_300.cleanrl_model"]
    final, last = load(os.path.join(run_dir, "hyper_td3.cleanrl_model")), load(os.path.join(run_dir, "snapshots", snapshots[-1]))
    assert last["global_step"] == 300 and last["args"]["critic"] == critic
    assert all(same_state(final[net], last[net]) for net in NETS)
    if critic == "mlp":
        for model in (os.path.join(run_dir, "hyper_td3.cleanrl_model"), os.path.join(run_dir, "snapshots", snapshots[0])):
            proc = run(["--eval-model", model, "--eval-episodes", "2"], tmp_path)
            assert "InvertedPendulum-v4: 2 episodes, return" in proc.stdout


def test_actor_and_targets_update_exactly_every_policy_frequency_steps(tmp_path):
    # tau = 1: a target update copies the online network, so snapshots after every step show when it happened
    run(["--env-id", "InvertedPendulum-v4", "--critic", "mlp-small", "--total-timesteps", "30", "--learning-starts", "20",
         "--batch-size", "16", "--policy-frequency", "3", "--tau", "1.0", "--eval-freq", "0", "--checkpoint-freq", "30",
         "--save-model", "--snapshot-freq", "1"], tmp_path)  # fmt: skip
    run_dir = only_run_dir(tmp_path)
    assert len(os.listdir(os.path.join(run_dir, "snapshots"))) == 30
    snaps = {step: load(os.path.join(run_dir, "snapshots", f"step_{step}.cleanrl_model")) for step in range(1, 31)}
    for step in range(2, 21):  # random actions, no updates
        assert all(same_state(snaps[step][net], snaps[1][net]) for net in NETS)
    for step in range(21, 31):
        now, before, actor_step = snaps[step], snaps[step - 1], (step - 20) % 3 == 0
        assert not same_state(now["qf1"], before["qf1"]) and not same_state(now["qf2"], before["qf2"])  # every step
        assert same_state(now["actor"], before["actor"]) != actor_step
        if actor_step:
            assert all(same_state(now[f"{net}_target"], now[net]) for net in ("actor", "qf1", "qf2"))
        else:
            assert all(same_state(now[f"{net}_target"], before[f"{net}_target"]) for net in ("actor", "qf1", "qf2"))
    agent = load(os.path.join(run_dir, "checkpoint.pt"))["agent"]
    assert agent["critic_updates"] == 10
    assert agent["actor_optimizer"]["state"][0]["step"].item() == 3  # Adam steps of the actor: updates 3, 6, 9
    assert agent["q_optimizer"]["state"][0]["step"].item() == 10


def test_exploration_and_random_actions_respect_per_dimension_bounds(tmp_path):
    run(["--env-id", "tests.envs_td3:AsymmetricBoundsEnv-v0", "--critic", "mlp-small", "--total-timesteps", "60",
         "--learning-starts", "20", "--batch-size", "16", "--exploration-noise", "100", "--eval-freq", "0",
         "--checkpoint-freq", "60"], tmp_path)  # fmt: skip
    actions = replay_buffer(only_run_dir(tmp_path))["actions"]
    assert np.all(actions >= LOW) and np.all(actions <= HIGH)
    assert 0 < np.mean(actions[20:] == LOW) and 0 < np.mean(actions[20:] == HIGH)  # the huge noise was clipped per dimension
    assert np.all(actions[:20] > LOW) and np.all(actions[:20] < HIGH)  # uniform random actions before learning starts


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    common = ["--env-id", "InvertedPendulum-v4", "--learning-starts", "100", "--batch-size", "16", "--eval-freq", "150",
              "--eval-episodes", "1", "--seed", "3", "--save-model", *TINY]  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run([*common, "--total-timesteps", "400"], tmp_path / "a")
    # stops after critic update 133, so the resumed run's first update (134) is an actor step
    run([*common, "--total-timesteps", "233", "--checkpoint-freq", "1000"], tmp_path / "b")
    checkpoint = os.path.join(only_run_dir(tmp_path / "b"), "checkpoint.pt")
    saved = load(checkpoint)
    assert saved["global_step"] == 233 and saved["agent"]["critic_updates"] == 133
    assert len(saved["env"]["actions"]) > 0  # stops mid-episode: the env is replayed on resume
    proc = run([*common, "--total-timesteps", "400", "--resume", checkpoint], tmp_path / "b")
    assert "resumed" in proc.stdout
    a = load(os.path.join(only_run_dir(tmp_path / "a"), "hyper_td3.cleanrl_model"))
    b = load(os.path.join(only_run_dir(tmp_path / "b"), "hyper_td3.cleanrl_model"))
    for net in NETS:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"


def test_resume_refuses_different_settings(tmp_path):
    short = ["--env-id", "InvertedPendulum-v4", "--critic", "mlp-small", "--learning-starts", "20", "--batch-size", "16",
             "--eval-freq", "0"]  # fmt: skip
    run([*short, "--total-timesteps", "30"], tmp_path)
    checkpoint = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")
    proc = run([*short, "--total-timesteps", "40", "--policy-frequency", "3", "--resume", checkpoint], tmp_path, check=False)
    assert proc.returncode != 0 and "--policy-frequency 2 (given 3)" in proc.stderr


def test_truncation_stores_the_true_final_observation_and_termination_does_not_bootstrap(tmp_path):
    run(["--env-id", "tests.envs:CountingEnv-v0", "--critic", "mlp", "--total-timesteps", "40", "--learning-starts", "30",
         "--batch-size", "8", "--eval-freq", "0", "--checkpoint-freq", "40"], tmp_path)  # fmt: skip
    rb = replay_buffer(only_run_dir(tmp_path))
    t_next, parity, terminated = rb["next_obs"][:, 0], rb["next_obs"][:, 1], rb["terminations"][:, 0]
    assert rb["size"] == 40
    assert np.all(t_next > 0)  # never the reset observation
    np.testing.assert_array_equal(t_next, rb["obs"][:, 0] + 1)
    np.testing.assert_array_equal(terminated, (parity == 0) & (t_next == 3))  # even episodes end by termination
    assert np.any((parity == 1) & (t_next == 5))  # odd episodes were truncated at the time limit, kept non-terminal


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    proc = run(["--env-id", "tests.envs:NaNRewardEnv-v0", "--critic", "mlp", "--total-timesteps", "400", "--learning-starts", "100",
                "--batch-size", "16", "--eval-freq", "0", "--checkpoint-freq", "120"], tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "non-finite qf1_loss" in proc.stderr and "at step" in proc.stderr and "intact" in proc.stderr
    assert load(os.path.join(only_run_dir(tmp_path), "checkpoint.pt"))["global_step"] == 120


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "NoSuchEnv-v9"], "cannot make environment 'NoSuchEnv-v9'"),
        (["--env-id", "CartPole-v1"], "Discrete action space"),
        (["--batch-size", "512", "--buffer-size", "256"], "larger than --buffer-size"),
        (["--hyper-embedding-dim", "30"], "multiple of 4"),
        (["--hyper-embedding-norm", "-1"], "--hyper-embedding-norm must be positive"),
        (["--hyper-weight-scale", "0"], "--hyper-weight-scale must be positive"),
        (["--hyper-weight-scale", "nan"], "--hyper-weight-scale must be a finite number"),
        (["--total-timesteps", "0"], "--total-timesteps must be positive"),
        (["--policy-frequency", "0"], "--policy-frequency must be positive"),
        (["--noise-clip", "-0.5"], "--noise-clip must be >= 0"),
        (["--snapshot-freq", "1000"], "needs --save-model"),
        (["--resume", "missing.pt"], "cannot load missing.pt: no such file"),
        (["--eval-model", "missing.cleanrl_model"], "cannot load missing.cleanrl_model: no such file"),
    ],
)
def test_bad_input_gives_one_error_line_and_nonzero_exit(flags, message, tmp_path):
    proc = run(flags, tmp_path, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_unknown_critic_is_refused_with_the_valid_choices(tmp_path):
    proc = run(["--critic", "transformer"], tmp_path, check=False)
    assert proc.returncode != 0 and "sa-hyper" in proc.stderr and "Traceback" not in proc.stderr

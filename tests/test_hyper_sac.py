import glob
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hyper_sac
from hyper_sac import Actor, Args, HyperCritic, make_critic
from functools import partial

from tests.cli import (
    ROOT, assert_same_up_to_rounding, count_host_reads, for_loop_adam_twin, only_run_dir, run_script, scalar_tags
)

SCRIPT = os.path.join(ROOT, "hyper_sac.py")
CRITICS = ["sa-hyper", "as-hyper", "mlp", "mlp-small", "mlp-large", "resnet-features", "res35", "d2rl"]
TINY = ["--hyper-embedding-dim", "16", "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "50", "--mlp-large-width", "64",
        "--res35-blocks", "3"]  # fmt: skip


run = partial(run_script, SCRIPT)



# --- networks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("critic", CRITICS)
def test_every_critic_maps_a_batch_to_one_q_value_each(critic):
    args = Args(critic=critic, hyper_embedding_dim=16, hyper_dynamic_hidden=8)
    q = make_critic(args, 17, 6)
    assert q(torch.randn(5, 17), torch.rand(5, 6)).shape == (5, 1)


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


def test_sa_hyper_gradient_depends_on_state():
    torch.manual_seed(0)
    critic = HyperCritic(17, 6, meta_is_state=True, embedding_dim=64, blocks=2, dynamic_hidden=32)
    action = torch.rand(1, 6).repeat(8, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(torch.randn(8, 17), action).sum(), action)
    cos = F.cosine_similarity(grad[:, None], grad[None], dim=-1)
    # same action, 8 states: the action-gradients point in clearly different directions
    assert cos.masked_fill(torch.eye(8, dtype=torch.bool), 0).abs().max() < 0.95


def test_authors_init_reproduces_the_released_constants():
    torch.manual_seed(0)
    critic = make_critic(Args(critic="sa-hyper", hyper_init="authors", hyper_embedding_dim=64), 17, 6)
    first = critic.primary.net[0]
    assert first.weight.abs().max().item() <= 1 / math.sqrt(2 * 17)
    assert first.weight.abs().max().item() > 0.9 / math.sqrt(2 * 17)
    for head, bound in zip(critic.heads, (0.05, 0.008)):
        for fc in (head.weight, head.bias, head.gain):
            assert 0.9 * bound < fc.weight.abs().max().item() <= bound
            assert fc.bias.abs().max().item() == 0.0


# --- SAC pieces -------------------------------------------------------------------------------


class _LinearInAction(torch.nn.Module):
    """Q(s, a) = a . v(s) + offset: v is a fixed direction, or the state's first coordinates when None."""

    def __init__(self, direction=None, offset=0.0):
        super().__init__()
        self.direction, self.offset = direction, offset
        self.unused = torch.nn.Linear(1, 1)  # a parameter for frozen() to freeze

    def forward(self, obs, act):
        v = self.direction.expand_as(act) if self.direction is not None else obs[:, : act.shape[1]]
        return (act * v).sum(1, keepdim=True) + self.offset


def test_saturation_diagnostics_count_saturated_means_and_measure_gradient_agreement():
    torch.manual_seed(0)
    actor = Actor(4, 2, np.array([-1.0, -1.0]), np.array([1.0, 1.0]))
    obs = torch.randn(512, 4)
    with torch.no_grad():
        actor.fc_mean.weight.zero_()
        actor.fc_mean.bias.copy_(torch.tensor([5.0, 0.0]))  # first dimension saturated everywhere, second not
    same_way, per_state = _LinearInAction(torch.tensor([1.0, -1.0])), _LinearInAction()
    saturation, agreement = hyper_sac.actor_saturation_diagnostics(actor, same_way, same_way, obs)
    assert saturation == 0.5 and agreement == 1.0  # every state pushes every dimension the same way
    _, agreement = hyper_sac.actor_saturation_diagnostics(actor, per_state, per_state, obs)
    assert agreement < 0.15  # the direction is the state's: random signs
    # the gradient is that of min(Q1, Q2), the actor's objective: here Q2, 10 below Q1 everywhere
    _, agreement = hyper_sac.actor_saturation_diagnostics(actor, _LinearInAction(offset=10.0), same_way, obs)
    assert agreement == 1.0


def test_tanh_log_prob_matches_a_transformed_distribution():
    torch.manual_seed(0)
    low, high = np.array([-3.0, 0.0]), np.array([3.0, 2.0])  # scale (3, 1), bias (0, 1)
    actor = Actor(4, 2, low, high)
    obs = torch.randn(64, 4)
    action, log_prob, deterministic = actor.get_action(obs)
    mean, log_std = actor(obs)
    reference = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()),
        [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(actor.action_bias, actor.action_scale)],
    )
    torch.testing.assert_close(log_prob, reference.log_prob(action).sum(1, keepdim=True), atol=2e-3, rtol=1e-4)
    assert torch.all(action >= torch.tensor(low, dtype=torch.float32)) and torch.all(action <= torch.tensor(high, dtype=torch.float32))
    torch.testing.assert_close(deterministic, torch.tanh(mean) * actor.action_scale + actor.action_bias)


def test_log_std_stays_within_bounds():
    actor = Actor(4, 2, -np.ones(2), np.ones(2))
    _, log_std = actor(1e4 * torch.randn(256, 4))
    assert log_std.min() >= hyper_sac.LOG_STD_MIN and log_std.max() <= hyper_sac.LOG_STD_MAX


def test_td_target_bootstraps_unless_terminated():
    r = torch.tensor([[1.0], [1.0]])
    terminated = torch.tensor([[0.0], [1.0]])  # a truncated transition has terminated = 0
    q1, q2, logp = torch.tensor([[10.0], [10.0]]), torch.tensor([[8.0], [8.0]]), torch.tensor([[-1.0], [-1.0]])
    y = hyper_sac.soft_td_target(r, terminated, q1, q2, logp, alpha=0.5, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([[1.0 + 0.9 * (8.0 + 0.5)], [1.0]]))


def test_polyak_update_moves_targets_by_tau():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.1 * p + 0.9 * t for p, t in zip(online.parameters(), target.parameters())]
    hyper_sac.polyak_update(online, target, 0.1)
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t, e)


@pytest.mark.parametrize("critic", ["sa-hyper", "as-hyper", "mlp"])
def test_frozen_critic_actor_update_equals_the_naive_one(critic):
    torch.manual_seed(0)
    args = Args(critic=critic, hyper_embedding_dim=32, hyper_dynamic_hidden=16)
    actor, qf1, qf2 = Actor(17, 6, -np.ones(6), np.ones(6)), make_critic(args, 17, 6), make_critic(args, 17, 6)
    obs = torch.randn(32, 17)

    def actor_grads(freeze):
        actor.zero_grad()
        torch.manual_seed(1)
        pi, log_prob, _ = actor.get_action(obs)
        if freeze:
            with hyper_sac.frozen(qf1, qf2):
                q = torch.min(qf1(obs, pi), qf2(obs, pi))
        else:
            q = torch.min(qf1(obs, pi), qf2(obs, pi))
        (0.2 * log_prob - q).mean().backward()
        return [p.grad.clone() for p in actor.parameters()]

    naive = actor_grads(freeze=False)
    assert any(p.grad is not None for p in qf1.parameters())  # the naive loss did reach the critic
    qf1.zero_grad(set_to_none=True)
    qf2.zero_grad(set_to_none=True)
    fast = actor_grads(freeze=True)
    for a, b in zip(naive, fast):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in [*qf1.parameters(), *qf2.parameters()])
    assert all(p.requires_grad for p in qf1.parameters())  # restored after the block


@pytest.mark.parametrize("autotune", [True, False])
def test_an_update_reads_nothing_on_the_host_but_the_guards_two_checks_per_step(autotune, monkeypatch):
    """On a GPU every read on the host waits for the device: per optimizer step (critic, actor and, with autotune,
    alpha) one check of its losses and one of its weights, and nothing else (alpha stays a tensor)."""
    torch.manual_seed(0)
    agent = hyper_sac.SAC(Args(critic="mlp", autotune=autotune), 3, 2, -np.ones(2), np.ones(2), None, "cpu")
    batch = [torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.randn(8, 1), torch.randn(8, 3), torch.zeros(8, 1)]
    steps = 3 if autotune else 2
    reads = count_host_reads(monkeypatch, hyper_sac)
    checks = count_host_reads(monkeypatch, torch.distributions.distribution)  # argument validation reads the host
    for _ in range(2):
        reads.clear()
        agent.update(*batch)
        assert reads == {"tolist": steps, "__bool__": steps} and not checks


def test_fused_adam_steps_like_the_for_loop_adam_up_to_rounding():
    """The optimizers are PyTorch's fused Adam (docs/speed.md): five SA-Hyper updates with autotuned alpha end within
    float rounding of the same updates with the for-loop Adam."""
    torch.manual_seed(0)
    agent = hyper_sac.SAC(Args(critic="sa-hyper", hyper_embedding_dim=32, hyper_dynamic_hidden=16), 5, 2, -np.ones(2),
                          np.ones(2), None, "cpu")  # fmt: skip
    twin, start = for_loop_adam_twin(agent), [p.clone() for p in agent.qf1.parameters()]
    batch = [torch.randn(16, 5), torch.rand(16, 2) * 2 - 1, torch.randn(16, 1), torch.randn(16, 5), torch.zeros(16, 1)]
    for learner in (agent, twin):
        torch.manual_seed(1)
        for _ in range(5):
            learner.update(*batch)
    fused, for_loop = agent.state_dict(), twin.state_dict()
    for part in ("actor", "qf1", "qf2", "qf1_target", "qf2_target", "log_alpha"):
        assert_same_up_to_rounding(fused[part], for_loop[part])
    assert all(not torch.equal(a, b) for a, b in zip(start, agent.qf1.parameters()))  # every weight did move


def test_adam_falls_back_to_the_for_loop_adam_where_torch_has_no_fused_one(monkeypatch):
    def adam_without_fused(params, lr, fused=None):
        params = list(params)  # as torch.optim.Adam does, before it checks the devices
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return torch.optim.SGD(params, lr=lr)  # stands in for the for-loop Adam

    monkeypatch.setattr(hyper_sac.optim, "Adam", adam_without_fused)
    weight = torch.nn.Parameter(torch.zeros(2))
    assert isinstance(hyper_sac.adam(iter([weight]), lr=0.1), torch.optim.SGD)  # the parameters survive the retry


def small_sac(reuse=False):
    torch.manual_seed(0)
    args = Args(critic="sa-hyper", hyper_embedding_dim=32, hyper_dynamic_hidden=16, reuse_critic_weights=reuse)
    return hyper_sac.SAC(args, 5, 2, -np.ones(2), np.ones(2), None, "cpu")


def test_reusing_the_critics_weights_trains_the_actor_on_the_critics_from_before_their_step():
    """--reuse-critic-weights: the critic step is unchanged, and the actor step is the one the default update would
    take against critics that did not move (here: a critic learning rate of 0)."""
    batch = [torch.randn(16, 5), torch.rand(16, 2) * 2 - 1, torch.randn(16, 1), torch.randn(16, 5), torch.zeros(16, 1)]
    reuse, default, still_critics = small_sac(reuse=True), small_sac(), small_sac()  # one init: small_sac seeds torch
    still_critics.q_optimizer.param_groups[0]["lr"] = 0.0
    for agent in (reuse, default, still_critics):
        torch.manual_seed(1)
        agent.update(*batch)
    for name in ("qf1", "qf2", "qf1_target", "qf2_target"):
        for a, b in zip(getattr(reuse, name).parameters(), getattr(default, name).parameters()):
            assert torch.equal(a, b), name
    for a, b in zip(reuse.actor.parameters(), still_critics.actor.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert not all(torch.equal(a, b) for a, b in zip(reuse.actor.parameters(), default.actor.parameters()))


def test_reusing_the_critics_weights_runs_the_primary_networks_4_times_per_update_instead_of_6():
    batch = [torch.randn(16, 5), torch.rand(16, 2) * 2 - 1, torch.randn(16, 1), torch.randn(16, 5), torch.zeros(16, 1)]
    for reuse, expected in ((False, 6), (True, 4)):
        agent, calls = small_sac(reuse=reuse), []
        for qf in (agent.qf1, agent.qf2, agent.qf1_target, agent.qf2_target):
            qf.primary.register_forward_hook(lambda *_: calls.append(1))
        agent.update(*batch)
        assert len(calls) == expected


def test_reusing_the_critics_weights_needs_sa_hyper_critics():
    with pytest.raises(ValueError, match="SA-Hyper"):
        hyper_sac.SAC(Args(critic="mlp", reuse_critic_weights=True), 5, 2, -np.ones(2), np.ones(2), None, "cpu")


def test_a_checkpoint_from_before_reuse_critic_weights_resumes_without_it_only():
    saved = {k: v for k, v in vars(Args()).items() if k != "reuse_critic_weights"}  # written before the flag existed
    hyper_sac.check_resume_settings(saved, Args())
    with pytest.raises(SystemExit):
        hyper_sac.check_resume_settings(saved, Args(reuse_critic_weights=True))


def test_replay_buffer_round_trips_through_its_state_dict():
    rb = hyper_sac.ReplayBuffer(10, 2, 1, seed=0)
    for i in range(13):  # wraps around
        rb.add(np.full(2, i), np.full(2, i + 1), np.full(1, -i), float(i), i % 2 == 0)
    copy = hyper_sac.ReplayBuffer(10, 2, 1, seed=99)
    copy.load_state_dict(rb.state_dict())
    for a, b in zip(rb.sample(6, "cpu"), copy.sample(6, "cpu")):
        torch.testing.assert_close(a, b)
    obs, actions, rewards, next_obs, terms = rb.sample(50, "cpu")
    torch.testing.assert_close(next_obs, obs + 1)
    torch.testing.assert_close(actions[:, 0], -obs[:, 0])
    assert rb.size == 10 and rewards.min() >= 3  # the three oldest were overwritten


def test_save_file_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    hyper_sac.save_file({"step": 1}, path, kind="checkpoint")
    with pytest.raises(Exception):
        hyper_sac.save_file({"step": 2, "bad": lambda: None}, path, kind="checkpoint")  # lambdas cannot be pickled
    assert hyper_sac.load_file(path, kinds=("checkpoint",))["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


# --- end to end through the CLI ---------------------------------------------------------------

SMALL_RUN = ["--env-id", "InvertedPendulum-v4", "--total-timesteps", "300", "--learning-starts", "100", "--batch-size", "16",
             "--eval-freq", "250", "--eval-episodes", "1", "--checkpoint-freq", "200", "--progress-freq", "100", *TINY]  # fmt: skip


@pytest.mark.parametrize("critic", CRITICS)
def test_cli_run_crosses_learning_start_an_eval_and_a_checkpoint(critic, tmp_path):
    proc = run([*SMALL_RUN, "--critic", critic, "--save-model"], tmp_path)
    assert "steps/s" in proc.stdout and "ETA" in proc.stdout
    run_dir = only_run_dir(tmp_path)
    tags = scalar_tags(run_dir)
    for tag in ["charts/episodic_return", "charts/SPS", "losses/qf1_loss", "losses/qf2_values", "losses/actor_loss", "losses/alpha",
                "losses/alpha_loss", "eval/episodic_return", "charts/actor_saturation", "charts/action_grad_sign_agreement"]:  # fmt: skip
        assert tag in tags
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["global_step"] == 300
    if critic == "mlp":
        model = os.path.join(run_dir, "hyper_sac.cleanrl_model")
        proc = run(["--eval-model", model, "--eval-episodes", "2"], tmp_path)
        assert "InvertedPendulum-v4: 2 episodes, return" in proc.stdout


RESUME_RUN = ["--env-id", "InvertedPendulum-v4", "--learning-starts", "100", "--batch-size", "16", "--eval-freq", "150",
              "--eval-episodes", "1", "--save-model", *TINY]  # fmt: skip


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    common = [*RESUME_RUN, "--seed", "3"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run([*common, "--total-timesteps", "400"], tmp_path / "a")
    run([*common, "--total-timesteps", "233", "--checkpoint-freq", "1000"], tmp_path / "b")  # stops mid-episode
    checkpoint = os.path.join(only_run_dir(tmp_path / "b"), "checkpoint.pt")
    assert len(torch.load(checkpoint, weights_only=True)["env"]["actions"]) > 0  # the env is replayed on resume
    proc = run([*common, "--total-timesteps", "400", "--resume", checkpoint], tmp_path / "b")
    assert "resumed" in proc.stdout
    assert_same_models(tmp_path / "a", tmp_path / "b")


def assert_same_models(dir_a, dir_b):
    a = torch.load(os.path.join(only_run_dir(dir_a), "hyper_sac.cleanrl_model"), weights_only=True)
    b = torch.load(os.path.join(only_run_dir(dir_b), "hyper_sac.cleanrl_model"), weights_only=True)
    for net in ("actor", "qf1", "qf2"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"


def test_killed_run_resumes_exactly(tmp_path):
    common = [*RESUME_RUN, "--seed", "4"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run([*common, "--total-timesteps", "330"], tmp_path / "a")
    # a long run, killed with SIGKILL once its first periodic checkpoint (step 170) is on disk
    proc = subprocess.Popen([sys.executable, SCRIPT, "--num-threads", "1", *common, "--total-timesteps", "1000000", "--checkpoint-freq", "170"],
                            cwd=tmp_path / "b", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not glob.glob(str(tmp_path / "b" / "runs" / "*" / "checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    checkpoint = os.path.join(only_run_dir(tmp_path / "b"), "checkpoint.pt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 170
    run([*common, "--total-timesteps", "330", "--resume", checkpoint], tmp_path / "b")
    assert_same_models(tmp_path / "a", tmp_path / "b")


def test_resume_refuses_different_settings(tmp_path):
    run([*SMALL_RUN, "--critic", "mlp"], tmp_path)
    checkpoint = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")
    proc = run([*SMALL_RUN, "--critic", "d2rl", "--total-timesteps", "400", "--resume", checkpoint], tmp_path, check=False)
    assert proc.returncode != 0 and "--critic mlp (given d2rl)" in proc.stderr


def test_truncation_stores_the_true_final_observation_and_termination_does_not_bootstrap(tmp_path):
    run(["--env-id", "tests.envs:CountingEnv-v0", "--critic", "mlp", "--total-timesteps", "40", "--learning-starts", "30",
         "--batch-size", "8", "--eval-freq", "0", "--checkpoint-freq", "40"], tmp_path)  # fmt: skip
    saved = torch.load(os.path.join(only_run_dir(tmp_path), "checkpoint.pt"), weights_only=True)["replay_buffer"]
    rb = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
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
    assert torch.load(os.path.join(only_run_dir(tmp_path), "checkpoint.pt"), weights_only=True)["global_step"] == 120


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "NoSuchEnv-v9"], "cannot make environment 'NoSuchEnv-v9'"),
        (["--env-id", "CartPole-v1"], "Discrete action space"),
        (["--batch-size", "512", "--buffer-size", "256"], "larger than --buffer-size"),
        (["--hyper-embedding-dim", "30"], "multiple of 4"),
        (["--hyper-embedding-norm", "nan"], "--hyper-embedding-norm must be a finite number"),
        (["--hyper-weight-scale", "0"], "--hyper-weight-scale must be positive"),
        (["--hyper-weight-scale", "inf"], "--hyper-weight-scale must be a finite number"),
        (["--critic", "as-hyper", "--reuse-critic-weights"], "--reuse-critic-weights needs --critic sa-hyper"),
        (["--total-timesteps", "0"], "--total-timesteps must be positive"),
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

import glob
import importlib.util
import os
import signal
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

import grad_probe
from grad_probe import (
    Actor,
    Args,
    HyperCritic,
    critic_action_gradient,
    q_at_actions,
    cosine_similarity,
    get_sim_state,
    learnable_fraction,
    least_squares_gradient,
    rollout_returns,
    run_probe,
    sample_probe_states,
    set_sim_state,
)
from tests.envs_probe import WEIGHTS
from tests.cli import (
    ROOT, assert_same_up_to_rounding, count_host_reads, for_loop_adam_twin, progress_lines_on_a_fake_clock, run_script,
    scalar_tags
)

SCRIPT = os.path.join(ROOT, "grad_probe.py")
LINEAR_ENV = "tests.envs_probe:LinearRewardEnv-v0"
TINY = ["--hyper-embedding-dim", "16", "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "50"]


run = run_script


def results_of(cwd):
    """The results file of the only run in `cwd`, loaded without unpickling code; its format and digest checked."""
    (path,) = glob.glob(os.path.join(cwd, "runs", "*", "grad_probe.pt"))
    results = torch.load(path, weights_only=True)
    assert results["format"] == "grad_probe/2" and results["kind"] == "results"
    assert results.pop("sha256") == grad_probe.content_digest(results)
    return results, os.path.dirname(path)


class LinearQ(nn.Module):
    """Q(s, a) = w . a + c: a critic whose action-gradient is exactly w everywhere."""

    def __init__(self, w, c):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32))
        self.c = c

    def forward(self, obs, act):
        return (act @ self.w + self.c).unsqueeze(1)


def constant_actor(env, bias):
    """pi(s) = tanh(bias) * scale + offset for every s."""
    actor = Actor(env.observation_space.shape[0], env.action_space.shape[0], env.action_space.low, env.action_space.high)
    with torch.no_grad():
        actor.fc_mu.weight.zero_()
        actor.fc_mu.bias.copy_(torch.as_tensor(bias))
    return actor


# --- snapshots -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["Hopper-v4", "HalfCheetah-v4"])
def test_restored_snapshot_replays_the_same_rewards_exactly(env_id):
    env, other = gym.make(env_id), gym.make(env_id)
    env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(37):
        obs, *_ = env.step(env.action_space.sample())
    snapshot = get_sim_state(env)
    actions = [env.action_space.sample() for _ in range(60)]
    original = [env.unwrapped.step(a)[:2] for a in actions]

    other.reset(seed=123)  # a different episode: everything must come from the snapshot
    for _ in range(5):
        other.step(other.action_space.sample())
    restored_obs = set_sim_state(other, snapshot)
    replayed = [other.unwrapped.step(a)[:2] for a in actions]
    assert np.array_equal(restored_obs, obs)
    for (o1, r1), (o2, r2) in zip(original, replayed):
        assert r1 == r2 and np.array_equal(o1, o2)


def test_sampled_probe_states_restore_to_their_observations():
    envs = [gym.make("Hopper-v4") for _ in range(4)]
    actor = Actor(11, 3, envs[0].action_space.low, envs[0].action_space.high)
    snapshots, obs, episode_steps, steps = sample_probe_states(envs, actor, np.random.default_rng(0), 4, 300, 1000, "cpu")
    assert obs.shape == (4, 11) and episode_steps.shape == (4,)
    assert np.all((episode_steps >= 0) & (episode_steps < 1000))
    targets = np.random.default_rng(0).integers(0, 300, size=4)  # the sampler's first draw from the same seed
    assert steps == targets.sum()  # every step counts, also those of episodes that ended before the target
    assert np.any(episode_steps < targets)  # an untrained hopper falls, so some states lie in a restarted episode
    fresh = gym.make("Hopper-v4")
    fresh.reset(seed=7)
    for snapshot, o in zip(snapshots, obs):
        assert np.allclose(set_sim_state(fresh, snapshot), o, atol=1e-6)


# --- the estimator ---------------------------------------------------------------------------------------------
def test_least_squares_recovers_a_linear_gradient_exactly():
    rng = np.random.default_rng(0)
    g = torch.tensor([[1.5, -0.5, 2.0], [0.0, 3.0, -1.0]], dtype=torch.float64)
    delta = torch.as_tensor(rng.normal(0, 0.3, size=(2, 15, 3)))
    returns = 7.0 + (delta * g[:, None]).sum(-1)
    assert torch.allclose(least_squares_gradient(delta, returns), g, atol=1e-9)


def test_least_squares_slope_of_a_quadratic_is_its_gradient_at_the_centre():
    rng = np.random.default_rng(1)
    g = torch.tensor([1.0, -2.0, 0.5])
    hessian = torch.as_tensor(rng.normal(0, 0.5, size=(3, 3)), dtype=torch.float32)
    hessian = hessian + hessian.T
    delta = torch.as_tensor(rng.normal(0, 0.3, size=(1, 200, 3)), dtype=torch.float32)
    returns = 3.0 + delta @ g + 0.5 * torch.einsum("sni,ij,snj->sn", delta, hessian, delta)
    slope = least_squares_gradient(delta, returns)
    assert cosine_similarity(slope, g[None]).item() > 0.99


def test_least_squares_survives_a_dimension_clipped_for_every_sample():
    delta = torch.as_tensor(np.random.default_rng(2).normal(0, 0.3, size=(1, 15, 2)), dtype=torch.float32)
    delta[..., 1] = 0.0  # e.g. the policy action sits on a bound and every perturbation is clipped back to it
    slope = least_squares_gradient(delta, 2.0 * delta[..., 0])
    assert torch.allclose(slope, torch.tensor([[2.0, 0.0]]), atol=1e-5)


def test_cosine_similarity_edge_cases():
    a = torch.tensor([[1.0, 2.0], [1.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 4.0], [0.0, 5.0], [-0.3, -0.4], [1.0, 1.0], [0.0, 0.0], [1e-20, 0.0]])
    cos = cosine_similarity(a, b)
    assert torch.allclose(cos[:3], torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    assert torch.isnan(cos[3:]).all()  # a zero-norm gradient has no direction
    assert torch.allclose(cosine_similarity(a[:3] * 1e6, b[:3] * 1e-3), cos[:3])  # scale-free


def test_learnable_fraction_is_monotone_and_counts_undefined_states_as_not_learnable():
    cos = torch.tensor([0.9, 0.5, -0.2, float("nan"), 0.1])
    assert learnable_fraction(cos, [0.0, 0.4, 0.8]) == [0.6, 0.4, 0.2]
    random_cos = torch.as_tensor(np.random.default_rng(3).uniform(-1, 1, size=100))
    fractions = learnable_fraction(random_cos, np.linspace(-1, 1, 41))
    assert all(x >= y for x, y in zip(fractions, fractions[1:])) and fractions[0] == 1.0 and fractions[-1] == 0.0


def test_critic_action_gradient_matches_finite_differences_and_leaves_the_critic_alone():
    torch.manual_seed(0)
    critic = HyperCritic(5, 3, meta_is_state=True, embedding_dim=16, blocks=1, dynamic_hidden=8).double()
    obs, act = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    grad = critic_action_gradient(critic, obs, act)
    eps = 1e-6
    for k in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[k] = eps
        fd = (critic(obs, act + step) - critic(obs, act - step))[:, 0] / (2 * eps)
        assert torch.allclose(grad[:, k], fd, atol=1e-7)
    assert all(p.grad is None and p.requires_grad for p in critic.parameters())


@pytest.mark.parametrize("meta_is_state", [True, False])
def test_q_at_actions_equals_the_per_pair_forward_and_runs_the_primary_once_per_state(meta_is_state):
    torch.manual_seed(0)
    critic = HyperCritic(5, 3, meta_is_state=meta_is_state, embedding_dim=16, blocks=1, dynamic_hidden=8)
    obs, actions = torch.randn(4, 5), torch.randn(4, 7, 3)
    rows = []
    critic.primary.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    with torch.no_grad():
        q = q_at_actions(critic, obs, actions)
        expected = torch.stack([critic(obs[i].expand(7, -1), actions[i])[:, 0] for i in range(4)])
    assert torch.allclose(q, expected, atol=1e-6)
    assert rows[0] == (4 if meta_is_state else 28)  # SA-Hyper: one primary-network row per state, not per pair


# --- rollouts and the whole probe on an environment with a known return ----------------------------------------
@pytest.mark.parametrize("action_repeat", [1, 3])
def test_rollout_returns_match_the_closed_form_with_bootstrap(action_repeat):
    envs = [gym.make(LINEAR_ENV) for _ in range(3)]
    for env in envs:
        env.reset(seed=0)
    actor = constant_actor(envs[0], [0.3, -0.2])
    p = actor(torch.zeros(1, 2))[0].detach().double().numpy()
    first = np.array([[1.0, 0.5], [-2.0, 1.5], [0.0, 0.0]], dtype=np.float32)
    gamma, horizon = 0.9, 6
    returns, steps = rollout_returns(envs, np.array([4]), first, actor, LinearQ(WEIGHTS, 5.0), LinearQ(WEIGHTS, 3.0), horizon, action_repeat, gamma, "cpu")
    head = sum(gamma**t for t in range(action_repeat))
    tail = sum(gamma**t for t in range(action_repeat, horizon)) * (WEIGHTS @ p)
    bootstrap = gamma**horizon * (WEIGHTS @ p + 3.0)  # min of the two target critics
    expected = head * (first.astype(np.float64) @ WEIGHTS) + tail + bootstrap
    assert np.allclose(returns, expected, atol=1e-5)
    assert steps == 3 * horizon


def test_rollout_returns_do_not_bootstrap_after_termination():
    envs = [grad_probe.make_env(LINEAR_ENV) for _ in range(2)]
    for env in envs:
        env.unwrapped.terminate_at = 3
        env.reset(seed=0)
    actor = constant_actor(envs[0], [0.0, 0.0])
    p = actor(torch.zeros(1, 2))[0].detach().double().numpy()
    first = np.array([[1.0, 1.0], [2.0, 0.0]], dtype=np.float32)
    returns, steps = rollout_returns(envs, np.array([0]), first, actor, LinearQ(WEIGHTS, 100.0), LinearQ(WEIGHTS, 100.0), 10, 1, 0.5, "cpu")
    assert np.allclose(returns, first.astype(np.float64) @ WEIGHTS + (0.5 + 0.25) * (WEIGHTS @ p), atol=1e-6)
    assert steps == 2 * 3


@pytest.mark.parametrize("action_repeat", [1, 3])
def test_probe_recovers_the_known_true_gradient(action_repeat):
    args = Args(probe_states=4, probe_actions=8, probe_start_steps=5, action_repeat=action_repeat, gamma=0.9)
    envs = [grad_probe.make_env(LINEAR_ENV) for _ in range(8)]
    torch.manual_seed(0)
    actor = Actor(2, 2, envs[0].action_space.low, envs[0].action_space.high)
    qf1 = LinearQ(WEIGHTS, 0.0)
    probe = run_probe(envs, actor, qf1, LinearQ(WEIGHTS, 1.0), LinearQ(WEIGHTS, 2.0), args, np.random.default_rng(0), 10, "cpu")
    scale = sum(0.9**t for t in range(action_repeat))
    assert torch.allclose(probe["true_grad"], torch.as_tensor(scale * WEIGHTS, dtype=torch.float32).expand(4, 2), atol=1e-4)
    assert torch.allclose(probe["cos"], torch.ones(4))
    assert probe["actions"].shape == (4, 8, 2) and probe["returns"].shape == (4, 8) and probe["q_values"].shape == (4, 8)
    low, high = torch.tensor([-3.0, 0.0]), torch.tensor([3.0, 2.0])
    assert ((probe["actions"] >= low) & (probe["actions"] <= high)).all()
    assert torch.allclose(probe["actions"][:, 0], actor(probe["obs"]).detach())  # the first action is the policy's own
    assert probe["env_steps"] > 0


# --- the command line ------------------------------------------------------------------------------------------
def test_cli_trains_and_probes_all_three_critics_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run(SCRIPT, ["--env-id", LINEAR_ENV, "--total-timesteps", "400", "--learning-starts", "100", "--probe-freq", "200",
                 "--eval-freq", "200", "--eval-episodes", "2", "--probe-start-steps", "5", "--progress-freq", "200",
                 "--plot", "--save-model", *TINY], tmp_path)  # fmt: skip
    results, run_dir = results_of(tmp_path)
    assert [(p["critic"], p["step"]) for p in results["probes"]] == [(c, s) for c in ("sa-hyper", "as-hyper", "mlp") for s in (200, 400)]
    assert len(results["evals"]) == 6
    for p in results["probes"]:  # the environment's return is linear in the first action: the fit must find w exactly
        assert torch.allclose(p["true_grad"], torch.as_tensor(WEIGHTS, dtype=torch.float32).expand(15, 2), atol=1e-3)
        assert p["cos"].shape == (15,)
    for name in ("fig3_gradient_accuracy.png", "fig4_learning_curves.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0
    for critic in ("sa-hyper", "as-hyper", "mlp"):
        assert glob.glob(os.path.join(run_dir, critic, "events.out.tfevents.*"))
        assert os.path.exists(os.path.join(run_dir, critic, "grad_probe.cleanrl_model"))
    tags = scalar_tags(os.path.join(run_dir, "sa-hyper"))
    assert {"grad/cosine_similarity", "grad/learnable_states_tau_0", "grad/learnable_states_tau_0.8", "eval/episodic_return",
            "charts/episodic_return", "losses/qf1_loss", "charts/SPS"} <= tags  # fmt: skip

    replot = tmp_path / "replot"
    run(SCRIPT, ["--plot-from", os.path.join(run_dir, "grad_probe.pt"), "--plot-dir", str(replot)], tmp_path)
    assert os.path.exists(replot / "fig3_gradient_accuracy.png")


def test_probes_do_not_change_training(tmp_path):
    common = ["--env-id", LINEAR_ENV, "--critics", "mlp", "--total-timesteps", "300", "--learning-starts", "100",
              "--eval-freq", "0", "--probe-start-steps", "5", "--save-model"]  # fmt: skip
    models = []
    for probe_freq, sub in (("100", "with"), ("0", "without")):
        os.makedirs(tmp_path / sub)
        run(SCRIPT, [*common, "--probe-freq", probe_freq], tmp_path / sub)
        (path,) = glob.glob(str(tmp_path / sub / "runs" / "*" / "mlp" / "*.cleanrl_model"))
        models.append(torch.load(path, weights_only=True))
    for key in ("actor", "qf1", "qf2"):
        for name, value in models[0][key].items():
            assert torch.equal(value, models[1][key][name]), f"{key}.{name}"


@pytest.fixture(scope="module")
def td3_snapshots(tmp_path_factory):
    """The snapshots directory of a tiny hyper_td3.py run (sa-hyper, steps 100, 200, 300)."""
    cwd = tmp_path_factory.mktemp("td3")
    run(os.path.join(ROOT, "hyper_td3.py"), ["--env-id", LINEAR_ENV, "--critic", "sa-hyper", "--total-timesteps", "300",
        "--learning-starts", "100", "--eval-freq", "0", "--checkpoint-freq", "0", "--save-model", "--snapshot-freq", "100", *TINY], cwd)  # fmt: skip
    (snapshot_dir,) = glob.glob(str(cwd / "runs" / "*" / "snapshots"))
    return snapshot_dir


@pytest.fixture(scope="module")
def snapshot_probe(td3_snapshots, tmp_path_factory):
    """(process, cwd) of grad_probe.py --snapshots on those snapshots."""
    cwd = tmp_path_factory.mktemp("probe")
    return run(SCRIPT, ["--snapshots", td3_snapshots, "--probe-start-steps", "5"], cwd), cwd


def test_cli_probes_hyper_td3_snapshots(snapshot_probe):
    proc, cwd = snapshot_probe
    results, _ = results_of(cwd)
    assert [(p["critic"], p["step"]) for p in results["probes"]] == [("sa-hyper", 100), ("sa-hyper", 200), ("sa-hyper", 300)]
    assert results["env_id"] == LINEAR_ENV
    for p in results["probes"]:
        assert torch.allclose(p["true_grad"], torch.as_tensor(WEIGHTS, dtype=torch.float32).expand(15, 2), atol=1e-3)
    assert "step 300 | CS" in proc.stdout


def test_cli_probes_a_mujoco_env(tmp_path):
    run(SCRIPT, ["--env-id", "Hopper-v4", "--critics", "mlp", "--total-timesteps", "300", "--learning-starts", "100",
                 "--probe-freq", "300", "--eval-freq", "0", "--probe-start-steps", "30", "--probe-states", "3"], tmp_path)  # fmt: skip
    results, _ = results_of(tmp_path)
    (probe,) = results["probes"]
    assert probe["true_grad"].shape == (3, 3) and torch.isfinite(probe["returns"]).all()
    assert probe["env_steps"] >= 3 * 15  # every perturbed action was rolled out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--env-id", "CartPole-v1"], "Discrete action space"),
        (["--env-id", "Pendulum-v1"], "not a MuJoCo environment"),
        (["--env-id", "NoSuchEnv-v0"], "cannot make environment"),
        (["--env-id", LINEAR_ENV, "--probe-actions", "3"], "too few"),
        (["--probe-sigma", "0"], "nothing to fit"),
        (["--snapshots", "does/not/exist"], "no such file"),
        (["--plot-from", os.path.join(ROOT, "pyproject.toml")], "cannot load"),
    ],
)
def test_bad_input_gives_one_error_line(tmp_path, extra, message):
    proc = run(SCRIPT, extra, tmp_path, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr


# --- run infrastructure: safe files, unique run directories, the guard, Ctrl-C, one error line ------------------
class _Payload:
    """Unpickling it would create a marker file: a stand-in for code hidden in a downloaded file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def last_error_line(proc):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flag, name, file_format", [("--snapshots", "evil.cleanrl_model", "hyper_td3/2"),
                                                     ("--plot-from", "evil.pt", "grad_probe/2")])  # fmt: skip
def test_a_malicious_file_runs_nothing_and_gets_one_error_line(tmp_path, flag, name, file_format):
    marker = tmp_path / "pwned"
    torch.save({"format": file_format, "args": {"env_id": LINEAR_ENV}, "actor": _Payload(str(marker))}, tmp_path / name)
    proc = run(SCRIPT, [flag, name], tmp_path, check=False)
    assert not marker.exists()
    assert last_error_line(proc).startswith(f"error: cannot load {name}")


@pytest.mark.parametrize("kind, message", [("random", "not a model file written by"), ("older", "older version"),
                                           ("corrupted", "corrupted")])  # fmt: skip
def test_snapshots_refuse_random_older_and_corrupted_files(td3_snapshots, tmp_path, kind, message):
    model = torch.load(os.path.join(td3_snapshots, "step_300.cleanrl_model"), weights_only=True)
    path = tmp_path / f"{kind}.cleanrl_model"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "older":  # hyper_td3.py's model before files carried a format and a digest
        torch.save({k: v for k, v in model.items() if k not in ("format", "kind", "sha256")}, path)
    else:
        model["qf1"]["primary.net.0.weight"][0, 0] += 1.0  # one weight changed, the stored digest kept
        torch.save(model, path)
    proc = run(SCRIPT, ["--snapshots", str(path), "--probe-start-steps", "5"], tmp_path, check=False)
    assert message in last_error_line(proc)
    assert not os.path.exists(tmp_path / "runs")


def test_plot_from_refuses_a_corrupted_results_file(snapshot_probe, tmp_path):
    results = torch.load(glob.glob(str(snapshot_probe[1] / "runs" / "*" / "grad_probe.pt"))[0], weights_only=True)
    results["probes"][0]["cos"][0] = 1.0  # one number changed, the stored digest kept
    torch.save(results, tmp_path / "corrupted.pt")
    proc = run(SCRIPT, ["--plot-from", "corrupted.pt"], tmp_path, check=False)
    assert "corrupted" in last_error_line(proc)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grad_probe.time, "time", lambda: 1700000000.0)
    args = Args(env_id=LINEAR_ENV, critics=("mlp",))
    names = [grad_probe.make_run_dir(args, args.env_id)[0] for _ in range(3)]
    assert len(set(names)) == 3 and all(os.path.isdir(os.path.join("runs", name)) for name in names)
    assert all("__mlp__" in name for name in names)  # the run name says which critics


def test_the_guard_stops_on_weights_that_a_step_made_non_finite():
    weight = torch.nn.Parameter(torch.tensor([3.3e38]))
    optimizer = torch.optim.Adam([weight], lr=3e37)
    loss = -weight.sum()  # finite, and its step pushes the weight past the largest float32 (3.4e38)
    with pytest.raises(grad_probe.NonFinite, match="non-finite weights after the critic step"):
        grad_probe.guarded_step(optimizer, loss, "critic", qf1_loss=loss)
    with pytest.raises(grad_probe.NonFinite, match="non-finite qf1_loss"):
        grad_probe.guarded_step(optimizer, loss, "critic", qf1_loss=torch.tensor(float("nan")))


def test_a_critic_step_that_makes_the_weights_non_finite_stops_the_same_update():
    args = Args(env_id=LINEAR_ENV, batch_size=4)
    agent = grad_probe.TD3(args, "mlp", 2, 2, np.array([-3.0, 0.0]), np.array([3.0, 2.0]), None, "cpu")
    step = agent.q_optimizer.step

    def overflowing_step():  # stands in for a step too large for float32; the loss before it is finite
        step()
        with torch.no_grad():
            agent.qf2.net[0].weight[0, 0] = float("inf")

    agent.q_optimizer.step = overflowing_step
    batch = [torch.zeros(4, 2), torch.ones(4, 2), torch.ones(4, 1), torch.zeros(4, 2), torch.zeros(4, 1)]
    with pytest.raises(grad_probe.NonFinite, match="non-finite weights after the critic step"):
        agent.update(*batch)


def test_an_update_reads_nothing_on_the_host_but_the_guards_two_checks_per_step(monkeypatch):
    """On a GPU every read on the host waits for the device: per optimizer step (critic, and actor every
    --policy-frequency updates) one check of its losses and one of its weights, and nothing else (the actor loss
    stays a tensor until it is logged)."""
    args = Args(env_id=LINEAR_ENV, batch_size=4, policy_frequency=2)
    agent = grad_probe.TD3(args, "mlp", 2, 2, np.array([-3.0, 0.0]), np.array([3.0, 2.0]), None, "cpu")
    batch = [torch.zeros(4, 2), torch.ones(4, 2), torch.ones(4, 1), torch.zeros(4, 2), torch.zeros(4, 1)]
    reads = count_host_reads(monkeypatch, grad_probe)
    for steps in (1, 2, 1, 2):  # critic only, then critic and actor
        reads.clear()
        agent.update(*batch)
        assert reads == {"tolist": steps, "__bool__": steps}


def test_fused_adam_steps_like_the_for_loop_adam_up_to_rounding():
    """The optimizers are PyTorch's fused Adam (docs/speed.md): six SA-Hyper updates (three actor steps) end within
    float rounding of the same updates with the for-loop Adam."""
    args = Args(env_id=LINEAR_ENV, batch_size=4, policy_frequency=2, hyper_embedding_dim=32, hyper_dynamic_hidden=16)
    torch.manual_seed(0)
    agent = grad_probe.TD3(args, "sa-hyper", 2, 2, np.array([-3.0, 0.0]), np.array([3.0, 2.0]), None, "cpu")
    twin, start = for_loop_adam_twin(agent), [p.clone() for p in agent.actor.parameters()]
    batch = [torch.randn(4, 2), torch.rand(4, 2), torch.randn(4, 1), torch.randn(4, 2), torch.zeros(4, 1)]
    for learner in (agent, twin):
        torch.manual_seed(1)
        for _ in range(6):
            learner.update(*batch)
    assert_same_up_to_rounding(agent.models(), twin.models())
    assert all(not torch.equal(a, b) for a, b in zip(start, agent.actor.parameters()))  # every weight did move


def test_a_diverging_run_stops_with_one_error_line_and_keeps_the_results(tmp_path):
    proc = run(SCRIPT, ["--env-id", LINEAR_ENV, "--critics", "mlp", "--total-timesteps", "300", "--learning-starts", "100",
                        "--probe-freq", "100", "--eval-freq", "0", "--probe-start-steps", "5", "--q-lr", "1e30"],
               tmp_path, check=False)  # fmt: skip
    last = last_error_line(proc)
    assert "mlp: non-finite" in last and "the results of earlier probes are kept in runs/" in last
    results, _ = results_of(tmp_path)
    assert [p["step"] for p in results["probes"]] == [100]


def test_ctrl_c_stops_at_the_end_of_a_step_and_keeps_the_results(tmp_path):
    args = [sys.executable, SCRIPT, "--num-threads", "1", "--env-id", LINEAR_ENV, "--critics", "mlp", "as-hyper",
            "--total-timesteps", "100000", "--learning-starts", "100", "--probe-freq", "50", "--eval-freq", "0",
            "--probe-start-steps", "5", "--progress-freq", "10", *TINY]  # fmt: skip
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("mlp step 120/"):
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "kept in runs/" in last and "--critics mlp as-hyper" in last
    results, _ = results_of(tmp_path)
    assert [p["step"] for p in results["probes"]][:2] == [50, 100]


def error_line_of(call, capsys):
    """The one line `call` prints before exiting with status 1."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"seed": -1}, "--seed must be >= 0"),
        ({"probe_sigma": float("nan")}, "--probe-sigma must be a finite number"),
        ({"policy_lr": float("inf")}, "--policy-lr must be a finite number"),
        ({"q_lr": 1e38}, "--q-lr must be below 3.4e37"),
        ({"hyper_weight_scale": 0.0}, "--hyper-weight-scale must be positive"),
        ({"hyper_weight_scale": float("inf")}, "--hyper-weight-scale must be a finite number"),
        ({"exp_name": "a/b"}, "--exp-name must be a plain name"),
    ],
)
def test_more_bad_flags_give_one_error_line(settings, message, capsys):
    assert message in error_line_of(lambda: grad_probe.check_args(Args(**settings)), capsys)


def test_plot_without_matplotlib_fails_before_training(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    for settings in ({"plot": True}, {"plot_from": ("results.pt",)}):
        assert "need matplotlib" in error_line_of(lambda: grad_probe.check_args(Args(**settings)), capsys)


def test_sizes_beyond_memory_give_one_error_line_before_any_run_directory(tmp_path, capsys):
    proc = run(SCRIPT, ["--env-id", LINEAR_ENV, "--critics", "mlp", "--buffer-size", str(10**12)], tmp_path, check=False)
    assert "GiB for the replay buffer" in last_error_line(proc)
    assert not os.path.exists(tmp_path / "runs")
    check = lambda: grad_probe.check_memory(Args(probe_states=10**9), gym.make("Hopper-v4"), replay_buffer=False)
    assert "GiB for the probe's environments" in error_line_of(check, capsys)


def test_runs_being_a_file_gives_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a directory")
    make = lambda: grad_probe.make_run_dir(Args(env_id=LINEAR_ENV), LINEAR_ENV)
    assert "cannot create the run directory" in error_line_of(make, capsys)


def test_exp_name_default_does_not_depend_on_the_file_name(tmp_path):
    copy = tmp_path / "renamed_probe.py"
    copy.write_text(open(SCRIPT).read())
    spec = importlib.util.spec_from_file_location("renamed_probe", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.Args().exp_name == "grad_probe"


def test_cli_probes_a_v5_env(tmp_path):
    proc = run(SCRIPT, ["--env-id", "Hopper-v5", "--critics", "mlp", "--total-timesteps", "300", "--learning-starts", "100",
                        "--probe-freq", "300", "--eval-freq", "0", "--probe-start-steps", "30", "--probe-states", "3",
                        "--progress-freq", "100"], tmp_path)  # fmt: skip
    results, _ = results_of(tmp_path)
    (probe,) = results["probes"]
    assert probe["true_grad"].shape == (3, 3) and torch.isfinite(probe["returns"]).all()
    assert "mlp step 100/300" in proc.stdout and "ETA after learning starts" in proc.stdout
    assert proc.stderr == ""


def test_the_first_eta_after_learning_starts_comes_from_the_learning_rate(monkeypatch, capsys):
    """The training loop's calls to Progress, with learning starting between two progress lines, on a clock where a
    random step takes 1 ms and a learning step 0.5 s."""
    progress = grad_probe.Progress("mlp", 10_000, 0, 5500)
    lines = progress_lines_on_a_fake_clock(grad_probe, progress, monkeypatch, capsys)
    assert all("ETA after learning starts" in line for line in lines[:5])  # steps 1000, ..., 5000
    assert "mlp step 6000/10000 | 2.0 steps/s | ETA 33m20s" in lines[5]  # 4000 steps at 0.5 s

"""Smoke tests of the measurement scripts in benchmarks/ whose numbers the docs quote, at tiny sizes. Each runs the
script's CLI and main in this process (a subprocess would spend most of its time importing torch and MuJoCo)."""

import glob
import importlib.util
import math
import os
import re
import shlex
import sys

import numpy as np
import pytest
import torch
import tyro

import hyper_pearl
from tests.cli import ROOT, run_script

TINY_PEARL = ["--transitions", "300", "--steps", "1", "2", "--batch-size", "16", "--embedding-batch-size", "32",
              "--probe-z", "4", "--probe-states", "4", "--probe-actions", "4", "--hyper-embedding-dim", "16",
              "--hyper-blocks", "1", "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "64"]  # fmt: skip
TINY_MAML = ["--meta-batch-size", "2", "--fast-batch-size", "2", "--hyper-embedding-dim", "16", "--hyper-blocks", "1",
             "--hyper-dynamic-hidden", "8", "--hidden-sizes", "8", "8"]  # fmt: skip


TINY_ROOFLINE = ["--threads", "1", "--repeats", "1", "--warmup", "0", "--peak-size", "64", "--peak-repeats", "2",
                 "--hyper-embedding-dim", "16", "--hyper-blocks", "1", "--hyper-dynamic-hidden", "8", "--batch-size", "8",
                 "--pearl-meta-batch", "2", "--pearl-context", "8", "--maml-meta-batch", "2", "--maml-episodes", "2",
                 "--maml-episode-length", "10"]  # fmt: skip


def load_benchmark(name: str):
    """benchmarks/{name}.py as a module (its main does not run)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, argv: list, capsys) -> str:
    """python benchmarks/{name}.py *argv, in this process; returns its stdout."""
    module = load_benchmark(name)
    capsys.readouterr()
    module.main(tyro.cli(module.Bench, args=argv))
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def restore_balance_input_scale(monkeypatch):
    """--no-input-scaling replaces hyper_pearl.balance_input_scale; put it back after each test."""
    monkeypatch.setattr(hyper_pearl, "balance_input_scale", hyper_pearl.balance_input_scale)


def saturation_rows(stdout: str) -> dict:
    """steps -> (saturated at prior z %, at posterior z %, mean log-std at prior z) from the table rows."""
    rows = re.findall(r"^(\d+) \| ([\d.]+)% \| ([\d.]+)% \| (-?[\d.]+)$", stdout, re.MULTILINE)
    return {int(steps): tuple(float(v) for v in values) for steps, *values in rows}


def test_pearl_init_stats_reports_init_and_saturation_rows(capsys):
    for flags, embedding in [(["--model", "mlp"], False), (["--model", "hyper", "--no-input-scaling"], True)]:
        out = run_benchmark("pearl_init_stats", [*TINY_PEARL, *flags], capsys)
        at_init = re.search(r"^at init: Q spread over actions (\S+) \| mean \|Q\(s, 0, 0\)\| (\S+) \| "
                            r"policy embedding norm prior / posterior z (.+)$", out, re.MULTILINE)  # fmt: skip
        assert at_init, out
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in at_init.groups()[:2])
        assert (at_init.group(3) != "-") == embedding
        assert "steps | saturated at prior z | saturated at posterior z | mean log-std at prior z" in out
        rows = saturation_rows(out)
        assert sorted(rows) == [0, 1, 2], out
        if not embedding:  # PEARL's policy heads start at U(+-1e-3): nothing is saturated at init
            assert rows[0][:2] == (0.0, 0.0)
        steps = table_rows(out, "steps | policy's first layer weights | policy's pre-tanh mean (absolute: rms of the "
                                "change) | Q1's first layer weights")  # fmt: skip
        assert sorted(steps) == ["1-1", "2-2"], out
        assert all(0 < float(v) < math.inf for row in steps.values() for v in row), out
        if not embedding:  # Adam's first step moves every weight by the lr (3e-4); the layers are U(+-1/sqrt(300)),
            # rms 1/30, so the first step's relative change of the policy's and Q1's first layers is 3e-4 * 30
            assert float(steps["1-1"][0]) == pytest.approx(9e-3, rel=0.03)
            assert float(steps["1-1"][2]) == pytest.approx(9e-3, rel=0.03)


def test_pearl_init_stats_step_change_is_the_rms_change_relative_or_absolute():
    module = load_benchmark("pearl_init_stats")
    before = torch.tensor([[3.0, -4.0], [0.0, 0.0]])  # rms 2.5
    after = before + torch.tensor([[1.0, 1.0], [-1.0, 1.0]])  # change of rms 1
    assert module.step_change(before, after, relative=False) == pytest.approx(1.0)
    assert module.step_change(before, after, relative=True) == pytest.approx(0.4)


def test_pearl_init_stats_earlier_mlp_bounds_at_init_only(capsys):
    out = run_benchmark("pearl_init_stats", [*TINY_PEARL, "--model", "mlp", "--earlier-mlp-bounds", "--steps"], capsys)
    assert "mlp, earlier input-width bounds" in out
    assert sorted(saturation_rows(out)) == [0]


def test_maml_inner_kl_reports_the_step_and_its_parts(capsys):
    out = run_benchmark("maml_inner_kl", [*TINY_MAML, "--policy", "hyper", "--trpo"], capsys)
    value = {key: float(v) for key, v in re.findall(r"^([A-Za-z |-]+): (\S+)(?: \(| +\[)", out, re.MULTILINE)}
    for key in ("inner KL", "primary only", "heads only", "log-std only", "mean |mu| before", "vanilla mean |mu|"):
        assert key in value, out
    assert 0 < value["inner KL"] < math.inf
    assert value["heads only"] > value["primary only"] > 0  # the heads carry the step
    assert re.search(r"^TRPO step: line-search steps -?\d+, mean KL \S+, \|theta change\| \S+", out, re.MULTILINE)
    out = run_benchmark("maml_inner_kl", [*TINY_MAML, "--policy", "vanilla"], capsys)
    assert "primary only" not in out and re.search(r"^mean \|mu\| / vanilla's on the same states: 1$", out, re.M)


def table_rows(stdout: str, header: str) -> dict:
    """The rows under the table header line `header`, up to the next blank line: first column -> the other columns."""
    lines = stdout.split(header + "\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {row.split(" | ")[0]: row.split(" | ")[1:] for row in lines}


def test_roofline_prints_a_row_per_update(capsys):
    out = run_benchmark("roofline", TINY_ROOFLINE, capsys)
    updates = ["sac", "sac_reuse", "sac_mlp", "td3", "grad_probe", "pearl", "maml"]
    roofline = table_rows(out, "update | threads | GFLOP | ms | GFLOP/s | peak GFLOP/s | time / roofline")
    breakdown = table_rows(out, "update | threads | matmul ms | matmul GFLOP/s | Adam ms | Polyak ms | other ms | "
                                "page faults | system ms")
    assert list(roofline) == updates and list(breakdown) == updates, out
    for name in updates:
        threads, *values = roofline[name]
        assert threads == "1" and all(float(v) > 0 and math.isfinite(float(v)) for v in values), roofline[name]
        gflop, ms, _, peak, ratio = map(float, values)
        assert ratio == pytest.approx(ms / 1000 / (gflop / peak), rel=0.02)  # time / roofline time
        matmul_ms, _, adam_ms, polyak_ms, _, faults, system_ms = map(float, breakdown[name][1:])
        assert matmul_ms > 0 and (adam_ms > 0) == (name != "maml") and polyak_ms >= 0  # MAML: TRPO, no Adam
        assert faults >= 0 and system_ms >= 0
    for name in ("sac", "sac_reuse", "td3", "grad_probe"):  # the hand formula agrees with FlopCounterMode
        assert re.search(rf"^{name}: .* hand formula \S+ \(x1\.0000\)$", out, re.MULTILINE), out
    assert re.search(r"^maml: .*(line search accepted step \d+|no step taken)", out, re.MULTILINE), out


def test_roofline_ratio_is_the_median_of_each_steps_time_over_its_own_peaks_roofline_time():
    roofline = load_benchmark("roofline")
    # 2 GFLOP per step at peaks 4 and 1 GFLOP/s: roofline times 0.5 and 2 s, so steps of 1 and 4 s are both 2x
    assert roofline.roofline_ratio([1.0, 4.0], [4.0, 1.0], 2e9) == pytest.approx(2.0)
    # not the ratio of the medians (2.5 s at 2.5 GFLOP/s: 3.125), nor the steps paired with the other peaks (4.25)
    assert roofline.roofline_ratio([1.0, 4.0], [1.0, 4.0], 2e9) == pytest.approx(4.25)


@pytest.mark.parametrize("embedding_dim, blocks, hidden, batch", [(16, 1, 8, 8), (128, 2, 32, 5)])
def test_roofline_hand_flops_match_flop_counter(embedding_dim, blocks, hidden, batch):
    roofline = load_benchmark("roofline")
    bench = roofline.Bench(hyper_embedding_dim=embedding_dim, hyper_blocks=blocks, hyper_dynamic_hidden=hidden,
                           batch_size=batch)  # fmt: skip
    for name in ("sac", "sac_reuse", "td3", "grad_probe"):
        workload = roofline.BUILDERS[name](bench)
        assert workload.hand_flops == pytest.approx(roofline.counted_flops(workload), rel=1e-3), name


def test_roofline_times_commands_in_alternating_pairs(capsys):
    quick = shlex.join([sys.executable, "-c", "pass"])
    slow = shlex.join([sys.executable, "-c", "import time; time.sleep(0.5)"])
    out = run_benchmark("roofline", ["--only", "--ours-cmd", quick, "--baseline-cmd", slow, "--pairs", "2"], capsys)
    runs = re.findall(r"^pair (\d): (ours|baseline) [\d.]+ s$", out, re.MULTILINE)
    assert runs == [("1", "ours"), ("1", "baseline"), ("2", "baseline"), ("2", "ours")], out
    assert float(re.search(r"baseline / ours (\S+)$", out, re.MULTILINE).group(1)) > 1
    failing = shlex.join([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match="exited with 3"):
        run_benchmark("roofline", ["--only", "--ours-cmd", quick, "--baseline-cmd", failing, "--pairs", "1"], capsys)


def test_critic_bias_returns_to_go_per_episode():
    """Two episodes: one terminated (exact return-to-go), one cut by a time limit (next state not the following
    state; not exact), then an unfinished one at the end of the buffer."""
    critic_bias = load_benchmark("critic_bias")
    obs = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]], dtype=np.float32)
    next_obs = np.array([[1.0], [2.0], [3.0], [11.0], [12.0], [21.0]], dtype=np.float32)
    rb = {"obs": obs, "next_obs": next_obs, "rewards": np.array([[1.0], [2.0], [4.0], [1.0], [1.0], [5.0]]),
          "terminations": np.array([[0.0], [0.0], [1.0], [0.0], [0.0], [0.0]])}  # fmt: skip
    g, exact = critic_bias.returns_to_go(rb, gamma=0.5)
    np.testing.assert_allclose(g, [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4, 1 + 0.5 * 1, 1, 5])
    assert exact.tolist() == [True, True, True, False, False, False]


def test_critic_bias_off_data_moves_each_state_k_times_as_far_from_the_mean():
    critic_bias = load_benchmark("critic_bias")
    obs, actions = torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([[10.0], [-1.0]])  # mean state (1, 2)
    q = lambda s, a: (s.sum(1, keepdim=True) * a)  # noqa: E731
    # k = 3: states (1, 2) + 3 (-1, -1) = (-2, -1) and (1, 2) + 3 (1, 1) = (4, 5); Q = -3 * 10, 9 * -1
    assert critic_bias.off_data_max_abs_q(q, obs, actions, 3.0) == pytest.approx(30.0)
    assert critic_bias.off_data_max_abs_q(q, obs, actions, 1.0) == pytest.approx(10.0)  # the data: (0 + 1) * 10


@pytest.mark.parametrize("script", ["hyper_sac.py", "hyper_td3.py"])
def test_critic_bias_reads_a_checkpoint(script, tmp_path, capsys):
    run_script(os.path.join(ROOT, script), ["--env-id", "Hopper-v4", "--total-timesteps", "400", "--learning-starts",
               "200", "--batch-size", "16", "--eval-freq", "0", "--hyper-embedding-dim", "16",
               "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "50", "--checkpoint-freq", "400"], tmp_path)  # fmt: skip
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    out = run_benchmark("critic_bias", [checkpoint, "--range-states", "4", "--action-samples", "3"], capsys)
    assert re.search(r"step 400, \d+ transitions \| MC .* bias .* Q\(s, pi\) - Q\(s, a\) .* range .* \|Q1 - Q2\|", out)
    assert re.search(r"max \|Q1\| on the data \S+, at 2x off it \S+", out)


def test_critic_bias_refuses_a_foreign_file(tmp_path, capsys):
    path = str(tmp_path / "other.pt")
    torch.save({"format": "something_else/1", "weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit, match="not a checkpoint of hyper_sac.py or hyper_td3.py"):
        run_benchmark("critic_bias", [path], capsys)


TINY_TWIN = ["--hyper-embedding-dim", "16", "--hyper-blocks", "1", "--hyper-dynamic-hidden", "8", "--batch-size", "8"]


def twin_setup(twin, argv: list) -> tuple:
    """twin_critics.build at tiny sizes, every weight then moved by noise: the init's zero head biases and gains
    would hide a variant that drops or swaps them."""
    _, critics, obs, act = twin.build(tyro.cli(twin.Bench, args=argv))
    with torch.no_grad():
        for p in (p for q in critics for p in q.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    return critics, obs, act


@pytest.mark.parametrize("critic", ["sa-hyper", "mlp"])
def test_twin_critics_stacked_network_computes_both_critics(critic):
    """The stacked module's k-th slice is critic k: its values, and the gradients of its weight slices."""
    twin = load_benchmark("twin_critics")
    critics, obs, act = twin_setup(twin, ["--critic", critic, *TINY_TWIN])
    for in_out in (False, True):
        stacked = twin.stack_critics(critics, in_out)
        values = twin.stacked_values(stacked, obs, act)
        values.sum().backward()
        for k, q in enumerate(critics):
            torch.testing.assert_close(values[k], q(obs, act), rtol=1e-5, atol=1e-6)
            q.zero_grad()
            q(obs, act).sum().backward()
            first = next(m for m in stacked.modules() if isinstance(m, twin.StackedLinear))
            grad = first.weight.grad[k].T if in_out else first.weight.grad[k]
            torch.testing.assert_close(grad, next(m for m in q.modules() if isinstance(m, torch.nn.Linear)).weight.grad)


def test_twin_critics_every_variant_matches_the_separate_critics(capsys):
    """Each variant's values and every weight gradient agree with the two separate critics' up to rounding, and the
    table has a row per variant at each thread count."""
    twin = load_benchmark("twin_critics")
    critics, obs, act = twin_setup(twin, TINY_TWIN)
    variants = twin.make_variants(critics)
    assert list(variants) == ["separate", "stacked (n, out, in)", "stacked (n, in, out)", "fused heads",
                              "stacked (n, in, out) + fused heads"]  # fmt: skip
    for name, (dq, dg) in twin.differences(variants, obs, act).items():
        assert dq < 1e-5 and dg < 1e-5, name
    argv = [*TINY_TWIN, "--threads", "1", "2", "--repeats", "1", "--warmup", "0", "--profile"]
    out = run_benchmark("twin_critics", argv, capsys)
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| \S+ \| \S+ \|$", out, re.MULTILINE)
    assert [name for name, *_ in rows] == list(variants) * 2, out
    profiled = [line.split(": ", 1) for line in out.splitlines() if line.split(": ", 1)[0] in variants]
    assert [name for name, _ in profiled] == list(variants) * 2, out  # a line of top ops per variant and thread count
    assert all(re.fullmatch(r"(\S+ [\d.]+, )*\S.* [\d.]+", ops) for _, ops in profiled), out
    assert all(float(ratio) == pytest.approx(float(ms) / float(rows[5 * (i // 5)][1]), rel=0.05)
               for i, (_, ms, ratio) in enumerate(rows)), out  # fmt: skip


TINY_PEARL_RUN = ["--env-id", "HalfCheetahVel", "--model", "mlp", "--num-iterations", "1", "--num-train-tasks", "3",
                  "--num-test-tasks", "2", "--num-initial-steps", "200", "--num-steps-prior", "200",
                  "--num-extra-rl-steps-posterior", "0", "--num-tasks-sample", "1", "--num-train-steps-per-itr", "3",
                  "--meta-batch", "2", "--batch-size", "16", "--embedding-batch-size", "8",
                  "--num-steps-per-eval", "400", "--net-size", "16", "--encoder-hidden", "16",
                  "--checkpoint-freq", "1"]  # fmt: skip
TINY_INFERENCE = ["--contexts", "3", "--context-size", "8", "--states", "8", "--z-samples", "3",
                  "--random-actions", "5"]


@pytest.fixture(scope="module")
def pearl_checkpoint(tmp_path_factory):
    """A checkpoint of a one-iteration PEARL run at tiny sizes."""
    cwd = tmp_path_factory.mktemp("pearl")
    run_script(os.path.join(ROOT, "hyper_pearl.py"), TINY_PEARL_RUN, cwd)
    (checkpoint,) = glob.glob(os.path.join(cwd, "runs", "*", "checkpoint.pt"))
    return checkpoint


def test_pearl_task_inference_reads_a_checkpoint(pearl_checkpoint, capsys):
    out = run_benchmark("pearl_task_inference", [pearl_checkpoint, *TINY_INFERENCE], capsys)
    assert re.search(r"mlp, iteration 1, tasks 0 / 1 = \S+ / \S+$", out, re.MULTILINE), out
    assert re.search(r"^encoder: between \S+, within \S+, posterior std \S+$", out, re.MULTILINE), out
    for name in ("policy action", "Q1"):
        (row,) = re.findall(rf"^{name} \| (\S+) \| (\S+) \| (\S+) \| (\S+)$", out, re.MULTILINE)
        assert all(math.isfinite(float(v)) and float(v) >= 0 for v in row), out
    tasks = re.findall(r"^([01]) \| (\S+) \| (\S+) \| (\S+) \| (\S+)$", out, re.MULTILINE)
    assert [t[0] for t in tasks] == ["0", "1"], out
    assert all(float(best) >= 0 and 0 <= float(frac) <= 1 for _, _, best, frac, _ in tasks), out


def test_pearl_task_inference_z_use_is_zero_for_networks_blind_to_z(pearl_checkpoint):
    """Zeroing the z columns of the policy's and Q1's first layers leaves them blind to z: every change is exactly 0,
    where the trained networks change. A Q1 blind to the action gives the policy's action exactly the random actions'
    value, so it "beats" all of them on every state."""
    inference = load_benchmark("pearl_task_inference")
    bench = tyro.cli(inference.Bench, args=[pearl_checkpoint, *TINY_INFERENCE])
    _, _, agent, encoder_buffer, rl_buffer, _ = inference.load(pearl_checkpoint)
    rng = np.random.default_rng(0)
    q_a, q_b = (inference.posteriors(agent, encoder_buffer, task, bench, rng) for task in (0, 1))
    batch = rl_buffer.sample_batch([0], 8, rng)
    obs, actions = batch.obs[0], batch.actions[0]
    obs_dim, act_dim = obs.shape[-1], actions.shape[-1]
    functions = {"policy": lambda: inference.policy_action(agent, obs),
                 "Q1": lambda: inference.q1_value(agent, obs, actions)}
    for name, f in functions.items():
        figures = inference.z_use(f(), q_a, q_b, 3)
        assert all(figures[k] > 0 for k in ("between tasks", "within task", "posterior sample")), (name, figures)
    with torch.no_grad():
        agent.policy.body[0].weight[:, obs_dim:] = 0
        agent.qf1.body[0].weight[:, obs_dim + act_dim:] = 0
    for name, f in functions.items():
        figures = inference.z_use(f(), q_a, q_b, 3)
        assert figures["between tasks"] == figures["within task"] == figures["posterior sample"] == 0, (name, figures)
    with torch.no_grad():  # the one-iteration policy's means are ~1e-3, where tanh is the identity: widen them
        agent.policy.mean.weight.mul_(1000.0)
        agent.policy.mean.bias.mul_(1000.0)
    generator = torch.Generator().manual_seed(0)
    trained = inference.actor_against_q1(agent, obs, q_a.loc[0], 5, generator)
    assert trained["best random"] > 0 and trained["policy beats all"] < 1, trained
    with torch.no_grad():  # the same figures the plain way: per-row policy, the same random actions
        z = q_a.loc[0].expand(len(obs), -1)
        policy_q = agent.qf1(obs, torch.tanh(agent.policy.dist_params(obs, z)[0]), z).squeeze(-1)
        uniform = torch.rand(5, len(obs), act_dim, generator=torch.Generator().manual_seed(0)) * 2 - 1
        random_q = torch.stack([agent.qf1(obs, a, z).squeeze(-1) for a in uniform])
    assert trained["policy"] == pytest.approx((policy_q - random_q.mean(0)).mean().item(), rel=1e-5)
    assert trained["best random"] == pytest.approx((random_q.max(0).values - random_q.mean(0)).mean().item(), rel=1e-5)
    with torch.no_grad():
        agent.qf1.body[0].weight[:, obs_dim:obs_dim + act_dim] = 0
    blind = inference.actor_against_q1(agent, obs, q_a.loc[0], 5, generator)
    assert blind == {"policy": 0.0, "best random": 0.0, "policy beats all": 1.0}, blind


def test_pearl_task_inference_encoder_figures():
    inference = load_benchmark("pearl_task_inference")
    normal = torch.distributions.Normal
    q_a = normal(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.1, 0.1], [0.1, 0.1]]))
    q_b = normal(torch.tensor([[0.0, 3.0], [0.0, 5.0]]), torch.tensor([[0.3, 0.3], [0.3, 0.3]]))
    figures = inference.encoder_figures(q_a, q_b)  # task means (1, 0) and (0, 4); every mean 1 from its task's
    assert figures == pytest.approx({"between": math.sqrt(17), "within": 1.0, "posterior std": 0.2})


def test_pearl_task_inference_z_use_moves_z_from_the_first_context_of_task_a():
    """With f(z) = z on two 'states', each change is the rms difference of the z it moves to."""
    inference = load_benchmark("pearl_task_inference")
    normal = torch.distributions.Normal
    q_a = normal(torch.tensor([[1.0, 1.0], [1.0, 3.0]]), torch.tensor([[0.5, 0.5], [1.0, 1.0]]))
    q_b = normal(torch.tensor([[5.0, 1.0], [9.0, 9.0]]), torch.ones(2, 2))
    torch.manual_seed(0)
    figures = inference.z_use(lambda z: torch.stack([z, z]), q_a, q_b, 4000)
    assert figures["between tasks"] == pytest.approx(math.sqrt(16 / 2))  # (4, 0) over 2 entries
    assert figures["within task"] == pytest.approx(math.sqrt(4 / 2))  # (0, 2)
    assert figures["posterior sample"] == pytest.approx(0.5, rel=0.05)  # the first posterior's std
    assert figures["std over states"] == pytest.approx(0.0)

"""The run infrastructure of hyper_sac.py and hyper_td3.py (same code in each): safe and verified files, unique run
directories, exact resume from any step, evaluation that leaves training alone, the non-finite guard, Ctrl-C, and one
`error:` line for bad input."""

import glob
import importlib
import importlib.util
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.cli import ROOT, only_run_dir, progress_lines_on_a_fake_clock, run_script

SCRIPTS = ["hyper_sac", "hyper_td3"]
TINY = ["--hyper-embedding-dim", "16", "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "50"]
SMALL_RUN = ["--env-id", "InvertedPendulum-v4", "--total-timesteps", "300", "--learning-starts", "100", "--batch-size", "16",
             "--eval-freq", "250", "--eval-episodes", "1", "--checkpoint-freq", "200", "--progress-freq", "100", *TINY]  # fmt: skip
RESUME_RUN = ["--env-id", "InvertedPendulum-v4", "--learning-starts", "100", "--batch-size", "16", "--eval-freq", "150",
              "--eval-episodes", "1", "--save-model", *TINY]  # fmt: skip


@pytest.fixture(params=SCRIPTS)
def script(request):
    return request.param


def path_of(script):
    return os.path.join(ROOT, f"{script}.py")


def run(script, args, cwd, check=True):
    return run_script(path_of(script), args, cwd, check=check)


def assert_same_models(script, dir_a, dir_b):
    a = torch.load(os.path.join(only_run_dir(dir_a), f"{script}.cleanrl_model"), weights_only=True)
    b = torch.load(os.path.join(only_run_dir(dir_b), f"{script}.cleanrl_model"), weights_only=True)
    for net in ("actor", "qf1", "qf2"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"


class _Payload:
    """Unpickling it would create a marker file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("flag", ["--resume", "--eval-model"])
def test_a_malicious_file_runs_nothing_and_gets_one_error_line(script, flag, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": importlib.import_module(script).FILE_FORMAT, "actor": _Payload(str(marker))}, tmp_path / "evil.pt")
    proc = run(script, [flag, "evil.pt"], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: cannot load evil.pt" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_random_bytes_foreign_and_corrupted_files_are_refused(script, tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    torch.save({"actor": {}, "args": {}, "replay_buffer": {}}, tmp_path / "foreign.pt")  # an older or other script's file
    run(script, [*SMALL_RUN, "--critic", "mlp"], tmp_path)
    checkpoint = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")
    contents = torch.load(checkpoint, weights_only=True)
    contents["agent"]["actor"]["fc1.weight"][0, 0] += 1.0  # one weight changed, the stored digest kept
    torch.save(contents, tmp_path / "corrupted.pt")
    expected = {"random.pt": "not a checkpoint or model", "foreign.pt": "not a checkpoint or model written by this version",
                "corrupted.pt": "corrupted"}  # fmt: skip
    for name, message in expected.items():
        for flag in ("--resume", "--eval-model"):
            proc = run(script, [*SMALL_RUN, "--critic", "mlp", flag, name], tmp_path, check=False)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert message in proc.stderr.strip().splitlines()[-1]


def test_runs_started_together_get_their_own_directories(script, tmp_path):
    args = [sys.executable, path_of(script), "--num-threads", "1", *SMALL_RUN, "--critic", "mlp", "--total-timesteps", "120"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    run_dirs = glob.glob(str(tmp_path / "runs" / "*"))
    assert len(run_dirs) == 3 and all(os.path.exists(os.path.join(d, "checkpoint.pt")) for d in run_dirs)
    assert all("__mlp__" in d for d in run_dirs)  # the run name says which critic


def test_a_checkpoint_from_the_first_episode_resumes_exactly(script, tmp_path):
    common = [*RESUME_RUN, "--seed", "5"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(script, [*common, "--total-timesteps", "300"], tmp_path / "a")
    run(script, [*common, "--total-timesteps", "2", "--checkpoint-freq", "2"], tmp_path / "b")
    checkpoint = os.path.join(only_run_dir(tmp_path / "b"), "checkpoint.pt")
    assert torch.load(checkpoint, weights_only=True)["env"]["start"]["seed"] == 5  # still the seeded first episode
    run(script, [*common, "--total-timesteps", "300", "--resume", checkpoint], tmp_path / "b")
    assert_same_models(script, tmp_path / "a", tmp_path / "b")


def test_evaluation_does_not_change_training(script, tmp_path):
    common = [*RESUME_RUN, "--seed", "6", "--total-timesteps", "250"]
    for name, eval_freq in (("a", "0"), ("b", "40")):
        (tmp_path / name).mkdir()
        run(script, [*common, "--eval-freq", eval_freq], tmp_path / name)
    assert_same_models(script, tmp_path / "a", tmp_path / "b")


def test_resume_refuses_a_different_evaluation_setting(script, tmp_path):
    run(script, [*SMALL_RUN, "--critic", "mlp"], tmp_path)
    checkpoint = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")
    proc = run(script, [*SMALL_RUN, "--critic", "mlp", "--eval-episodes", "3", "--resume", checkpoint], tmp_path, check=False)
    assert proc.returncode == 1 and "--eval-episodes 1 (given 3)" in proc.stderr


def test_the_guard_stops_on_weights_that_a_step_made_non_finite(script):
    weight = torch.nn.Parameter(torch.tensor([3.3e38]))
    optimizer = torch.optim.Adam([weight], lr=3e37)
    loss = -weight.sum()  # finite, and its step pushes the weight past the largest float32 (3.4e38)
    with pytest.raises(importlib.import_module(script).NonFinite, match="non-finite weights after the critic step"):
        importlib.import_module(script).guarded_step(optimizer, loss, "critic", qf1_loss=loss)
    with pytest.raises(importlib.import_module(script).NonFinite, match="non-finite qf1_loss"):
        importlib.import_module(script).guarded_step(optimizer, loss, "critic", qf1_loss=torch.tensor(float("nan")))


def test_a_diverging_run_stops_with_one_error_line_and_keeps_a_finite_checkpoint(script, tmp_path):
    proc = run(script, [*SMALL_RUN, "--critic", "mlp", "--q-lr", "1e30", "--checkpoint-freq", "50"], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "non-finite" in proc.stderr and "intact" in proc.stderr.strip().splitlines()[-1]
    checkpoint = torch.load(os.path.join(only_run_dir(tmp_path), "checkpoint.pt"), weights_only=True)
    assert all(torch.isfinite(t).all() for net in ("qf1", "qf2", "actor") for t in checkpoint["agent"][net].values())


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(script, tmp_path):
    common = [*RESUME_RUN, "--seed", "7", "--progress-freq", "10"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(script, [*common, "--total-timesteps", "300"], tmp_path / "a")
    proc = subprocess.Popen([sys.executable, path_of(script), "--num-threads", "1", *common, "--total-timesteps", "300", "--checkpoint-freq", "0"],
                            cwd=tmp_path / "b", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:  # interrupt once learning has started
        if line.startswith("step 150/"):
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "--resume" in last
    checkpoint = os.path.join(only_run_dir(tmp_path / "b"), "checkpoint.pt")
    assert f"--resume {checkpoint}" in last or "--resume runs/" in last
    run(script, [*common, "--total-timesteps", "300", "--resume", checkpoint], tmp_path / "b")
    assert_same_models(script, tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--policy-lr", "inf"], "--policy-lr must be a finite number"),
        (["--tau", "nan"], "--tau must be a finite number"),
        (["--exp-name", "a/b"], "--exp-name must be a plain name"),
        (["--q-lr", "1e38"], "--q-lr must be below 3.4e37"),
        (["--buffer-size", str(10**12), "--batch-size", "16"], "GiB for the replay buffer"),
        (["--env-id", "tests.envs:MatrixActionEnv-v0"], "flat (1-D) Box action space"),
    ],
)
def test_more_bad_input_gives_one_error_line(script, flags, message, tmp_path):
    proc = run(script, [*SMALL_RUN, *flags], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_runs_being_a_file_gives_one_error_line(script, tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    proc = run(script, [*SMALL_RUN, "--critic", "mlp"], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot create the run directory" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is not None, reason="moviepy is installed")
def test_capture_video_without_moviepy_gives_one_error_line(script, tmp_path):
    proc = run(script, ["--eval-model", "any.cleanrl_model", "--capture-video"], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "needs moviepy" in proc.stderr


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Hopper-v5"])
def test_a_v5_env_runs_through_learning_start_and_an_eval(script, env_id, tmp_path):
    proc = run(script, ["--env-id", env_id, "--total-timesteps", "40", "--learning-starts", "20", "--batch-size", "16",
                        "--eval-freq", "40", "--eval-episodes", "1", "--checkpoint-freq", "0", "--progress-freq", "20",
                        *TINY], tmp_path)  # fmt: skip
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("step 20/40") and "ETA after learning starts" in lines[1]  # random steps: no ETA
    assert lines[2].startswith("step 40/40") and "ETA 0m00s" in lines[2] and "eval" in lines[2]
    assert proc.stderr == ""


def test_the_first_eta_after_learning_starts_comes_from_the_learning_rate(script, monkeypatch, capsys):
    """The training loop's calls to Progress, with learning starting between two progress lines, on a clock where a
    random step takes 1 ms and a learning step 0.5 s."""
    module = importlib.import_module(script)
    progress = module.Progress(10_000, 0, 5500)
    lines = progress_lines_on_a_fake_clock(module, progress, monkeypatch, capsys)
    assert all("ETA after learning starts" in line for line in lines[:5])  # steps 1000, ..., 5000
    assert "step 6000/10000 | 2.0 steps/s | ETA 33m20s" in lines[5]  # 4000 steps at 0.5 s
    assert "step 8000/10000 | 2.0 steps/s | ETA 16m40s" in lines[7]

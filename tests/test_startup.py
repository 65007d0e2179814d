"""A newcomer's first minute, in all five scripts: a script pasted into a notebook cell runs (nothing depends on
__file__), prints no third-party warning on a HalfCheetah-v4 run (the two it used to print are silenced), and every
other warning stays visible."""

import subprocess
import sys

import pytest

from tests.cli import ROOT

TINY_HYPER = ["--hyper-embedding-dim", "16", "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "50"]
STEPS = ["--total-timesteps", "40", "--learning-starts", "20", "--batch-size", "16", "--progress-freq", "20"]
RUNS = {  # a few seconds each, every one building several HalfCheetah-v4 envs
    "hyper_sac": ["--env-id", "HalfCheetah-v4", *STEPS, "--eval-freq", "0", "--checkpoint-freq", "0", *TINY_HYPER],
    "hyper_td3": ["--env-id", "HalfCheetah-v4", *STEPS, "--eval-freq", "0", "--checkpoint-freq", "0", *TINY_HYPER],
    "grad_probe": ["--env-id", "HalfCheetah-v4", "--critics", "mlp", *STEPS, "--eval-freq", "0", "--probe-freq", "40",
                   "--probe-states", "2", "--probe-actions", "8", "--probe-start-steps", "5"],
    "hyper_maml": ["--env-id", "HalfCheetahFwdBack", "--policy", "vanilla", "--meta-batch-size", "2",
                   "--fast-batch-size", "2", "--num-train-tasks", "2", "--num-test-tasks", "1", "--variance-tasks", "1",
                   "--eval-freq", "0", "--hidden-sizes", "8", "--num-batches", "1", "--checkpoint-freq", "0"],
    "hyper_pearl": ["--env-id", "HalfCheetahVel", "--num-iterations", "1", "--num-train-tasks", "2",
                    "--num-test-tasks", "1", "--num-initial-steps", "50", "--num-steps-prior", "50",
                    "--num-extra-rl-steps-posterior", "50", "--num-tasks-sample", "1", "--num-train-steps-per-itr", "2",
                    "--meta-batch", "2", "--batch-size", "16", "--embedding-batch-size", "8", "--eval-freq", "0",
                    "--net-size", "16", "--encoder-hidden", "16",
                    "--hyper-embedding-dim", "16", "--hyper-blocks", "1", "--hyper-dynamic-hidden", "8",
                    "--hyper-init-samples", "64", "--checkpoint-freq", "0"],
}  # fmt: skip
# Run after the script, in the same process: warnings that must NOT be silenced.
OTHER_WARNINGS = """
import warnings
import mujoco
xml = "<mujoco><worldbody><body><freejoint/><geom size='1'/></body></worldbody></mujoco>"
model = mujoco.MjModel.from_xml_string(xml)
data = mujoco.MjData(model)
data.qvel[:] = float("nan")
mujoco.mj_step(model, data)  # MuJoCo's C-level "Nan, Inf or huge value in QVEL" warning
warnings.warn_explicit("WARN: another deprecation", DeprecationWarning, "registration.py", 1,
                       module="gymnasium.envs.registration")
warnings.warn("a warning of the script's own")
"""


@pytest.mark.parametrize("script", list(RUNS))
def test_a_script_pasted_into_a_notebook_runs_without_third_party_warnings(script, tmp_path):
    # A notebook cell runs in __main__ with no __file__, as `python -c` does; the cell sets sys.argv, as a notebook must
    # (tyro would otherwise parse the kernel's own arguments).
    with open(f"{ROOT}/{script}.py") as f:
        cell = f.read()
    code = f"import sys\nsys.argv = {[script + '.py', '--num-threads', '1', *RUNS[script]]!r}\n{cell}\n{OTHER_WARNINGS}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "/1 |" in proc.stdout or "/40 |" in proc.stdout  # its last progress line
    assert "settotalmass" not in proc.stderr and "out of date" not in proc.stderr
    assert proc.stderr.startswith("WARNING: Nan, Inf or huge value in QVEL"), proc.stderr  # nothing before it
    assert "DeprecationWarning: WARN: another deprecation" in proc.stderr
    assert "UserWarning: a warning of the script's own" in proc.stderr
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()

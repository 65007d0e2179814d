"""Helpers of the end-to-end tests: run a script through its CLI and find the run directory it wrote."""

import collections
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, args, cwd, check=True):
    """Run `script` with `args` in `cwd` on one torch thread (with tiny networks, threads competing for 2 cores make
    updates many times slower); raise with its output if it fails and `check` is set."""
    proc = subprocess.run([sys.executable, script, "--num-threads", "1", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def only_run_dir(cwd):
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return run_dir


def cached_runs(tmp_path_factory, run, base_args, flag):
    """get(value) -> (stdout, run dir) of `run([*base_args, flag, value])`, made once per value on first use."""
    done = {}

    def get(value):
        if value not in done:
            cwd = tmp_path_factory.mktemp(value)
            done[value] = (run([*base_args, flag, value], cwd).stdout, only_run_dir(cwd))
        return done[value]

    return get


def tensorboard_events(run_dir):
    """The run's TensorBoard events, every scalar kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return events


def scalar_tags(run_dir) -> set:
    return set(tensorboard_events(run_dir).Tags()["scalars"])


def progress_lines_on_a_fake_clock(module, progress, monkeypatch, capsys, learning_starts=5500, steps=8000):
    """The printed lines of `progress` driven as the training loop drives it, with learning starting between two
    progress lines, on a clock where a random step takes 1 ms and a learning step 0.5 s."""
    clock = [0.0]
    monkeypatch.setattr(module, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    for step in range(1, steps + 1):
        clock[0] += 0.001 if step <= learning_starts else 0.5
        if step % 1000 == 0:
            progress.print(step)
        if step == learning_starts:
            progress.new_phase(step)
    return capsys.readouterr().out.splitlines()


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


def count_host_reads(monkeypatch, module) -> collections.Counter:
    """From now on, count by name the calls of the tensor methods that bring a value to the host (on a GPU, each one
    waits for the device) made by `module`'s own code, not by torch's: `if t.all(): ...` counts one "__bool__"."""
    import torch

    counts = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1)
            while caller.f_code.co_filename == __file__:  # another count_host_reads on the same method
                caller = caller.f_back
            if caller.f_code.co_filename == module.__file__:
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def for_loop_adam_twin(learner):
    """A deep copy of `learner` whose optimizers are PyTorch's for-loop Adam (foreach=False, fused=False) with the
    same parameters, learning rates and state. Asserts that the learner's own optimizers are the fused Adam."""
    import copy

    import torch

    twin = copy.deepcopy(learner)  # one memo: the copied optimizers point at the copied parameters

    def for_loop(optimizer):
        (group,) = optimizer.param_groups
        fused_on_cpu = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)
        assert isinstance(optimizer, torch.optim.Adam) and (group["fused"] is True or not fused_on_cpu)
        replacement = torch.optim.Adam(group["params"], lr=group["lr"], foreach=False)
        replacement.load_state_dict(
            {**optimizer.state_dict(), "param_groups": replacement.state_dict()["param_groups"]}
        )
        return replacement

    names = [name for name in vars(twin) if name.endswith("_optimizer")]
    for name in names:
        setattr(twin, name, for_loop(getattr(twin, name)))
    if hasattr(twin, "optimizers"):
        twin.optimizers = {name: for_loop(optimizer) for name, optimizer in twin.optimizers.items()}
    assert names or hasattr(twin, "optimizers")
    return twin


def assert_same_up_to_rounding(a, b, rtol=1e-5, atol=1e-7):
    """Every floating-point tensor of two nested state dicts agrees within the tolerance; other leaves are equal."""
    import torch

    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_up_to_rounding(a[key], b[key], rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_up_to_rounding(x, y, rtol, atol)
    elif isinstance(a, torch.Tensor) and a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    else:
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)

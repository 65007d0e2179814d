"""Smoke tests of the measurement scripts in benchmarks/ whose numbers the docs quote, at tiny sizes. Each runs the
script's CLI and main in this process (a subprocess would spend most of its time importing torch and MuJoCo)."""

import importlib.util
import math
import os
import re

import pytest
import tyro

import hyper_pearl
from tests.cli import ROOT

TINY_PEARL = ["--transitions", "300", "--steps", "1", "2", "--batch-size", "16", "--embedding-batch-size", "32",
              "--probe-z", "4", "--probe-states", "4", "--probe-actions", "4", "--hyper-embedding-dim", "16",
              "--hyper-blocks", "1", "--hyper-dynamic-hidden", "8", "--hyper-init-samples", "64"]  # fmt: skip
TINY_MAML = ["--meta-batch-size", "2", "--fast-batch-size", "2", "--hyper-embedding-dim", "16", "--hyper-blocks", "1",
             "--hyper-dynamic-hidden", "8", "--hidden-sizes", "8", "8"]  # fmt: skip


def run_benchmark(name: str, argv: list, capsys) -> str:
    """python benchmarks/{name}.py *argv, in this process; returns its stdout."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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

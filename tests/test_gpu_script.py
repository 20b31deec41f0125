"""benchmarks/gpu/run.sh, the GPU checks in one command, in its CPU dry run (`--dry-run --device cpu`).

The same steps as on the GPU machine, with tiny sizes and this interpreter's packages instead of
the wheelhouse: `pytest -m cuda` runs tests/test_cuda.py on the CPU (CVAE_ACCELERATOR_TEST_DEVICE=cpu)
and the CUDA section of the benchmark goes through every function it has. So the script cannot rot
between the rare sessions that have a GPU; what is asserted is what such a session reads back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from conftest import REPO

SCRIPT = "benchmarks/gpu/run.sh"
FILES = ["environment.txt", "junit.xml", "run.log", "table.json", "table.md"]
NEEDS_CUDA = "not measured (needs cuda)"


def test_an_unknown_option_is_one_usage_line_and_exit_2(tmp_path):
    done = subprocess.run(["bash", SCRIPT, "--out", str(tmp_path), "--fast"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: bash benchmarks/gpu/run.sh") and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_cpu_dry_run_passes_every_step_and_writes_the_table_and_logs(tmp_path):
    out = tmp_path / "gpu"
    # Not this test process's pytest-xdist and MLflow settings: the script's own pytest and commands
    # start afresh, as on the GPU machine (OMP_NUM_THREADS, set for xdist workers, stays).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MLFLOW_"))}
    done = subprocess.run(["bash", SCRIPT, "--dry-run", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == FILES
    run_log = (out / "run.log").read_text()
    for step in ("environment", "tests", "bench"):
        assert f"{step}: passed in" in run_log
    assert "install:" not in run_log and "all steps passed" in run_log
    assert "torch " in (out / "environment.txt").read_text()

    # pytest -m cuda ran tests/test_cuda.py on the CPU: every test passed, none skipped.
    suite = ElementTree.parse(out / "junit.xml").getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 7 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    names = {case.get("name") for case in suite.iter("testcase")}
    assert {"test_two_workers_share_the_device_and_repeat_no_trial", "test_a_deterministic_run_reproduces_bitwise",
            "test_evaluate_runs_on_the_device", "test_generate_runs_on_the_device"} <= names

    # The CUDA section's table, on the CPU: measured where the CPU can, "needs cuda" where not.
    rows = {(r["section"], r["measure"]): r for r in json.loads((out / "table.json").read_text())}
    assert not [r for r in rows.values() if r["value"].startswith("failed")]
    mlp = "784-400-20 MLP b128"
    for key in [("cuda loop", f"{mlp}: ours / conventional"), ("cuda flops", "achieved / matmul"),
                ("cuda precision", f"{mlp} fp32: a 60,000-example epoch at that rate"),
                ("cuda precision", f"{mlp} fp32: final val/loss"),
                ("cuda precision", f"{mlp} torch.compile (eager backend: traced, no code generated): final val/loss"),
                ("cuda workers", "2 trials, 1 worker(s) on one device: trials per hour")]:
        assert float(rows[key]["value"]) > 0, (key, sorted(rows))
    assert rows[("cuda precision", f"{mlp} fp32: a 60,000-example epoch at that rate")]["target"] == "<= 0.5 (H100/H200)"
    for variant in ("bf16 autocast", "CUDA graphs (torch.compile reduce-overhead)"):
        assert rows[("cuda precision", f"{mlp} {variant}")]["value"] == NEEDS_CUDA
    # The table is printed last too, where the device tool's reply (the output's tail) shows it.
    assert (out / "table.md").read_text().strip() in done.stdout

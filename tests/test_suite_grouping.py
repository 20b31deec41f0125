"""`make test` runs on several xdist workers: a fixture that trains once per module or session must
be made on one worker only, or every worker trains it again (minutes of CI). This runs pytest the way
`make test` does, on probe tests that use this suite's conftest, and asks where each ran."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

PROBE = '''
import os
from pathlib import Path

import pytest

LOG = Path(__file__).with_name("workers.log")


@pytest.fixture(scope="module")
def trained_once():
    with LOG.open("a") as log:
        log.write("made " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")


@pytest.mark.parametrize("i", range(6))
def test_uses_the_module_fixture(trained_once, i):
    with LOG.open("a") as log:
        log.write("ran " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")
'''


def test_tests_sharing_a_module_fixture_run_on_one_worker_which_makes_it_once(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(PROBE)
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "3", "--dist", "loadgroup", "-q",
                           "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (tmp_path / "workers.log").read_text().split()
    made = [lines[i + 1] for i, word in enumerate(lines) if word == "made"]
    ran = {lines[i + 1] for i, word in enumerate(lines) if word == "ran"}
    assert len(made) == 1 and ran == set(made), (
        f"module fixture made on {made}, tests ran on {sorted(ran)}: xdist's loadgroup is not grouping "
        "(a pytest newer than pytest-xdist supports? pytest-dev/pytest-xdist#1386; see requirements.txt)")

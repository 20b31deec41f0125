"""The benchmark runs end to end at its quick sizes and prints the table it promises.

Timings are not asserted (they belong to the benchmark's own output, measured side by side):
only that every section measured something and that every ratio is a positive number.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

EXPECTED_MEASURES = [
    ("loop", "784-400-20 MLP b128: ours / conventional"),
    ("flops", "achieved / matmul"),
    ("own data", "3x32x32 / 1x28x28, pixels per second"),
    ("recording", "share outside epochs (start-up, recording)"),
    ("study", "1 worker: share of wall time inside epochs"),
    ("study", "2 workers / 1 worker, trials per hour"),
]


@pytest.mark.slow
def test_quick_benchmark_prints_every_measure_with_its_target(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    found = {(r["section"], r["measure"]): r for r in rows}
    for key in EXPECTED_MEASURES:
        assert key in found, f"missing {key}; got {sorted(found)}"
    for row in rows:
        if row["unit"] in ("ratio", "fraction", "examples/s", "GFLOP/s", "trials/h", "s"):
            assert float(row["value"]) > 0, row
    fused = [r for r in rows if r["section"] == "fused" and r["measure"].endswith("fuse=2 / fuse=1, trials per hour")]
    assert len(fused) == 1 and fused[0]["target"] == ">= 1.5", rows
    assert any(r["section"] == "fused" and "(groups 2)" in r["measure"] for r in rows), "the two trials trained fused"
    assert any(r["section"] == "cuda" for r in rows), "the CUDA section says why it was not measured"
    header = next(line for line in done.stdout.splitlines() if line.startswith("| section"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["section", "measure", "value", "unit", "target"]

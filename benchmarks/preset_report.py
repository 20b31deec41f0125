"""Train every reference preset briefly and evaluate it: the preset × metrics table of docs/presets.md.

Runs the real entry points (train, then evaluate) against one MLflow store and prints a Markdown
table, per preset (faithful and -fixed): the likelihood kind, test negative ELBO, the IWAE number
(an NLL, with bits/dim, for exact kinds; a bound of a cross-entropy or density otherwise), active
units, collapse and classifier-judged sample accuracy.

    python -m benchmarks.preset_report --dataset fashion-mnist --epochs 3 --limit-train 10000 \
        --limit-test 1000 --k 1000

Every number is in nats per example; only rows of the same likelihood kind compare (docs/units.md).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from cvae.likelihood import likelihood_kind
from pipelines.presets import preset_config

PRESETS = ("conv-decoder-cond", "conv-decoder-cond-fixed", "mlp-concat", "mlp-concat-fixed", "conv-label-channel",
           "conv-label-channel-fixed", "mlp-vae", "conv-vae")


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    """A command's output (stdout) and its log (stderr)."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", default="3")
    parser.add_argument("--limit-train", default="10000")
    parser.add_argument("--limit-test", default="1000")
    parser.add_argument("--k", default="1000")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--experiment", default="preset-report")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")

    rows = []
    for preset in args.presets.split(","):
        started = time.perf_counter()
        trained = run("pipelines.entrypoints.train", "--preset", preset, "--dataset", args.dataset,
                      "--epochs", args.epochs, "--limit-train", args.limit_train, "--limit-test", args.limit_test,
                      "--experiment", args.experiment, "--run-name", f"report-{preset}")
        train_seconds = time.perf_counter() - started
        run_id = re.search(r"^run (\w+):", trained.stdout, re.M).group(1)
        started = time.perf_counter()
        evaluated = run("pipelines.entrypoints.evaluate", "--model-uri", run_id, "--k", args.k,
                        "--experiment", args.experiment)
        metrics = dict(re.findall(r"(test/[\w/]+|classifier/\w+) (-?[\d.e+-]+|nan)", evaluated.stdout))
        config = preset_config(preset)
        metrics["likelihood_kind"] = likelihood_kind(config.model.likelihood, config.data.binarize)
        if "warning: posterior collapse" in evaluated.stderr:
            metrics["posterior_collapse"] = "true"
        rows.append((preset, metrics, train_seconds, time.perf_counter() - started))
        print(f"{preset}: train {train_seconds:.0f} s, evaluate {time.perf_counter() - started:.0f} s", flush=True)

    train_images = "all" if args.limit_train in ("", "0") else args.limit_train
    test_images = "all" if args.limit_test in ("", "0") else args.limit_test
    print(f"\n{args.dataset}, {args.epochs} epochs on {train_images} training images, "
          f"{test_images} test images, IWAE k={args.k}\n")
    print("| preset | likelihood kind | test neg. ELBO | IWAE (k) | bits/dim | active units | collapsed "
          "| sample accuracy | train s | evaluate s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, m, train_s, eval_s in rows:
        iwae_name = next((n for n in m if n.startswith("test/iwae_") and not n.endswith("_bits_per_dim")), "?")
        print(f"| {preset} | {m.get('likelihood_kind', '?')} | {m.get('test/neg_elbo', '?')} "
              f"| {m.get(iwae_name, '?')} ({iwae_name.rsplit('/', 1)[-1]}) | {m.get(iwae_name + '_bits_per_dim', '—')} "
              f"| {m.get('test/active_units', '?')} | {m.get('posterior_collapse', 'false')} "
              f"| {m.get('test/sample_accuracy', 'n/a (unconditional)')} | {train_s:.0f} | {eval_s:.0f} |")


if __name__ == "__main__":
    main()

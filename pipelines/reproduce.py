"""Re-run a logged run from its manifest and check that the re-run agrees with the record.

The comparison is a set of pure functions (two manifests, two state dicts, two metric dicts in; a
report out), so it can be tested without MLflow. ``reproduce_run`` does the orchestration: read the
original's manifest and weights, train again with the same configuration in a new run tagged
``reproduces=<id>``, compare, and log ``reproduction_report.json`` / ``.md`` to the new run.

Tolerances (``default_tolerance``): bitwise (0) when both runs were deterministic on the CPU;
1e-3 (relative on metrics, absolute on weights) when both were deterministic on a GPU, or when the
original was trained fused with other trials (re-trained alone, it agrees to rounding); 1e-2
otherwise. GPU kernels differ between models and library versions, so a re-run on other
hardware may need a looser ``--tolerance``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import torch

REPORT_JSON = "reproduction_report.json"
REPORT_MARKDOWN = "reproduction_report.md"
VERDICT_TAG = "reproduction_verdict"
REPRODUCES_TAG = "reproduces"
AGREES, DIFFERS = "agrees", "differs"

GPU_DETERMINISTIC_TOLERANCE = 1e-3
NON_DETERMINISTIC_TOLERANCE = 1e-2
# A run trained fused with others (manifest "fusion") is re-trained alone: the same math, but batched
# kernels add in another order, so it agrees to rounding, not bitwise. Measured on the CPU
# (docs/reproducing.md): 1e-6 relative on metrics and 1e-5 on weights after an epoch; 1e-3 leaves
# room for longer runs, as for a deterministic GPU run.
FUSED_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Tolerance:
    metrics_rel: float  # |a - b| <= metrics_rel * max(1, |a|)
    weights_abs: float  # max |w_a - w_b| over every tensor element
    reason: str


def default_tolerance(original: Mapping, rerun: Mapping) -> Tolerance:
    """Bitwise on deterministic CPU runs; documented looser bounds wherever a GPU or
    non-deterministic kernels were involved."""
    deterministic = all(m.get("determinism", {}).get("deterministic") for m in (original, rerun))
    on_cpu = all(m.get("hardware", {}).get("device_type") == "cpu" for m in (original, rerun))
    if original.get("fusion") and deterministic:
        return Tolerance(FUSED_TOLERANCE, FUSED_TOLERANCE,
                         "trained fused, re-trained alone: batched kernels round differently")
    if deterministic and on_cpu:
        return Tolerance(0.0, 0.0, "both runs deterministic on the CPU: bitwise")
    if deterministic:
        return Tolerance(GPU_DETERMINISTIC_TOLERANCE, GPU_DETERMINISTIC_TOLERANCE,
                         "deterministic on a GPU: kernels may still differ across GPU models and versions")
    return Tolerance(NON_DETERMINISTIC_TOLERANCE, NON_DETERMINISTIC_TOLERANCE,
                     "non-deterministic kernels (deterministic=false)")


def explicit_tolerance(value: float) -> Tolerance:
    return Tolerance(value, value, "given with --tolerance")


def compare_metrics(original: Mapping[str, float], rerun: Mapping[str, float],
                    rel_tol: float) -> list[dict]:
    """One row per metric of the original; a metric missing from the re-run never agrees."""
    rows = []
    for name in sorted(original):
        old, new = float(original[name]), rerun.get(name)
        if new is None:
            rows.append({"name": name, "original": old, "rerun": None, "abs_diff": None, "agrees": False})
            continue
        new = float(new)
        diff = abs(new - old) if math.isfinite(old) and math.isfinite(new) else (0.0 if old == new else math.inf)
        rows.append({"name": name, "original": old, "rerun": new, "abs_diff": diff,
                     "agrees": diff <= rel_tol * max(1.0, abs(old))})
    return rows


def compare_weights(original: Mapping[str, torch.Tensor] | None, rerun: Mapping[str, torch.Tensor],
                    abs_tol: float, original_sha256: str | None) -> dict:
    """Max absolute difference over all tensors and checksum equality.

    Without the original's tensors (no logged model) only the checksums can be compared.
    """
    from pipelines.recording.manifest import weights_sha256

    rerun_sha = weights_sha256(rerun)
    report = {"original_sha256": original_sha256, "rerun_sha256": rerun_sha,
              "identical": original_sha256 == rerun_sha, "max_abs_diff": None,
              "mismatched_tensors": [], "logged_model_matches_manifest": None}
    if original is None:
        report["agrees"] = report["identical"]
        return report
    report["logged_model_matches_manifest"] = weights_sha256(original) == original_sha256
    mismatched = sorted(set(original) ^ set(rerun))
    max_diff = 0.0
    for name in sorted(set(original) & set(rerun)):
        a, b = original[name].detach().cpu(), rerun[name].detach().cpu()
        if a.shape != b.shape or a.dtype != b.dtype:
            mismatched.append(name)
            continue
        if a.numel():
            max_diff = max(max_diff, (a.double() - b.double()).abs().max().item())
    report["max_abs_diff"] = max_diff
    report["mismatched_tensors"] = mismatched
    within = max_diff <= abs_tol and not mismatched
    # Bitwise means bitwise: a tolerance of 0 also requires equal checksums (equal dtypes, shapes, names).
    report["agrees"] = (within and report["logged_model_matches_manifest"]
                        and (report["identical"] or abs_tol > 0))
    return report


def compare_data(original: Mapping, rerun: Mapping) -> list[str]:
    """What differs between the data a run recorded and the data the re-run read."""
    differences = []
    if original.get("dataset") != rerun.get("dataset"):
        differences.append(f"dataset: {original.get('dataset')} → {rerun.get('dataset')}")
    old_files, new_files = original.get("source_files_sha256", {}), rerun.get("source_files_sha256", {})
    for name in sorted(set(old_files) | set(new_files)):
        if old_files.get(name) != new_files.get(name):
            differences.append(f"data file {name}: SHA-256 {_short(old_files.get(name))} → "
                               f"{_short(new_files.get(name))}")
    for key in ("sizes", "split_seed"):
        if original.get(key) != rerun.get(key):
            differences.append(f"data {key}: {original.get(key)} → {rerun.get(key)}")
    return differences


def refuse_other_data(run_id: str, recorded: Mapping[str, str], here: Mapping[str, str], dataset: str) -> None:
    """Raise a one-line ``UserError`` unless the bytes read here are those the run recorded: a
    re-run on other data says nothing about the original."""
    from pipelines.errors import UserError

    differences = [f"{name}: SHA-256 {_short(recorded.get(name))} recorded, {_short(here.get(name))} here"
                   for name in sorted(set(recorded) | set(here)) if recorded.get(name) != here.get(name)]
    if differences:
        raise UserError(f"run {run_id} was trained on other bytes than the {dataset} data here ({'; '.join(differences)}): "
                        "not reproduced; give --data-dir where the data it was trained on lie")


def compare_seeds(original: Mapping, rerun: Mapping) -> list[str]:
    return [f"seed {name}: {original.get(name)} → {rerun.get(name)}"
            for name in sorted(set(original) | set(rerun)) if original.get(name) != rerun.get(name)]


def environment_warnings(original: Mapping, rerun: Mapping) -> list[str]:
    """Differences that may explain a disagreement: code, packages, platform, hardware, determinism."""
    warnings = []
    old_code, new_code = original.get("code", {}), rerun.get("code", {})
    if old_code.get("git_commit") != new_code.get("git_commit"):
        warnings.append(f"code commit differs: {old_code.get('git_commit')} → {new_code.get('git_commit')}")
    if old_code.get("git_dirty") or new_code.get("git_dirty"):
        same = old_code.get("diff_sha256") == new_code.get("diff_sha256")
        warnings.append(f"uncommitted changes ({'the same' if same else 'different'} in both runs): "
                        f"original dirty={old_code.get('git_dirty')}, re-run dirty={new_code.get('git_dirty')}; "
                        "each run's diff is its code.diff artifact")
    old_env, new_env = original.get("environment", {}), rerun.get("environment", {})
    for key in ("python", "torch", "cuda", "cudnn", "platform"):
        if old_env.get(key) != new_env.get(key):
            warnings.append(f"{key} differs: {old_env.get(key)} → {new_env.get(key)}")
    old_pkgs, new_pkgs = old_env.get("packages", {}), new_env.get("packages", {})
    changed = [f"{name} {old_pkgs.get(name, '(absent)')} → {new_pkgs.get(name, '(absent)')}"
               for name in sorted(set(old_pkgs) | set(new_pkgs), key=str.lower)
               if old_pkgs.get(name) != new_pkgs.get(name)]
    if changed:
        warnings.append(f"package versions differ ({len(changed)}): " + ", ".join(changed))
    old_hw, new_hw = original.get("hardware", {}), rerun.get("hardware", {})
    for key in ("device_type", "gpu_model", "gpu_count", "nvidia_driver_version", "cpu_model", "torch_threads"):
        if old_hw.get(key) != new_hw.get(key):
            warnings.append(f"hardware {key} differs: {old_hw.get(key)} → {new_hw.get(key)}")
    old_compiled = original.get("compile", {}).get("compiled", False)  # manifests before compile: eager
    new_compiled = rerun.get("compile", {}).get("compiled", False)
    if old_compiled != new_compiled:
        warnings.append(f"torch.compile differs: compiled={old_compiled} → compiled={new_compiled}")
    old_det = original.get("determinism", {}).get("deterministic")
    new_det = rerun.get("determinism", {}).get("deterministic")
    if old_det != new_det:
        warnings.append(f"deterministic mode differs: {old_det} → {new_det}")
    return warnings


def build_report(original: Mapping, rerun: Mapping, original_weights: Mapping[str, torch.Tensor] | None,
                 rerun_weights: Mapping[str, torch.Tensor], tolerance: Tolerance) -> dict:
    """The whole comparison of a re-run with its original, with a verdict."""
    metrics = compare_metrics(original.get("results", {}).get("metrics", {}),
                              rerun.get("results", {}).get("metrics", {}), tolerance.metrics_rel)
    weights = compare_weights(original_weights, rerun_weights, tolerance.weights_abs,
                              original.get("results", {}).get("weights_sha256"))
    data = compare_data(original.get("data", {}), rerun.get("data", {}))
    seeds = compare_seeds(original.get("seeds", {}), rerun.get("seeds", {}))
    differences = [*data, *seeds]
    differences += [f"metric {row['name']}: {row['original']!r} → {row['rerun']!r} (|Δ| {row['abs_diff']})"
                    for row in metrics if not row["agrees"]]
    if weights["logged_model_matches_manifest"] is False:
        differences.append("the original's logged model does not match the weights checksum in its manifest")
    if not weights["agrees"]:
        detail = (f"max |Δw| {weights['max_abs_diff']}" if weights["max_abs_diff"] is not None
                  else "checksums differ")
        if weights["mismatched_tensors"]:
            detail += f"; tensors not comparable: {', '.join(weights['mismatched_tensors'])}"
        differences.append(f"weights: {detail}")
    return {
        "original_run_id": original.get("run_id"),
        "rerun_run_id": rerun.get("run_id"),
        "verdict": DIFFERS if differences else AGREES,
        "tolerance": asdict(tolerance),
        "differences": differences,
        "warnings": environment_warnings(original, rerun),
        "metrics": metrics,
        "weights": weights,
        "data_differences": data,
        "seed_differences": seeds,
    }


def report_markdown(report: Mapping) -> str:
    tol = report["tolerance"]
    weights = report["weights"]
    lines = [f"# Reproduction of run {report['original_run_id']}", "",
             f"Re-run: {report['rerun_run_id']}  ",
             f"**Verdict: {report['verdict']}**  ",
             f"Tolerance: metrics {tol['metrics_rel']:g} (relative), weights {tol['weights_abs']:g} "
             f"(absolute); {tol['reason']}", ""]
    if report["differences"]:
        lines += ["## Differences", "", *[f"- {d}" for d in report["differences"]], ""]
    if report["warnings"]:
        lines += ["## Warnings", "", *[f"- {w}" for w in report["warnings"]], ""]
    lines += ["## Weights", "",
              f"- max absolute difference: {weights['max_abs_diff']}",
              f"- SHA-256 original: {weights['original_sha256']}",
              f"- SHA-256 re-run: {weights['rerun_sha256']}", "",
              "## Metrics", "", "| metric | original | re-run | abs diff | agrees |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['original']!r} | {r['rerun']!r} | {r['abs_diff']!r} | {r['agrees']} |"
              for r in report["metrics"]]
    return "\n".join(lines) + "\n"


def _short(checksum: str | None) -> str:
    return checksum[:12] if checksum else "(absent)"


def load_original(client, run_id: str) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """The original run's manifest and final weights (None when it logged no model).

    Raises ``UserError`` for an unknown run or a run without a manifest, before anything is opened.
    """
    import mlflow.pytorch

    from pipelines.errors import UserError
    from pipelines.recording.manifest import ManifestNotFoundError, load_manifest
    from pipelines.recording.record import DETAIL_TAG
    from pipelines.tracking.runs import get_run_or_refuse

    run = get_run_or_refuse(client, run_id, "run_id", "the id of a logged MLflow run")
    try:
        manifest = {**load_manifest(client, run_id), "run_id": run_id}
    except ManifestNotFoundError as error:
        if DETAIL_TAG in run.data.tags:  # recorded by this harness: its manifest was there, its artifacts are gone
            raise UserError(f"{error}: its artifacts are missing from {run.info.artifact_uri} (deleted or moved); "
                            "a run cannot be reproduced without its manifest") from None
        raise UserError(f"{error}; only runs logged by this harness (train entry point or a study "
                        "trial) can be reproduced") from None
    model_uri = manifest.get("results", {}).get("model_uri") or run.data.tags.get("model_uri")
    if not model_uri:
        return manifest, None
    try:
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as error:  # MLflow raises several types for a missing or unreadable model
        raise UserError(f"run {run_id}: its model {model_uri} could not be loaded "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    return manifest, model.state_dict()


def reproduce_run(run_id: str, tolerance: float | None = None, experiment: str | None = None,
                  run_name: str | None = None, data_dir: str | None = None) -> dict:
    """Re-run ``run_id`` from its manifest in a new run tagged ``reproduces=<id>``; return the report.

    ``data_dir`` only says where the data lie here: the bytes read must be those the original
    recorded (their SHA-256), else nothing is re-run.
    """
    import os

    from mlflow import MlflowClient

    from pipelines.config import from_dict, with_overrides
    from pipelines.recording.manifest import load_manifest
    from pipelines.tracking.runs import entry_point_run
    from pipelines.tracking.system_metrics import run_system_metrics
    from pipelines.training.preflight import preflight

    client = MlflowClient()
    original, original_weights = load_original(client, run_id)
    config = from_dict(original["config"])
    if data_dir:
        config = with_overrides(config, {"data.data_dir": data_dir})
    device = preflight(config)
    from pipelines.data import load_splits

    splits = load_splits(config.data, device)
    refuse_other_data(run_id, original.get("data", {}).get("source_files_sha256", {}), splits.source_files,
                      config.data.dataset)
    if experiment is None and not (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
        experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    # Heavy imports only once the input is known to be good.
    from pipelines.recording.record import FULL, record_run
    from pipelines.training.train import train

    with (entry_point_run(experiment, run_name or f"reproduce-{run_id[:8]}", tags={REPRODUCES_TAG: run_id}) as logger,
          run_system_metrics(logger, config.execution)):
        result = train(config, logger, splits=splits)
        record_run(logger, result, config, FULL)
        rerun = load_manifest(logger.client, logger.run_id)
        chosen = (explicit_tolerance(tolerance) if tolerance is not None
                  else default_tolerance(original, rerun))
        report = build_report(original, rerun, original_weights, result.model.state_dict(), chosen)
        logger.log_dict(report, REPORT_JSON)
        logger.log_text(report_markdown(report), REPORT_MARKDOWN)
        logger.set_tags({VERDICT_TAG: report["verdict"]})
        if report["weights"]["max_abs_diff"] is not None:
            logger.log_metrics({"reproduction/max_abs_weight_diff": report["weights"]["max_abs_diff"]}, step=0)
    return report

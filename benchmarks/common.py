"""Shared helpers for benchmark scripts: hardware string, result-file writing."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from latentreason.io import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def hardware() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{model}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def write_results(name: str, command: str, rows: list[dict[str, Any]], *, path: Path | None = None, **extra: Any) -> Path:
    """Write benchmarks/results/<name>.json (or ``path``) in the project's result convention, atomically."""
    path = RESULTS / f"{name}.json" if path is None else Path(path)
    doc = {"benchmark": name, "command": command.strip(), "hardware": hardware(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **extra, "rows": rows}
    atomic_write_json(path, doc)
    return path


def earlier_rows(name: str, metric: str | None = None, method_prefix: str = "") -> list[dict[str, Any]]:
    """Rows of ``metric`` (any, if None) whose method starts with ``method_prefix`` in the published
    ``<name>.json``: a rebuild that does not re-time keeps the timings measured earlier (on an idle
    machine), and the rows only a slower pass computes, instead of dropping them. Each says when it
    was measured (``carried``: the date of the file it came from), as the file's own date is the rebuild's."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    return [{**r, "carried": r.get("carried", doc.get("date"))} for r in doc["rows"]
            if metric in (None, r.get("metric")) and str(r.get("method", "")).startswith(method_prefix)]


def carry_published(name: str, rows: list[dict[str, Any]], values: dict[tuple[str, str], list[tuple[Any, float]]] | None = None,
                    *, skip_metrics: tuple[str, ...] = (), skip_methods: tuple[str, ...] = (),
                    into_means: Any = None, seedless: bool = False, unchecked: tuple[str, ...] = (),
                    differences: list[str] | None = None) -> list[dict[str, Any]]:
    """``rows`` (rebuilt from the runs on disk) plus the per-seed rows of the published ``<name>.json``
    whose run (method, seed) is not among them: runs/ is not versioned, so a rebuild on a fresh clone
    (or after runs were pruned) adds to the result file instead of dropping what was measured before.
    Carried rows say so (``carried``: the date of the file they came from) and join ``values`` (for
    the seed means) where ``into_means(row)`` allows. Rows of ``skip_metrics``, and of methods starting
    with one of ``skip_methods``, are left to their own mechanism (timings: ``earlier_rows``).

    A rebuilt row whose published value differs is reported on stderr (and appended to
    ``differences``), except for ``unchecked`` metrics (timings that are carried but may move).
    ``seedless``: a file of one run per method (rows without a seed) carries by method."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return rows
    doc = json.loads(path.read_text())
    have = {(r["method"], r.get("seed")) for r in rows}
    before = {(r["method"], r.get("seed"), r.get("metric")): r["value"] for r in doc["rows"]}
    for r in rows:  # a run redone (other code, other machine) that disagrees: carried rows may rest on the old one
        old = before.get((r["method"], r.get("seed"), r.get("metric")))
        if (r.get("seed") != "mean" and old is not None and old != r["value"]
                and r.get("metric") not in skip_metrics + unchecked):
            seed = "" if r.get("seed") is None else f" seed {r.get('seed')}"
            line = f"{name}: {r['method']}{seed} {r.get('metric')} was {old} ({doc.get('date')}), is {r['value']} on disk now"
            print(line, file=sys.stderr)
            if differences is not None:
                differences.append(line)
    kept_seeds = (None, "mean") if not seedless else ("mean",)
    carried = [{**r, "carried": r.get("carried", doc.get("date"))} for r in doc["rows"]
               if r.get("seed") not in kept_seeds and r.get("metric") not in skip_metrics
               and not str(r["method"]).startswith(skip_methods)
               and (r["method"], r.get("seed")) not in have]
    if values is not None:
        for r in carried:
            if into_means is None or into_means(r):
                values.setdefault((r["method"], r["metric"]), []).append((r["seed"], r["value"]))
        for items in values.values():
            items.sort(key=lambda item: item[0])
    return rows + carried


def code_of(summary_path: Path) -> dict[str, Any]:
    """The commits that trained and evaluated a model, for its result rows, from the provenance stamped
    on an evaluation's summary.json and on its run's train_summary.json (the eval folder's parent);
    nothing for summaries written before the stamp existed."""
    summary_path = Path(summary_path)
    out = {}
    for key, path in (("trained_with", summary_path.parent.parent / "train_summary.json"), ("evaluated_with", summary_path)):
        if path.exists():
            commit = (json.loads(path.read_text()).get("provenance") or {}).get("commit")
            if commit:
                out[key] = commit
    return out


def summary_rows(summary: dict[str, Any], model: str, method: str, **fields: Any) -> list[dict[str, Any]]:
    """accuracy, accuracy_flexible and mean reasoning positions rows from a harness summary."""
    base = {"task": summary["task"], "model": model, "method": method, "split": summary["split"],
            **{k: summary[k] for k in ("device", "dtype") if k in summary}, **fields}
    return [
        {**base, "metric": "accuracy", "value": summary["accuracy"], "n": summary["n"], "ci95": summary["accuracy_ci95"]},
        {**base, "metric": "accuracy_flexible", "value": summary["accuracy_flexible"], "n": summary["n"]},
        {**base, "metric": "mean_reasoning_positions", "value": summary["mean_reasoning_positions"], "n": summary["n"]},
        {**base, "metric": "questions_per_second", "value": summary["questions_per_second"], "n": summary["n"]},
    ]


def seed_mean_rows(values: dict[tuple[str, str], list[tuple[Any, float]]], **fields: Any) -> list[dict[str, Any]]:
    """One row per (method, metric) measured on two or more seeds: mean, sample std, min, max."""
    import statistics

    rows = []
    for (method, metric), items in values.items():
        if len(items) < 2:
            continue
        vals = [v for _, v in items]
        rows.append({**fields, "method": method, "seed": "mean", "metric": metric,
                     "value": round(statistics.mean(vals), 4), "n": len(vals), "seeds": [sd for sd, _ in items],
                     "std": round(statistics.stdev(vals), 4), "min": round(min(vals), 4), "max": round(max(vals), 4),
                     "note": "n = training seeds; std = sample standard deviation over seeds"})
    return rows


def timed_train_step(method: Any, modules: Any, batch: dict[str, Any], optimizer: Any) -> float:
    """Seconds of one training step of ``method`` on ``batch``: forward, backward, optimizer step."""
    import time

    t0 = time.perf_counter()
    out = method.loss(modules, batch)
    (out["loss_sum"] / batch["num_targets"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def alternate_timings(method: Any, examples: list[Any], runs: dict[str, Any], batch_size: int,
                      reps: int) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Wall-clock seconds per round and the medians of the rollout's phase split (prefill, the
    references' prefill, latent, decode) of each run config in ``runs``, generating ``examples``
    with ``method``: the configs alternate back to back (forward, then backward) for ``reps``
    rounds after one warm-up round, which is dropped. Why: timings on a shared machine compare
    only side by side."""
    from latentreason.eval.harness import PHASES
    from latentreason.methods.base import generate_batches

    seconds: dict[str, list[float]] = {k: [] for k in runs}
    phases: dict[str, dict[str, list[float]]] = {k: {} for k in runs}
    for r in range(reps + 1):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            method.run = runs[key]
            split: dict[str, float] = {}
            t0 = time.perf_counter()
            for done in generate_batches(method, examples, batch_size=batch_size):
                for timing, phase in PHASES.items():
                    split[phase] = split.get(phase, 0.0) + done.output.timings.get(timing, 0.0)
            if r:
                seconds[key].append(time.perf_counter() - t0)
                for phase, v in split.items():
                    phases[key].setdefault(phase, []).append(v)
    medians = {k: {phase: round(statistics.median(vs), 3) for phase, vs in split.items() if statistics.median(vs) > 0}
               for k, split in phases.items()}
    return seconds, medians

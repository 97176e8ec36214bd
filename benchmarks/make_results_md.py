"""Render benchmarks/RESULTS.md from benchmarks/results/*.json: only measured numbers, each with its command.

    python benchmarks/make_results_md.py
"""
from __future__ import annotations

import json

from common import ROOT

from latentreason.io import atomic_write_text

INTRO = """# Results

Every number below was produced by the command shown above its table, on the hardware named there,
and is read from `benchmarks/results/<name>.json` (regenerate this page with
`python benchmarks/make_results_md.py`; check the files with `python ../shared/tools/check_results.py`).
Timings on a shared 2-core machine are noisy: speed is reported as ratios measured side by side in
one run. Accuracy is a fraction of `n` questions, with its 95% Wilson interval where given.
The runs behind a file live in `runs/`, which is not versioned: a `--collect` on another machine
rebuilds the file from the runs it finds and carries the rows of the runs it does not find, each
marked `carried=<date of the file it came from>` (timing rows kept from an earlier pass are marked so
only since 2026-12-07: an unmarked timing row in an older file may come from an earlier pass of the
same bench); a carried row may rest on a base model that has since been re-trained (the bench
prints where a re-run disagrees with the published value). Rows of the tiny-model benches
(`bench_baselines.py`, `bench_latent_sft.py`) trained since 2026-11-27 name the commits that trained
and evaluated their model (`trained_with`, `evaluated_with`; `+dirty` when the checkout had
uncommitted changes); the refinement, SmolLM2 and Coconut-budget benches do not record them.
"""


def fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    parts = [INTRO]
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        parts.append(f"## {doc['benchmark']}\n\n`{doc['command']}`  \n{doc['hardware']}, {doc['date']}\n")
        if doc.get("note"):
            parts.append(f"{doc['note']}\n")
        parts.append("| task | model | method | metric | value | n | details |\n|---|---|---|---|---|---|---|")
        for row in doc["rows"]:
            skip = {"task", "model", "method", "metric", "value", "n"}
            details = ", ".join(f"{k}={fmt(v) if not isinstance(v, list) else '[' + ', '.join(fmt(x) for x in v) + ']'}"
                                for k, v in row.items() if k not in skip)
            parts.append(f"| {row['task']} | {row['model']} | {row['method']} | {row['metric']} | {fmt(row['value'])} "
                         f"| {row.get('n', '')} | {details} |")
        parts.append("")
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.md")):  # views made by latentreason compare
        parts.append(f"## {path.stem}\n\n{path.read_text().strip()}\n")
    atomic_write_text(ROOT / "benchmarks" / "RESULTS.md", "\n".join(parts) + "\n")
    print(ROOT / "benchmarks" / "RESULTS.md")


if __name__ == "__main__":
    main()

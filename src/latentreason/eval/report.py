"""Tables and plots from evaluation summaries (matplotlib only when plotting).

``compare`` reads finished evaluation folders (``latentreason compare``); it never runs a model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentreason.io import PARTIAL_PREFIX, atomic_write_json, atomic_write_text


def table(summaries: list[dict[str, Any]]) -> str:
    """A fixed-width comparison table: one row per evaluated method."""
    head = f"{'method':14} {'task':10} {'split':6} {'n':>5} {'accuracy':>9} {'95% CI':>15} {'flexible':>9} {'reason.pos':>10} {'q/s':>8}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        lo, hi = s["accuracy_ci95"]
        lines.append(
            f"{s['method']:14} {s['task']:10} {s['split']:6} {s['n']:>5} {s['accuracy']:>9.3f} "
            f"{f'[{lo:.3f},{hi:.3f}]':>15} {s['accuracy_flexible']:>9.3f} {s['mean_reasoning_positions']:>10.1f} "
            f"{s['questions_per_second']:>8.1f}"
        )
    return "\n".join(lines)


def plot_accuracy_vs_positions(summaries: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy (with its 95% interval) against mean reasoning positions, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in summaries:
        lo, hi = s["accuracy_ci95"]
        x, y = s["mean_reasoning_positions"], s["accuracy"]
        ax.errorbar([x], [y], yerr=[[max(y - lo, 0.0)], [max(hi - y, 0.0)]], fmt="o", capsize=4, label=s["method"])
        ax.annotate(f"{s['method']} {y:.0%}", (x, y), textcoords="offset points", xytext=(6, -12))
    ax.set_xlabel("mean reasoning positions per question (latent steps + chain tokens)")
    ax.set_ylabel("accuracy (strict)")
    ax.set_ylim(-0.02, 1.05)
    ax.margins(x=0.2)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


# -- latentreason compare -------------------------------------------------------------------------
@dataclass
class Comparison:
    """What :func:`compare` wrote: one row per evaluation folder, and the files."""

    task: str
    split: str
    rows: list[dict[str, Any]]
    markdown: str
    table_path: Path
    json_path: Path
    figure_path: Path


def _parse_spec(spec: str) -> tuple[Path, str | None]:
    """``folder`` or ``folder=label``; an existing folder whose name holds '=' is taken whole."""
    if Path(spec).is_dir() or "=" not in spec:
        return Path(spec), None
    folder, _, label = spec.rpartition("=")
    return Path(folder), label or None


def _read_eval(folder: Path) -> dict[str, Any]:
    summary_path, rows_path = folder / "summary.json", folder / "predictions.jsonl"
    for path in (summary_path, rows_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; {folder} is not a finished evaluation (run latentreason eval)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{summary_path}: not valid JSON ({exc}); run latentreason eval again") from exc
    missing = [k for k in ("task", "split", "method", "n", "accuracy", "accuracy_ci95") if k not in summary]
    if missing:
        raise ValueError(f"{summary_path}: lacks {', '.join(missing)}; not a summary written by latentreason eval")
    config = folder / "eval_config.json"
    try:
        summary["_settings"] = json.loads(config.read_text()) if config.exists() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config}: not valid JSON ({exc}); run latentreason eval again") from exc
    return summary


def _questions(folder: Path) -> dict[str, str]:
    """Question id -> question text of an evaluation's rows."""
    from latentreason.io import read_jsonl

    return {str(r["id"]): str(r.get("question", "")) for r in read_jsonl(folder / "predictions.jsonl", drop_torn_tail=True)}


def _refine_label(settings: dict[str, Any]) -> str:
    """' + residual (alpha 0.5) + contrastive (eta 8)' where the evaluation refined its latents."""
    parts = []
    if settings.get("refine.residual"):
        parts.append(f"residual (alpha {settings.get('refine.alpha')})")
    if settings.get("refine.contrastive"):
        parts.append(f"contrastive (eta {settings.get('refine.eta')})")
    return "".join(f" + {p}" for p in parts)


def compare(eval_dirs: list[str], out: str | Path, title: str | None = None) -> Comparison:
    """One table (compare.md, compare.json) and one figure (compare.png) over evaluations of ONE task and split.

    ``eval_dirs`` are folders written by ``latentreason eval`` (summary.json + predictions.jsonl),
    each optionally ``folder=label`` (default label: the method name, plus the probe if any).
    Seconds per question is the inverse of the summary's questions_per_second, so it depends on
    the device and batch size each evaluation ran with. The prefill share (the prompts' prefill,
    the references' included, over the rollout's time; from ``seconds_by_phase``) says how much of
    that time fewer reasoning positions could ever save. Mixed tasks or splits are refused:
    accuracies on different questions do not compare.
    """
    if not eval_dirs:
        raise ValueError("compare: give at least one evaluation folder")
    rows: list[dict[str, Any]] = []
    for spec in eval_dirs:
        folder, label = _parse_spec(spec)
        s = _read_eval(folder)
        probe = s.get("probe") or "none"
        qps = float(s.get("questions_per_second") or 0.0)
        lo, hi = s["accuracy_ci95"]
        phases = s.get("seconds_by_phase") or {}
        total = sum(phases.values())
        refine = _refine_label(s["_settings"])
        rows.append({
            "label": label or (s["method"] + refine if probe == "none" else f"{s['method']}{refine} ({probe} probe)"),
            "folder": str(folder), "method": s["method"], "model": s.get("model", ""),
            "task": s["task"], "task_version": s.get("task_version"), "split": s["split"],
            "accuracy": s["accuracy"], "accuracy_ci95": [lo, hi], "n": s["n"],
            "mean_reasoning_positions": s.get("mean_reasoning_positions", 0.0),
            "mean_latent_steps": s.get("mean_latent_steps", 0.0),
            "seconds_per_question": 1.0 / qps if qps > 0 else None,
            "prefill_share": (phases.get("prefill", 0.0) + phases.get("reference_prefill", 0.0)) / total if total > 0 else None,
            "probe": probe, "device": s.get("device"), "refine": refine.lstrip(" +") or None,
            "questions": _questions(folder),
        })
    kinds = {(r["task"], r["task_version"], r["split"]) for r in rows}
    if len(kinds) > 1:
        listing = "; ".join(f"{r['folder']} ({r['task']} v{r['task_version']}, split {r['split']})" for r in rows)
        raise ValueError(f"compare: the folders evaluate different tasks or splits: {listing}. "
                         "Compare one task and split at a time")
    seen: dict[str, tuple[str, str]] = {}  # question id -> (its text, the folder that had it first)
    for r in rows:  # the same task and split, but other questions under the same ids (a generator's seed, a file)
        for qid, text in r.pop("questions").items():
            first = seen.setdefault(qid, (text, r["folder"]))
            if first[0] != text:
                raise ValueError(f"compare: question {qid!r} is {first[0]!r} in {first[1]} but {text!r} in {r['folder']}: "
                                 "the folders evaluate different questions (other data.options or data.path)")
    task, split = rows[0]["task"], rows[0]["split"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = compare_table(rows, title or f"{task} ({split})")
    table_path, json_path = out / "compare.md", out / "compare.json"
    atomic_write_text(table_path, markdown + "\n")
    atomic_write_json(json_path, {"task": task, "split": split, "rows": rows})
    figure_path = plot_compare(rows, out / "compare.png", title or f"{task} ({split})")
    return Comparison(task, split, rows, markdown, table_path, json_path, figure_path)


def compare_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """A markdown table: one line per evaluation; the probe and prefill-share columns only where some
    row has one."""
    probed = any(r["probe"] != "none" for r in rows)
    timed = any(r.get("prefill_share") is not None for r in rows)
    head = ["label", "method", "model", "accuracy", "95% CI", "n", "reasoning positions", "s / question"]
    head += ["prefill share"] if timed else []
    head += ["probe"] if probed else []
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        sec = r["seconds_per_question"]
        cells = [r["label"], r["method"], r["model"], f"{r['accuracy']:.3f}", f"[{lo:.3f}, {hi:.3f}]", str(r["n"]),
                 f"{r['mean_reasoning_positions']:.1f}", "-" if sec is None else f"{sec:.4f}"]
        share = r.get("prefill_share")
        cells += (["-" if share is None else f"{share:.0%}"]) if timed else []
        cells += [r["probe"]] if probed else []
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def plot_compare(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Two panels: accuracy (95% interval bars) against mean reasoning positions, and against seconds per question."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = [("mean_reasoning_positions", "mean reasoning positions per question"),
              ("seconds_per_question", "seconds per question")]
    for ax, (key, xlabel) in zip(axes, panels):
        for i, r in enumerate(rows):
            x = r[key]
            if x is None:
                continue
            lo, hi = r["accuracy_ci95"]
            y = r["accuracy"]
            ax.errorbar([x], [y], yerr=[[max(y - lo, 0.0)], [max(hi - y, 0.0)]], fmt="o", capsize=4,
                        color=f"C{i % 10}", label=r["label"])
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.2)
    axes[0].set_ylabel("accuracy (strict)")
    axes[0].set_ylim(-0.02, 1.05)
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Write the figure beside its target and rename it into place: a killed run leaves no half PNG."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.stem}{path.suffix or '.png'}")  # the format follows the name (pdf, svg)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def inspect_latents(method: Any, example: Any, out: str | Path | None = None, top: int = 5) -> tuple[str, Path | None]:
    """Each latent step of one question: its top-``top`` tokens with probabilities and the entropy of
    the full distribution (the superposition made visible); as text, and as a figure when ``out``.

    Runs the method's own latent step through the shared rollout, keeping full distributions.
    """
    import dataclasses

    import torch

    from latentreason.models.rollout import rollout

    lm = method.loaded
    cfg = dataclasses.replace(method.rollout_config(), keep_distributions="full")
    with torch.inference_mode():
        res = rollout(lm.model, method.prompt_ids([example]), method.latent_step([example]), cfg,
                      eos_ids=lm.eos_ids, pad_id=lm.pad_id, eot_id=lm.eot_id)
    steps = int(res.num_latent_steps[0])
    if res.dist_probs is None or steps == 0:
        return f"{example.id}: the method fed no latent step\n", None
    probs = res.dist_probs[0, :steps].float()
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
    values, ids = probs.topk(min(top, probs.shape[-1]), dim=-1)
    tokens = [[lm.tokenizer.decode([i]) for i in row] for row in ids.tolist()]
    answer = lm.tokenizer.decode(res.tokens[0], skip_special_tokens=True)
    lines = [f"question {example.id}: {example.question!r}", f"answer written: {answer!r}  (gold {example.answer!r})",
             f"{'step':>4}  {'entropy':>7}  top-{values.shape[1]} tokens"]
    for t in range(steps):
        cells = "  ".join(f"{tok!r} {p:.3f}" for tok, p in zip(tokens[t], values[t].tolist()))
        lines.append(f"{t + 1:>4}  {float(entropy[t]):7.3f}  {cells}")
    text = "\n".join(lines) + "\n"
    if out is None:
        return text, None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * steps + 2), 4.5))
    bottom = [0.0] * steps
    for j in range(values.shape[1]):
        heights = values[:, j].tolist()
        ax.bar(range(1, steps + 1), heights, bottom=bottom, color=plt.cm.tab10(j % 10), edgecolor="white")
        for t, (h, b) in enumerate(zip(heights, bottom)):
            if h > 0.06:
                ax.text(t + 1, b + h / 2, tokens[t][j].strip() or repr(tokens[t][j]), ha="center", va="center", fontsize=8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax2 = ax.twinx()
    ax2.plot(range(1, steps + 1), entropy.tolist(), "k.--", label="entropy (nats)")
    ax2.set_ylabel("entropy of the step's distribution (nats)")
    ax.set_xlabel("latent step")
    ax.set_ylabel(f"probability of the top {values.shape[1]} tokens")
    ax.set_ylim(0, 1)
    ax.set_title(f"{method.name}: {example.id}")
    Path(out).mkdir(parents=True, exist_ok=True)
    path = _save(fig, Path(out) / f"latents-{example.id}.png")
    (Path(out) / f"latents-{example.id}.txt").write_text(text)
    return text, path


def read_curve(log: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in a training log (``log.jsonl`` or the run folder holding it)."""
    from latentreason.io import read_jsonl

    path = Path(log)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training log here (train writes <train.output_dir>/log.jsonl)")
    rows = [(int(r["step"]), float(r[key])) for r in read_jsonl(path, drop_torn_tail=True) if key in r]
    if not rows:
        raise ValueError(f"{path}: no rows with {key!r} (an RL run logs reward, reward_correct, ...; "
                         "every run logs loss)")
    return rows


def plot_curves(logs: dict[str, str | Path], path: str | Path, key: str = "reward", smooth: int = 1,
                title: str = "", groups: dict[str, str] | None = None) -> Path:
    """One line per run of ``key`` against the training step (a trailing mean over ``smooth`` logged
    rows); runs of one group share a colour and a legend entry (``groups``: label -> group; by
    default the label's text before '/', e.g. the seeds ``coconut/0``, ``coconut/1`` of one method)."""
    if smooth < 1:  # checked first: a window of 0 rows would divide by zero, after reading every log
        raise ValueError(f"smooth must be at least 1 (the number of logged rows each point averages; "
                         f"1 = no smoothing), got {smooth}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    colours: dict[str, str] = {}
    for label, log in logs.items():
        steps, values = zip(*read_curve(log, key))
        smoothed = [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1])
                    for i in range(len(values))]
        group = (groups or {}).get(label, label.split("/")[0])
        first = group not in colours
        colour = colours.setdefault(group, f"C{len(colours) % 10}")
        ax.plot(steps, smoothed, color=colour, alpha=0.85, lw=1.2, label=group if first else None)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8)
    ax.set_xlabel("training step")
    ax.set_ylabel(key if smooth <= 1 else f"{key} (mean of {smooth} logged rows)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)

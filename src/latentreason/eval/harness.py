"""The evaluation harness: one batched loop for every method, resumable, one JSONL row per example.

    latentreason eval model.name_or_path=runs/arith-cot/final data.task=arith method.name=cot-sft

The method decides the prompt and the latent step; the shared rollout generates; the task
extracts and checks (strict and flexible). Rows are appended and synced batch by batch, so a
killed run resumes where it stopped, with nothing redone; ``summary.json`` is written atomically.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from latentreason.config import ADDED_FIELDS
from latentreason.data.base import ANSWER_DELIMITER, Example
from latentreason.eval.metrics import mean, wilson_interval
from latentreason.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    one_writer,
    provenance,
    read_jsonl,
)
from latentreason.methods.base import Method, generate_batches, probed_step, row_seeds  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    id: str
    question: str
    gold: str
    output: str
    prediction: str | None
    prediction_flexible: str | None
    correct: bool
    correct_flexible: bool
    latent_steps: int
    reasoning_positions: int  # latent steps + explicit chain tokens written before the answer line
    generated_tokens: int
    seconds: float  # this example's share of its batch's wall-clock time
    #: ECR@1/5/10, N_eff, N_eff/N_eff_naive, Top-2 (mixture-latent methods; see eval/superposition.py)
    superposition: dict[str, Any] | None = None
    #: under refinement, how far each operator moved this row's latents, relative to their norm
    #: (mean over its latents; see ``RefineStep``)
    refine_shift: dict[str, float] | None = None
    #: this example's share of each phase of its batch's rollout, in seconds: ``prefill``, ``latent``,
    #: ``decode`` and, under refinement, ``reference_prefill`` (the references reading the prompts)
    phase_seconds: dict[str, float] | None = None
    #: this example's share of the row-steps its batch's loops computed (``latent``, ``decode``):
    #: rows that stopped still step, masked, until their batch's longest row ends or they step
    #: aside (``rollout.compact``); see ``batch_step_use``
    row_steps: dict[str, float] | None = None
    #: the answer ended with an eos token (False: cut at ``rollout.max_new_tokens``)
    finished: bool | None = None


#: rollout timings (``RolloutOutput.timings``) that are phases of the wall-clock, by their row name
PHASES = {"prefill_s": "prefill", "reference_prefill_s": "reference_prefill", "latent_s": "latent", "decode_s": "decode"}


def _chain_tokens(texts: list[str], tokenizer: Any) -> list[int]:
    """Tokens written before the answer delimiter (all tokens if there is none)."""
    heads = [t.split(ANSWER_DELIMITER)[0] if ANSWER_DELIMITER in t else t for t in texts]
    heads = [h.rstrip() for h in heads]
    ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
    return [len(i) if h else 0 for i, h in zip(ids, heads)]


def predict(
    method: Method,
    examples: list[Example],
    batch_size: int,
    progress: bool = False,
    on_batch: Callable[[list[Prediction]], None] | None = None,
    probe: str = "none",
    probe_seed: int = 0,
    metrics: bool = True,
) -> list[Prediction]:
    """Generate (:func:`~latentreason.methods.base.generate_batches`, the loop ``Method.generate``
    shares) and score ``examples``.

    ``on_batch`` receives each finished batch's predictions (the harness appends them to disk).
    ``probe`` (``eval.probe``) wraps the method's latent step: see :func:`probed_step`.
    ``metrics=False`` skips the superposition metrics (selection during training needs the answers only).
    """
    task, tok = method.task, method.loaded.tokenizer
    rate = method.superposition_rate() if metrics else False
    if metrics and method.run.eval.n_eff_alignment == "encoder" and type(method).solution_latents is Method.solution_latents:
        raise ValueError(f"eval.n_eff_alignment=encoder: method {method.name!r} has no encoder latents to align "
                         "with (Latent-SFT stage 2 has); use position")
    preds: dict[int, Prediction] = {}
    bar = tqdm(total=len(examples), desc="eval", disable=not progress, dynamic_ncols=True)
    for done in generate_batches(method, examples, batch_size, probe=probe, probe_seed=probe_seed):
        idx, texts, out = done.indices, done.texts, done.output
        seconds = done.seconds / len(idx)
        phases = {name: round(out.timings[key] / len(idx), 6) for key, name in PHASES.items() if key in out.timings}
        chain = _chain_tokens(texts, tok)
        ran = {k: round(out.timings[f"{k}_row_steps"] / len(idx), 4) for k in ("latent", "decode")
               if f"{k}_row_steps" in out.timings}
        latent, finished = out.num_latent_steps.tolist(), out.finished.tolist()
        measured = rate is not False and out.dist_probs is not None and out.dist_ids is not None and probe == "none"
        # one copy to the host per batch, not one device wait per row
        dists = (out.dist_probs.float().cpu(), out.dist_ids.cpu()) if measured else None
        fed = out.latents.float().cpu() if measured and method.run.eval.n_eff_alignment == "encoder" else None
        refs = _references(method, [examples[i] for i in idx], latent, rate) if fed is not None else {}
        for j, (i, text) in enumerate(zip(idx, texts)):
            ex = examples[i]
            score = task.score(text, ex)
            extra = _superposition(method, ex, dists[0][j, :latent[j]], dists[1][j, :latent[j]], rate,
                                   None if fed is None else fed[j, :latent[j]], refs.get(j)) if dists else None
            preds[i] = Prediction(
                id=ex.id, question=ex.question, gold=ex.answer, output=text, prediction=score.prediction,
                prediction_flexible=score.prediction_flexible, correct=score.correct,
                correct_flexible=score.correct_flexible, latent_steps=latent[j],
                reasoning_positions=latent[j] + chain[j], generated_tokens=len(out.tokens[j]), seconds=seconds,
                superposition=extra,
                refine_shift={op: round(v[j], 6) for op, v in done.refine_shift.items()} if done.refine_shift else None,
                phase_seconds=phases or None, row_steps=ran or None, finished=bool(finished[j]),
            )
        if on_batch is not None:
            on_batch([preds[i] for i in idx])
        bar.update(len(idx))
    bar.close()
    return [preds[i] for i in range(len(examples))]


def _solution_ids(method: Method, ex: Example) -> list[list[int]]:
    return method.loaded.tokenizer(method.task.solutions(ex), add_special_tokens=False)["input_ids"]


def _references(method: Method, batch: list[Example], latent: list[int], rate: int) -> dict[int, list[torch.Tensor]]:
    """For N_eff's encoder alignment: each row (of those with latents and >= 2 distinct solutions)
    -> the encoder's latents of its distinct solutions, each cut into the segments N_eff scores
    (:func:`~latentreason.eval.superposition.solution_segments`); one encoder pass per batch."""
    from latentreason.eval.superposition import distinct_solutions, solution_segments

    rows = {j: distinct_solutions(_solution_ids(method, ex)) for j, ex in enumerate(batch) if latent[j]}
    rows = {j: [solution_segments(s, latent[j], rate) for s in sols] for j, sols in rows.items() if len(sols) >= 2}
    if not rows:
        return {}
    found = method.solution_latents([batch[j] for j in rows], list(rows.values()))
    return dict(zip(rows, found))


def _superposition(method: Method, ex: Example, probs: torch.Tensor, ids: torch.Tensor, rate: int | None,
                   fed: torch.Tensor | None = None, references: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """One row's superposition metrics from the latent distributions the rollout kept (and, for
    N_eff's encoder alignment, the latents fed and the encoder's latents of each distinct solution)."""
    from latentreason.eval.superposition import question_metrics

    gold = method.loaded.tokenizer(method.task.chain_text(ex), add_special_tokens=False)["input_ids"]
    solutions = _solution_ids(method, ex)
    steps = probs.shape[0]
    r = rate if rate else max(1, -(-len(gold) // max(steps, 1)))  # no rate: the gold chain cut in #L parts
    metrics = question_metrics(probs, ids, gold, solutions, r, fed=fed, references=references)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def accuracy(method: Method, examples: list[Example], batch_size: int) -> float:
    """Strict accuracy, for model selection during training."""
    preds = predict(method, examples, batch_size, metrics=False)
    return mean([float(p.correct) for p in preds])


def summarise(rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    flexible = sum(bool(r["correct_flexible"]) for r in rows)
    seconds = sum(float(r["seconds"]) for r in rows)
    lo, hi = wilson_interval(correct, n)
    return {
        **info,
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [lo, hi],
        "accuracy_flexible": flexible / n if n else 0.0,
        "mean_reasoning_positions": mean([r["reasoning_positions"] for r in rows]),
        "mean_latent_steps": mean([r["latent_steps"] for r in rows]),
        "mean_generated_tokens": mean([r["generated_tokens"] for r in rows]),
        "questions_per_second": n / seconds if seconds else 0.0,
        **_superposition_summary(rows),
        **_refine_shift_summary(rows),
        **_phase_summary(rows),
        **_step_use_summary(rows),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance(),
    }


def _superposition_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over rows of each superposition metric (N_eff over questions with >= 2 solutions),
    plus Pass@1 / #L, the paper's efficiency ratio."""
    measured = [r["superposition"] for r in rows if r.get("superposition")]
    if not measured:
        return {}
    out: dict[str, Any] = {}
    for key in ("ecr@1", "ecr@5", "ecr@10", "ecr_next@1", "ecr_next@5", "ecr_next@10", "n_eff", "n_eff_over_naive", "top2"):
        values = [m[key] for m in measured if m.get(key) is not None]
        out[key] = mean(values) if values else None
    out["n_eff_questions"] = sum(1 for m in measured if m.get("n_eff") is not None)
    steps = mean([r["latent_steps"] for r in rows])
    # Pass@1 as a fraction: the paper's ratio takes it in percent (r = 2: 50.4 / 12.4 = 4.06 there, 0.0406 here)
    out["pass_at_1_over_latent_steps"] = (sum(bool(r["correct"]) for r in rows) / len(rows)) / steps if steps else None
    return out


def _phase_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``seconds_by_phase``: where the generation time went (prefill, latent steps, answer decoding,
    the references' prefill), summed over rows; omitted when a resumed row predates the field. Why:
    fewer reasoning positions only save wall-clock where the latent or decode phase dominates; on
    long prompts the prefill does (ProsQA's graphs)."""
    if not rows or any(not r.get("phase_seconds") for r in rows):
        return {}
    names = [n for n in PHASES.values() if any(n in r["phase_seconds"] for r in rows)]
    return {"seconds_by_phase": {n: round(sum(r["phase_seconds"].get(n, 0.0) for r in rows), 4) for n in names}}


def _step_use_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``batch_step_use``: per loop (``latent``, ``decode``), the share of the row-steps computed
    that served a row still reasoning or answering; the rest were stopped rows stepping, masked,
    for their batch's longest row. Why: a batch pays for its longest row, so a method that shortens
    most rows' reasoning but not the longest saves no wall-clock (one row in 500 that runs to the
    latent bound of 24 where the others take 9 nearly doubles its batch's latent phase), unless the
    stopped rows step aside (``rollout.compact``, once at most ``rollout.compact_at`` of the batch is still going). A row
    used ``generated_tokens`` answer steps, plus one for its eos if it wrote one."""
    if not rows or any(not r.get("row_steps") or r.get("finished") is None for r in rows):
        return {}
    out = {}
    for loop in ("latent", "decode"):
        ran = sum(r["row_steps"].get(loop, 0.0) for r in rows)
        if loop == "latent":
            used = sum(r["latent_steps"] for r in rows)
        else:
            used = sum(r["generated_tokens"] + int(r["finished"]) for r in rows)
        if ran:
            out[loop] = round(used / ran, 4)
    return {"batch_step_use": out} if out else {}


def _refine_shift_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``refine_shift``: per operator, the mean over rows of how far it moved the latents relative to
    their norm (what says whether a refinement setting was large enough to matter)."""
    measured = [r["refine_shift"] for r in rows if r.get("refine_shift")]
    if not measured:
        return {}
    ops = sorted({op for m in measured for op in m})
    return {"refine_shift": {op: mean([m[op] for m in measured if op in m]) for op in ops}}


# Config fields (``section`` or ``section.field``) known not to change a prediction row: where rows
# go, how many are asked for (a longer limit continues), batching (rows are batch-independent,
# sampled ones included: see row_seeds), what only training reads, and rollout outputs no row
# stores. Every other field, including any added later, guards the rows.
ROW_NEUTRAL_FIELDS: frozenset[str] = frozenset({
    "eval.output_dir", "eval.overwrite", "eval.limit", "eval.batch_size",
    "data.train_split", "data.valid_split", "data.train_limit",
    "train", "optim", "lora",
    "rollout.keep_distributions", "rollout.distribution_topk", "rollout.compact", "rollout.compact_at",
    "refine.sweep_alphas", "refine.sweep_etas", "refine.sweep_limit",
})


def eval_fingerprint(config: dict[str, Any], task_version: int | str | None = None) -> dict[str, Any]:
    """``section.field -> value`` for every field of ``config`` (a ``to_dict(run)``) that can change a row.

    Derived from the whole config minus :data:`ROW_NEUTRAL_FIELDS`, so a new field is covered
    without anyone remembering to list it.
    """
    out: dict[str, Any] = {}
    for section, fields in config.items():
        if section in ROW_NEUTRAL_FIELDS:
            continue
        for name, value in fields.items():
            key = f"{section}.{name}"
            if key not in ROW_NEUTRAL_FIELDS:
                out[key] = value
    refine = config.get("refine", {})
    if not (refine.get("residual") or refine.get("contrastive")):
        out = {k: v for k, v in out.items() if not k.startswith("refine.")}  # off: changes no row
    probe = config.get("eval", {}).get("probe")
    if probe == "shuffle":
        # the one case where rows depend on batching: each row is fed a batch-mate's latents
        out["eval.batch_size"] = config["eval"].get("batch_size")
    if probe != "noise":
        out.pop("eval.probe_seed", None)  # draws nothing
    if task_version is not None:
        out["task_version"] = task_version
    return out


def weights_identity(name_or_path: str) -> dict[str, list[int]] | None:
    """Size and modification time of a local model folder's weight files, for the fingerprint.

    Why: retraining into the same folder (``best/``, ``final/``) keeps ``model.name_or_path``;
    without this, rows of the old weights would resume into the new model's evaluation.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def evaluate(
    method: Method,
    examples: list[Example],
    output_dir: str | Path,
    batch_size: int = 32,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    fingerprint: dict[str, Any] | None = None,
    probe: str = "none",
    probe_seed: int = 0,
) -> dict[str, Any]:
    """Evaluate into ``output_dir`` (predictions.jsonl, summary.json), resuming finished rows.

    ``probe`` / ``probe_seed`` (``eval.probe``): see :func:`probed_step`; the summary records ``probe``.

    ``info`` (model, task, method, split ...) goes into the summary. ``fingerprint`` (default:
    ``info`` less ``command``; ``run_eval`` passes :func:`eval_fingerprint` of the whole config)
    must match an existing run's, so that rows of different settings never mix.

    Under ``accelerate launch`` each process takes every N-th unfinished question, batches its
    own share and appends to ``predictions.rank<i>.jsonl``; the first process then merges them.
    ``predictions.jsonl`` ends in question order, whatever the number of processes; a run
    killed at any point (one process or several) resumes with nothing lost or redone.
    """
    from latentreason.models.loading import process_state

    state = process_state()
    out = Path(output_dir)
    # a second evaluation into this folder is refused, never interleaved
    with one_writer(out, "eval.output_dir", enabled=state.is_main_process):
        return _evaluate(method, examples, out, batch_size, info, overwrite, progress, fingerprint, probe,
                         probe_seed, state)


def _evaluate(method: Method, examples: list[Example], out: Path, batch_size: int, info: dict[str, Any] | None,
              overwrite: bool, progress: bool, fingerprint: dict[str, Any] | None, probe: str,
              probe_seed: int, state: Any) -> dict[str, Any]:
    world, rank, main = state.num_processes, state.process_index, state.is_main_process
    out.mkdir(parents=True, exist_ok=True)
    rows_path, meta_path = out / "predictions.jsonl", out / "eval_config.json"
    info = dict(info or {})
    info.setdefault("command", " ".join(sys.argv))
    info.setdefault("processes", world)
    info["probe"] = probe
    if fingerprint is None:
        fingerprint = {k: v for k, v in info.items() if k not in ("command", "processes")}
    fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back from disk
    if not overwrite:
        _check_fingerprint(out, fingerprint)  # every process, before any waits: all refuse alike
    if main:
        if overwrite:
            for path in [rows_path, meta_path, out / "summary.json", *_rank_files(out)]:
                path.unlink(missing_ok=True)
        atomic_write_json(meta_path, fingerprint)
        have = {r["id"] for r in _merge_rows(out, examples)}  # rows of an earlier run, a killed multi-process one too
        if any(ex.id not in have for ex in examples):  # in progress: no summary (compare reads it) until it ends
            (out / "summary.json").unlink(missing_ok=True)
    state.wait_for_everyone()
    done = {r["id"]: r for r in read_jsonl(rows_path)} if rows_path.exists() else {}
    todo = [ex for ex in examples if ex.id not in done]
    if done and main:
        logger.info("resuming %s: %d of %d examples already done", out, len(examples) - len(todo), len(examples))
    mine = todo[rank::world]
    own_path = rows_path if world == 1 else out / f"predictions.rank{rank}.jsonl"

    def write(preds: list[Prediction]) -> None:
        append_jsonl(own_path, [asdict(p) for p in preds])

    if mine:
        predict(method, mine, batch_size, progress=progress and main, on_batch=write, probe=probe,
                probe_seed=probe_seed)
    state.wait_for_everyone()
    if main:
        rows = _merge_rows(out, examples)
        wanted = {ex.id for ex in examples}
        summary = summarise([r for r in rows if r["id"] in wanted], info)
        beyond = len(rows) - summary["n"]
        if beyond:  # an earlier, longer run's rows stay in the file: say so, or file and summary disagree
            summary["rows_beyond_this_evaluation"] = beyond
            logger.info("%s: predictions.jsonl also holds %d rows of an earlier, longer evaluation (after these %d); "
                        "summary.json covers these %d only", out, beyond, summary["n"], summary["n"])
        atomic_write_json(out / "summary.json", summary)
    state.wait_for_everyone()
    return json.loads((out / "summary.json").read_text())


def _rank_files(out: Path) -> list[Path]:
    return sorted(out.glob("predictions.rank*.jsonl"))



def _check_fingerprint(out: Path, fingerprint: dict[str, Any]) -> None:
    meta_path = out / "eval_config.json"
    has_rows = (out / "predictions.jsonl").exists() or bool(_rank_files(out))
    if not (meta_path.exists() and has_rows):
        return
    saved = json.loads(meta_path.read_text())
    saved = {**{k: v for k, v in ADDED_FIELDS.items() if k in fingerprint}, **saved}
    if saved != fingerprint:
        diff = [
            f"{k} (saved {_short(saved.get(k))}, now {_short(fingerprint.get(k))})"
            for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)
        ]
        raise ValueError(
            f"{out}: holds an evaluation with other settings (differs in {'; '.join(diff)}); "
            "use another eval.output_dir or eval.overwrite=true"
        )


def _merge_rows(out: Path, examples: list[Example]) -> list[dict[str, Any]]:
    """Fold per-process files into ``predictions.jsonl``, in question order, atomically.

    Torn last lines (a kill during an append) are dropped; rows of questions outside
    ``examples`` (an earlier, longer run) are kept after them in their previous order.
    """
    rows_path = out / "predictions.jsonl"
    rows: dict[str, dict[str, Any]] = {}
    for path in ([rows_path] if rows_path.exists() else []) + _rank_files(out):
        for row in read_jsonl(path, drop_torn_tail=True):
            rows.setdefault(row["id"], row)
    order = {ex.id: i for i, ex in enumerate(examples)}
    merged = sorted(rows.values(), key=lambda r: order.get(r["id"], len(order)))
    if rows or rows_path.exists():
        atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in merged))
    for path in _rank_files(out):
        path.unlink()
    return merged

"""Superposition metrics of mixture latents (Latent-SFT, arXiv 2510.15522; docs/methods.md section 1).

Each latent step t has a next-token distribution p_t (kept by the rollout as its top-k). Given the
explicit solutions of a question (token ids), these say how much of them the latents carry:

* **ECR@K**: step t aligned to segment t of the gold chain; the segment's distinct tokens found in
  the top-K of p_t, summed over steps, per latent step (explicit tokens carried per latent token).
  ``ecr_next@K``: the same against segment t + 1, the one the stage-1 decoder writes right after
  Z_t under the supervision mask (what Z_t is trained to carry; none after the last segment). On
  the arith Latent-SFT r = 4 model of benchmarks/ the latents carry the next segment far more than
  their own (ECR@1 0.34, ECR_next@1 0.80): read both.
* **N_eff**: each solution m cut into T_m = min(T, T'_m) near-equal segments, step t aligned to
  segment t; ``score_m`` = mean over steps of log(mass of p_t on the segment's tokens within its
  top-100); π = softmax(score); N_eff = exp(entropy of π) (1 = one path, M = all paths equally).
  ``n_eff_naive`` averages it over random one-to-one alignments of steps to segments; the ratio
  says how much the real alignment beats chance. Two alignments (``eval.n_eff_alignment``):
  ``position`` (the spec's version 1: step t to segment t; the naive draws any T_m of the T steps)
  and ``encoder`` (version 2, the authors' metric code: step t, in order, takes the unused segment
  whose stage-1 encoder latent is closest by cosine distance to the latent fed at step t; the
  encoder reads the solution cut into those very T_m segments, as the authors' code requires of
  its precomputed latents; the naive permutes the same T_m steps' segments at random).
* **Top-2**: π(2)/π(1) (our decision: the paper gives no formula).
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F


def split_even(tokens: Sequence[int], parts: int) -> list[list[int]]:
    """``tokens`` in ``parts`` contiguous segments whose lengths differ by at most one (longer first)."""
    if parts < 1:
        return []
    size, extra = divmod(len(tokens), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(tokens[start:end]))
        start = end
    return out


def _mass(probs: torch.Tensor, ids: torch.Tensor, segment: Sequence[int], top: int) -> float:
    """Σ over the segment's tokens (repeats counted) of p(v) when v is among the ``top`` most probable."""
    p = dict(zip(ids[:top].tolist(), probs[:top].tolist()))
    return sum(p.get(v, 0.0) for v in segment)


def solution_segments(solution: Sequence[int], steps: int, rate: int) -> list[list[int]]:
    """Solution m cut into T_m = min(T, ceil(len / rate)) near-equal segments: the segments N_eff
    scores, and (encoder alignment) the ones whose encoder latents the steps are matched to."""
    return split_even(solution, min(steps, max(1, math.ceil(len(solution) / rate))))


def path_scores(probs: torch.Tensor, ids: torch.Tensor, solutions: Sequence[Sequence[int]], rate: int,
                alignments: Sequence[Sequence[int]] | None = None, top: int = 100) -> list[float]:
    """``score_m`` for each solution. ``probs``/``ids`` are [T, k] sorted by probability.

    T'_m = ceil(len / rate) (the latents the solution would compress into); ``alignments[m]``
    (optional) gives, for each of solution m's segments in order, the latent step aligned to it.
    """
    steps = probs.shape[0]
    scores = []
    for m, sol in enumerate(solutions):
        segs = solution_segments(sol, steps, rate)
        parts = len(segs)
        order = list(range(parts)) if alignments is None else list(alignments[m])
        if len(order) != parts:
            raise ValueError(f"solution {m}: {len(order)} aligned steps for its {parts} segments")
        logs = [math.log(_mass(probs[t], ids[t], seg, top) + 1e-12) for t, seg in zip(order, segs)]
        scores.append(sum(logs) / parts)
    return scores


def weights(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    e = [math.exp(s - top) for s in scores]
    z = sum(e)
    return [x / z for x in e]


def n_eff(scores: Sequence[float]) -> float:
    pi = weights(scores)
    return math.exp(-sum(p * math.log(p) for p in pi if p > 0))


def top2(scores: Sequence[float]) -> float | None:
    if len(scores) < 2:
        return None
    pi = sorted(weights(scores), reverse=True)
    return pi[1] / pi[0]


def n_eff_naive(probs: torch.Tensor, ids: torch.Tensor, solutions: Sequence[Sequence[int]], rate: int,
                trials: int = 64, seed: int = 0, top: int = 100, within: bool = False) -> float:
    """N_eff averaged over random one-to-one alignments of latent steps to each solution's T_m
    segments: any T_m of the T steps, or (``within``, the encoder alignment's baseline) a
    permutation of the first T_m steps, the ones that alignment matches."""
    rng = random.Random(seed)
    steps = probs.shape[0]
    parts = [len(solution_segments(sol, steps, rate)) for sol in solutions]
    values = []
    for _ in range(trials):
        align = [rng.sample(range(p if within else steps), p) for p in parts]
        values.append(n_eff(path_scores(probs, ids, solutions, rate, align, top)))
    return sum(values) / len(values)


def encoder_alignment(fed: torch.Tensor, references: torch.Tensor) -> list[int]:
    """For each segment of a solution, the latent step aligned to it: steps 0..P-1 in order each
    take the closest unused segment (cosine distance between ``fed[t]`` and ``references[s]``, the
    encoder's latent of segment s), P = min(len(fed), len(references))."""
    parts = min(fed.shape[0], references.shape[0])
    a = F.normalize(fed[:parts].double(), dim=-1)
    b = F.normalize(references[:parts].double(), dim=-1)
    distance = (1 - a @ b.T).tolist()
    step_of = [0] * parts
    free = list(range(parts))
    for t in range(parts):
        s = min(free, key=lambda j: distance[t][j])  # ties: the earlier segment
        free.remove(s)
        step_of[s] = t
    return step_of


def ecr(probs: torch.Tensor, ids: torch.Tensor, gold: Sequence[int], rate: int, k: int,
        offset: int = 0) -> float | None:
    """Distinct tokens of gold segment t + ``offset`` found in the top-``k`` of step t, summed, per
    latent step (a step without such a segment finds none); None for a question without latent
    steps (tokens per latent step is undefined there: counting it 0 would pull the mean down)."""
    steps = probs.shape[0]
    if steps == 0:
        return None
    segs = [list(gold[i: i + rate]) for i in range(0, len(gold), rate)]
    found = 0
    for t in range(steps):
        if 0 <= t + offset < len(segs):
            found += len(set(segs[t + offset]) & set(ids[t, :k].tolist()))
    return found / steps


def distinct_solutions(solutions: Sequence[Sequence[int]]) -> list[list[int]]:
    """Non-empty solutions, each once, in first-seen order (the M of N_eff)."""
    return list({tuple(s): list(s) for s in solutions if s}.values())


def question_metrics(probs: torch.Tensor, ids: torch.Tensor, gold: Sequence[int],
                     solutions: Sequence[Sequence[int]], rate: int, seed: int = 0,
                     fed: torch.Tensor | None = None,
                     references: Sequence[torch.Tensor] | None = None) -> dict[str, float | None]:
    """Every metric for one question (``probs``/``ids``: its fed latent steps only, [T, k]).

    ``references`` (per distinct solution, in :func:`distinct_solutions` order, the encoder's
    latents of its :func:`solution_segments`, [T_m, d]) with ``fed`` ([T, d], the latents fed)
    switch N_eff to the encoder alignment.
    """
    out: dict[str, float | None] = {f"ecr@{k}": ecr(probs, ids, gold, rate, k) for k in (1, 5, 10)}  # None: no step
    out.update({f"ecr_next@{k}": ecr(probs, ids, gold, rate, k, offset=1) for k in (1, 5, 10)})
    distinct = distinct_solutions(solutions)
    if len(distinct) >= 2 and probs.shape[0] > 0:
        align = None
        if references is not None:
            if fed is None or len(references) != len(distinct):
                raise ValueError(f"encoder alignment needs the fed latents and one reference per distinct solution "
                                 f"({len(distinct)}), got {len(references)}")
            align = [encoder_alignment(fed, ref) for ref in references]
        scores = path_scores(probs, ids, distinct, rate, align)
        value = n_eff(scores)
        naive = n_eff_naive(probs, ids, distinct, rate, seed=seed, within=align is not None)
        out.update({"n_eff": value, "n_eff_over_naive": value / naive, "top2": top2(scores), "solutions": len(distinct)})
    else:
        out.update({"n_eff": None, "n_eff_over_naive": None, "top2": None, "solutions": len(distinct)})
    return out


def solutions_from_predictions(files: Sequence[str | Path], out: str | Path) -> dict[str, list[str]]:
    """Distinct explicit chains per question id from evaluation outputs (``predictions.jsonl`` of
    sampled runs of a CoT model, right or wrong, as the authors do), written to ``out`` as the JSONL
    ``eval.solutions`` reads. The chain is the output before the answer delimiter, whitespace-normalised."""
    from latentreason.data.base import ANSWER_DELIMITER
    from latentreason.io import atomic_write_text, iter_jsonl

    found: dict[str, dict[str, None]] = {}
    for file in files:
        for row in iter_jsonl(file):
            chain = " ".join(str(row.get("output", "")).split(ANSWER_DELIMITER)[0].split())
            if chain:
                found.setdefault(row["id"], {})[chain] = None
    result = {qid: list(chains) for qid, chains in found.items()}
    atomic_write_text(out, "".join(json.dumps({"id": q, "solutions": s}) + "\n" for q, s in result.items()))
    return result

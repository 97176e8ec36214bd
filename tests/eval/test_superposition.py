"""Superposition metrics against hand computations on a two-step toy."""
from __future__ import annotations

import math

import pytest
import torch

from latentreason.eval.superposition import (
    ecr,
    encoder_alignment,
    n_eff,
    n_eff_naive,
    path_scores,
    question_metrics,
    split_even,
    top2,
)

PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
IDS = torch.tensor([[5, 6, 7], [8, 5, 9]])
A, B = [5, 6, 8, 9], [7, 7, 5, 5]


def test_split_even():
    assert split_even([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_even([1, 2], 3) == [[1], [2], []]


def test_ecr_by_hand():
    assert ecr(PROBS, IDS, A, 2, 1) == 1.0  # 5 in step 0's top-1, 8 in step 1's
    assert ecr(PROBS, IDS, A, 2, 3) == 2.0  # {5, 6} and {8, 9}
    assert ecr(PROBS, IDS, [7, 7, 1, 2], 2, 3) == 0.5  # one distinct token found, over two steps
    # against the next segment: step 0 reads segment 1 ({8, 9}: none in its top-3), step 1 has none
    assert ecr(PROBS, IDS, A, 2, 3, offset=1) == 0.0
    assert ecr(PROBS, IDS, [1, 2, 5, 7], 2, 3, offset=1) == 1.0  # {5, 7} both in step 0's top-3, over 2 steps
    assert question_metrics(PROBS, IDS, [1, 2, 5, 7], [[1]], 2)["ecr_next@5"] == 1.0
    # a question without latent steps has no ECR (tokens per latent step): None, left out of the mean
    none = question_metrics(PROBS[:0], IDS[:0], A, [A], 2)
    assert none["ecr@1"] is None and none["ecr_next@10"] is None
    from latentreason.eval.harness import _superposition_summary

    rows = [{"superposition": question_metrics(p, i, A, [A], 2), "latent_steps": len(p), "correct": True}
            for p, i in ((PROBS, IDS), (PROBS[:0], IDS[:0]))]
    assert _superposition_summary(rows)["ecr@1"] == 1.0  # not (1.0 + 0) / 2


def test_path_scores_n_eff_and_top2_by_hand():
    sa = (math.log(0.8) + math.log(0.7)) / 2
    sb = (math.log(0.4) + math.log(0.6)) / 2  # repeated tokens count each time
    got = path_scores(PROBS, IDS, [A, B], 2)
    assert got == pytest.approx([sa, sb], abs=1e-6)
    pa = math.exp(sa) / (math.exp(sa) + math.exp(sb))
    assert n_eff(got) == pytest.approx(math.exp(-(pa * math.log(pa) + (1 - pa) * math.log(1 - pa))), abs=1e-9)
    assert top2(got) == pytest.approx(math.exp(sb - sa), abs=1e-6)
    assert n_eff([0.0, 0.0, 0.0]) == pytest.approx(3.0) and n_eff([0.0, -100.0]) == pytest.approx(1.0, abs=1e-6)
    # a token outside the top-`top` counts for nothing
    assert path_scores(PROBS, IDS, [A], 2, top=1)[0] == pytest.approx((math.log(0.5) + math.log(0.6)) / 2, abs=1e-6)


def test_naive_alignment_and_one_solution():
    # with the steps swapped the real alignment of A is lost: naive N_eff differs from the aligned one
    aligned = n_eff(path_scores(PROBS, IDS, [A, B], 2))
    naive = n_eff_naive(PROBS, IDS, [A, B], 2, trials=64, seed=0)
    assert naive != pytest.approx(aligned, abs=1e-3)
    combos = [n_eff(path_scores(PROBS, IDS, [A, B], 2, alignments=[a, b]))
              for a in ([0, 1], [1, 0]) for b in ([0, 1], [1, 0])]  # every one-to-one alignment of 2 steps
    assert min(combos) < naive < max(combos)
    one = question_metrics(PROBS, IDS, A, [A, list(A)], 2)
    assert one["n_eff"] is None and one["solutions"] == 1 and one["ecr@1"] == 1.0
    two = question_metrics(PROBS, IDS, A, [A, B], 2)
    assert two["n_eff"] == pytest.approx(aligned) and two["solutions"] == 2


def test_encoder_alignment_takes_the_closest_unused_segment_in_step_order():
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # step 0 takes segment 1, step 1 segment 0: the result is, per segment, its step
    assert encoder_alignment(torch.tensor([[0.0, 2.0], [3.0, 0.0]]), refs) == [1, 0]
    # both steps are closest to segment 0: the first takes it, the second gets what is left
    assert encoder_alignment(torch.tensor([[1.0, 0.0], [1.0, 0.2]]), refs) == [0, 1]
    assert encoder_alignment(torch.tensor([[1.0, 0.2], [1.0, 0.0]]), refs) == [0, 1]
    # more steps than segments: only the first len(refs) steps are matched (cosine: scale-free)
    assert encoder_alignment(torch.tensor([[0.0, 5.0], [0.1, 0.0], [1.0, 0.0]]), refs) == [1, 0]


def test_encoder_alignment_recovers_a_solution_whose_segments_the_steps_carry_out_of_order():
    c = [8, 9, 5, 6]  # A with its two segments swapped: step 1 carries [8, 9], step 0 carries [5, 6]
    fed = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    refs_c = torch.tensor([[0.0, 1.0], [1.0, 0.1]])  # the encoder's latent of c's segment 0 is near step 1's
    refs_b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sa = (math.log(0.8) + math.log(0.7)) / 2
    sb = (math.log(0.4) + math.log(0.6)) / 2
    by_position = question_metrics(PROBS, IDS, A, [c, B], 2)
    by_encoder = question_metrics(PROBS, IDS, A, [c, B], 2, fed=fed, references=[refs_c, refs_b])
    assert by_position["n_eff"] == pytest.approx(1.0, abs=1e-4)  # c's step-0 segment gets no mass
    assert by_encoder["n_eff"] == pytest.approx(n_eff([sa, sb]), abs=1e-9)
    assert by_encoder["top2"] == pytest.approx(math.exp(sb - sa), abs=1e-6)
    combos = [n_eff(path_scores(PROBS, IDS, [c, B], 2, alignments=[a, b]))
              for a in ([0, 1], [1, 0]) for b in ([0, 1], [1, 0])]
    naive = by_encoder["n_eff"] / by_encoder["n_eff_over_naive"]
    assert min(combos) < naive < max(combos)
    with pytest.raises(ValueError, match="one reference per distinct solution"):
        question_metrics(PROBS, IDS, A, [c, B], 2, fed=fed, references=[refs_c])
    with pytest.raises(ValueError, match="aligned steps"):  # an encoder that cut the solution otherwise
        question_metrics(PROBS, IDS, A, [c, B], 2, fed=fed, references=[refs_c[:1], refs_b])


def test_solutions_from_predictions_and_attach(tmp_path):
    import json

    from latentreason.data.base import DataError, Example, Task, attach_solutions
    from latentreason.eval.superposition import solutions_from_predictions

    preds = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    preds[0].write_text(json.dumps({"id": "q1", "output": "<<2*3=6>>  <<6+1=7>> #### 7"}) + "\n"
                        + json.dumps({"id": "q2", "output": "#### 5"}) + "\n")
    preds[1].write_text(json.dumps({"id": "q1", "output": "<<2*3=6>> <<6+1=7>>\n#### 8"}) + "\n"
                        + json.dumps({"id": "q1", "output": "<<3*2=6>> #### 6"}) + "\n")
    out = tmp_path / "solutions.jsonl"
    found = solutions_from_predictions(preds, out)
    # whitespace-normalised, deduplicated, right or wrong; an empty chain is no solution
    assert found == {"q1": ["<<2*3=6>> <<6+1=7>>", "<<3*2=6>>"]}
    examples = [Example("q1", "?", "7", "<<2*3=6>> <<6+1=7>>"), Example("q2", "?", "5", "<<5=5>>")]
    attached = attach_solutions(examples, out)
    assert Task().solutions(attached[0]) == ["<<2*3=6>> <<6+1=7>>", "<<3*2=6>>"]  # the gold chain once
    assert Task().solutions(attached[1]) == ["<<5=5>>"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q1", "solutions": ["a"]}) + "\n\n" + json.dumps({"id": "q2", "solutions": "a"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl: line 3: field 'solutions'"):  # the file's line, blank lines counted
        attach_solutions(examples, bad)
    bom = tmp_path / "bom.jsonl"  # a Windows tool's byte-order mark is no error; other bytes name the file
    bom.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())
    assert attach_solutions(examples, bom) == attached
    bom.write_bytes(out.read_bytes() + b"\xff\n")
    with pytest.raises(DataError, match="bom.jsonl: not UTF-8"):
        attach_solutions(examples, bom)
    other = tmp_path / "other.jsonl"  # ids of another scheme: N_eff would silently not be reported
    other.write_text(json.dumps({"id": "gsm8k-valid-0", "solutions": ["x"]}) + "\n")
    with pytest.raises(DataError, match="none of its 1 ids is a question evaluated here"):
        attach_solutions(examples, other)
    more = tmp_path / "more.jsonl"  # a file about more questions than evaluated (eval.limit): fine
    more.write_text(out.read_text() + json.dumps({"id": "q9", "solutions": ["y"]}) + "\n")
    assert attach_solutions(examples, more) == attached

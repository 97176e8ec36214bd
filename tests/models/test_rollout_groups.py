"""Sampling groups in the shared rollout: G answers per question from one prefill (RL's groups).

The contract: ``group_size=G`` computes exactly what the rollout computes for the prompt list with
every prompt repeated G times (same per-row seeds), while prefilling each prompt once; and the
log-probabilities it returns are those of the decoded tokens under the distribution they were
drawn from.
"""
from __future__ import annotations

import pytest
import torch

from latentreason.models.loading import LoadedModel
from latentreason.models.rollout import RolloutConfig, RolloutOutput, rollout
from latentreason.models.steps import ExternalStep, HiddenStateStep, LatentStep
from tests.models.test_rollout import NUM_LATENT, TEXTS, _assert_same, _load, _prompts

G = 3
SEEDS = [1000 + i for i in range(len(TEXTS) * G)]


@pytest.fixture(scope="module", params=["tiny-llama-l2-d64", "tiny-gpt2-l2-d64"])
def lm(request: pytest.FixtureRequest) -> LoadedModel:
    return _load(request.param)


def _vectors(lm: LoadedModel) -> torch.Tensor:
    """Per-sample latent chains (DLR: the G samples of a question differ in their latents)."""
    dim = lm.model.get_input_embeddings().weight.shape[1]
    return torch.randn(len(TEXTS) * G, NUM_LATENT, dim, generator=torch.Generator().manual_seed(3)) * 0.3


def _run(lm: LoadedModel, prompts: list[list[int]], step: LatentStep | None, group: int, **cfg: object) -> RolloutOutput:
    cfg = {"num_latent_steps": NUM_LATENT, "max_new_tokens": 6, **cfg}
    with torch.no_grad():
        return rollout(lm.model, prompts, step, RolloutConfig(**cfg), eos_ids=lm.eos_ids, pad_id=lm.pad_id,
                       eot_id=lm.eot_id, row_seeds=SEEDS, group_size=group, return_logprobs=True)


CASES = {
    "latents-greedy": lambda lm: ExternalStep(_vectors(lm), lengths=torch.tensor([3, 0, 5, 1] * G)),
    "hidden-sampled": lambda lm: HiddenStateStep(),
    "no-latents-sampled": lambda lm: None,
}
SAMPLED = {"latents-greedy": 0.0, "hidden-sampled": 0.9, "no-latents-sampled": 1.3}


CACHES = {"static": {}, "dynamic": {"cache": "dynamic"}, "uncached": {"use_cache": False}, "compiled": {"compile": True}}


@pytest.mark.parametrize("case,cache", [(c, k) for c in CASES for k in CACHES if k != "compiled" or c == "hidden-sampled"])
def test_a_group_is_its_prompts_repeated(lm: LoadedModel, case: str, cache: str) -> None:
    cache = CACHES[cache]
    prompts = _prompts(lm)
    repeated = [p for p in prompts for _ in range(G)]
    temperature = SAMPLED[case]
    grouped = _run(lm, prompts, CASES[case](lm), G, temperature=temperature, **cache)
    plain = _run(lm, repeated, CASES[case](lm), 1, temperature=temperature, **cache)
    _assert_same(grouped, plain)
    torch.testing.assert_close(grouped.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    assert len(grouped.tokens) == len(TEXTS) * G
    if temperature:  # the samples of a question differ: the group is not one answer copied
        assert any(len({tuple(t) for t in grouped.tokens[b * G:(b + 1) * G]}) > 1 for b in range(len(TEXTS)))


def test_a_group_prefills_each_prompt_once(lm: LoadedModel) -> None:
    widths: list[tuple[int, int]] = []
    embed = lm.model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, args, out: widths.append(tuple(args[0].shape)))
    try:
        _run(lm, _prompts(lm), HiddenStateStep(), G, temperature=0.9)
    finally:
        handle.remove()
    width = max(len(p) for p in _prompts(lm))
    prefills = [w for w in widths if w[1] == width]  # (the rollout also embeds a 4-token probe of row 0)
    assert len(prefills) == 1 and prefills[0][0] == len(TEXTS)  # B rows, not B·G
    assert all(w[0] == len(TEXTS) * G for w in widths if w[1] == 1)  # every later column: B·G rows


def test_logprobs_are_those_of_the_decoded_tokens(lm: LoadedModel) -> None:
    """Each token's log-probability under softmax(logits / T) of the model reading the prompt and
    the tokens before it (no latents: plain teacher forcing)."""
    temperature = 1.3
    out = _run(lm, _prompts(lm), None, G, temperature=temperature, num_latent_steps=0)
    prompts = [p for p in _prompts(lm) for _ in range(G)]
    checked = 0
    for row, (prompt, tokens) in enumerate(zip(prompts, out.tokens)):
        full = prompt + tokens
        with torch.no_grad():
            logits = lm.model(torch.tensor([full])).logits[0].float() / temperature
        expect = logits[len(prompt) - 1: len(full) - 1].log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[row, : len(tokens)], expect, atol=1e-4, rtol=0)
        checked += len(tokens)
    assert checked > len(prompts)


def test_group_size_must_be_positive(lm: LoadedModel) -> None:
    with pytest.raises(ValueError, match="group_size=0"):
        _run(lm, _prompts(lm), None, 0)


def test_group_seeds_depend_on_the_question_and_the_sample_index_only() -> None:
    from latentreason.data.base import Example
    from latentreason.methods.base import row_seeds

    a, b = (Example(id=i, question=i, answer="") for i in ("a", "b"))
    cfg = RolloutConfig(temperature=0.7, seed=5)
    both = row_seeds(cfg, [a, b], group_size=G)
    assert both[G:] == row_seeds(cfg, [b], group_size=G) and both[:G] == row_seeds(cfg, [a], group_size=G)
    assert len(set(both)) == 2 * G  # every sample its own stream
    from latentreason.models.rollout import derive_seed

    assert row_seeds(cfg, [a]) == [derive_seed(5, "a")]  # G = 1 keeps the keys evaluations resume with
    assert row_seeds(RolloutConfig(), [a, b], group_size=G) is None  # greedy

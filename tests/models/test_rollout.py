"""Tests for models/rollout.py: the one batched, KV-cached latent rollout.

The contract under test: every row of a left-padded batch computes what it would compute alone,
and the KV cache changes nothing, for every step function, including steps that stop rows at
different latent steps (which leaves holes in the cache that must not shift positions). The
reference for plain decoding is transformers' own ``generate``.

Tiny models are random, and a random tiny LM just repeats one token, which would make "tokens
equal" vacuous. ``_randomise`` re-draws the weights so the outputs vary with the input.
"""
from __future__ import annotations

import itertools
import types

import pytest
import torch
from torch._dynamo.utils import counters

import latentreason.models.rollout as rollout_module
from latentreason.models.loading import LoadedModel, ModelConfig, load_model
from latentreason.models.rollout import (
    ContextLengthError,
    NonFiniteLatentError,
    RolloutConfig,
    RolloutOutput,
    _select,
    check_context,
    derive_seed,
    rollout,
)
from latentreason.models.steps import (
    ExternalStep,
    HiddenStateStep,
    LatentStep,
    MixtureStep,
    ProbeStep,
    StepContext,
    StepResult,
)
from tests.models.host_syncs import HostSyncs

ARCHS = ["tiny-llama-l2-d64", "tiny-qwen2-l2-d64", "tiny-gpt2-l2-d64"]
TEXTS = ["hello world what", "hi", "a longer prompt here ok", "xyz"]  # uneven lengths: 16, 2, 23, 3
NUM_LATENT = 5
MAX_NEW = 6
ATOL = 1e-5
GAIN, EMBED_STD, FINAL_NORM, SEED = 1.0, 0.1, 0.3, 0  # see _randomise
EXTERNAL_LENGTHS = [3, 0, 5, 1]  # row 1 feeds nothing, row 2 the full budget
STEP_KINDS = ["hidden", "mixture-topk", "mixture-full", "external", "external-lengths", "mixture-stop"]


def _randomise(model: torch.nn.Module, seed: int = SEED) -> None:
    """Re-draw the weights so that decoded tokens depend on the input, yet stay float32-stable.

    Why: at HF's default init the residual stream just copies the input and every row decodes
    the same token, which would make "tokens equal" vacuous. Larger gains, embeddings or final
    norm make the fed-back latent loop chaotic instead: float32 rounding (~1e-7) that differs
    between padded and unpadded or cached and uncached runs then grows past 1e-5 within a few
    steps (float64 runs agree exactly). These scales keep the worst gap near 1e-6.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if name.endswith("bias"):  # e.g. Qwen2's q/k/v biases, zero at init
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif name in ("model.norm.weight", "transformer.ln_f.weight"):
                    p.fill_(FINAL_NORM)
            elif any(k in name for k in ("embed", "wte", "wpe")):
                p.copy_(torch.randn(p.shape, generator=g) * EMBED_STD)
            else:
                # GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in].
                fan_in = p.shape[0] if any(k in name for k in ("c_attn", "c_fc", "c_proj")) else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) * GAIN / fan_in**0.5)


def _load(name: str, **kwargs: object) -> LoadedModel:
    lm = load_model(ModelConfig(name_or_path=name, **kwargs))
    _randomise(lm.model)
    return lm


@pytest.fixture(scope="module", params=ARCHS)
def lm(request: pytest.FixtureRequest) -> LoadedModel:
    return _load(request.param)


def _prompts(lm: LoadedModel) -> list[list[int]]:
    return [lm.tokenizer.encode(t) for t in TEXTS]


def _run(
    lm: LoadedModel, prompts: list[list[int]], step: LatentStep | None, row_seeds: list[int] | None = None,
    eos_ids: list[int] | None = None, **cfg: object,
) -> RolloutOutput:
    cfg = {"num_latent_steps": NUM_LATENT, "max_new_tokens": MAX_NEW, **cfg}
    with torch.no_grad():
        return rollout(
            lm.model, prompts, step, RolloutConfig(**cfg), eos_ids=lm.eos_ids if eos_ids is None else eos_ids,
            pad_id=lm.pad_id, eot_id=lm.eot_id, row_seeds=row_seeds,
        )


_STOP_TOKENS: dict[str, int] = {}


def _stop_token(lm: LoadedModel) -> int:
    """A token that is the argmax at different latent steps for different rows (found by a first run).

    A stop rule stops a row at the first step whose logits have that argmax, so it fires at those
    steps; the precondition is asserted, so the stop tests cannot pass vacuously.
    """
    if lm.name not in _STOP_TOKENS:
        out = _run(lm, _prompts(lm), MixtureStep(top_k=10), max_new_tokens=1)
        argmax = out.dist_ids[:, :, 0]  # [B, K]: argmax of the logits that produced step t
        best, best_score = None, 0
        for tok in argmax.unique().tolist():
            hits = argmax == tok
            never = torch.full_like(hits[:, 0], NUM_LATENT, dtype=torch.long)
            first = torch.where(hits.any(1), hits.float().argmax(1), never)  # [B] step the rule fires
            score = len(set(first.tolist()))
            if score > best_score:
                best, best_score = tok, score
        assert best_score >= 2, "no token is the argmax at different steps in different rows"
        _STOP_TOKENS[lm.name] = best
    return _STOP_TOKENS[lm.name]


def _make_step(kind: str, lm: LoadedModel, rows: list[int]) -> LatentStep:
    """Build a step for the given prompt rows (external vectors are per row, so they are sliced)."""
    if kind == "hidden":
        return HiddenStateStep()
    if kind == "mixture-topk":
        return MixtureStep(top_k=10, temperature=0.7)
    if kind == "mixture-full":
        return MixtureStep(top_k=0)
    if kind == "mixture-stop":
        return MixtureStep(top_k=10, stop_token_id=_stop_token(lm))
    dim = lm.model.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(len(TEXTS), NUM_LATENT, dim, generator=g) * 0.3
    if kind == "external":
        return ExternalStep(vectors[rows])
    if kind == "external-lengths":
        return ExternalStep(vectors[rows], lengths=torch.tensor(EXTERNAL_LENGTHS)[rows])
    raise AssertionError(kind)


def _assert_same(a: RolloutOutput, b: RolloutOutput, atol: float = ATOL) -> None:
    assert a.tokens == b.tokens
    assert torch.equal(a.finished, b.finished)
    assert torch.equal(a.num_latent_steps, b.num_latent_steps)
    torch.testing.assert_close(a.latents, b.latents, atol=atol, rtol=0)
    assert (a.dist_probs is None) == (b.dist_probs is None)
    if a.dist_probs is not None:
        torch.testing.assert_close(a.dist_probs, b.dist_probs, atol=atol, rtol=0)
    if a.dist_ids is not None:
        assert torch.equal(a.dist_ids, b.dist_ids)


def _cat(outs: list[RolloutOutput]) -> RolloutOutput:
    """Stack one-row outputs into what the batched run should have returned."""
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return RolloutOutput(
        tokens=[o.tokens[0] for o in outs],
        finished=cat([o.finished for o in outs]),
        num_latent_steps=cat([o.num_latent_steps for o in outs]),
        latents=cat([o.latents for o in outs]),
        dist_probs=cat([o.dist_probs for o in outs]),
        dist_ids=cat([o.dist_ids for o in outs]),
    )


# ---- cache and batching invariants ----------------------------------------------------------


@pytest.mark.parametrize("rows", [[0], [0, 1, 2, 3]], ids=["batch1", "batch4"])
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_cached_equals_uncached(lm: LoadedModel, kind: str, rows: list[int]) -> None:
    prompts = [_prompts(lm)[r] for r in rows]
    step = _make_step(kind, lm, rows)
    cached = _run(lm, prompts, step, keep_distributions="full")
    uncached = _run(lm, prompts, step, keep_distributions="full", use_cache=False)
    _assert_same(cached, uncached)
    assert cached.timings["forwards"] == uncached.timings["forwards"]


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_static_cache_equals_dynamic_cache(lm: LoadedModel, kind: str) -> None:
    """The preallocated cache (default) computes exactly what transformers' growing cache does."""
    rows = [0, 1, 2, 3]
    prompts = [_prompts(lm)[r] for r in rows]
    static = _run(lm, prompts, _make_step(kind, lm, rows), cache="static")
    dynamic = _run(lm, prompts, _make_step(kind, lm, rows), cache="dynamic")
    _assert_same(static, dynamic)


@pytest.mark.parametrize("feed_eot", [True, False])
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_batched_equals_one_by_one(lm: LoadedModel, kind: str, feed_eot: bool) -> None:
    prompts = _prompts(lm)
    rows = list(range(len(prompts)))
    batched = _run(lm, prompts, _make_step(kind, lm, rows), feed_eot=feed_eot)
    alone = [_run(lm, [prompts[r]], _make_step(kind, lm, [r]), feed_eot=feed_eot) for r in rows]
    _assert_same(batched, _cat(alone))
    # The style guide's key test: batched + cached equals per-example + uncached.
    if kind in ("mixture-stop", "external-lengths"):
        reference = [_run(lm, [prompts[r]], _make_step(kind, lm, [r]), feed_eot=feed_eot, use_cache=False)
                     for r in rows]
        _assert_same(batched, _cat(reference))
    if kind == "external-lengths":
        assert batched.num_latent_steps.tolist() == EXTERNAL_LENGTHS
    if kind == "mixture-stop":
        assert len(set(batched.num_latent_steps.tolist())) >= 2, "rows should stop at different steps"
    for r, n in enumerate(batched.num_latent_steps.tolist()):  # nothing is recorded after a row stops
        assert batched.latents[r, n:].abs().sum() == 0
        assert batched.dist_probs[r, n:].abs().sum() == 0


def test_token_embeddings_as_latents_equal_teacher_forcing(lm: LoadedModel) -> None:
    """Feeding the embeddings of real tokens is teacher forcing: an absolute reference for the latent
    phase's positions and masks (cached vs uncached and batched vs alone only compare the rollout
    with itself). Rows feed different counts, so the batch also has holes."""
    prompts = _prompts(lm)
    forced = [lm.tokenizer.encode(s) for s in ["abcde", "xy", "", "q"]]
    emb = lm.model.get_input_embeddings().weight.detach()
    vectors = torch.zeros(len(prompts), NUM_LATENT, emb.shape[1])
    for r, toks in enumerate(forced):
        vectors[r, : len(toks)] = emb[toks]
    lengths = torch.tensor([len(t) for t in forced])
    out = _run(lm, prompts, ExternalStep(vectors, lengths), keep_distributions="full", max_new_tokens=8)
    assert out.num_latent_steps.tolist() == lengths.tolist()
    for r, (prompt, toks) in enumerate(zip(prompts, forced)):
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt + toks])).logits[0].float()
            full = torch.tensor([prompt + toks + [lm.eot_id]])
            ref = lm.model.generate(
                full, attention_mask=torch.ones_like(full), max_new_tokens=8, do_sample=False,
                pad_token_id=lm.pad_id, eos_token_id=lm.eos_ids,
            )[0, full.shape[1]:].tolist()
        # kept distribution t is p(. | prompt, toks[:t]): the logits at position len(prompt) - 1 + t
        expected = logits[len(prompt) - 1 : len(prompt) - 1 + len(toks)].softmax(-1)
        torch.testing.assert_close(out.dist_probs[r, : len(toks)], expected, atol=ATOL, rtol=0)
        assert out.tokens[r] == ref[: next((j for j, t in enumerate(ref) if t in lm.eos_ids), len(ref))], f"row {r}"


def test_external_vectors_are_fed_verbatim(lm: LoadedModel) -> None:
    step = _make_step("external-lengths", lm, [0, 1, 2, 3])
    out = _run(lm, _prompts(lm), step)
    for r, n in enumerate(EXTERNAL_LENGTHS):
        torch.testing.assert_close(out.latents[r, :n], step.vectors[r, :n], atol=0, rtol=0)


def test_kept_distribution_is_the_one_that_built_the_latent(lm: LoadedModel) -> None:
    """For the full-vocabulary mixture at T=1, latent t = p_tᵀE with p_t the kept distribution."""
    out = _run(lm, _prompts(lm), MixtureStep(top_k=0), keep_distributions="full")
    emb = lm.model.get_input_embeddings().weight
    torch.testing.assert_close(out.latents, out.dist_probs @ emb, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.dist_probs.sum(-1), torch.ones(4, NUM_LATENT), atol=ATOL, rtol=0)


def test_topk_kept_distribution_is_topk_of_full(lm: LoadedModel) -> None:
    step = MixtureStep(top_k=10)
    full = _run(lm, _prompts(lm), step, keep_distributions="full")
    top = _run(lm, _prompts(lm), step, keep_distributions="topk", distribution_topk=4)
    expected = full.dist_probs.topk(4, dim=-1)
    torch.testing.assert_close(top.dist_probs, expected.values, atol=0, rtol=0)
    assert torch.equal(top.dist_ids, expected.indices)
    assert _run(lm, _prompts(lm), step, keep_distributions="none").dist_probs is None


def test_forward_count_and_no_latent_phase_without_step(lm: LoadedModel) -> None:
    def run(step: LatentStep | None) -> RolloutOutput:
        with torch.no_grad():  # eos_ids=[-1]: never stop early
            return rollout(lm.model, _prompts(lm), step, RolloutConfig(num_latent_steps=3, max_new_tokens=4),
                           eos_ids=[-1], pad_id=lm.pad_id, eot_id=lm.eot_id)

    out = run(HiddenStateStep())
    # prefill + 3 latent steps + <eot> + 3 decode forwards (the 4th token needs no forward)
    assert out.timings["forwards"] == 1 + 3 + 1 + 3
    assert all(len(t) == 4 for t in out.tokens) and not out.finished.any()
    plain = run(None)  # no step: no latent phase and no <eot>, whatever num_latent_steps says
    assert plain.timings["forwards"] == 1 + 3
    assert plain.latents.shape == (4, 0, lm.model.get_input_embeddings().weight.shape[1])
    assert plain.num_latent_steps.tolist() == [0] * 4 and plain.dist_probs is None


# ---- decoding --------------------------------------------------------------------------------


def test_greedy_matches_transformers_generate(lm: LoadedModel) -> None:
    """K=0 greedy decoding is token for token what ``model.generate`` does on a left-padded batch."""
    prompts = _prompts(lm)
    max_new = 12
    width = max(map(len, prompts))
    ids = torch.tensor([[lm.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = lm.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
            pad_token_id=lm.pad_id, eos_token_id=lm.eos_ids,
        )
    out = _run(lm, prompts, None, num_latent_steps=0, max_new_tokens=max_new)
    for row, (ours, theirs) in enumerate(zip(out.tokens, ref[:, width:].tolist())):
        ended = any(t in lm.eos_ids for t in theirs)
        cut = next((j for j, t in enumerate(theirs) if t in lm.eos_ids), len(theirs))
        assert ours == theirs[:cut], f"row {row}"
        assert bool(out.finished[row]) == ended
    assert len({tuple(t) for t in out.tokens}) == len(prompts), "degenerate model: rows decode the same text"


def test_sampling_with_seed_is_reproducible(lm: LoadedModel) -> None:
    prompts = _prompts(lm)
    step = MixtureStep(top_k=10)
    a = _run(lm, prompts, step, temperature=1.0, seed=123, max_new_tokens=16)
    b = _run(lm, prompts, step, temperature=1.0, seed=123, max_new_tokens=16)
    c = _run(lm, prompts, step, temperature=1.0, seed=124, max_new_tokens=16)
    greedy = _run(lm, prompts, step, max_new_tokens=16)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.tokens != greedy.tokens
    torch.testing.assert_close(a.latents, greedy.latents, atol=0, rtol=0)  # sampling only affects the answer


def test_greedy_is_the_limit_of_sampling(lm: LoadedModel) -> None:
    """temperature=0 (the default) is argmax decoding: what sampling becomes as T or top_p shrink."""
    prompts = _prompts(lm)
    greedy = _run(lm, prompts, HiddenStateStep(), max_new_tokens=10)
    assert greedy.tokens == _run(lm, prompts, HiddenStateStep(), max_new_tokens=10, temperature=0.0).tokens
    nucleus = _run(lm, prompts, HiddenStateStep(), max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=0)
    assert nucleus.tokens == greedy.tokens  # top_p -> 0 keeps only the most probable token
    # T=1e-9 turns any float32-resolvable logit gap into a probability ratio below exp(-100)
    cold = _run(lm, prompts, HiddenStateStep(), max_new_tokens=10, temperature=1e-9, seed=0)
    assert cold.tokens == greedy.tokens


ROW_SEEDS = [11, 22, 33, 44]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_row_seeds_make_a_rows_sample_independent_of_its_batch(lm: LoadedModel, top_p: float) -> None:
    """A row's sampled answer depends on its prompt and seed only: not on batch size, neighbours or position."""
    prompts = _prompts(lm)
    step = MixtureStep(top_k=10)
    kw = {"temperature": 1.0, "top_p": top_p, "max_new_tokens": 12}
    batched = _run(lm, prompts, step, row_seeds=ROW_SEEDS, **kw)
    alone = [_run(lm, [p], step, row_seeds=[s], **kw).tokens[0] for p, s in zip(prompts, ROW_SEEDS)]
    assert batched.tokens == alone
    order = [2, 0, 3, 1]
    shuffled = _run(lm, [prompts[r] for r in order], step, row_seeds=[ROW_SEEDS[r] for r in order], **kw)
    assert shuffled.tokens == [alone[r] for r in order]
    # a batch twice as large, the same prompts again with other seeds: the first four rows do not move
    doubled = _run(lm, prompts + prompts, step, row_seeds=ROW_SEEDS + [s + 1000 for s in ROW_SEEDS], **kw)
    assert doubled.tokens[:4] == alone
    assert doubled.tokens[4:] != alone  # other seeds sample other answers (on at least some rows)
    assert batched.tokens != _run(lm, prompts, step, max_new_tokens=12).tokens  # it really sampled


def test_seed_without_row_seeds_seeds_each_row_by_its_index(lm: LoadedModel) -> None:
    """cfg.seed alone stays reproducible and no longer depends on the batch size: row i uses derive_seed(seed, i)."""
    prompts = _prompts(lm)
    step = HiddenStateStep()
    kw = {"temperature": 1.0, "seed": 7, "max_new_tokens": 12}
    four = _run(lm, prompts, step, **kw)
    assert _run(lm, prompts[:2], step, **kw).tokens == four.tokens[:2]
    explicit = _run(lm, prompts, step, row_seeds=[derive_seed(7, i) for i in range(4)], **kw)
    assert explicit.tokens == four.tokens
    assert derive_seed(7, 0) != derive_seed(7, 1) != derive_seed(8, 0)


def test_per_row_sampling_draws_from_the_nucleus() -> None:
    """Per-row generators sample the top-p distribution: p = [.5, .3, .15, .05] (shuffled), top_p = 0.7
    keeps .5 and .3, renormalised to .625 and .375."""
    n = 4000
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log().expand(n, 4)
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    picks = _select(logits, RolloutConfig(temperature=1.0, top_p=0.7), generators)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert freq[0] == 0 and freq[2] == 0
    assert abs(freq[1].item() - 0.625) < 0.03 and abs(freq[3].item() - 0.375) < 0.03
    # the same generators again give the same draws; greedy ignores them
    again = [torch.Generator().manual_seed(i) for i in range(n)]
    assert torch.equal(_select(logits, RolloutConfig(temperature=1.0, top_p=0.7), again), picks)
    assert _select(logits, RolloutConfig(), generators).eq(1).all()


def test_row_seeds_must_match_the_batch(lm: LoadedModel) -> None:
    with pytest.raises(ValueError, match="row_seeds has 3 seeds for 4 prompts"):
        _run(lm, _prompts(lm), None, row_seeds=[1, 2, 3], temperature=1.0)


# ---- gradients -------------------------------------------------------------------------------


def test_gradients_reach_external_vectors(lm: LoadedModel) -> None:
    """Outside no_grad the rollout keeps the graph: ``latents`` is differentiable in the vectors.

    What is returned: ``latents`` (the fed vectors, zeroed after a row stops). The latent-phase
    logits and hidden states, which depend on the vectors through the model, are not returned
    (``dist_probs`` is recorded under no_grad and the answer is decoded under no_grad), so there
    is no output through which a loss could reach the vectors via the model.
    """
    dim = lm.model.get_input_embeddings().weight.shape[1]
    vectors = (torch.randn(4, NUM_LATENT, dim, generator=torch.Generator().manual_seed(0)) * 0.3).requires_grad_()
    lengths = torch.tensor(EXTERNAL_LENGTHS)
    cfg = RolloutConfig(num_latent_steps=NUM_LATENT, max_new_tokens=3)
    out = rollout(lm.model, _prompts(lm), ExternalStep(vectors, lengths), cfg,
                  eos_ids=lm.eos_ids, pad_id=lm.pad_id, eot_id=lm.eot_id)
    assert out.latents.requires_grad
    weights = torch.randn(out.latents.shape, generator=torch.Generator().manual_seed(1))
    (out.latents * weights).sum().backward()
    fed = torch.arange(NUM_LATENT)[None, :] < lengths[:, None]  # [B, K]
    torch.testing.assert_close(vectors.grad, weights * fed[..., None], atol=0, rtol=0)
    assert out.dist_probs is not None and not out.dist_probs.requires_grad
    with torch.no_grad():  # the graph did not change the numbers
        _assert_same(out, _run(lm, _prompts(lm), ExternalStep(vectors.detach(), lengths), max_new_tokens=3))


@pytest.mark.parametrize("max_new", [0, 1])
def test_gradients_through_the_model_match_the_uncached_reference(lm: LoadedModel, max_new: int) -> None:
    """Outside no_grad the default config differentiates through the model and its KV cache (which
    carries each hidden-state latent into the next): parameter gradients equal the uncached ones.

    The loss is a random projection of the latents: |latent|² would be nearly constant after
    Llama's final RMSNorm, leaving gradients that are rounding noise."""
    prompts = _prompts(lm)
    params = dict(lm.model.named_parameters())

    def grads(**cfg: object) -> dict[str, torch.Tensor]:
        config = RolloutConfig(num_latent_steps=3, max_new_tokens=max_new, **cfg)
        out = rollout(lm.model, prompts, HiddenStateStep(), config, eos_ids=lm.eos_ids, pad_id=lm.pad_id,
                      eot_id=lm.eot_id)
        weights = torch.randn(out.latents.shape, generator=torch.Generator().manual_seed(3))
        (out.latents * weights).sum().backward()
        result = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
        lm.model.zero_grad(set_to_none=True)
        return result

    default = grads()
    reference = grads(use_cache=False)
    assert default.keys() == reference.keys() == params.keys()
    for name, ref in reference.items():
        scale = ref.abs().max().item()
        assert scale > 0.1, f"{name}: no gradient reached it"
        torch.testing.assert_close(default[name], ref, atol=1e-5 * scale, rtol=0, msg=name)


def test_static_cache_only_while_grad_is_off(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation keeps the preallocated cache; a rollout under autograd does not build one."""
    built: list[object] = []
    real = rollout_module.StaticCache
    monkeypatch.setattr(rollout_module, "StaticCache", lambda **kw: built.append(kw) or real(**kw))
    cfg = RolloutConfig(num_latent_steps=2, max_new_tokens=2)
    args = (lm.model, _prompts(lm), HiddenStateStep(), cfg)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            rollout(*args, eos_ids=lm.eos_ids, pad_id=lm.pad_id, eot_id=lm.eot_id)
    assert len(built) == 2
    out = rollout(*args, eos_ids=lm.eos_ids, pad_id=lm.pad_id, eot_id=lm.eot_id)
    assert len(built) == 2 and out.latents.requires_grad


# ---- non-finite vectors -----------------------------------------------------------------------


def _external(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    dim = lm.model.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(len(TEXTS), NUM_LATENT, dim, generator=torch.Generator().manual_seed(1)) * 0.3
    return vectors, torch.tensor(EXTERNAL_LENGTHS)


@pytest.mark.parametrize("cache", [{}, {"cache": "dynamic"}, {"use_cache": False}], ids=["static", "dynamic", "uncached"])
def test_non_finite_values_past_a_rows_length_are_ignored(lm: LoadedModel, cache: dict) -> None:
    """What a step returns for a stopped row is never fed: NaN or inf there changes nothing."""
    vectors, lengths = _external(lm)
    poisoned = vectors.clone()
    for r, n in enumerate(EXTERNAL_LENGTHS):
        poisoned[r, n:] = float("nan") if r % 2 else float("inf")
    clean = _run(lm, _prompts(lm), ExternalStep(vectors, lengths), keep_distributions="full", **cache)
    dirty = _run(lm, _prompts(lm), ExternalStep(poisoned, lengths), keep_distributions="full", **cache)
    _assert_same(dirty, clean, atol=0)
    assert any(t for t in clean.tokens) and all(lm.pad_id not in t for t in dirty.tokens)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_vector_in_a_reasoning_row_raises_naming_row_and_step(lm: LoadedModel, bad: float) -> None:
    vectors, lengths = _external(lm)
    vectors[2, 3, 5] = bad  # row 2 reasons for 5 steps
    with pytest.raises(NonFiniteLatentError, match=r": row 2 at latent step 3 \(steps 0-based\)"):
        _run(lm, _prompts(lm), ExternalStep(vectors, lengths))
    vectors[0, 1] = bad  # row 0 reasons for 3 steps; both rows are named, each at its first bad step
    vectors[0, 2] = bad
    with pytest.raises(ValueError, match=r"row 0 at latent step 1, row 2 at latent step 3"):
        _run(lm, _prompts(lm), ExternalStep(vectors, lengths), use_cache=False)


# ---- errors ----------------------------------------------------------------------------------


def test_prompt_longer_than_context_raises_naming_it() -> None:
    lm = load_model(ModelConfig(name_or_path="tiny-gpt2-l1-d32", max_positions=32))
    prompts = [[5] * 10, [6] * 12, [7] * 40, [8] * 3]
    with pytest.raises(ContextLengthError, match=r"prompt 2 has 40 tokens.*needs 47 positions but the model has 32"):
        _run(lm, prompts, HiddenStateStep(), num_latent_steps=2, max_new_tokens=4)
    # The prompt fits, but not with the latent and answer budget: still refused, before any compute.
    with pytest.raises(ContextLengthError, match=r"prompt 0 has 20 tokens"):
        _run(lm, [[5] * 20], HiddenStateStep(), num_latent_steps=8, max_new_tokens=8)
    with pytest.raises(ContextLengthError):
        check_context(lm.model, [3, 33], 0)
    # Exactly full: runs (GPT-2's absolute position table would raise on an out-of-range id).
    out = _run(lm, [[5] * 20, [6] * 7], HiddenStateStep(), num_latent_steps=4, max_new_tokens=7)
    assert out.timings["forwards"] >= 1 + 4 + 1


def test_empty_prompts_raise() -> None:
    lm = load_model("tiny-llama-l1-d32")
    with pytest.raises(ValueError, match="at least one prompt"):
        _run(lm, [], HiddenStateStep())
    with pytest.raises(ValueError, match="no empty prompt"):
        _run(lm, [[5, 6], []], HiddenStateStep())


def test_external_step_that_does_not_fit_the_rollout_raises_before_any_compute(lm: LoadedModel) -> None:
    prompts = _prompts(lm)  # 4 prompts, NUM_LATENT = 5 steps
    dim = lm.model.get_input_embeddings().weight.shape[1]
    cases = [
        (torch.zeros(4, 3, dim), r"vectors hold 3 latent steps but rollout.num_latent_steps=5"),
        (torch.zeros(3, NUM_LATENT, dim), r"vectors are for 3 sequences but the batch has 4 prompts"),
        (torch.zeros(4, NUM_LATENT, dim + 1), rf"vectors have width {dim + 1} but .* have width {dim}"),
    ]
    for vectors, message in cases:
        with pytest.raises(ValueError, match=message):
            _run(lm, prompts, ExternalStep(vectors))
    _run(lm, prompts, ExternalStep(torch.zeros(4, NUM_LATENT + 2, dim)))  # more steps than needed is fine


def test_step_returning_the_wrong_shape_raises_naming_it(lm: LoadedModel) -> None:
    class Wide(LatentStep):
        def __call__(self, ctx: StepContext) -> StepResult:
            return StepResult(torch.cat([ctx.logits[:, :1], ctx.embedding[: ctx.logits.shape[0]]], -1))

    dim = lm.model.get_input_embeddings().weight.shape[1]
    message = rf"Wide returned vectors of shape \(4, {dim + 1}\) at latent step 0; expected \(4, {dim}\)"
    with pytest.raises(ValueError, match=message):
        _run(lm, _prompts(lm), Wide())


@pytest.mark.parametrize(
    "field, value, message",
    [("num_latent_steps", -1, "num_latent_steps=-1"), ("max_new_tokens", -2, "max_new_tokens=-2"),
     ("temperature", -0.5, "temperature=-0.5"), ("top_p", 0.0, "top_p=0.0"), ("top_p", 1.5, "top_p=1.5"),
     ("keep_distributions", "all", "keep_distributions='all'"),
     ("distribution_topk", -3, "distribution_topk=-3, must be >= 1"), ("distribution_topk", 0, "distribution_topk=0"),
     ("sync_every", -1, "sync_every=-1, must be >= 0"), ("compact_at", 0.0, r"compact_at=0.0, must be in \(0, 1\]"),
     ("compact_at", 1.5, "compact_at=1.5")],
)
def test_rollout_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RolloutConfig(**{field: value})


def test_compact_at_is_a_share_of_the_rows_served() -> None:
    from latentreason.models.rollout import _narrows

    assert _narrows(16, 32, 0.5) and not _narrows(17, 32, 0.5) and _narrows(16, 33, 0.5) and not _narrows(17, 33, 0.5)
    assert _narrows(29, 100, 0.29) and not _narrows(30, 100, 0.29)  # 0.29 * 100 rounds below 29 in floating point
    assert _narrows(3, 4, 1.0) and not _narrows(4, 4, 1.0)  # at 1, any stop; nothing stopped, nothing to set aside


@pytest.mark.parametrize("other", [{"cache": "dynamic"}, {"use_cache": False}])
def test_compile_needs_the_static_cache(other: dict) -> None:
    with pytest.raises(ValueError, match="rollout.compile=true needs the static cache"):
        RolloutConfig(compile=True, **other)


# ---- one forward: decoder + output layer --------------------------------------------------------


def test_decoder_and_head_run_only_where_they_compute_what_the_model_does() -> None:
    """The rollout runs the decoder and applies the output layer to the last position itself (no
    per-layer hidden states); a model that changes its logits after the output layer (here a
    per-token bias, standing in for softcapping or scaling) is caught and runs its own forward."""
    for name in ARCHS:
        lm = _load(name)
        split = rollout_module._split(lm.model, lm.model.get_input_embeddings()(torch.tensor([[5, 6, 7]])))
        assert split is not None and split.base is lm.model.base_model, name
    lm = _load("tiny-llama-l2-d64")
    prompts = _prompts(lm)
    plain = _run(lm, prompts, None, num_latent_steps=0, max_new_tokens=8)
    lm = _load("tiny-llama-l2-d64")  # the same weights, in a model the rollout has not seen yet
    bias = torch.randn(lm.model.config.vocab_size, generator=torch.Generator().manual_seed(5)) * 3
    forward = type(lm.model).forward

    def biased(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = forward(self, *args, **kwargs)
        out.logits = out.logits + bias
        return out

    lm.model.forward = types.MethodType(biased, lm.model)
    out = _run(lm, prompts, None, num_latent_steps=0, max_new_tokens=8)
    assert rollout_module._SPLITS[lm.model] is None
    assert out.tokens != plain.tokens, "the bias should change the answer"
    width = max(map(len, prompts))
    ids = torch.tensor([[lm.pad_id] * (width - len(p)) + p for p in prompts])
    with torch.no_grad():
        ref = lm.model.generate(input_ids=ids, attention_mask=(ids != lm.pad_id).long(), max_new_tokens=8,
                                do_sample=False, pad_token_id=lm.pad_id, eos_token_id=lm.eos_ids)
    for ours, theirs in zip(out.tokens, ref[:, width:].tolist()):
        assert ours == theirs[: next((j for j, t in enumerate(theirs) if t in lm.eos_ids), len(theirs))]


# ---- host syncs: checked every sync_every steps ---------------------------------------------------


def _eos_finishing_rows_apart(free: RolloutOutput, margin: int) -> list[int]:
    """Token ids that, as eos, end every row of ``free`` (a run that never stopped) at least
    ``margin`` tokens before its budget, at >= 2 different steps (asserted: the tests using them
    cannot pass without rows finishing apart, early)."""
    max_new = len(free.tokens[0])
    seen = sorted({t for row in free.tokens for t in row})
    for size in range(1, len(free.tokens) + 1):
        for eos in itertools.combinations(seen, size):
            ends = [next((j for j, t in enumerate(row) if t in eos), max_new) for row in free.tokens]
            if max(ends) < max_new - margin and len(set(ends)) >= 2:
                return list(eos)
    raise AssertionError(f"no eos set ends every row early, at different steps: {free.tokens}")


@pytest.mark.parametrize("sync_every", [3, 4, 16])
@pytest.mark.parametrize("kind", ["external-lengths", "mixture-stop", "none"])
def test_deferred_stop_checks_change_nothing(lm: LoadedModel, kind: str, sync_every: int) -> None:
    """Checking 'all rows stopped' every N steps (N not dividing the token budget) gives what the
    per-step check gives, with rows ending their latent phase and their answer at different steps
    (all before the budget, so the steps between a stop and the next check run, masked)."""
    prompts, rows = _prompts(lm), [0, 1, 2, 3]

    def run(n: int, eos: list[int], **kw: object) -> RolloutOutput:
        step = None if kind == "none" else _make_step(kind, lm, rows)
        if kind == "external-lengths":  # every row stops before the budget (3 < NUM_LATENT)
            step = ExternalStep(step.vectors, lengths=torch.tensor([3, 0, 2, 1]))
        return _run(lm, prompts, step, eos_ids=eos, max_new_tokens=11, sync_every=n, keep_distributions="full", **kw)

    eos = _eos_finishing_rows_apart(run(1, [-1]), margin=4)
    every, deferred = run(1, eos, compact=False), run(sync_every, eos, compact=False)
    _assert_same(deferred, every, atol=0)
    # rows stepping aside (rollout.compact) at other steps change the batch's shapes, not the outputs
    _assert_same(run(sync_every, eos), every)
    assert deferred.finished.all() and len({len(t) for t in every.tokens}) >= 2
    assert deferred.timings["forwards"] >= every.timings["forwards"]
    # the loops ran as long as their longest row: its latent steps, its answer and eos
    assert every.timings["latent_steps_run"] == max(every.num_latent_steps.tolist())
    assert every.timings["decode_steps_run"] == max(len(t) for t in every.tokens) + 1
    for loop in ("latent_steps_run", "decode_steps_run"):
        assert deferred.timings[loop] >= every.timings[loop]
    if sync_every > 11:  # no check before the budget runs out: every step runs, the done rows masked
        assert deferred.timings["forwards"] > every.timings["forwards"]
    _assert_same(run(sync_every, eos, use_cache=False), every)


@pytest.mark.parametrize("mode", [{}, {"cache": "dynamic"}, {"use_cache": False}, {"temperature": 0.8}])
def test_finished_rows_leave_the_batch_and_nothing_changes(lm: LoadedModel, mode: dict) -> None:
    """Rows that finished their answer are dropped from the decoding batch once at most half are
    still writing (``rollout.compact``): the same tokens, finish flags and log-probabilities as when
    every row steps to the end, with fewer row-steps computed."""
    prompts, seeds = _prompts(lm), [11, 12, 13, 14]

    def run(compact: bool, eos: list[int], at: float = 0.5) -> RolloutOutput:
        with torch.no_grad():
            step = _make_step("external-lengths", lm, [0, 1, 2, 3])
            return rollout(lm.model, prompts, ExternalStep(step.vectors, lengths=torch.tensor([3, 0, 2, 1])), RolloutConfig(
                num_latent_steps=NUM_LATENT, max_new_tokens=11, compact=compact, compact_at=at, **mode), eos_ids=eos, pad_id=lm.pad_id,
                eot_id=lm.eot_id, row_seeds=seeds, return_logprobs=True)

    eos = _eos_finishing_rows_apart(run(False, [-1]), margin=4)
    full, compacted = run(False, eos), run(True, eos)
    assert full.tokens == compacted.tokens and torch.equal(full.finished, compacted.finished)
    torch.testing.assert_close(compacted.logprobs, full.logprobs, atol=ATOL, rtol=0)
    assert len({len(t) for t in full.tokens}) >= 2 and full.finished.all()
    steps = full.timings["decode_steps_run"]
    assert compacted.timings["decode_steps_run"] == steps
    assert full.timings["decode_row_steps"] == steps * len(prompts)
    # each row is computed until its eos, or, until at most half the rows remain, until the batch's
    ends = sorted(len(t) + 1 for t in full.tokens)
    assert sum(ends) <= compacted.timings["decode_row_steps"] < full.timings["decode_row_steps"]
    # compact_at=1: a row leaves at the first check after its eos (every step here): it costs its own steps
    eager = run(True, eos, at=1.0)
    assert eager.tokens == full.tokens and torch.equal(eager.finished, full.finished)
    torch.testing.assert_close(eager.logprobs, full.logprobs, atol=ATOL, rtol=0)
    assert eager.timings["decode_row_steps"] == sum(ends) <= compacted.timings["decode_row_steps"]


@pytest.mark.parametrize("kind", ["external-lengths", "mixture-stop", "probe-noise", "probe-shuffle"])
@pytest.mark.parametrize("cache, sync_every, at", [("static", 1, 0.5), ("dynamic", 1, 0.5), ("static", 2, 0.5),
                                                   ("static", 1, 0.75), ("dynamic", 2, 1.0)])
def test_rows_that_stop_reasoning_step_aside_and_nothing_changes(lm: LoadedModel, kind: str, cache: str,
                                                                 sync_every: int, at: float) -> None:
    """Once at most half the rows still reason, the others wait aside (rollout.compact): the same
    answers, latents, counts and kept distributions as when every row steps to the end, with fewer
    row-steps computed. A step that cannot narrow its state (the shuffle probe) keeps every row."""
    prompts, lengths = _prompts(lm), torch.tensor(EXTERNAL_LENGTHS)  # rows stop at 3, 0, 5 and 1 latents

    def run(compact: bool) -> RolloutOutput:
        inner = _make_step("mixture-stop" if kind == "mixture-stop" else "external-lengths", lm, [0, 1, 2, 3])
        if kind != "mixture-stop":
            inner = ExternalStep(inner.vectors, lengths=lengths)
        step = ProbeStep(inner, kind.split("-")[1], seed=3) if kind.startswith("probe") else inner
        return _run(lm, prompts, step, cache=cache, compact=compact, compact_at=at, keep_distributions="full",
                    sync_every=sync_every)

    full, compacted = run(False), run(True)
    _assert_same(compacted, full)
    steps = full.timings["latent_steps_run"]
    assert compacted.timings["latent_steps_run"] == steps and full.timings["latent_row_steps"] == 4 * steps
    if kind == "probe-shuffle":
        assert compacted.timings["latent_row_steps"] == full.timings["latent_row_steps"]
    elif kind != "mixture-stop":
        # 5 steps. Half (compact_at 0.5), checks every step: 4 rows at step 0 (row 1 stopped: 3 left), 2
        # at steps 1 and 2 (row 3 stopped), 1 at 3 and 4 (row 0 stopped). Every 2 steps: 4 at 0 and 1, 2
        # at 2 and 3 (row 0 stops at 3, masked), 1 at 4. At 0.75 (3 of 4, then 2 of 3) or 1, every stop
        # narrows: 3 at step 0, 2 at 1 and 2, 1 at 3 and 4; every 2 steps: 3 at 0 and 1, 2 at 2 and 3, 1 at 4
        assert full.num_latent_steps.tolist() == EXTERNAL_LENGTHS == [3, 0, NUM_LATENT, 1]
        want = {(1, 0.5): 4 + 2 + 2 + 1 + 1, (2, 0.5): 4 + 4 + 2 + 2 + 1,
                (1, 0.75): 3 + 2 + 2 + 1 + 1, (2, 1.0): 3 + 3 + 2 + 2 + 1}[sync_every, at]
        assert compacted.timings["latent_row_steps"] == want
    else:  # where the stop token ends rows depends on the model: fewer row-steps only if some stopped early
        n = full.num_latent_steps.tolist()
        assert compacted.timings["latent_row_steps"] <= full.timings["latent_row_steps"]
        if sorted(n)[len(n) // 2 - 1] < max(n):
            assert compacted.timings["latent_row_steps"] < full.timings["latent_row_steps"]


def test_a_cache_that_cannot_drop_rows_keeps_them(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the cache cannot drop rows (a model's own cache class), every row steps to the end, as
    with rollout.compact=false, and the outputs are the same."""
    import latentreason.models.rollout as rollout_module

    step = _make_step("external-lengths", lm, [0, 1, 2, 3])
    step = ExternalStep(step.vectors, lengths=torch.tensor([3, 0, 2, 1]))
    free = _run(lm, _prompts(lm), step, eos_ids=[-1], max_new_tokens=11)
    eos = _eos_finishing_rows_apart(free, margin=4)
    compacted = _run(lm, _prompts(lm), step, eos_ids=eos, max_new_tokens=11)
    monkeypatch.setattr(rollout_module, "select_cache_rows", lambda cache, index: False)
    kept = _run(lm, _prompts(lm), step, eos_ids=eos, max_new_tokens=11)
    _assert_same(kept, compacted)
    assert kept.timings["decode_row_steps"] == kept.timings["decode_steps_run"] * 4 > compacted.timings["decode_row_steps"]


@pytest.mark.parametrize("sync_every, expected", [(1, 5 + 1 + 9), (0, 5 + 1 + 9), (4, 2 + 1 + 2)])
def test_the_host_waits_every_sync_every_steps(sync_every: int, expected: int) -> None:
    """5 latent steps and 10 tokens that never stop: the rollout reads a device value at latent steps
    0 and 4 and after tokens 4 and 8 with sync_every=4 (plus the one non-finite check), at every
    step with 1 or with 0 (= auto, which is 1 on CPU)."""
    lm = _load("tiny-llama-l2-d64")
    cfg = RolloutConfig(num_latent_steps=5, max_new_tokens=10, sync_every=sync_every)
    with torch.no_grad(), HostSyncs() as syncs:
        out = rollout(lm.model, _prompts(lm), HiddenStateStep(), cfg, eos_ids=[-1], pad_id=lm.pad_id, eot_id=lm.eot_id)
    # the loop itself lives in latent_phase (shared with the latent forward)
    assert syncs.count("rollout.py", "rollout") + syncs.count("rollout.py", "latent_phase") == expected
    assert all(len(t) == 10 for t in out.tokens)


# ---- compiled step (rollout.compile) ---------------------------------------------------------------

COMPILED_KINDS = ["hidden", "mixture-topk", "mixture-full", "external", "external-lengths", "mixture-stop"]


@pytest.fixture(scope="module")
def compiled() -> dict:
    """A tiny Llama compiled once (CPU: tens of seconds): every compiled rollout below shares one
    compilation (batch bucket 4, cache bucket 64). The compiled runs check 'all done' every 3 steps
    (the GPU default is 8); the eager references every step. Graph counts come from dynamo."""
    lm = _load("tiny-llama-l2-d64")
    prompts = _prompts(lm)
    graphs = counters["stats"]["unique_graphs"]
    runs = {}
    for kind in COMPILED_KINDS:
        rows = [0, 1, 2, 3]
        step = _make_step(kind, lm, rows)
        runs[kind] = (
            _run(lm, prompts, step, keep_distributions="full", compile=True, sync_every=3),
            _run(lm, prompts, step, keep_distributions="full"),
        )
    entries = list(rollout_module._COMPILED[lm.model].values())
    return {"lm": lm, "runs": runs, "graphs": counters["stats"]["unique_graphs"] - graphs, "entries": entries}


@pytest.mark.parametrize("kind", COMPILED_KINDS)
def test_compiled_step_equals_eager(compiled: dict, kind: str) -> None:
    fast, eager = compiled["runs"][kind]
    _assert_same(fast, eager)
    assert fast.timings["forwards"] >= eager.timings["forwards"]
    if kind == "mixture-stop":
        assert len(set(fast.num_latent_steps.tolist())) >= 2, "rows should stop at different steps"
    if kind == "external-lengths":
        assert fast.num_latent_steps.tolist() == EXTERNAL_LENGTHS


def test_compiled_step_compiles_once_and_runs_every_step(compiled: dict) -> None:
    """One graph for all six rollouts (latent and answer positions, every step kind), and every
    forward after the prefill ran it."""
    assert compiled["graphs"] == 1
    (entry,) = compiled["entries"]
    assert (entry.batch, entry.max_len) == (4, 64)
    runs = [fast for fast, _ in compiled["runs"].values()]
    assert entry.calls == sum(r.timings["forwards"] - 1 for r in runs)


def test_a_second_batch_of_the_same_bucket_does_not_recompile(compiled: dict) -> None:
    """3 prompts of other widths fit the same bucket (4 rows, 64 columns): no new graph; the padded
    row changes nothing."""
    lm = compiled["lm"]
    (entry,) = compiled["entries"]
    rows = [2, 0, 3]
    prompts = [_prompts(lm)[r] for r in rows]
    graphs, calls = counters["stats"]["unique_graphs"], entry.calls
    for kind in ("hidden", "mixture-stop"):
        fast = _run(lm, prompts, _make_step(kind, lm, rows), keep_distributions="full", compile=True)
        _assert_same(fast, _run(lm, prompts, _make_step(kind, lm, rows), keep_distributions="full"))
    assert counters["stats"]["unique_graphs"] == graphs
    assert list(rollout_module._COMPILED[lm.model].values()) == [entry] and entry.calls > calls


def test_compile_with_grad_enabled_runs_eagerly_and_keeps_the_graph(compiled: dict) -> None:
    lm = compiled["lm"]
    (entry,) = compiled["entries"]
    calls = entry.calls
    vectors, lengths = _external(lm)
    vectors.requires_grad_()
    out = rollout(lm.model, _prompts(lm), ExternalStep(vectors, lengths), RolloutConfig(
        num_latent_steps=NUM_LATENT, max_new_tokens=3, compile=True), eos_ids=lm.eos_ids, pad_id=lm.pad_id,
        eot_id=lm.eot_id)
    out.latents.sum().backward()
    assert vectors.grad is not None and entry.calls == calls



def test_a_mixture_over_an_unmerged_lora_embedding_feeds_what_the_merged_model_does():
    """peft's LoRA embedding keeps the base table in ``.weight`` and adds the low-rank delta in its
    lookups. A mixture step must mix over the adapted table (what was trained, and what the merged,
    saved model holds), so the unmerged model and its merged copy roll out the same latents."""
    import copy

    from peft import LoraConfig, get_peft_model

    lm = _load("tiny-llama-l2-d64")
    model = copy.deepcopy(lm.model)
    model.config.tie_word_embeddings = False  # the trainer unties first (apply_lora)
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_embedding" in name:
            param.data.normal_(0, 0.3)  # B starts at zero: make the delta real
    merged = copy.deepcopy(peft_model).merge_and_unload()
    base = peft_model.get_input_embeddings().weight
    assert (merged.get_input_embeddings().weight - base).abs().max() > 0.1, "the delta is too small to matter"
    outs = {}
    for name, m in (("unmerged", peft_model), ("merged", merged)):
        m.eval()
        outs[name] = _run(types.SimpleNamespace(**{**vars(lm), "model": m}), _prompts(lm), MixtureStep(top_k=0))
    assert torch.allclose(outs["unmerged"].latents, outs["merged"].latents, atol=ATOL)
    assert outs["unmerged"].tokens == outs["merged"].tokens


def test_stop_ids_name_the_eos_that_ended_each_row():
    """A model may stop on several ids (Qwen-Instruct); GRPO scores the one sampled, so the rollout
    says which one ended each row (it appended eos_ids[0] whatever was sampled)."""
    lm = _load("tiny-llama-l2-d64")
    free = _run(lm, _prompts(lm), None, eos_ids=[-1])  # no stop: what each row writes
    stop = free.tokens[0][2]  # row 0 writes it at step 2
    assert stop not in free.tokens[0][:2]
    out = _run(lm, _prompts(lm), None, eos_ids=[lm.eos_ids[0], stop])
    assert out.stop_ids[0] == stop and out.tokens[0] == free.tokens[0][:2]
    for toks, end, row in zip(out.tokens, out.stop_ids, free.tokens):
        assert (end is None) == (len(toks) == MAX_NEW) and (end is None or end in (lm.eos_ids[0], stop))

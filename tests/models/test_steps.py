"""Tests for models/steps.py: the latent step functions and their registry, on small tensors."""
from __future__ import annotations

import pytest
import torch

from latentreason.models.steps import (
    LATENT_STEPS,
    ExternalStep,
    HiddenStateStep,
    LatentStep,
    MixtureStep,
    ProbeStep,
    SoftThinkingStep,
    StepContext,
    build_step,
)
from latentreason.registry import RegistryError
from tests.models.host_syncs import HostSyncError, HostSyncs

B, V, D = 3, 12, 5


def _ctx(step: int = 0, seed: int = 0, logits: torch.Tensor | None = None) -> StepContext:
    g = torch.Generator().manual_seed(seed)
    return StepContext(
        step=step,
        hidden=torch.randn(B, D, generator=g),
        logits=torch.randn(B, V, generator=g) * 3 if logits is None else logits,
        embedding=torch.randn(V, D, generator=g),
        active=torch.ones(B, dtype=torch.bool),
    )


# ---- mixture ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_topk_weights_are_the_renormalised_top_probabilities(temperature: float) -> None:
    ctx = _ctx()
    probs, ids = MixtureStep(top_k=4, temperature=temperature).weights(ctx.logits)
    assert probs.shape == ids.shape == (B, 4)
    full = (ctx.logits / temperature).softmax(-1)
    expected_ids = full.argsort(-1, descending=True)[:, :4]
    assert torch.equal(ids, expected_ids)
    expected = full.gather(-1, ids)
    torch.testing.assert_close(probs, expected / expected.sum(-1, keepdim=True))
    torch.testing.assert_close(probs.sum(-1), torch.ones(B))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_bf16_logits_give_the_weights_of_their_exact_fp32_values(temperature: float) -> None:
    # the top-k runs on the bf16 logits and only the k values are widened: the same ids and the
    # same fp32 probabilities as widening all V logits first
    logits = (_ctx().logits * 4).to(torch.bfloat16)
    step = MixtureStep(top_k=4, temperature=temperature)
    probs, ids = step.weights(logits)
    wide_probs, wide_ids = step.weights(logits.float())
    assert probs.dtype == torch.float32
    assert torch.equal(ids, wide_ids)
    torch.testing.assert_close(probs, wide_probs, rtol=0, atol=0)


def test_topk_mixture_is_the_weighted_sum_of_the_kept_rows() -> None:
    ctx = _ctx()
    step = MixtureStep(top_k=4)
    probs, ids = step.weights(ctx.logits)
    out = step(ctx)
    manual = torch.stack([(probs[b, :, None] * ctx.embedding[ids[b]]).sum(0) for b in range(B)])
    torch.testing.assert_close(out.embeds, manual)
    assert out.stop is None


def test_full_vocabulary_mixture_is_probs_times_embedding() -> None:
    ctx = _ctx()
    out = MixtureStep(top_k=0, temperature=0.7)(ctx)
    torch.testing.assert_close(out.embeds, (ctx.logits / 0.7).softmax(-1) @ ctx.embedding)


def test_top_k_at_least_vocabulary_equals_full_mixture() -> None:
    ctx = _ctx()
    torch.testing.assert_close(MixtureStep(top_k=V + 5)(ctx).embeds, MixtureStep(top_k=0)(ctx).embeds)


def test_top_p_and_min_p_filter_as_documented() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # already sorted, sums to 1
    top_p, _ = MixtureStep(top_k=0, top_p=0.7).weights(logits)
    # nucleus: keep tokens whose preceding mass is < 0.7, i.e. 0.5 and 0.3
    torch.testing.assert_close(top_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    min_p, _ = MixtureStep(top_k=0, min_p=0.3).weights(logits)
    # keep p >= 0.3 * max = 0.15
    torch.testing.assert_close(min_p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    # the same on the top-k path, and with the vocabulary out of order (scatter back to ids)
    shuffled = logits[:, [2, 0, 3, 1]]
    probs, _ = MixtureStep(top_k=0, top_p=0.7).weights(shuffled)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    probs, ids = MixtureStep(top_k=3, top_p=0.7).weights(shuffled)
    assert ids.tolist() == [[1, 3, 0]]
    torch.testing.assert_close(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0]]))


@pytest.mark.parametrize("top_k", [0, 4])
@pytest.mark.parametrize("top_p, min_p", [(1e-9, 0.0), (0.01, 0.0), (1.0, 0.999), (1e-9, 0.99)])
def test_filtering_always_keeps_the_most_probable_token(top_k: int, top_p: float, min_p: float) -> None:
    ctx = _ctx()
    step = MixtureStep(top_k=top_k, top_p=top_p, min_p=min_p)
    probs, ids = step.weights(ctx.logits)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(B))
    best = ctx.logits.argmax(-1)
    kept = probs.argmax(-1) if ids is None else ids.gather(-1, probs.argmax(-1, keepdim=True))[:, 0]
    assert torch.equal(kept, best)
    assert (probs.max(-1).values == 1).all()  # nothing else survives these thresholds
    torch.testing.assert_close(step(ctx).embeds, ctx.embedding[best])


def test_mixture_casts_to_the_embedding_dtype() -> None:
    ctx = _ctx()
    ctx.embedding = ctx.embedding.to(torch.bfloat16)
    for top_k in (0, 4):
        assert MixtureStep(top_k=top_k)(ctx).embeds.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature=0.0, must be > 0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_k": -1}, "top_k=-1, must be >= 0"),
    ({"top_p": 0.0}, r"top_p=0.0, must be in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"top_p": -0.2}, "top_p=-0.2"),
    ({"min_p": -0.1}, r"min_p=-0.1, must be in \[0, 1\)"),
    ({"min_p": 1.0}, "min_p=1.0"),
])
def test_mixture_rejects_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MixtureStep(**kwargs)
    with pytest.raises(ValueError, match=message):
        build_step("mixture", **kwargs)


# ---- stop rule, hidden, external -------------------------------------------------------------


def test_stop_token_stops_rows_whose_argmax_it_is() -> None:
    logits = torch.zeros(B, V)
    logits[0, 7] = logits[1, 2] = logits[2, 7] = 5.0
    ctx = _ctx(logits=logits)
    for step in (MixtureStep(stop_token_id=7), HiddenStateStep(stop_token_id=7)):
        assert step(ctx).stop.tolist() == [True, False, True]
    assert MixtureStep()(ctx).stop is None


def test_hidden_step_feeds_the_hidden_state_back() -> None:
    ctx = _ctx()
    step = HiddenStateStep()
    assert step.needs_hidden and not MixtureStep.needs_hidden and not ExternalStep.needs_hidden
    assert torch.equal(step(ctx).embeds, ctx.hidden)


def test_external_step_indexes_vectors_by_step_and_stops_at_lengths() -> None:
    vectors = torch.randn(B, 4, D)
    step = ExternalStep(vectors, lengths=torch.tensor([0, 2, 4]))
    stops = []
    for t in range(4):
        out = step(_ctx(step=t))
        assert torch.equal(out.embeds, vectors[:, t])
        stops.append(out.stop.tolist())
    assert stops == [[True, False, False], [True, False, False], [True, True, False], [True, True, False]]
    assert ExternalStep(vectors)(_ctx()).stop is None


def test_external_step_keeps_the_graph() -> None:
    vectors = torch.randn(B, 2, D, requires_grad=True)
    ExternalStep(vectors)(_ctx(step=1)).embeds.sum().backward()
    assert vectors.grad[:, 1].eq(1).all() and vectors.grad[:, 0].eq(0).all()


def test_external_step_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\[B, K, D\], got shape \(3, 5\)"):
        ExternalStep(torch.zeros(3, 5))


def test_external_step_validate_names_expected_and_given() -> None:
    step = ExternalStep(torch.zeros(B, 4, D), lengths=torch.tensor([1, 2, 4]))
    step.validate(B, 4, D)  # fits: no error
    step.validate(B, 2, D)  # more steps than the rollout asks for: fine
    with pytest.raises(ValueError, match=r"vectors hold 4 latent steps but rollout.num_latent_steps=6"):
        step.validate(B, 6, D)
    with pytest.raises(ValueError, match=rf"vectors are for {B} sequences but the batch has 5 prompts"):
        step.validate(5, 4, D)
    with pytest.raises(ValueError, match=rf"vectors have width {D} but the model's input embeddings have width 8"):
        step.validate(B, 4, 8)
    LatentStep().validate(B, 100, D)  # the base class accepts anything


def test_external_step_past_its_vectors_raises_value_error() -> None:
    step = ExternalStep(torch.zeros(B, 2, D))
    with pytest.raises(ValueError, match="asked for latent step 2 but vectors hold 2 steps"):
        step(_ctx(step=2))


def test_external_step_rejects_lengths_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=rf"lengths must be \[B\] = \({B},\) like vectors, got shape \(2,\)"):
        ExternalStep(torch.zeros(B, 2, D), lengths=torch.tensor([1, 2]))


def test_base_step_must_be_implemented() -> None:
    with pytest.raises(NotImplementedError, match="LatentStep must implement __call__"):
        LatentStep()(_ctx())


# ---- soft thinking ---------------------------------------------------------------------------

# Probabilities after temperature (logits are T * log p, so softmax(logits / T) = p exactly),
# listed by rank; the vocabulary is permuted so that ids are not ranks.
SOFT_P = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05])
SOFT_VOCAB = torch.tensor([4, 0, 6, 2, 5, 1, 3])  # token id of rank r


def _soft_logits(temperature: float) -> torch.Tensor:
    logits = torch.empty(1, len(SOFT_P))
    logits[0, SOFT_VOCAB] = temperature * SOFT_P.log()
    return logits


@pytest.mark.parametrize("min_p, max_topk, expected", [
    # top_k=6 drops 0.05 and renormalises (/0.95); top_p=0.8 keeps ranks whose preceding mass is
    # < 0.8 (0, .316, .526, .684: four; on the unrenormalised p, i.e. top-p before top-k, it would
    # be five); min_p=0.45 drops p < 0.45 * max (the fourth); max_topk then keeps the best
    # survivors, renormalised.
    (0.0, 6, [0.30 / 0.77, 0.20 / 0.77, 0.15 / 0.77, 0.12 / 0.77]),
    (0.45, 4, [0.30 / 0.65, 0.20 / 0.65, 0.15 / 0.65]),
    (0.45, 2, [0.6, 0.4]),
])
def test_soft_thinking_weights_match_a_hand_computation(min_p: float, max_topk: int, expected: list[float]) -> None:
    step = SoftThinkingStep(temperature=0.5, top_k=6, top_p=0.8, min_p=min_p, max_topk=max_topk)
    logits = _soft_logits(0.5)
    probs, ids = step.weights(logits)
    kept = probs[0] > 0
    assert ids[0, kept].tolist() == SOFT_VOCAB[: len(expected)].tolist()
    torch.testing.assert_close(probs[0, kept], torch.tensor(expected))
    emb = torch.randn(len(SOFT_P), D, generator=torch.Generator().manual_seed(0))
    ctx = StepContext(0, None, logits, emb, torch.ones(1, dtype=torch.bool))
    manual = sum(w * emb[SOFT_VOCAB[r]] for r, w in enumerate(expected))
    torch.testing.assert_close(step(ctx).embeds[0], manual)
    # top_k = 0 filters the whole vocabulary: here top_p keeps five ranks, max_topk the best two.
    probs, ids = SoftThinkingStep(temperature=0.5, top_k=0, top_p=0.8, min_p=0.0, max_topk=2).weights(logits)
    assert ids[0].tolist() == SOFT_VOCAB[:2].tolist()
    torch.testing.assert_close(probs[0], torch.tensor([0.6, 0.4]))


def test_soft_thinking_entropy_is_that_of_the_temperature_scaled_distribution() -> None:
    step = SoftThinkingStep(temperature=0.5)
    torch.testing.assert_close(step.entropy(_soft_logits(0.5)), -(SOFT_P * SOFT_P.log()).sum()[None])


def _low_high(pattern: str) -> torch.Tensor:
    """One row of logits per character: L = one token at +50 (entropy ~0), H = uniform (log V)."""
    logits = torch.zeros(len(pattern), V)
    for i, c in enumerate(pattern):
        if c == "L":
            logits[i, 1] = 50.0
    return logits


def test_cold_stop_fires_after_exactly_l_low_entropy_steps_and_not_before() -> None:
    step = SoftThinkingStep(entropy_threshold=0.01, cold_stop_steps=3, stop_token_id=7)
    rows = ["LLHLLLLH", "LLHLLHLL", "HHHHHHHH"]  # row 0: third low in a row at step 5
    per_step = torch.stack([_low_high(r) for r in rows], 1)  # [steps, B, V]
    for attempt in range(2):  # a second rollout starts counting afresh
        stops = [step(_ctx(step=t, logits=per_step[t])).stop.tolist() for t in range(per_step.shape[0])]
        assert [s[0] for s in stops] == [False] * 5 + [True, True, False], attempt
        assert not any(s[1] or s[2] for s in stops), "stopped before L consecutive low-entropy steps"


def test_soft_thinking_stops_rows_whose_top_token_is_eot() -> None:
    logits = torch.zeros(B, V)
    logits[0, 7] = logits[2, 7] = 2.0  # entropy still high: only the eot rule can stop these
    logits[1, 2] = 2.0
    out = SoftThinkingStep(stop_token_id=7, cold_stop_steps=1)(_ctx(logits=logits))
    assert out.stop.tolist() == [True, False, True]
    assert SoftThinkingStep(cold_stop_steps=1)(_ctx(logits=logits)).stop.tolist() == [False] * B
    # Several stop ids (<eot> and the answer delimiter): a row stops on either.
    assert SoftThinkingStep(stop_token_id=[9, 2], cold_stop_steps=1)(_ctx(logits=logits)).stop.tolist() == [False, True, False]
    assert SoftThinkingStep(stop_token_id=[7, 2], cold_stop_steps=1)(_ctx(logits=logits)).stop.tolist() == [True] * B


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature=0.0, must be > 0 .*greedy"),
    ({"max_topk": 0}, "max_topk=0, must be >= 1"),
    ({"cold_stop_steps": 0}, "cold_stop_steps=0, must be >= 1"),
    ({"entropy_threshold": -1.0}, "entropy_threshold=-1.0"),
])
def test_soft_thinking_rejects_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_step("soft-thinking", **kwargs)


# ---- causal probes ---------------------------------------------------------------------------


def _probe(kind: str, inner: LatentStep | None = None, batch: int = B, **kwargs) -> ProbeStep:
    step = ProbeStep(inner or HiddenStateStep(), kind, **kwargs)
    step.validate(batch, 4, D)
    return step


def test_zero_probe_feeds_zeros_and_keeps_the_inner_stops() -> None:
    inner = ExternalStep(torch.randn(B, 4, D), lengths=torch.tensor([0, 2, 4]))
    step = _probe("zero", inner)
    for t in range(4):
        out = step(_ctx(step=t))
        assert torch.equal(out.embeds, torch.zeros(B, D))
        assert torch.equal(out.stop, inner(_ctx(step=t)).stop)


def test_noise_probe_matches_each_norm_differs_and_is_seeded_per_row() -> None:
    ctx = _ctx()
    out = _probe("noise", row_keys=["a", "b", "c"]).__call__(ctx).embeds
    torch.testing.assert_close(out.norm(dim=-1), ctx.hidden.norm(dim=-1))
    assert not torch.allclose(out, ctx.hidden) and not torch.allclose(out[0], out[1])
    again = _probe("noise", row_keys=["a", "b", "c"])(ctx).embeds
    assert torch.equal(out, again), "not reproducible"
    # row "a" gets the same direction in another batch and position; another seed changes it
    moved = _probe("noise", row_keys=["c", "x", "a"])(ctx).embeds
    torch.testing.assert_close(moved[2] / moved[2].norm(), out[0] / out[0].norm())
    other = _probe("noise", row_keys=["a", "b", "c"], seed=1)(ctx).embeds
    assert not torch.allclose(other[0], out[0])
    # each step draws anew
    later = _probe("noise", row_keys=["a", "b", "c"])
    later(ctx)
    assert not torch.allclose(later(_ctx(step=1, seed=0)).embeds, out)


def test_shuffle_probe_is_a_permutation_of_rows_without_fixed_point() -> None:
    for batch in (2, 3, 5):
        hidden = torch.randn(batch, D)
        ctx = StepContext(0, hidden, torch.randn(batch, V), torch.randn(V, D), torch.ones(batch, dtype=torch.bool))
        out = _probe("shuffle", batch=batch)(ctx).embeds
        source = [next(j for j in range(batch) if torch.equal(out[i], hidden[j])) for i in range(batch)]
        assert sorted(source) == list(range(batch)), "not a permutation of the rows"
        assert all(source[i] != i for i in range(batch)), "a row kept its own latent"


def test_shuffle_probe_with_one_row_is_refused() -> None:
    with pytest.raises(ValueError, match="eval.probe=shuffle: a batch of 1 question"):
        _probe("shuffle", batch=1)


def test_probe_kind_is_checked_and_needs_hidden_follows_the_inner_step() -> None:
    with pytest.raises(ValueError, match="kind='none', must be one of zero, noise, shuffle"):
        ProbeStep(HiddenStateStep(), "none")
    assert ProbeStep(HiddenStateStep(), "zero").needs_hidden
    assert not ProbeStep(MixtureStep(), "zero").needs_hidden


# ---- no host sync (the rule in steps.py's docstring) ------------------------------------------

SYNC_FREE_STEPS = {
    "hidden": lambda: HiddenStateStep(),
    "hidden-stop": lambda: HiddenStateStep(stop_token_id=3),
    "mixture-topk": lambda: MixtureStep(top_k=4, temperature=0.7),
    "mixture-full": lambda: MixtureStep(top_k=0),
    "mixture-topk-filtered-stop": lambda: MixtureStep(top_k=4, top_p=0.8, min_p=0.1, stop_token_id=3),
    "mixture-full-filtered": lambda: MixtureStep(top_k=0, top_p=0.8, min_p=0.1),
    "external": lambda: ExternalStep(torch.randn(B, 4, D)),
    "external-lengths": lambda: ExternalStep(torch.randn(B, 4, D), lengths=torch.tensor([0, 2, 4])),
    "soft-thinking": lambda: SoftThinkingStep(entropy_threshold=3.0, cold_stop_steps=2, stop_token_id=3),
    "soft-thinking-full": lambda: SoftThinkingStep(top_k=0, top_p=1.0, min_p=0.0),
    "probe-zero": lambda: _validated(ProbeStep(MixtureStep(top_k=4), "zero")),
    "probe-noise": lambda: _validated(ProbeStep(HiddenStateStep(stop_token_id=3), "noise", row_keys=["a", "b", "c"])),
    "probe-shuffle": lambda: _validated(ProbeStep(SoftThinkingStep(), "shuffle")),
}


def _validated(step: LatentStep) -> LatentStep:
    step.validate(B, 4, D)  # what the rollout does once, before the loop
    return step


@pytest.mark.parametrize("name", sorted(SYNC_FREE_STEPS))
def test_built_in_steps_never_make_the_host_wait(name: str) -> None:
    """Every built-in step computes on the device: no op that would read a value back to the host."""
    step = SYNC_FREE_STEPS[name]()
    for t in range(4):
        ctx = _ctx(step=t, seed=t)
        ctx.active = torch.tensor([True, t < 2, t != 1])
        with HostSyncs(forbid=True):
            out = step(ctx)
        assert out.embeds.shape == (B, D)


def test_the_host_sync_check_catches_a_step_that_branches_on_values() -> None:
    class Branchy(MixtureStep):
        def __call__(self, ctx: StepContext):  # noqa: ANN204
            out = super().__call__(ctx)
            if ctx.active.any():  # a branch on a device value: the host waits
                return out
            return out

    class Indexing(MixtureStep):
        def __call__(self, ctx: StepContext):  # noqa: ANN204
            out = super().__call__(ctx)
            out.embeds[ctx.active] = 0.0  # boolean-mask indexing: the host sizes the result
            return out

    for step in (Branchy(), Indexing()):
        with pytest.raises(HostSyncError, match="test_steps.py"), HostSyncs(forbid=True):
            step(_ctx())


# ---- registry --------------------------------------------------------------------------------


def test_registry_holds_the_built_in_steps() -> None:
    assert {"hidden", "mixture", "external", "soft-thinking"} <= set(LATENT_STEPS.names())
    assert isinstance(build_step("hidden"), HiddenStateStep)
    step = build_step("mixture", top_k=3, temperature=0.5)
    assert isinstance(step, MixtureStep) and step.top_k == 3 and step.temperature == 0.5


@pytest.mark.parametrize("name", sorted(LATENT_STEPS.names()))
def test_every_registered_step_is_a_latent_step(name: str) -> None:
    assert issubclass(LATENT_STEPS.get(name), LatentStep)


def test_unknown_step_name_lists_valid_names() -> None:
    with pytest.raises(RegistryError) as err:
        build_step("mixtur")
    message = str(err.value)
    assert "unknown latent step 'mixtur'" in message
    assert "Did you mean 'mixture'" in message
    for name in LATENT_STEPS.names():
        assert name in message


def test_step_by_dotted_path() -> None:
    assert isinstance(build_step("latentreason.models.steps:HiddenStateStep"), HiddenStateStep)
    with pytest.raises(RegistryError, match="cannot import"):
        build_step("latentreason.models.steps:NoSuchStep")


def test_registering_a_non_step_is_refused() -> None:
    with pytest.raises(TypeError, match="is not a LatentStep"):
        LATENT_STEPS.register("not-a-step", object)
    with pytest.raises(RegistryError, match="already registered"):
        LATENT_STEPS.register("hidden", HiddenStateStep)

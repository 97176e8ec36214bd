"""Tests for models/latent_forward.py: the one differentiable latent forward.

Contract: a batch laid out with left-padded prompts, latent holes and right-padded targets
computes, row by row, what the row computes alone in a plain full-sequence forward (no cache, no
padding); gradients are the true derivatives (finite differences, float64); and the latents the
sequential mode computes are those the rollout feeds at inference.
"""
from __future__ import annotations

import pytest
import torch

from latentreason.models.latent_forward import IGNORE, latent_forward
from latentreason.models.rollout import RolloutConfig, rollout
from latentreason.models.steps import HiddenStateStep
from tests.models.test_rollout import ARCHS, _load

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
TARGETS = [[20, 21, 22, 1], [23, 1], [24, 25, 26, 27, 28, 1]]
COUNTS = [3, 0, 2]
K = 3
ATOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def lm(request: pytest.FixtureRequest):
    return _load(request.param)


def _alone_parallel(model, prompt, vectors, eot, target):
    """One row, no padding, no cache: prompt, its latents, <eot>, the target minus its last token."""
    embed = model.get_input_embeddings()
    parts = [embed(torch.tensor([prompt]))]
    if vectors.shape[0]:
        parts.append(vectors[None])
    parts += [embed(torch.tensor([[eot]])), embed(torch.tensor([target[:-1]]))]
    x = torch.cat(parts, 1)
    out = model(inputs_embeds=x, use_cache=False, output_hidden_states=True)
    start = len(prompt) + vectors.shape[0]
    return out.logits[0, start:], out.hidden_states[-1][0, start:]


def _alone_sequential(model, prompt, n, eot, target):
    """Coconut by hand: re-run the whole sequence each step, feeding back the last hidden state."""
    embed = model.get_input_embeddings()
    x = embed(torch.tensor([prompt]))
    latents = []
    for _ in range(n):
        h = model(inputs_embeds=x, use_cache=False, output_hidden_states=True).hidden_states[-1][:, -1:]
        latents.append(h[0, 0])
        x = torch.cat([x, h], 1)
    x = torch.cat([x, embed(torch.tensor([[eot]])), embed(torch.tensor([target[:-1]]))], 1)
    logits = model(inputs_embeds=x, use_cache=False).logits[0, len(prompt) + n:]
    return logits, latents


def test_parallel_pass_equals_each_row_alone(lm) -> None:
    model, eot = lm.model, lm.eot_id
    dim = model.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(len(PROMPTS), K, dim, generator=torch.Generator().manual_seed(0)) * 0.1
    vectors[0, 2] = float("nan")  # row 0 uses all 3; a NaN in a hole (row 2's third) must not leak:
    vectors[2, 2] = float("nan")
    vectors[0, 2] = 0.05
    with torch.no_grad():
        out = latent_forward(model, PROMPTS, TARGETS, eot_id=eot, pad_id=lm.pad_id, vectors=vectors,
                             num_latents=COUNTS, return_hidden=True)
        assert out.logits.shape[:2] == out.labels.shape == (3, 6)
        for i, (p, t, n) in enumerate(zip(PROMPTS, TARGETS, COUNTS)):
            logits, hidden = _alone_parallel(model, p, vectors[i, :n], eot, t)
            assert torch.allclose(out.logits[i, :len(t)], logits, atol=ATOL), i
            assert torch.allclose(out.hidden[i, :len(t)], hidden, atol=ATOL), i
            assert out.labels[i, :len(t)].tolist() == t and (out.labels[i, len(t):] == IGNORE).all()
            assert torch.equal(out.latents[i, n:], torch.zeros_like(out.latents[i, n:]))
    assert torch.isfinite(out.logits).all()


def test_sequential_pass_equals_coconut_by_hand(lm) -> None:
    model, eot = lm.model, lm.eot_id
    with torch.no_grad():
        out = latent_forward(model, PROMPTS, TARGETS, eot_id=eot, pad_id=lm.pad_id, step=HiddenStateStep(),
                             num_latents=COUNTS)
        for i, (p, t, n) in enumerate(zip(PROMPTS, TARGETS, COUNTS)):
            logits, latents = _alone_sequential(model, p, n, eot, t)
            assert torch.allclose(out.logits[i, :len(t)], logits, atol=ATOL), i
            for j, h in enumerate(latents):
                assert torch.allclose(out.latents[i, j], h, atol=ATOL), (i, j)
    assert out.num_latents.tolist() == COUNTS


def test_custom_positions_and_4d_mask_reproduce_the_default(lm) -> None:
    model, eot = lm.model, lm.eot_id
    if "gpt2" in lm.name:
        pytest.skip("GPT-2's attention takes 2-D masks here; custom 4-D masks are for Llama/Qwen-style models")
    dim = model.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(3, K, dim, generator=torch.Generator().manual_seed(1)) * 0.1
    kw = dict(eot_id=eot, pad_id=lm.pad_id, vectors=vectors, num_latents=COUNTS)
    with torch.no_grad():
        ref = latent_forward(model, PROMPTS, TARGETS, **kw)
        width = max(map(len, PROMPTS))
        pmask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
        lmask = torch.tensor([[1] * n + [0] * (K - n) for n in COUNTS])
        tw = max(map(len, TARGETS)) - 1
        tmask = torch.tensor([[1] * (len(t) - 1) + [0] * (tw - len(t) + 1) for t in TARGETS])
        mask2d = torch.cat([pmask, lmask, torch.ones(3, 1, dtype=torch.long), tmask], 1)
        pos = (mask2d.cumsum(-1) - 1).clamp(min=0)
        length = mask2d.shape[1]
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & mask2d[:, None, :].bool()
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # padded queries see themselves: finite, unread
        additive = torch.zeros(3, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        custom = latent_forward(model, PROMPTS, TARGETS, position_ids=pos, attention_mask=additive, **kw)
        moved = pos.clone()
        moved[:, -tw - 1:] += 7  # <eot> and targets further from the prompt (a uniform shift is invisible to RoPE)
        shifted = latent_forward(model, PROMPTS, TARGETS, position_ids=moved, **kw)
    for i, t in enumerate(TARGETS):
        assert torch.allclose(custom.logits[i, :len(t)], ref.logits[i, :len(t)], atol=ATOL)
    # the positions are really used
    assert not torch.allclose(shifted.logits[0, :4], ref.logits[0, :4], atol=1e-3)


def test_sequential_latents_equal_the_rollouts_at_inference(lm) -> None:
    model, eot = lm.model, lm.eot_id
    with torch.no_grad():
        out = latent_forward(model, PROMPTS, TARGETS, eot_id=eot, pad_id=lm.pad_id, step=HiddenStateStep(),
                             num_steps=K)
        ref = rollout(model, PROMPTS, HiddenStateStep(), RolloutConfig(num_latent_steps=K, max_new_tokens=1),
                      eos_ids=lm.eos_ids, pad_id=lm.pad_id, eot_id=eot)
    assert torch.allclose(out.latents, ref.latents, atol=ATOL)
    # the first answer token the rollout picks is the argmax of the <eot> output here
    assert [r[:1] for r in ref.tokens] == [[int(x)] if int(x) not in lm.eos_ids else [] for x in out.logits[:, 0].argmax(-1)]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_gradients_equal_finite_differences(mode: str) -> None:
    # GPT-2: its LayerNorm computes in float64 (Llama's RMSNorm upcasts to float32, whose rounding
    # swamps finite differences); the other tests cover Llama and Qwen2.
    lm = _load("tiny-gpt2-l2-d64")
    model = lm.model.double()
    dim = model.get_input_embeddings().weight.shape[1]
    vectors = (torch.randn(3, K, dim, generator=torch.Generator().manual_seed(2)) * 0.1).double()
    weight = model.transformer.h[0].mlp.c_fc.weight  # upstream of every latent
    kw = dict(eot_id=lm.eot_id, pad_id=lm.pad_id, num_latents=COUNTS)
    kw.update(vectors=vectors.requires_grad_()) if mode == "parallel" else kw.update(step=HiddenStateStep())

    def loss() -> torch.Tensor:
        return latent_forward(model, PROMPTS, TARGETS, **kw).loss_sum()

    model.zero_grad()
    loss().backward()
    checks = [(weight, (3, 5)), (weight, (17, 40))]
    if mode == "parallel":
        checks.append((vectors, (0, 1, 7)))
    eps = 1e-5
    for tensor, idx in checks:
        analytic = tensor.grad[idx].item()
        with torch.no_grad():
            tensor[idx] += eps
            up = loss().item()
            tensor[idx] -= 2 * eps
            down = loss().item()
            tensor[idx] += eps
        numeric = (up - down) / (2 * eps)
        assert abs(analytic) > 1e-6, (idx, analytic)
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), (idx, analytic, numeric)


def test_sequential_gradient_flows_through_every_latent() -> None:
    """A loss on the targets reaches the first latent's input through the cache (Coconut's BPTT)."""
    lm = _load("tiny-llama-l2-d64")
    seen = []

    class Tap(HiddenStateStep):
        def __call__(self, ctx):
            result = super().__call__(ctx)
            result.embeds.retain_grad()
            seen.append(result.embeds)
            return result

    out = latent_forward(lm.model, PROMPTS, TARGETS, eot_id=lm.eot_id, pad_id=lm.pad_id, step=Tap(), num_steps=K)
    out.loss_sum().backward()
    assert len(seen) == K
    assert all(z.grad is not None and z.grad[0].abs().sum() > 0 for z in seen)


def test_bad_input_is_refused_clearly(lm) -> None:
    with pytest.raises(ValueError, match="not both"):
        latent_forward(lm.model, PROMPTS, TARGETS, eot_id=lm.eot_id, pad_id=0, vectors=torch.zeros(3, 1, 4),
                       step=HiddenStateStep())
    with pytest.raises(ValueError, match="vectors must be"):
        latent_forward(lm.model, PROMPTS, TARGETS, eot_id=lm.eot_id, pad_id=0, vectors=torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="num_latents"):
        latent_forward(lm.model, PROMPTS, TARGETS, eot_id=lm.eot_id, pad_id=0, step=HiddenStateStep(),
                       num_steps=2, num_latents=[3, 0, 1])

"""The differentiable latent forward: prompt -> latent positions -> <eot> -> teacher-forced targets.

Every method that trains through latents uses this one function (Coconut, SoftCoT, the pause
control; Latent-SFT and DLR's warm start later), and it lays a batch out exactly as the rollout
does at inference: prompts left-padded to end at one column, then K latent columns (a row with
fewer latents has masked holes at the end of its block, which do not advance its positions),
then ``<eot>``, then the targets, right-padded. What was trained is therefore what runs.

Two ways to supply latents:

- ``vectors`` known in advance (SoftCoT projections, learned pause vectors, soft labels): the
  whole sequence runs as **one parallel pass**; custom ``position_ids`` and a 4-D additive
  ``attention_mask`` may replace the default ones (Latent-SFT's masks).
- a ``step`` whose latents depend on the model's own outputs (Coconut's hidden states): the
  prompt is prefilled, the latents run one column at a time through the shared rollout's
  :func:`~latentreason.models.rollout.latent_phase` with a growing KV cache, then ``<eot>`` and the
  targets run in one pass over that cache. Gradients flow through every pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from latentreason.models.rollout import RolloutConfig, _Runner, check_context, latent_phase, left_pad, mask_positions
from latentreason.models.steps import LatentStep, StepContext, StepResult, input_embedding_table

IGNORE = -100


@dataclass
class LatentForwardOutput:
    """B batch, T longest target, K latent columns, V vocabulary, D width."""

    logits: torch.Tensor  # [B, T, V] the outputs that predict target token j at index j
    labels: torch.Tensor  # [B, T] target ids, IGNORE on padding
    latents: torch.Tensor  # [B, K, D] vectors fed (zeros in holes)
    num_latents: torch.Tensor  # [B]
    hidden: torch.Tensor | None = None  # [B, T, D] last hidden states at the same positions (on request)
    #: [B, K+1, V] (on request): index j predicts latent j+1 (the last prompt column predicts the
    #: first latent), index num_latents[i] predicts <eot>; what a distillation loss on latents needs.
    latent_logits: torch.Tensor | None = None
    #: [B, K+1, D] (with ``return_latent_logits`` and ``return_hidden``): the last hidden states at the
    #: same columns; index j is what a hidden-state step would feed as latent j+1.
    latent_hidden: torch.Tensor | None = None

    def loss_sum(self) -> torch.Tensor:
        """Summed cross-entropy over the target tokens (divide by ``num_targets``)."""
        logits = self.logits if self.logits.dtype == torch.float64 else self.logits.float()  # bf16 -> fp32
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


class _Counted(LatentStep):
    """Stop row i after ``counts[i]`` latents (Coconut's curriculum gives rows different counts)."""

    def __init__(self, inner: LatentStep, counts: torch.Tensor) -> None:
        self.inner, self.counts, self.needs_hidden = inner, counts, inner.needs_hidden

    def validate(self, batch: int, num_steps: int, dim: int) -> None:
        self.inner.validate(batch, num_steps, dim)

    def __call__(self, ctx: StepContext) -> StepResult:
        result = self.inner(ctx)
        stop = self.counts <= ctx.step
        return StepResult(result.embeds, stop if result.stop is None else stop | result.stop)


def _right_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, :len(r)] = 1
    return ids, mask


def latent_forward(
    model: PreTrainedModel,
    prompts: list[list[int]],
    targets: list[list[int]],
    *,
    eot_id: int,
    pad_id: int,
    vectors: torch.Tensor | None = None,
    step: LatentStep | None = None,
    num_latents: Sequence[int] | torch.Tensor | None = None,
    num_steps: int | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    return_hidden: bool = False,
    return_latent_logits: bool = False,
) -> LatentForwardOutput:
    """Logits at every target position after the latents, with gradients through everything.

    ``prompts`` end where the latents begin (a method appends ``<bot>``); ``targets`` are what
    follows ``<eot>`` (chain remainder, answer, eos). Give either ``vectors`` ([B, K, D], one
    parallel pass) or ``step`` (``num_steps`` = K sequential latent steps; default
    ``max(num_latents)``), or neither (K = 0). ``num_latents`` ([B], default K for every row)
    leaves row i only its first ``num_latents[i]`` latents. ``position_ids`` ([B, L]) and
    ``attention_mask`` ([B, 1, L, L] additive float, 0 = attend) apply to the parallel pass, L =
    prompt width + K + 1 + T - 1 (the last target is predicted, never fed).
    ``return_latent_logits`` (parallel pass only) also returns the outputs at the last prompt
    column and every latent column (Latent-SFT's KL on its latents), and with ``return_hidden``
    the last hidden states there (a distillation loss on hidden-state latents).
    """
    if vectors is not None and step is not None:
        raise ValueError("latent_forward: give vectors (parallel) or a step (sequential), not both")
    if len(prompts) != len(targets):
        raise ValueError(f"latent_forward: {len(prompts)} prompts but {len(targets)} targets")
    if any(len(t) == 0 for t in targets):
        raise ValueError("latent_forward: every row needs at least one target token (e.g. the eos)")
    device = model.device
    embed = model.get_input_embeddings()
    dim = embed.weight.shape[1]
    batch = len(prompts)
    if vectors is not None:
        if vectors.dim() != 3 or vectors.shape[0] != batch or vectors.shape[2] != dim:
            raise ValueError(f"latent_forward: vectors must be [B={batch}, K, D={dim}], got {tuple(vectors.shape)}")
        k = vectors.shape[1]
    elif step is not None:
        if num_steps is None and num_latents is None:
            raise ValueError("latent_forward: a step needs num_steps or num_latents")
        k = num_steps if num_steps is not None else int(max(num_latents))  # type: ignore[arg-type]
    else:
        k = 0
    counts = torch.full((batch,), k, dtype=torch.long) if num_latents is None else (
        torch.as_tensor(num_latents, dtype=torch.long).cpu())
    if counts.shape != (batch,) or bool((counts < 0).any()) or bool((counts > k).any()):  # checked on the host
        raise ValueError(f"latent_forward: num_latents must be [B={batch}] values in [0, {k}], got {counts.tolist()}")
    counts = counts.to(device)
    check_context(model, [len(p) for p in prompts], k + max(len(t) for t in targets))
    ids, pmask = left_pad(prompts, pad_id, device)
    tgt, tmask = _right_pad(targets, pad_id, device)
    labels = tgt.masked_fill(tmask == 0, IGNORE)
    feed_t, feed_tmask = tgt[:, :-1], tmask[:, :-1]  # the last target is predicted, never fed
    eot = torch.full((batch, 1), eot_id, dtype=torch.long, device=device)
    ones = torch.ones(batch, 1, dtype=torch.long, device=device)
    lmask = (torch.arange(k, device=device)[None, :] < counts[:, None]).long()  # [B, K]
    width = ids.shape[1]

    if step is None:  # one parallel pass
        lat = vectors if vectors is not None else embed.weight.new_zeros(batch, 0, dim)
        # holes get zeros, not 0 * the vector (0 * NaN is NaN)
        lat = torch.where(lmask[..., None].bool(), lat.to(embed.weight.dtype), torch.zeros((), dtype=embed.weight.dtype,
                                                                                              device=device))
        embeds = torch.cat([embed(ids), lat, embed(eot), embed(feed_t)], dim=1)
        mask2d = torch.cat([pmask, lmask, ones, feed_tmask], dim=1)
        positions = position_ids if position_ids is not None else mask_positions(mask2d)
        if attention_mask is not None:
            length = embeds.shape[1]
            if tuple(attention_mask.shape) != (batch, 1, length, length):
                raise ValueError(f"latent_forward: attention_mask must be [B, 1, L, L] = ({batch}, 1, {length}, "
                                 f"{length}), got {tuple(attention_mask.shape)}")
            attention = attention_mask.to(embed.weight.dtype)
        else:
            attention = mask2d
        if positions.shape != mask2d.shape:
            raise ValueError(f"latent_forward: position_ids must be [B, L] = {tuple(mask2d.shape)}, "
                             f"got {tuple(positions.shape)}")
        out = model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=False,
                    output_hidden_states=return_hidden)
        start = width + k  # the <eot> column predicts target 0
        hidden = out.hidden_states[-1][:, start:] if return_hidden else None
        latent_logits = out.logits[:, width - 1:start] if return_latent_logits else None
        latent_hidden = out.hidden_states[-1][:, width - 1:start] if return_latent_logits and return_hidden else None
        return LatentForwardOutput(out.logits[:, start:], labels, lat, counts, hidden, latent_logits, latent_hidden)

    # sequential: prefill, the shared latent loop over a growing cache, then <eot> + targets at once
    if position_ids is not None or attention_mask is not None or return_latent_logits:
        raise ValueError("latent_forward: custom position_ids / attention_mask / return_latent_logits apply to the "
                         "parallel pass (vectors) only")
    step.validate(batch, k, dim)
    cfg = RolloutConfig(num_latent_steps=k, max_new_tokens=0, cache="dynamic")
    runner = _Runner(model, cfg, step.needs_hidden, batch, max_len=width + k + 1 + feed_t.shape[1],
                     probe=embed(ids[:1, -4:]))
    positions = mask_positions(pmask)
    logits, hidden = runner(embed(ids), pmask, positions)
    # One host check (all rows may have zero latents); the counts stop rows without further syncs.
    phase = latent_phase(runner, _Counted(step, counts), k, logits, hidden, pmask.sum(-1), input_embedding_table(model),
                         sync_every=max(k, 1))
    tail_mask = torch.cat([ones, feed_tmask], dim=1)
    tail_pos = phase.lengths[:, None] + mask_positions(tail_mask)
    logits, last_hidden = runner.forward_all(torch.cat([embed(eot), embed(feed_t)], dim=1), tail_mask, tail_pos,
                                             need_hidden=return_hidden)
    return LatentForwardOutput(logits, labels, phase.latents, counts, last_hidden)


def embed_with_slots(model: PreTrainedModel, input_ids: torch.Tensor, slots: torch.Tensor,
                     vectors: torch.Tensor) -> torch.Tensor:
    """Input embeddings of ``input_ids`` [B, T] with the ``slots`` positions ([B, T] bool, placeholder
    tokens such as ``<latent>``) replaced, in order, by ``vectors`` [B, K, D] (row i uses its first
    ``slots[i].sum()``); differentiable in ``vectors``. For sequences where latents and text
    interleave (Latent-SFT's stage-1 decoder), which the prompt-latents-targets layout cannot express.
    """
    embeds = model.get_input_embeddings()(input_ids)
    counts = slots.sum(-1)
    if vectors.dim() != 3 or vectors.shape[0] != input_ids.shape[0] or vectors.shape[2] != embeds.shape[2]:
        raise ValueError(f"embed_with_slots: vectors must be [B={input_ids.shape[0]}, K, D={embeds.shape[2]}], "
                         f"got {tuple(vectors.shape)}")
    if bool((counts > vectors.shape[1]).any()):
        raise ValueError(f"embed_with_slots: a row has {int(counts.max())} slots but only {vectors.shape[1]} vectors")
    if vectors.shape[1] == 0:
        return embeds
    rank = (slots.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]: which vector a slot takes
    gathered = vectors.to(embeds.dtype).gather(1, rank[..., None].expand(-1, -1, embeds.shape[2]))
    return torch.where(slots[..., None], gathered, embeds)

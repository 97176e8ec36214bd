"""Latent step functions: what the shared rollout feeds back as the next input embedding.

A step receives the model's output at the last position (hidden state and logits) and returns the
next input vector for every sequence in the batch, and optionally which sequences stop reasoning.
Every method's latent mechanism is one of these (or a subclass), registered in ``LATENT_STEPS``;
the rollout loop itself never changes per method.

Rule for a new step: no host sync. A step runs between two forwards of the model, which on a GPU
is a CUDA graph replay (``rollout.compile``) that the host queues ahead of the device; anything
that makes the host wait for the device (``.item()``, ``bool(t)``, ``if t.any():``, ``.tolist()``,
``.cpu()``, ``nonzero()`` / boolean-mask indexing, ``torch.unique``, a copy from pageable host
memory each step) stalls that queue on every latent step. Compute with tensor ops on the device
(masks and ``torch.where`` rather than branches on values: ``topk``, ``softmax``, ``einsum``,
``argmax ==`` all stay queued), keep per-row data on the model's device (move it once, not per
step), and branch only on Python values (the step index, shapes, settings). Values are checked
once: ``validate`` before the loop, and the rollout's own non-finite check after it. The built-in
steps follow this rule (``tests/models/test_steps.py`` runs them with syncs made to fail).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from latentreason.registry import Registry


def input_embedding_table(model: torch.nn.Module) -> torch.Tensor:
    """[V, D] the table the model looks tokens up in: what a mixture step mixes over.

    An unmerged peft LoRA embedding's ``.weight`` is the base table alone; its lookups add the
    low-rank delta, and the saved (merged) model uses base + delta. Mixing over ``.weight`` there
    would feed other latents than the ones trained and saved (the live validation of a LoRA run)."""
    embed = model.get_input_embeddings()
    if hasattr(embed, "lora_embedding_A"):
        return embed(torch.arange(embed.weight.shape[0], device=embed.weight.device))
    return embed.weight


@dataclass
class StepContext:
    """What the rollout hands a step. Shapes: B batch, D hidden, V vocabulary."""

    step: int  # 0-based latent step index
    hidden: torch.Tensor | None  # [B, D] last-layer state at the last position (None unless needs_hidden)
    logits: torch.Tensor  # [B, V] next-token logits at the last position
    embedding: torch.Tensor  # [V, D] the model's input embedding matrix
    active: torch.Tensor  # [B] bool, sequences still reasoning
    positions: torch.Tensor | None = None  # [B] position id the vector returned now will take
    #: Models run in lockstep over the latent phase (``rollout(..., references=...)``): a
    #: :class:`~latentreason.models.rollout.References`, or None.
    references: Any = None


@dataclass
class StepResult:
    embeds: torch.Tensor  # [B, D] next input vectors (rows of stopped sequences are ignored)
    stop: torch.Tensor | None = None  # [B] bool: stop before feeding this step's vector


class LatentStep:
    """Base class. ``needs_hidden`` tells the rollout whether to return hidden states."""

    needs_hidden = False
    #: True where :meth:`select_rows` can narrow the step's per-row state, so that rows that
    #: stopped reasoning leave the latent batch (``rollout.compact``); False keeps every row
    #: stepping, masked, until the last one stops (a step with state it cannot narrow).
    compactable = False
    #: Token id (or ids) whose argmax stops a sequence (Latent-SFT's "<eot> is the argmax" rule; Soft
    #: Thinking's answer delimiter); None = never.
    stop_token_id: int | Sequence[int] | None = None

    def __call__(self, ctx: StepContext) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def validate(self, batch: int, num_steps: int, dim: int) -> None:
        """Called once by the rollout before the loop: raise ValueError if this step cannot serve
        ``batch`` rows for ``num_steps`` steps of width ``dim`` (a clear error, not a mid-loop crash)."""

    def select_rows(self, index: torch.Tensor) -> None:
        """From now until the rollout ends, serve only rows ``index`` of the current batch (only
        called where ``compactable``; a new rollout, latent step 0, starts from every row again)."""

    def stop_mask(self, ctx: StepContext) -> torch.Tensor | None:
        ids = self.stop_token_id
        if ids is None:
            return None
        top = ctx.logits.argmax(-1)
        if isinstance(ids, int):
            return top == ids
        cached = getattr(self, "_stop_ids", None)  # made once per device: no copy inside the step
        if cached is None or cached.device != top.device:
            cached = self._stop_ids = torch.tensor(list(ids), dtype=top.dtype, device=top.device)
        return torch.isin(top, cached)


LATENT_STEPS: Registry[type[LatentStep]] = Registry("latent step", base=LatentStep)


@LATENT_STEPS.register("hidden")
class HiddenStateStep(LatentStep):
    """Coconut's continuous thought: the last hidden state becomes the next input embedding."""

    needs_hidden = True
    compactable = True  # no per-row state

    def __init__(self, stop_token_id: int | None = None) -> None:
        self.stop_token_id = stop_token_id

    def __call__(self, ctx: StepContext) -> StepResult:
        assert ctx.hidden is not None
        return StepResult(ctx.hidden, self.stop_mask(ctx))


@LATENT_STEPS.register("mixture")
class MixtureStep(LatentStep):
    """A probability-weighted mixture of input embeddings: z = softmax(logits / T)ᵀ E.

    ``top_k`` > 0 keeps only the k most probable tokens (renormalised), which costs a gather of
    k rows instead of a V x D product; ``top_k`` = 0 mixes the full vocabulary (Latent-SFT v1).
    ``top_p`` and ``min_p`` further filter the kept tokens (Soft Thinking).
    """

    compactable = True  # no per-row state (Soft Thinking's counter narrows in its select_rows)

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int = 10,
        top_p: float = 1.0,
        min_p: float = 0.0,
        stop_token_id: int | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"mixture step: temperature={temperature}, must be > 0")
        if top_k < 0:
            raise ValueError(f"mixture step: top_k={top_k}, must be >= 0 (0 = full vocabulary)")
        if not 0 < top_p <= 1:
            raise ValueError(f"mixture step: top_p={top_p}, must be in (0, 1]")
        if not 0 <= min_p < 1:
            raise ValueError(f"mixture step: min_p={min_p}, must be in [0, 1)")
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.stop_token_id = stop_token_id

    def weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mixture weights: ([B, k] probabilities, [B, k] ids) or ([B, V] probabilities, None)."""
        wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32; fp64 stays
        if self.top_k:
            # top-k on the logits as they come (bf16 -> fp32 is exact and 1/T > 0 keeps the order), so
            # only k values per row are widened: one V-wide cast fewer per latent step on a GPU
            values, ids = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)  # sorted, descending
            values = values.to(wide)
            probs = (values if self.temperature == 1.0 else values / self.temperature).softmax(-1)
        else:
            scaled = logits.to(wide)
            probs, ids = (scaled if self.temperature == 1.0 else scaled / self.temperature).softmax(-1), None
        if self.top_p < 1.0 or self.min_p > 0.0:
            probs = _filter(probs, self.top_p, self.min_p, sorted_desc=ids is not None)
        return probs, ids

    def __call__(self, ctx: StepContext) -> StepResult:
        probs, ids = self.weights(ctx.logits)
        emb = ctx.embedding
        if ids is None:
            embeds = probs.to(emb.dtype) @ emb  # [B, V] @ [V, D]
        else:
            embeds = torch.einsum("bk,bkd->bd", probs.to(emb.dtype), emb[ids])  # gather k rows
        return StepResult(embeds, self.stop_mask(ctx))


def _filter(probs: torch.Tensor, top_p: float, min_p: float, sorted_desc: bool) -> torch.Tensor:
    """Top-p (nucleus) and min-p filtering, renormalised; the most probable token always stays."""
    if sorted_desc:
        sorted_probs, order = probs, None
    else:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_p < 1.0:
        before = sorted_probs.cumsum(-1) - sorted_probs
        keep &= before < top_p
    if min_p > 0.0:
        keep &= sorted_probs >= min_p * sorted_probs[..., :1]
    keep[..., 0] = True
    filtered = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    filtered = filtered / filtered.sum(-1, keepdim=True)
    if order is None:
        return filtered
    return torch.zeros_like(probs).scatter(-1, order, filtered)


@LATENT_STEPS.register("soft-thinking")
class SoftThinkingStep(MixtureStep):
    """Soft Thinking's concept token: a mixture of the ``max_topk`` most probable embeddings, with a cold stop.

    Weights: softmax(logits / T), then top-k, top-p and min-p filtering (each renormalised), then
    the ``max_topk`` most probable survivors, renormalised (``top_k`` = 0: no top-k filter).
    A row stops (``StepResult.stop``) at the step whose temperature-scaled distribution is the
    ``cold_stop_steps``-th in a row with entropy below ``entropy_threshold`` (that step's vector
    is not fed, as the official code writes ``</think>`` in its place), or whose top token is
    one of ``stop_token_id`` (``<eot>``, the answer delimiter: the paper's ``</think>``). The per-row counter is a device tensor, reset at step 0: no
    host sync (see the module docstring).
    """

    def __init__(
        self,
        temperature: float = 0.6,
        max_topk: int = 10,
        top_k: int = 30,
        top_p: float = 0.95,
        min_p: float = 0.001,
        entropy_threshold: float = 0.01,
        cold_stop_steps: int = 8,
        stop_token_id: int | Sequence[int] | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"soft-thinking step: temperature={temperature}, must be > 0 "
                             "(at 0 the mixture is one-hot: plain greedy decoding)")
        super().__init__(temperature, top_k, top_p, min_p, stop_token_id)
        if max_topk < 1:
            raise ValueError(f"soft-thinking step: max_topk={max_topk}, must be >= 1")
        if entropy_threshold < 0:
            raise ValueError(f"soft-thinking step: entropy_threshold={entropy_threshold}, must be >= 0 (0 disables cold stop)")
        if cold_stop_steps < 1:
            raise ValueError(f"soft-thinking step: cold_stop_steps={cold_stop_steps}, must be >= 1")
        self.max_topk, self.entropy_threshold, self.cold_stop_steps = max_topk, entropy_threshold, cold_stop_steps
        self._low: torch.Tensor | None = None  # [B] long: consecutive low-entropy steps per row

    def select_rows(self, index: torch.Tensor) -> None:
        if self._low is not None:
            self._low = self._low[index]

    def weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, k] probabilities, [B, k] ids), k <= max_topk, sorted by probability (descending)."""
        probs, ids = super().weights(logits)
        if ids is None:  # top_k = 0: filtered over the whole vocabulary
            probs, ids = probs.topk(min(self.max_topk, probs.shape[-1]), dim=-1)
        else:  # already sorted, descending (filtering zeroes entries in place of dropping them)
            probs, ids = probs[:, : self.max_topk], ids[:, : self.max_topk]
        return probs / probs.sum(-1, keepdim=True), ids

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """[B] entropy (nats) of softmax(logits / T) over the whole vocabulary, before any filtering."""
        probs = (logits.float() / self.temperature).softmax(-1)
        return torch.special.entr(probs).sum(-1)  # entr(0) = 0: no NaN from 0 * log 0

    def __call__(self, ctx: StepContext) -> StepResult:
        if ctx.step == 0 or self._low is None:  # a new rollout (a Python value: no sync)
            self._low = torch.zeros(ctx.logits.shape[0], dtype=torch.long, device=ctx.logits.device)
        low = self.entropy(ctx.logits) < self.entropy_threshold
        self._low = torch.where(low, self._low + 1, torch.zeros_like(self._low))
        stop = self._low >= self.cold_stop_steps
        eot = self.stop_mask(ctx)
        if eot is not None:
            stop = stop | eot
        probs, ids = self.weights(ctx.logits)
        emb = ctx.embedding
        embeds = torch.einsum("bk,bkd->bd", probs.to(emb.dtype), emb[ids])  # gather k rows
        return StepResult(embeds, stop)


@LATENT_STEPS.register("external")
class ExternalStep(LatentStep):
    """Feed vectors computed elsewhere (SoftCoT / DLR projections, refined latents).

    ``vectors`` is [B, K, D]; ``lengths`` [B] (optional) stops each sequence after its own count.
    Vectors may require grad: the rollout then carries gradients through them.
    """

    compactable = True  # narrowed through a row index (select_rows), reset at latent step 0

    def __init__(self, vectors: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        if vectors.dim() != 3:
            raise ValueError(f"external step: vectors must be [B, K, D], got shape {tuple(vectors.shape)}")
        if lengths is not None and tuple(lengths.shape) != (vectors.shape[0],):
            raise ValueError(
                f"external step: lengths must be [B] = ({vectors.shape[0]},) like vectors, "
                f"got shape {tuple(lengths.shape)}"
            )
        self.vectors = vectors
        self.lengths = lengths
        self._lengths_on: dict[torch.device, torch.Tensor] = {}  # lengths moved once per device, not per step
        self._rows: torch.Tensor | None = None  # the rows still served (None: all)

    def select_rows(self, index: torch.Tensor) -> None:
        index = index.to(self.vectors.device)
        self._rows = index if self._rows is None else self._rows[index]

    def validate(self, batch: int, num_steps: int, dim: int) -> None:
        b, k, d = self.vectors.shape
        if b != batch:
            raise ValueError(f"external step: vectors are for {b} sequences but the batch has {batch} prompts")
        if k < num_steps:
            raise ValueError(
                f"external step: vectors hold {k} latent steps but rollout.num_latent_steps={num_steps}; "
                f"pass [B, >= {num_steps}, D] vectors (lengths stop rows early) or lower num_latent_steps"
            )
        if d != dim:
            raise ValueError(f"external step: vectors have width {d} but the model's input embeddings have width {dim}")

    def __call__(self, ctx: StepContext) -> StepResult:
        if ctx.step >= self.vectors.shape[1]:
            raise ValueError(
                f"external step: asked for latent step {ctx.step} but vectors hold {self.vectors.shape[1]} steps"
            )
        if ctx.step == 0:  # a new rollout: every row
            self._rows = None
        stop = None
        if self.lengths is not None:
            device = ctx.logits.device
            if device not in self._lengths_on:
                self._lengths_on[device] = self.lengths.to(device)
            lengths = self._lengths_on[device]
            stop = (lengths if self._rows is None else lengths[self._rows.to(device)]) <= ctx.step
        vectors = self.vectors[:, ctx.step]
        return StepResult(vectors if self._rows is None else vectors[self._rows], stop)


PROBES = ("none", "zero", "noise", "shuffle")


class ProbeStep(LatentStep):
    """A causal probe: run ``inner`` (so rows stop where the real step says), then replace what is fed.

    Why: if accuracy survives zeroed, norm-matched noise or another question's latents, the
    latents carry no question-specific information and the answer comes from elsewhere.

    ``kind``: ``zero`` feeds zeros; ``noise`` Gaussian vectors with each real vector's L2 norm,
    drawn per row from ``derive_seed(seed, row_keys[i])`` (row index when ``row_keys`` is None)
    on the CPU, so a row's noise is the same on any device, batch or order; ``shuffle`` feeds
    row ``(i + 1) % B``'s vector of the same step to row i (a fixed derangement: no row keeps its
    own), which needs two rows or more. Not registered: it wraps a step rather than being one.
    """

    def __init__(
        self, inner: LatentStep, kind: str, seed: int = 0, row_keys: list[int | str] | None = None
    ) -> None:
        if kind not in PROBES or kind == "none":
            raise ValueError(f"probe step: kind={kind!r}, must be one of zero, noise, shuffle")
        self.inner, self.kind, self.seed, self.row_keys = inner, kind, seed, row_keys
        self.needs_hidden = inner.needs_hidden
        self._noise_cpu: torch.Tensor | None = None  # [B, K, D] unit-free draws, made once in validate
        self._noise_on: dict[torch.device, torch.Tensor] = {}  # moved once per device, not per step
        self._rows: torch.Tensor | None = None  # the rows still served (None: all)
        # shuffle reads the other rows' vectors, which a narrowed batch no longer has
        self.compactable = inner.compactable and kind != "shuffle"

    def select_rows(self, index: torch.Tensor) -> None:
        self.inner.select_rows(index)
        self._rows = index if self._rows is None else self._rows[index]

    def validate(self, batch: int, num_steps: int, dim: int) -> None:
        self.inner.validate(batch, num_steps, dim)
        if self.kind == "shuffle" and batch < 2:
            raise ValueError(
                "eval.probe=shuffle: a batch of 1 question has no other question to take latents from; "
                "use eval.batch_size >= 2 with at least 2 questions"
            )
        if self.row_keys is not None and len(self.row_keys) != batch:
            raise ValueError(f"probe step: {len(self.row_keys)} row keys for a batch of {batch}; pass one per row")
        if self.kind == "noise":
            from latentreason.models.rollout import derive_seed  # rollout imports this module

            keys = self.row_keys if self.row_keys is not None else list(range(batch))
            draws = [torch.randn(num_steps, dim, generator=torch.Generator().manual_seed(derive_seed(self.seed, k)))
                     for k in keys]
            self._noise_cpu = torch.stack(draws) if draws else torch.zeros(0, num_steps, dim)
            self._noise_on = {}

    def __call__(self, ctx: StepContext) -> StepResult:
        if ctx.step == 0:  # a new rollout: every row
            self._rows = None
        result = self.inner(ctx)
        real = result.embeds
        if self.kind == "zero":
            embeds = torch.zeros_like(real)
        elif self.kind == "shuffle":
            embeds = real.roll(-1, dims=0)  # row i <- row i + 1
        else:
            if self._noise_cpu is None or ctx.step >= self._noise_cpu.shape[1]:
                raise ValueError("probe step: noise not drawn for this step; the rollout calls validate() first")
            device = real.device
            if device not in self._noise_on:
                self._noise_on[device] = self._noise_cpu.to(device)
            noise = self._noise_on[device][:, ctx.step]  # [B, D]
            if self._rows is not None:
                noise = noise[self._rows.to(device)]
            norm = real.float().norm(dim=-1, keepdim=True)
            embeds = (noise * (norm / noise.norm(dim=-1, keepdim=True))).to(real.dtype)
        return StepResult(embeds, result.stop)


def build_step(name: str, **kwargs: object) -> LatentStep:
    """Instantiate a registered step by name, e.g. ``build_step("mixture", top_k=10)``."""
    return LATENT_STEPS.get(name)(**kwargs)

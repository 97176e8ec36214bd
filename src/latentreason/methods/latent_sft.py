"""Latent-SFT: latent tokens as probability mixtures over the vocabulary embedding (arXiv 2510.15522).

Specification: docs/methods.md section 1 (every decision there is a field of :class:`LatentSFTConfig`).

Two runs, each one ``latentreason train``:

* ``method.stage=1`` (from a CoT-SFT model, ``train.init_from``): a Latent Token Encoder (a copy of
  the LLM, an extra module) reads ``[Q, <bot>, S1, L1, ..., SN, LN, <eot>]`` under the *induction
  mask*; each ``<latent>`` slot's last hidden state, projected on the LLM's input embedding,
  gives a mixture ``z = αᵀE``. The LLM (the decoder) reads ``[Q, <bot>, Z1, S2, Z2, ..., ZN,
  <eot>, answer, eos]`` under the *supervision mask* and learns to write each next segment and
  the answer from the latents alone. Three trainer stages (``encoder``, ``decoder``, ``both``,
  the other part frozen in the first two), each continuing from the previous one's best
  checkpoint on validation. An optional first step of ours, ``warmup``, fits the encoder's α at
  each latent to the tokens the decoder writes after it (decoder untouched): on small models the
  paper's order collapses the encoder to one constant token, since a decoder that cannot yet read
  latents rewards the most frequent token everywhere and the softmax saturates there.
* ``method.stage=2`` (``train.init_from`` = the stage-1 folder): the stage-1 encoder exports its
  latents' distributions over the training chains once (soft labels, resumable shards), then the
  LLM learns to produce them itself: ``[Q, <bot>, z̃1..z̃N, <eot>, answer, eos]`` in one parallel
  pass, loss ``λ·KL(α̃ ‖ p) + β·CE``. At inference the shared rollout's mixture step feeds
  ``pᵀE`` until ``<eot>`` is the argmax. Under ``method.latent=hidden`` (the paper's ablation) the
  export holds the encoder's hidden states, the LLM's last hidden state before each latent is
  regressed on it (relative squared error in place of the KL), and inference feeds the last
  hidden state back (the shared hidden-state step, Coconut's), with the same ``<eot>`` stop.

A stage-1 folder evaluates with its encoder reading the gold chain (the teacher: that is what its
validation selects on, an upper bound rather than a method result); a stage-2 folder generates
its latents itself.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from latentreason.config import RUN_CONFIG_FILE, MethodConfig
from latentreason.data.base import Example
from latentreason.data.collate import encode_targets
from latentreason.io import PARTIAL_PREFIX, atomic_write_json, set_default_file_mode
from latentreason.methods.base import EXTRA_MODULES_FILE, METHODS, Method, Stage, stage_problems
from latentreason.models.loading import CheckpointError, process_state
from latentreason.models.latent_forward import IGNORE, embed_with_slots, latent_forward
from latentreason.models.rollout import RolloutConfig, max_positions
from latentreason.models.steps import ExternalStep, HiddenStateStep, LatentStep, MixtureStep, input_embedding_table

STEPS = ("warmup", "encoder", "decoder", "both")
# Group of each position in the stage-1 decoder sequence (the supervision mask is written in them).
PAD, PROMPT, LATENT, SEGMENT, FINAL = -1, 0, 1, 2, 3


#: Stage-1 settings that shape the exported soft labels (and the mixture stage 2 learns to produce):
#: a stage 2 must run with the values of the stage-1 run it starts from.
EXPORT_FIELDS = ("latent", "compression", "top_k", "temperature", "projection", "induction_mask")


@dataclass
class LatentSFTConfig(MethodConfig):
    name: str = "latent-sft"
    stage: int = field(default=1, metadata={"help": "1: train the Latent Token Encoder and the decoder (three steps); 2: the LLM learns to produce the latents (from train.init_from = a stage-1 folder)"})
    compression: int = field(default=4, metadata={"help": "r: explicit chain tokens per latent token (paper: 2 and 4 on GSM8K)"})
    top_k: int = field(default=10, metadata={"help": "latent = mixture of the k most probable tokens' embeddings (paper v2, official code: 10); 0 = the full vocabulary (v1)"})
    temperature: float = field(default=1.0, metadata={"help": "τ of the softmax that gives the mixture weights"})
    latent: str = field(default="superposition", metadata={"help": "superposition (z = αᵀE) or hidden (the paper's ablation: the decoder reads the encoder's raw last hidden state; "
                                                                     "in stage 2 the LLM's last hidden state is regressed on it and fed back at inference, as Coconut's thoughts are)"})
    projection: str = field(default="input", metadata={"help": "table the encoder's hidden state is projected on for α: input (E, the official code) or output (W; the same table on tied models)"})
    positions: str = field(default="dual", metadata={"help": "stage-1 decoder position ids: dual (latents consecutive, each segment continues from its latent: v2, no train/inference mismatch) or consecutive (v1)"})
    induction_mask: bool = field(default=True, metadata={"help": "encoder: no position attends to an earlier <latent> (LTIM); false = plain causal (ablation)"})
    supervision_mask: bool = field(default=True, metadata={"help": "decoder: each segment sees only its latent, the answer only the prompt and latents (LTSuM); false = plain causal (ablation)"})
    steps: str = field(default="encoder,decoder,both", metadata={"help": "stage-1 steps in order: encoder (decoder frozen), decoder (encoder frozen), both; "
                                                                     "optionally first warmup (ours, not the paper's: the encoder alone fits each latent's α to the tokens the decoder must write after it, "
                                                                     "so that small models do not collapse to one constant latent token)"})
    steps_per_step: int = field(default=0, metadata={"help": "optimizer steps of each stage-1 step; 0 = train.max_steps split evenly"})
    reset_optimizer: bool = field(default=True, metadata={"help": "clear AdamW's state when a stage-1 step begins"})
    soft_labels: str = field(default="", metadata={"help": "stage 2: folder of exported soft labels; empty = <train.output_dir>/soft_labels, exported from the stage-1 encoder of train.init_from (resumable)"})
    export_shard_size: int = field(default=1024, metadata={"help": "stage 2: examples per soft-label shard (a killed export resumes at the next shard)"})
    kl_weight: float = field(default=1.0, metadata={"help": "λ: weight of KL(soft label ‖ the LLM's next-token distribution) at latent positions "
                                                          "(latent=hidden: of the relative squared error ‖h − z‖² / ‖z‖² between the LLM's hidden state and the exported one)"})
    ce_weight: float = field(default=1.0, metadata={"help": "β: weight of the cross-entropy on <eot>, answer and eos"})
    kl_average: str = field(default="sequence", metadata={"help": "sequence: KL averaged over a row's latents then over rows, CE over tokens (the official code); token: one mean over latent positions and CE tokens together"})
    gumbel: bool = field(default=False, metadata={"help": "stage 2: Gumbel noise on the soft labels while training (paper v2; resampled if <eot> becomes a latent's top token)"})
    gumbel_scale: float = field(default=1.0, metadata={"help": "s: noise scale (noise clamped to [-1.5, 3])"})
    gumbel_temperature: float = field(default=1.0, metadata={"help": "τ_g: temperature of the noisy soft label"})
    max_latent_steps: int = field(default=64, metadata={"help": "inference: bound on latent steps (a row stops earlier when <eot> is its argmax)"})
    max_length: int = field(default=1024, metadata={"help": "training sequences longer than this (or than the model's context) are dropped"})

    def __post_init__(self) -> None:
        problems = []
        if self.stage not in (1, 2):
            problems.append(f"method.stage={self.stage}, must be 1 or 2")
        if self.compression < 1:
            problems.append(f"method.compression={self.compression}, must be >= 1")
        if self.top_k < 0:
            problems.append(f"method.top_k={self.top_k}, must be >= 0 (0 = full vocabulary)")
        if self.temperature <= 0:
            problems.append(f"method.temperature={self.temperature}, must be > 0")
        if self.latent == "hidden" and self.gumbel:
            problems.append("method.gumbel=true perturbs superposition soft labels; method.latent=hidden has none")
        for key, value, allowed in (("latent", self.latent, ("superposition", "hidden")),
                                    ("projection", self.projection, ("input", "output")),
                                    ("positions", self.positions, ("dual", "consecutive")),
                                    ("kl_average", self.kl_average, ("sequence", "token"))):
            if value not in allowed:
                problems.append(f"method.{key}={value!r}, must be one of {', '.join(allowed)}")
        bad = [s for s in self.step_list() if s not in STEPS]
        if bad or not self.step_list():
            problems.append(f"method.steps={self.steps!r}: comma-separated steps from {', '.join(STEPS)}")
        if self.steps_per_step < 0:
            problems.append(f"method.steps_per_step={self.steps_per_step}, must be >= 0 (0 = auto)")
        if self.max_latent_steps < 1:
            problems.append(f"method.max_latent_steps={self.max_latent_steps}, must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    def step_list(self) -> list[str]:
        return [s.strip() for s in self.steps.split(",") if s.strip()]


def latent_sft_stages(c: LatentSFTConfig, max_steps: int) -> list[Stage] | None:
    """Stage 1: one trainer stage per step, each keeping its best checkpoint; stage 2: none."""
    if c.stage == 2:
        return None
    names = c.step_list()
    per = c.steps_per_step or max(1, max_steps // len(names))
    lengths = [per] * len(names)
    if not c.steps_per_step:
        lengths[-1] += max(0, max_steps - sum(lengths))
    frozen = {"warmup": ("lm",), "encoder": ("lm",), "decoder": ("encoder",), "both": ()}
    # warmup keeps its last state: the decoder cannot read latents yet, so validation says nothing then
    return [Stage(name, n, reset_optimizer=c.reset_optimizer, select=i == len(names) - 1, frozen=frozen[name],
                  restore_best=name != "warmup") for i, (name, n) in enumerate(zip(names, lengths))]


# -- sequences and masks (pure functions: tested against hand-built matrices) --------------------
def segment(ids: list[int], r: int) -> list[list[int]]:
    """Contiguous segments of ``r`` tokens; a last partial segment is kept (N = ceil(len / r))."""
    return [ids[i: i + r] for i in range(0, len(ids), r)]


def encoder_sequence(prompt: list[int], segments: list[list[int]], latent_id: int, eot_id: int) -> tuple[list[int], list[int]]:
    """``[Q, <bot>, S1, L1, ..., SN, LN, <eot>]`` (``prompt`` ends with <bot>) and the latent positions."""
    ids, slots = list(prompt), []
    for seg in segments:
        ids += seg
        slots.append(len(ids))
        ids.append(latent_id)
    return ids + [eot_id], slots


def decoder_sequence(prompt: list[int], segments: list[list[int]], answer: list[int], latent_id: int,
                     eot_id: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """``[Q, <bot>, Z1, S2, Z2, ..., SN, ZN, <eot>, answer]`` (``answer`` ends with eos; S1 is dropped).

    Returns ids (latent slots hold ``latent_id``), each position's group (PROMPT, LATENT, SEGMENT,
    FINAL), its index (latent i and the segment after it share index i), and next-token labels
    (the segments S2..SN, <eot>, answer; IGNORE elsewhere).
    """
    ids, group, index = list(prompt), [PROMPT] * len(prompt), [0] * len(prompt)
    for i in range(len(segments)):
        ids.append(latent_id)
        group.append(LATENT)
        index.append(i)
        if i + 1 < len(segments):
            seg = segments[i + 1]
            ids += seg
            group += [SEGMENT] * len(seg)
            index += [i] * len(seg)
    tail = [eot_id] + answer
    ids += tail
    group += [FINAL] * len(tail)
    index += [0] * len(tail)
    labels = [IGNORE] * len(ids)
    for t in range(len(ids) - 1):
        if group[t + 1] in (SEGMENT, FINAL):
            labels[t] = ids[t + 1]
    return ids, group, index, labels


def latent_bags(segments: list[list[int]], answer: list[int]) -> list[list[int]]:
    """What the decoder writes right after each latent: the next segment, and after the last one
    the answer (without eos). The warm-up step's targets (a token repeated counts each time)."""
    return [segments[i + 1] if i + 1 < len(segments) else (answer or segments[i]) for i in range(len(segments))]


def additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T, T] bool -> [B, 1, T, T] additive mask: 0 where allowed, finfo.min elsewhere (never -inf)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def _causal_with_pads(lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = lengths.device
    pos = torch.arange(width, device=device)
    valid = pos[None, :] < lengths[:, None]  # [B, T] pads are masked by length, never by id
    causal = pos[None, :, None] >= pos[None, None, :]
    return causal & valid[:, None, :] & valid[:, :, None], valid


def _finish(allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A pad query attends to itself only, so no row of the softmax is empty."""
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)[None]
    return allowed | (eye & ~valid[:, :, None])


def induction_mask(is_latent: torch.Tensor, lengths: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """[B, T, T] bool: causal, except that no position attends to an *earlier* ``<latent>``."""
    allowed, valid = _causal_with_pads(lengths, is_latent.shape[1])
    if enabled:
        pos = torch.arange(is_latent.shape[1], device=is_latent.device)
        earlier = pos[None, None, :] < pos[None, :, None]
        allowed = allowed & ~(is_latent[:, None, :] & earlier)
    return _finish(allowed, valid)


def supervision_mask(group: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """[B, T, T] bool: the prompt is causal within itself; latent i sees the prompt and latents
    1..i; a segment sees itself (causally) and the latent before it; the final part (<eot>,
    answer) sees the prompt, every latent and itself, never a segment."""
    allowed, valid = _causal_with_pads(lengths, group.shape[1])
    if not enabled:
        return _finish(allowed, valid)
    gq, gk = group[:, :, None], group[:, None, :]
    iq, ik = index[:, :, None], index[:, None, :]
    rule = ((gq == PROMPT) & (gk == PROMPT)) \
        | ((gq == LATENT) & ((gk == PROMPT) | ((gk == LATENT) & (ik <= iq)))) \
        | ((gq == SEGMENT) & (gk == SEGMENT) & (ik == iq)) \
        | ((gq == SEGMENT) & (gk == LATENT) & (ik == iq)) \
        | ((gq == FINAL) & (gk != SEGMENT))
    return _finish(allowed & rule, valid)


def dual_positions(group: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Dual-track position ids: latents (and the final part) continue the prompt as if no segment
    were there; each segment continues from its latent's position."""
    is_seg = group == SEGMENT
    col = torch.arange(group.shape[1], device=group.device)[None].expand_as(group)
    valid = col < lengths[:, None]
    main = (~is_seg & valid).long().cumsum(-1) - 1  # position on the latent track
    # a segment token: the position of the last non-segment column before it (its latent) + its distance
    anchor = torch.where(is_seg, torch.full_like(col, -1), col).cummax(-1).values.clamp(min=0)
    pos = torch.where(is_seg, main.gather(1, anchor) + (col - anchor), main)
    return torch.where(valid, pos, torch.zeros_like(pos)).clamp(min=0)


def latent_statistics(probs: torch.Tensor, ids: torch.Tensor | None, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logged while training: the mean top-1 weight of the latents and the share of distinct top-1
    tokens among them. A collapsed encoder (one token, weight 1, at every latent: latents that
    carry nothing) shows as 1.0 and a share near 0."""
    with torch.no_grad():  # tensor ops only: no wait on the device in the training step
        top1 = probs.max(-1)
        tokens = top1.indices if ids is None else ids.gather(-1, top1.indices[..., None]).squeeze(-1)
        ordered = torch.where(valid, tokens, -1).flatten().sort().values
        distinct = (ordered[1:] != ordered[:-1]).sum() + 1 - (ordered[0] < 0).long()  # less the -1 of invalid slots
        count = valid.sum().clamp(min=1)
        return {"latent_top1_weight": (top1.values * valid).sum() / count,
                "latent_distinct_top1": distinct.float() / count}


# -- the two modules -----------------------------------------------------------------------------
class LatentEncoder(nn.Module):
    """The Latent Token Encoder: a copy of the LLM's transformer (same architecture and initial
    weights); no LM head, since α comes from the LLM's own embedding table."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        if hasattr(lm, "merge_and_unload"):  # a peft-wrapped LLM (stage 2 under LoRA exports labels): the plain
            self.body = copy.deepcopy(lm).merge_and_unload().base_model  # architecture, not its adapter layers
        else:
            self.body = copy.deepcopy(lm.base_model)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        return self.body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


@METHODS.register("latent-sft")
class LatentSFT(Method):
    """Latent-SFT (arXiv 2510.15522): vocabulary-space superposition latents, two training stages."""

    name = "latent-sft"
    config_cls = LatentSFTConfig
    paper = "arXiv 2510.15522"
    cfg: LatentSFTConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lm = self.loaded
        if lm.bot_id is None or lm.eot_id is None or lm.latent_id is None:
            raise ValueError(f"method {self.name!r} needs <bot>/<eot>/<latent>: keep model.add_latent_tokens=true")
        self.encoder: LatentEncoder | None = LatentEncoder(lm.model) if self.cfg.stage == 1 else None
        if self.encoder is not None:
            self.encoder.requires_grad_(any(p.requires_grad for p in lm.model.parameters()))
        self._labels: SoftLabels | None = None
        self._reference: LatentSFT | None = None  # stage-1 method for N_eff's encoder alignment, loaded on first use
        self._export_from: Path | None = None
        stages = self.stages()
        self.stage_index = len(stages) - 1 if stages else 0

    # -- schedule ------------------------------------------------------------------------------
    def stages(self) -> list[Stage] | None:
        return latent_sft_stages(self.cfg, self.run.train.max_steps)

    @classmethod
    def schedule_uses_max_steps(cls, run: Any) -> bool:
        return run.method.stage == 1 and run.method.steps_per_step == 0

    @classmethod
    def train_problems(cls, run: Any) -> list[str]:
        c = run.method
        problems = []
        stages = latent_sft_stages(c, run.train.max_steps)
        if stages is not None:
            problems += stage_problems(stages, run.train.max_steps)
            if not run.train.select_on_valid:
                problems.append("method.stage=1 picks each step's best checkpoint on validation: set train.select_on_valid=true")
        if c.stage == 2 and not c.soft_labels and not run.train.init_from:
            problems.append("method.stage=2 needs train.init_from (the stage-1 folder, whose encoder exports the soft "
                            "labels) or method.soft_labels (a folder of exported labels)")
        return problems

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder} if self.encoder is not None else {}

    def lora_submodules(self) -> list[tuple[nn.Module, str]]:
        return [(self.encoder, "body")] if self.encoder is not None else []

    def load_extra_modules(self, path: str | Path) -> None:
        """Stage 2 started from a stage-1 folder: its encoder is read only to export the soft labels."""
        if self.cfg.stage == 2:
            self._export_from = Path(path)
            saved = Path(path) / RUN_CONFIG_FILE
            method = (yaml.safe_load(saved.read_text()) or {}).get("method", {}) if saved.exists() else {}
            # The soft labels must be the latents the encoder was trained to make: same r, mask, top-k, τ and
            # table (a stage 2 left at compression 4 after an r = 2 stage 1 exported r = 4 labels).
            defaults = {"latent": "superposition"}
            differ = [f"method.{k}={method.get(k, defaults.get(k))!r} (this stage 2: {getattr(self.cfg, k)!r})"
                      for k in EXPORT_FIELDS if k in method or k in defaults
                      if method.get(k, defaults.get(k)) != getattr(self.cfg, k)]
            if saved.exists() and differ:
                raise CheckpointError(f"{saved}: stage 1 ran with {', '.join(differ)}; its encoder's soft labels "
                                      "need the settings it was trained with: set them for stage 2 too")
            return
        super().load_extra_modules(path)

    # -- shared pieces -------------------------------------------------------------------------
    def _table(self, lm: nn.Module) -> torch.Tensor:
        """The LLM's input embedding E (detached): the mixture is always over it. Under LoRA on the
        embedding, E is the adapted table (base + low-rank delta), which is what the saved, merged
        model looks tokens up in."""
        with torch.no_grad():
            return input_embedding_table(lm).detach()

    def _projection(self, lm: nn.Module) -> torch.Tensor:
        if self.cfg.projection == "output":
            return lm.get_output_embeddings().weight.detach()
        return self._table(lm)

    def mixture_weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """α over the top-k (probabilities, ids) or the full vocabulary (probabilities, None)."""
        return MixtureStep(temperature=self.cfg.temperature, top_k=self.cfg.top_k).weights(logits)

    @staticmethod
    def mix(probs: torch.Tensor, ids: torch.Tensor | None, table: torch.Tensor) -> torch.Tensor:
        """z = αᵀE for [..., k] weights with [..., k] ids (or [..., V] weights over the table)."""
        if ids is None:
            return probs.to(table.dtype) @ table
        return (probs.to(table.dtype)[..., None] * table[ids]).sum(-2)

    def _chain_segments(self, examples: list[Example]) -> list[list[list[int]]]:
        tok = self.loaded.tokenizer
        chains = tok([self.task.chain_text(ex) for ex in examples], add_special_tokens=False)["input_ids"]
        return [segment(c, self.cfg.compression) for c in chains]

    def _answers(self, examples: list[Example]) -> list[list[int]]:
        return encode_targets([self.task.answer_text(ex) for ex in examples], self.loaded.tokenizer, self.loaded.eos_ids[0])

    def _limit(self) -> int:
        context = max_positions(self.loaded.model)
        return min(self.cfg.max_length, context) if context else self.cfg.max_length

    # -- stage 1: the encoder's latents --------------------------------------------------------
    def encode_batch(self, prompts: list[list[int]], segments: list[list[list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded encoder inputs with the induction mask, and where each row's latents are."""
        lm = self.loaded
        rows = [encoder_sequence(p, s, lm.latent_id, lm.eot_id) for p, s in zip(prompts, segments)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), lm.pad_id, dtype=torch.long)
        is_latent = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (seq, slots) in enumerate(rows):
            ids[i, :len(seq)] = torch.tensor(seq)
            is_latent[i, slots] = True
        lengths = torch.tensor([len(seq) for seq, _ in rows])
        return {"enc_ids": ids, "enc_latent": is_latent, "enc_lengths": lengths}

    def encoder_weights(self, encoder: nn.Module, lm: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """α at every latent slot: ([B, N, k] probabilities, ids or None, [B, N] valid)."""
        scores, valid = self.encoder_scores(encoder, lm, batch)
        probs, top = self.mixture_weights(scores)
        return probs, top, valid

    def encoder_scores(self, encoder: nn.Module, lm: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's hidden state at every latent slot projected on the table: ([B, N, V], [B, N] valid)."""
        h, valid = self.encoder_hidden(encoder, batch, lm.get_input_embeddings().weight.dtype)
        return self._scores(h, lm), valid

    def _scores(self, h: torch.Tensor, lm: nn.Module) -> torch.Tensor:
        table = self._projection(lm)
        wide = torch.promote_types(h.dtype, torch.float32)  # bf16 -> fp32; fp64 stays (gradient checks)
        return h.to(wide) @ table.to(wide).T

    def encoder_hidden(self, encoder: nn.Module, batch: dict[str, Any], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's last hidden state at every latent slot, in order: ([B, N, d], [B, N] valid)."""
        ids, is_latent, lengths = batch["enc_ids"], batch["enc_latent"], batch["enc_lengths"]
        mask = additive(induction_mask(is_latent, lengths, self.cfg.induction_mask), dtype=dtype)
        hidden = encoder(ids, mask)
        counts = is_latent.sum(-1)
        n = int(counts.max())
        # gather each row's latent positions in order into [B, N]
        order = torch.argsort((~is_latent).int(), dim=1, stable=True)[:, :n]
        h = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        valid = torch.arange(n, device=ids.device)[None] < counts[:, None]
        return h, valid

    def stage1_latents(self, encoder: nn.Module, lm: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """What the stage-1 decoder reads at each latent slot: z = αᵀE, or the encoder's raw hidden
        state under ``method.latent=hidden`` (the ablation). Returns (z, α, ids, valid)."""
        table = self._table(lm)
        h, valid = self.encoder_hidden(encoder, batch, table.dtype)
        probs, top = self.mixture_weights(self._scores(h, lm))
        z = h.to(table.dtype) if self.cfg.latent == "hidden" else self.mix(probs, top, table)
        return z, probs, top, valid

    def _stage1_collate(self, examples: list[Example]) -> dict[str, Any]:
        lm = self.loaded
        prompts, segments, answers = self.bot_prompt_ids(examples), self._chain_segments(examples), self._answers(examples)
        rows = [decoder_sequence(p, s, a, lm.latent_id, lm.eot_id) for p, s, a in zip(prompts, segments, answers)]
        enc_len = [len(p) + sum(len(x) + 1 for x in s) + 1 for p, s in zip(prompts, segments)]
        limit = self._limit()
        keep = [i for i, r in enumerate(rows) if len(r[0]) <= limit and enc_len[i] <= limit and segments[i]]
        if not keep:
            raise ValueError(f"every example of this batch is longer than {limit} tokens (method.max_length="
                             f"{self.cfg.max_length}) or has an empty chain")
        rows = [rows[i] for i in keep]
        width = max(len(r[0]) for r in rows)
        b = len(rows)
        ids = torch.full((b, width), lm.pad_id, dtype=torch.long)
        group = torch.full((b, width), PAD, dtype=torch.long)
        index = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        for i, (seq, g, x, lab) in enumerate(rows):
            n = len(seq)
            ids[i, :n], group[i, :n], index[i, :n], labels[i, :n] = (torch.tensor(v) for v in (seq, g, x, lab))
        lengths = torch.tensor([len(r[0]) for r in rows])
        bags = [latent_bags(segments[i], answers[i][:-1]) for i in keep]
        depth = max(len(bag) for row in bags for bag in row)
        bag_ids = torch.zeros((b, max(len(row) for row in bags), depth), dtype=torch.long)
        bag_weights = torch.zeros(bag_ids.shape)
        for i, row in enumerate(bags):
            for j, bag in enumerate(row):
                bag_ids[i, j, :len(bag)] = torch.tensor(bag)
                bag_weights[i, j, :len(bag)] = 1.0 / len(bag)
        batch = {"ids": ids, "group": group, "index": index, "labels": labels, "lengths": lengths,
                 "bag_ids": bag_ids, "bag_weights": bag_weights,
                 "num_targets": int((labels != IGNORE).sum()), "dropped": len(examples) - len(keep)}
        batch.update(self.encode_batch([prompts[i] for i in keep], [segments[i] for i in keep]))
        return batch

    def _warmup_loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Cross-entropy of the encoder's full-vocabulary α at each latent against the uniform
        distribution over the tokens written after it (the decoder stays out of it). Averaged
        over latents, on the decoder loss's token scale like the stage-2 KL."""
        scores, valid = self.encoder_scores(modules["encoder"], modules["lm"], batch)
        logp = (scores / self.cfg.temperature).log_softmax(-1)
        ce = -(logp.gather(-1, batch["bag_ids"]) * batch["bag_weights"]).sum(-1)  # [B, N]
        mean = (ce * valid).sum() / valid.sum().clamp(min=1)
        probs, top = self.mixture_weights(scores.detach())
        return {"loss_sum": mean * batch["num_targets"], "bag_ce": mean.detach(), **latent_statistics(probs, top, valid)}

    def _stage1_loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        stages = self.stages()
        if stages and stages[self.stage_index].name == "warmup":
            return self._warmup_loss(modules, batch)
        lm = modules["lm"]
        z, probs, top, valid = self.stage1_latents(modules["encoder"], lm, batch)
        ids, group, lengths = batch["ids"], batch["group"], batch["lengths"]
        embeds = embed_with_slots(lm, ids, group == LATENT, z)
        mask = additive(supervision_mask(group, batch["index"], lengths, self.cfg.supervision_mask), dtype=embeds.dtype)
        if self.cfg.positions == "dual":
            positions = dual_positions(group, lengths)
        else:
            positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return {"loss_sum": loss, **latent_statistics(probs, top, valid)}

    # -- stage 2: the LLM produces the latents -------------------------------------------------
    def soft_labels(self) -> SoftLabels:
        """The stage-1 encoder's latents over the training chains; exported on first use."""
        if self._labels is not None:
            return self._labels
        folder = Path(self.cfg.soft_labels or Path(self.run.train.output_dir) / "soft_labels")
        if self._export_from is not None:
            examples = self.task.load(self.run.data.train_split, limit=self.run.data.train_limit)
            export_soft_labels(self, examples, folder, source=self._export_from)
        self._labels = SoftLabels(folder)
        return self._labels

    def _stage2_collate(self, examples: list[Example]) -> dict[str, Any]:
        labels = self.soft_labels()
        want = "vectors" if self.cfg.latent == "hidden" else "probs"
        if labels.kind not in (None, want):
            raise CheckpointError(f"{labels.folder}: exported {labels.kind}, but method.latent={self.cfg.latent!r} trains on "
                                  f"{want}; export from a stage-1 run of the same method.latent")
        prompts, answers = self.bot_prompt_ids(examples), self._answers(examples)
        drawn = [labels.get(ex.id) for ex in examples]
        limit = self._limit()
        keep = [i for i, d in enumerate(drawn) if len(prompts[i]) + d[0].shape[0] + 1 + len(answers[i]) <= limit]
        if not keep:
            raise ValueError(f"every example of this batch is longer than {limit} tokens (method.max_length={self.cfg.max_length})")
        probs = [drawn[i][0] for i in keep]
        ids = [drawn[i][1] for i in keep]
        if self.cfg.gumbel:
            probs = [self._noisy(p, x) for p, x in zip(probs, ids)]
        n = max(p.shape[0] for p in probs)
        k = probs[0].shape[1]
        full = ids[0].shape[-1] == 0  # labels over the whole vocabulary (method.top_k=0) or hidden states: no ids
        pad_p = torch.zeros(len(keep), n, k)
        pad_i = None if full else torch.zeros(len(keep), n, k, dtype=torch.long)
        for j, (p, x) in enumerate(zip(probs, ids)):
            pad_p[j, :p.shape[0]] = p
            if pad_i is not None:
                pad_i[j, :x.shape[0]] = x
        counts = [p.shape[0] for p in probs]
        ce_tokens = sum(len(answers[i]) for i in keep) + len(keep)  # the answer, eos, and <eot> itself
        num = ce_tokens + (sum(counts) if self.cfg.kl_average == "token" else 0)
        return {"prompts": [prompts[i] for i in keep], "targets": [answers[i] for i in keep], "probs": pad_p,
                "ids": pad_i, "counts": counts, "ce_tokens": ce_tokens, "num_targets": num,
                "dropped": len(examples) - len(keep)}

    def _noisy(self, p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Gumbel-perturbed soft label, resampled (up to 100 tries) while <eot> tops any latent."""
        c = self.cfg
        for _ in range(100):
            g = -torch.log(-torch.log(torch.rand(p.shape).clamp(1e-10, 1 - 1e-10)))
            noisy = ((p + 1e-10).log() + (c.gumbel_scale * g).clamp(-1.5, 3.0)) / c.gumbel_temperature
            noisy = noisy.softmax(-1)
            top = noisy.argmax(-1) if ids.shape[-1] == 0 else ids.gather(-1, noisy.argmax(-1, keepdim=True)).squeeze(-1)
            if not bool((top == self.loaded.eot_id).any()):
                return noisy
        return p

    def _stage2_loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        lm = modules["lm"]
        table = self._table(lm)
        probs, ids = batch["probs"], batch["ids"]
        hidden = self.cfg.latent == "hidden"  # probs holds the exported hidden states [B, N, d]
        vectors = probs.to(table.dtype) if hidden else self.mix(probs, ids, table)
        out = latent_forward(lm, batch["prompts"], batch["targets"], eot_id=self.loaded.eot_id, pad_id=self.loaded.pad_id,
                             vectors=vectors, num_latents=batch["counts"], return_latent_logits=True, return_hidden=hidden)
        counts = out.num_latents
        logp = out.latent_logits.float().log_softmax(-1)  # [B, K+1, V]
        # inference feeds softmax(logits / τ) (MixtureStep): that is what must match the teacher's α
        latent_logp = logp if self.cfg.temperature == 1 else (out.latent_logits.float() / self.cfg.temperature).log_softmax(-1)
        n = probs.shape[1]
        valid = torch.arange(n, device=probs.device)[None] < counts[:, None]
        if hidden:  # the state inference would feed as latent t, against the exported one
            target = probs.to(out.latent_hidden.dtype)
            err = (out.latent_hidden[:, :n] - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-12)
            kl = err.float() * valid  # [B, N]
        else:
            teacher = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
            student = latent_logp[:, :n] if ids is None else latent_logp[:, :n].gather(-1, ids)
            kl = (teacher * ((teacher + 1e-12).log() - student)).sum(-1) * valid  # [B, N]
        eot_logp = logp.gather(1, counts[:, None, None].expand(-1, 1, logp.shape[-1])).squeeze(1)[:, self.loaded.eot_id]
        ce = out.loss_sum() - eot_logp.sum()
        if self.cfg.kl_average == "token":
            kl_sum = kl.sum()
        else:  # mean over a row's latents, mean over rows, on the CE's token scale
            per_row = kl.sum(-1) / counts.clamp(min=1)
            kl_sum = per_row.mean() * batch["ce_tokens"]
        loss = self.cfg.kl_weight * kl_sum + self.cfg.ce_weight * ce
        name = "latent_err" if hidden else "kl"
        return {"loss_sum": loss, name: kl.sum().detach() / valid.sum().clamp(min=1), "ce": ce.detach() / batch["ce_tokens"]}

    # -- the hooks -----------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> dict[str, Any]:
        return self._stage1_collate(examples) if self.cfg.stage == 1 else self._stage2_collate(examples)

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self._stage1_loss(modules, batch) if self.cfg.stage == 1 else self._stage2_loss(modules, batch)

    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        return self.bot_prompt_ids(examples)

    def latent_step(self, examples: list[Example]) -> LatentStep | None:
        if self.cfg.stage == 2 and self.cfg.latent == "hidden":
            return HiddenStateStep(stop_token_id=self.loaded.eot_id)
        if self.cfg.stage == 2:
            return MixtureStep(temperature=self.cfg.temperature, top_k=self.cfg.top_k, stop_token_id=self.loaded.eot_id)
        # stage 1: the encoder reads the gold chain (the teacher; what validation selects on)
        assert self.encoder is not None
        batch = self.encode_batch(self.bot_prompt_ids(examples), self._chain_segments(examples))
        device = self.loaded.model.device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            z, _, _, valid = self.stage1_latents(self.encoder, self.loaded.model, batch)
            z = z * valid[..., None]
        bound = self.cfg.max_latent_steps
        if z.shape[1] > bound:
            raise ValueError(f"a chain of this batch cuts into {z.shape[1]} latents, more than method.max_latent_steps="
                             f"{bound}; raise it (or method.compression)")
        z = F.pad(z, (0, 0, 0, bound - z.shape[1]))  # rows stop at their own count
        return ExternalStep(z, lengths=valid.sum(-1))

    def rollout_config(self) -> RolloutConfig:
        cfg = replace(self.run.rollout, num_latent_steps=self.cfg.max_latent_steps)
        if self.cfg.stage == 2 and self.cfg.latent == "superposition":  # the superposition metrics read the top-100 of each step
            cfg = replace(cfg, keep_distributions="topk", distribution_topk=max(cfg.distribution_topk, 100))
        return cfg

    def superposition_rate(self) -> int | None | bool:
        return self.cfg.compression if self.cfg.stage == 2 and self.cfg.latent == "superposition" else False

    def solution_latents(self, examples: list[Example], solutions: list[list[list[list[int]]]],
                         chunk: int = 64) -> list[list[torch.Tensor]]:
        """The stage-1 encoder's latents z = αᵀE of each solution's segments, read after this model's
        prompt for its example (the authors precompute them per solution segment for N_eff's
        matching); the encoder runs over ``chunk`` solutions at a time."""
        ref = self._stage1()
        prompts = self.bot_prompt_ids(examples)
        flat = [(p, segs) for p, sols in zip(prompts, solutions) for segs in sols]
        device = ref.loaded.model.device
        found: list[torch.Tensor] = []
        for start in range(0, len(flat), chunk):
            part = flat[start: start + chunk]
            batch = ref.encode_batch([p for p, _ in part], [s for _, s in part])
            with torch.no_grad():
                z, _, _, valid = ref.stage1_latents(ref.encoder, ref.loaded.model,
                                                    {k: v.to(device) for k, v in batch.items()})
            found += [z[m, :int(valid[m].sum())].float().cpu() for m in range(len(part))]
        out, at = [], 0
        for sols in solutions:
            out.append(found[at: at + len(sols)])
            at += len(sols)
        return out

    def _stage1(self) -> LatentSFT:
        """The stage-1 method (encoder and LLM) named by eval.encoder, else by this model's train.init_from."""
        if self._reference is not None:
            return self._reference
        folder = self.run.eval.encoder
        if not folder:
            saved = Path(self.run.model.name_or_path) / RUN_CONFIG_FILE
            data = yaml.safe_load(saved.read_text()) if saved.exists() else None
            folder = ((data or {}).get("train") or {}).get("init_from")
            if not folder:
                raise CheckpointError(f"eval.n_eff_alignment=encoder needs the stage-1 encoder, and {saved} names no "
                                      "train.init_from: set eval.encoder=<the stage-1 folder>")
        ref = Method.from_pretrained(folder, [f"model.device={self.loaded.model.device}"])
        if not isinstance(ref, LatentSFT) or ref.cfg.stage != 1 or ref.encoder is None:
            raise CheckpointError(f"{folder}: eval.encoder must be a stage-1 latent-sft folder (it holds "
                                  f"{ref.name!r}{' stage 2' if isinstance(ref, LatentSFT) else ''})")
        if ref.cfg.compression != self.cfg.compression:
            raise CheckpointError(f"{folder}: stage 1 cut chains at method.compression={ref.cfg.compression}, this model "
                                  f"at {self.cfg.compression}: N_eff needs one latent per segment of the same size")
        ref.encoder.eval()
        self._reference = ref
        return ref


# -- soft labels: the stage-1 encoder's latents over the training chains -------------------------
def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def export_soft_labels(method: LatentSFT, examples: list[Example], folder: Path, source: Path,
                       batch_size: int = 32) -> Path:
    """Run the stage-1 encoder of ``source`` over ``examples``' chains into ``folder``.

    One safetensors shard per ``method.export_shard_size`` examples, each written atomically, so a
    killed export resumes at the next missing shard and never holds an example twice. A folder
    made from another source, other settings or other examples is refused, not mixed.
    """
    c = method.cfg
    weights = source / EXTRA_MODULES_FILE
    meta = {"source": str(source.resolve()), "encoder_bytes": weights.stat().st_size if weights.exists() else None,
            "task": method.task.name, "task_version": method.task.version, "examples": len(examples),
            "first_id": examples[0].id if examples else None, "last_id": examples[-1].id if examples else None,
            "compression": c.compression, "top_k": c.top_k, "temperature": c.temperature, "projection": c.projection,
            "induction_mask": c.induction_mask, "shard_size": c.export_shard_size}
    if c.latent != "superposition":  # only then: folders exported before the option existed stay valid
        meta["latent"] = c.latent
    state = process_state()
    with state.main_process_first():
        if not state.is_main_process:
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        meta_file = folder / "meta.json"
        if meta_file.exists():
            old = json.loads(meta_file.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                changes = ", ".join(f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in diff)
                raise CheckpointError(f"{meta_file}: soft labels of other settings ({changes}); use another "
                                      "method.soft_labels folder, or delete this one")
        else:
            atomic_write_json(meta_file, meta)
        if (folder / "complete.json").exists():
            return folder
        encoder = LatentEncoder(method.loaded.model).to(method.loaded.model.device)
        saved = load_file(str(weights))
        part = {n[len("encoder."):]: t for n, t in saved.items() if n.startswith("encoder.")}
        encoder.load_state_dict(part, strict=True)
        encoder.eval()
        size = c.export_shard_size
        shards = range(0, len(examples), size)
        todo = [i for i in shards if not (folder / _shard_name(i // size)).exists()]
        for start in tqdm(todo, desc="soft labels", unit="shard"):
            chunk = examples[start: start + size]
            probs, ids, counts = [], [], []
            for b in range(0, len(chunk), batch_size):
                part_ex = chunk[b: b + batch_size]
                batch = method.encode_batch(method.bot_prompt_ids(part_ex), method._chain_segments(part_ex))
                batch = {k: v.to(method.loaded.model.device) for k, v in batch.items()}
                with torch.no_grad():
                    if c.latent == "hidden":  # the vectors the stage-1 decoder read; no ids
                        p, valid = method.encoder_hidden(encoder, batch, method.loaded.model.get_input_embeddings().weight.dtype)
                        top = None
                    else:
                        p, top, valid = method.encoder_weights(encoder, method.loaded.model, batch)
                for r in range(p.shape[0]):
                    n = int(valid[r].sum())
                    probs.append(p[r, :n].float().cpu())
                    ids.append((top[r, :n] if top is not None else torch.zeros(n, 0, dtype=torch.long)).int().cpu())
                    counts.append(n)
            key = "vectors" if c.latent == "hidden" else "probs"
            tensors = {key: torch.cat(probs), "ids": torch.cat(ids), "counts": torch.tensor(counts)}
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{PARTIAL_PREFIX}shard-")
            os.close(fd)
            save_file(tensors, tmp, metadata={"ids": json.dumps([ex.id for ex in chunk])})
            set_default_file_mode(tmp)
            os.replace(tmp, folder / _shard_name(start // size))
        atomic_write_json(folder / "complete.json", {"shards": len(shards), "examples": len(examples)})
    return folder


class SoftLabels:
    """Exported soft labels, by example id: ([N, k] probabilities, [N, k] token ids), or under
    ``method.latent=hidden`` ([N, d] hidden states, [N, 0])."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / "complete.json").exists():
            raise CheckpointError(f"{self.folder}: no complete soft-label export (complete.json missing); run stage 2 "
                                  "with train.init_from=<the stage-1 folder> to export them")
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kind: str | None = None  # "probs" (superposition) or "vectors" (hidden states)
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                ids = json.loads(f.metadata()["ids"])
            t = load_file(str(shard))
            kind = "vectors" if "vectors" in t else "probs"
            if self.kind not in (None, kind):
                raise CheckpointError(f"{shard}: holds {kind} but an earlier shard holds {self.kind}; export again into an empty folder")
            self.kind = kind
            offsets = [0, *t["counts"].cumsum(0).tolist()]
            for j, key in enumerate(ids):
                if key in self.rows:
                    raise CheckpointError(f"{shard}: example {key!r} is in two shards; export again into an empty folder")
                a, b = offsets[j], offsets[j + 1]
                self.rows[key] = (t[kind][a:b], t["ids"][a:b].long())

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.rows[key]
        except KeyError:
            raise KeyError(f"{self.folder}: no soft label for example {key!r} (exported from other examples?)") from None


__all__ = ["LatentSFT", "LatentSFTConfig", "SoftLabels", "export_soft_labels"]

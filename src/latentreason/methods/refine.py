"""Post-training refinement of latent reasoning (arXiv 2506.08552), at inference, on any latent method.

Two operators wrap whatever latent step a method runs (Coconut's hidden states, Latent-SFT's
superposition vectors, Soft Thinking's mixtures, SoftCoT's projections); no weight changes:

- residual refinement: ``z(t) = α z(t−1) + (1 − α) step(t)`` (``step(t)`` is what the method
  would feed, computed from the refined ``z(t−1)`` the model was actually fed; α = 0 is the method
  itself). The momentum form keeps a velocity instead: ``v(t) = α v(t−1) + (1 − α)(step(t) − z(t−1))``,
  ``z(t) = z(t−1) + v(t)``. The first latent is the method's own (there is no ``z(−1)``).
- contrastive feedback: a strong and a weak reference model (by default a late and an early
  checkpoint of the CoT-SFT run the model was trained from) read the same prefix in lockstep with
  the model (``rollout(..., references=...)``); with ``z`` fed next, their last hidden states
  ``h_s``, ``h_w`` give one descent step on ``MSE(z, sg[h_s]) − MSE(z, sg[h_w])``:
  ``z ← z + (2η/d)(h_s − h_w)`` (``refine.direction=weak`` flips the sign, as the paper's printed
  update). One step per latent by default (``refine.search_steps``).

Order per latent: residual first, then contrastive (``refine.order``). ``latentreason eval
refine.residual=true ...`` evaluates with refinement; ``latentreason refine`` sweeps α × η on the
validation split, draws the heat map, and evaluates the chosen setting once on ``eval.split``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from latentreason.config import RUN_CONFIG_FILE, RefineConfig
from latentreason.models.steps import LatentStep, StepContext, StepResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from latentreason.config import RunConfig
    from latentreason.methods.base import Method

logger = logging.getLogger(__name__)


class RefineStep(LatentStep):
    """Residual and contrastive refinement around ``inner``; rows stop where ``inner`` says.

    Per-rollout state (the last fed vector, the velocity, the shift sums) resets at latent step 0.
    No host sync: every operation is a tensor op (see ``models/steps.py``).

    It also measures how far each operator moves what is fed, relative to the vector it was given
    (``|z_after - z_before| / |z_before|``, averaged per row over the latents the row fed): η is in
    units of the hidden state's scale, which differs by orders of magnitude between methods
    (superposition vectors vs Coconut's hidden states), so this is the number that says whether a
    setting did anything. :meth:`row_shifts` reads it after a rollout.
    """

    def __init__(self, inner: LatentStep, cfg: RefineConfig) -> None:
        self.inner, self.cfg = inner, cfg
        self.needs_hidden = inner.needs_hidden
        self.sign = 1.0 if cfg.direction == "strong" else -1.0
        self._prev: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None
        self._shift: dict[str, torch.Tensor] = {}
        self._fed: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # the rows still served (None: all); the sums stay whole
        self.compactable = inner.compactable

    def select_rows(self, index: torch.Tensor) -> None:
        self.inner.select_rows(index)
        self._rows = index if self._rows is None else self._rows[index]
        self._prev = None if self._prev is None else self._prev[index]
        self._velocity = None if self._velocity is None else self._velocity[index]

    def _add(self, total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        """A per-row sum over the whole batch, with ``value`` for the rows still served."""
        if self._rows is None:
            return value if total is None else total + value
        if total is None:  # an operator that first ran after rows left (self._fed is whole by then)
            total = torch.zeros_like(self._fed)
        return total.index_add(0, self._rows, value)

    def validate(self, batch: int, num_steps: int, dim: int) -> None:
        self.inner.validate(batch, num_steps, dim)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        prev, a = self._prev, self.cfg.alpha
        if prev is None:  # the first latent: nothing to mix with
            self._velocity = torch.zeros_like(z)
            return z
        if self.cfg.momentum:
            self._velocity = a * self._velocity + (1 - a) * (z - prev)
            return prev + self._velocity
        return a * prev + (1 - a) * z

    def contrastive(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.references is None:
            raise ValueError("refine.contrastive=true needs reference models in the rollout "
                             "(rollout(..., references=[strong, weak]))")
        scale = self.sign * 2.0 * self.cfg.eta / z.shape[-1]
        for _ in range(self.cfg.search_steps):
            strong, weak = ctx.references.hidden(z, ctx.active, ctx.positions)
            z = z + scale * (strong - weak)
        return z

    def __call__(self, ctx: StepContext) -> StepResult:
        if ctx.step == 0:  # a new rollout (a Python value: no sync)
            self._prev = self._velocity = self._rows = None
            self._shift, self._fed = {}, None
        result = self.inner(ctx)
        z = result.embeds
        fed = ctx.active if result.stop is None else ctx.active & ~result.stop  # rows that feed this vector
        fed = fed.float()
        self._fed = self._add(self._fed, fed)
        ops = ["residual", "contrastive"] if self.cfg.order == "residual-first" else ["contrastive", "residual"]
        for op in ops:
            before = z
            if op == "residual" and self.cfg.residual:
                z = self.residual(z)
            elif op == "contrastive" and self.cfg.contrastive and self.cfg.eta != 0:
                z = self.contrastive(z, ctx)
            else:
                continue
            moved = (z - before).float().norm(dim=-1) / before.float().norm(dim=-1).clamp_min(1e-12)
            moved = moved * fed
            self._shift[op] = self._add(self._shift.get(op), moved)
        self._prev = z
        return StepResult(z, result.stop)

    def row_shifts(self) -> dict[str, torch.Tensor]:
        """Per row, the mean relative move of each operator that ran over the last rollout's fed
        latents (``{"residual": [B], "contrastive": [B]}``; rows that fed none: 0). The first latent
        counts with a residual move of 0 (there is nothing to mix it with)."""
        if self._fed is None:
            return {}
        count = self._fed.clamp_min(1.0)
        return {op: total / count for op, total in self._shift.items()}


# ---- references ------------------------------------------------------------------------------


def _run_folder(model_folder: Path) -> Path:
    """The run a saved model folder belongs to (``best/``, ``final/``, a stage or keep folder's parent)."""
    return model_folder.parent if not (model_folder / "log.jsonl").exists() else model_folder


def kept_checkpoints(run_folder: Path) -> list[Path]:
    """``keep-<step>/`` folders of a run (``train.keep_every``), by step."""
    from latentreason.methods.trainer import KEEP_PREFIX

    found = []
    for p in run_folder.glob(f"{KEEP_PREFIX}*"):
        tail = p.name[len(KEEP_PREFIX):]
        if p.is_dir() and tail.isdigit() and (p / RUN_CONFIG_FILE).exists():
            found.append((int(tail), p))
    return [p for _, p in sorted(found)]


def auto_references(model_path: str) -> tuple[str, str]:
    """(strong, weak): the latest and earliest kept checkpoints of the first CoT-SFT run that kept two
    or more, starting from the model's own run and going up its ``train.init_from`` chain (for a
    latent model, the CoT-SFT run it starts from; for a CoT model refined training-free, its own run).
    Only CoT-SFT runs count: the references are checkpoints of the chain-of-thought training, never
    of the latent run being refined (whose kept models may hold the refined model itself)."""
    folder, seen = Path(model_path), []
    for _ in range(8):
        cfg_file = folder / RUN_CONFIG_FILE
        if not cfg_file.exists():
            break
        seen.append(str(folder))
        saved = yaml.safe_load(cfg_file.read_text()) or {}
        kept = kept_checkpoints(_run_folder(folder)) if saved.get("method", {}).get("name") == "cot-sft" else []
        if len(kept) >= 2:
            return str(kept[-1]), str(kept[0])
        parent = saved.get("train", {}).get("init_from")
        if not parent:
            break
        folder = Path(parent)
    raise ValueError(
        f"refine.strong=auto / refine.weak=auto: no CoT-SFT run with two or more keep-<step>/ checkpoints up the "
        f"train.init_from chain of {model_path} (looked at {', '.join(seen) or 'nothing: not a saved run folder'}). "
        "Train the CoT-SFT model with train.keep_every=N, or name refine.strong and refine.weak (model folders)"
    )


def reference_paths(run: RunConfig) -> tuple[str, str]:
    """(strong, weak) model folders of ``run.refine``, ``auto`` resolved."""
    strong, weak = run.refine.strong, run.refine.weak
    if "auto" in (strong, weak):
        auto_strong, auto_weak = auto_references(run.model.name_or_path)
        strong = auto_strong if strong == "auto" else strong
        weak = auto_weak if weak == "auto" else weak
    return strong, weak


def load_references(method: Method) -> list[PreTrainedModel]:
    """[strong, weak] for ``method.run.refine``, loaded once per method on its model's device and
    dtype, frozen (the same model object serves every batch)."""
    from latentreason.methods.base import task_model_config
    from latentreason.models.loading import load_model

    strong, weak = reference_paths(method.run)
    cache: dict[tuple[str, str], list[Any]] = method.__dict__.setdefault("_references", {})
    key = (strong, weak)
    if key not in cache:
        main = method.loaded.model
        models = []
        for role, path in (("strong", strong), ("weak", weak)):
            model_cfg = dataclasses.replace(method.run.model, name_or_path=path, device=str(main.device),
                                             dtype=str(main.dtype).replace("torch.", ""))
            try:
                ref = load_model(task_model_config(model_cfg, method.task)).model
            except (OSError, ValueError) as exc:
                raise ValueError(f"refine.{role}={path}: cannot load it as a model ({exc})") from exc
            ref.requires_grad_(False).eval()
            if ref.get_input_embeddings().weight.shape != main.get_input_embeddings().weight.shape:
                raise ValueError(
                    f"refine.{role}={path}: its embedding table is {tuple(ref.get_input_embeddings().weight.shape)} "
                    f"but the model's is {tuple(main.get_input_embeddings().weight.shape)}; references must share "
                    "the model's tokenizer and hidden size")
            models.append(ref)
        cache.clear()  # one pair at a time
        cache[key] = models
        logger.info("refinement references: strong %s, weak %s", strong, weak)
    return cache[key]


def refine_step(method: Method, step: LatentStep | None) -> tuple[LatentStep | None, list[PreTrainedModel] | None]:
    """``step`` wrapped per ``method.run.refine``, and the references the rollout must run (or None)."""
    cfg = method.run.refine
    if not cfg.enabled:
        return step, None
    if step is None:
        raise ValueError(f"refine: method {method.name!r} runs no latent step (plain decoding), so there are no "
                         "latents to refine; use a latent method or refine.residual=false refine.contrastive=false")
    refs = load_references(method) if cfg.contrastive and cfg.eta != 0 else None
    return RefineStep(step, cfg), refs


# ---- the sweep -------------------------------------------------------------------------------


def _cell_name(alpha: float, eta: float) -> str:
    return f"alpha{alpha:g}-eta{eta:g}"


def heat_map(cells: list[dict[str, Any]], alphas: list[float], etas: list[float], path: Path, title: str) -> None:
    """Validation accuracy over α (rows) × η (columns), each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentreason.io import PARTIAL_PREFIX

    grid = torch.full((len(alphas), len(etas)), float("nan"))
    for c in cells:
        grid[alphas.index(c["alpha"]), etas.index(c["eta"])] = c["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(etas) + 2.5, 0.9 * len(alphas) + 1.8))
    im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(etas)), [f"{e:g}" for e in etas])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("η (contrastive step)")
    ax.set_ylabel("α (residual memory rate)")
    lo, hi = float(grid.nan_to_num(float("inf")).min()), float(grid.nan_to_num(float("-inf")).max())
    for i in range(len(alphas)):
        for j in range(len(etas)):
            bright = hi > lo and float(grid[i, j]) > (lo + hi) / 2  # dark text on the bright end of viridis
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="k" if bright else "w", fontsize=9)
    fig.colorbar(im, ax=ax, label="validation accuracy")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.stem}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


#: What ``latentreason refine`` reports on ``eval.split``: each the best validation cell of its kind.
PICKS = {
    "base": lambda c: c["alpha"] == 0 and c["eta"] == 0,
    "residual": lambda c: c["alpha"] > 0 and c["eta"] == 0,
    "contrastive": lambda c: c["alpha"] == 0 and c["eta"] != 0,
    "both": lambda c: c["alpha"] > 0 and c["eta"] != 0,
}


def _refine_for(r: RefineConfig, alpha: float, eta: float) -> RefineConfig:
    """``r`` at one cell: α = 0 runs no residual and η = 0 no contrastive step (identical results,
    no reference forwards)."""
    return dataclasses.replace(r, residual=alpha > 0, alpha=alpha, contrastive=eta != 0, eta=eta)


def run_refine(run: RunConfig) -> dict[str, Any]:
    """Sweep ``refine.sweep_alphas`` × ``refine.sweep_etas`` on ``data.valid_split`` (resumable cells),
    then evaluate on ``eval.split``, once each: the unrefined model, the best residual-only,
    contrastive-only and combined cells, and the best cell overall (``refined``); ties go to the
    earlier cell (less refinement). Writes ``sweep.json``, the heat map ``sweep.png`` and
    ``refine_summary.json`` under ``eval.output_dir`` (default ``<train.output_dir>/refine``, or beside a
    saved model folder as for ``eval``: ``<run>/refine`` for ``best/``, ``<run>/refine-<folder>``).

    The run's other ``refine.*`` settings (momentum, order, direction, search steps, references)
    hold for every cell.
    """
    from latentreason.io import atomic_write_json
    from latentreason.recipes import build_method, default_eval_dir, run_eval

    r = run.refine
    out = Path(run.eval.output_dir or default_eval_dir(run, "refine"))  # beside a saved model, as eval
    if run.eval.split == run.data.valid_split:
        logger.warning("eval.split=%s is the split the sweep selects on: the report is not an independent estimate",
                       run.eval.split)
    if any(eta != 0 for eta in r.sweep_etas):  # the contrastive cells need references: find them before any cell runs
        reference_paths(run)
    method = build_method(run)
    cells = []
    for alpha in r.sweep_alphas:
        for eta in r.sweep_etas:
            ev = dataclasses.replace(run.eval, split=run.data.valid_split, limit=r.sweep_limit,
                                     output_dir=str(out / "sweep" / _cell_name(alpha, eta)))
            summary = run_eval(dataclasses.replace(run, refine=_refine_for(r, alpha, eta), eval=ev), method=method)
            cells.append({"alpha": alpha, "eta": eta, "accuracy": summary["accuracy"], "n": summary["n"],
                          "questions_per_second": summary["questions_per_second"],
                          "refine_shift": summary.get("refine_shift", {})})
            logger.info("refine sweep alpha=%g eta=%g: %s accuracy %.4f; latents moved %s", alpha, eta,
                        run.data.valid_split, summary["accuracy"],
                        ", ".join(f"{op} {v:.2%}" for op, v in summary.get("refine_shift", {}).items()) or "not at all")
    picks = {"refined": max(cells, key=lambda c: c["accuracy"])}  # max keeps the first of equals
    for name, kind in PICKS.items():
        of_kind = [c for c in cells if kind(c)]
        if of_kind:
            picks[name] = max(of_kind, key=lambda c: c["accuracy"])
    atomic_write_json(out / "sweep.json", {"split": run.data.valid_split, "limit": r.sweep_limit, "cells": cells,
                                           "picks": picks})
    heat_map(cells, list(r.sweep_alphas), list(r.sweep_etas), out / "sweep.png",
             f"{run.method.name} on {run.data.task} ({run.data.valid_split}, n={cells[0]['n']})")
    keys = ("accuracy", "accuracy_ci95", "n", "questions_per_second", "mean_latent_steps", "refine_shift")
    report: dict[str, Any] = {}
    for name, cell in picks.items():
        ev = dataclasses.replace(run.eval, output_dir=str(out / f"eval-{run.eval.split}-{_cell_name(cell['alpha'], cell['eta'])}"))
        result = run_eval(dataclasses.replace(run, refine=_refine_for(r, cell["alpha"], cell["eta"]), eval=ev),
                          method=method)
        report[name] = {"alpha": cell["alpha"], "eta": cell["eta"], "valid_accuracy": cell["accuracy"],
                        **{k: result.get(k) for k in keys}, "output_dir": ev.output_dir}
    summary = {
        "task": run.data.task, "method": run.method.name, "model": run.model.name_or_path,
        "valid_split": run.data.valid_split, "report_split": run.eval.split, "sweep_png": str(out / "sweep.png"),
        "refine": json.loads(json.dumps(dataclasses.asdict(r))), "report": report,
    }
    atomic_write_json(out / "refine_summary.json", summary)
    return summary

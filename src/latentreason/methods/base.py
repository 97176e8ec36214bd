"""The method contract: what the shared trainer and evaluation harness call.

A method owns (1) how examples become a training batch and its loss, and (2) how an example is
prompted and which latent step the shared rollout runs at evaluation. It owns no loop: training is
:mod:`latentreason.methods.trainer`, generation is :func:`latentreason.models.rollout.rollout`.
A new variant is a config subclass plus the one hook it changes.
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from latentreason.config import RUN_CONFIG_FILE, MethodConfig
from latentreason.data.base import Example, Task
from latentreason.data.collate import encode_prompts
from latentreason.models.loading import CheckpointError, LoadedModel, ModelConfig, save_checkpoint
from latentreason.models.rollout import RolloutConfig, RolloutOutput, derive_seed, rollout
from latentreason.models.steps import LatentStep, ProbeStep
from latentreason.registry import Registry

if TYPE_CHECKING:
    from latentreason.config import RunConfig

#: Folder names the trainer writes itself; a stage may not take one.
RESERVED_FOLDERS = frozenset({"best", "final", "checkpoint"})


@dataclass(frozen=True)
class Stage:
    """One phase of a method's training schedule (Coconut's curriculum stages, Latent-SFT's steps).

    The trainer saves ``output_dir/<name>/`` (a method folder) when the stage ends.
    """

    name: str  # folder-safe, e.g. "stage-0"
    steps: int  # optimizer steps in this stage (>= 1)
    reset_optimizer: bool = False  # clear AdamW state when this stage begins (not for the first stage)
    #: Also clear it at each step of this stage in which a new epoch of the training examples begins
    #: (Coconut's official code resets at every epoch; its README says at stage switches).
    reset_each_epoch: bool = False
    select: bool = True  # whether validation-based selection of best/ may pick checkpoints from this stage
    #: Parts that get no update in this stage ("lm", or an extra module's name): their gradients are
    #: dropped before the optimizer step (Latent-SFT trains its encoder, then its decoder, then both).
    frozen: tuple[str, ...] = ()
    #: Validation picks this stage's best checkpoint: the stage's folder holds it and the next stage
    #: starts from it (needs train.select_on_valid; validation also runs at the stage's last step).
    restore_best: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) or self.name in RESERVED_FOLDERS:
            raise ValueError(f"Stage.name={self.name!r}: must be a folder name of letters, digits, '.', '_', '-' "
                             f"and not one of {sorted(RESERVED_FOLDERS)}")
        if self.steps < 1:
            raise ValueError(f"Stage {self.name!r}: steps={self.steps}, must be >= 1")


def stage_problems(stages: list[Stage], max_steps: int) -> list[str]:
    """Why ``stages`` cannot run as a ``train.max_steps`` run (empty list: they can).

    Methods call it from ``validate(run)`` so a mismatch is reported before weights load.
    """
    problems = []
    total = sum(s.steps for s in stages)
    if total != max_steps:
        listing = ", ".join(f"{s.name}: {s.steps}" for s in stages)
        problems.append(f"train.max_steps={max_steps}, but the method's stages sum to {total} steps ({listing}); "
                        f"set train.max_steps={total} or change the stages")
    names = [s.name for s in stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"stage names {duplicates} repeat; each stage saves its own folder, so names must differ")
    return problems


def stage_index_at(stages: list[Stage], step: int) -> int:
    """Index of the stage that global step ``step`` (0-based) belongs to: a pure function of the step,
    so a resumed run needs only its step counter. Steps past the end belong to the last stage."""
    end = 0
    for i, stage in enumerate(stages):
        end += stage.steps
        if step < end:
            return i
    return len(stages) - 1


def stage_start(stages: list[Stage], index: int) -> int:
    """Global step at which stage ``index`` begins (steps already done before it)."""
    return sum(s.steps for s in stages[:index])


class Method:
    """Base class; subclasses set ``name``/``config_cls`` and override the hooks they need."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: False for evaluation-only methods (zero-shot, training-free latent methods).
    trainable: ClassVar[bool] = True
    paper: ClassVar[str] = ""

    def __init__(self, cfg: MethodConfig, run: RunConfig, loaded: LoadedModel, task: Task) -> None:
        self.cfg, self.run, self.loaded, self.task = cfg, run, loaded, task
        self.stage_index = 0

    @classmethod
    def validate(cls, run: RunConfig) -> list[str]:
        """Cross-field checks of a run using this method (before any weights load)."""
        return []

    @classmethod
    def schedule_uses_max_steps(cls, run: RunConfig) -> bool:
        """True when the stage boundaries are computed from ``train.max_steps``: a resume must then
        keep it (another value would move every boundary under a half-trained run)."""
        return False

    @classmethod
    def train_problems(cls, run: RunConfig) -> list[str]:
        """Checks that only training needs (a stage budget that must add up to ``train.max_steps``),
        run by ``run_train`` before any weights load; evaluation of a saved folder skips them."""
        return []

    # -- training ------------------------------------------------------------------------------
    def stages(self) -> list[Stage] | None:
        """The training schedule; None = one implicit stage of ``train.max_steps`` (no stage folders)."""
        return None

    def set_stage(self, index: int, stage: Stage) -> None:
        """Called by the trainer before the first step of each stage, and again after a resume."""
        self.stage_index = index

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules trained beside the LM (projectors, assistants); saved with checkpoints."""
        return {}

    def lora_submodules(self) -> list[tuple[nn.Module, str]]:
        """(owner, attribute) of extra modules that are transformers of their own and get LoRA
        adapters too under ``lora.enabled`` (Latent-SFT's encoder); saved merged."""
        return []

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        yield from (p for p in self.loaded.model.parameters() if p.requires_grad)
        for module in self.extra_modules().values():
            yield from (p for p in module.parameters() if p.requires_grad)

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        """A training micro-batch; must hold ``num_targets`` (the loss's normaliser, an int)."""
        raise NotImplementedError(f"method {self.name!r} does not train")

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss_sum": summed loss over the batch's num_targets, ...metrics}``."""
        raise NotImplementedError(f"method {self.name!r} does not train")

    #: True for on-policy methods (RL: DLR, GRPO), whose batches are drawn from the model being trained.
    on_policy: ClassVar[bool] = False

    def sample(self, modules: nn.ModuleDict, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """On-policy methods: complete a collated micro-batch with samples from the current weights
        (generate, score), setting ``num_targets`` now that it is known. The trainer calls it for
        every micro-batch of step ``step`` before the loss normaliser is summed, without gradients,
        in eval mode; samples keyed by (step, example id) make a resumed run draw the same ones."""
        return batch

    # -- evaluation ----------------------------------------------------------------------------
    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        """Token ids the rollout starts from (latent methods append <bot>)."""
        texts = [self.task.prompt(ex) for ex in examples]
        return encode_prompts(texts, self.loaded.tokenizer, self.run.model.use_chat_template)

    def bot_prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        """The task prompts followed by ``<bot>``: where a latent method's latents begin."""
        if self.loaded.bot_id is None:
            raise ValueError(f"method {self.name!r} needs <bot>: keep model.add_latent_tokens=true")
        return [p + [self.loaded.bot_id] for p in Method.prompt_ids(self, examples)]

    def latent_step(self, examples: list[Example]) -> LatentStep | None:
        """The step the rollout runs for this batch; None = plain decoding."""
        return None

    def rollout_config(self) -> RolloutConfig:
        return self.run.rollout

    def superposition_rate(self) -> int | None | bool:
        """False: the latents are not vocabulary mixtures (no superposition metrics). Otherwise the
        chain tokens per latent that align steps to gold segments (None: the gold chain cut in #L
        parts); the rollout must keep top-k distributions (top-100 for N_eff)."""
        return False

    def solution_latents(self, examples: list[Example],
                         solutions: list[list[list[list[int]]]]) -> list[list[torch.Tensor]]:
        """The latents an encoder gives each explicit solution of each example, given as its segments
        (token id lists), one latent per segment, [T_m, d] each: what N_eff's encoder alignment
        (``eval.n_eff_alignment=encoder``) compares the fed latents with. Only methods trained with
        such an encoder have them."""
        raise ValueError(f"eval.n_eff_alignment=encoder: method {self.name!r} has no encoder latents; use position")

    def generate(self, questions: list[str] | list[Example], batch_size: int = 32) -> list[str]:
        """Answer texts for ``questions``, in order, through the same loop as evaluation.

        A plain string becomes an Example whose id is the question itself, so a sampled answer
        (``rollout.temperature>0``) depends on the question, not on its position or batch.
        """
        examples = [q if isinstance(q, Example) else Example(id=q, question=q, answer="") for q in questions]
        texts: list[str] = [""] * len(examples)
        for batch in generate_batches(self, examples, batch_size):
            for i, text in zip(batch.indices, batch.texts):
                texts[i] = text
        return texts

    # -- saving and loading the whole method ---------------------------------------------------
    def save_pretrained(self, path: str | Path, states: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """The LM as a ``save_pretrained`` folder (LoRA merged), its extra modules, the run config.

        The folder is what :meth:`from_pretrained` (and ``latentreason eval``) reads back.
        ``states``: whole weights per part (``"lm"`` and each extra module's name) to write in
        place of the modules' own, which under FSDP hold only this process's shards.
        """
        states = states or {}

        def rest(folder: Path) -> None:  # into the temporary folder, before it replaces ``path``
            extras = self.extra_modules()
            if extras:
                state = {f"{k}.{n}": t.detach().contiguous() for k, m in extras.items()
                         for n, t in (states[k] if k in states else merged_state_dict(m)).items()}
                save_file(state, str(folder / EXTRA_MODULES_FILE))
            (folder / RUN_CONFIG_FILE).write_text(yaml.safe_dump(self.saved_config(), sort_keys=False))

        save_checkpoint(self.loaded, Path(path), state_dict=states.get("lm"), also=rest)

    def saved_config(self) -> dict[str, Any]:
        """The run config written beside saved weights; a method records what the folder needs to
        run as it was when saved (Coconut: the thoughts of the stage that wrote it)."""
        from latentreason.config import to_dict

        return to_dict(self.run)

    def load_extra_modules(self, path: str | Path) -> None:
        """Load ``extra_modules.safetensors`` (parameters and buffers) saved beside the LM."""
        file = Path(path) / EXTRA_MODULES_FILE
        extras = self.extra_modules()
        try:
            saved = load_file(str(file))
        except Exception as exc:
            raise CheckpointError(f"{file}: unreadable ({exc}); save the method again") from exc
        for key, module in extras.items():
            part = {n[len(key) + 1:]: t for n, t in saved.items() if n.startswith(key + ".")}
            try:
                module.load_state_dict(part, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{file}: does not match module {key!r} of {self.name!r}: {exc}") from exc
        unknown = sorted({n.split(".")[0] for n in saved} - set(extras))
        if unknown:
            raise CheckpointError(f"{file}: holds modules {unknown} that method {self.name!r} does not have")

    @classmethod
    def from_pretrained(cls, path: str | Path, overrides: list[str] | None = None) -> Method:
        """Reload a saved method (``best/``, ``final/``): its config, LM and extra modules.

        ``overrides`` (``section.field=value``) change the saved config, e.g. the rollout.
        """
        from latentreason.config import build_run_config, merge, parse_overrides

        path = Path(path)
        cfg_file = path / RUN_CONFIG_FILE
        if not cfg_file.exists():
            raise CheckpointError(f"{cfg_file}: missing; {path} is not a folder saved by latentreason")
        data = yaml.safe_load(cfg_file.read_text())
        data = merge(data, parse_overrides(list(overrides or [])))
        data.setdefault("train", {})["init_from"] = None
        data.setdefault("model", {})["name_or_path"] = str(path)
        run = build_run_config(data, str(cfg_file))
        method = build_method(run)
        if method.extra_modules() and not (path / EXTRA_MODULES_FILE).exists():
            raise CheckpointError(f"{path / EXTRA_MODULES_FILE}: missing; method {run.method.name!r} needs its "
                                  f"modules {sorted(method.extra_modules())}")
        if cls is not Method and not isinstance(method, cls):
            raise CheckpointError(f"{path}: holds method {run.method.name!r}, not {cls.name!r}")
        return method


EXTRA_MODULES_FILE = "extra_modules.safetensors"


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state with any LoRA-wrapped part merged back under its plain names, so a saved
    folder loads without peft and computes what the adapted module did (training is untouched)."""
    import copy

    try:
        from peft import PeftModel
    except ImportError:
        return module.state_dict()
    if not any(isinstance(m, PeftModel) for m in module.modules()):
        return module.state_dict()
    clone = copy.deepcopy(module)
    done: list[str] = []
    for name, child in list(clone.named_modules()):
        if name and isinstance(child, PeftModel) and not any(name.startswith(d + ".") for d in done):
            parent_name, _, attr = name.rpartition(".")
            parent = clone.get_submodule(parent_name) if parent_name else clone
            setattr(parent, attr, child.merge_and_unload())
            done.append(name)
    return clone.state_dict()


def row_seeds(cfg: RolloutConfig, examples: list[Example], group_size: int = 1) -> list[int] | None:
    """Sampling seeds keyed by example id, so a row's sample is the same in any batch, order or resume.

    None when decoding is greedy. Sampling with ``rollout.seed`` unset uses seed 0 rather than an
    unseeded generator: a resumable evaluation must be reproducible; set a seed to draw others.
    ``group_size`` G > 1 (``rollout(..., group_size=G)``): G seeds per example, keyed by its id and
    the sample's index, in the rollout's row order (example b's samples are rows b·G ... b·G + G − 1).
    """
    if cfg.temperature == 0:
        return None
    seed = 0 if cfg.seed is None else cfg.seed
    if group_size == 1:
        return [derive_seed(seed, ex.id) for ex in examples]
    return [derive_seed(seed, f"{ex.id}#{g}") for ex in examples for g in range(group_size)]


@dataclass
class GeneratedBatch:
    """One batch the rollout finished: positions in the caller's list, decoded texts, raw output."""

    indices: list[int]
    texts: list[str]
    output: RolloutOutput
    seconds: float  # wall-clock of the batch (rollout and decoding)
    #: per operator, each row's mean relative move of its latents under refinement (``RefineStep.row_shifts``)
    refine_shift: dict[str, list[float]] | None = None


def probed_step(
    method: Method, examples: list[Example], probe: str = "none", probe_seed: int = 0
) -> LatentStep | None:
    """The method's latent step for this batch, wrapped in a :class:`ProbeStep` unless ``probe`` is none.

    The one place probes enter: every latent method is probed alike, with no method knowing.
    """
    step = method.latent_step(examples)
    if probe == "none":
        return step
    if step is None:
        raise ValueError(f"eval.probe={probe}: method {method.name!r} runs no latent step (plain decoding), so there "
                         "are no latents to probe; use eval.probe=none or a latent method")
    return ProbeStep(step, probe, seed=probe_seed, row_keys=[ex.id for ex in examples])


def _batches(order: list[int], batch_size: int, probe: str) -> list[list[int]]:
    """Consecutive slices; under the shuffle probe a last batch of one joins the one before (it needs a partner)."""
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if probe == "shuffle" and len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [batches[-2] + batches[-1]]
    return batches


def generate_batches(
    method: Method, examples: list[Example], batch_size: int, probe: str = "none", probe_seed: int = 0
) -> Iterator[GeneratedBatch]:
    """The one generation loop (evaluation, ``Method.generate``): the method's prompts, latent step and
    rollout config through the shared rollout, under inference_mode. ``run.refine`` wraps the
    step (``methods/refine.py``) and brings its reference models into the rollout.

    Prompts are sorted by length to save padding; sampled rows use :func:`row_seeds`, so no row
    depends on the batch size (except under ``probe="shuffle"``, which feeds each row another
    row's latents).
    """
    loaded = method.loaded
    prompt_ids = method.prompt_ids(examples)
    order = sorted(range(len(examples)), key=lambda i: len(prompt_ids[i]))
    cfg = method.rollout_config()
    from latentreason.methods.refine import RefineStep, refine_step

    for idx in _batches(order, batch_size, probe):
        batch = [examples[i] for i in idx]
        t0 = time.perf_counter()
        with torch.no_grad():  # latents a method computes up front (DLR's, SoftCoT's) keep no autograd graph
            step, references = refine_step(method, probed_step(method, batch, probe, probe_seed))
        with torch.inference_mode():
            out = rollout(
                loaded.model, [prompt_ids[i] for i in idx], step, cfg,
                eos_ids=loaded.eos_ids, pad_id=loaded.pad_id, eot_id=loaded.eot_id,
                row_seeds=row_seeds(cfg, batch), references=references,
                exact_references=method.run.refine.exact_references,
            )
        texts = loaded.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        shift = {op: v.tolist() for op, v in step.row_shifts().items()} if isinstance(step, RefineStep) else None
        yield GeneratedBatch(idx, texts, out, time.perf_counter() - t0, shift or None)


def task_model_config(model_cfg: ModelConfig, task: Task) -> ModelConfig:
    """``model.tiny_words=task`` spelled out as the task's vocabulary (the only model setting that
    reads the task; the run config keeps the word 'task', so a resume compares like with like)."""
    if model_cfg.tiny_words != "task":
        return model_cfg
    if not task.vocabulary:
        raise ValueError(f"model.tiny_words=task, but task {task.name!r} declares no vocabulary; list the words instead")
    return dataclasses.replace(model_cfg, tiny_words=",".join(task.vocabulary))


def build_method(run: RunConfig, model_path: str | None = None, training: bool = False) -> Method:
    """Load the model, the task and the method object for ``run`` (no training).

    A model folder saved with extra modules (projectors, assistants, encoders) gets them back.
    ``training`` keeps float32 weights under ``model.dtype=auto`` (the trainer autocasts).
    """
    import latentreason.methods  # noqa: F401  (registers the built-in methods)
    from latentreason.data.base import build_task
    from latentreason.models.loading import load_model

    task = build_task(run.data.task, path=run.data.path, chain_format=run.data.chain_format, **run.data.options)
    model_cfg = run.model if model_path is None else dataclasses.replace(run.model, name_or_path=model_path)
    loaded = load_model(task_model_config(model_cfg, task), training=training)
    method = METHODS.get(run.method.name)(run.method, run, loaded, task)
    folder = Path(model_cfg.name_or_path)
    if (folder / EXTRA_MODULES_FILE).exists():
        method.load_extra_modules(folder)
    return method


METHODS: Registry[type[Method]] = Registry("method", base=Method)

"""Typed run configuration: dataclasses by concern, loaded from YAML, overridden from the CLI.

    latentreason train --config configs/demo_arith.yaml optim.lr=3e-4 data.options.num_steps=3

Every field has a default and ``help`` metadata (printed by ``latentreason <verb> --help``). Values
are converted to the field's declared type; unknown keys are rejected with suggestions; every
problem found is reported at once, with the file and the dotted field, before any weights load.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from latentreason.models.loading import ModelConfig
from latentreason.models.rollout import RolloutConfig

logger = logging.getLogger(__name__)

#: The resolved config a run saves next to its model folders (best/, final/, stage folders).
RUN_CONFIG_FILE = "run_config.yaml"
#: Fields added after runs and evaluations were written, with the value that behaves as before they
#: existed: a saved config or evaluation fingerprint without one matches that value, so a checkpoint
#: or rows of a run that could not set it still resume (``trainer.config_changes``, ``harness``).
ADDED_FIELDS: dict[str, Any] = {"model.tiny_words": "", "method.latent": "superposition",
                                 "refine.exact_references": True, "method.stop_at_answer": False,
                                 "eval.solutions": None, "eval.n_eff_alignment": "position", "eval.encoder": None,
                                 "method.correct_extraction": "flexible", "method.loss_aggregation": "token"}


class ConfigError(ValueError):
    """One or more configuration problems, each naming its source and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass
class DataConfig:
    task: str = field(default="arith", metadata={"help": "registered task name (latentreason inspect tasks)"})
    path: str | None = field(default=None, metadata={"help": "local file/folder or hub dataset name; default ../shared/data/<task>"})
    chain_format: str | None = field(default=None, metadata={"help": "which explicit chain to train on (e.g. natural or equations for gsm8k)"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    valid_split: str = field(default="valid", metadata={"help": "split for model selection during training (never a test split)"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "task options, e.g. num_steps for arith"})


@dataclass
class OptimConfig:
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    scheduler: str = field(default="cosine", metadata={"help": "cosine, linear or constant (after warm-up)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0 disables"})

    def __post_init__(self) -> None:
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.scheduler={self.scheduler!r}, must be cosine, linear or constant")


@dataclass
class LoraConfig:
    enabled: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    r: int = field(default=64, metadata={"help": "LoRA rank"})
    alpha: int = field(default=128, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    target_modules: str = field(default="all-linear", metadata={"help": "peft target_modules (comma list or all-linear)"})
    train_embeddings: bool = field(default=False, metadata={"help": "also train the embedding table (needed when new tokens must be learned)"})


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/default", metadata={"help": "checkpoints, log.jsonl, final/ and best/ go here"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    global_batch_size: int = field(default=64, metadata={"help": "examples per optimizer step over all processes"})
    micro_batch_size: int = field(default=64, metadata={"help": "examples per forward pass per process (gradient accumulation fills the rest)"})
    save_every: int = field(default=200, metadata={"help": "write a resumable checkpoint every N steps"})
    keep_every: int = field(default=0, metadata={"help": (
        "also keep the model every N steps as <output_dir>/keep-<step>/ (0 = never): early and late checkpoints "
        "of one run, e.g. refinement's weak and strong references, without retraining")})
    log_every: int = field(default=20, metadata={"help": "append a line to log.jsonl every N steps"})
    eval_every: int = field(default=0, metadata={"help": "validation accuracy every N steps to pick best/ (0 = only at the end)"})
    eval_limit: int = field(default=200, metadata={"help": "validation examples used for model selection"})
    select_on_valid: bool = field(default=True, metadata={"help": "evaluate on the validation split to write best/ (else only final/)"})
    resume: bool = field(default=True, metadata={"help": "continue from output_dir/checkpoint when present"})
    seed: int = field(default=0, metadata={"help": "data order seed"})
    init_from: str | None = field(default=None, metadata={"help": "start from this checkpoint instead of model.name_or_path's weights"})


@dataclass
class EvalConfig:
    split: str = field(default="valid", metadata={"help": "split to evaluate ('latentreason inspect tasks' lists each task's; the real datasets' test splits are not shipped, generated tasks have one; select models on valid)"})
    limit: int | None = field(default=None, metadata={"help": "first N examples only"})
    batch_size: int = field(default=32, metadata={"help": "prompts per rollout batch"})
    output_dir: str | None = field(default=None, metadata={"help": "predictions.jsonl + summary.json (default: <train.output_dir>/eval-<split>; for a saved model folder and no train.output_dir, beside it: <run>/eval-<split> for best/, <run>/eval-<split>-<folder> otherwise)"})
    overwrite: bool = field(default=False, metadata={"help": "discard finished rows instead of resuming"})
    probe: str = field(default="none", metadata={"help": (
        "causal probe of a latent method's latents (rows still stop where the real step says): none; zero "
        "(zeros fed); noise (Gaussian, each vector's L2 norm, seeded per question); shuffle (row i is fed "
        "the latent of the batch's next question at the same step: needs eval.batch_size >= 2, and rows "
        "then depend on how questions are batched)")})
    probe_seed: int = field(default=0, metadata={"help": "seed of eval.probe=noise (each question's draws are keyed by its id)"})
    solutions: str | None = field(default=None, metadata={"help": (
        "JSONL of further explicit solutions, one object per line {\"id\": question id, \"solutions\": [chain, ...]}, "
        "added to the task's own for N_eff and Top-2 (tasks with one gold chain per question, such as GSM8K: "
        "sample chains from a CoT-SFT model, see eval/superposition.py solutions_from_predictions)")})
    n_eff_alignment: str = field(default="position", metadata={"help": (
        "how N_eff aligns latent steps to a solution's segments: position (step t to segment t, the spec's version 1) "
        "or encoder (each step, in order, takes the unused segment whose stage-1 encoder latent is closest to the "
        "latent fed, by cosine distance: the Latent-SFT authors' metric code; needs the stage-1 encoder, eval.encoder)")})
    encoder: str | None = field(default=None, metadata={"help": (
        "stage-1 Latent-SFT folder whose encoder embeds each solution for eval.n_eff_alignment=encoder (default: the "
        "folder the evaluated stage-2 model was trained from, its train.init_from)")})

    def __post_init__(self) -> None:
        if self.probe not in ("none", "zero", "noise", "shuffle"):
            raise ValueError(f"eval.probe={self.probe!r}, must be none, zero, noise or shuffle")
        if self.n_eff_alignment not in ("position", "encoder"):
            raise ValueError(f"eval.n_eff_alignment={self.n_eff_alignment!r}, must be position or encoder")


@dataclass
class RefineConfig:
    """Post-training refinement of any latent method's latents at inference (methods/refine.py)."""

    residual: bool = field(default=False, metadata={"help": "residual refinement: z(t) = alpha z(t-1) + (1 - alpha) step(t)"})
    alpha: float = field(default=0.5, metadata={"help": "memory rate in [0, 1]; 0 = the method's own latents"})
    momentum: bool = field(default=False, metadata={"help": "residual in momentum form: v(t) = alpha v(t-1) + (1 - alpha)(step(t) - z(t-1)), z(t) = z(t-1) + v(t)"})
    contrastive: bool = field(default=False, metadata={"help": (
        "contrastive feedback: z <- z + sign (2 eta / d)(h_strong - h_weak), the references' last hidden states "
        "with z fed next (run in lockstep with the model; no weight changes)")})
    eta: float = field(default=1.0, metadata={"help": "contrastive step size (the update is scaled by 2 eta / d, d the hidden size)"})
    search_steps: int = field(default=1, metadata={"help": "contrastive steps per latent (each asks both references again)"})
    exact_references: bool = field(default=True, metadata={"help": (
        "true: the references read exactly the vectors the model was fed (two columns per reference per latent "
        "step); false: they keep the last vector they were asked about in its place (one column: cheaper latent "
        "steps, by how much depends on the model and hardware; their prefill of the prompt is the same either "
        "way; seconds_by_phase in summary.json shows where the time goes)")})
    order: str = field(default="residual-first", metadata={"help": "residual-first (the paper's order) or contrastive-first"})
    direction: str = field(default="strong", metadata={"help": (
        "strong: descend the contrastive loss, toward the strong reference (the paper's stated intent; ours); "
        "weak: the opposite sign (the paper's printed update, and the authors' code per an audit)")})
    strong: str = field(default="auto", metadata={"help": (
        "strong reference model folder; auto = the latest keep-<step>/ of the CoT-SFT run the model was "
        "trained from (its train.init_from; keep them with train.keep_every)")})
    weak: str = field(default="auto", metadata={"help": "weak reference model folder; auto = the earliest keep-<step>/ of that run"})
    sweep_alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75], metadata={
        "help": "latentreason refine: alpha values swept on the validation split"})
    sweep_etas: list[float] = field(default_factory=lambda: [0.0, 16.0, 64.0, 256.0], metadata={
        "help": "latentreason refine: eta values swept on the validation split"})
    sweep_limit: int = field(default=200, metadata={"help": "latentreason refine: validation questions per sweep cell"})

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"refine.alpha={self.alpha}, must be in [0, 1]")
        if self.search_steps < 1:
            raise ValueError(f"refine.search_steps={self.search_steps}, must be >= 1")
        if self.order not in ("residual-first", "contrastive-first"):
            raise ValueError(f"refine.order={self.order!r}, must be residual-first or contrastive-first")
        if self.direction not in ("strong", "weak"):
            raise ValueError(f"refine.direction={self.direction!r}, must be strong or weak")
        bad = [a for a in self.sweep_alphas if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"refine.sweep_alphas holds {bad}: every alpha must be in [0, 1]")
        if self.sweep_limit < 1:
            raise ValueError(f"refine.sweep_limit={self.sweep_limit}, must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.residual or self.contrastive


@dataclass
class MethodConfig:
    """Base of every method's own section; ``name`` picks the method and its subclass."""

    name: str = field(default="cot-sft", metadata={"help": "method (latentreason inspect methods)"})


@dataclass
class RunConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)


# ---------------------------------------------------------------------------------------------
def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp`` or raise naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(errors[0] if errors else f"{where}: cannot be None")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError(f"{where}={value!r}: expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"{where}={value!r}: expected {tp.__name__}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise TypeError(f"{where}={value!r}: expected {tp.__name__}") from None
        if tp is int and isinstance(value, float) and out != value:
            raise TypeError(f"{where}={value!r}: expected an integer")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise TypeError(f"{where}={value!r}: expected a string")
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TypeError(f"{where}={value!r}: expected a list of {len(args)} values")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}={value!r}: expected a list, e.g. [0, 0.5]")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise TypeError(f"{where}={value!r}: expected a mapping")
        return dict(value)
    return value


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{where}: unknown key {key!r}{hint} (valid: {', '.join(valid)})"


def _build(cls: type, data: dict[str, Any], where: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, collecting problems instead of stopping."""
    hints, fields = _hints(cls), _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(_unknown(key, list(fields), where))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{where}.{key}: expected a mapping, got {value!r}")
                continue
            kwargs[key] = _build(tp, value, f"{where}.{key}", problems)
            continue
        try:
            kwargs[key] = _convert(value, tp, f"{where}.{key}")
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: {exc}")
        return cls()


def method_config_class(name: str) -> type[MethodConfig]:
    from latentreason.methods import METHODS

    return METHODS.get(name).config_cls


def build_run_config(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested dict (YAML plus overrides)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: top level must be a mapping of sections"])
    sections = _fields(RunConfig)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in sections:
            problems.append(_unknown(key, list(sections), source))
            continue
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{source}: section {key!r} must be a mapping, got {value!r}")
            continue
        cls = _hints(RunConfig)[key]
        if key == "method":
            name = str(value.get("name", MethodConfig.name))
            try:
                cls = method_config_class(name)
            except KeyError as exc:
                problems.append(f"{source}: method.name: {exc}")
                continue
        kwargs[key] = _build(cls, value, f"{source}: {key}", problems)
    if problems:
        raise ConfigError(problems)
    if "method" not in kwargs:
        kwargs["method"] = method_config_class(MethodConfig.name)()
    run = RunConfig(**kwargs)
    problems = validate(run)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    run._source = source  # type: ignore[attr-defined]  # for later checks' messages (training-only ones)
    return run


def validate(run: RunConfig) -> list[str]:
    """Cross-section checks; returns every problem (empty list = valid)."""
    problems = []
    t = run.train
    if t.max_steps < 1:
        problems.append(f"train.max_steps={t.max_steps}, must be >= 1")
    if t.global_batch_size < 1 or t.micro_batch_size < 1:
        problems.append("train.global_batch_size and train.micro_batch_size must be >= 1")
    elif t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size}; pick a micro batch that divides it"
        )
    if t.keep_every < 0:
        problems.append(f"train.keep_every={t.keep_every}, must be >= 0 (0 = never)")
    for name in ("save_every", "log_every"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name}={getattr(t, name)}, must be >= 1")
    if t.eval_every < 0:
        problems.append(f"train.eval_every={t.eval_every}, must be >= 0 (0 = only at the end)")
    if t.select_on_valid and t.eval_limit < 1:
        problems.append(f"train.eval_limit={t.eval_limit}: model selection needs validation questions (>= 1), or set "
                        "train.select_on_valid=false")
    for name, value in (("data.train_limit", run.data.train_limit), ("eval.limit", run.eval.limit)):
        if value is not None and value < 1:
            problems.append(f"{name}={value}, must be >= 1 (or null: all)")
    if run.optim.lr <= 0:
        problems.append(f"optim.lr={run.optim.lr}, must be > 0")
    if len(run.optim.betas) != 2 or not all(0 <= b < 1 for b in run.optim.betas):
        problems.append(f"optim.betas={list(run.optim.betas)}, must be two values in [0, 1)")
    if run.optim.weight_decay < 0:
        problems.append(f"optim.weight_decay={run.optim.weight_decay}, must be >= 0")
    if not 0 <= t.seed < 2 ** 32:
        problems.append(f"train.seed={t.seed}, must be in [0, 2**32)")
    if run.lora.enabled and (run.lora.r < 1 or run.lora.alpha <= 0 or not 0 <= run.lora.dropout < 1):
        problems.append(f"lora.r={run.lora.r}, lora.alpha={run.lora.alpha}, lora.dropout={run.lora.dropout}: need r >= 1, "
                        "alpha > 0 and dropout in [0, 1)")
    if run.rollout.max_new_tokens < 1:
        problems.append(f"rollout.max_new_tokens={run.rollout.max_new_tokens}, must be >= 1 (the answer is decoded)")
    if "test" in run.data.valid_split.lower():
        problems.append(f"data.valid_split={run.data.valid_split!r}: model selection must never use a test split; "
                        "use a validation split (e.g. valid)")
    if "test" in run.data.train_split.lower():
        problems.append(f"data.train_split={run.data.train_split!r}: training on a test split leaves nothing held out; "
                        "use train")
    if run.eval.batch_size < 1:
        problems.append(f"eval.batch_size={run.eval.batch_size}, must be >= 1")
    elif run.eval.probe == "shuffle" and run.eval.batch_size < 2:
        problems.append("eval.probe=shuffle takes each question's latents from another question of its batch; "
                        f"eval.batch_size={run.eval.batch_size} leaves none: use eval.batch_size >= 2")
    from latentreason.data.base import build_task
    from latentreason.methods import METHODS

    try:  # cheap: tasks read their files lazily; this checks the name and every option
        build_task(run.data.task, path=run.data.path, chain_format=run.data.chain_format, **run.data.options)
    except KeyError as exc:
        problems.append(f"data.task: {exc}")
    except (TypeError, ValueError) as exc:
        problems.append(f"data.options: {exc}")
    try:  # a registered name or a 'module:attr' path (resolved already, for the method section)
        method_cls = METHODS.get(run.method.name)
    except KeyError:
        method_cls = None
    if method_cls is not None:
        problems.extend(method_cls.validate(run))
    return problems


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``a.b=c`` strings to a nested dict; values parsed as YAML scalars (1e-3, true, [1,2])."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected section.field=value"])
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError([f"override {item!r}: expected section.field=value (e.g. optim.lr=1e-4)"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part} is not a section"])
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """A key given twice in one mapping is an error: PyYAML would keep the last silently (two
    ``train:`` blocks, and the first one's settings vanish)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: no such config file"])
    if not path.is_file():
        raise ConfigError([f"{path}: not a file (give the YAML recipe itself, e.g. configs/cot_sft_arith.yaml)"])
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"])
    return data


#: What a saved run folder decides about itself when it is evaluated (``saved_base``); the rest
#: (train, optim, lora, eval) describes the new command, so it comes from the user or the defaults.
SAVED_SECTIONS = ("method", "model", "data", "rollout")


def saved_run_base(user: dict[str, Any]) -> dict[str, Any]:
    """The saved method/model/data/rollout sections when ``user``'s ``model.name_or_path`` is a folder
    holding ``run_config.yaml`` (else ``{}``), so ``eval`` on a saved run needs no restated settings.

    A saved method (data) section is dropped when the user names another method (task): its fields
    would not fit (another task's options are refused as unknown).
    """
    name = (user.get("model") or {}).get("name_or_path", ModelConfig.name_or_path)
    cfg_file = Path(str(name)) / RUN_CONFIG_FILE
    if not cfg_file.is_file():
        return {}
    saved = load_yaml(cfg_file)
    base = {k: saved[k] for k in SAVED_SECTIONS if isinstance(saved.get(k), dict)}
    user_method = (user.get("method") or {}).get("name")
    if user_method is not None and user_method != base.get("method", {}).get("name"):
        base.pop("method", None)
    user_task = (user.get("data") or {}).get("task")
    if user_task is not None and user_task != base.get("data", {}).get("task"):
        base.pop("data", None)
    logger.info("using the method, model, data and rollout settings saved in %s (the config and overrides given "
                "take precedence)", cfg_file)
    return base


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None, saved_base: bool = False) -> RunConfig:
    """YAML file (optional) + ``section.field=value`` overrides -> validated RunConfig.

    ``saved_base``: when ``model.name_or_path`` is a saved run folder, its settings
    (:func:`saved_run_base`) go under the file and overrides (``latentreason eval`` does this).
    """
    data = dict(base or {})
    source = "<defaults>"
    if path is not None:
        data = merge(data, load_yaml(path))
        source = str(path)
    if overrides:
        data = merge(data, parse_overrides(overrides))
        source = f"{source} + overrides" if path else "overrides"
    saved = saved_run_base(data) if saved_base else {}
    if saved:
        data = merge(saved, data)
        source = f"saved {RUN_CONFIG_FILE} + {source}"
    return build_run_config(data, source)


def to_dict(run: RunConfig) -> dict[str, Any]:
    """Plain nested dict (YAML-safe), e.g. to save next to a checkpoint."""
    def clean(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return {k: clean(v) for k, v in dataclasses.asdict(run).items()}


def help_text(cls: type, prefix: str) -> list[str]:
    """One line per field: ``prefix.field (type, default): help``, for ``--help``."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(help_text(tp, f"{prefix}.{f.name}"))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  {prefix}.{f.name} ({tname}, default {default!r}): {f.metadata.get('help', '')}")
    return lines

"""The flow every entry point shares: build a method from a config, train it, evaluate it.

``latentreason train|eval|demo`` and the benchmark scripts call these three functions, so a run
started from the command line, a notebook or a benchmark is the same run.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

from latentreason.config import RUN_CONFIG_FILE, ConfigError, RunConfig, TrainConfig, to_dict
from latentreason.data.base import attach_solutions
from latentreason.io import one_writer
from latentreason.methods.base import Method

logger = logging.getLogger("latentreason")


def build_method(run: RunConfig, model_path: str | None = None, training: bool = False) -> Method:
    """Load the model, the task and the method object for ``run`` (no training).

    A model folder saved with extra modules (projectors, assistants) gets them back; a saved run
    reloads as a whole with ``Method.from_pretrained(folder)``.
    """
    from latentreason.methods.base import build_method as build

    return build(run, model_path, training)


def run_train(run: RunConfig) -> Path:
    """Train, selecting ``best/`` on the validation split; returns the output folder."""
    from latentreason.methods.base import METHODS
    from latentreason.models.loading import process_state

    problems = METHODS.get(run.method.name).train_problems(run)
    if problems:  # e.g. a curriculum that does not add up to train.max_steps: refused before any weights load
        source = getattr(run, "_source", None)
        raise ConfigError([f"{source}: {p}" if source else p for p in problems])
    # held before anything reads the folder: another run writing it is refused, not raced
    with one_writer(run.train.output_dir, "train.output_dir", enabled=process_state().is_main_process):
        return _train(run)


def _train(run: RunConfig) -> Path:
    from latentreason.eval.harness import accuracy
    from latentreason.methods.trainer import Trainer, apply_lora, resumable_checkpoint

    resumable_checkpoint(run)  # a checkpoint of other settings is refused before any weights load
    method = build_method(run, model_path=run.train.init_from, training=True)
    if not method.trainable:
        raise ConfigError([f"method.name={run.method.name!r} has nothing to train; use 'latentreason eval'"])
    if run.lora.enabled:
        apply_lora(method, run)
    train_examples = method.task.load(run.data.train_split, limit=run.data.train_limit)
    valid = method.task.load(run.data.valid_split, limit=run.train.eval_limit) if run.train.select_on_valid else []
    if run.train.select_on_valid and not valid:  # else validation crashes after training, and no resume can fix data.*
        raise ConfigError([f"data.valid_split={run.data.valid_split!r} of task {run.data.task!r} holds no examples "
                           f"(data.path={run.data.path!r}, data.options={run.data.options!r}); train.select_on_valid "
                           "needs some, or set train.select_on_valid=false"])
    if valid and run.refine.enabled:  # validation refines: a method without latents, or missing references,
        from latentreason.methods.refine import refine_step  # is refused now, not at the first validation

        refine_step(method, method.latent_step(valid[:1]))
    select = (lambda m: accuracy(m, valid, run.eval.batch_size)) if run.train.select_on_valid else None
    trainer = Trainer(run, method, train_examples, select=select)
    result = trainer.train()
    logger.info("trained %d steps, final loss %.4f, best valid accuracy %s -> %s",
                result.steps, result.final_loss, result.best_metric, result.output_dir)
    return result.output_dir


def invocation(argv: list[str] | None = None) -> str:
    """The command line that made a result, as its user typed it: a benchmark script calling
    ``run_eval`` is ``python benchmarks/x.py ...``, not ``latentreason ...`` with the script's flags."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]) if argv and argv[0] else Path("latentreason")
    if program.name == "latentreason" or (program.name == "__main__.py" and program.parent.name == "latentreason"):
        head = "latentreason"
    else:
        try:
            head = "python " + str(program.resolve().relative_to(Path.cwd()))
        except ValueError:
            head = "python " + str(program)
    return " ".join([head, *argv[1:]])


def default_eval_dir(run: RunConfig, kind: str | None = None) -> str:
    """Where an evaluation goes without ``eval.output_dir``: ``<train.output_dir>/<kind>`` (``kind``
    default ``eval-<split>``; ``refine`` for a refinement sweep); but a saved model folder evaluated
    with no ``train.output_dir`` given goes beside itself (its run's ``<kind>`` for ``best/``,
    ``<kind>-<folder>`` for another), not into one shared ``runs/default/<kind>`` where the second
    model evaluated would be refused."""
    kind = kind or f"eval-{run.eval.split}"
    model = Path(os.path.expanduser(run.model.name_or_path))
    if run.train.output_dir == TrainConfig.output_dir and (model / RUN_CONFIG_FILE).is_file():
        model = model.resolve()
        return str(model.parent / (kind if model.name == "best" else f"{kind}-{model.name}"))
    return str(Path(run.train.output_dir) / kind)


def run_eval(run: RunConfig, method: Method | None = None) -> dict:
    """Evaluate ``run`` into ``eval.output_dir``, resuming only rows made with the same row settings.

    ``method``: one already built for ``run``'s model, method and data (a sweep evaluates one model
    under many settings); it then runs with ``run``'s rollout, evaluation and refinement settings.
    """
    from latentreason.eval.harness import eval_fingerprint, evaluate, weights_identity

    if method is None:
        method = build_method(run)
    else:
        method.run = run
    examples = method.task.load(run.eval.split, limit=run.eval.limit)
    if not examples:  # it reported accuracy 0.0 over n = 0 (gsm8k's valid keeps only the GSM8K-Aug valid questions of a file)
        raise ValueError(f"eval.split={run.eval.split} of task {run.data.task} holds no examples"
                         f"{f' (data.path={run.data.path})' if run.data.path else ''}: nothing to evaluate")
    if run.eval.solutions:
        examples = attach_solutions(examples, run.eval.solutions)
    out = run.eval.output_dir or default_eval_dir(run)
    config = to_dict(run)
    info = {
        "model": run.model.name_or_path, "task": run.data.task, "task_version": method.task.version,
        "method": run.method.name, "split": run.eval.split,
        "rollout": config["rollout"], "method_config": config["method"],
        "device": str(method.loaded.model.device), "dtype": str(method.loaded.model.dtype).replace("torch.", ""),
        "command": invocation(),
    }
    if run.refine.enabled:
        info["refine"] = config["refine"]
    fingerprint = eval_fingerprint(config, method.task.version)
    # What auto resolved to, not "auto": rows made in bfloat16 on a GPU never mix with float32 CPU rows.
    fingerprint["model.device"] = method.loaded.model.device.type
    fingerprint["model.dtype"] = info["dtype"]
    if run.eval.solutions:  # a solutions file rewritten in place must not resume rows scored on the old one
        fingerprint["eval.solutions_sha256"] = hashlib.sha256(Path(run.eval.solutions).read_bytes()).hexdigest()[:16]
    weights = weights_identity(run.model.name_or_path)
    if weights is not None:
        fingerprint["model.weight_files"] = weights
    if run.refine.enabled and run.refine.contrastive:  # a reference retrained in place must not resume old rows
        from latentreason.methods.refine import reference_paths

        fingerprint["refine.references"] = {role: {"path": path, "weight_files": weights_identity(path)}
                                            for role, path in zip(("strong", "weak"), reference_paths(run))}
    return evaluate(method, examples, out, batch_size=run.eval.batch_size, info=info, overwrite=run.eval.overwrite,
                    fingerprint=fingerprint, probe=run.eval.probe, probe_seed=run.eval.probe_seed)

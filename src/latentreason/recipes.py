"""The flow every entry point shares: build a method from a config, train it, evaluate it.

``latentreason train|eval|demo`` and the benchmark scripts call these three functions, so a run
started from the command line, a notebook or a benchmark is the same run.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from latentreason.config import ConfigError, RunConfig, to_dict
from latentreason.methods.base import Method

logger = logging.getLogger("latentreason")


def build_method(run: RunConfig, model_path: str | None = None) -> Method:
    """Load the model, the task and the method object for ``run`` (no training)."""
    from latentreason.data.base import build_task
    from latentreason.methods import METHODS
    from latentreason.models.loading import load_model

    task = build_task(run.data.task, path=run.data.path, chain_format=run.data.chain_format, **run.data.options)
    model_cfg = run.model if model_path is None else type(run.model)(**{**vars(run.model), "name_or_path": model_path})
    loaded = load_model(model_cfg)
    method_cls = METHODS.get(run.method.name)
    return method_cls(run.method, run, loaded, task)


def run_train(run: RunConfig) -> Path:
    """Train, selecting ``best/`` on the validation split; returns the output folder."""
    from latentreason.eval.harness import accuracy
    from latentreason.methods.trainer import Trainer, apply_lora

    method = build_method(run, model_path=run.train.init_from)
    if not method.trainable:
        raise ConfigError([f"method.name={run.method.name!r} has nothing to train; use 'latentreason eval'"])
    if run.lora.enabled:
        apply_lora(method, run)
    train_examples = method.task.load(run.data.train_split, limit=run.data.train_limit)
    valid = method.task.load(run.data.valid_split, limit=run.train.eval_limit) if run.train.select_on_valid else []
    select = (lambda m: accuracy(m, valid, run.eval.batch_size)) if run.train.select_on_valid else None
    trainer = Trainer(run, method, train_examples, select=select)
    result = trainer.train()
    logger.info("trained %d steps, final loss %.4f, best valid accuracy %s -> %s",
                result.steps, result.final_loss, result.best_metric, result.output_dir)
    return result.output_dir


def run_eval(run: RunConfig) -> dict:
    from latentreason.eval.harness import evaluate

    method = build_method(run)
    examples = method.task.load(run.eval.split, limit=run.eval.limit)
    out = run.eval.output_dir or str(Path(run.train.output_dir) / f"eval-{run.eval.split}")
    info = {
        "model": run.model.name_or_path, "task": run.data.task, "task_version": method.task.version,
        "method": run.method.name, "split": run.eval.split,
        "rollout": to_dict(run)["rollout"], "method_config": to_dict(run)["method"],
        "command": "latentreason " + " ".join(sys.argv[1:]),
    }
    return evaluate(method, examples, out, batch_size=run.eval.batch_size, info=info, overwrite=run.eval.overwrite)

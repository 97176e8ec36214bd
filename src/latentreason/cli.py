"""latentreason's command line: the whole flow, wired in one place.

    latentreason demo                                  # tiny no-CoT, CoT, Coconut, Latent-SFT on arith, table + plot
    latentreason train --config configs/cot_sft_arith.yaml optim.lr=3e-4
    latentreason eval  model.name_or_path=runs/arith-cot/best         # a saved run: its method, task, rollout
    latentreason eval  model.name_or_path=runs/arith-cot/best rollout.max_new_tokens=128
    latentreason refine model.name_or_path=runs/arith-coconut/best refine.contrastive=true   # α × η on valid
    latentreason inspect tasks|methods|steps|config [--config F] [overrides]
    latentreason compare runs/a/eval-valid runs/b/eval-valid=label --out runs/compare

Every verb takes ``--config FILE.yaml`` and ``section.field=value`` overrides; ``--help`` lists
every field with its default and meaning. Nothing else in the package imports this module.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from latentreason.config import ConfigError, RunConfig, help_text, load_run_config, to_dict
from latentreason.recipes import run_eval, run_train

logger = logging.getLogger("latentreason")

def _field_help() -> str:
    from latentreason.config import DataConfig, EvalConfig, LoraConfig, OptimConfig, RefineConfig, TrainConfig
    from latentreason.methods import METHODS
    from latentreason.models.loading import ModelConfig
    from latentreason.models.rollout import RolloutConfig

    lines = ["config fields (override with section.field=value):"]
    sections = [("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig), ("lora", LoraConfig),
                ("train", TrainConfig), ("rollout", RolloutConfig), ("eval", EvalConfig), ("refine", RefineConfig)]
    for name, cls in sections:
        lines.extend(help_text(cls, name))
    for name in METHODS.names():
        lines.append(f" method '{name}':")
        lines.extend(help_text(METHODS.get(name).config_cls, "method"))
    return "\n".join(lines)


# -- verbs ------------------------------------------------------------------------------------------
def _config(args: argparse.Namespace, saved_base: bool = False) -> RunConfig:
    return load_run_config(args.config, args.overrides, saved_base=saved_base)


def cmd_train(args: argparse.Namespace) -> int:
    run_train(_config(args))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    summary = run_eval(_config(args, saved_base=True))
    keys = ("model", "task", "method", "split", "device", "dtype", "n", "accuracy", "accuracy_ci95",
            "accuracy_flexible", "mean_reasoning_positions", "mean_latent_steps", "questions_per_second",
            "seconds_by_phase", "batch_step_use", "probe", "refine")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    from latentreason.methods.refine import run_refine

    print(json.dumps(run_refine(_config(args, saved_base=True)), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from latentreason.demo import run_demo

    run_demo(output_dir=args.output_dir, overrides=args.overrides, quick=args.quick, latent_sft=args.latent_sft)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from latentreason.data.base import TASKS, build_task
    from latentreason.methods import METHODS
    from latentreason.models.steps import LATENT_STEPS

    what = args.what
    if what == "tasks":
        from latentreason.data import tasks  # noqa: F401  (registers the built-in tasks: the listing was empty)

        for name in TASKS.names():
            task = build_task(name)
            print(f"{name:20} v{task.version}  splits: {', '.join(task.splits)}")
    elif what == "methods":
        for name in METHODS.names():
            cls = METHODS.get(name)
            print(f"{name:20} {'trainable' if cls.trainable else 'evaluation only'}  {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    elif what == "steps":
        for name in LATENT_STEPS.names():
            doc = (LATENT_STEPS.get(name).__doc__ or "").strip().splitlines()
            print(f"{name:12} {doc[0] if doc else ''}")
    elif what == "config":
        import yaml

        print(yaml.safe_dump(to_dict(_config(args, saved_base=True)), sort_keys=False), end="")  # what eval runs
    elif what == "latents":
        from latentreason.eval.report import inspect_latents
        from latentreason.recipes import build_method

        run = _config(args, saved_base=True)
        method = build_method(run)
        if args.question:
            from latentreason.data.base import Example

            examples = [Example(id="question", question=args.question, answer="")]
        else:
            if args.n < 1:
                raise SystemExit(f"latentreason inspect latents: -n {args.n}: the question's 1-based position in "
                                 f"eval.split ({run.eval.split}), must be >= 1")
            examples = method.task.load(run.eval.split, limit=args.n)
            if len(examples) < args.n:
                raise SystemExit(f"latentreason inspect latents: -n {args.n}: eval.split ({run.eval.split}) of task "
                                 f"{run.data.task} has only {len(examples)} questions")
            examples = examples[-1:]
        for ex in examples:
            text, figure = inspect_latents(method, ex, args.out)
            print(text, end="")
            if figure is not None:
                print(f"wrote {figure}")
    elif what == "example":
        run = _config(args, saved_base=True)  # a saved run's task and options, as eval reads them
        task = build_task(run.data.task, path=run.data.path, chain_format=run.data.chain_format, **run.data.options)
        for ex in task.load(run.eval.split, limit=args.n):
            print(json.dumps({"id": ex.id, "prompt": task.prompt(ex), "chain": task.chain_text(ex),
                              "answer": task.answer_text(ex)}, ensure_ascii=False))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from latentreason.eval.report import compare

    result = compare(args.eval_dirs, args.out, title=args.title)
    print(result.markdown)
    print(f"\nwrote {result.table_path}, {result.json_path}, {result.figure_path}")
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    from latentreason.eval.report import _parse_spec, plot_curves

    logs, groups = {}, {}
    for spec in args.runs:
        folder, label = _parse_spec(spec)
        name = label or str(folder)
        if name in logs:
            raise ValueError(f"curves: two runs labelled {name!r} ({logs[name]}, {folder}); give each its own")
        logs[name] = folder
        groups[name] = name.split("/")[0] if label else name  # an unlabelled run is its own line
    print(f"wrote {plot_curves(logs, args.out, key=args.key, smooth=args.smooth, groups=groups)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentreason", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)

    def add(name: str, func, help: str, first: dict | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=_field_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        # also after the verb; SUPPRESS keeps a -v given before it (a subparser default would reset it)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        if first:
            p.add_argument(first.pop("name"), **first)
        p.add_argument("--config", help="YAML recipe (see configs/)")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. optim.lr=3e-4")
        p.set_defaults(func=func)
        return p

    add("train", cmd_train, "train a method; resumes from <train.output_dir>/checkpoint; best/ chosen on validation; "
        "a method with stages also saves <train.output_dir>/<stage>/ as each stage ends (train.max_steps must equal "
        "the stages' total)")
    add("eval", cmd_eval, "evaluate a model with a method on a split; writes predictions.jsonl and summary.json, resumes; "
        "a saved run folder as model.name_or_path brings its method, model, data and rollout settings "
        "(the --config file and overrides win)")
    add("refine", cmd_refine, "post-training refinement of a latent model's latents (no weight changes): sweep "
        "refine.sweep_alphas x refine.sweep_etas on data.valid_split (refine.sweep_limit questions), write sweep.json "
        "and the heat map sweep.png, then evaluate the best setting and the unrefined model on eval.split; "
        "references: refine.strong / refine.weak (auto: kept checkpoints of the CoT-SFT run, train.keep_every). "
        "Evaluate one setting with 'latentreason eval refine.residual=true refine.alpha=0.5 ...'")
    demo = add("demo", cmd_demo, "train tiny no-CoT, CoT, Coconut and Latent-SFT models on arith, evaluate each, print a table, "
               "plot accuracy vs reasoning positions")
    demo.add_argument("--output-dir", default="runs/demo", help="where models, predictions and the plot go")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test, low accuracy)")
    demo.add_argument("--latent-sft", action=argparse.BooleanOptionalAction, default=True,
                      help="Latent-SFT r = 4 from the CoT model, at a demo budget (about 4 of the demo's 9 minutes on 2 "
                           "cores; the full recipe: benchmarks/bench_latent_sft.py); --no-latent-sft leaves it out")
    insp = add("inspect", cmd_inspect, "list tasks, methods or latent steps; print a resolved config or task examples "
               "(as eval resolves them: a saved run folder in model.name_or_path brings its settings); "
               "'latents': each latent step's top-5 tokens and entropy for one question of a model "
               "(model.name_or_path=<saved run folder>), as text and a figure",
               first={"name": "what", "choices": ["tasks", "methods", "steps", "config", "example", "latents"]})
    insp.add_argument("-n", type=int, default=3, help="examples to print with 'example'; with 'latents', the n-th question of eval.split (1-based)")
    insp.add_argument("--question", default=None, help="'latents': this question instead of one from eval.split")
    insp.add_argument("--out", default=None, help="'latents': folder for the figure and text (none: print only)")
    comp = sub.add_parser(
        "compare", help="table and figure comparing finished evaluations of one task and split",
        description="Read evaluation folders (summary.json + predictions.jsonl from latentreason eval) of ONE "
                    "task and split; print a markdown table (accuracy with 95%% interval, n, mean reasoning "
                    "positions, seconds per question, probe) and write compare.md, compare.json and compare.png "
                    "(accuracy against reasoning positions and against seconds per question).")
    comp.add_argument("eval_dirs", nargs="+", metavar="FOLDER[=LABEL]",
                      help="evaluation folder, optionally =label (default label: the method name)")
    comp.add_argument("--out", default="runs/compare", help="where compare.md, compare.json and compare.png go")
    comp.add_argument("--title", default=None, help="table and figure title (default: task and split)")
    comp.set_defaults(func=cmd_compare)
    curves = sub.add_parser(
        "curves", help="plot a logged quantity (reward, loss, ...) of training runs against the step",
        description="Read <run>/log.jsonl of each run and plot one line per run of --key (an RL run logs reward, "
                    "reward_correct, reward_format, loss_rl, ...; every run logs loss). Labels 'method/seed' that "
                    "share the text before '/' share a colour.")
    curves.add_argument("runs", nargs="+", metavar="RUN[=LABEL]", help="run folder (or its log.jsonl), optionally =label")
    curves.add_argument("--key", default="reward", help="the logged field to plot (default: reward)")
    curves.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged rows")
    curves.add_argument("--out", default="runs/curves.png", help="the figure to write")
    curves.set_defaults(func=cmd_curves)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, but overrides may sit anywhere on the line (``eval a=1 --config F b=2 -n 3``):
    argparse fills a ``*`` positional at its first run of positionals and would refuse the later ones.
    Whatever is left that reads ``section.field=value`` joins the overrides, in order; anything else is
    refused as before."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:  # the subcommand's usage, not the top level's
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        (sub.choices.get(args.verb, parser) if sub else parser).error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    args = parse(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"latentreason: {exc}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"latentreason: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

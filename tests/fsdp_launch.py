"""``latentreason train`` under FSDP2 on CPU processes, for tests/methods/test_fsdp.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_launch.py [--stop-at N] OVERRIDES...

Accelerate runs FSDP only on GPUs (on CPU processes its FSDP config falls back to data
parallel), but torch's FSDP2 (``fully_shard``) itself runs over gloo. This swaps in an
Accelerator whose ``prepare`` shards the trained module as Accelerate's FSDP config does (each
decoder layer its own unit, then the root; the optimizer's parameters swapped for the shards), so
the trainer's sharded paths (gathered saves, scattered resumes, validation with gathered weights)
run here. ``--stop-at N`` exits every process right after the checkpoint of step N is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

import accelerate
import torch
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class ShardingAccelerator(accelerate.Accelerator):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**{**kwargs, "cpu": True})

    def prepare(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple:  # type: ignore[override]
        before = dict(module.named_parameters())
        for sub in module.modules():
            if sub is not module and type(sub).__name__.endswith("DecoderLayer"):
                fully_shard(sub)
        fully_shard(module)
        after = dict(module.named_parameters())
        swap = {id(p): after[name] for name, p in before.items()}
        for group in optimizer.param_groups:
            group["params"] = [swap[id(p)] for p in group["params"]]
        return module, optimizer


def main(argv: list[str]) -> int:
    stop_at = None
    if argv[:1] == ["--stop-at"]:
        stop_at, argv = int(argv[1]), argv[2:]
    accelerate.Accelerator = ShardingAccelerator  # the trainer imports it when it starts
    if stop_at is not None:
        from latentreason.methods.trainer import Trainer

        save = Trainer.save_resumable

        def save_then_stop(self: Trainer) -> None:
            save(self)
            if self.step >= stop_at:
                raise SystemExit(3)

        Trainer.save_resumable = save_then_stop
    from latentreason.cli import main as cli

    return cli(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

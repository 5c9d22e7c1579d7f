"""The trainers' view of a multi-process run under ``accelerate launch`` (one process per GPU, or gloo processes on
CPU): which process this is, how the prompts are split, and the few collectives the pipeline needs.

One process (a plain ``alignpro train``) is ``Dist()``: rank 0 of 1, every collective a no-op, accelerate's process
group never initialised. Under ``accelerate launch`` (``WORLD_SIZE`` > 1), :meth:`Dist.current` initialises it through
accelerate's :class:`~accelerate.PartialState`, which TRL's trainers and :class:`~accelerate.Accelerator` share.

Conventions every trainer follows:

* prompts are split by position, ``prompts[rank::world]`` (:meth:`Dist.shard`), after the seeded, balanced selection
  that every rank makes alike;
* only rank 0 writes: the log, ``samples.jsonl``, checkpoints, the adapter, the report (:meth:`Dist.main_only`);
  other ranks write only files named for their rank (:meth:`Dist.rank_file`);
* each rank sends its frozen-model requests itself, to the replicas in ``frozen_urls`` rotated by its rank
  (:meth:`Dist.rotate`), so that ranks that each keep few requests in flight start on different replicas.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's rank among ``world`` training processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Dist:
        """The launcher's rank and world size (``Dist()`` outside a multi-process launch)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        # without a GPU, accelerate sets up gloo processes only when told it is on the CPU
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world``-th one from position ``rank``."""
        return list(items[self.rank :: self.world])

    def rotate(self, items: Sequence[T]) -> list[T]:
        """``items`` starting at position ``rank`` (mod its length), the rest in order after it."""
        if not items:
            return []
        i = self.rank % len(items)
        return [*items[i:], *items[:i]]

    def rank_file(self, path: Path) -> Path:
        """``path`` on rank 0; ``<stem>.rank<N><suffix>`` beside it on rank N, so that ranks never share a file."""
        return path if self.main else path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")

    def main_only(self, hook: Callable[[T], None]) -> Callable[[T], None]:
        """``hook`` on rank 0, a no-op elsewhere."""
        return hook if self.main else _ignore

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        got: list[T] = gather_object([obj])
        return got

    def reduce(self, value: float, op: str = "sum") -> float:
        """``value`` summed (``op="sum"``) or maximised (``"max"``) over the ranks."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as tdist
        from accelerate import PartialState

        t = torch.tensor([float(value)], dtype=torch.float64, device=PartialState().device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
        return float(t.item())


def _ignore(_: Any) -> None:
    return None

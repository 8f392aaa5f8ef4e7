"""Orbax checkpoints of a training run: the last N and the best (by validation top-1) kept.

A checkpoint holds the train state's arrays (step, params, BatchNorm statistics, optimizer state, RNG key)
and a JSON ``meta`` item with the resolved config. The data position is a function of the step, so
restoring the state restores the data order too. Saves are atomic (orbax writes to a temporary
directory and renames), so an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

BEST_METRIC = "top1"


class Checkpointer:
    """``CheckpointManager`` with two items, ``state`` (a pytree of arrays) and ``meta`` (JSON)."""

    def __init__(self, directory: str | Path, keep: int = 3):
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, target: Any) -> Any:
        """The ``state`` item of ``step``, with ``target``'s structure, shapes, dtypes and shardings."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> bool:
        """Save unless ``step`` is already saved (a resumed run that has nothing left to do)."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for asynchronous saves to land on disk."""
        self.manager.wait_until_finished()
        self.manager.close()

"""Checkpoints of the training state with orbax-checkpoint.

The state (parameters, optimizer state, step and counters) is saved as its flat list of leaves
(``{"leaves": {"00000": array, ...}}``) and restored into the leaves of a freshly initialized
state of the same config, so optimizer states made of any pytree nodes (named tuples, empty
states) round-trip without orbax needing to know them. A small JSON item carries the step and
the cumulative training time.

A checkpoint restores onto another device layout (a mesh of another size, or one device):
orbax reads every array into the sharding of the fresh state's leaf. The one shape that
depends on the layout is the length of a stacked preconditioner (Shampoo's roots, SOAP's
bases are padded to a multiple of the device count, with rows that are never used): a
saved leaf whose shape differs from the fresh one in a single axis is read as saved, and its
first rows are kept, the fresh state's padding rows filling the rest.

Writes are synchronous and atomic: orbax writes into a temporary directory and renames it
when complete, and only finalized step directories are listed. A checkpoint that still fails
to load is skipped in favour of the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


def _to_saveable(x: Any) -> Any:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def _one_axis_differs(saved: tuple[int, ...] | None, shape: tuple[int, ...]) -> bool:
    if saved is None or len(saved) != len(shape) or tuple(saved) == tuple(shape):
        return False
    return sum(a != b for a, b in zip(saved, shape, strict=True)) == 1


def _replicated(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def _fit_rows(saved: Any, fresh: Any) -> Any:
    """`saved` cut or padded along the one axis where its shape differs from `fresh`'s: its
    first rows, then `fresh`'s rows beyond them; laid out like `fresh`."""
    axis = next(i for i, (a, b) in enumerate(zip(saved.shape, fresh.shape, strict=True)) if a != b)
    n = min(saved.shape[axis], fresh.shape[axis])
    keep = jax.lax.slice_in_dim(saved, 0, n, axis=axis)
    rest = jax.lax.slice_in_dim(fresh, n, fresh.shape[axis], axis=axis)
    out = jax.numpy.concatenate([jax.numpy.asarray(keep, fresh.dtype), rest], axis=axis)
    sharding = getattr(fresh, "sharding", None)
    return jax.device_put(out, sharding) if sharding is not None else out


class Checkpointer:
    """Save / restore a training-state pytree under ``directory`` (one subdirectory per step)."""

    def __init__(self, directory: Path | str, keep: int, *, read_only: bool = False):
        """`read_only`: only list and restore (creates, cleans and deletes nothing)."""
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._read_only = read_only
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        if self._read_only:
            raise RuntimeError("this Checkpointer was opened read-only")
        ocp = self._ocp
        leaves = jax.tree.leaves(state)
        item = {"leaves": {f"{i:05d}": _to_saveable(x) for i, x in enumerate(leaves)}}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(item), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
        """The newest loadable checkpoint (or `step`) as ``(state, meta)``; None if none.

        Args:
          like: a state of the right structure (e.g. freshly initialized); its leaves give the
            shapes, dtypes and shardings to restore into.
        """
        ocp = self._ocp
        leaves, treedef = jax.tree.flatten(like)
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        for s in candidates:
            saved_shapes = self._saved_shapes(s)
            self._check_layout(s, saved_shapes, leaves)
            try:
                abstract: dict[str, dict[str, jax.ShapeDtypeStruct]] = {"leaves": {}}
                for i, x in enumerate(leaves):
                    shape = np.shape(_to_saveable(x))
                    key = f"{i:05d}"
                    resized = _one_axis_differs(saved_shapes.get(key), shape)
                    abstract["leaves"][key] = jax.ShapeDtypeStruct(
                        saved_shapes[key] if resized else shape,
                        _to_saveable(x).dtype,
                        sharding=_replicated(x) if resized else getattr(x, "sharding", None),
                    )
                out = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # a damaged checkpoint: fall back to the previous one
                log.warning("checkpoint at step %s could not be loaded (%s); skipping it", s, e)
                continue
            restored = []
            for i, x in enumerate(leaves):
                r = out["state"]["leaves"][f"{i:05d}"]
                if np.shape(r) != np.shape(_to_saveable(x)):
                    r = _fit_rows(r, x)
                if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                    r = jax.random.wrap_key_data(r, impl=jax.random.key_impl(x))
                restored.append(r)
            return jax.tree.unflatten(treedef, restored), dict(out["meta"])
        return None

    def _check_layout(self, step: int, saved: dict[str, tuple[int, ...]], leaves: list) -> None:
        """A checkpoint whose leaves do not match the fresh state (another optimizer-state
        layout: another version or config) is an error, never a silent restart."""
        if not saved:
            return
        expected = {f"{i:05d}": tuple(np.shape(_to_saveable(x))) for i, x in enumerate(leaves)}
        bad = sorted(set(saved) ^ set(expected))
        bad += [k for k in expected if k in saved and saved[k] != expected[k]
                and not _one_axis_differs(saved[k], expected[k])]  # fmt: skip
        if bad:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} holds {len(saved)} state leaves, "
                f"the current config's state has {len(expected)} (first mismatch: leaf "
                f"{bad[0]}: saved {saved.get(bad[0])}, expected {expected.get(bad[0])}): it was "
                "written with another optimizer-state layout (another jaxopt2 version or "
                "optimizer config). Resume it with the version that wrote it, or start a new "
                "run directory; nothing was overwritten."
            )

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """The shapes of the leaves saved at `step` (from orbax's metadata)."""
        try:
            with self._ocp.StandardCheckpointer() as reader:
                meta = reader.metadata(self.directory / str(step) / "state")
            tree = meta.item_metadata.tree["leaves"]
        except Exception:  # no metadata: restore with the fresh shapes
            return {}
        return {k: tuple(getattr(v, "shape", ())) for k, v in tree.items()}

    def close(self) -> None:
        self._manager.close()

"""The runner on a device mesh: which devices, and how the engine's arrays are laid out on them.

A config's ``mesh`` section (:class:`~jaxopt2.experiment.config.MeshConfig`) names two axes:

* ``data``: every batch is split along its rows (data parallelism). The training arrays are
  replicated, the batch a step draws from them is constrained to the ``data`` axis, so each
  device computes the loss and gradient of its rows and XLA all-reduces the gradient. The
  statistics the optimizers accumulate (K-FAC's factors, Shampoo's ``G Gᵀ``) are functions of
  the global batch's mean gradient or sums over its rows: the same numbers as on one device.
* ``model``: each parameter is split along its largest dimension that the axis divides (FSDP
  style; a parameter no dimension of which divides stays replicated), and the optimizer state
  follows (:func:`jaxopt2.sharding.state_sharding`).

Mesh axes are ``Auto`` (XLA propagates shardings from the ones given here), which every
optimizer supports. The mesh is the ambient one (``jax.set_mesh``) while the engine traces, so
Shampoo, SOAP and K-FAC split their refreshes across all of its devices.

Where batches come from (``mesh.feed``): either the training set is replicated and each step
draws its rows inside the compiled program (``device``), or each process builds, from its host
copy of the data, only the rows of each chunk's batches that its own devices hold and the
global batch is assembled from those slices (``host``, :meth:`Layout.rows_of`, with
``jax.make_array_from_process_local_data``): no device then holds the training set, and full
arrays (evaluation data, a full-batch training set) are split by rows over ``data`` too.

Several processes (one per host, or several on one machine) form one job through
``jax.distributed.initialize`` (:func:`initialize_processes`); the mesh then spans every
process's devices, ``batch_size`` stays the global batch and the feed is ``host`` unless the
config says otherwise.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, cast

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt2.experiment.config import MeshConfig
from jaxopt2.experiment.errors import UserError
from jaxopt2.sharding import state_sharding

__all__ = [
    "Layout",
    "barrier",
    "build_mesh",
    "host_values",
    "initialize_processes",
    "is_writer",
    "param_spec",
]


def build_mesh(cfg: MeshConfig, batch_size: int) -> jax.sharding.Mesh | None:
    """The ``(data, model)`` mesh of a config (None when the section is off), on the first
    ``data x model`` devices."""
    if cfg.data == 0:
        return None
    n = jax.device_count()
    data = n // cfg.model if cfg.data == -1 else cfg.data
    if data < 1 or data * cfg.model > n:
        raise UserError(
            f"mesh.data x mesh.model = {data} x {cfg.model} = {data * cfg.model} devices, but "
            f"there are {n} (mesh.data: -1 takes all of them)"
        )
    if batch_size % data:
        raise UserError(
            f"batch_size = {batch_size} does not split over mesh.data = {data} devices: "
            "make it a multiple of the data axis"
        )
    return jax.make_mesh(
        (data, cfg.model),
        ("data", "model"),
        axis_types=(AxisType.Auto,) * 2,
        devices=jax.devices()[: data * cfg.model],
    )


def param_spec(shape: tuple[int, ...], model: int) -> P:
    """A parameter's spec: its largest dimension divisible by `model` on the ``model`` axis."""
    if model == 1:
        return P()
    dims = [i for i in np.argsort(shape, kind="stable")[::-1] if shape[i] % model == 0]
    if not dims:
        return P()
    spec: list[Any] = [None] * len(shape)
    spec[dims[0]] = "model"
    return P(*spec)


class Layout:
    """The shardings of the engine's arrays on a mesh (leading member axis unsplit)."""

    def __init__(self, mesh: jax.sharding.Mesh, tx, params1: Any):
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        model = mesh.shape["model"]
        self.params1 = jax.tree.map(
            lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), model)), params1
        )
        self.state1 = state_sharding(tx, params1, self.params1, mesh=mesh)

    def members(self, tree: Any) -> Any:
        """`tree`'s shardings with the member axis in front (never split)."""
        return jax.tree.map(
            lambda s: NamedSharding(self.mesh, P(None, *s.spec)),
            tree,
            is_leaf=lambda s: isinstance(s, jax.sharding.Sharding),
        )

    def carry(self) -> dict[str, Any]:
        r = self.replicated
        return {
            "params": self.members(self.params1),
            "opt_state": self.members(self.state1),
            "step": r,
            "halted": r,
            "diverged_at": r,
            "nonfinite": r,
        }

    def place(self, tree: Any, shardings: Any) -> Any:
        """`tree`'s arrays on the mesh with these shardings. In a multi-process job each
        process holds the same host values (from the same seed and data) and contributes the
        shards of its own devices."""
        if jax.process_count() == 1:
            return jax.device_put(tree, shardings)

        def one(x, s):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return jax.jit(lambda a: a, out_shardings=s)(x)  # already global: reshard
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

        return jax.tree.map(one, tree, shardings)

    def split(self, ndim: int, axis: int) -> NamedSharding:
        """The sharding of an `ndim`-dimensional array whose `axis` is split over ``data``."""
        spec: list[Any] = [None] * ndim
        spec[axis] = "data"
        return NamedSharding(self.mesh, P(*spec))

    def local_range(self, sharding: NamedSharding, shape: tuple[int, ...], axis: int):
        """The ``[lo, hi)`` positions along `axis` that this process's devices hold."""
        held: set[tuple[int, int]] = set()
        for idx in sharding.addressable_devices_indices_map(shape).values():
            # jax types the index Optional; a NamedSharding gives every device one.
            sl = cast(tuple[slice, ...], idx)[axis]
            held.add((sl.start or 0, shape[axis] if sl.stop is None else sl.stop))
        spans = sorted(held)
        lo, hi = spans[0][0], spans[-1][1]
        if any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
            raise RuntimeError(
                f"this process's devices hold non-adjacent parts {spans} of the data axis; "
                "order the mesh's devices by process"
            )
        return lo, hi

    def rows_of(self, host: np.ndarray, rows: np.ndarray, axis: int) -> jax.Array:
        """The global array ``host[rows]``, split over ``data`` along `axis` of `rows` (an index
        array of rows of `host`). This process gathers only the rows its devices hold and
        contributes them (``jax.make_array_from_process_local_data``)."""
        shape = rows.shape + host.shape[1:]
        sharding = self.split(len(shape), axis)
        lo, hi = self.local_range(sharding, shape, axis)
        local = host[np.take(rows, np.arange(lo, hi), axis=axis)]
        return jax.make_array_from_process_local_data(sharding, local, shape)

    def full_rows(self, data: tuple[np.ndarray, ...]) -> tuple[jax.Array, ...]:
        """Whole arrays (every row) split by rows over ``data`` (each process contributing its
        own rows); an array whose row count the axis does not divide is replicated."""
        d = self.mesh.shape["data"]
        return tuple(
            self.rows_of(a, np.arange(a.shape[0]), 0)
            if a.ndim and a.shape[0] % d == 0
            else self.place(a, self.replicated)
            for a in (np.asarray(x) for x in data)
        )

    def constrain_batch(self, batch: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        """The batch's rows over the ``data`` axis (inside the traced step)."""
        data = self.mesh.shape["data"]
        spec = NamedSharding(self.mesh, P("data"))
        return tuple(
            jax.lax.with_sharding_constraint(x, spec) if x.ndim and x.shape[0] % data == 0 else x
            for x in batch
        )


def is_writer() -> bool:
    """Whether this process writes the run directory's own files (process 0 of a job; every
    process writes its shards of the checkpoints, which orbax coordinates)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process of a multi-process job (nothing in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def host_values(tree: Any) -> Any:
    """`tree`'s arrays as host numpy arrays on every process (gathered across processes when
    they are sharded over several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def initialize_processes(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join a multi-process job (``jax.distributed.initialize``); True if one was joined.

    Arguments default to ``JAXOPT2_COORDINATOR``, ``JAXOPT2_NUM_PROCESSES`` and
    ``JAXOPT2_PROCESS_ID``; with none of them set (and none given) it does nothing, so a
    single-process run is unchanged. On CPU the processes talk over gloo.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAXOPT2_COORDINATOR")
    if num_processes is None and env.get("JAXOPT2_NUM_PROCESSES"):
        num_processes = int(env["JAXOPT2_NUM_PROCESSES"])
    if process_id is None and env.get("JAXOPT2_PROCESS_ID"):
        process_id = int(env["JAXOPT2_PROCESS_ID"])
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if not any(given):
        return False
    if coordinator is None or num_processes is None or process_id is None:  # not all(given)
        raise UserError(
            "a multi-process run needs the coordinator address, the process count and this "
            "process's id (--coordinator/--num-processes/--process-id or JAXOPT2_COORDINATOR/"
            "JAXOPT2_NUM_PROCESSES/JAXOPT2_PROCESS_ID)"
        )
    if not 0 <= process_id < num_processes:
        raise UserError(f"process id {process_id} is not in 0..{num_processes - 1}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True

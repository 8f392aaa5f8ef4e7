"""Data parallelism on one device mesh: ``jax.jit`` over ``NamedSharding``s, from one CPU to many hosts.

This replaces ``jax.pmap`` (in maintenance mode since JAX 0.8, itself implemented on ``jit`` + ``shard_map``):
the train state is replicated, every batch is split over the ``'data'`` axis, and XLA inserts the
all-reduces, so gradients and BatchNorm statistics are over the global batch. Each process feeds only its
own slice of the global batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxnets.errors import UserError

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several": JAX's own cluster auto-detection
# (jax.distributed.initialize() without arguments) then finds the coordinator and the process id.
CLUSTER_ENV = {
    "JAX_COORDINATOR_ADDRESS": None,
    "OMPI_COMM_WORLD_SIZE": "size",  # Open MPI (mpirun)
    "SLURM_NTASKS": "size",  # Slurm (srun)
    "TPU_WORKER_HOSTNAMES": "hosts",  # Cloud TPU pods
}


def cluster_detected() -> bool:
    """Whether the environment describes a multi-process launch JAX can auto-detect."""
    for var, kind in CLUSTER_ENV.items():
        value = os.environ.get(var)
        if not value:
            continue
        if kind is None or (kind == "size" and value.isdigit() and int(value) > 1) or (
                kind == "hosts" and "," in value):
            return True
    return False


def parse_coordinator(address: str) -> tuple[str, int]:
    """``host:port`` -> ``(host, port)`` (IPv6 hosts in brackets: ``[::1]:1234``); a ValueError naming
    ``--coordinator`` for anything else, before JAX fails on it obscurely or waits for it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise UserError(f"--coordinator {address!r}: expected host:port with a port from 1 to 65535 "
                        "(e.g. 10.0.0.1:1234)")
    return host, int(port)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start ``jax.distributed`` when the run is one of several processes: explicit arguments, or an
    auto-detected cluster (Slurm, Open MPI, TPU pods, ``JAX_COORDINATOR_ADDRESS``). A no-op for a single
    process or when already initialized. Must run before anything touches a JAX device."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise UserError("--coordinator, --num-processes and --process-id go together (give all three, or none "
                        "and let a cluster environment be auto-detected)")
    if coordinator is not None:
        parse_coordinator(coordinator)
    if jax.distributed.is_initialized():
        return
    if coordinator is None and not cluster_detected():
        return
    # CPU devices of several processes talk through gloo (the default CPU client has no collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``'data'`` mesh over all devices of all processes, or the first ``num_devices`` of them
    (single process only: every process must own devices of a multi-process mesh)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise UserError(f"--devices {num_devices}: there are {len(devices)} device(s) "
                            f"({devices[0].platform})")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise UserError(f"--devices {num_devices}: a multi-process run uses all {len(devices)} devices")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    """A global batch must split evenly over the devices (and so over the processes)."""
    devices = mesh.devices.size
    if global_batch < 1 or global_batch % devices:
        raise UserError(f"{flag} {global_batch} is not divisible by the {devices} device(s) of the mesh; "
                        f"use a multiple of {devices}")


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a global batch -> global arrays split over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, size: int = 2) -> Iterator[dict]:
    """Keep ``size`` batches already on their way to the devices while the current one computes (flax's
    ``prefetch_to_device`` for meshes): transfers are asynchronous, and tf.data loads ahead on the host."""
    queue: deque = deque()
    iterator = iter(batches)

    def enqueue(n: int) -> None:
        for batch in iterator:
            queue.append(to_global(batch, mesh))
            n -= 1
            if n == 0:
                break

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def to_host(tree: Any) -> Any:
    """Replicated (or fully addressable) arrays -> numpy, on every process."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (e.g. a signal received by one host)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def is_main_process() -> bool:
    """Process 0 writes logs, plots and final weights."""
    return jax.process_index() == 0

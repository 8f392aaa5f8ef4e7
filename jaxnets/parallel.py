"""Data parallelism on one device mesh: ``jax.jit`` over ``NamedSharding``s, from one CPU to many hosts.

This replaces ``jax.pmap`` (in maintenance mode since JAX 0.8, itself implemented on ``jit`` + ``shard_map``):
the train state is replicated, every batch is split over the ``'data'`` axis, and XLA inserts the
all-reduces, so gradients and BatchNorm statistics are over the global batch. Each process feeds only its
own slice of the global batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxnets.errors import UserError, first_line

DATA_AXIS = "data"
DISTRIBUTED = ("auto", "off")  # --distributed: join the cluster JAX detects, or run a single process regardless
# Slurm: JAX's coordinator port is 61440 + SLURM_JOB_ID % 4096, one port for every step of an allocation. jaxnets adds
# SLURM_STEP_ID x an odd stride (so 4096 consecutive steps of one allocation get distinct ports; step 0 keeps JAX's).
_SLURM_PORT_BASE, _SLURM_PORTS, _SLURM_STEP_STRIDE = 65535 - 2**12 + 1, 2**12, 1031
# What a process tells the others when it stops at a collective check (raise_together): a line, cut to this size.
_MESSAGE_BYTES = 1024
# Clusters where jax.distributed.initialize() pins each process to the one local device of its local rank
# (jax/_src/clusters/cluster.py: local_device_ids = [local_process_id] when none is given).
RANK_PINNING_CLUSTERS = ("slurm", "ompi")
_GPU_VISIBILITY = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
# What JAX's own detection cannot see, for JAX versions whose private cluster API differs (see detected_cluster).
_FALLBACK_CLUSTER_VARIABLES = {"ompi": ("OMPI_MCA_orte_hnp_uri",),
                               "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                         "SLURM_LOCALID"),
                               "gketpu": ("TPU_WORKER_HOSTNAMES",)}


def detected_cluster() -> str | None:
    """The cluster environment ``jax.distributed.initialize()`` would bootstrap from without arguments
    ('ompi', 'slurm', 'gcetpu', 'gketpu', 'k8s', ...), or None.

    JAX's own list, so every environment it knows is detected: its ``ClusterEnv`` subclasses are private API
    (``jax._src.clusters``). Where that API is missing or changed, a fallback checks the variables of the
    environments JAX knew when this was written (Open MPI, Slurm, GKE TPU). A detector that fails (the
    Kubernetes one needs the ``kubernetes`` package and the pod's API access) counts as absent."""
    try:
        from jax._src import clusters  # private: no public API lists the detectable environments
        environments = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):
        environments = None
    if not environments:
        return next((name for name, variables in _FALLBACK_CLUSTER_VARIABLES.items()
                     if all(v in os.environ for v in variables)), None)
    for env in environments:
        if getattr(env, "opt_in_only_method", False):  # mpi4py: only when asked for by name
            continue
        try:
            present = env.is_env_present()
        except Exception:  # e.g. Kubernetes variables without API access: not a cluster JAX can join
            present = False
        if present:
            return getattr(env, "name", "") or env.__name__.removesuffix("Cluster").lower()
    return None


def parse_coordinator(address: str) -> tuple[str, int]:
    """``host:port`` -> ``(host, port)`` (IPv6 hosts in brackets: ``[::1]:1234``); a ValueError naming
    ``--coordinator`` for anything else, before JAX fails on it obscurely or waits for it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise UserError(f"--coordinator {address!r}: expected host:port with a port from 1 to 65535 "
                        "(e.g. 10.0.0.1:1234)")
    return host, int(port)


def parse_local_devices(text: str | None) -> str | tuple[int, ...]:
    """``--local-devices``: 'auto' (also for None), 'all', or distinct device indices ``0,1,...`` (as this
    process numbers its visible devices: after ``CUDA_VISIBLE_DEVICES``)."""
    text = "auto" if text is None else text.strip()
    if text in ("auto", "all"):
        return text
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise UserError(f"--local-devices {text!r}: expected all, auto or distinct device indices such as 0,1,2,3")
    return ids


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the run: the arguments for ``jax.distributed.initialize`` and why.

    ``local_device_ids`` None means every device the process sees. ``cluster`` is the environment JAX detects,
    'explicit' for ``--coordinator``, or None for a single process."""

    cluster: str | None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    reason: str = "all devices"
    how: str = ""  # how the coordinator was chosen, or why a detected cluster was left alone (--distributed off)

    @property
    def multi_process(self) -> bool:
        return self.cluster is not None

    def initialize_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``jax.distributed.initialize``: None ones are left to JAX's detection."""
        kwargs: dict[str, Any] = {"coordinator_address": self.coordinator, "num_processes": self.num_processes,
                                  "process_id": self.process_id}
        if self.local_device_ids is not None:
            kwargs["local_device_ids"] = list(self.local_device_ids)
        elif self.cluster == "explicit" and _accepts("cluster_detection_method"):
            # All devices: stop JAX from filling local_device_ids in from a cluster it detects (a hand-started
            # process inside a Slurm allocation would be pinned to one device). A JAX older than 'deactivate'
            # logs that it knows no such method and goes on without detection, which is the same.
            kwargs["cluster_detection_method"] = "deactivate"
        return kwargs

    def describe(self) -> str:
        where = {None: "single process", "explicit": "--coordinator"}.get(self.cluster, self.cluster)
        return f"{where}{f' ({self.how})' if self.how else ''}, {self.reason}"


def plan_launch(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                local_devices: str | None = None, distributed: str = "auto") -> Launch:
    """Whether and how this process joins a multi-process run, decided from the flags and the environment
    (the cluster as JAX detects it; under Slurm and Open MPI, the processes and GPUs on this host).
    ``distributed='off'``: a single process whatever the environment says (one step of a Slurm allocation that
    trains or evaluates alone)."""
    environ = os.environ
    explicit = (coordinator, num_processes, process_id)
    if distributed not in DISTRIBUTED:
        raise UserError(f"--distributed {distributed!r}: choose one of {', '.join(DISTRIBUTED)}")
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise UserError("--coordinator, --num-processes and --process-id go together (give all three, or none "
                        "and let a cluster environment be auto-detected)")
    if coordinator is not None:
        if distributed == "off":
            raise UserError("--distributed off runs a single process: leave out --coordinator, --num-processes and "
                            "--process-id")
        parse_coordinator(coordinator)
    choice = parse_local_devices(local_devices)
    cluster = "explicit" if coordinator is not None else detected_cluster()
    if cluster is None and environ.get("JAX_COORDINATOR_ADDRESS"):
        cluster = "JAX_COORDINATOR_ADDRESS"
    how = ""
    if distributed == "off":
        how = "--distributed off" + (f": {cluster} environment not joined" if cluster else "")
        cluster = None
    elif cluster == "slurm" and not environ.get("JAX_COORDINATOR_ADDRESS"):
        coordinator, how = slurm_coordinator(environ)
    base = Launch(cluster, coordinator, num_processes, process_id, how=how)
    if isinstance(choice, tuple):
        return dataclasses.replace(base, local_device_ids=choice,
                                   reason=f"local devices {_ids(choice)} (--local-devices)")
    if choice == "auto" and environ.get("JAX_LOCAL_DEVICE_IDS"):
        ids = parse_local_devices(environ["JAX_LOCAL_DEVICE_IDS"])
        return dataclasses.replace(base, local_device_ids=ids, reason=f"local devices {_ids(ids)} "
                                   "(JAX_LOCAL_DEVICE_IDS)")
    if cluster not in RANK_PINNING_CLUSTERS:  # JAX leaves every device to the process
        return dataclasses.replace(base, reason="all local devices")
    visible = visible_gpus(environ)
    if not visible:  # device pinning only applies to GPUs
        return dataclasses.replace(base, reason="no GPUs seen: JAX's default of one GPU per local rank")
    if choice == "all":
        return dataclasses.replace(base, local_device_ids=tuple(range(visible)),
                                   reason=f"all {visible} local GPUs (--local-devices all)")
    return dataclasses.replace(base, **_split_host_gpus(cluster, environ, visible))


def _split_host_gpus(cluster: str, environ: Mapping[str, str], visible: int) -> dict[str, Any]:
    """``--local-devices auto`` under Slurm or Open MPI: this process's share of its host's GPUs, from the
    number of processes on the host and the GPUs this process sees."""
    if cluster == "slurm":
        rank, size = int(environ.get("SLURM_LOCALID", "0")), slurm_tasks_on_node(environ)
        host_gpus = slurm_gpus_on_node(environ)
    else:
        rank = int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        size = int(environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "0")) or None
        host_gpus = _gpu_device_files() if any(v in environ for v in _GPU_VISIBILITY) else None
    if size is None:
        return {"local_device_ids": (rank,), "reason": f"local rank {rank}, processes per host unknown: one GPU "
                                                       "(JAX's default)"}
    if size == 1:
        return {"local_device_ids": tuple(range(visible)), "reason": f"one process per host: all {visible} GPUs"}
    if (host_gpus is not None and visible < host_gpus) or visible < size:
        # The launcher gave each process its own GPUs (Slurm --gpus-per-task, CUDA_VISIBLE_DEVICES per rank).
        return {"local_device_ids": tuple(range(visible)),
                "reason": f"{size} processes per host, each with its own {visible} GPU(s)"}
    if visible % size:
        raise UserError(f"inconsistent launch: {visible} GPUs cannot be split evenly over the {size} processes "
                        f"on this host; start {', '.join(str(d) for d in _divisors(visible))} per host, or give "
                        "--local-devices")
    share = visible // size
    ids = tuple(range(rank * share, (rank + 1) * share))
    label = "one process per GPU" if share == 1 else f"{size} processes per host"
    return {"local_device_ids": ids, "reason": f"{label}: local rank {rank} of {size} takes GPU(s) {_ids(ids)} "
                                               f"of {visible}"}


def slurm_coordinator(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The coordinator address of a Slurm step and how it was chosen: the step's first node (as JAX finds it) at
    a port from ``SLURM_JOB_ID`` and ``SLURM_STEP_ID``, so that the steps of one allocation (a sweep, training
    beside evaluation) never share a port, as they do under JAX's job-id-only port. ``JAX_COORDINATOR_PORT``, when
    set, is JAX's and is left to it (address None)."""
    if environ.get("JAX_COORDINATOR_PORT"):
        return None, f"coordinator port {environ['JAX_COORDINATOR_PORT']} (JAX_COORDINATOR_PORT)"
    job, step = environ.get("SLURM_JOB_ID", ""), environ.get("SLURM_STEP_ID")
    if not job.isdigit() or not (step or "0").isdigit():
        return None, "coordinator port from SLURM_JOB_ID (JAX's)"
    port = _SLURM_PORT_BASE + (int(job) + _SLURM_STEP_STRIDE * int(step or 0)) % _SLURM_PORTS
    try:
        from jax._src.clusters.slurm_cluster import SlurmCluster  # private: JAX's parsing of the node list
        address = SlurmCluster.get_coordinator_address(None, override_coordinator_port=str(port))
    except (ImportError, AttributeError, TypeError, KeyError):  # another JAX: its own port, as before
        return None, "coordinator port from SLURM_JOB_ID (JAX's)"
    return address, f"coordinator {address}, port from SLURM_JOB_ID {job} and " + (
        f"SLURM_STEP_ID {step}" if step is not None else "no SLURM_STEP_ID")


def visible_gpus(environ: Mapping[str, str]) -> int | None:
    """How many GPUs this process sees, known before JAX starts: ``CUDA_VISIBLE_DEVICES`` (or ROCm's) when set,
    else Slurm's count for this node, else the NVIDIA device files; None where nothing tells."""
    for variable in _GPU_VISIBILITY:
        if variable in environ:
            value = environ[variable].strip()
            return 0 if value in ("", "-1", "NoDevFiles") else len(value.split(","))
    on_node = slurm_gpus_on_node(environ) if "SLURM_JOB_ID" in environ else None
    return on_node if on_node is not None else _gpu_device_files()


def slurm_gpus_on_node(environ: Mapping[str, str]) -> int | None:
    """GPUs Slurm allocated to the job step on this node: ``SLURM_GPUS_ON_NODE``, else the length of
    ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``."""
    if environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(environ["SLURM_GPUS_ON_NODE"])
    for variable in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(variable):
            return len(environ[variable].split(","))
    return None


def slurm_tasks_on_node(environ: Mapping[str, str]) -> int | None:
    """Tasks of this step on this node: ``SLURM_STEP_TASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` (Slurm's
    compressed per-node list, ``2(x3),1``, at ``SLURM_NODEID``), else ``SLURM_NTASKS_PER_NODE``."""
    node = int(environ.get("SLURM_NODEID", "0"))
    for variable in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts = []
        for part in filter(None, environ.get(variable, "").split(",")):
            count, _, repeat = part.partition("(x")
            counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
        if counts:
            return counts[min(node, len(counts) - 1)]
    value = environ.get("SLURM_NTASKS_PER_NODE", "")
    return int(value) if value.isdigit() else None


def _gpu_device_files() -> int | None:
    """NVIDIA GPUs on this host by their device files (``/dev/nvidia0``, ...), without starting CUDA."""
    count = sum(1 for path in Path("/dev").glob("nvidia*") if path.name[6:].isdigit())
    return count or None


def _accepts(parameter: str) -> bool:
    return parameter in inspect.signature(jax.distributed.initialize).parameters


def _ids(ids: Sequence[int]) -> str:
    return ",".join(map(str, ids))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_launch = Launch(None)  # what initialize() did in this process, for describe_topology


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_devices: str | None = None, distributed: str = "auto") -> Launch:
    """Start ``jax.distributed`` when the run is one of several processes: explicit arguments, or a cluster
    JAX detects (Slurm, Open MPI, Kubernetes, TPU pods, ``JAX_COORDINATOR_ADDRESS``), each process driving
    the devices ``plan_launch`` gives it; ``distributed='off'``: never. A no-op for a single process (but for
    ``--local-devices`` ids, which then limit the GPUs this process uses) and when already initialized. Must run
    before anything touches a JAX device."""
    global _launch
    launch = plan_launch(coordinator, num_processes, process_id, local_devices, distributed)
    if jax.distributed.is_initialized():
        return _launch
    if not launch.multi_process:
        if launch.local_device_ids is not None:
            for platform in ("cuda", "rocm"):
                jax.config.update(f"jax_{platform}_visible_devices", _ids(launch.local_device_ids))
        _launch = launch
        return launch
    # CPU devices of several processes talk through gloo (the default CPU client has no collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**launch.initialize_kwargs())
    _launch = launch
    return launch


def check_topology(devices: Sequence[Any], process_count: int) -> None:
    """Every process must drive the same number of devices (a batch is split evenly over processes, then
    devices): a one-line error otherwise, raised on every process alike, since each sees every device."""
    counts = Counter(d.process_index for d in devices)
    missing = [p for p in range(process_count) if p not in counts]
    if missing or len(set(counts.values())) > 1:
        per_process = ", ".join(f"process {p}: {counts.get(p, 0)}" for p in range(process_count))
        raise UserError(f"inconsistent launch: processes drive different numbers of devices ({per_process}); "
                        "start the same number of processes on every host, or give --local-devices")


def describe_topology(mesh: Mesh) -> str:
    """The launch in one line: processes, devices per process, global devices, the mesh, and how the
    local devices were chosen."""
    devices = mesh.devices.ravel()
    processes = jax.process_count()
    shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return (f"{len(devices)} {devices[0].platform} device(s) in {processes} process(es), "
            f"{jax.local_device_count()} per process, {jax.device_count()} global; mesh {shape}; "
            f"launch: {_launch.describe()}")


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``'data'`` mesh over all devices of all processes, or the first ``num_devices`` of them
    (single process only: every process must own devices of a multi-process mesh)."""
    devices = jax.devices()
    check_topology(devices, jax.process_count())
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


def raise_together(error: BaseException | None) -> None:
    """A check every process makes at the same point: when it failed on any process, every process raises, so
    that none goes on to wait in a collective for a process that has stopped. The process that failed raises its
    own ``error``; the others a ``UserError`` with its first line (the first failed process's, by index): one line
    on every process. A no-op (or ``error`` raised) in a single process."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    text = "" if error is None else first_line(error) or type(error).__name__
    messages = share_text(text)
    if error is not None:
        raise error
    failed = next((message for message in messages if message), None)
    if failed is not None:
        raise UserError(failed)


def share_text(text: str) -> list[str]:
    """Every process's ``text`` (UTF-8, at most ``_MESSAGE_BYTES`` of it), by process index, on every process:
    a collective."""
    if jax.process_count() == 1:
        return [text]
    data = np.zeros(_MESSAGE_BYTES, np.uint8)
    encoded = text.encode()[:_MESSAGE_BYTES]
    data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(data)).reshape(jax.process_count(), _MESSAGE_BYTES)
    return [bytes(row).rstrip(b"\0").decode(errors="ignore") for row in gathered]


def host_name() -> str:
    """This process's host, for messages that say which host saw what."""
    return socket.gethostname()


def is_main_process() -> bool:
    """Process 0 writes logs, plots and final weights."""
    return jax.process_index() == 0

"""Launch topologies in simulated cluster environments: what jaxnets passes to ``jax.distributed.initialize``
(patched to record its arguments), what JAX itself then resolves from them (its own cluster auto-detection is
the oracle), and the start log line. One process per GPU (JAX's default under Slurm and Open MPI) and one
process per host driving all its GPUs must both come out right, and an inconsistent launch must be a one-line
error on every process, not a hang."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxnets import parallel
from jaxnets.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Everything that could make the test process look like part of a cluster.
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "TPU_", "MEGASCALE_", "JOB_COMPLETION_INDEX",
                    "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                    "HIP_VISIBLE_DEVICES")
GPUS_8 = ",".join(map(str, range(8)))


@pytest.fixture
def cluster(monkeypatch):
    """A clean environment; ``jax.distributed`` patched to record what jaxnets passes, and jax.config updates
    recorded instead of made. Returns a namespace: ``env(**variables)``, ``gpu_files(n)``, ``calls``,
    ``config``."""
    for name in list(os.environ):
        if name.startswith(CLUSTER_PREFIXES):
            monkeypatch.delenv(name)
    calls, config = [], {}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    record = lambda **kwargs: calls.append(kwargs)
    record.__signature__ = inspect.signature(jax.distributed.initialize)  # what jaxnets may ask of it
    monkeypatch.setattr(jax.distributed, "initialize", record)
    monkeypatch.setattr(jax.config, "update", lambda name, value: config.__setitem__(name, value))
    monkeypatch.setattr(parallel, "_gpu_device_files", lambda: None)  # no GPUs on the test machine
    monkeypatch.setattr(parallel, "_launch", parallel.Launch(None))

    def env(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))
    return types.SimpleNamespace(env=env, calls=calls, config=config,
                                 gpu_files=lambda n: monkeypatch.setattr(parallel, "_gpu_device_files", lambda: n))


def jax_resolves(kwargs: dict) -> tuple:
    """(coordinator, processes, process id, local device ids) as ``jax.distributed.initialize`` resolves
    them from ``kwargs`` and the environment: JAX's own auto-detection, called as initialize calls it."""
    from jax._src import clusters  # private, like what it checks: the oracle of what JAX would do

    values = (kwargs.get("coordinator_address"), kwargs.get("num_processes"), kwargs.get("process_id"),
              kwargs.get("local_device_ids"))
    if kwargs.get("cluster_detection_method") == "deactivate" or None not in values:
        return values
    try:
        return tuple(clusters.ClusterEnv.auto_detect_unset_distributed_params(
            *values, kwargs.get("cluster_detection_method"), 300))
    except TypeError:
        pytest.skip("this JAX's private cluster detection has another signature")


def start_line(cluster_ns) -> str:
    """The start log line's topology part, for this process's one CPU device as the mesh."""
    return parallel.describe_topology(Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,)))


SLURM_TWO_NODES = dict(SLURM_JOB_ID=4321, SLURM_STEP_NODELIST="gpu[017-018]", SLURM_NODEID=1)


def test_slurm_one_task_per_node_drives_all_eight_gpus(cluster):
    """JAX alone would pin each process to GPU 0 (its local rank): 1 of 8 GPUs would train, silently."""
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=0, SLURM_TASKS_PER_NODE="1(x2)",
                SLURM_NTASKS_PER_NODE=1, SLURM_GPUS_ON_NODE=8, CUDA_VISIBLE_DEVICES=GPUS_8)
    assert jax_resolves({})[3] == [0]  # the bug: JAX's default
    launch = parallel.initialize()
    port = 4321 % 2**12 + 65535 - 2**12 + 1  # no SLURM_STEP_ID (a batch script's own step): JAX's port
    assert cluster.calls == [{"coordinator_address": f"gpu017:{port}", "num_processes": None, "process_id": None,
                              "local_device_ids": list(range(8))}]
    assert jax_resolves(cluster.calls[0]) == jax_resolves({"local_device_ids": list(range(8))})
    assert jax_resolves(cluster.calls[0]) == (f"gpu017:{port}", 2, 1, list(range(8)))
    assert cluster.config == {"jax_cpu_collectives_implementation": "gloo"}
    assert launch.cluster == "slurm"
    assert start_line(cluster).endswith(f"; launch: slurm (coordinator gpu017:{port}, port from SLURM_JOB_ID 4321 "
                                        "and no SLURM_STEP_ID), one process per host: all 8 GPUs")


def test_two_steps_of_one_slurm_allocation_get_two_coordinator_ports(cluster):
    """Two ``srun`` steps of one allocation (a sweep, or training beside evaluation), each of 2 tasks on the same
    first node: JAX alone gives both the port of the job id; jaxnets' ports differ, and JAX's detection takes them
    and fills in the rest as before."""
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_TASKS_PER_NODE="1(x2)")
    addresses, by_jax_alone = [], []
    for step in (0, 1):
        cluster.env(SLURM_STEP_ID=step)
        launch = parallel.initialize()
        addresses.append(jax_resolves(cluster.calls[-1])[0])
        by_jax_alone.append(jax_resolves({})[0])
        assert jax_resolves(cluster.calls[-1])[1:] == jax_resolves({})[1:] == (2, 0, [0])
        assert f"port from SLURM_JOB_ID 4321 and SLURM_STEP_ID {step}" in launch.describe()
    assert by_jax_alone[0] == by_jax_alone[1]  # the collision
    assert addresses[0] == by_jax_alone[0] and addresses[1] != addresses[0]
    assert all(a.startswith("gpu017:") and 61440 <= int(a.split(":")[1]) <= 65535 for a in addresses)
    cluster.env(JAX_COORDINATOR_PORT=5555)  # the user's port: JAX's to apply
    assert parallel.plan_launch().coordinator is None
    assert jax_resolves(parallel.plan_launch().initialize_kwargs())[0] == "gpu017:5555"


def test_distributed_off_runs_one_process_under_slurm_variables(cluster):
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=0, SLURM_STEP_ID=3,
                SLURM_TASKS_PER_NODE="1(x2)")
    assert parallel.detected_cluster() == "slurm"
    launch = parallel.initialize(distributed="off")
    assert cluster.calls == [] and not launch.multi_process
    assert "jax_cpu_collectives_implementation" not in cluster.config
    assert start_line(cluster).endswith("launch: single process (--distributed off: slurm environment not joined), "
                                        "all local devices")
    with pytest.raises(UserError, match=r"^--distributed off runs a single process: leave out --coordinator"):
        parallel.initialize("10.0.0.1:1234", 2, 1, distributed="off")
    with pytest.raises(UserError, match=r"^--distributed 'on': choose one of auto, off$"):
        parallel.initialize(distributed="on")
    assert cluster.calls == []


def test_evaluate_distributed_off_runs_one_process_under_slurm_variables(cluster, capsys):
    """``jaxnets-evaluate --distributed off`` inside an allocation (an ``srun -n1`` step beside training): no
    cluster is joined; the default joins the one JAX detects. (The evaluation itself stops at its missing data.)"""
    from jaxnets.cli.evaluate import main as evaluate

    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=0, SLURM_STEP_ID=3,
                SLURM_TASKS_PER_NODE="1(x2)")
    argv = ["--weights", "/nonexistent/weights.safetensors", "--dataset", "/nonexistent/data", "--no-progress"]
    assert evaluate([*argv, "--distributed", "off"]) == 1 and cluster.calls == []
    with pytest.raises(SystemExit):
        evaluate([*argv, "--distributed", "on"])
    assert "--distributed: invalid choice: 'on'" in capsys.readouterr().err
    assert evaluate(argv) == 1 and len(cluster.calls) == 1  # auto: the Slurm step's cluster


def test_slurm_one_task_per_gpu_drives_its_local_ranks_gpu(cluster):
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=16, SLURM_PROCID=11, SLURM_LOCALID=3, SLURM_TASKS_PER_NODE="8(x2)",
                SLURM_GPUS_ON_NODE=8, CUDA_VISIBLE_DEVICES=GPUS_8)
    parallel.initialize()
    assert cluster.calls[0]["local_device_ids"] == [3]
    assert jax_resolves(cluster.calls[0])[1:] == (16, 11, [3]) == jax_resolves({})[1:]  # JAX's default too
    assert start_line(cluster).endswith("SLURM_STEP_ID), one process per GPU: local rank 3 of 8 takes GPU(s) 3 of 8")


def test_slurm_gpus_bound_per_task_are_each_tasks_own(cluster):
    """srun --gpus-per-task=1: each task sees only its GPU, as device 0; JAX's default ([local rank]) would
    ask for a device the task cannot see."""
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=16, SLURM_PROCID=11, SLURM_LOCALID=3, SLURM_TASKS_PER_NODE="8(x2)",
                SLURM_GPUS_ON_NODE=8, CUDA_VISIBLE_DEVICES=3)
    parallel.initialize()
    assert cluster.calls[0]["local_device_ids"] == [0] and jax_resolves({})[3] == [3]
    # --ntasks-per-node=2 --gpus-per-task=4: each task sees its 4 of the node's 8, as devices 0-3.
    cluster.env(SLURM_LOCALID=1, SLURM_TASKS_PER_NODE="2(x2)", CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert parallel.plan_launch().local_device_ids == (0, 1, 2, 3)


def test_slurm_two_tasks_per_node_split_the_gpus(cluster):
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=4, SLURM_PROCID=3, SLURM_LOCALID=1,
                SLURM_STEP_TASKS_PER_NODE="2,2", SLURM_JOB_GPUS=GPUS_8)  # no CUDA_VISIBLE_DEVICES: Slurm's count
    parallel.initialize()
    assert cluster.calls[0]["local_device_ids"] == [4, 5, 6, 7]


@pytest.mark.parametrize("tasks, gpus", [("3", 8), ("2(x1),3", 8)])
def test_gpus_that_do_not_split_evenly_are_a_one_line_error(cluster, tasks, gpus):
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=5, SLURM_PROCID=4, SLURM_LOCALID=2, SLURM_TASKS_PER_NODE=tasks,
                SLURM_GPUS_ON_NODE=gpus)
    with pytest.raises(UserError, match=r"^inconsistent launch: 8 GPUs cannot be split evenly over the 3 processes "
                                        r"on this host; start 1, 2, 4, 8 per host, or give --local-devices$"):
        parallel.initialize()
    assert cluster.calls == []


OMPI = dict(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911", OMPI_COMM_WORLD_SIZE=4,
            OMPI_COMM_WORLD_RANK=1)


def test_open_mpi_one_process_per_host_drives_every_gpu(cluster):
    cluster.env(**OMPI, OMPI_COMM_WORLD_LOCAL_RANK=0, OMPI_COMM_WORLD_LOCAL_SIZE=1)
    cluster.gpu_files(4)  # /dev/nvidia0-3
    parallel.initialize()
    assert cluster.calls[0]["local_device_ids"] == [0, 1, 2, 3]
    coordinator, processes, process_id, local = jax_resolves(cluster.calls[0])
    assert coordinator.startswith("10.96.0.1:") and (processes, process_id, local) == (4, 1, [0, 1, 2, 3])
    assert jax_resolves({})[3] == [0]
    assert start_line(cluster).endswith("launch: ompi, one process per host: all 4 GPUs")


def test_open_mpi_one_process_per_gpu_and_per_rank_visibility(cluster):
    cluster.env(**OMPI, OMPI_COMM_WORLD_LOCAL_RANK=1, OMPI_COMM_WORLD_LOCAL_SIZE=4)
    cluster.gpu_files(4)
    assert parallel.plan_launch().local_device_ids == (1,)
    # A wrapper's CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK: the process's one GPU is its device 0.
    cluster.env(CUDA_VISIBLE_DEVICES=1)
    assert parallel.plan_launch().local_device_ids == (0,)


def test_kubernetes_indexed_job_is_detected_by_jax_and_keeps_all_devices(cluster, monkeypatch):
    """JAX bootstraps a Kubernetes Job through the ``kubernetes`` package (not installed here: a stub that
    accepts the in-cluster configuration); the old hand-written list missed it, and each pod trained alone."""
    client = types.SimpleNamespace(CoreV1Api=object, BatchV1Api=object,
                                   exceptions=types.SimpleNamespace(ApiException=Exception))
    stub = types.SimpleNamespace(config=types.SimpleNamespace(load_incluster_config=lambda: None), client=client)
    monkeypatch.setitem(sys.modules, "kubernetes", stub)
    cluster.env(KUBERNETES_SERVICE_HOST="10.0.0.1", KUBERNETES_SERVICE_PORT=443, JOB_COMPLETION_INDEX=2,
                HOSTNAME="train-2-abcde", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert parallel.detected_cluster() == "k8s"
    parallel.initialize()
    assert cluster.calls == [{"coordinator_address": None, "num_processes": None, "process_id": None}]
    from jax._src.clusters import K8sCluster
    assert K8sCluster.get_process_id() == 2 and K8sCluster.get_local_process_id() is None  # JAX: all devices
    assert start_line(cluster).endswith("launch: k8s, all local devices")


def test_kubernetes_variables_without_api_access_are_no_cluster(cluster, monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # not installed: JAX warns and cannot bootstrap
    cluster.env(KUBERNETES_SERVICE_HOST="10.0.0.1")
    with pytest.warns(UserWarning, match="kubernetes"):
        assert parallel.detected_cluster() is None


def test_processes_started_by_hand_drive_all_devices_even_inside_a_cluster(cluster):
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=1, CUDA_VISIBLE_DEVICES=GPUS_8)
    parallel.initialize("10.0.0.1:1234", 2, 1)
    kwargs = cluster.calls[0]
    assert kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
                      "cluster_detection_method": "deactivate"}
    assert jax_resolves(kwargs) == ("10.0.0.1:1234", 2, 1, None)  # None: every visible device
    assert jax_resolves({**kwargs, "cluster_detection_method": None})[3] == [1]  # what deactivate prevents
    assert start_line(cluster).endswith("launch: --coordinator, all local devices")


@pytest.mark.parametrize("flag, expected", [("0,2", [0, 2]), ("all", list(range(8)))])
def test_local_devices_flag_overrides_the_detection(cluster, flag, expected):
    cluster.env(**SLURM_TWO_NODES, SLURM_NTASKS=16, SLURM_PROCID=11, SLURM_LOCALID=3, SLURM_TASKS_PER_NODE="8(x2)",
                CUDA_VISIBLE_DEVICES=GPUS_8)
    parallel.initialize(local_devices=flag)
    assert cluster.calls[0]["local_device_ids"] == expected


def test_jax_local_device_ids_variable_is_honoured(cluster):
    cluster.env(**OMPI, OMPI_COMM_WORLD_LOCAL_RANK=0, OMPI_COMM_WORLD_LOCAL_SIZE=1, JAX_LOCAL_DEVICE_IDS="2,3")
    cluster.gpu_files(4)
    assert parallel.plan_launch().local_device_ids == (2, 3)


def test_a_single_process_is_no_cluster_and_the_flag_limits_its_gpus(cluster):
    assert parallel.initialize() == parallel.Launch(None, reason="all local devices")
    assert parallel.initialize(local_devices="1").local_device_ids == (1,)
    assert cluster.calls == []
    assert cluster.config == {"jax_cuda_visible_devices": "1", "jax_rocm_visible_devices": "1"}
    assert start_line(cluster) == ("1 cpu device(s) in 1 process(es), 1 per process, 1 global; mesh data=1; "
                                   "launch: single process, local devices 1 (--local-devices)")


@pytest.mark.parametrize("flag", ["", "gpu0", "0,0", "-1", "1;2"])
def test_bad_local_devices_flag_is_a_one_line_error_naming_it(cluster, flag):
    with pytest.raises(UserError, match=r"^--local-devices .*: expected all, auto or distinct device indices"):
        parallel.initialize(local_devices=flag)


def test_without_jax_s_private_cluster_list_known_variables_still_count(cluster, monkeypatch):
    from jax._src import clusters
    monkeypatch.delattr(clusters.ClusterEnv, "_cluster_types")
    assert parallel.detected_cluster() is None
    cluster.env(OMPI_MCA_orte_hnp_uri="1.0;tcp://10.0.0.1:1")
    assert parallel.detected_cluster() == "ompi"


def test_devices_per_process_must_agree():
    device = lambda process: types.SimpleNamespace(process_index=process)
    parallel.check_topology([device(0), device(0), device(1), device(1)], 2)
    with pytest.raises(UserError, match=r"^inconsistent launch: processes drive different numbers of devices "
                                        r"\(process 0: 2, process 1: 1\)"):
        parallel.check_topology([device(0), device(0), device(1)], 2)
    with pytest.raises(UserError, match=r"process 0: 1, process 1: 0\)"):
        parallel.check_topology([device(0)], 2)


# Two real processes (gloo), one with 1 CPU device and one with 2: both must stop with the same one line.
UNEVEN_WORKER = """
import sys
from jaxnets import errors, parallel
def run():
    parallel.initialize(sys.argv[1], 2, int(sys.argv[2]))
    parallel.make_mesh()
    return 0
sys.exit(errors.run_cli("worker", run))
"""


@pytest.mark.xdist_group("multiprocess")
def test_uneven_devices_per_process_stop_every_process_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, "-c", UNEVEN_WORKER, f"localhost:{port}", str(i)], cwd=ROOT,
                                  env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(i + 1)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=180)
        assert process.returncode == 1, err
        assert err.strip().splitlines()[-1] == ("worker: error: inconsistent launch: processes drive different "
                                                "numbers of devices (process 0: 1, process 1: 2); start the same "
                                                "number of processes on every host, or give --local-devices")


def test_train_command_reports_a_bad_local_devices_flag_in_one_line(cluster, capsys, monkeypatch, tmp_path):
    from jaxnets import host
    from jaxnets.cli import train

    monkeypatch.setattr(host, "retain_freed_memory", lambda: False)  # process-wide: not in a test
    assert train.main(["--local-devices", "gpu0", "--workdir", str(tmp_path / "run")], prog="train.py") == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "train.py: error: --local-devices 'gpu0': expected all, auto or distinct device indices such as 0,1,2,3"]

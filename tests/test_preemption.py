"""Preemption of a 2-process run (gloo, 1 CPU device each): a SIGTERM that reaches one process, or both, at any
moment stops every process at the same step; each saves and returns 128 + the signal, and the same command resumes
to weights bit-identical to an uninterrupted 2-process run. A lock refused to process 0, and a process that sees
another workdir, stop both processes with one line each.

One pair of processes serves every case: each worker runs ``train.py``'s ``main`` once per case (the command a user
runs, with its exit status and stderr), so the cluster starts and the train step compiles once. The signals are
real (``os.kill`` of the worker itself), sent at an exact point by a hook (``STOPS``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxnets import locks
from jaxnets.final_weights import FINAL_WEIGHTS
from jaxnets.run_io import METRICS_FILE, read_metrics

ROOT = Path(__file__).resolve().parents[1]
# 2 classes of the digits at 16 px, batches of 48: 6 steps an epoch, 2 epochs; logged (and so stop-checked) every 2
# steps. (16 px is ill-conditioned for comparing reduction orders, test_parallel.py; here every run has the same.)
RUN = ["--model", "resnet18", "--classes", "0,1", "--image-size", "16", "--batch-size", "48", "--epochs", "2",
       "--log-every", "2", "--no-progress", "--keep-checkpoints", "1"]
STEPS_PER_EPOCH, STEPS = 6, 12
STOP_BOUND_S = 60.0  # from the signal to every process's return; measured 6-21 s at load 5-10 on 2 cores
WORKER_TIMEOUT_S = 400
INTERRUPTED = 128 + signal.SIGTERM
WORKER = """
import contextlib, faulthandler, io, json, os, signal, sys, time
from jaxnets import evaluation, training
faulthandler.register(signal.SIGUSR1)  # the test's timeout asks for every thread's stack
from jaxnets.cli import train

process = int(sys.argv[2])
results = []
for case in json.loads(sys.argv[1]):
    argv, trigger, sent = case["argv"][process], case["signal"][process], {}
    validate, make_train_step = evaluation.validate, training.make_train_step
    save_final_weights = training.save_final_weights

    def kill():  # a SIGTERM, and a second signal at once
        sent.setdefault("at", time.time())
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)

    def hooked_save_final_weights(*args, **kwargs):
        kill()
        return save_final_weights(*args, **kwargs)

    def hooked_validate(*args, **kwargs):
        if not sent:
            kill()
        return validate(*args, **kwargs)

    def hooked_make_train_step(*args, **kwargs):
        step, calls = make_train_step(*args, **kwargs), []

        def counted(state, batch):
            calls.append(1)
            if len(calls) == trigger:
                kill()
            return step(state, batch)
        return counted

    if trigger == "validate":
        evaluation.validate = hooked_validate
    elif trigger == "final weights":
        training.save_final_weights = hooked_save_final_weights
    elif trigger is not None:
        training.make_train_step = hooked_make_train_step
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = train.main(argv, prog="train.py")
    results.append({"status": status, "stderr": err.getvalue(), "signalled": sent.get("at"), "returned": time.time()})
    evaluation.validate, training.make_train_step = validate, make_train_step
    training.save_final_weights = save_final_weights
    print("CASE DONE", case["name"], status, flush=True)
print("RESULTS " + json.dumps(results))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _argv(tmp: Path, name: str, process: int, port: int, workdir: Path | None = None) -> list[str]:
    return [*RUN, "--workdir", str(workdir or tmp / name), "--compile-cache", str(tmp / "cache"), "--coordinator",
            f"localhost:{port}", "--num-processes", "2", "--process-id", str(process)]


def _case(tmp: Path, name: str, port: int, signals=(None, None), workdirs=(None, None)) -> dict:
    return {"name": name, "signal": list(signals),
            "argv": [_argv(tmp, name.split(":")[0], p, port, workdirs[p]) for p in range(2)]}


# One run stopped three times, resumed each time: process 0 signalled as its first validation begins (end of epoch
# 1, step 6: the stop comes after the validation, its save and plot), then process 1 alone before its first step of
# the resumed run (step 7: stopped at the next logged step, 8), then both before step 9 (stopped at 10); the last
# resume finishes. Each signal is a SIGTERM followed at once by a SIGINT. Any stop that lost or repeated a step, or a
# resume that was not exact, changes the final weights.
STOPS = [("validating", ("validate", None), STEPS_PER_EPOCH), ("one", (None, 1), 8), ("both", (1, 1), 10)]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> dict:
    """Both workers' results, by case name, as [process 0's, process 1's]; and their output. Session-scoped: the
    xdist group these tests share may interleave another module's test, which would rebuild a module fixture."""
    tmp = tmp_path_factory.mktemp("preemption")
    port = _free_port()
    elsewhere = tmp / "elsewhere" / "notshared"  # process 1's "own disk": a directory of its own
    elsewhere.mkdir(parents=True)
    cases = [_case(tmp, "locked", port), _case(tmp, "notshared", port, workdirs=(tmp / "notshared", elsewhere)),
             _case(tmp, "reference", port)]
    cases += [_case(tmp, f"stopped:{name}", port, signals=signals) for name, signals, _ in STOPS]
    # The last resume finishes, with both signals to process 0 as it writes its final weights: they are written.
    cases.append(_case(tmp, "stopped:finished", port, signals=("final weights", None)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "JAXNETS_ALLOCATOR": "glibc"}
    logs = [tmp / f"process{p}.log" for p in range(2)]  # files, not pipes: a full pipe would stall its process
    with locks.hold(tmp / "locked"), open(logs[0], "w") as log0, open(logs[1], "w") as log1:
        workers = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cases), str(p)], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT) for p, log in enumerate((log0, log1))]
        try:
            for w in workers:
                w.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.send_signal(signal.SIGUSR1)  # their stacks into the logs, for the failure below
            time.sleep(2)
        finally:
            for w in workers:
                w.kill()
                w.wait()
    outputs = [log.read_text() for log in logs]
    for workdir in ("reference", "stopped"):  # ~80 MB each, read by no test: the suite's disk stays small
        shutil.rmtree(tmp / workdir / "checkpoints", ignore_errors=True)
    for w, output in zip(workers, outputs, strict=True):
        assert w.returncode == 0, output[-6000:]
    results = [json.loads(o.split("RESULTS ", 1)[1].splitlines()[0]) for o in outputs]
    return {"tmp": tmp, "outputs": outputs,
            "results": {c["name"]: [results[0][i], results[1][i]] for i, c in enumerate(cases)}}


def _weights(workdir: Path) -> dict[str, np.ndarray]:
    return load_file(workdir / FINAL_WEIGHTS)


def _val_records(workdir: Path) -> list[dict]:
    return [r for r in read_metrics(workdir / METRICS_FILE) if r["split"] == "val"]


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("case, stop_step", [(name, step) for name, _, step in STOPS])
def test_a_stop_on_any_process_stops_both_at_one_step(cluster, case, stop_step):
    """Process 0 stopped while it validates, process 1 alone mid-epoch, both at once: both return 128 + SIGTERM
    within ``STOP_BOUND_S`` of the signal, after saving the same step. (Both: of the later one; the hook signals each
    process at its own step 9, and one process may reach it well before the other.)"""
    stopped = cluster["results"][f"stopped:{case}"]
    signalled = max(r["signalled"] for r in stopped if r["signalled"] is not None)
    for result in stopped:
        assert result["status"] == INTERRUPTED, result["stderr"]
        assert result["returned"] - signalled < STOP_BOUND_S
    assert f"stopped by SIGTERM at step {stop_step}: checkpoint saved" in cluster["outputs"][0]
    assert f"resumed from step {stop_step} (" in cluster["outputs"][0]  # the next run, from that checkpoint


@pytest.mark.xdist_group("multiprocess")
def test_the_same_command_resumes_bit_identically_to_an_uninterrupted_run(cluster):
    """After the three stops, the run's final weights and validation records are the uninterrupted run's, bit for
    bit; the signals that came while process 0 wrote the final weights neither cut them short nor failed the run."""
    tmp, results = cluster["tmp"], cluster["results"]
    assert all(r["status"] == 0 for r in results["stopped:finished"] + results["reference"])
    reference, resumed = _weights(tmp / "reference"), _weights(tmp / "stopped")
    assert reference.keys() == resumed.keys() and len(reference) > 50
    for key, value in reference.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    assert [r["step"] for r in _val_records(tmp / "reference")] == [STEPS_PER_EPOCH, STEPS]
    assert _val_records(tmp / "stopped") == _val_records(tmp / "reference")
    # Each stop's training records were written once: none lost, none repeated.
    logged = [r["step"] for r in read_metrics(tmp / "stopped" / METRICS_FILE) if r["split"] == "train"]
    assert logged == [r["step"] for r in read_metrics(tmp / "reference" / METRICS_FILE) if r["split"] == "train"]


@pytest.mark.xdist_group("multiprocess")
def test_a_lock_refused_to_process_0_stops_both_with_one_line(cluster):
    lines = [r["stderr"].strip().splitlines() for r in cluster["results"]["locked"]]
    assert [r["status"] for r in cluster["results"]["locked"]] == [1, 1]
    assert lines[0] == lines[1] and len(lines[0]) == 1
    assert lines[0][0].startswith(f"train.py: error: --workdir {cluster['tmp'] / 'locked'} is in use by another "
                                  f"process (host {socket.gethostname()}, pid {os.getpid()}")


@pytest.mark.xdist_group("multiprocess")
def test_a_process_that_sees_another_workdir_stops_both_with_one_line(cluster):
    """Process 1's workdir is another directory than process 0's (a per-host disk): the line names its host and the
    path it sees, on both processes, and process 0's workdir is left as it was (empty but for the lock file)."""
    tmp = cluster["tmp"]
    lines = [r["stderr"].strip().splitlines() for r in cluster["results"]["notshared"]]
    assert [r["status"] for r in cluster["results"]["notshared"]] == [1, 1]
    assert lines[0] == lines[1] == [
        f"train.py: error: --workdir {tmp / 'elsewhere' / 'notshared'} is not shared: process 1 on host "
        f"{socket.gethostname()} sees a different directory: not the file process 0 wrote there; every process of "
        "a run must see the same directory (a filesystem all hosts mount)"]
    assert not (tmp / "notshared").exists()  # a failed start removes what it created

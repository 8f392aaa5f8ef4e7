"""The data-parallel train step is exact: in float64, 1 device, 8 devices and 2 processes x 2 devices give
the same losses and parameters to ~1e-12. (In float32 they differ by ~1e-3 after a few steps: reduction order
changes the rounding, and a few SGD steps on a random ResNet amplify it; see test_parallel.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# argv: out.npz, number of mesh devices (0 = all), [coordinator, num_processes, process_id]
WORKER = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
from jaxnets import create_model, parallel, train_step
out, devices, *cluster = sys.argv[1:]
if cluster:
    parallel.initialize(cluster[0], int(cluster[1]), int(cluster[2]))
mesh = parallel.make_mesh(int(devices) or None)
model = create_model("resnet18", num_classes=3, dtype=jnp.float64)
variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
state = train_step.create_train_state(model, variables, optax.sgd(0.1, momentum=0.9), mesh)
step = train_step.make_train_step(mesh, label_smoothing=0.1)
rng = np.random.default_rng(0)
losses = []
for _ in range(3):
    images, labels = rng.standard_normal((16, 32, 32, 3)), rng.integers(0, 3, 16).astype(np.int32)
    share = 16 // jax.process_count()
    local = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
    state, metrics = step(state, parallel.to_global({"image": images[local], "label": labels[local]}, mesh))
    losses.append(float(metrics["loss"]))
if jax.process_index() == 0:
    np.savez(out, losses=np.array(losses), *jax.tree.leaves(parallel.to_host(state.params)),
             *jax.tree.leaves(parallel.to_host(state.batch_stats)))
print("devices", mesh.devices.size, "processes", jax.process_count())
"""


def _launch(args: list[str], devices: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"}
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _assert_equal_runs(a: Path, b: Path) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert x.files == y.files and len(x.files) > 100
        for key in x.files:
            np.testing.assert_allclose(x[key], y[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_float64_one_eight_devices_and_two_processes_train_identically(tmp_path):
    port = _free_port()
    two = [_launch([str(tmp_path / "two.npz"), "0", f"localhost:{port}", "2", str(i)], devices=2) for i in range(2)]
    one = _launch([str(tmp_path / "one.npz"), "1"], devices=8)
    assert "devices 1 processes 1" in _finish(one)
    eight = _launch([str(tmp_path / "eight.npz"), "8"], devices=8)
    assert "devices 4 processes 2" in _finish(two[0]) + _finish(two[1])
    assert "devices 8 processes 1" in _finish(eight)
    _assert_equal_runs(tmp_path / "one.npz", tmp_path / "eight.npz")
    _assert_equal_runs(tmp_path / "one.npz", tmp_path / "two.npz")

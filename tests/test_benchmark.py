"""The benchmark runs and reports sane numbers on a tiny model. It does not judge speed: that is the
benchmark's own job, in one run against torchvision, never a timed unit test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision

from jaxnets import get_spec
from jaxnets.benchmark import models as benchmark

TINY = dict(batch_size=2, image_size=32)


def test_flops_match_torchvision_metadata():
    """XLA's cost analysis counts 2 FLOPs per multiply-add, torchvision's 'GFLOPS' are multiply-adds;
    XLA skips the taps that fall on zero padding (7% of ResNet-18's at 224 px), torchvision does not."""
    images, labels = benchmark.synthetic_batch(1, 224)
    setup = benchmark.setup_jax("resnet18", "infer", images, labels, jax.numpy.float32)
    flops = benchmark.compiled_flops(setup.compiled)
    torchvision_flops = 2 * get_spec("resnet18").weights.gflops * 1e9
    assert 0.9 * torchvision_flops < flops <= torchvision_flops


def test_train_and_infer_report_sane_numbers():
    train, infer = (benchmark.benchmark_model("resnet18", mode, **TINY, iters=1, warmup=1,
                                              compare_torch=mode == "train", peak_size=256)
                    for mode in ("train", "infer"))
    for r in (train, infer):
        assert r.step_s > 0 and r.images_per_s == pytest.approx(2 / r.step_s)
        assert 0 < r.peak_fraction < 2 and r.step_memory_bytes > 0 and r.compile_s > 0
    assert infer.torch_step_s is None and infer.ratio is None
    assert train.torch_step_s > 0 and train.ratio == pytest.approx(train.images_per_s / train.torch_images_per_s)
    # Same FLOPs for both libraries: the fractions of peak stand in the ratio of the speeds.
    assert infer.torch_peak_fraction is None
    assert train.peak_fraction / train.torch_peak_fraction == pytest.approx(train.ratio)
    # The backward pass costs about twice the forward pass.
    assert 2.5 < train.flops / infer.flops < 3.5


def test_train_step_learns_and_probe_step_only_changes_the_head():
    images, labels = benchmark.synthetic_batch(4, 32, num_classes=10)
    setups = {mode: benchmark.setup_jax("resnet18", mode, images, labels, jax.numpy.float32, learning_rate=0.05)
              for mode in ("train", "probe")}
    # Copies, since the steps donate their input buffers.
    variables = lambda setup: jax.tree.map(np.array, {"params": setup.state().params,
                                                      "batch_stats": setup.state().batch_stats})
    before = variables(setups["train"])
    for setup in setups.values():
        losses = [float(setup.call()) for _ in range(3)]
        assert losses[-1] < losses[0]

    train = variables(setups["train"])
    assert not np.allclose(before["params"]["conv1"]["kernel"], train["params"]["conv1"]["kernel"])
    assert not np.allclose(before["batch_stats"]["bn1"]["mean"], train["batch_stats"]["bn1"]["mean"])

    probe = variables(setups["probe"])  # same seed: started from the same variables
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["params"], probe["params"])
    assert changed.pop("fc") == {"kernel": True, "bias": True}
    assert not any(jax.tree.leaves(changed))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before["batch_stats"], probe["batch_stats"])))
    # A linear probe never differentiates through the frozen backbone: XLA drops its backward pass.
    flops = {mode: benchmark.compiled_flops(setup.compiled) for mode, setup in setups.items()}
    assert flops["probe"] < 0.4 * flops["train"]


def test_torch_probe_freezes_all_but_the_head():
    model = torchvision.models.googlenet(weights=None, init_weights=True)
    model.train()
    benchmark._freeze_torch_backbone(model, get_spec("googlenet").head)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc", "aux1", "aux2"}
    bn_training = {n.split(".")[0] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.BatchNorm2d) and m.training}
    assert bn_training == {"aux1", "aux2"}


def test_persistent_cache_makes_the_second_run_skip_compilation(tmp_path):
    times = benchmark.compile_cache_times("resnet18", "infer", **TINY, cache_dir=tmp_path)
    assert times["cold"]["cache_hits"] == 0 and times["cold"]["cache_misses"] >= 2  # init and the step
    assert times["warm"]["cache_misses"] == 0 and times["warm"]["cache_hits"] == times["cold"]["cache_misses"]


def test_input_pipeline_is_train_py_s_and_delivers_batches(tmp_path):
    root = benchmark.write_image_folder(tmp_path, count=8, size=48)
    result = benchmark.input_pipeline_throughput(root, batch_size=4, image_size=32, epochs=1)
    assert result["images_per_s"] > 0 and result["cores"] >= 1
    assert result["images_per_s_per_core"] == pytest.approx(result["images_per_s"] / result["cores"])
    generated = benchmark.input_pipeline_throughput(None, batch_size=4, image_size=32, epochs=1)
    assert generated["source"] == "256 generated 32px JPEGs"


def test_cli_writes_report_and_json(tmp_path, monkeypatch):
    # The CLI configures process-wide JAX state: keep it out of the other tests in this process.
    caches = []
    monkeypatch.setattr(benchmark.training, "setup_compilation_cache", caches.append)
    monkeypatch.setenv("XLA_FLAGS", "")
    out, js = tmp_path / "bench.md", tmp_path / "bench.json"
    code = benchmark.main(["--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--mode", "infer",
                           "--iters", "1", "--warmup", "0", "--skip-cache-check", "--skip-input-pipeline",
                           "--system-malloc",  # the allocator setting is process-wide too
                           "--cache-dir", str(tmp_path / "cache"), "--output", str(out), "--json", str(js)])
    assert code == 0 and caches == [str(tmp_path / "cache")]
    text = out.read_text()
    assert "| resnet18 | infer | 2 | 32 | float32 |" in text and "Command: `python -m jaxnets.benchmark" in text
    assert "Host allocator, for both libraries: glibc defaults." in text
    data = json.loads(js.read_text())
    assert data["results"][0]["model"] == "resnet18" and data["results"][0]["images_per_s"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet9"], "--model: unknown model 'resnet9'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--data-dir", "/nonexistent/jpegs"], "--data-dir: /nonexistent/jpegs is not a directory"),
    (["--model", "alexnet", "--image-size", "32"], "--image-size 32: alexnet needs at least 63 px"),
    (["--model", "vgg11", "--image-size", "8"], "--image-size 8: vgg11 needs at least 32 px"),
    # torchvision's layers fail below the minimum too: --conv-layers is no exception.
    (["--model", "vgg11", "--image-size", "8", "--conv-layers"], "vgg11 needs at least 32 px"),
    (["--all", "--image-size", "32"], "alexnet needs at least 63 px"),
    (["--output", "/nonexistent/x.md"], "--output: /nonexistent/x.md cannot be written: folder /nonexistent does "
                                        "not exist"),
    (["--json", "/"], "--json: / is a directory"),
])
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_data_dir_without_images_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark.training, "setup_compilation_cache", lambda directory: None)
    monkeypatch.setattr(benchmark, "benchmark_model", lambda *args: pytest.fail("the folder is checked first"))
    (tmp_path / "cat").mkdir()
    assert benchmark.main(["--data-dir", str(tmp_path), "--skip-cache-check", "--system-malloc"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("python -m jaxnets.benchmark: error: ") and "no readable" in errors[-1], errors


def test_too_small_image_is_one_line_and_exit_status_2_before_any_timing(tmp_path):
    """As a user runs it: argparse's one line, no traceback, and no minutes of timing first."""
    done = subprocess.run([sys.executable, "-m", "jaxnets.benchmark", "--model", "alexnet", "--image-size", "32",
                           "--system-malloc", "--json", str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1] == "python -m jaxnets.benchmark: error: --image-size 32: alexnet needs at least 63 px"


def test_output_paths_are_checked_before_the_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "benchmark_model", lambda *args: pytest.fail("the paths are checked first"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--model", "resnet18", "--json", str(tmp_path), "--skip-cache-check",
                        "--skip-input-pipeline", "--system-malloc"])
    assert exit_info.value.code == 2
    assert f"--json: {tmp_path} is a directory" in capsys.readouterr().err


def test_a_late_write_error_keeps_the_printed_report_and_the_other_file(tmp_path, capsys, monkeypatch):
    """A folder that vanishes during the run: one line, exit 1, the report on stdout and the JSON written."""
    monkeypatch.setattr(benchmark.training, "setup_compilation_cache", lambda directory: None)
    monkeypatch.setenv("XLA_FLAGS", "")
    gone = tmp_path / "gone"
    gone.mkdir()
    timed = benchmark.benchmark_model

    def benchmark_model(*args):
        os.rmdir(gone)
        return timed(*args, peak_size=256)
    monkeypatch.setattr(benchmark, "benchmark_model", benchmark_model)
    js = tmp_path / "bench.json"
    code = benchmark.main(["--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--mode", "infer",
                           "--iters", "1", "--warmup", "0", "--skip-cache-check", "--skip-input-pipeline",
                           "--system-malloc", "--output", str(gone / "bench.md"), "--json", str(js)])
    captured = capsys.readouterr()
    assert code == 1 and "| resnet18 | infer | 2 | 32 | float32 |" in captured.out
    assert captured.err.strip().splitlines() == [
        f"python -m jaxnets.benchmark: error: --output: cannot write {gone / 'bench.md'}: No such file or directory"]
    assert json.loads(js.read_text())["results"][0]["model"] == "resnet18"

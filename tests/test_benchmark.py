"""The benchmark runs and reports sane numbers on a tiny model. It does not judge speed: that is the
benchmark's own job, in one run against torchvision, never a timed unit test."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision

from jaxnets import get_spec, kernels
from jaxnets.benchmark import gpu, kernel_choice
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
        # The fraction is its definition; no bound on it: at these sizes (a 256 peak matmul, one timed step) a
        # busy core (the other test worker) moves either timing by several times.
        assert r.peak_flops > 0 and r.peak_fraction == pytest.approx(r.flops / r.step_s / r.peak_flops)
        assert r.peak_fraction > 0 and r.step_memory_bytes > 0 and r.compile_s > 0
    assert infer.torch_step_s is None and infer.ratio is None
    assert train.torch_step_s > 0 and train.ratio == pytest.approx(train.images_per_s / train.torch_images_per_s)
    # Same FLOPs for both libraries: the fractions of peak stand in the ratio of the speeds.
    assert infer.torch_peak_fraction is None
    assert train.peak_fraction / train.torch_peak_fraction == pytest.approx(train.ratio)
    # The backward pass costs about twice the forward pass, plus elementwise work (BatchNorm's backward, the
    # optimizer), a larger share at 32 px where the 1x1 maps' convolutions are only their centre taps.
    assert 2.5 < train.flops / infer.flops < 4.0


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
    monkeypatch.setattr(benchmark.host, "setup_compilation_cache", caches.append)
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


def test_remat_option_compares_the_train_step_with_and_without_gradient_checkpointing(tmp_path, monkeypatch):
    """``--remat``: both steps in one report, ratios of the two; the remat step really keeps fewer temporaries
    (XLA's memory analysis of each compiled step: without the checkpointing the ratio would be 1)."""
    monkeypatch.setattr(benchmark.host, "setup_compilation_cache", lambda _: None)
    monkeypatch.setenv("XLA_FLAGS", "")
    out, js = tmp_path / "remat.md", tmp_path / "remat.json"
    code = benchmark.main(["--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--remat", "--iters",
                           "1", "--warmup", "0", "--system-malloc", "--skip-cache-check", "--skip-input-pipeline",
                           "--output", str(out), "--json", str(js)])
    assert code == 0
    text, data = out.read_text(), json.loads(js.read_text())
    (result,) = data["results"]
    rows = {label: [cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            for label in ("without remat", "with remat", "ratio remat/plain") if f"| resnet18 | {label} |" in line}
    assert rows.keys() == {"without remat", "with remat", "ratio remat/plain"}
    assert "policy nothing_saveable" in text and "--remat" in data["context"]["command"]
    for key, label in (("plain", "without remat"), ("remat", "with remat")):
        mib = [result[f"{key}_{kind}_bytes"] / 2**20 for kind in ("step", "temp")]
        assert rows[label][5:7] == [f"{value:.0f}" for value in mib]
        assert result[f"{key}_step_s"] > 0
    assert result["remat_temp_bytes"] < result["plain_temp_bytes"]
    assert result["temp_ratio"] == pytest.approx(result["remat_temp_bytes"] / result["plain_temp_bytes"])
    assert result["time_ratio"] == pytest.approx(result["remat_step_s"] / result["plain_step_s"])
    assert rows["ratio remat/plain"][5:8] == [f"{result[k]:.2f}" for k in ("memory_ratio", "temp_ratio", "time_ratio")]


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet9"], "--model: unknown model 'resnet9'"),
    (["--remat", "--mode", "infer"], "--remat compares train steps: --mode infer cannot go with it"),
    (["--remat", "--compare-torch"], "--remat cannot go with --compare-torch"),
    (["--keep-cpu-cse"], "--keep-cpu-cse applies to --remat only"),
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
    assert exit_info.value.code == 1 and message in capsys.readouterr().err


def test_data_dir_without_images_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark.host, "setup_compilation_cache", lambda directory: None)
    monkeypatch.setattr(benchmark, "benchmark_model", lambda *args: pytest.fail("the folder is checked first"))
    (tmp_path / "cat").mkdir()
    assert benchmark.main(["--data-dir", str(tmp_path), "--skip-cache-check", "--system-malloc"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("python -m jaxnets.benchmark: error: ") and "no readable" in errors[-1], errors


def test_too_small_image_is_one_line_and_exit_status_1_before_any_timing(tmp_path):
    """As a user runs it: argparse's one line, no traceback, and no minutes of timing first."""
    done = subprocess.run([sys.executable, "-m", "jaxnets.benchmark", "--model", "alexnet", "--image-size", "32",
                           "--system-malloc", "--json", str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1] == "python -m jaxnets.benchmark: error: --image-size 32: alexnet needs at least 63 px"


def test_output_paths_are_checked_before_the_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "benchmark_model", lambda *args: pytest.fail("the paths are checked first"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--model", "resnet18", "--json", str(tmp_path), "--skip-cache-check",
                        "--skip-input-pipeline", "--system-malloc"])
    assert exit_info.value.code == 1
    assert f"--json: {tmp_path} is a directory" in capsys.readouterr().err


def test_a_late_write_error_keeps_the_printed_report_and_the_other_file(tmp_path, capsys, monkeypatch):
    """A folder that vanishes during the run: one line, exit 1, the report on stdout and the JSON written."""
    monkeypatch.setattr(benchmark.host, "setup_compilation_cache", lambda directory: None)
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


def test_report_names_the_cpu_s_vector_extensions_and_the_kernel_variants_that_ran(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark.host, "setup_compilation_cache", lambda directory: None)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(kernels.ENV_VARIABLE, "tuned")  # the default that --kernels overrides, for the run only
    out = tmp_path / "bench.md"
    assert benchmark.main(["--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--mode", "infer",
                           "--iters", "1", "--warmup", "0", "--skip-cache-check", "--skip-input-pipeline",
                           "--system-malloc", "--kernels", "xla", "--output", str(out)]) == 0
    text = out.read_text()
    assert f"CPU vector extensions: {kernels.vector_extensions()}. " in text
    assert ("jaxnets kernels: 1x1 conv as conv, reduce_window max pool, autodiff BatchNorm grad, conv of <=2x2 "
            "maps as conv, YNNPACK convolutions (--kernels=xla).") in text
    assert os.environ[kernels.ENV_VARIABLE] == "tuned" and kernels.current().tuned == set(kernels.VARIANTS)


def test_the_cache_check_s_fresh_processes_build_under_this_process_s_kernel_choice(monkeypatch):
    commands = []

    def child(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, json.dumps({"first_step_s": 1.0}), "")
    monkeypatch.setattr(benchmark.subprocess, "run", child)
    with kernels.using("maxpool_jvp,eigen_conv"):
        benchmark.compile_cache_times("resnet18", "infer", **TINY)
    assert len(commands) == 2 and all(c[-2:] == ["--kernels", "maxpool_jvp,eigen_conv"] for c in commands)


def test_bad_kernels_flag_is_argparse_s_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--kernels", "fastest"])
    assert exit_info.value.code == 1
    assert "error: --kernels='fastest': expected auto" in capsys.readouterr().err


# --- the one-shot GPU check (--suite gpu) ---------------------------------------------------------------------


@pytest.mark.parametrize("kind, chip", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                        ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                        ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA GH200 480GB", "GH200"),
                                        ("NVIDIA H100 NVL", None), ("NVIDIA A10G", None), ("cpu", None)])
def test_known_chips_and_their_published_peaks(kind, chip):
    found = gpu.chip_peak(kind)
    assert (found[0] if found else None) == chip
    if chip == "H100 SXM":
        assert found[1] == (989.4, 494.7, 66.9)  # NVIDIA's H100 SXM datasheet, dense
        assert gpu.peak_flops(found[1], "bfloat16") == 989.4e12 and gpu.peak_flops(found[1], "float32") == 494.7e12


def test_mfu_and_ratio_of_a_row():
    row = gpu.Row("resnet50 train", "bfloat16", 256, 224, images_per_s=4000.0, flops=256 * 24.6e9,
                  torch_eager=3000.0, torch_compiled=3200.0)
    assert row.mfu((1000.0, 500.0, 60.0)) == pytest.approx(4000 * 24.6e9 / 1e15)
    assert row.ratio == pytest.approx(4000 / 3200)  # against the faster torchvision
    assert row.mfu(None) is None and gpu.Row("x").ratio is None


def test_largest_batch_from_the_memory_analysis():
    """A state of 1 GiB and 100 MiB per image in an 80 GiB device: (0.9 x 80 - 1) / 0.1 GiB, down to a
    multiple of 8."""
    gib = 2**30
    assert gpu.largest_batch(step_bytes=gib + 256 * gib // 10, state_bytes=gib, batch=256, limit=80 * gib) == 704
    assert gpu.largest_batch(step_bytes=gib, state_bytes=gib, batch=256, limit=80 * gib) is None


def test_suite_flag_dispatches_and_an_unknown_suite_is_an_error(capsys):
    from jaxnets.cli import benchmark as cli
    assert cli.split_suite(["--model", "x", "--suite", "gpu", "--tiny"]) == ("gpu", ["--model", "x", "--tiny"])
    assert cli.split_suite(["--suite=kernels"]) == ("kernels", [])
    assert cli.split_suite(["--iters", "2"]) == ("models", ["--iters", "2"])
    assert cli.main(["--suite", "nope"]) == 1
    assert "--suite: unknown suite 'nope'" in capsys.readouterr().err


def test_gpu_check_runs_end_to_end_at_tiny_sizes_on_a_cpu(tmp_path, monkeypatch):
    """The whole script, as one run on a GPU machine does it, at toy sizes: every row filled or saying why not.
    (It sets the process's compilation cache: conftest puts it back.)"""
    for key, value in gpu.GPU_ENVIRONMENT.items():  # set by the script for the process: restored after
        monkeypatch.setenv(key, value)
    out, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--model", "resnet18", "--models", "resnet18", "--dtypes", "bfloat16",
                     "--system-malloc", "--output", str(out), "--json", str(js)]) == 0
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| measurement | dtype | batch | px | jaxnets img/s | MFU | torchvision eager")
    rows = {r["what"]: r for r in json.loads(js.read_text())["rows"]}
    headline = rows["resnet18 train (headline)"]
    assert headline["images_per_s"] > 0 and headline["torch_eager"] > 0 and headline["flops"] > 0
    warm = rows["resnet18 train: compile, cold / warm persistent cache"]["notes"][0]
    assert re.search(r"warm: compile [0-9.]+ s, first step [0-9.]+ s after building the model, [1-9][0-9]* "
                     r"executables from the cache", warm), warm
    assert rows["resnet18 train"]["notes"] == ["as the headline"]  # measured once
    assert rows["resnet18 infer"]["images_per_s"] > 0 and rows["resnet18 infer"]["torch_eager"] > 0
    pipeline = next(r for what, r in rows.items() if what.startswith("input pipeline"))
    assert pipeline["images_per_s"] > 0
    assert rows["resnet18 train, largest batch that fits"]["notes"] == [
        "not measured: no device memory limit on a CPU"]
    assert "no published peak known for 'cpu': MFU not given" in text and len(table) == 1 + len(rows)  # + header


# --- the kernel-variant measurement (--suite kernels) -----------------------------------------------------------


def test_kernel_suite_tabulates_median_per_round_ratios():
    settings = kernel_choice.kernel_settings()
    assert settings["tuned"] == "tuned" and settings["xla"] == "xla" and len(settings) == 2 + len(kernels.VARIANTS)
    assert settings["tuned - eigen_conv"] == "matmul_1x1,maxpool_jvp,batchnorm_vjp,small_map_matmul"
    # Three rounds; the machine slows down in the third: the ratios of a round hold.
    times = {"tuned": [1.0, 1.0, 2.0], "xla": [2.0, 2.0, 4.0], "torch": [1.5, 1.0, 3.0]}
    text = kernel_choice.table({"avx2": {"train": times, "infer": times}}, ["tuned", "xla"])
    assert "| avx2 | tuned | 1000 | 1.50 | 1.00-1.50 | 1.00 | 1000 | 1.50 | 1.00-1.50 | 1.00 | 1500 | 1500 |" in text
    assert "| avx2 | xla | 2000 | 0.75 | 0.50-0.75 | 0.50 |" in text


def test_kernel_suite_child_runs_limited_to_avx2_with_the_settings_asked_for(monkeypatch):
    """One child per CPU limit, given both libraries' ISA limits (that a child's report then names them:
    test_cpu_class_from_flags_and_xla_s_isa_limit)."""
    seen = {}

    def child(command, env, **kwargs):
        seen.update(command=command, env=env)
        return subprocess.CompletedProcess(command, 0, "a warning\n" + json.dumps({"train": {}}), "")
    monkeypatch.setattr(kernel_choice.subprocess, "run", child)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    args = kernel_choice.parse_args(["--model", "resnet18", "--iters", "2", "--settings", "tuned+xla"], "test")
    assert kernel_choice.run_child("avx2", args) == {"train": {}}
    assert seen["command"][1:] == ["-m", "jaxnets.benchmark", "--suite", "kernels", "--child", "--model", "resnet18",
                                   "--batch-size", "16", "--image-size", "224", "--iters", "2", "--warmup", "1",
                                   "--settings", "tuned+xla"]
    assert seen["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1 --xla_cpu_max_isa=AVX2"
    assert seen["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_kernel_suite_times_each_setting_as_traced_under_it(monkeypatch):
    """In one process, each setting's step is built under its own choice (``kernels.using``), which the report
    names: the variants really differ; the process default is left as it was."""
    monkeypatch.delenv(kernels.ENV_VARIABLE, raising=False)
    monkeypatch.setattr(kernel_choice, "MODES", ("infer",))  # training steps are built the same way, slower
    args = kernel_choice.parse_args(["--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--iters", "1",
                                     "--warmup", "0"], "test")
    result = kernel_choice.measure(["tuned", "xla"], args)
    assert set(result["infer"]) == {"tuned", "xla", "torch"} and "train" not in result
    assert all(len(t) == 1 and t[0] > 0 for t in result["infer"].values())
    assert result["context"]["kernels"]["xla"].endswith("(--kernels=xla)")
    assert result["context"]["kernels"]["tuned"].startswith("1x1 conv as matmul")
    assert kernels.ENV_VARIABLE not in os.environ and kernels.current() == kernels.default()


def test_largest_batch_backs_off_when_the_prediction_does_not_fit(monkeypatch):
    tried = []

    def time_jax(row, name, mode, warmup, iters):
        tried.append(row.batch)
        if row.batch > 600:
            row.notes.append("jaxnets: out of memory")
            return None
        row.images_per_s = 1000.0
        return object()
    monkeypatch.setattr(gpu, "time_jax", time_jax)
    gib = 2**30
    args = argparse.Namespace(batch_size=256, model="resnet50", warmup=1, iters=1)
    row = gpu.Row("largest", "bfloat16")
    gpu._largest_batch(row, args, gib + 256 * gib // 10, gib, 80 * gib, gpu.Budget(None), 10.0)
    assert tried == [704, 592] and row.batch == 592 and row.images_per_s == 1000.0
    assert row.notes[0].startswith("predicted 704 from XLA's memory analysis at batch 256") and \
        row.notes[-1] == "backed off to 592"
    row = gpu.Row("late", "bfloat16")
    gpu._largest_batch(row, args, gib + 256 * gib // 10, gib, 80 * gib, gpu.Budget(5.0), 10.0)  # 10 s > 5 s
    assert row.batch is None and row.notes[-1] == "skipped: over the time budget (5 s)"

"""Per-convolution timing: it finds every convolution of the model with the shapes it sees, and it
reports sane numbers on a tiny input. Speed itself is the benchmark's business, never a unit test's."""

from __future__ import annotations

import pytest
import torch

from jaxnets import list_models
from jaxnets.benchmark import conv_timing
from jaxnets.benchmark import models as benchmark


@pytest.mark.parametrize("name", list_models())
def test_conv_layers_are_every_convolution_torchvision_runs(name):
    layers = conv_timing.conv_layers(name, batch_size=1, image_size=64)
    with torch.device("meta"):  # the modules only, not their weights
        model = benchmark.torchvision_model(name)
    # GoogLeNet's auxiliary heads run in training mode only; the layers are found in an eval forward.
    convs = [m for path, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and not path.startswith("aux")]
    assert sum(layer.count for layer in layers) == len(convs)
    assert len(set(layers)) == len(layers)
    first, *rest = layers
    assert first.input_shape == (1, 64, 64, 3) and not first.input_grad and all(layer.input_grad for layer in rest)
    for layer in layers:
        n, h, w, c = layer.input_shape
        conv = torch.nn.Conv2d(c, layer.features, layer.kernel_size, layer.stride, layer.padding, groups=layer.groups)
        n_out, c_out, h_out, w_out = conv(torch.zeros(n, c, h, w)).shape
        assert layer.output_shape() == (n_out, h_out, w_out, c_out)


def test_timings_and_table_count_every_layer():
    timings = conv_timing.time_conv_layers("alexnet", batch_size=1, image_size=64, warmup=0, iters=1)
    assert [t.layer for t in timings] == conv_timing.conv_layers("alexnet", 1, 64)
    assert all(value > 0 for t in timings for value in t[1:])
    table = conv_timing.conv_table("alexnet", timings).splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| layer")]
    assert len(rows) == len(timings) + 1 and rows[-1].startswith("| **total** | 5 |")
    assert rows[0].startswith("| 64x64x3 -> 64, 11x11/4 | 1 |")


def test_cli_conv_layers_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark.host, "setup_compilation_cache", lambda directory: None)
    monkeypatch.setattr(benchmark, "benchmark_model", lambda *args: pytest.fail("--conv-layers times layers only"))
    out = tmp_path / "convs.md"
    code = benchmark.main(["--model", "alexnet", "--conv-layers", "--batch-size", "1", "--image-size", "64",
                           "--iters", "1", "--warmup", "0", "--system-malloc", "--output", str(out)])
    assert code == 0
    report = out.read_text()
    assert report.startswith("CPU vector extensions: ") and "\n\nConvolutions of alexnet" in report
    assert "| **total** | 5 |" in capsys.readouterr().out


def test_each_time_lands_in_its_own_column(monkeypatch):
    """Fake calls that report their own names: the forward and backward times of each library must not
    trade places (they once did, and the table read torch's forward as 3x slower than it is)."""
    layer = conv_timing.conv_layers("alexnet", 1, 64)[0]
    monkeypatch.setattr(conv_timing, "conv_layers", lambda *args: [layer])
    monkeypatch.setattr(conv_timing, "_jax_calls", lambda *args: (lambda: 1.0, lambda: 2.0))
    monkeypatch.setattr(conv_timing, "_torch_calls", lambda *args: (lambda: 3.0, lambda: 4.0))
    monkeypatch.setattr(conv_timing, "time_calls", lambda fn, warmup, iters: [fn()] * iters)
    (timing,) = conv_timing.time_conv_layers("alexnet", 1, 64)
    assert timing == (layer, 1.0, 2.0, 3.0, 4.0)
    assert timing.jax_backward == 2.0 and timing.torch_forward == 3.0
    row = conv_timing.conv_table("alexnet", [timing]).splitlines()[4]
    assert row.endswith("| 1000.0 | 3000.0 | 2000.0 | 4000.0 | 2.33 |")

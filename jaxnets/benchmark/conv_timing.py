"""Every convolution of a model timed alone, forward and backward, in jaxnets and in torch.

A whole-step ratio says how much slower or faster; this says where. Each ``Conv2d`` configuration of
torchvision's model (found with forward hooks, so with the input shape it really sees) is timed as
jaxnets runs it (``layers.Conv2d``, jitted with the training step's compile options) and as torch
does (``torch.nn.Conv2d``, eager), in one process. The backward pass computes what a
training step needs: the kernel (and bias) gradient, and the input gradient except for the layer
that reads the image. Alone, a jaxnets convolution adds its bias in a pass of its own, which a model
fuses with the ReLU that follows; torch's kernels add it themselves.

    python -m jaxnets.benchmark --model vgg16 --conv-layers
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import host, kernels, layers
from jaxnets.benchmark.timing import num_threads, time_calls, torchvision_model
from jaxnets.errors import UserError


class ConvLayer(NamedTuple):
    """One ``Conv2d`` configuration of a model and how many of its layers share it."""

    input_shape: tuple[int, int, int, int]  # NHWC
    features: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bias: bool
    input_grad: bool  # False for the layer that reads the image: training needs no gradient there
    count: int

    def output_shape(self) -> tuple[int, int, int, int]:
        n, h, w, _ = self.input_shape
        size = lambda d, i: (d + 2 * self.padding[i] - self.kernel_size[i]) // self.stride[i] + 1
        return n, size(h, 0), size(w, 1), self.features

    def describe(self) -> str:
        _, h, w, c = self.input_shape
        kh, kw = self.kernel_size
        text = f"{h}x{w}x{c} -> {self.features}, {kh}x{kw}/{self.stride[0]}"
        return text + (f", groups {self.groups}" if self.groups > 1 else "")


class ConvTiming(NamedTuple):
    """Median seconds per call of one layer, the backward pass without its forward."""

    layer: ConvLayer
    jax_forward: float
    jax_backward: float
    torch_forward: float
    torch_backward: float


def conv_layers(name: str, batch_size: int, image_size: int) -> list[ConvLayer]:
    """``name``'s convolutions in the order they run, one entry per distinct configuration."""
    import torch

    with torch.device("meta"):  # shapes are all this needs: no weights initialized, no arithmetic done
        model = torchvision_model(name)
        image = torch.zeros(batch_size, 3, image_size, image_size)
    seen: Counter[ConvLayer] = Counter()

    def record(conv: torch.nn.Conv2d, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
        n, c, h, w = inputs[0].shape
        seen[ConvLayer((n, h, w, c), conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.groups, conv.bias is not None, inputs[0] is not image, 0)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(image)
    finally:
        for hook in hooks:
            hook.remove()
    return [layer._replace(count=count) for layer, count in seen.items()]


def _jax_module(layer: ConvLayer) -> layers.Conv2d:
    if layer.stride[0] != layer.stride[1] or layer.padding[0] != layer.padding[1]:
        raise UserError(f"{layer.describe()}: layers.Conv2d takes square strides and paddings only")
    return layers.Conv2d(layer.features, layer.kernel_size, layer.stride[0], layer.padding[0], layer.groups,
                         use_bias=layer.bias)


def _jax_calls(layer: ConvLayer, x: np.ndarray, dy: np.ndarray) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Blocking forward and backward calls. The backward's own forward output is unused, so XLA drops
    it: the call times the gradients only, as torch's ``autograd.grad`` on a built graph does."""
    module = _jax_module(layer)
    x, dy = jnp.asarray(x), jnp.asarray(dy)
    params = module.init(jax.random.key(0), x)
    options = host.xla_cpu_options()
    forward = jax.jit(kernels.bind(module.apply), compiler_options=options)

    def gradients(params, x, dy):
        params_grad, x_grad = jax.vjp(module.apply, params, x)[1](dy)
        return (params_grad, x_grad) if layer.input_grad else params_grad
    backward = jax.jit(kernels.bind(gradients), compiler_options=options)
    return (lambda: forward(params, x).block_until_ready(),
            lambda: jax.block_until_ready(backward(params, x, dy)))


def _torch_calls(layer: ConvLayer, x: np.ndarray, dy: np.ndarray) -> tuple[Callable[[], Any], Callable[[], Any]]:
    import torch

    _, _, _, c = layer.input_shape
    conv = torch.nn.Conv2d(c, layer.features, layer.kernel_size, layer.stride, layer.padding, groups=layer.groups,
                           bias=layer.bias)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(layer.input_grad)
    tdy = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous()
    wrt = [tx, *conv.parameters()] if layer.input_grad else list(conv.parameters())
    y = conv(tx)  # the graph the backward calls walk, built once as a training step's forward would

    def forward() -> None:
        with torch.no_grad():
            conv(tx)
    return forward, lambda: torch.autograd.grad(y, wrt, tdy, retain_graph=True)


def time_conv_layers(name: str, batch_size: int, image_size: int, warmup: int = 1,
                     iters: int = 5) -> list[ConvTiming]:
    """Median forward and backward seconds of each of ``name``'s convolution configurations."""
    import torch

    torch.set_num_threads(num_threads())
    rng = np.random.default_rng(0)
    median = lambda fn: statistics.median(time_calls(fn, warmup, iters))
    timings = []
    for layer in conv_layers(name, batch_size, image_size):
        x = rng.standard_normal(layer.input_shape, dtype=np.float32)
        dy = rng.standard_normal(layer.output_shape(), dtype=np.float32)
        jax_forward, jax_backward = _jax_calls(layer, x, dy)
        torch_forward, torch_backward = _torch_calls(layer, x, dy)
        # Each call repeated on its own, not in turns with the other library's as the whole-step benchmark
        # does: calls this short are disturbed by the other library's threads (torch's 224x224x64 backward
        # measured 300 ms on its own, 390 ms in turns with XLA's calls).
        timings.append(ConvTiming(layer, jax_forward=median(jax_forward), jax_backward=median(jax_backward),
                                  torch_forward=median(torch_forward), torch_backward=median(torch_backward)))
    return timings


def conv_table(name: str, timings: Sequence[ConvTiming]) -> str:
    """Markdown: milliseconds per configuration, then the model's totals (each configuration times its
    count). The last column is a speed ratio like the benchmark's: above 1, jaxnets is faster."""
    lines = [f"Convolutions of {name}, each timed alone (ms per layer; the total counts every layer):", "",
             "| layer | count | jaxnets fwd | torch fwd | jaxnets bwd | torch bwd | jaxnets/torch (fwd+bwd) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    speed = lambda ms: (ms[1] + ms[3]) / (ms[0] + ms[2])  # torch's time over jaxnets'
    totals = np.zeros(4)
    for t in timings:
        ms = np.array([t.jax_forward, t.torch_forward, t.jax_backward, t.torch_backward]) * 1e3
        totals += t.layer.count * ms
        cells = " | ".join(f"{v:.1f}" for v in ms)
        lines.append(f"| {t.layer.describe()} | {t.layer.count} | {cells} | {speed(ms):.2f} |")
    cells = " | ".join(f"{v:.0f}" for v in totals)
    lines.append(f"| **total** | {sum(t.layer.count for t in timings)} | {cells} | {speed(totals):.2f} |")
    return "\n".join(lines)

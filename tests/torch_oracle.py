"""torchvision models as the test oracle: random weights and realistic, randomized BatchNorm state.

A freshly initialized torchvision model has running_mean 0 / running_var 1 everywhere (and VGG zero biases),
which a mapping that drops or swaps BatchNorm buffers (or biases) would still pass. ``oracle_model`` calibrates the
running statistics on a random batch (so deep nets keep O(1) activations) and then perturbs
every BatchNorm parameter and buffer, so each one matters to the logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torchvision

import jaxnets
from jaxnets import trees
from jaxnets.registry import bound_options, model_class

# Models deeper than this many convolutions run op by op in the tests: eager JAX compiles each operation once per
# shape, and the deep ResNets repeat their blocks' shapes (so one worker compiles them once for all of them),
# where a whole-graph compilation grows with the depth (ResNet-152: 6 s eager, 13 s jitted, one forward pass).
EAGER_DEPTH = 100


def runs_eagerly(variables) -> bool:
    """Whether a test runs a model of these variables op by op (deeper than ``EAGER_DEPTH``) rather than jitted."""
    return sum(key.endswith("kernel") for key in trees.flatten(variables)) > EAGER_DEPTH


def one_per_family(prefer_batch_norm: bool = False) -> list[str]:
    """One registered model per family, in registration order: the family's first model or, with
    ``prefer_batch_norm``, its first BatchNorm variant (torchvision's ``_bn`` suffix) where it has one, so
    that the BatchNorm mapping is covered wherever the family offers it. A new family joins automatically."""
    chosen: dict[str, str] = {}
    for name in jaxnets.list_models():
        family = jaxnets.get_spec(name).family
        if family not in chosen or (prefer_batch_norm and name.endswith("_bn")
                                    and not chosen[family].endswith("_bn")):
            chosen[family] = name
    return list(chosen.values())


def dropout_options(name: str) -> tuple[str, ...]:
    """The model's dropout probabilities (``dropout``, GoogLeNet's ``dropout_aux``): constructor options
    named as torchvision names them, read off the Flax module's fields."""
    return tuple(f.name for f in dataclasses.fields(model_class(name))
                 if f.name.startswith("dropout") and f.name not in bound_options(name))


def torch_options(name: str, **options) -> dict:
    """torchvision constructor options: dropout off (train mode is deterministic) unless given."""
    family = jaxnets.get_spec(name).family
    defaults = {"init_weights": True, "aux_logits": True} if family == "googlenet" else {}
    return {**defaults, **dict.fromkeys(dropout_options(name), 0.0), **options}


def jax_options(name: str, **options) -> dict:
    """The jaxnets options matching ``torch_options`` (same names, minus torch-only ones)."""
    opts = torch_options(name, **options)
    opts.pop("init_weights", None)
    return opts


def oracle_model(name: str, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **torch_options(name, **options))
    with torch.no_grad():  # VGG initializes its biases to 0: a mapping that dropped them would pass
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None and not m.bias.any():
                m.bias.normal_(0.0, 0.05)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if norms:
        size = max(64, *jaxnets.get_spec(name).weights.min_size)
        for m in norms:
            m.momentum = 1.0  # running stats := this batch's stats
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, size, size))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in norms:
                n = m.num_features
                m.momentum = 0.1
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.add_(0.1 * torch.randn(n, generator=g) * m.running_var.sqrt())
                m.running_var.mul_(0.8 + 0.45 * torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(7)
    return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def max_rel_error(actual, expected) -> float:
    """max |a - e| / (1 + max |e|): the suite's float32 fidelity measure (bound: 1e-4)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / (1.0 + np.abs(expected).max()))

"""PyTorch state dicts in and out: the only module of jaxnets that imports torch or torchvision.

torch stays optional: it is imported inside the functions that need it (reading ``.pth`` files, downloading
torchvision's weights and other published checkpoints, verifying against torchvision, writing ``.pth``), and a
missing torch is a ``WeightsError`` that names what to do instead. ``.safetensors`` state dicts are read and
written without it. Where a model's state dict sits inside a checkpoint is ``wrappings``' rule.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from jaxnets import errors, trees
from jaxnets.fileio import atomic_path
from jaxnets.mapping import as_numpy, decided_options, stem_kernels, to_torch_state_dict
from jaxnets.registry import ModelRef, get_spec
from jaxnets.weights.fileformat import (
    FORMAT,
    SUFFIX,
    PathLike,
    WeightsError,
    file_sha256,
    load_weights,
    read_safetensors,
    refuse_overwriting,
    require_file,
    write_safetensors,
)
from jaxnets.weights.wrappings import (  # noqa: F401  (the wrapper names are re-exported by jaxnets.weights)
    DATA_PARALLEL_PREFIX,
    STATE_DICT_WRAPPERS,
    Unwrapped,
    unwrap,
)

logger = logging.getLogger(__name__)

# Constructor arguments torchvision needs that change nothing jaxnets compares (skip a slow init).
TORCHVISION_BUILD_KWARGS = {"googlenet": {"init_weights": False}}
TOLERANCE = 1e-4  # max |jax - torch| <= TOLERANCE * (1 + max |torch|), float32 logits


# --- reading ------------------------------------------------------------------------------------------


def read_state_dict(path: PathLike, layout: str | None = None, *,
                    model: ModelRef | None = None) -> dict[str, np.ndarray]:
    """A PyTorch state dict from ``.safetensors`` (no torch needed) or a ``torch.save`` file, torchvision-keyed:
    the state dict of ``read_wrapped``."""
    return read_wrapped(path, layout, model=model).state


def read_wrapped(path: PathLike, layout: str | None = None, *, model: ModelRef | None = None) -> Unwrapped:
    """A checkpoint's torchvision-keyed state dict (numpy arrays), its layout and the keys dropped
    (``wrappings.unwrap``: nesting such as ``{'state_dict': ...}``, DataParallel's ``module.``, the heads,
    momentum encoder, queue or prototypes of a self-supervised method), the dropped ones logged.

    Pickles are read with ``torch.load(weights_only=True)``: a file that would construct anything
    but tensors and containers is refused, never executed. ``layout`` forces one of ``wrappings.LAYOUTS``;
    ``model`` lets an unknown wrapping be reported as one (see ``unwrap``)."""
    path = Path(path)
    if path.suffix == SUFFIX:
        header, raw = read_safetensors(path)
        if header.get("format") == FORMAT:
            raise WeightsError(f"{path}: already a jaxnets weights file; use it directly (weights={str(path)!r})")
    else:
        raw = _read_torch_file(path)
    unwrapped = unwrap(raw, layout, where=str(path), model=model)
    torch = sys.modules.get("torch")
    tensor_types = (np.ndarray,) if torch is None else (np.ndarray, torch.Tensor)
    for key, value in unwrapped.state.items():
        if not isinstance(value, tensor_types):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                               f"expected a state dict (or {{'state_dict': ...}})")
    if unwrapped.dropped:
        logger.warning("%s: %s layout: dropped %d keys the backbone does not use: %s", path, unwrapped.layout,
                       len(unwrapped.dropped), ", ".join(unwrapped.dropped_summary()))
    return Unwrapped({key: as_numpy(value) for key, value in unwrapped.state.items()}, unwrapped.layout,
                     unwrapped.dropped)


def _read_torch_file(path: Path) -> Any:
    require_file(path)
    torch = _import_torch(f"reading {path.name}", f"convert it to .safetensors where torch is installed: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line),
                      errors.one_line(exc))
        raise WeightsError(f"{path}: refused: the pickle holds objects other than tensors, loading it could run "
                           f"code ({detail})") from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError, ... on damaged files
        raise WeightsError(f"{path}: unreadable PyTorch file, truncated or corrupt "
                           f"({type(exc).__name__}: {errors.one_line(exc)})") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def download(url: str, path: PathLike, *, sha256: str | None = None, md5_prefix: str | None = None) -> str:
    """Download ``url`` to ``path`` with torch.hub's ``download_url_to_file`` (``file://`` URLs too), checking the
    SHA-256 (or MD5 prefix) where one is published: the file's SHA-256. A failed download or a hash mismatch is a
    ``WeightsError`` and leaves nothing at ``path``."""
    path = Path(path)
    torch = _import_torch(f"downloading {url}", "download it where you can and convert it with "
                                                 f"{errors.command('convert')} --from FILE")
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256, progress=True)
    except RuntimeError as exc:  # torch.hub's hash mismatch (it deletes its temporary file)
        raise WeightsError(f"{url}: {errors.one_line(exc)}: a damaged or different file; nothing kept") from None
    except OSError as exc:  # URLError is an OSError
        raise WeightsError(f"{url}: cannot download ({errors.one_line(exc)})") from None
    if md5_prefix is not None:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if not digest.hexdigest().startswith(md5_prefix):
            path.unlink()
            raise WeightsError(f"{url}: MD5 {digest.hexdigest()[:8]}... is not the published {md5_prefix}...: a "
                               f"damaged or different file; nothing kept")
    return file_sha256(path)


def fetch_torchvision_state_dict(name: ModelRef, version: str | None = None) -> tuple[dict[str, np.ndarray], str, str]:
    """Download torchvision's ImageNet weights ``version`` (None: ``IMAGENET1K_V1``) for ``name`` through
    torchvision's Weights API (hash-checked, cached by torch.hub): ``(state dict, url, SHA-256 of the file)``."""
    spec = get_spec(name)
    published = spec.get_weights(version)
    hint = (f"download {published.url} where you can and run: {errors.command('convert')} {spec.name} "
            f"--from {published.filename}")
    torch = _import_torch(f"fetching torchvision's {spec.name} weights", hint)
    import torchvision

    weights = torchvision.models.get_model_weights(spec.name)[published.torchvision_name]
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise WeightsError(f"{spec.name}: cannot download {published.url} ({errors.one_line(exc)}); "
                           f"{hint}") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / published.filename
    sha256 = file_sha256(file) if file.is_file() else ""
    if sha256 and not sha256.startswith(published.sha256_prefix):
        raise WeightsError(f"{file}: SHA-256 {sha256[:12]}... is not torchvision's {published.sha256_prefix}...: "
                           f"a damaged download; delete it and convert again")
    return {key: as_numpy(value) for key, value in state.items()}, published.url, sha256


# --- verifying ----------------------------------------------------------------------------------------


def compare_with_torchvision(name: ModelRef, state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                             model_options: Mapping[str, Any], *, image_size: int = 224, batch_size: int = 2,
                             seed: int = 0) -> tuple[float, float]:
    """Run torchvision (loaded with ``state_dict``) and jaxnets (with ``variables``) in eval mode on one
    random batch: ``(max |logit difference|, tolerance)``.

    A stem of other than 3 input channels (``in_chans``, which the state dict decides) is compared with
    torchvision's model whose stem convolution is replaced by one of that many channels, as a model adapted by
    ``adapt_input_conv`` is; a backbone (``features_only``) has no logits and is refused."""
    torch = _import_torch("--verify", "convert without verifying")
    import torchvision

    spec = get_spec(name)
    decided = decided_options(spec, variables)
    if decided.get("features_only") or model_options.get("features_only"):
        raise WeightsError(f"--verify compares logits; {spec.name} backbone weights (features_only, no classifier) "
                           f"have none: convert them without --verify")
    in_chans = decided.get("in_chans", 3)
    if model_options.get("in_chans", in_chans) != in_chans:
        raise WeightsError(f"--option in_chans={model_options['in_chans']}: the state dict's {spec.name} stem takes "
                           f"{in_chans} channels; convert it as it is (load_pretrained(..., in_chans=...) adapts it)")
    if in_chans != 3 and model_options.get("transform_input"):
        raise WeightsError(f"--verify: torchvision's {spec.name} transform_input takes RGB input, the stem "
                           f"in_chans={in_chans}: verify with --option transform_input=false")
    num_classes = int(np.shape(trees.flatten(variables)[f"params/{spec.classifier}/kernel"])[-1])
    torch_options = {key: value for key, value in model_options.items() if key != "in_chans"}
    torch_model = torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes, **torch_options,
                                               **TORCHVISION_BUILD_KWARGS.get(spec.family, {}))
    if in_chans != 3:
        _replace_stem(torch, torch_model, spec, in_chans)
    # Source tensors for every weight; jaxnets' export only fills what the source may lack (num_batches_tracked).
    full = {**to_torch_state_dict(spec, variables), **state_dict}
    torch_model.load_state_dict({k: _as_tensor(torch, v) for k, v in full.items()}, strict=True)
    x = np.random.default_rng(seed).standard_normal((batch_size, image_size, image_size, in_chans), np.float32)
    with torch.no_grad():
        expected = torch_model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    actual = np.asarray(_eval_logits(spec.create(num_classes, **model_options), variables, x))
    return float(np.max(np.abs(actual - expected))), TOLERANCE * (1.0 + float(np.max(np.abs(expected))))


def _replace_stem(torch: Any, torch_model: Any, spec: Any, in_chans: int) -> None:
    """torchvision's stem convolution (``mapping.stem_kernels``) replaced by the same one for ``in_chans``
    input channels: timm's ``adapt_input_conv`` changes only the stem's input channels, and so does jaxnets'."""
    (path,) = stem_kernels(spec)
    parent_name, _, leaf = ".".join(path[1:-1]).rpartition(".")
    parent = torch_model.get_submodule(parent_name)
    old = parent.get_submodule(leaf)
    setattr(parent, leaf, torch.nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                                          old.dilation, old.groups, old.bias is not None))


@partial(jax.jit, static_argnums=0)
def _eval_logits(model: nn.Module, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


# --- writing ------------------------------------------------------------------------------------------


def export_torch(weights: PathLike, out: PathLike) -> Path:
    """Write a jaxnets weights file as a torchvision state dict: ``.safetensors`` (no torch needed) or,
    for any other suffix, ``torch.save`` (``.pth``). ``load_state_dict(..., strict=True)`` accepts it."""
    refuse_overwriting(weights, out)
    weights_file = load_weights(weights)
    state = to_torch_state_dict(weights_file.name, weights_file.variables)
    out = Path(out)
    if out.suffix == SUFFIX:
        return write_safetensors(out, state, {"jaxnets_model": weights_file.name,
                                              "jaxnets_sha256": weights_file.sha256})
    torch = _import_torch(f"writing {out.name}", f"export to .safetensors: {out.with_suffix(SUFFIX)}")
    with atomic_path(out) as tmp:
        torch.save({key: _as_tensor(torch, value) for key, value in state.items()}, tmp)
    return out


def _as_tensor(torch: Any, array: np.ndarray) -> Any:
    """A CPU tensor sharing memory with ``array`` (copied only when read-only, which torch rejects)."""
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _import_torch(purpose: str, alternative: str) -> Any:
    """torch, after checking torchvision imports too; else a ``WeightsError`` naming ``alternative``."""
    try:
        import torch
        import torchvision  # noqa: F401  (imported here so a missing torchvision fails now, clearly)
    except ImportError:
        raise WeightsError(f"{purpose} needs torch and torchvision ({errors.install_hint('torch')}); "
                           f"otherwise {alternative}") from None
    return torch

"""The pretrained-weights workflow: torchvision checkpoints in, trusted jaxnets weights files out, and back.

A jaxnets weights file is a safetensors file: flat keys that are Flax variable paths
(``params/layer1/0/conv1/kernel``, ``batch_stats/bn1/mean``) and a string header that describes it
(model name, number of classes, model options, jaxnets version, source and its SHA-256, and the
SHA-256 of the content itself). Unlike a pickle, reading safetensors cannot execute code; it is a
small JSON header and raw little-endian bytes, so reading is fast (memory-mapped, no per-object
decoding) and needs neither torch nor jaxnets.

``load_pretrained`` finds converted weights in a cache (``$JAXNETS_HOME/weights``, default
``~/.cache/jaxnets/weights``), converting torchvision's on first use when torch is installed.
torch stays optional: it is imported only by the functions that read ``.pth`` files, download,
verify against torchvision, or write ``.pth``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import tempfile
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxnets.mapping import (
    OPTIONAL_MODULES,
    WeightMappingError,
    as_numpy,
    from_torch_state_dict,
    layout_problems,
    to_torch_state_dict,
    variable_shapes,
)
from jaxnets.registry import bound_options, check_num_classes, create_model, get_spec, model_class

logger = logging.getLogger(__name__)

FORMAT = "jaxnets.weights"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
HOME_ENV = "JAXNETS_HOME"
DEFAULT_HOME = "~/.cache/jaxnets"
# Wrappers around a state dict that training scripts commonly save: {'state_dict': {...}}, ...
STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")
DATA_PARALLEL_PREFIX = "module."
# Constructor arguments torchvision needs that change nothing jaxnets compares (skip a slow init).
TORCHVISION_BUILD_KWARGS = {"googlenet": {"init_weights": False}}
TOLERANCE = 1e-4  # max |jax - torch| <= TOLERANCE * (1 + max |torch|), float32 logits
# Constructor arguments that are no model option of a file: the classifier decides one, the loader the other.
RESERVED_OPTIONS = ("num_classes", "dtype")
# Types a recorded (JSON) model option may have: field annotation -> accepted Python types, and in words.
OPTION_TYPES: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}

PathLike = str | os.PathLike


class WeightsError(ValueError):
    """A weights file or source that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class WeightsFile:
    """The content of a jaxnets weights file, hash-verified."""

    name: str
    variables: dict[str, Any]
    model_options: dict[str, Any]
    metadata: dict[str, Any]
    num_classes: int = 0
    jaxnets_version: str = ""
    sha256: str = ""  # of the content (tensors and header), recorded at save time
    path: Path | None = None


@dataclass(frozen=True)
class Conversion:
    """What ``convert`` wrote, from what, and how close it is to torchvision (when verified)."""

    name: str
    path: Path
    source: str
    source_sha256: str
    max_abs_diff: float | None = None
    tolerance: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# --- the jaxnets weights file ---------------------------------------------------------


def save_weights(path: PathLike, name: str, variables: Mapping[str, Any], *,
                 model_options: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``variables`` of model ``name`` atomically (temp file + rename) as a jaxnets weights file.

    The variables must fit ``create_model(name, num_classes, **model_options)``: a file that cannot be
    loaded back is never written. ``metadata`` (JSON-serializable) is stored as is: ``source``,
    ``source_sha256``, ``categories`` (class names, shown by ``jaxnets.predict``), ...
    """
    path = Path(path)
    spec = get_spec(name)
    model_options = check_model_options(name, model_options or {}, where=f"{path}: ")
    tensors = {key: np.ascontiguousarray(np.asarray(value)) for key, value in _flat(variables).items()}
    classifier = f"params/{spec.classifier}/kernel"
    if classifier not in tensors:
        raise WeightsError(f"{path}: {name} variables have no classifier {classifier!r}; not {name} variables?")
    num_classes = int(tensors[classifier].shape[-1])
    _check_fits(f"{path}: {name}", {k: v.shape for k, v in tensors.items()},
                expected_shapes(name, num_classes, model_options))
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "name": name,
        "num_classes": str(num_classes),
        "model_options": _to_json(model_options, path, "model_options"),
        "jaxnets_version": _jaxnets_version(),
        "metadata": _to_json(dict(metadata or {}), path, "metadata"),
    }
    header["sha256"] = content_sha256(tensors, header)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def load_weights(path: PathLike) -> WeightsFile:
    """Read a jaxnets weights file and check its content hash; raise ``WeightsError`` naming the
    file when it is truncated, corrupt, or not a jaxnets weights file."""
    path = Path(path)
    try:
        header, tensors = _read_safetensors(path)
    except WeightsError:
        if path.suffix == SUFFIX:
            raise
        raise WeightsError(f"{path}: not a jaxnets weights file (a {SUFFIX} file); convert a PyTorch checkpoint "
                           f"first: python convert_weights.py MODEL --from {path}") from None
    if header.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a jaxnets weights file (no {FORMAT!r} header); "
                           f"convert a torchvision state dict with: python convert_weights.py MODEL --from {path}")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise WeightsError(f"{path}: format version {header['format_version']} is newer than this jaxnets "
                           f"reads ({FORMAT_VERSION}); upgrade jaxnets")
    recorded = header.pop("sha256", "")
    actual = content_sha256(tensors, header)
    if actual != recorded:
        raise WeightsError(f"{path}: content SHA-256 {actual[:16]}... does not match the recorded "
                           f"{recorded[:16] or '<none>'}...: the file is corrupt or was modified; "
                           f"delete it and convert again")
    try:
        return WeightsFile(
            name=header["name"],
            variables=_unflat(tensors),
            model_options=json.loads(header["model_options"]),
            metadata=json.loads(header["metadata"]),
            num_classes=int(header["num_classes"]),
            jaxnets_version=header.get("jaxnets_version", ""),
            sha256=recorded,
            path=path,
        )
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{path}: incomplete jaxnets header ({type(exc).__name__}: {exc})") from None


def content_sha256(tensors: Mapping[str, np.ndarray], header: Mapping[str, str]) -> str:
    """SHA-256 over the header and every tensor's key, dtype, shape and bytes, in key order:
    independent of the file layout, so it survives rewrites and catches any change of content."""
    digest = hashlib.sha256(json.dumps(dict(header), sort_keys=True).encode())
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(json.dumps([key, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def file_sha256(path: PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success, fsync it and rename it over ``path``.
    A crash or an exception leaves ``path`` as it was, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- reading torchvision state dicts ----------------------------------------------------


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """A PyTorch state dict from ``.safetensors`` (no torch needed) or a ``torch.save`` file.

    Pickles are read with ``torch.load(weights_only=True)``: a file that would construct anything
    but tensors and containers is refused, never executed. ``{'state_dict': ...}``-style wrappers
    and DataParallel's ``module.`` prefix are removed.
    """
    path = Path(path)
    if path.suffix == SUFFIX:
        header, state = _read_safetensors(path)
        if header.get("format") == FORMAT:
            raise WeightsError(f"{path}: already a jaxnets weights file; use it directly (weights={str(path)!r})")
    else:
        state = _read_torch_file(path)
    if state and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state):
        state = {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state.items()}
    return state


def _require_file(path: Path) -> None:
    """A clear error for a path that is no file, before a reader reports something obscure."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a file; give the weights file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    _require_file(path)
    try:
        with safe_open(path, framework="np") as f:
            return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, ValueError, TypeError, OSError) as exc:
        raise WeightsError(f"{path}: unreadable safetensors file, truncated or corrupt ({_one_line(exc)})") from None


def _read_torch_file(path: Path) -> dict[str, np.ndarray]:
    _require_file(path)
    torch = _import_torch(f"reading {path.name}", f"convert it to .safetensors where torch is installed: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line),
                      _one_line(exc))
        raise WeightsError(f"{path}: refused: the pickle holds objects other than tensors, loading it could run "
                           f"code ({detail})") from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError, ... on damaged files
        raise WeightsError(f"{path}: unreadable PyTorch file, truncated or corrupt "
                           f"({type(exc).__name__}: {_one_line(exc)})") from None
    for wrapper in STATE_DICT_WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                               f"expected a state dict (or {{'state_dict': ...}})")
        state[key] = as_numpy(value)
    return state


def fetch_torchvision_state_dict(name: str) -> tuple[dict[str, np.ndarray], str, str]:
    """Download torchvision's ImageNet weights for ``name`` through torchvision's Weights API
    (hash-checked, cached by torch.hub): ``(state dict, url, SHA-256 of the file)``."""
    spec = get_spec(name)
    hint = (f"download {spec.weights.url} where you can and run: "
            f"python convert_weights.py {name} --from {spec.weights.filename}")
    torch = _import_torch(f"fetching torchvision's {name} weights", hint)
    import torchvision

    weights = torchvision.models.get_model_weights(name)[spec.weights.torchvision_name]
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise WeightsError(f"{name}: cannot download {spec.weights.url} ({_one_line(exc)}); {hint}") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / spec.weights.filename
    sha256 = file_sha256(file) if file.is_file() else ""
    if sha256 and not sha256.startswith(spec.weights.sha256_prefix):
        raise WeightsError(f"{file}: SHA-256 {sha256[:12]}... is not torchvision's {spec.weights.sha256_prefix}...: "
                           f"a damaged download; delete it and convert again")
    return {key: as_numpy(value) for key, value in state.items()}, spec.weights.url, sha256


def _as_tensor(torch, array: np.ndarray):
    """A CPU tensor sharing memory with ``array`` (copied only when read-only, which torch rejects)."""
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _import_torch(purpose: str, alternative: str):
    try:
        import torch
        import torchvision  # noqa: F401  (imported here so a missing torchvision fails now, clearly)
    except ImportError:
        raise WeightsError(f"{purpose} needs torch and torchvision (pip install 'jaxnets[torch]'); "
                           f"otherwise {alternative}") from None
    return torch


# --- conversion and verification --------------------------------------------------------


def cache_dir() -> Path:
    """Where converted torchvision weights live: ``$JAXNETS_HOME/weights`` (default ``~/.cache/jaxnets``)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser() / "weights"


def cached_weights_path(name: str) -> Path:
    """Cache file of torchvision's weights for ``name``, named like torchvision's (``resnet18-f37072fd``)."""
    return cache_dir() / (Path(get_spec(name).weights.filename).stem + SUFFIX)


def convert(name: str, source: PathLike | None = None, out: PathLike | None = None, *, verify: bool = False,
            model_options: Mapping[str, Any] | None = None, verify_image_size: int = 224,
            verify_batch_size: int = 2) -> Conversion:
    """Convert a torchvision state dict for ``name`` into a jaxnets weights file.

    ``source=None`` downloads torchvision's ImageNet weights (needs torch). ``out=None`` writes to
    the cache when the source is torchvision's own file (its SHA-256 matches), else next to the
    source as ``<stem>.jaxnets.safetensors``; ``out`` is never the source. With ``verify``, torchvision
    and jaxnets run on the same random batch first, and nothing is written when their logits differ
    beyond the tolerance.

    The recorded model options are ``model_options`` over those the state dict decides (GoogLeNet's
    ``aux_logits``) over, for torchvision's own file only, the options torchvision builds it with
    (GoogLeNet's ``transform_input=True``): a state dict does not say how its model was built, so any
    other file gets torchvision's constructor defaults unless ``model_options`` says otherwise.
    """
    spec = get_spec(name)
    model_options = check_model_options(name, model_options or {})
    if source is None:
        state, label, sha256 = fetch_torchvision_state_dict(name)
    else:
        state, label, sha256 = read_state_dict(source), Path(source).name, file_sha256(source)
    try:
        variables = from_torch_state_dict(name, state)
    except WeightMappingError as exc:
        raise WeightMappingError(f"{label}: {exc}") from None
    is_torchvision = source is None or sha256.startswith(spec.weights.sha256_prefix)
    published = spec.weights.model_kwargs if is_torchvision else {}
    options = {**published, **_inferred_options(name, variables), **model_options}
    metadata = {"source": label, "source_sha256": sha256}
    if is_torchvision:
        metadata["torchvision_weights"] = spec.weights.torchvision_name
    if out is None:
        out = cached_weights_path(name) if is_torchvision else Path(source).with_name(
            Path(source).stem + ".jaxnets" + SUFFIX)
    if source is not None:
        _refuse_overwriting(source, out)
    diff = tolerance = None
    if verify:
        diff, tolerance = compare_with_torchvision(name, state, variables, options,
                                                   image_size=verify_image_size, batch_size=verify_batch_size)
        if not diff <= tolerance:
            raise WeightsError(f"{label}: {name} in jaxnets does not reproduce torchvision: max |logit diff| "
                               f"{diff:.3g} > tolerance {tolerance:.3g}; nothing written")
    path = save_weights(out, name, variables, model_options=options, metadata=metadata)
    return Conversion(name, path, label, sha256, diff, tolerance, metadata)


def compare_with_torchvision(name: str, state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                             model_options: Mapping[str, Any], *, image_size: int = 224, batch_size: int = 2,
                             seed: int = 0) -> tuple[float, float]:
    """Run torchvision (loaded with ``state_dict``) and jaxnets (with ``variables``) in eval mode on one
    random batch: ``(max |logit difference|, tolerance)``."""
    torch = _import_torch("--verify", "convert without verifying")
    import torchvision

    spec = get_spec(name)
    num_classes = int(np.shape(_flat(variables)[f"params/{spec.classifier}/kernel"])[-1])
    torch_model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **model_options,
                                               **TORCHVISION_BUILD_KWARGS.get(spec.family, {}))
    # Source tensors for every weight; jaxnets' export only fills what the source may lack (num_batches_tracked).
    full = {**to_torch_state_dict(name, variables), **state_dict}
    torch_model.load_state_dict({k: _as_tensor(torch, v) for k, v in full.items()}, strict=True)
    x = np.random.default_rng(seed).standard_normal((batch_size, image_size, image_size, 3), np.float32)
    with torch.no_grad():
        expected = torch_model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    actual = np.asarray(_eval_logits(create_model(name, num_classes, **model_options), variables, x))
    return float(np.max(np.abs(actual - expected))), TOLERANCE * (1.0 + float(np.max(np.abs(expected))))


@partial(jax.jit, static_argnums=0)
def _eval_logits(model: nn.Module, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


def export_torch(weights: PathLike, out: PathLike) -> Path:
    """Write a jaxnets weights file as a torchvision state dict: ``.safetensors`` (no torch needed) or,
    for any other suffix, ``torch.save`` (``.pth``). ``load_state_dict(..., strict=True)`` accepts it."""
    _refuse_overwriting(weights, out)
    weights_file = load_weights(weights)
    state = to_torch_state_dict(weights_file.name, weights_file.variables)
    out = Path(out)
    if out.suffix == SUFFIX:
        with atomic_path(out) as tmp:
            save_file(state, tmp, metadata={"jaxnets_model": weights_file.name,
                                            "jaxnets_sha256": weights_file.sha256})
        return out
    torch = _import_torch(f"writing {out.name}", f"export to .safetensors: {out.with_suffix(SUFFIX)}")
    with atomic_path(out) as tmp:
        torch.save({key: _as_tensor(torch, value) for key, value in state.items()}, tmp)
    return out


# --- load_pretrained ----------------------------------------------------------------------


def open_pretrained(name: str, weights: PathLike | None = None) -> WeightsFile:
    """The weights file for ``name``: ``weights`` if given, else the cache, converting torchvision's
    weights on first use. A file of another model is refused."""
    get_spec(name)
    path = Path(weights) if weights is not None else _cached_or_convert(name)
    weights_file = load_weights(path)
    if weights_file.name != name:
        raise WeightsError(f"{path}: holds {weights_file.name} weights, not {name}")
    return weights_file


def _cached_or_convert(name: str) -> Path:
    path = cached_weights_path(name)
    if not path.is_file():
        logger.warning("%s: no converted weights in %s; converting torchvision's", name, path)
        convert(name, out=path)
    return path


def load_pretrained(name: str, num_classes: int | None = None, weights: PathLike | None = None,
                    dtype: Any = jnp.float32, *, rng: int | jax.Array = 0,
                    **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, variables)`` for ``name`` with pretrained weights (see ``open_pretrained``).

    With ``num_classes`` other than the checkpoint's, the head layers (``spec.head``) are freshly
    initialized from ``rng`` (and logged); every other variable is the checkpoint's, bit for bit.
    ``options`` go to ``create_model`` on top of the file's recorded model options.
    """
    if num_classes is not None:
        check_num_classes(num_classes)  # before a first use converts torchvision's weights for nothing
    return instantiate(open_pretrained(name, weights), num_classes, dtype, rng=rng, **options)


def instantiate(weights_file: WeightsFile, num_classes: int | None = None, dtype: Any = jnp.float32, *,
                rng: int | jax.Array = 0, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a weights file describes and fit its variables to it (see ``load_pretrained``)."""
    name = weights_file.name
    options = {**weights_file.model_options, **options}
    num_classes = check_num_classes(weights_file.num_classes if num_classes is None else num_classes)
    model = create_model(name, num_classes, dtype, **options)
    expected = expected_shapes(name, num_classes, options)
    head = get_spec(name).head
    wanted = _modules_in(expected, head)
    # Head modules the model does not build (GoogLeNet with aux_logits=False) are dropped, as torchvision does.
    variables = _without_modules(weights_file.variables, [m for m in head if m not in wanted])
    present = _modules_in(_flat(variables), head)
    renew = [m for m in wanted if num_classes != weights_file.num_classes or m not in present]
    if renew:
        variables = _reinitialize(name, model, variables, renew, rng)
        logger.warning("%s: freshly initialized %s for %d classes (checkpoint %s has %d); train before use",
                       name, ", ".join(renew), num_classes, weights_file.path, weights_file.num_classes)
    _check_variables(f"{weights_file.path}: {name}", variables, expected)
    return model, variables


def model_options(name: str, model: nn.Module) -> dict[str, Any]:
    """The ``create_model`` options ``model`` was built with: what ``save_weights(model_options=...)``
    should record so that loading the file rebuilds the same model (GoogLeNet's ``transform_input``!)."""
    return {key: getattr(model, key) for key in _free_options(name)}


def reinitialize_head(name: str, variables: Mapping[str, Any], num_classes: int, rng: int | jax.Array = 0,
                      **options: Any) -> tuple[dict[str, Any], list[str]]:
    """Replace the head layers of ``variables`` by a fresh initialization for ``num_classes``:
    ``(new variables, re-initialized module paths)``. Other leaves are kept as they are; variables that do not
    fit the model (another model's, ``params`` alone) are refused rather than mixed with a fresh head."""
    model = create_model(name, num_classes, **options)  # which checks num_classes
    head = get_spec(name).head
    expected = expected_shapes(name, num_classes, options)
    renew = _modules_in(expected, head)
    variables = _without_modules(variables, [m for m in head if m not in renew])
    variables = _reinitialize(name, model, variables, renew, rng)
    _check_variables(name, variables, expected)
    return variables, renew


def _reinitialize(name: str, model: nn.Module, variables: Mapping[str, Any], modules: Sequence[str],
                  rng: int | jax.Array) -> dict[str, Any]:
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    size = max(224, *get_spec(name).weights.min_size)

    def init_modules(key):
        # Only the selected leaves are outputs: XLA drops the rest of the init (and the forward pass).
        fresh = model.init(key, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
        return {k: v for k, v in _flat(fresh).items() if any(_in_module(k, m) for m in modules)}

    fresh = {k: np.asarray(v) for k, v in jax.jit(init_modules)(rng).items()}
    return _unflat({**_without_flat(variables, modules), **fresh})


def _without_modules(variables: Mapping[str, Any], modules: Sequence[str]) -> dict[str, Any]:
    return _unflat(_without_flat(variables, modules)) if modules else dict(variables)


def _without_flat(variables: Mapping[str, Any], modules: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in _flat(variables).items() if not any(_in_module(k, m) for m in modules)}


def _in_module(key: str, module: str) -> bool:
    """Whether flat key ``'params/aux1/conv/bn/scale'`` lies under module path ``'aux1'``."""
    return key.partition("/")[2].startswith(module + "/")


def _modules_in(keys: Iterable[str], modules: Sequence[str]) -> list[str]:
    keys = list(keys)
    return [m for m in modules if any(_in_module(k, m) for k in keys)]


# --- structure checks ----------------------------------------------------------------------


def expected_shapes(name: str, num_classes: int, options: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flat Flax variable key -> shape of ``create_model(name, num_classes, **options)``."""
    for reserved in ("num_classes", "dtype"):
        if reserved in options:
            raise WeightsError(f"{name}: {reserved!r} is not a model option here; pass it as its own argument")
    shapes = variable_shapes(name, num_classes=num_classes, **options)
    return {"/".join(path): shape for path, shape in shapes.items()}


def _check_fits(where: str, shapes: Mapping[str, tuple], expected: Mapping[str, tuple]) -> None:
    problems = layout_problems(shapes, expected)
    if problems:
        raise WeightsError(f"{where}: variables do not fit the architecture (another model?): " + "; ".join(problems))


def _check_variables(where: str, variables: Mapping[str, Any], expected: Mapping[str, tuple]) -> None:
    """``_check_fits`` for a variables tree."""
    _check_fits(where, {k: np.shape(v) for k, v in _flat(variables).items()}, expected)


def check_model_options(name: str, options: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``options`` as a weights file of ``name`` records them (float options as floats), or a ``WeightsError``
    naming the bad one: a file rebuilds its model from them, so a wrong one would only fail later, in training.

    Only the constructor fields that the registry leaves free are options: those a variant binds
    (ResNet's ``block_cls``, VGG's ``depth``) are its architecture, and choosing them means another model.
    """
    bound = bound_options(name)
    free = _free_options(name)
    checked = {}
    for key, value in options.items():
        if key in bound:
            raise WeightsError(f"{where}{name}: option {key}={_show(value)} refused: {name} binds "
                               f"{key}={bound[key]!r}, it is the architecture; choose another model instead")
        if key in RESERVED_OPTIONS:
            raise WeightsError(f"{where}{name}: {key!r} is not a model option here; pass it as its own argument")
        if key not in free:
            raise WeightsError(f"{where}{name}: unknown option {key!r}; accepted: {', '.join(sorted(free)) or 'none'}")
        accepted, words = OPTION_TYPES[free[key]]
        if not isinstance(value, accepted) or (isinstance(value, bool) and free[key] is not bool):
            raise WeightsError(f"{where}{name}: option {key}={_show(value)} has the wrong type: "
                               f"expected {free[key].__name__} ({words})")
        checked[key] = free[key](value)
    return checked


def _free_options(name: str) -> dict[str, type]:
    """Option name -> type of the constructor fields of ``name`` that a weights file may record."""
    module_cls = model_class(name)
    hints = typing.get_type_hints(module_cls)
    fixed = {*bound_options(name), *RESERVED_OPTIONS}
    return {f.name: hints[f.name] for f in dataclasses.fields(module_cls)
            if f.init and f.name not in fixed and hints.get(f.name) in OPTION_TYPES}


def _refuse_overwriting(source: PathLike, out: PathLike) -> None:
    """The atomic rename would replace the source by the output, often its only copy: refuse."""
    try:
        same = os.path.samefile(source, out)  # also through links and other spellings of the path
    except OSError:  # one of them does not exist
        same = Path(source).resolve() == Path(out).resolve()
    if same:
        raise WeightsError(f"{out}: the output is the source file {source}; writing it would replace the source: "
                           f"choose another output path")


# --- small helpers ------------------------------------------------------------------------


def _flat(variables: Mapping[str, Any]) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(_plain(variables)).items()}


def _unflat(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts, whatever the Mapping type (FrozenDict, ...), so flatten_dict sees every leaf."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _inferred_options(name: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Options the state dict decided (GoogLeNet's aux_logits), recorded so the file rebuilds its model."""
    head = get_spec(name).head
    return {option: any(m in variables["params"] for m in modules)
            for option, modules in OPTIONAL_MODULES.items() if any(m in head for m in modules)}


def _to_json(value: Mapping[str, Any], path: Path, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as exc:
        raise WeightsError(f"{path}: {what} must be JSON-serializable ({exc})") from None


def _show(value: Any) -> str:
    """``value`` as it was typed on the command line (JSON), else its repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _jaxnets_version() -> str:
    import jaxnets  # at call time: jaxnets/__init__ may import this module

    return jaxnets.__version__

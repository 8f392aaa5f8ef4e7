"""The pretrained-weights workflow: torchvision checkpoints in, trusted jaxnets weights files out, and back.

Three modules, by what they depend on:

- ``fileformat``: the jaxnets weights file (safetensors + a describing header + a content SHA-256) and the
  structure checks; numpy and safetensors only, never torch.
- ``torch_io``: PyTorch state dicts in and out, downloads and verification against torchvision; the only
  module that imports torch (lazily: torch stays optional).
- ``pretrained``: the cache, conversion, and weights files as models (``load_pretrained``, ``for_new_task``),
  with one rule for fitting the head layers.

Every public name is re-exported here: ``from jaxnets.weights import load_pretrained``.
"""

from jaxnets.weights.fileformat import (
    FORMAT,
    FORMAT_VERSION,
    SUFFIX,
    PathLike,
    WeightsError,
    WeightsFile,
    check_fits,
    check_model_options,
    check_variables,
    content_sha256,
    expected_shapes,
    file_sha256,
    load_weights,
    model_options,
    save_weights,
)
from jaxnets.weights.pretrained import (
    DEFAULT_HOME,
    HOME_ENV,
    Conversion,
    cache_dir,
    cached_weights_path,
    convert,
    for_new_task,
    instantiate,
    load_pretrained,
    open_pretrained,
    reinitialize_head,
    resolve_weights,
    torchvision_weights_of,
)
from jaxnets.weights.torch_io import (
    DATA_PARALLEL_PREFIX,
    STATE_DICT_WRAPPERS,
    TOLERANCE,
    TORCHVISION_BUILD_KWARGS,
    compare_with_torchvision,
    export_torch,
    fetch_torchvision_state_dict,
    read_state_dict,
)

__all__ = [
    "DATA_PARALLEL_PREFIX", "DEFAULT_HOME", "FORMAT", "FORMAT_VERSION", "HOME_ENV", "STATE_DICT_WRAPPERS", "SUFFIX",
    "TOLERANCE", "TORCHVISION_BUILD_KWARGS", "Conversion", "PathLike", "WeightsError", "WeightsFile", "cache_dir",
    "cached_weights_path", "check_fits", "check_model_options", "check_variables", "compare_with_torchvision",
    "content_sha256", "convert", "expected_shapes", "export_torch", "fetch_torchvision_state_dict", "file_sha256",
    "for_new_task", "instantiate", "load_pretrained", "load_weights", "model_options", "open_pretrained",
    "read_state_dict", "reinitialize_head", "resolve_weights", "save_weights", "torchvision_weights_of",
]

"""The pretrained-weights workflow: torchvision checkpoints in, trusted jaxnets weights files out, and back.

Three modules, by what they depend on:

- ``fileformat``: the jaxnets weights file (safetensors + a describing header + a content SHA-256) and the
  structure checks; numpy and safetensors only, never torch.
- ``torch_io``: PyTorch state dicts in and out, downloads and verification against torchvision; the only
  module that imports torch (lazily: torch stays optional).
- ``pretrained``: the cache, conversion, and weights files as models (``load_pretrained``, ``for_new_task``),
  with one rule for fitting the head layers, and what a weights name stands for (``resolve_weights``).
- ``hub``: the Hugging Face Hub (``hf-hub:ORG/REPO``) and timm's registered tags; ``timm_layout``: timm's
  state-dict layout (VGG's differs) to torchvision's and back. numpy only; ``huggingface_hub`` imported lazily.

Every public name is re-exported here: ``from jaxnets.weights import load_pretrained``.
"""

from jaxnets.weights.cache import DEFAULT_HOME, HOME_ENV, cache_dir
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
from jaxnets.weights.hub import (
    TIMM_CFG_KEY,
    TIMM_WEIGHTS,
    HubName,
    TimmWeights,
    cached_hub_path,
    is_hub_name,
    open_hub,
    parse_hub_name,
    timm_tags,
    timm_weights,
)
from jaxnets.weights.pretrained import (
    Conversion,
    cached_weights_path,
    convert,
    describe_weights,
    eval_transform_of,
    for_new_task,
    instantiate,
    load_pretrained,
    open_pretrained,
    pretrained_transform,
    reinitialize_head,
    resolve_weights,
    torchvision_weights_of,
)
from jaxnets.weights.timm_layout import from_timm_state_dict, is_timm_layout, to_timm_state_dict
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
    "Conversion", "DATA_PARALLEL_PREFIX", "DEFAULT_HOME", "FORMAT", "FORMAT_VERSION", "HOME_ENV", "HubName",
    "PathLike", "STATE_DICT_WRAPPERS", "SUFFIX", "TIMM_CFG_KEY", "TIMM_WEIGHTS", "TOLERANCE",
    "TORCHVISION_BUILD_KWARGS", "TimmWeights", "WeightsError", "WeightsFile", "cache_dir", "cached_hub_path",
    "cached_weights_path", "check_fits", "check_model_options", "check_variables", "compare_with_torchvision",
    "content_sha256", "convert", "describe_weights", "eval_transform_of", "expected_shapes", "export_torch",
    "fetch_torchvision_state_dict", "file_sha256", "for_new_task", "from_timm_state_dict", "instantiate",
    "is_hub_name", "is_timm_layout", "load_pretrained", "load_weights", "model_options", "open_hub",
    "open_pretrained", "parse_hub_name", "pretrained_transform", "read_state_dict", "reinitialize_head",
    "resolve_weights", "save_weights", "timm_tags", "timm_weights", "to_timm_state_dict", "torchvision_weights_of",
]

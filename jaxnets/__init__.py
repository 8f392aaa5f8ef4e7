"""jaxnets: torchvision's classic ImageNet CNNs in JAX/Flax, exact to the last digit."""

from jaxnets import export  # the subpackage (jaxnets.export.bundle, ...); its function is export_model
from jaxnets._version import __version__
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.export import export as export_model
from jaxnets.hub_upload import push_to_hub
from jaxnets.mapping import WeightMappingError, from_torch_state_dict, to_torch_state_dict
from jaxnets.models import GoogLeNetOutputs
from jaxnets.registry import (
    FeatureInfo,
    ModelSpec,
    PretrainedWeights,
    check_options,
    create_model,
    feature_info,
    get_spec,
    imagenet_categories,
    list_models,
    options,
)
from jaxnets.weights import (
    WeightsError,
    WeightsFile,
    export_torch,
    load_pretrained,
    load_weights,
    model_options,
    reinitialize_head,
    save_weights,
)
from jaxnets.weights.pretrained import adapt_input_conv

__all__ = [
    "EvalTransform", "FeatureInfo", "GoogLeNetOutputs", "ModelSpec", "PretrainedWeights", "UserError",
    "WeightMappingError", "WeightsError", "WeightsFile", "__version__", "adapt_input_conv", "check_options",
    "create_model", "export", "export_model", "export_torch", "feature_info", "from_torch_state_dict", "get_spec",
    "imagenet_categories", "list_models", "load_pretrained", "load_weights", "model_options", "options",
    "push_to_hub", "reinitialize_head", "save_weights", "to_torch_state_dict",
]

"""jaxnets: torchvision's classic ImageNet CNNs in JAX/Flax, exact to the last digit."""

from jaxnets.mapping import WeightMappingError, from_torch_state_dict, to_torch_state_dict
from jaxnets.models import GoogLeNetOutputs
from jaxnets.registry import (
                              EvalTransform,
                              ModelSpec,
                              PretrainedWeights,
                              create_model,
                              get_spec,
                              imagenet_categories,
                              list_models,
)

__version__ = "0.1.0"

__all__ = [
    "EvalTransform", "GoogLeNetOutputs", "ModelSpec", "PretrainedWeights", "WeightMappingError",
    "create_model", "from_torch_state_dict", "get_spec", "imagenet_categories", "list_models",
    "to_torch_state_dict",
]

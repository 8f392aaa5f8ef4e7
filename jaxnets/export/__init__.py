"""Deploy a jaxnets model without jaxnets: StableHLO, ONNX, TensorFlow SavedModel and TFLite.

    jaxnets.export(model, variables, "onnx", "resnet50-onnx")           # a directory: model.onnx, classes.txt, ...
    jaxnets-export --model resnet50 --weights final_weights.safetensors --format tflite --out resnet50-tflite

Each artifact takes a batch of any size of NHWC RGB images and is checked, in a fresh process that has only its
runtime (``runtime.py``), against the JAX function it came from. The formats' modules: ``to_stablehlo``
(``jax.export``), ``to_onnx`` (jax2onnx), ``to_tf`` (jax2tf, the TFLite converter); ``bundle`` writes the export
directory; ``verify`` runs the check. Every artifact holds XLA's own formulations of the layers (``exporter``).
The converters and runtimes are imported only when their format is asked for.

``jaxnets.export`` (the attribute of ``jaxnets``) is the function ``export``; ``from jaxnets.export import X``
and ``from jaxnets.export.verify import Y`` reach this package and its modules.
"""

from jaxnets.export.bundle import OutputExists
from jaxnets.export.exporter import FORMATS, ExportResult, check_format, export, export_function
from jaxnets.export.extras import EXTRAS, MissingDependency
from jaxnets.export.verify import Verification, VerificationError

__all__ = ["EXTRAS", "FORMATS", "ExportResult", "MissingDependency", "OutputExists", "Verification",
           "VerificationError", "check_format", "export", "export_function"]

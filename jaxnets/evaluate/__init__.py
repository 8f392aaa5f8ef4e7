"""Exact evaluation of a weights file on a dataset: ``jaxnets-evaluate`` / ``python -m jaxnets.evaluate``.

Four modules, data flowing one way:

- ``inputs``: the split to evaluate (``jaxnets.data``, as ``train.py`` reads it), its classes mapped to the
  model's outputs by name (ImageNet's synset folders to ImageNet's outputs), as padded, masked batches
  preprocessed by torchvision's PIL pipeline (identical pixels to ``weights.transforms()``) or by tf.data;
- ``metrics``: the report's tables (per-class accuracy, confusion, most confused pairs) from the per-image records
  that ``jaxnets.evaluation`` (the one evaluation core: pass, top-k, top-1/top-5/loss) produces;
- ``report``: ``eval.json``, the confusion matrix image, the printed tables;
- ``run``: which weights (a file, a run directory, torchvision's by name), and the pass through ``jaxnets.evaluation``.
"""

from jaxnets.evaluate.inputs import PREPROCESS, SPLITS, EvalData, load_eval_data, map_classes
from jaxnets.evaluate.report import CONFUSION_FILE, REPORT_FILE
from jaxnets.evaluate.run import EvalConfig, EvalResult, evaluate, open_weights
from jaxnets.evaluation import Records

__all__ = ["CONFUSION_FILE", "PREPROCESS", "REPORT_FILE", "SPLITS", "EvalConfig", "EvalData", "EvalResult", "Records",
           "evaluate", "load_eval_data", "map_classes", "open_weights"]

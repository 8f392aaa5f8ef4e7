"""The README's "every registered model runs on digits (VGG at 32 px, AlexNet at 64 px, the others at 16 px;
one model of each family is checked)": the first registered model of every family trains two steps on
digits at its default image size, evaluates, and writes its final weights; it logs each stage's gradient norm
(``--log-grad-norms``: one rule for every family) and plots them in gradients.png."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
from torch_oracle import one_per_family

import jaxnets
from jaxnets import training
from jaxnets.config import TrainConfig, resolve
from jaxnets.final_weights import FINAL_WEIGHTS
from jaxnets.run_io import GRAD_NORM, GRADIENTS_FILE, METRICS_FILE, read_metrics
from jaxnets.weights import load_weights

# The README's sizes, per family (not config.resolve's rule, which is what is checked).
DIGITS_SIZE = {"alexnet": 64, "vgg": 32}  # every other family: 16 (a new family's size is added here)


# Two digit classes, batch 4: VGG's and AlexNet's 4096-wide classifiers make every step count on a CPU.
FAMILY_RUN = TrainConfig(classes=(0, 1), batch_size=4, epochs=1, steps=2, log_every=1, progress=False,
                         log_grad_norms=True)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xdist_group(name))
                                  for name in one_per_family()])
def test_first_model_of_each_family_trains_on_digits_at_its_default_size(name, tmp_path_factory):
    family = jaxnets.get_spec(name).family
    config = dataclasses.replace(FAMILY_RUN, model=name, workdir=str(tmp_path_factory.mktemp(name)),
                                 compile_cache=str(tmp_path_factory.getbasetemp() / "jax_cache"))
    assert config.image_size is None  # the default is what is checked
    assert resolve(config).image_size == DIGITS_SIZE.get(family, 16)
    result = training.train_and_evaluate(config)
    assert result.step == 2 and result.interrupted is None
    train = [r for r in read_metrics(result.run_dir / METRICS_FILE) if r["split"] == "train"]
    losses = [r["loss"] for r in train]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # each step's stage norms, the same stages each time, in forward order: the classifier last, every head a stage
    spec = jaxnets.get_spec(name)
    stages = [[k for k in r if k.startswith(GRAD_NORM)] for r in train]
    assert stages[0] == stages[1] and stages[0][-1] == GRAD_NORM + spec.classifier.replace("/", ".")
    assert {GRAD_NORM + head.replace("/", ".") for head in spec.head} <= set(stages[0])
    assert all(0 < r[key] < math.inf for r in train for key in stages[0])
    assert (result.run_dir / GRADIENTS_FILE).stat().st_size > 0
    assert math.isfinite(result.metrics["loss"]) and 0 <= result.metrics["top1"] <= 1
    weights = load_weights(result.run_dir / FINAL_WEIGHTS)
    assert weights.name == name
    assert weights.metadata["eval_transform"]["crop_size"] == DIGITS_SIZE.get(family, 16)
    shutil.rmtree(result.run_dir)  # VGG's weights and checkpoints: 1.4 GB

"""Evaluate a weights file on a dataset: which weights, which images, and the pass over them on every device.

The weights are a file, a ``train.py`` run directory (its final weights, by default on the split of its dataset it
held out for validation, never on its training images) or
torchvision's by name; the eval transform is the weights' own (IMAGENET1K_V2: resize 232, crop 224; a
fine-tuned file: the sizes it was validated at; a file converted from timm's: timm's ``pretrained_cfg``, at its
default or, ``--eval-size test``, its test size). ``--preprocess torchvision`` is PIL exactly as torchvision's
``weights.transforms()`` (the default for torchvision's and other PyTorch weights); ``tf`` is ``train.py``'s
tf.data pipeline (the default for ``train.py``'s weights, which were validated with it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxnets import errors, evaluation, explain, parallel, predict
from jaxnets.data import ChannelMismatch, DataError, Shard
from jaxnets.data.pil_eval import preprocess as pil_preprocess
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.evaluate import report
from jaxnets.evaluate.inputs import PREPROCESS, EvalData, load_eval_data
from jaxnets.evaluation import TOP_K, Records, summary
from jaxnets.predict import classification
from jaxnets.registry import PretrainedWeights, create_model, get_spec, imagenet_categories, imagenet_wnids
from jaxnets.run_io import CONFIG_FILE
from jaxnets.weights import (
    WeightsFile,
    instantiate,
    is_hub_name,
    load_weights,
    open_pretrained,
    torchvision_weights_of,
)

DEFAULT_BATCH = 64  # global; rounded up to a multiple of the device count
EVAL_DIR = Path("runs")  # where the reports of torchvision's weights go by default (not into the weights cache)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate on what: the command's flags."""

    model: str | None = None
    weights: str | None = None  # a weights file or a train.py run directory
    pretrained: str | None = None  # torchvision's weights by name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT)
    dataset: str | None = None
    data_dir: str | None = None
    split: str | None = None
    preprocess: str | None = None
    eval_size: str = "default"  # timm's input size and crop_pct, or ("test") its test_input_size and test_crop_pct
    batch_size: int | None = None
    workers: int | None = None
    worker_kind: str = "process"
    devices: int | None = None
    distributed: str = "auto"  # parallel.DISTRIBUTED: "off" never joins a cluster (a single-process Slurm step)
    dtype: str = "float32"
    output: str | None = None
    progress: bool = True
    cam_errors: int | None = None  # class activation maps of the N most confident mistakes and least confident hits
    cam_method: str = "gradcam"
    cam_layer: str | None = None  # a torchvision node (jaxnets.explain.target_nodes); None: the last feature level


@dataclass
class Weights:
    """The weights to evaluate, opened, and what they say about how to evaluate them."""

    file: WeightsFile
    published: PretrainedWeights | None  # torchvision's weights they are, if they are
    run_config: dict[str, Any] = field(default_factory=dict)  # the train.py run's settings, from a run directory
    eval_size: str = "default"  # EvalConfig.eval_size

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def transform(self) -> EvalTransform:
        return classification.eval_transform(self.name, self.file, self.eval_size)

    def transform_note(self) -> str:
        """What the report says about the transform: where it comes from and what it does."""
        return (f"eval transform from {classification.transform_source(self.file, self.eval_size)}: "
                f"{self.transform.describe()}")

    @property
    def default_preprocess(self) -> str:
        """The pipeline the weights were validated with: recorded in the file, else ``tf`` for ``train.py``'s
        weights and ``torchvision`` for torchvision's and any other PyTorch-born file."""
        recorded = self.file.metadata.get("preprocess")
        if recorded in PREPROCESS:
            return recorded
        return "tf" if self.file.metadata.get("source") == "train.py" else "torchvision"

    def about(self) -> dict[str, Any]:
        """What the report says about the weights: model, file, content hash, and for torchvision's weights
        their version, published ImageNet-1k accuracy and training recipe."""
        published = self.published
        return {"model": self.name, "weights": str(self.file.path), "weights_sha256": self.file.sha256,
                "torchvision_weights": published.torchvision_name if published else None,
                "published": {"acc1": published.acc1, "acc5": published.acc5, "recipe": published.recipe}
                if published else None}

    def output_names(self) -> list[tuple[str, ...]]:
        """The names each output answers to: the recorded class names, ImageNet's WordNet id and name for
        1000 outputs (the order of ImageNet's sorted synset folders), else none."""
        names = predict.category_names(self.file)
        if names == imagenet_categories():
            return list(zip(imagenet_wnids(), names, strict=True))
        return [(name,) for name in names]


@dataclass
class EvalResult:
    """What an evaluation found; ``report`` is what ``eval.json`` holds."""

    metrics: dict[str, float | int]
    records: Records
    data: EvalData
    report: dict[str, Any]
    output: Path | None = None


def open_weights(config: EvalConfig) -> Weights:
    """``--weights FILE|RUN_DIR`` or ``--pretrained [NAME]`` (one of them), checked against ``--model``."""
    if (config.weights is None) == (config.pretrained is None):
        raise UserError("give the weights to evaluate: --weights FILE (or a train.py run directory), or "
                        "--pretrained [NAME] with --model")
    run_config: dict[str, Any] = {}
    if config.pretrained is not None:
        if config.model is None and not is_hub_name(config.pretrained):  # a Hub repo names its model
            raise UserError("--pretrained needs --model NAME (or hf-hub:ORG/REPO, which names it)")
        weights_file = open_pretrained(config.model, config.pretrained)
    else:
        weights_file = load_weights(predict.weights_path(config.weights))  # a run directory: its final weights
        if Path(config.weights).is_dir():
            run_config = _run_settings(Path(config.weights))
        if config.model is not None and get_spec(config.model).name != weights_file.name:
            raise UserError(f"--model {config.model}: {weights_file.path} holds {weights_file.name} weights")
    return Weights(weights_file, torchvision_weights_of(weights_file), run_config, config.eval_size)


def _run_settings(run_dir: Path) -> dict[str, Any]:
    """The settings of the run in ``run_dir`` (its ``config.json``), for the dataset it was validated on."""
    from jaxnets.config import TrainConfig

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    return TrainConfig.settings_from_json(path.read_text(encoding="utf-8"), str(path))


def evaluate(config: EvalConfig) -> EvalResult:
    """Evaluate the weights on every image of the split, data-parallel on all devices (of all processes);
    the main process writes ``eval.json`` and the confusion matrix to the output directory."""
    parallel.initialize(distributed=config.distributed)
    weights = open_weights(config)
    _check_cam(config, weights)
    transform = weights.transform  # before the data: a bad --eval-size or a malformed record costs no pass
    preprocess = config.preprocess or weights.default_preprocess
    if preprocess not in PREPROCESS:
        raise UserError(f"--preprocess {preprocess!r}: choose one of {', '.join(PREPROCESS)}")
    run = weights.run_config
    dataset = config.dataset or run.get("dataset")
    if dataset is None:
        raise UserError("--dataset is needed (a folder of class folders, 'digits', or a TFDS name such as "
                        "imagenet2012)")
    # The run's own data: split as train.py split it (its --val-fraction), evaluated by default on what it held out.
    own = "dataset" in run and _same_dataset(dataset, run["dataset"])
    split = config.split or ("val" if own else None)
    mesh = parallel.make_mesh(config.devices)
    global_batch = _global_batch(config.batch_size, mesh.devices.size)
    parallel.check_batch_size(global_batch, mesh)
    try:
        data = load_eval_data(dataset, config.data_dir or run.get("data_dir"), split, transform, global_batch,
                              weights.output_names(), Shard(jax.process_index(), jax.process_count()),
                              **({"val_fraction": run["val_fraction"]} if own and "val_fraction" in run else {}))
    except ChannelMismatch as error:  # its message names train.py's --in-chans; here the weights decide
        raise DataError(f"{weights.file.path}: a model of in_chans={error.in_chans} (its weights decide), but "
                        f"{error.found}: evaluate it on {error.in_chans}-channel data, or evaluate weights trained "
                        f"with {errors.command('train')} --in-chans {error.fits}") from None
    data.notes.append(weights.transform_note())
    if own and config.split is None:
        data.notes.insert(0, f"{config.weights}: evaluated on the {len(data)} images the run held out for validation "
                             f"(--split {split}); --split train or all for the others")
    if config.cam_errors is not None and len(data) and data.source(0) is None:
        raise UserError(f"--cam-errors: {data.name} is read as a stream, so its images cannot be found again for "
                        f"their maps; give a folder of class folders")
    model, variables = instantiate(weights.file, dtype=jnp.dtype(config.dtype))
    num_outputs = weights.file.num_classes
    step = evaluation.make_eval_step(model.apply, mesh, min(TOP_K, num_outputs))
    workers = config.workers or os.cpu_count() or 1
    start = time.perf_counter()
    records, rate = run_pass(step, jax.device_put(variables, parallel.replicated(mesh)),
                             data.batches(preprocess, transform, workers, config.worker_kind), mesh, len(data),
                             enabled=config.progress and parallel.is_main_process())
    metrics = summary(records, num_outputs)
    names = predict.category_names(weights.file)
    payload = report.build(weights.about(), names, data, records, metrics, preprocess=preprocess,
                           transform=transform, images_per_second=rate, seconds=time.perf_counter() - start,
                           devices=mesh.devices.size)
    output = None
    if parallel.is_main_process():
        output = _output_dir(config, weights, data)
        report.write(output, payload, records, names)
        report.show(payload, output)
        if config.cam_errors is not None:
            sheets = cam_sheets(model, variables, data, records, names, transform, config.cam_method,
                                config.cam_layer, config.cam_errors, global_batch)
            for path in report.write_cam_sheets(output, sheets):
                print(f"wrote {path}")
    return EvalResult(metrics, records, data, payload, output)


def _check_cam(config: EvalConfig, weights: Weights) -> None:
    """The ``--cam-*`` flags, before the pass: a mistake here should not cost an evaluation."""
    if config.cam_errors is None:
        if config.cam_layer is not None:
            raise UserError("--cam-layer needs --cam-errors N")
        return
    if not errors.is_int(config.cam_errors) or config.cam_errors < 1:
        raise UserError(f"--cam-errors must be an integer >= 1, got {config.cam_errors!r}")
    if config.cam_method not in explain.METHODS:
        raise UserError(f"--cam-method {config.cam_method!r}: choose one of {', '.join(explain.METHODS)}")
    if predict.is_multi_label(weights.file):
        raise UserError(f"--cam-errors: {weights.file.path} holds multi-label weights, whose examples are not "
                        f"simply hits or mistakes; use {errors.command('predict')} --cam on the images instead")
    nodes = explain.target_nodes(create_model(weights.name, **weights.file.model_options))  # a module: no weights
    if config.cam_layer is not None and config.cam_layer not in nodes:
        raise UserError(f"--cam-layer {config.cam_layer}: not a feature node of {weights.name}; choose one of "
                        f"{', '.join(nodes)}")


def _cam_example(source: Any, transform: EvalTransform) -> tuple[Any, np.ndarray]:
    """An example's original picture and its model input, read again for its map (by PIL, as
    ``--preprocess torchvision`` reads it, whichever pipeline evaluated it)."""
    if not isinstance(source, np.ndarray):  # a file
        return classification.cam_background(source, transform), predict.load_input(source, transform)
    channels = source.shape[-1]
    if channels not in (1, 3) or channels != transform.in_chans:
        raise UserError(f"--cam-errors: images of {channels} channel(s) for a model of in_chans="
                        f"{transform.in_chans}; maps are drawn for 1 or 3 channels")
    image = Image.fromarray(source if channels == 3 else source[..., 0])
    pixels = pil_preprocess(image, transform)
    return source, pixels if channels == 3 else pixels[..., None]


def cam_sheets(model: Any, variables: Any, data: EvalData, records: Records, names: Sequence[str],
               transform: EvalTransform, method: str, layer: str | None, count: int,
               batch_size: int) -> dict[str, Image.Image]:
    """Contact sheets of the maps of the ``count`` most confident mistakes and the ``count`` least confident hits
    (``explain.confidence_extremes``), each for the class the model predicted: ``{'mistakes': ..., 'hits': ...}``,
    without an empty group. The maps come from one ``explain.cam`` call (one compilation)."""
    mistakes, hits = explain.confidence_extremes(records.label, records.predicted, records.prob[:, 0], count)
    chosen = np.concatenate([mistakes, hits]).astype(int)
    if not len(chosen):
        return {}
    pictures, inputs = zip(*(_cam_example(data.source(int(i)), transform) for i in chosen), strict=True)
    targets = records.predicted[chosen]
    maps = explain.cam(model, variables, np.stack(inputs), method, layer, targets,
                       batch_size=min(batch_size, len(chosen)))
    overlays = [explain.overlay(picture, cam_map, explain.caption(names[records.predicted[i]],
                                                                  float(records.prob[i, 0]), names[records.label[i]]),
                                transform=transform)
                for picture, cam_map, i in zip(pictures, maps, chosen, strict=True)]
    sheets = {}
    if len(mistakes):
        sheets["mistakes"] = explain.contact_sheet(overlays[:len(mistakes)],
                                                   f"the {len(mistakes)} most confident mistakes ({method})")
    if len(hits):
        sheets["hits"] = explain.contact_sheet(overlays[len(mistakes):],
                                               f"the {len(hits)} least confident hits ({method})")
    return sheets


def _same_dataset(a: str, b: str) -> bool:
    """Whether two spellings name the same dataset: the same folder (however the path is written), or name."""
    if a == b:
        return True
    folder_a, folder_b = Path(a).expanduser(), Path(b).expanduser()
    return folder_a.is_dir() and folder_b.is_dir() and folder_a.resolve() == folder_b.resolve()


def _global_batch(batch_size: int | None, devices: int) -> int:
    if batch_size is not None:
        return batch_size
    return -(-DEFAULT_BATCH // devices) * devices


def _output_dir(config: EvalConfig, weights: Weights, data: EvalData) -> Path:
    """``--output``, else next to the weights file; torchvision's weights (in the cache) report to
    ``runs/eval-<weights file>-<dataset>``."""
    if config.output:
        return Path(config.output)
    if config.pretrained is not None:
        return EVAL_DIR / f"eval-{Path(weights.file.path).stem}-{data.name}"
    return Path(weights.file.path).parent


def run_pass(step: Callable, variables: Any, batches: Iterator[dict[str, np.ndarray]], mesh: Any, total: int, *,
             enabled: bool = True) -> tuple[Records, float | None]:
    """Every batch through ``step`` (``jaxnets.evaluation.run_pass``), with a progress bar: the records of the
    real images, in order, and the images per second after the first batch (which includes compiling); None for
    a pass of one batch, which nothing is left to time after."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="img", desc="evaluating", dynamic_ncols=True, disable=not enabled)
    first_done: tuple[float, int] | None = None
    done = 0

    def arrived(count: int) -> None:
        nonlocal first_done, done
        done += count
        bar.update(count)
        if first_done is None:
            first_done = (time.perf_counter(), done)

    records = Records.of(evaluation.run_pass(step, variables, batches, mesh, on_batch=arrived))
    bar.close()
    rate = None
    if first_done is not None and done > first_done[1]:
        rate = (done - first_done[1]) / max(time.perf_counter() - first_done[0], 1e-9)
    return records, rate

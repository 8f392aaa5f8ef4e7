"""A training run's deliverable: ``final_weights.safetensors`` in its run directory, the file ``jaxnets-evaluate``,
``jaxnets-export``, ``jaxnets.predict`` and ``jaxnets.load_pretrained`` read. Its name and its writer live here,
apart from the trainer, so that the readers do not import the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jaxnets import ema, parallel
from jaxnets.run_io import METRICS_FILE, RunLog, headline, read_metrics

if TYPE_CHECKING:
    from jaxnets.config import TrainConfig
    from jaxnets.train_step import TrainState

FINAL_WEIGHTS = "final_weights.safetensors"


def save_final_weights(config: TrainConfig, state: TrainState, class_names: tuple[str, ...],
                       metrics: dict[str, float], run: RunLog) -> None:
    """``final_weights.safetensors``: the format ``jaxnets.load_pretrained`` reads. With ``--model-ema`` it holds
    the average (its header says so: ``weights: ema``, the adjusted ``ema_decay``), and ``metrics`` are the
    average's; a multi-label model's header says ``multi_label`` (``jaxnets.predict`` then thresholds each class)."""
    from jaxnets.weights import model_options, save_weights

    variables = parallel.to_host((state if state.ema is None else state.averaged()).variables)
    # Every option the model was built with (GoogLeNet's transform_input from pretrained weights too), so that
    # load_pretrained rebuilds the same model; apply_fn is the model's bound apply.
    options = model_options(config.spec, state.apply_fn.__self__)
    # The eval transform the model was validated with (sizes, and statistics for its in_chans), for jaxnets.predict.
    eval_transform = config.data_config().eval_transform.to_record()
    recipe = {**({"weights": "ema", "ema_decay": ema.decay_of(config)} if state.ema is not None else {}),
              **({"multi_label": True} if config.multi_label else {})}
    score = {"val_map": metrics["map"]} if config.multi_label else {"val_top1": metrics["top1"]}
    path = save_weights(Path(config.workdir) / FINAL_WEIGHTS, config.spec, variables, model_options=options,
                        metadata={"source": "train.py", "dataset": config.dataset, "categories": list(class_names),
                                  "step": metrics["step"], **score, "eval_transform": eval_transform, **recipe})
    what = f" (the EMA of the weights, decay {recipe['ema_decay']:.6g}: {headline(metrics)})" if state.ema else ""
    run.print(f"final weights{what}: {path}")


def finished_metrics(workdir: Path, step: int) -> dict[str, float] | None:
    """The final evaluation of a run that ended at ``step`` and wrote its final weights, else None (the run
    still has to evaluate, or write the weights a full disk kept it from writing)."""
    from jaxnets.weights import WeightsError, load_weights

    try:
        if load_weights(workdir / FINAL_WEIGHTS).metadata.get("step") != step:
            return None
    except (WeightsError, OSError):
        return None
    records = [r for r in read_metrics(workdir / METRICS_FILE) if r["split"] == "val" and r["step"] == step]
    return {k: v for k, v in records[-1].items() if k not in ("step", "epoch", "split")} if records else None

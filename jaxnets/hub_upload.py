"""Share weights on the Hugging Face Hub: a jaxnets weights file (or a ``train.py`` run directory) as a repo that
jaxnets (``hf-hub:ORG/REPO``) and timm (``timm.create_model("hf-hub:ORG/REPO", pretrained=True)``) both load.

The repo is timm's format: ``model.safetensors`` in timm's key layout (torchvision's, but VGG's classifier as
timm's convolutions: ``weights.timm_layout``) and a ``config.json`` with ``architecture``, ``num_classes``,
``label_names`` and a ``pretrained_cfg`` whose eval settings are the file's eval transform; a ``jaxnets``
section keeps what timm has no key for (the model options, the file's metadata). With them: ``classes.txt``, a
model card (``README.md``: base checkpoint and its licence, dataset, metrics, curves, eval transform, how to
load) and, from a run directory, ``curves.png``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxnets import errors
from jaxnets._version import __version__
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.fileio import write_text
from jaxnets.mapping import stem_kernels, to_torch_state_dict
from jaxnets.registry import ModelSpec, get_spec
from jaxnets.run_io import CONFIG_FILE as RUN_CONFIG_FILE
from jaxnets.run_io import CURVES_FILE, METRICS_FILE, read_metrics
from jaxnets.weights.fileformat import PathLike, WeightsError, WeightsFile, load_weights, write_safetensors
from jaxnets.weights.hub import CONFIG_FILE, HUB_EXTRA, JAXNETS_KEY, TIMM_CFG_KEY, WEIGHTS_FILES
from jaxnets.weights.timm_layout import VGG_EXACT_SIZE, to_timm_state_dict

CLASSES_FILE = "classes.txt"
CARD_FILE = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload jaxnets weights"
# timm's own architectures among jaxnets' (timm has no AlexNet or GoogLeNet: those repos load in jaxnets only).
TIMM_FAMILIES = ("resnet", "vgg")
TORCHVISION_LICENCE = "bsd-3-clause"  # torchvision's weights, as timm's tv_in1k configs state their licence
UNKNOWN_LICENCE = "other"  # the card's licence when none is recorded or given
# Metadata of the pushed file kept in config.json's jaxnets section (what a loaded copy needs, e.g. to predict);
# its provenance (source, hashes, the timm cfg) is the Hub repo's own once pushed.
KEPT_METADATA = ("dataset", "categories", "eval_transform", "multi_label", "weights", "ema_decay", "step",
                 "val_top1", "val_map", "base", "licence")


def push_to_hub(weights_or_run_dir: PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str = DEFAULT_COMMIT_MESSAGE, token: str | None = None,
                license: str | None = None) -> str:  # noqa: A002  (the Hub's word)
    """Upload a jaxnets weights file, or a ``train.py`` run directory's final weights with its metrics and curves,
    to the Hub repo ``repo_id`` (created when missing; ``private``) on branch ``revision`` (None: main): the
    folder ``write_hub_folder`` writes. Returns the commit's URL. ``license`` (a Hub licence id) overrides the one
    derived from the base checkpoint. A missing token or a network failure is a one-line ``UserError``."""
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise UserError(f"pushing to the Hub needs huggingface_hub ({errors.install_hint(HUB_EXTRA)})") from None
    if token is None and get_token() is None:
        raise UserError(f"{repo_id}: no Hugging Face token: log in (hf auth login), set HF_TOKEN, or pass a token")
    with tempfile.TemporaryDirectory(prefix="jaxnets-push-") as tmp:
        folder = write_hub_folder(weights_or_run_dir, Path(tmp) / "repo", repo_id=repo_id, license=license)
        api = HfApi(token=token, library_name="jaxnets", library_version=__version__)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message)
        except _network_errors() as exc:
            raise UserError(f"{repo_id}: upload to the Hugging Face Hub failed ({errors.one_line(exc)})") from None
    return str(getattr(commit, "commit_url", commit))


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the Hub refuses or cannot be reached: its own errors, and those of the HTTP
    library it uses (httpx2, httpx or requests, by version; requests' are OSErrors)."""
    from huggingface_hub import errors as hub_errors

    found: list[type[BaseException]] = [hub_errors.HfHubHTTPError, hub_errors.OfflineModeIsEnabled, OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(module).HTTPError)
    return tuple(found)


def write_hub_folder(weights_or_run_dir: PathLike, folder: PathLike, *, repo_id: str = "ORG/REPO",
                     license: str | None = None) -> Path:  # noqa: A002
    """The folder ``push_to_hub`` uploads, written into ``folder`` (created; files in it replaced): weights in
    timm's layout, ``config.json``, ``classes.txt``, ``README.md`` and, from a run directory, ``curves.png``."""
    source = Path(weights_or_run_dir)
    run_dir = source if source.is_dir() else None
    weights_file = load_weights(_weights_path(source))
    spec = get_spec(weights_file.name)
    if weights_file.model_options.get("features_only"):
        raise WeightsError(f"{weights_file.path}: {spec.name} backbone weights (features_only, no classifier): "
                           "push a classifier")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from jaxnets.predict.classification import category_names, eval_transform

    transform = eval_transform(spec, weights_file)
    categories = category_names(weights_file)
    base, licence = _base(weights_file, run_dir)
    licence = license or licence or UNKNOWN_LICENCE
    state = to_timm_state_dict(spec, to_torch_state_dict(spec, weights_file.variables))
    write_safetensors(folder / WEIGHTS_FILES[0], state, {"format": "pt"})
    config = hub_config(spec, weights_file, transform, categories, licence, base)
    write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    write_text(folder / CLASSES_FILE, "".join(f"{name}\n" for name in categories))
    records = read_metrics(run_dir / METRICS_FILE) if run_dir and (run_dir / METRICS_FILE).is_file() else []
    curves = run_dir / CURVES_FILE if run_dir and (run_dir / CURVES_FILE).is_file() else None
    if curves is not None:
        shutil.copyfile(curves, folder / CURVES_FILE)
    write_text(folder / CARD_FILE, model_card(repo_id, spec, weights_file, transform, categories, licence, base,
                                              records, curves is not None))
    return folder


def _weights_path(source: Path) -> Path:
    from jaxnets.final_weights import FINAL_WEIGHTS

    if source.is_dir():
        if not (source / FINAL_WEIGHTS).is_file():
            raise UserError(f"{source}: a directory without {FINAL_WEIGHTS}; give a weights file or a finished "
                            "train.py run directory")
        return source / FINAL_WEIGHTS
    return source


def hub_config(spec: ModelSpec, weights_file: WeightsFile, transform: EvalTransform, categories: Sequence[str],
               licence: str, base: str | None) -> dict[str, Any]:
    """``config.json`` of the repo: timm's keys (what ``timm.create_model("hf-hub:...")`` reads) and the
    ``jaxnets`` section."""
    in_chans = int(weights_file.model_options.get("in_chans", 3))
    (stem,) = stem_kernels(spec)[:1]
    classifier = "head.fc" if spec.family == "vgg" else spec.classifier.replace("/", ".")
    pretrained_cfg = {
        "custom_load": False,
        **transform.to_timm_cfg(),
        "fixed_input_size": False,
        "num_classes": weights_file.num_classes,
        "first_conv": ".".join(stem[1:-1]),
        "classifier": classifier,
        "license": licence,
    }
    kept = {k: weights_file.metadata[k] for k in KEPT_METADATA if k in weights_file.metadata}
    kept.update(licence=licence, **({"base": base} if base else {}))
    config = {"architecture": spec.name, "num_classes": weights_file.num_classes, "global_pool": "avg",
              "label_names": list(categories), "pretrained_cfg": pretrained_cfg,
              JAXNETS_KEY: {"model_options": weights_file.model_options, "metadata": kept,
                            "jaxnets_version": __version__}}
    if in_chans != 3:
        config["model_args"] = {"in_chans": in_chans}
    return config


def _base(weights_file: WeightsFile, run_dir: Path | None) -> tuple[str | None, str | None]:
    """``(base checkpoint, its licence)``: for a run, its ``--pretrained`` (the run's config.json); for a file,
    what its metadata says it was converted from. None where nothing is recorded."""
    metadata = weights_file.metadata
    if "base" in metadata:
        return metadata["base"], metadata.get("licence")
    if run_dir is not None and (run_dir / RUN_CONFIG_FILE).is_file():
        try:
            pretrained = json.loads((run_dir / RUN_CONFIG_FILE).read_text(encoding="utf-8")).get("pretrained")
        except (ValueError, AttributeError):
            pretrained = None
        if pretrained is not None:
            return _describe_pretrained(weights_file.name, None if pretrained == "default" else pretrained)
        return "none (trained from scratch)", None
    if "torchvision_weights" in metadata:
        return f"torchvision's {weights_file.name} {metadata['torchvision_weights']}", TORCHVISION_LICENCE
    if "hub" in metadata:
        return f"{metadata['source']}" + (f" (timm's {metadata['timm_tag']})" if "timm_tag" in metadata else ""), \
            metadata.get("licence") or metadata.get(TIMM_CFG_KEY, {}).get("license")
    return metadata.get("source"), metadata.get("licence")


def _describe_pretrained(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """A run's ``--pretrained`` value as the base checkpoint and its licence."""
    from jaxnets.registry import PretrainedWeights
    from jaxnets.weights import hub
    from jaxnets.weights.pretrained import describe_weights, resolve_weights

    try:
        resolved = resolve_weights(model, pretrained)
    except UserError:
        return str(pretrained), None
    if isinstance(resolved, PretrainedWeights):
        return f"torchvision's {model} {resolved.torchvision_name}", TORCHVISION_LICENCE
    if isinstance(resolved, hub.TimmWeights):
        return f"timm's {resolved.repo_id}", resolved.licence
    return describe_weights(resolved), getattr(resolved, "licence", None)


def _metrics_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The last record of each validation split, as a Markdown table."""
    last = {r.get("split"): r for r in records if str(r.get("split", "")).startswith("val")}
    if not last:
        return []
    keys = [k for k in ("top1", "top5", "map", "loss") if any(k in r for r in last.values())]
    lines = ["| split | epoch | step | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for split, record in last.items():
        values = [f"{record[k]:.4g}" if isinstance(record.get(k), int | float) else "" for k in keys]
        lines.append(f"| {split} | {record.get('epoch', '')} | {record.get('step', '')} | " + " | ".join(values) + " |")
    return lines


def model_card(repo_id: str, spec: ModelSpec, weights_file: WeightsFile, transform: EvalTransform,
               categories: Sequence[str], licence: str, base: str | None, records: Sequence[Mapping[str, Any]],
               has_curves: bool) -> str:
    """The repo's ``README.md``: Hub metadata, then base checkpoint, dataset, metrics, eval transform and loading."""
    timm_loads = spec.family in TIMM_FAMILIES
    metadata = weights_file.metadata
    tags = ["image-classification", "jaxnets", *(["timm"] if timm_loads else [])]
    shown = ", ".join(categories[:10]) + (", ..." if len(categories) > 10 else "")
    lines = ["---", f"license: {licence}", f"library_name: {'timm' if timm_loads else 'jaxnets'}", "tags:",
             *[f"- {tag}" for tag in tags], "---", "", f"# {repo_id}", "",
             f"A {spec.name} image classifier ({weights_file.num_classes} classes), written by "
             f"jaxnets {__version__}.", "",
             "## Base checkpoint", "", f"{base or 'not recorded'}; licence: {licence}.", "",
             "## Dataset", "", f"{metadata.get('dataset', 'not recorded')}; classes ({len(categories)}): {shown} "
             f"(all in `{CLASSES_FILE}`).", "", "## Metrics", ""]
    table = _metrics_table(records)
    score = {k: metadata[k] for k in ("val_top1", "val_map") if k in metadata}
    lines += table or ([f"At the end of training: {', '.join(f'{k} {v:.4g}' for k, v in score.items())}."]
                       if score else ["Not recorded."])
    if has_curves:
        lines += ["", f"![training curves]({CURVES_FILE})"]
    resize = "both sides" if transform.crop_mode == "squash" else "the shorter side"
    lines += ["", "## Eval transform", "",
              f"Resize {resize} to {transform.resize_size} ({transform.interpolation}), {transform.crop_mode} crop "
              f"{transform.crop_size}, normalize with mean {list(transform.mean)} and std {list(transform.std)}; "
              f"NHWC in jaxnets, NCHW in timm.", "", "## How to load", "", "```python",
              "import jaxnets", f'model, variables = jaxnets.load_pretrained("hf-hub:{repo_id}")', "```", "",
              f"or `jaxnets-evaluate --model {spec.name} --pretrained hf-hub:{repo_id} ...`."]
    if timm_loads:
        lines += ["", "```python", "import timm", f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)',
                  "```"]
        if spec.family == "vgg":
            lines += ["", f"timm's VGG computes torchvision's (jaxnets') VGG only at {VGG_EXACT_SIZE} px input: "
                          "at other sizes its convolutional classifier sees another feature map."]
    else:
        lines += ["", f"timm has no {spec.name}: the weights are in torchvision's layout "
                      f"(`torchvision.models.{spec.name}`'s `load_state_dict` takes them)."]
    return "\n".join(lines) + "\n"

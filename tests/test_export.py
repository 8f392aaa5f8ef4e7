"""``jaxnets.export``: every format's artifact, loaded in a fresh process that has only its runtime (the other
packages cannot even be imported there), gives what jaxnets' own ``model.apply`` gives.

The oracle is ``model.apply(variables, x, train=False)`` on the same batches (random values, and scikit-learn's two
sample photos put through jaxnets' eval transform, ``jaxnets.data.pil_eval``), at batch sizes 1 and 3 of the same
artifact (its batch dimension is dynamic), within the bound jaxnets holds its models to: max |diff| <=
1e-4 * (1 + max |logit|), float32. One model per family at a small input: ResNet-18 (with randomized BatchNorm
statistics; strided 1x1 convolutions), GoogLeNet's eval graph (no aux heads; ceil-mode pools; transform_input),
AlexNet (11x11/4 convolution, the general adaptive pooling matrices, the classifier), VGG-11-BN as a
``features_only`` backbone (its list of feature maps), and ResNeXt-50's stem and first stage (grouped
convolutions; its backbone stops there). Every family goes to StableHLO; each converter of its own
(``HEAVY_FAMILY``: ONNX, SavedModel, TFLite, a minute or more each) gets the family that tests what it adds:
ONNX ResNeXt's grouped convolutions, SavedModel GoogLeNet (its weights stored as variables, the aux heads'
left out), TFLite VGG's list of outputs. In every format ResNet-18 is also exported with the preprocessing and
the softmax inside (uint8 in, probabilities out; its padded max pool is ONNX's re-emitted pool), against
``pil_eval``'s normalization of the same pixels, and as TFLite with int8 weights (top-1 agreement reported, not
held to the float bound). Every artifact holds XLA's formulations, whatever this machine's kernel choice.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

import jaxnets
from jaxnets import kernels, layers, trees, tuned_kernels
from jaxnets.cli import export as cli
from jaxnets.data import pil_eval
from jaxnets.eval_transform import EvalTransform
from jaxnets.export import FORMATS, MissingDependency, OutputExists, VerificationError, export, export_function
from jaxnets.export import verify as verification
from jaxnets.export.runtime import RUNTIME_PACKAGES
from jaxnets.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
# name -> (input size, create_model options)
FAMILIES = {
    "resnet18": (32, {}),
    "googlenet": (32, {"transform_input": True}),
    "alexnet": (63, {}),
    "vgg11_bn": (32, {"features_only": True, "out_indices": (1, 3, 4)}),
    "resnext50_32x4d": (32, {"features_only": True, "out_indices": (1,)}),  # grouped convolutions, stem to layer1
}
# The family each converter besides StableHLO's exports (StableHLO: every family), with what it proves there.
HEAVY_FAMILY = {"onnx": "resnext50_32x4d",  # grouped convolutions as ONNX Conv groups
                "saved_model": "googlenet",  # only the weights the eval graph reads become variables
                "tflite": "vgg11_bn"}  # a list of outputs through TFLite's signature


def within_bound(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    assert expected.shape == actual.shape
    return float(np.abs(expected - actual).max()), 1e-4 * (1 + float(np.abs(expected).max()))


def random_variables(model, size: int, seed: int) -> dict:
    """Random variables of ``model``'s shapes (cheaper than ``init``: GoogLeNet's takes half a minute of CPU), scaled
    like He initialization; BatchNorm's running statistics far from 0 and 1, so that the eval-mode normalization is
    exercised."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
        if name in ("var", "scale"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.2, shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


ONNX_PACKAGES = ("jax2onnx", "onnx", "onnxruntime")  # the [onnx] extra: its tests skip where it is not installed


def needs_onnx() -> None:
    for module in ONNX_PACKAGES:
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """scikit-learn's bundled photos (china.jpg, flower.jpg, 427 x 640) and a mirror image of the first."""
    china, flower = (Image.fromarray(array) for array in load_sample_images().images)
    return [china, flower, china.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]


@pytest.fixture(scope="module")
def cases(photos):
    """Per family: the model, its variables, the input batches and ``model.apply``'s outputs on them."""
    built = {}
    for index, (name, (size, options)) in enumerate(FAMILIES.items()):
        model = jaxnets.create_model(name, num_classes=NUM_CLASSES, **options)
        variables = random_variables(model, size, index)
        transform = EvalTransform().at_crop(size)
        real = np.stack([pil_eval.preprocess(photo, transform) for photo in photos])
        rng = np.random.default_rng(index)
        inputs = {"random1": rng.standard_normal((1, size, size, 3), np.float32),
                  "random3": rng.standard_normal((3, size, size, 3), np.float32),
                  "photo1": real[:1], "photo3": real}
        apply = jax.jit(partial(model.apply, train=False))
        expected = {key: _as_list(apply(variables, batch)) for key, batch in inputs.items()}
        built[name] = (model, variables, size, inputs, expected)
    return built


def artifact_bytes(result) -> int:
    path = result.path / result.files["model"]
    return sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size


def _as_list(out) -> list[np.ndarray]:
    return [np.asarray(y) for y in (out if isinstance(out, (list, tuple)) else [out])]


@pytest.fixture(scope="module")
def preprocessed(photos):
    """ResNet-18 served on uint8 pixels with the softmax inside: uint8 batches (photos squashed to 32 px, random
    pixels) and the probabilities of ``model.apply`` on ``pil_eval``'s normalization of the same pixels."""
    size = 32
    model = jaxnets.create_model("resnet18", num_classes=NUM_CLASSES)
    variables = random_variables(model, size, 7)
    pixels = np.stack([np.asarray(photo.resize((size, size), Image.Resampling.BILINEAR)) for photo in photos])
    rng = np.random.default_rng(7)
    inputs = {"photo1": pixels[:1], "photo3": pixels, "random3": rng.integers(0, 256, (3, size, size, 3), np.uint8)}
    exact = EvalTransform().at_crop(size, resize_size=size)  # PIL leaves a same-size resize alone: normalize only
    expected = {}
    for key, batch in inputs.items():
        normalized = np.stack([pil_eval.preprocess(Image.fromarray(image), exact) for image in batch])
        expected[key] = [np.asarray(jax.nn.softmax(model.apply(variables, normalized, train=False), axis=-1))]
    return model, variables, size, inputs, expected


@pytest.mark.xdist_group("export")
@pytest.mark.parametrize("format", FORMATS)
def test_every_family_exported_reproduces_model_apply_in_a_process_with_only_the_runtime(format, cases, preprocessed,
                                                                                          tmp_path):
    if format == "onnx":
        needs_onnx()
    jobs, expectations = [], []
    for name in FAMILIES if format == "stablehlo" else [HEAVY_FAMILY[format]]:
        model, variables, size, inputs, expected = cases[name]
        result = export(model, variables, format, tmp_path / name, image_size=size, verify=False)
        assert result.signature.input_shape == (size, size, 3)
        if name == "googlenet":  # its eval graph: the aux heads' weights (40 % of them here) are not in the artifact
            flat = trees.flatten(variables)
            aux = sum(leaf.nbytes for key, leaf in flat.items() if key.startswith(("params/aux1", "params/aux2")))
            used = sum(leaf.nbytes for leaf in flat.values()) - aux
            # Every weight the eval graph reads is there (XLA's formulations: no convolution tap left out).
            assert 0.9 * used < artifact_bytes(result) < used + aux / 10, (artifact_bytes(result), used, aux)
        if format == "onnx":  # XLA's formulations on this machine too, whose default may be tuned: a Conv per kernel
            import onnx

            ops = [node.op_type for node in onnx.load(str(result.path / "model.onnx")).graph.node]
            kernel_ranks = [leaf.ndim for key, leaf in trees.flatten(variables).items() if key.endswith("kernel")]
            assert ops.count("Conv") == kernel_ranks.count(4) and "MatMul" not in ops, sorted(set(ops))
        jobs.append(verification.Job(result.path, inputs))
        expectations.append((name, expected))
    model, variables, size, inputs, expected = preprocessed
    result = export(model, variables, format, tmp_path / "preprocessed", image_size=size, with_preprocessing=True,
                    softmax=True, verify=False, int8=format == "tflite")
    assert result.signature.input_dtype == "uint8" and result.signature.output_names == ("probabilities",)
    jobs.append(verification.Job(result.path, inputs))
    expectations.append(("resnet18 uint8 + softmax", expected))
    if format == "tflite":
        jobs.append(verification.Job(result.path, inputs, artifact="int8"))

    run = verification.run_in_fresh_process(jobs)

    assert "jaxnets" not in run.imported and not verification.unexpected_imports(format, run), run
    assert set(run.imported) & RUNTIME_PACKAGES[format], run  # it did run on its runtime
    for (name, expected), outputs in zip(expectations, run.outputs[:len(expectations)], strict=True):
        for key, want in expected.items():
            assert len(outputs[key]) == len(want), (name, key)
            for level, (w, got) in enumerate(zip(want, outputs[key], strict=True)):
                diff, bound = within_bound(w, got)
                assert diff <= bound, f"{format} {name} {key} output {level}: max |diff| {diff:.3g} > {bound:.3g}"
    if format == "tflite":
        int8 = run.outputs[-1]
        agreement = np.mean(np.concatenate([np.argmax(expected[key][0], -1) == np.argmax(int8[key][0], -1)
                                            for key in expected]))
        print(f"tflite int8: top-1 agreement with float32 model.apply on {sorted(expected)}: {agreement:.0%}")
        assert (result.path / "model.int8.tflite").stat().st_size < (result.path / "model.tflite").stat().st_size / 3


def test_the_export_directory_describes_its_artifact(cases, tmp_path):
    """classes.txt, export.json and the README of a classifier (ImageNet's names for 1000 classes) and of a
    backbone (its levels, no class names)."""
    model = jaxnets.create_model("resnet18")
    variables = random_variables(model, 32, 0)
    result = export(model, variables, "stablehlo", tmp_path / "r18", image_size=32, verify=False,
                    platforms=("cpu",))
    assert (result.path / "classes.txt").read_text().splitlines() == list(jaxnets.imagenet_categories())
    record = json.loads((result.path / "export.json").read_text())
    assert record["input"] == {"name": "images", "shape": ["batch", 32, 32, 3], "dtype": "float32"}
    assert record["outputs"] == [{"name": "logits", "shape": ["batch", 1000], "dtype": "float32"}]
    assert record["eval_transform"]["crop_size"] == 32 and record["eval_transform"]["resize_size"] == 37
    readme = (result.path / "README.txt").read_text()
    assert "resize the shorter side to 37 px" in readme and "center-crop 32 x 32" in readme
    assert "exported.mlir_module()" in readme and "model.mlir" not in readme

    model, variables, size, _, _ = cases["vgg11_bn"]
    backbone = export(model, variables, "stablehlo", tmp_path / "vgg", image_size=size, verify=False,
                      platforms=("cpu",))
    record = json.loads((backbone.path / "export.json").read_text())
    assert [level["node"] for level in record["features"]] == [
        info.node for info in jaxnets.feature_info("vgg11_bn", (1, 3, 4))]
    assert [o["name"] for o in record["outputs"]] == ["features_1", "features_3", "features_4"]
    assert not (backbone.path / "classes.txt").exists()


def test_a_stablehlo_bundle_holds_the_weights_once_and_its_mlir_text_only_on_request(cases, tmp_path):
    """``model.stablehlo`` embeds the weights once for all four platforms (one module); ``model.mlir``, the
    weights again as hex text (twice their size), is written only when asked for."""
    model, variables, size, _, _ = cases["resnet18"]
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(variables))
    result = export(model, variables, "stablehlo", tmp_path / "r18", image_size=size, verify=False)
    assert len(result.record["platforms"]) == 4 and result.files == {"model": "model.stablehlo"}
    assert not (result.path / "model.mlir").exists()
    assert result.size_bytes < 1.3 * weights, (result.size_bytes, weights)

    text = export_tiny(tmp_path / "text", mlir_text=True)
    assert text.files == {"model": "model.stablehlo", "mlir_text": "model.mlir"}
    assert "func.func public @main" in (text.path / "model.mlir").read_text()
    assert "model.mlir" in (text.path / "README.txt").read_text()


# --- what the artifacts hold: XLA's formulations, whatever the machine ---------------------------------------


def tuned_custom_rules() -> list[str]:
    """The names of the tuned variants' custom derivative rules, as a jaxpr names their calls."""
    return [name for name, rule in vars(tuned_kernels).items() if isinstance(rule, (jax.custom_jvp, jax.custom_vjp))]


def test_an_artifact_holds_xla_s_formulations_whatever_the_machine_s_default(tmp_path, monkeypatch):
    """With the process default set to every tuned variant, a plain trace of ResNet-18 at 32 px has them (the
    separable pool's two windows and custom JVPs, 1x1 and 1x1-map convolutions as dot_general); its export has
    none: one convolution per Conv2d kernel of the model, one dot_general per Linear kernel, one reduce_window per
    max pool, and the exported function's jaxpr calls no tuned rule."""
    monkeypatch.setenv(kernels.ENV_VARIABLE, "tuned")
    model = jaxnets.create_model("resnet18", num_classes=3)
    variables = random_variables(model, 32, 0)
    kernel_ranks = [leaf.ndim for path, leaf in trees.flatten(variables["params"]).items() if path.endswith("kernel")]
    convs, linears, pools = kernel_ranks.count(4), kernel_ranks.count(2), 1  # ResNet's one max pool, in the stem
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    default = str(jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(x))
    assert default.count("reduce_window_max") == 2 * pools and default.count("conv_general_dilated") < convs
    assert all(f"name={rule}" in default for rule in tuned_custom_rules() if rule.startswith("_max_pool"))

    from jaxnets.export import to_stablehlo

    exported = {}

    def spy(fn, params, *args, **kwargs):  # the function the exporter writes, as the format's module gets it
        exported["jaxpr"] = str(jax.make_jaxpr(fn)(params, x))
        return write(fn, params, *args, **kwargs)

    write = to_stablehlo.write
    monkeypatch.setattr(to_stablehlo, "write", spy)
    result = export(model, variables, "stablehlo", tmp_path / "r18", image_size=32, platforms=("cpu",))
    mlir = jax.export.deserialize(bytearray((result.path / "model.stablehlo").read_bytes())).mlir_module()
    counts = {op: mlir.count(f"stablehlo.{op}") for op in ("convolution", "dot_general", "reduce_window")}
    assert counts == {"convolution": convs, "dot_general": linears, "reduce_window": pools}, counts
    assert not any(f"name={rule}" in exported["jaxpr"] for rule in tuned_custom_rules())
    assert exported["jaxpr"].count("conv_general_dilated") == convs
    assert kernels.current().tuned == set(kernels.VARIANTS)  # the export left the process's choice alone


def test_onnx_s_pools_are_re_emitted_as_padding_and_2d_valid_windows_with_the_same_values():
    """jax2onnx converts ``flax.linen.max_pool`` with 'VALID' windows to ONNX's 2-d MaxPool, not a padded
    ``reduce_window_max``: every max pool of the exported graph is re-traced as -inf padding and such a pool, the
    same values (pools of negative values: the padding must be -inf; ceil mode's extra window), under a symbolic
    batch as the converter traces it. Other window reductions stay as traced."""
    from jaxnets.export.to_onnx import _with_onnx_pools

    for size, kernel, stride, padding, ceil_mode in [(9, 3, 2, 1, True), (8, 2, 2, 0, False), (7, 3, 1, 1, True)]:
        def pool(x, kernel=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode):
            with kernels.using("xla"):  # the exporter's formulation
                return layers.max_pool(x, kernel, stride, padding, ceil_mode)

        z = np.random.default_rng(size).standard_normal((2, size, size + 1, 3)).astype(np.float32) - 3  # < 0
        assert np.array_equal(np.asarray(symbolic_batch(_with_onnx_pools(pool), z)), np.asarray(pool(z)))
        jaxpr = jax.make_jaxpr(_with_onnx_pools(pool))(z).jaxpr
        windows = [e for e in _equations(jaxpr) if e.primitive.name == "reduce_window_max"]
        assert len(windows) == 1 and all(pair == (0, 0) for pair in windows[0].params["padding"])
        assert _primitives(jaxpr)["pad"] >= 1

    def row_max(x):  # a window over the batch axis too: not an image pool, left alone
        return jax.lax.reduce_window(x, -np.inf, jax.lax.max, (2, 1, 1, 1), (1, 1, 1, 1), "VALID")

    text = str(jax.make_jaxpr(_with_onnx_pools(row_max))(np.zeros((3, 2, 2, 1), np.float32)))
    assert "reduce_window_max" in text and "window_dimensions=(2, 1, 1, 1)" in text


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def symbolic_batch(fn, x: np.ndarray):
    """``fn(x)`` traced, as the converters trace it, with a symbolic batch (where strided slices become gathers)."""
    batch, = jax.export.symbolic_shape("b")
    return jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype)).call(x)


def _primitives(jaxpr) -> dict[str, int]:
    counts: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                for key, count in _primitives(inner).items():
                    counts[key] = counts.get(key, 0) + count
    return counts


# --- errors -------------------------------------------------------------------------------------------------


def tiny(params, images):
    """A stand-in model for the error paths: exports in well under a second."""
    return images.reshape(images.shape[0], -1) @ params


TINY = {"params": np.ones((12, 2), np.float32), "input_shape": (2, 2, 3)}


def export_tiny(path: Path, format: str = "stablehlo", **kwargs):
    return export_function(tiny, TINY["params"], format, path, input_shape=TINY["input_shape"], verify=False,
                           platforms=("cpu",), **kwargs)


def test_an_existing_output_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "out"
    export_tiny(out)
    (out / "mine.txt").write_text("kept until --force")
    with pytest.raises(OutputExists, match=f"{out} already exists; pass --force"):
        export_tiny(out)
    assert (out / "mine.txt").exists()
    export_tiny(out, force=True)
    assert not (out / "mine.txt").exists() and (out / "model.stablehlo").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old directory left behind

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("not an export")
    with pytest.raises(OutputExists, match="refusing to replace a directory that is not a jaxnets export"):
        export_tiny(foreign, force=True)
    assert (foreign / "thesis.tex").exists()


def test_unknown_formats_bad_outputs_and_options_are_one_line_user_errors(tmp_path):
    with pytest.raises(jaxnets.UserError, match="unknown export format 'keras'; choose one of stablehlo, onnx"):
        export_tiny(tmp_path / "x", format="keras")
    with pytest.raises(jaxnets.UserError, match="--int8 applies to the tflite format, not onnx"):
        export_tiny(tmp_path / "x", format="onnx", int8=True)
    with pytest.raises(jaxnets.UserError, match="--mlir-text applies to the stablehlo format, not onnx"):
        export_tiny(tmp_path / "x", format="onnx", mlir_text=True)
    if all(importlib.util.find_spec(module) for module in ONNX_PACKAGES):  # else: a MissingDependency first
        with pytest.raises(jaxnets.UserError, match="--opset 13: the ONNX export needs opset 18 or newer"):
            export_tiny(tmp_path / "x", format="onnx", opset=13)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(jaxnets.UserError, match=f"{blocker / 'x'}: cannot create it, {blocker} is a file"):
        export_tiny(blocker / "x")
    with pytest.raises(jaxnets.UserError, match=r"return an array or a list/tuple of arrays, not dict"):
        export_function(lambda p, x: {"y": x}, None, "stablehlo", tmp_path / "x", input_shape=(2,), verify=False)
    with pytest.raises(jaxnets.UserError, match=r"output 1 has shape \(2,\) .* keep the batch axis first"):
        export_function(lambda p, x: (x, x.sum(axis=0)), None, "stablehlo", tmp_path / "x", input_shape=(2,),
                        verify=False)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_the_onnx_export_logs_no_serializer_warning_and_leaves_the_logger_as_found(tmp_path, caplog):
    """``tiny``'s reshape leaves untyped shape constants, about which onnx_ir's serializer warns (twice) at the
    default level: an optional annotation skipped, nothing for a user to act on."""
    needs_onnx()
    with caplog.at_level(logging.WARNING):
        export_tiny(tmp_path / "x", format="onnx")
    assert [record.getMessage() for record in caplog.records if record.name.startswith("onnx_ir")] == []
    assert logging.getLogger("onnx_ir.serde").level == logging.NOTSET


@pytest.mark.parametrize("module", ["jax2onnx", "onnx", "onnxruntime"])
def test_a_missing_optional_dependency_names_its_extra(module, monkeypatch, tmp_path, capsys):
    needs_onnx()  # each of them missing in turn: the ones before it must be there
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(MissingDependency, match=rf"export format onnx needs {module}, which is not installed"):
        export_tiny(tmp_path / "x", format="onnx")
    assert cli.main(["--model", "resnet18", "--weights", str(tmp_path / "none.safetensors"), "--format", "onnx",
                     "--out", str(tmp_path / "x")]) == 1  # the weights are never read: the dependency comes first
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[onnx]'" in err and "pip install" in err, err
    assert not (tmp_path / "x").exists()


def test_an_export_that_does_not_reproduce_its_function_is_not_written(monkeypatch, tmp_path):
    def off_by_one(fn, params, inputs):
        return {key: [y + 1 for y in ys] for key, ys in real(fn, params, inputs).items()}

    real = verification.expected_outputs
    monkeypatch.setattr(verification, "expected_outputs", off_by_one)
    with pytest.raises(VerificationError, match=r"does not reproduce the model: model: max \|diff\| vs jax 1.00e\+00"):
        export_function(tiny, TINY["params"], "stablehlo", tmp_path / "x", input_shape=TINY["input_shape"],
                        platforms=("cpu",))
    assert list(tmp_path.iterdir()) == []


# --- the command -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A train.py-like run directory: ResNet-18 weights for 3 named classes, validated at 32 px."""
    model = jaxnets.create_model("resnet18", num_classes=3)
    variables = random_variables(model, 32, 3)
    run = tmp_path_factory.mktemp("run")
    save_weights(run / "final_weights.safetensors", "resnet18", variables,
                 metadata={"categories": ["cat", "dog", "eel"], "eval_transform": {"crop_size": 32, "resize_size": 36}})
    return run


def test_the_command_exports_a_run_directory_verified_with_its_class_names_and_eval_size(run_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    # No --model: the run's weights name theirs.
    assert cli.main(["--weights", str(run_dir), "--format", "tflite", "--with-preprocessing", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {out} (tflite: model.tflite;")
    assert lines[1].startswith("verified model: max |diff| vs jax") and "ai_edge_litert" in lines[1]
    assert (out / "classes.txt").read_text() == "cat\ndog\neel\n"
    record = json.loads((out / "export.json").read_text())
    assert record["input"]["shape"] == ["batch", 32, 32, 3] and record["input"]["dtype"] == "uint8"
    assert record["eval_transform"]["resize_size"] == 36
    assert record["weights"] == str(run_dir / "final_weights.safetensors")


def test_the_command_reports_user_errors_in_one_line(run_dir, tmp_path, capsys):
    weights = str(run_dir / "final_weights.safetensors")
    out = tmp_path / "x"
    for argv, message in [
        (["--model", "vgg11", "--weights", weights, "--format", "stablehlo"],
         f"--model vgg11: {weights} holds resnet18 weights, not vgg11; leave out --model (the file names its model)"),
        (["--model", "resnet18", "--weights", weights, "--format", "caffe"], "unknown export format 'caffe'"),
        (["--weights", weights, "--format", "saved_model", "--mlir-text"],
         "--mlir-text applies to the stablehlo format, not saved_model"),
        (["--weights", str(tmp_path), "--format", "stablehlo"],
         f"--weights {tmp_path}: a directory without final_weights.safetensors"),
        (["--weights", "IMAGENET1K_V1", "--format", "stablehlo"],
         "--model is needed for torchvision's weights (IMAGENET1K_V1)"),
        (["--format", "stablehlo"], "--model is needed for torchvision's weights (IMAGENET1K_V1)"),
    ]:
        assert cli.main([*argv, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"jaxnets-export: error: {message}") and err.count("\n") == 1, err
    out.mkdir()
    assert cli.main(["--model", "resnet18", "--weights", weights, "--format", "stablehlo", "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"jaxnets-export: error: {out} already exists; pass --force (force=True) to " \
                                      "replace it\n"


def test_python_dash_m_jaxnets_export_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "jaxnets.export", "--model", "resnet18", "--format", "caffe",
                           "--out", "never-written"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == ("python -m jaxnets.export: error: unknown export format 'caffe'; choose "
                                            "one of stablehlo, onnx, saved_model, tflite")
    assert not (ROOT / "never-written").exists()


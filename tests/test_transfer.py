"""Freeze masks, frozen BatchNorm and the optax partition, checked through real training steps."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import jaxnets
from jaxnets import transfer
from jaxnets.layers import is_frozen

NUM_CLASSES = 5


def random_variables(model, size: int, seed: int = 0) -> dict:
    """He-normal kernels, zero biases, identity BatchNorms, drawn with numpy: the same statistics as a
    fresh init for these tests, without compiling ``model.init`` (tens of seconds for GoogLeNet on CPU)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        kind = path[-1].key
        if kind == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return rng.standard_normal(leaf.shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        return np.full(leaf.shape, 1.0 if kind in ("scale", "var") else 0.0, np.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def init_variables(name: str, size: int, **options) -> tuple:
    model = jaxnets.create_model(name, num_classes=NUM_CLASSES, **options)
    return model, random_variables(model, size)


def param_shapes(name: str, size: int, **options) -> dict:
    model = jaxnets.create_model(name, num_classes=NUM_CLASSES, **options)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]


def flat(tree) -> dict[str, object]:
    return {"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()}


def frozen_paths(mask) -> set[str]:
    return {path for path, trainable in flat(mask).items() if not trainable}


@pytest.fixture(scope="module")
def resnet18():
    return init_variables("resnet18", 32)


# --- masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size, head", [
    ("resnet18", 32, ("fc/",)),
    ("vgg11", 32, ("classifier/6/",)),
    ("vgg11_bn", 32, ("classifier/6/",)),
    ("alexnet", 63, ("classifier/6/",)),
    ("googlenet", 32, ("fc/", "aux1/", "aux2/")),
])
def test_backbone_mask_leaves_exactly_the_head_trainable(name, size, head):
    params = param_shapes(name, size)
    mask = transfer.trainable_mask(name, params, "backbone")
    trainable = {path for path, t in flat(mask).items() if t}
    assert trainable == {path for path in flat(params) if path.startswith(head)}
    assert trainable == {path for path, h in flat(transfer.head_mask(name, params)).items() if h}
    assert all(flat(transfer.trainable_mask(name, params, "none")).values())


def test_googlenet_without_aux_logits_has_only_fc_as_head():
    params = param_shapes("googlenet", 32, aux_logits=False)
    mask = transfer.trainable_mask("googlenet", params, "backbone")
    assert {path for path, t in flat(mask).items() if t} == {"fc/kernel", "fc/bias"}
    assert "aux1" not in transfer.frozen_modules("googlenet", mask)


@pytest.mark.parametrize("freeze, frozen_prefixes", [
    ("conv1,bn1,layer1", ("conv1/", "bn1/", "layer1/")),
    (["conv1", "bn1", "layer1"], ("conv1/", "bn1/", "layer1/")),
    ("layer[12]", ("layer1/", "layer2/")),
    ("layer1.0", ("layer1/0/",)),  # torch's dotted module names
    ("layer4/*/bn2", ("layer4/0/bn2/", "layer4/1/bn2/")),
    ("fc/bias", ("fc/bias",)),
])
def test_patterns_freeze_whole_path_components(freeze, frozen_prefixes):
    params = param_shapes("resnet18", 32)
    mask = transfer.trainable_mask("resnet18", params, freeze)
    assert frozen_paths(mask) == {path for path in flat(params) if path.startswith(frozen_prefixes)}


def test_pattern_is_anchored_at_the_root():
    """'conv1' is the stem, not every block's conv1."""
    mask = transfer.trainable_mask("resnet18", param_shapes("resnet18", 32), "conv1")
    assert frozen_paths(mask) == {"conv1/kernel"}


@pytest.mark.parametrize("freeze, message", [
    ("conv1,layer5", r"freeze pattern 'layer5' matches no parameter; top-level modules: .*layer4"),
    ("layer1/conv1", r"'layer1/conv1' matches no parameter"),
    ("backbone,fc", r"leaves nothing trainable"),
    ("*", r"leaves nothing trainable"),
    ("conv1,,bn1", r"empty pattern"),
    ("none,layer1", r"'none' cannot be combined"),
])
def test_bad_freeze_specs_raise_one_clear_error(freeze, message):
    with pytest.raises(ValueError, match=message):
        transfer.trainable_mask("resnet18", param_shapes("resnet18", 32), freeze)


def test_params_of_another_architecture_are_rejected():
    with pytest.raises(ValueError, match=r"vgg11: parameters have no classifier 'classifier/6'"):
        transfer.trainable_mask("vgg11", param_shapes("resnet18", 32), "backbone")
    with pytest.raises(ValueError, match=r"not the whole variables dict"):
        transfer.trainable_mask("resnet18", {"params": param_shapes("resnet18", 32)}, "none")


def test_describe_counts_parameters():
    params = param_shapes("resnet18", 32)
    mask = transfer.trainable_mask("resnet18", params, "backbone")
    head = 512 * NUM_CLASSES + NUM_CLASSES
    total = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
    assert transfer.describe(params, mask) == f"frozen {(total - head) / 1e6:.1f}M / trainable {head / 1e3:.1f}k params"


# --- frozen BatchNorm -------------------------------------------------------------------


@pytest.mark.parametrize("name, freeze, expected", [
    ("resnet18", "backbone", ("bn1", "layer1", "layer2", "layer3", "layer4")),
    ("resnet18", "conv1,bn1,layer1/0", ("bn1", "layer1/0")),
    ("resnet18", "layer1/0/bn1/scale", ()),  # a BatchNorm with a trainable bias keeps training
    ("vgg11", "backbone", ()),
    ("vgg11_bn", "features/[0-5]", ("features/1", "features/5")),  # conv 0, bn 1, conv 4, bn 5
    ("googlenet", "backbone", ("conv1", "conv2", "conv3", "inception3a", "inception3b", "inception4a",
                               "inception4b", "inception4c", "inception4d", "inception4e", "inception5a",
                               "inception5b")),
])
def test_frozen_modules_cover_exactly_the_fully_frozen_batchnorms(name, freeze, expected):
    params = param_shapes(name, 32)
    mask = transfer.trainable_mask(name, params, freeze)
    modules = transfer.frozen_modules(name, mask)
    assert modules == expected
    flat_mask = traverse_util.flatten_dict(mask)
    for path in flat_mask:
        if path[-1] == "scale":
            all_frozen = not any(t for p, t in flat_mask.items() if p[:-1] == path[:-1])
            assert is_frozen(path[:-1], modules) == all_frozen, path


# --- the optimizer ------------------------------------------------------------------------


def _state_arrays_by_param_path(opt_state) -> dict[str, set[str]]:
    """'mu' -> {param paths that have a first moment}, for every optimizer-state field holding a params tree."""
    found: dict[str, set[str]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        field = next((n for n in names if n in ("mu", "nu", "trace")), None)
        if field is not None and np.ndim(leaf) > 0:
            index = names.index(field)
            found.setdefault(field, set()).add("/".join(str(n) for n in names[index + 1:]))
    return found


@pytest.mark.parametrize("base_tx, fields", [
    (optax.adamw(1e-3, weight_decay=0.05), {"mu", "nu"}),
    (optax.sgd(0.1, momentum=0.9), {"trace"}),
])
@pytest.mark.parametrize("backbone_lr_mult", [1.0, 0.1])
def test_optimizer_state_has_no_moments_for_frozen_leaves(base_tx, fields, backbone_lr_mult):
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes("resnet18", 32))
    mask = transfer.trainable_mask("resnet18", params, "conv1,bn1,layer1,layer2")
    tx = transfer.build_optimizer(base_tx, mask, head_mask=transfer.head_mask("resnet18", params),
                                  backbone_lr_mult=backbone_lr_mult)
    state = tx.init(params)
    trainable = {path for path, t in flat(mask).items() if t}
    moments = _state_arrays_by_param_path(state)
    assert set(moments) == fields
    for field in fields:
        assert moments[field] == trainable, field
    # No array in the whole state is as large as a frozen-only tensor would make it.
    state_size = sum(np.size(x) for x in jax.tree.leaves(state))
    trainable_size = sum(np.size(p) for path, p in flat(params).items() if path in trainable)
    assert state_size <= len(fields) * trainable_size + 4


def test_backbone_lr_mult_scales_the_backbone_update_only():
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), param_shapes("resnet18", 32))
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    mask = transfer.trainable_mask("resnet18", params, "conv1")
    head = transfer.head_mask("resnet18", params)
    base = optax.adamw(1e-2, weight_decay=0.1)

    def updates(mult: float) -> dict:
        tx = transfer.build_optimizer(base, mask, head_mask=head, backbone_lr_mult=mult)
        state = tx.init(params)
        update_fn = jax.jit(tx.update)
        for _ in range(3):
            update, state = update_fn(grads, state, params)
        return flat(update)

    reference, scaled = updates(1.0), updates(0.1)
    for path, is_head in flat(head).items():
        if path == "conv1/kernel":
            assert not np.any(scaled[path]) and not np.any(reference[path])
        elif is_head:
            np.testing.assert_array_equal(scaled[path], reference[path], err_msg=path)
        else:
            np.testing.assert_allclose(scaled[path], 0.1 * reference[path], rtol=1e-6, err_msg=path)
            assert np.any(reference[path])


@pytest.mark.parametrize("name, first, last", [
    ("resnet18", "conv1", "layer4/1"),
    ("vgg11_bn", "features/0", "classifier/3"),
    ("googlenet", "conv1", "inception5b"),
    ("alexnet", "features/0", "classifier/4"),
])
def test_layerwise_lr_mults_decay_from_the_head_down_to_the_stem(name, first, last):
    params = param_shapes(name, 64)
    mults = transfer.layerwise_lr_mults(name, params, 0.5)
    heads = flat(transfer.head_mask(name, params))
    by_block: dict[str, set[float]] = {}
    for path, mult in flat(mults).items():
        by_block.setdefault(transfer._block(tuple(path.split("/")[:-1])), set()).add(mult)
    assert all(len(values) == 1 for values in by_block.values())  # one multiplier per block
    block_mult = {block: values.pop() for block, values in by_block.items()}
    backbone = sorted((m, b) for b, m in block_mult.items() if m != 1.0)
    assert backbone[0][1] == first and backbone[-1] == (0.5, last)
    # Distinct powers of the decay: every backbone block is one step deeper than the next one.
    assert [m for m, _ in backbone] == [0.5 ** k for k in range(len(backbone), 0, -1)]
    assert all(mult == 1.0 for path, mult in flat(mults).items() if heads[path])


def test_lr_mults_scale_each_leafs_update():
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), param_shapes("resnet18", 32))
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), params)
    mask = transfer.trainable_mask("resnet18", params, "conv1")
    head = transfer.head_mask("resnet18", params)
    mults = transfer.layerwise_lr_mults("resnet18", params, 0.8)
    tx = transfer.build_optimizer(optax.sgd(0.1), mask, head_mask=head, backbone_lr_mult=0.5, lr_mults=mults)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for path, update in flat(updates).items():
        expected = 0.0 if path == "conv1/kernel" else -0.1 * 0.5 * flat(mults)[path] * (1 if flat(head)[path] else 0.5)
        np.testing.assert_allclose(update, np.full(update.shape, expected, np.float32), rtol=1e-6, err_msg=path)


def test_grad_clip_clips_the_trainable_gradients_once_in_the_recorded_state_layout():
    """build_optimizer clips one global norm over the trainable gradients (frozen ones do not count), before
    the learning-rate groups; its state has the nesting checkpoints of OPTIMIZER_LAYOUT 2 hold."""
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), param_shapes("resnet18", 32))
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), params)
    mask = transfer.trainable_mask("resnet18", params, "conv1,layer1")
    head = transfer.head_mask("resnet18", params)
    tx = transfer.build_optimizer(optax.sgd(1.0), mask, head_mask=head, backbone_lr_mult=0.5, grad_clip=1.0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    trainable = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(mask), strict=True) if t]
    scale = 1.0 / float(np.sqrt(sum(np.sum(np.square(g)) for g in trainable)))  # the norm is > 1 here
    for path, update in flat(updates).items():
        expected = 0.0 if not flat(mask)[path] else -0.5 * scale * (1.0 if flat(head)[path] else 0.5)
        np.testing.assert_allclose(update, np.full(update.shape, expected, np.float32), rtol=1e-5, err_msg=path)
    frozen = jax.tree.map(lambda t: not t, mask)
    before = optax.chain(optax.chain(optax.masked(optax.set_to_zero(), frozen), optax.clip_by_global_norm(1.0)),
                         transfer.build_optimizer(optax.sgd(1.0), mask, head_mask=head, backbone_lr_mult=0.5))
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(before.init(params))
    with pytest.raises(ValueError, match=r"grad_clip must be > 0 and finite, got -1.0"):
        transfer.build_optimizer(optax.sgd(0.1), mask, grad_clip=-1.0)


def test_bad_learning_rate_multipliers_raise():
    mask = {"fc": {"kernel": True}}
    with pytest.raises(ValueError, match="needs head_mask"):
        transfer.build_optimizer(optax.sgd(0.1), mask, backbone_lr_mult=0.1)
    with pytest.raises(ValueError, match="must be > 0"):
        transfer.build_optimizer(optax.sgd(0.1), mask, backbone_lr_mult=0.0)
    with pytest.raises(ValueError, match="multipliers must be > 0"):
        transfer.build_optimizer(optax.sgd(0.1), mask, lr_mults={"fc": {"kernel": 0.0}})
    with pytest.raises(ValueError, match=r"layer decay must be in \(0, 1\]"):
        transfer.layerwise_lr_mults("resnet18", param_shapes("resnet18", 32), 1.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_learning_rate_multipliers_raise(bad):
    """NaN passes a bare ``<= 0`` test; one update would then make the backbone NaN."""
    params = param_shapes("resnet18", 32)
    mask, head = transfer.trainable_mask("resnet18", params, "none"), transfer.head_mask("resnet18", params)
    with pytest.raises(ValueError, match=r"must be > 0 and finite, got .* for backbone_lr_mult"):
        transfer.build_optimizer(optax.sgd(0.1), mask, head_mask=head, backbone_lr_mult=bad)
    mults = {**transfer.layerwise_lr_mults("resnet18", params, 0.5), "conv1": {"kernel": bad}}
    with pytest.raises(ValueError, match=r"must be > 0 and finite, got .* for lr_mults at conv1/kernel"):
        transfer.build_optimizer(optax.sgd(0.1), mask, lr_mults=mults)


def test_trees_of_another_model_raise_one_line_errors():
    """A resnet18 mask with resnet34 params failed deep in jax (pytree structure) or with a bare KeyError."""
    p18, p34 = param_shapes("resnet18", 32), param_shapes("resnet34", 32)
    mask = transfer.trainable_mask("resnet18", p18, "conv1")
    mismatch = r"does not match .*layer1/2/.* is in params but not in mask; built for another model\?"
    with pytest.raises(ValueError, match=mismatch):
        transfer.build_optimizer(optax.sgd(0.1), mask).init(p34)
    with pytest.raises(ValueError, match=mismatch):
        transfer.stop_frozen_gradients(p34, mask)
    with pytest.raises(ValueError, match=mismatch):
        transfer.describe(p34, mask)
    with pytest.raises(ValueError, match=r"resnet18: params have block\(s\) layer1/2, .* that resnet18 does not have"):
        transfer.layerwise_lr_mults("resnet18", p34, 0.5)
    with pytest.raises(ValueError, match=r"head_mask does not match mask"):
        transfer.build_optimizer(optax.sgd(0.1), mask, head_mask=transfer.head_mask("resnet34", p34),
                                 backbone_lr_mult=0.1)
    tx = transfer.build_optimizer(optax.sgd(0.1), mask)
    state = tx.init(p18)
    grads34 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), p34)
    with pytest.raises(ValueError, match=r"updates does not match mask"):
        tx.update(grads34, state)


def test_params_given_as_a_mask_raise():
    params = param_shapes("resnet18", 32)
    not_bools = r"mask leaves must be bools \(True = trainable\), got .* at bn1/bias; .*not params"
    with pytest.raises(ValueError, match=not_bools):
        transfer.frozen_modules("resnet18", params)
    with pytest.raises(ValueError, match=not_bools):
        transfer.build_optimizer(optax.sgd(0.1), params)
    with pytest.raises(ValueError, match=not_bools):
        transfer.stop_frozen_gradients(params, params)


# --- training steps -----------------------------------------------------------------------


def make_train_step(model, tx, mask, frozen_norm):
    """A minimal training step as jaxnets.training does it: stop_gradient on frozen leaves, frozen BatchNorm."""
    def loss_fn(params, batch_stats, images, labels, key):
        params = transfer.stop_frozen_gradients(params, mask)
        out, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": key}, frozen_norm=frozen_norm)
        outputs = out if isinstance(out, tuple) else (out,)  # GoogLeNet: main + aux logits
        loss = sum(optax.softmax_cross_entropy_with_integer_labels(o.astype(jnp.float32), labels).mean()
                   for o in outputs)
        return loss, updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels, key):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images,
                                                                               labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step, loss_fn


def run_steps(model, variables, tx, mask, frozen_norm, size, steps=3):
    step, _ = make_train_step(model, tx, mask, frozen_norm)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for i in range(steps):
        images = rng.normal(size=(4, size, size, 3)).astype(np.float32)
        labels = rng.integers(0, NUM_CLASSES, size=4)
        params, batch_stats, opt_state, _ = step(params, batch_stats, opt_state, images, labels, jax.random.key(i))
    return {"params": params, "batch_stats": batch_stats}


def assert_frozen_identical_rest_changed(before, after, frozen, changed):
    """Every frozen leaf bit-identical; every leaf under a `changed` prefix different."""
    for collection in ("params", "batch_stats"):
        old, new = flat(before[collection]), flat(after[collection])
        for path, value in new.items():
            if is_frozen(path.split("/")[:-1], frozen[collection]):
                np.testing.assert_array_equal(value, old[path], err_msg=f"{collection}/{path}")
            elif path.startswith(changed[collection]):
                assert not np.array_equal(value, old[path]), f"{collection}/{path} did not change"


@pytest.mark.parametrize("freeze, base_tx", [
    ("backbone", optax.adamw(1e-2, weight_decay=0.1)),
    ("conv1,bn1,layer1,layer2", optax.sgd(0.1, momentum=0.9)),
])
def test_training_steps_leave_frozen_leaves_bit_identical(resnet18, freeze, base_tx):
    model, variables = resnet18
    mask = transfer.trainable_mask("resnet18", variables["params"], freeze)
    frozen_norm = transfer.frozen_modules("resnet18", mask)
    tx = transfer.build_optimizer(base_tx, mask)
    after = run_steps(model, variables, tx, mask, frozen_norm, 32)
    trainable = ("fc",) if freeze == "backbone" else ("layer3", "layer4", "fc")
    frozen = {"params": tuple(sorted(frozen_paths(mask))), "batch_stats": frozen_norm}
    changed = {"params": trainable, "batch_stats": trainable}
    assert_frozen_identical_rest_changed(variables, after, frozen, changed)


def test_googlenet_fresh_aux_heads_train_with_the_main_head():
    model, variables = init_variables("googlenet", 32)
    mask = transfer.trainable_mask("googlenet", variables["params"], "backbone")
    frozen_norm = transfer.frozen_modules("googlenet", mask)
    # Adam: the aux BatchNorms sit behind two 0.01-std linears; plain SGD moves them below float32 resolution.
    tx = transfer.build_optimizer(optax.adam(1e-3), mask)
    after = run_steps(model, variables, tx, mask, frozen_norm, 32, steps=1)
    frozen = {"params": tuple(sorted(frozen_paths(mask))), "batch_stats": frozen_norm}
    changed = {"params": ("fc", "aux1", "aux2"), "batch_stats": ("aux1", "aux2")}
    assert_frozen_identical_rest_changed(variables, after, frozen, changed)


def _count_convs(jaxpr) -> int:
    """Convolutions and matrix products (1x1 convs and the classifier are ``dot_general``s) in a jaxpr,
    nested jaxprs (pjit, custom_vjp, ...) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("conv_general_dilated", "dot_general")
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += _count_convs(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += _count_convs(sub)
    return count


@pytest.mark.parametrize("freeze, backward_convs", [
    ("backbone", 1),  # the classifier's weight gradient only: no backward pass through the frozen backbone
    ("none", 2 * 21 - 1),  # weight + input gradient of all 20 convs and fc, but no gradient for the images
])
def test_no_backward_pass_through_a_frozen_backbone(resnet18, freeze, backward_convs):
    model, variables = resnet18
    mask = transfer.trainable_mask("resnet18", variables["params"], freeze)
    _, loss_fn = make_train_step(model, None, mask, transfer.frozen_modules("resnet18", mask))
    args = (variables["params"], variables["batch_stats"], jnp.zeros((2, 32, 32, 3)), jnp.zeros(2, int),
            jax.random.key(0))
    forward = _count_convs(jax.make_jaxpr(loss_fn)(*args).jaxpr)
    with_grad = _count_convs(jax.make_jaxpr(jax.grad(loss_fn, has_aux=True))(*args).jaxpr)
    assert forward == 21
    assert with_grad - forward == backward_convs

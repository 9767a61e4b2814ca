"""Users' own models, Linen and NNX, pruned physically at 50% on all groups with Default
pruning and Intra-Fusion: smaller, equal to the masked form, trainable with the user's
own step, inputs untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ifjax
from tests import clients

METHODS = ["default", "intra_fusion"]
LABELS = jnp.arange(8) % 10


def _count(params) -> int:
    return sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params))


def _copy(tree):
    return jax.tree.map(np.array, tree)


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def _close_to_scale(actual, expected, rtol=1e-4):
    scale = float(jnp.max(jnp.abs(expected)))
    assert float(jnp.max(jnp.abs(actual - expected))) <= rtol * scale


LINEN = {
    "resnet": (clients.linen_resnet, {"train": False}, clients.linen_resnet_train_step, 5),
    "sequential": (clients.linen_sequential, None, clients.linen_sequential_train_step, 4),
}


@pytest.fixture(scope="module", params=sorted(LINEN))
def linen_client(request):
    make, kwargs, step, count = LINEN[request.param]
    model, variables, x = make()
    return request.param, model, variables, x, kwargs, step, count


@pytest.mark.parametrize("method", METHODS)
def test_linen_client_pruned_physically(linen_client, method):
    name, model, variables, x, kwargs, train_step, count = linen_client
    before, model_before = _copy(variables), model.clone()
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=kwargs)
    assert len(groups) == count
    options = dict(sparsity=0.5, method=method, example_input=x, apply_kwargs=kwargs)
    small, pruned, plans = ifjax.prune(model, variables, "all", **options)
    _, masked, _ = ifjax.prune(model, variables, "all", masked=True, **options)

    assert isinstance(small, type(model)) and len(plans) == count
    assert _count(pruned["params"]) < 0.5 * _count(variables["params"])
    for group in ifjax.discover_groups(small, pruned, x, apply_kwargs=kwargs):
        assert group.size == groups[group.index].size // 2
    call = kwargs or {}
    _close_to_scale(small.apply(pruned, x, **call), model.apply(masked, x, **call))
    # init of the pruned model gives the pruned shapes
    init = jax.eval_shape(lambda: small.init(jax.random.key(0), x, **call))
    assert jax.tree.map(np.shape, init["params"]) == jax.tree.map(np.shape, pruned["params"])

    trained, loss = train_step(small, pruned, x, LABELS)
    assert np.isfinite(float(np.mean(loss)))
    assert not _same(trained["params"], pruned["params"])
    assert _same(variables, before) and model == model_before


def test_linen_pruned_model_under_jit_grad_vmap():
    model, variables, x = clients.linen_resnet()
    kwargs = {"train": False}
    small, pruned, _ = ifjax.prune(
        model, variables, "all", sparsity=0.5, example_input=x, apply_kwargs=kwargs
    )
    eager = small.apply(pruned, x, train=False)
    jitted = jax.jit(lambda v, x: small.apply(v, x, train=False))(pruned, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), pruned)
    mapped = jax.vmap(lambda v: small.apply(v, x, train=False))(stacked)
    np.testing.assert_allclose(mapped[1], eager, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: small.apply({**pruned, "params": p}, x, train=False).sum())(
        pruned["params"]
    )
    assert jax.tree.map(np.shape, grads) == jax.tree.map(np.shape, pruned["params"])


def test_pruned_linen_module_nested_in_a_user_model():
    """The pruned module can be a submodule of a user's bigger model."""
    import flax.linen as nn

    model, variables, x = clients.linen_sequential()
    small, pruned, _ = ifjax.prune(model, variables, "all", sparsity=0.5, example_input=x)

    class Outer(nn.Module):
        inner: nn.Module

        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(self.inner(x))

    outer = Outer(small)
    outer_variables = outer.init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, outer_variables["params"]["inner"]) == jax.tree.map(
        np.shape, pruned["params"]
    )
    outer_variables["params"]["inner"] = pruned["params"]
    assert outer.apply(outer_variables, x).shape == (8, 3)


NNX = {"cnn": (clients.nnx_cnn, 3), "resnet": (clients.nnx_resnet, 6)}


@pytest.mark.parametrize("name", sorted(NNX))
@pytest.mark.parametrize("method", METHODS)
def test_nnx_client_pruned_physically(name, method):
    make, count = NNX[name]
    module, x = make()
    state_before = _copy(nnx.state(module, (nnx.Param, nnx.BatchStat)))
    reference = module(x)
    groups = ifjax.discover_groups(module, x)
    assert len(groups) == count
    small, plans = ifjax.prune(module, "all", sparsity=0.5, method=method, example_input=x)
    masked, _ = ifjax.prune(
        module, "all", sparsity=0.5, method=method, example_input=x, masked=True
    )
    assert type(small) is type(module) and small is not module and len(plans) == count
    params = lambda m: nnx.state(m, nnx.Param)
    assert _count(params(small)) < 0.5 * _count(params(module))
    _close_to_scale(small(x), masked(x))
    for group in ifjax.discover_groups(small, x):
        assert group.size == groups[group.index].size // 2
    # width attributes follow the arrays
    for _, layer in nnx.iter_modules(small):
        if isinstance(layer, (nnx.Linear, nnx.Conv)):
            assert layer.kernel.shape[-1] == layer.out_features
            assert layer.kernel.shape[-2] == layer.in_features
        if isinstance(layer, nnx.BatchNorm):
            assert layer.mean.shape == (layer.num_features,)

    loss = clients.nnx_train_step(small, x, LABELS)
    assert np.isfinite(float(loss))
    # the input module is untouched: same arrays, same function, same widths
    assert _same(nnx.state(module, (nnx.Param, nnx.BatchStat)), state_before)
    np.testing.assert_array_equal(module(x), reference)


def test_nnx_pieces_accept_modules():
    module, x = clients.nnx_cnn()
    groups = ifjax.discover_groups(module, x)
    folded = ifjax.fold_batchnorm(module, groups)
    assert isinstance(folded, clients.CNN)
    _close_to_scale(folded(x), module(x), rtol=1e-5)
    scores = ifjax.group_importance(folded, groups[1], "l1")
    assert scores.shape == (groups[1].size,)
    pruner = ifjax.intra_fusion(0.5)
    plan = pruner.plan(folded, groups[1])
    small = pruner.apply(folded, groups[1], plan)
    masked = pruner.apply(folded, groups[1], plan, masked=True)
    assert small.conv2.out_features == 8 and small.batch_norm2.num_features == 8
    assert small.linear1.in_features == 7 * 7 * 8
    _close_to_scale(small(x), masked(x))


def test_nnx_fusion_of_replicas():
    a, x = clients.nnx_cnn()
    b = clients.CNN(rngs=nnx.Rngs(7))
    clients._randomize_nnx(b, seed=7)
    b.eval()
    aligned, maps = ifjax.align(a, b, inputs=x, num_samples=8)
    _close_to_scale(aligned(x), b(x), rtol=1e-5)  # a permutation: same function
    assert sorted(maps) == [0, 1, 2]
    fused = ifjax.fuse([a, b], inputs=x, num_samples=8)
    assert isinstance(fused, clients.CNN) and fused(x).shape == (8, 10)
    small, _ = ifjax.prune(fused, "all", sparsity=0.5, example_input=x)
    assert small(x).shape == (8, 10)


def test_linen_fusion_of_a_user_model():
    model, a, x = clients.linen_resnet()
    b = clients.randomized(model.init(jax.random.key(9), x, train=False), seed=9)
    kwargs = {"train": False}
    aligned, _ = ifjax.align(model, a, b, inputs=x, num_samples=8, apply_kwargs=kwargs)
    _close_to_scale(model.apply(aligned, x, **kwargs), model.apply(b, x, **kwargs), rtol=1e-5)
    fused = ifjax.fuse(model, [a, b], inputs=x, num_samples=8, apply_kwargs=kwargs)
    assert model.apply(fused, x, **kwargs).shape == (8, 10)


# ----------------------------------------------------------------------------- bad input


def test_nnx_module_in_training_mode_is_refused():
    module = clients.CNN(rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="training mode.*module.eval"):
        ifjax.prune(module, "all", sparsity=0.5, example_input=x)
    assert module.batch_norm1.use_running_average is False  # left as it was


def test_apply_kwargs_with_which_the_model_fails_are_named():
    model, variables, x = clients.linen_resnet()
    before = _copy(variables)
    with pytest.raises(ifjax.GraphError, match="cannot trace ResNet.apply.*unbound axis"):
        ifjax.prune(model, variables, "all", sparsity=0.5, example_input=x)
    with pytest.raises(ifjax.GraphError, match="cannot trace ResNet.apply.*bogus"):
        ifjax.discover_groups(model, variables, x, apply_kwargs={"bogus": 1})
    assert _same(variables, before)


def test_groups_from_another_model_are_refused():
    model, variables, x = clients.linen_resnet()
    other, other_variables, other_x = clients.linen_sequential()
    groups = ifjax.discover_groups(other, other_variables, other_x)
    with pytest.raises(ValueError, match="does not belong to these variables"):
        ifjax.prune(model, variables, groups, sparsity=0.5)


def test_a_model_that_cannot_be_traced_is_named():
    import flax.linen as nn

    class Hosty(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(jnp.asarray(np.asarray(x)))  # leaves JAX

    x = jnp.zeros((2, 3))
    variables = Hosty().init(jax.random.key(0), x)
    with pytest.raises(ifjax.GraphError, match="cannot trace Hosty.apply"):
        ifjax.discover_groups(Hosty(), variables, x)


def test_linen_layer_with_unknown_width_attribute():
    import flax.linen as nn

    class Projection(nn.Module):
        out_dim: int

        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.out_dim))
            return x @ w

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(Projection(6)(x)))

    x = jnp.ones((2, 5))
    variables = Net().init(jax.random.key(0), x)
    with pytest.raises(ifjax.GraphError, match="Projection_0.*register_width_rule"):
        ifjax.prune(Net(), variables, "all", sparsity=0.5, example_input=x)
    ifjax.register_width_rule(Projection, lambda module, shapes: {"out_dim": shapes["w"][-1]})
    small, pruned, _ = ifjax.prune(Net(), variables, "all", sparsity=0.5, example_input=x)
    assert small.apply(pruned, x).shape == (2, 2)
    assert pruned["params"]["Projection_0"]["w"].shape == (5, 3)


def test_taylor_importance_on_user_models():
    module, x = clients.nnx_cnn()
    folded = ifjax.fold_batchnorm(module, ifjax.discover_groups(module, x))
    gradients = ifjax.accumulate_gradients(folded, [(x, LABELS)])
    assert gradients["params"]["conv2"]["kernel"].shape == module.conv2.kernel.shape
    small, _ = ifjax.prune(
        module, "all", sparsity=0.5, importance="taylor", gradients=gradients, example_input=x
    )
    assert small.conv2.out_features == 8

    model, variables, x = clients.linen_resnet()
    kwargs = {"train": False}
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=kwargs)
    folded = ifjax.fold_batchnorm(variables, groups)
    gradients = ifjax.accumulate_gradients(model, folded, [(x, LABELS)], apply_kwargs=kwargs)
    scores = ifjax.group_importance(folded, groups[1], "taylor", gradients=gradients)
    assert scores.shape == (groups[1].size,) and bool(jnp.all(jnp.isfinite(scores)))


def test_pruned_user_models_restore_from_checkpoints(tmp_path):
    from ifjax.checkpoint import restore_model, save_model

    model, variables, x = clients.linen_resnet()
    kwargs = {"train": False}
    small, pruned, _ = ifjax.prune(
        model, variables, "all", sparsity=0.5, example_input=x, apply_kwargs=kwargs
    )
    save_model(tmp_path / "linen", pruned, model_spec={"name": "ResNet"})
    restored, _ = restore_model(tmp_path / "linen")
    again = ifjax.model_for(model, restored)
    np.testing.assert_array_equal(
        again.apply(restored, x, **kwargs), small.apply(pruned, x, **kwargs)
    )

    module, x = clients.nnx_cnn()
    small_module, _ = ifjax.prune(module, "all", sparsity=0.5, example_input=x)
    tree = ifjax.variables_of(small_module)
    save_model(tmp_path / "nnx", tree, model_spec={"name": "CNN"})
    restored, _ = restore_model(tmp_path / "nnx")
    rebuilt = ifjax.model_for(module, restored)
    assert rebuilt.conv2.out_features == 8 and module.conv2.out_features == 16
    np.testing.assert_array_equal(rebuilt(x), small_module(x))


@pytest.mark.parametrize("method", METHODS)
def test_taylor_on_all_groups_physical_equals_masked(method):
    """Later groups score kept slices with their dense gradients; the masked form, whose
    pruned slots are zero, gets the same scores without slicing."""
    model, variables, x = clients.linen_resnet()
    kwargs = {"train": False}
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=kwargs)
    folded = ifjax.fold_batchnorm(variables, groups)
    gradients = ifjax.accumulate_gradients(model, folded, [(x, LABELS)], apply_kwargs=kwargs)
    options = dict(
        sparsity=0.5, method=method, importance="taylor", gradients=gradients,
        example_input=x, apply_kwargs=kwargs,
    )  # fmt: skip
    small, pruned, plans = ifjax.prune(model, variables, "all", **options)
    _, masked, masked_plans = ifjax.prune(model, variables, "all", masked=True, **options)
    for plan, masked_plan in zip(plans, masked_plans, strict=True):
        np.testing.assert_array_equal(plan.keep, masked_plan.keep)
    _close_to_scale(small.apply(pruned, x, **kwargs), model.apply(masked, x, **kwargs))


def test_fuse_and_prune_and_prune_and_fuse_on_a_user_model():
    """The split-data pieces on a user's Linen model: FaP (fuse the replicas, then prune)
    and PaF (prune each replica to the same widths, then fuse the pruned ones)."""
    from train.pipelines import prune_to_widths

    model, a, x = clients.linen_resnet()
    b = clients.randomized(model.init(jax.random.key(5), x, train=False), seed=5)
    kwargs = {"train": False}
    groups = ifjax.discover_groups(model, a, x, apply_kwargs=kwargs)
    targets = {g.index: g.size // 2 for g in groups}
    options = dict(example_input=x, apply_kwargs=kwargs)

    fused = ifjax.fuse(model, [a, b], inputs=x, num_samples=8, apply_kwargs=kwargs)
    fap_model, fap = prune_to_widths(model, fused, targets, **options)

    pruned = [prune_to_widths(model, v, targets, **options) for v in (a, b)]
    paf_model = pruned[0][0]
    paf = ifjax.fuse(
        paf_model, [v for _, v in pruned], inputs=x, num_samples=8, apply_kwargs=kwargs
    )

    for small, variables in ((fap_model, fap), (paf_model, paf)):
        found = ifjax.discover_groups(small, variables, x, apply_kwargs=kwargs)
        assert {g.index: g.size for g in found} == targets
        assert small.apply(variables, x, **kwargs).shape == (8, 10)
    assert jax.tree.map(np.shape, fap) == jax.tree.map(np.shape, paf)


def test_nnx_call_kwargs_reach_every_call():
    """An NNX module whose call takes extra arguments (here rngs for its dropout)."""

    class Net(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.linear1 = nnx.Linear(6, 12, rngs=rngs)
            self.dropout = nnx.Dropout(0.5)
            self.linear2 = nnx.Linear(12, 3, rngs=rngs)

        def __call__(self, x, *, rngs: nnx.Rngs):
            return self.linear2(self.dropout(nnx.relu(self.linear1(x)), rngs=rngs))

    module = Net(rngs=nnx.Rngs(0))
    module.eval()
    x = jnp.ones((4, 6))
    with pytest.raises(ifjax.GraphError, match="cannot trace Net"):
        ifjax.discover_groups(module, x)  # rngs missing
    kwargs = {"rngs": nnx.Rngs(1)}
    (group,) = ifjax.discover_groups(module, x, call_kwargs=kwargs)
    small, _ = ifjax.prune(module, "all", sparsity=0.5, example_input=x, call_kwargs=kwargs)
    assert small.linear1.out_features == 6 and small(x, rngs=nnx.Rngs(2)).shape == (4, 3)


def test_split_data_training_then_paf_and_fap_on_a_user_model():
    """PaF and FaP end to end on a user's Linen model: k=2 replicas trained on split data
    by train_replicas, then pruned-and-fused and fused-and-pruned."""
    from train.data import ArrayDataset
    from train.pipelines import prune_to_widths
    from train.split import IndexedDataset, split_indices, train_replicas

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8)
    data = ArrayDataset(images, (np.arange(64) % 10).astype(np.int32), 10)
    model, x, kwargs = clients.SmallCNN(), jnp.zeros((1, 32, 32, 3)), {"train": False}
    initial = [model.init(jax.random.key(i), x, train=False) for i in range(2)]
    splits = [IndexedDataset(data, part) for part in split_indices(64, 2, seed=0)]
    replicas, _ = train_replicas(
        model, initial, splits, epochs=1, batch_size=8, steps_per_epoch=2, log=None
    )
    assert not _same(replicas[0]["params"], initial[0]["params"])
    samples = jnp.asarray(images[:16], jnp.float32) / 255.0
    groups = ifjax.discover_groups(model, replicas[0], x, apply_kwargs=kwargs)
    targets = {g.index: g.size // 2 for g in groups}
    fuse = lambda m, vs: ifjax.fuse(m, vs, inputs=samples, num_samples=16, apply_kwargs=kwargs)

    fap_model, fap = prune_to_widths(
        model, fuse(model, replicas), targets, example_input=x, apply_kwargs=kwargs
    )
    pruned = [
        prune_to_widths(model, v, targets, example_input=x, apply_kwargs=kwargs) for v in replicas
    ]
    paf_model, paf = pruned[0][0], fuse(pruned[0][0], [v for _, v in pruned])
    for small, variables in ((fap_model, fap), (paf_model, paf)):
        found = ifjax.discover_groups(small, variables, x, apply_kwargs=kwargs)
        assert {g.index: g.size for g in found} == targets
        logits = small.apply(variables, samples, train=False)
        assert logits.shape == (16, 10) and bool(jnp.all(jnp.isfinite(logits)))

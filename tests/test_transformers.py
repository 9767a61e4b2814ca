"""Transformers: MLP neurons, attention heads and the residual stream of ViTs (Linen with
flax's attention, Linen with attention written by hand, NNX), pruned physically and in
the masked form, the head merge rules against values computed by hand, and bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ifjax
from models.registry import build_model, init_variables, model_spec
from models.vit import ViT
from tests import clients
from tests.conftest import randomized


def _count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module", autouse=True)
def _hand_written_attention_rule():
    """A user teaches ifjax the head count of their own attention layer."""
    ifjax.register_width_rule(
        clients.SelfAttention, lambda m, s: {"num_heads": s["q/kernel"][-1] // m.head_dim}
    )


def _linen(hand_written: bool):
    return clients.linen_vit(hand_written)


@pytest.mark.parametrize("hand_written", [False, True], ids=["flax_attention", "by_hand"])
def test_groups_of_a_linen_vit(hand_written):
    model, variables, x = _linen(hand_written)
    groups = ifjax.discover_groups(model, variables, x)
    kinds = [(g.kind, g.layer, g.size) for g in groups]
    attention = "SelfAttention_0" if hand_written else "MultiHeadDotProductAttention_0"
    assert kinds == [
        ("residual", "", 16),
        ("neurons", "block1/MlpBlock_0", 24),
        ("heads", f"block1/{attention}", 4),
        ("neurons", "block0/MlpBlock_0", 24),
        ("heads", f"block0/{attention}", 4),
    ]
    heads = groups[4]
    names = ("q", "k", "v") if hand_written else ("query", "key", "value")
    assert [w.kernel[-2] for w in heads.writers] == list(names)
    assert [w.role for w in heads.writers] == ["query_key", "query_key", "value"]
    assert [r.kernel[-2] for r in heads.readers] == ["proj" if hand_written else "out"]
    if hand_written:  # Dense (16, 16) reshaped into 4 heads of 4: head c is 4 entries
        assert {(w.axis, w.outer, w.inner) for w in heads.writers} == {(1, 1, 4)}
        assert (heads.readers[0].axis, heads.readers[0].inner) == (0, 4)
    else:  # DenseGeneral kernels (16, 4, 4) and (4, 4, 16): a heads axis
        assert {(w.axis, w.inner) for w in heads.writers} == {(1, 1)}
        assert (heads.readers[0].axis, heads.readers[0].inner) == (0, 1)
    residual = {"/".join(p): axis for p, axis in groups[0].channel_params}
    assert residual["params/cls"] == 2 and residual["params/pos_embedding"] == 2
    assert residual["params/encoder_norm/scale"] == 0
    assert "residual" in groups[0].describe() and "heads of block0" in heads.describe()


def test_groups_of_an_nnx_vit():
    module, x = clients.nnx_vit()
    groups = ifjax.discover_groups(module, x)
    assert [(g.kind, g.layer, g.size) for g in groups] == [
        ("residual", "", 16),
        ("neurons", "blocks/1/mlp/layers", 24),
        ("heads", "blocks/1/attention", 4),
        ("neurons", "blocks/0/mlp/layers", 24),
        ("heads", "blocks/0/attention", 4),
    ]
    residual = {"/".join(p) for p, _ in groups[0].channel_params}
    assert {"params/cls_token", "params/pos_embed", "params/norm/scale"} <= residual


@pytest.mark.parametrize("importance", ["l1", "lamp", "taylor"])
@pytest.mark.parametrize("method", ["default", "intra_fusion"])
@pytest.mark.parametrize("hand_written", [False, True], ids=["flax_attention", "by_hand"])
def test_linen_vit_physical_equals_masked(hand_written, method, importance):
    model, variables, x = _linen(hand_written)
    gradients = None
    if importance == "taylor":
        labels = jnp.arange(x.shape[0]) % 10
        gradients = ifjax.accumulate_gradients(model, variables, [(x, labels)])
    kwargs = dict(
        sparsity=0.5, method=method, importance=importance, example_input=x, gradients=gradients
    )
    small, pruned, plans = ifjax.prune(model, variables, "all", **kwargs)
    _, masked, _ = ifjax.prune(model, variables, "all", masked=True, **kwargs)
    assert len(plans) == 4  # neurons and heads of both blocks; not the residual stream
    np.testing.assert_allclose(small.apply(pruned, x), model.apply(masked, x), rtol=1e-5, atol=2e-5)
    attention = "SelfAttention_0" if hand_written else "MultiHeadDotProductAttention_0"
    query = pruned["params"]["block0"][attention]["q" if hand_written else "query"]["kernel"]
    assert query.shape == ((16, 8) if hand_written else (16, 2, 4))
    assert pruned["params"]["block0"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (16, 12)
    assert _count(pruned) < _count(variables)


@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_nnx_vit_physical_equals_masked(method):
    module, x = clients.nnx_vit()
    small, plans = ifjax.prune(module, "all", sparsity=0.5, method=method, example_input=x)
    masked, _ = ifjax.prune(
        module, "all", sparsity=0.5, method=method, example_input=x, masked=True
    )
    np.testing.assert_allclose(small(x), masked(x), rtol=1e-5, atol=2e-5)
    attention = small.blocks[0].attention
    assert (attention.num_heads, attention.qkv_features) == (2, 8)
    assert attention.query.kernel.shape == (16, 2, 4) and attention.out.kernel.shape == (2, 4, 16)
    assert module.blocks[0].attention.num_heads == 4  # the input is untouched


def _duplicated_heads(model: ViT, variables, out_split=(0.7, 0.3)):
    """Variables whose heads 0 and 1 of block 0 compute the same thing (equal query, key
    and value weights), writing to the output with different projections."""
    attention = jax.tree.map(jnp.asarray, variables["params"]["block0"]["attention"])
    for name in ("query", "key", "value"):
        kernel, bias = attention[name]["kernel"], attention[name]["bias"]
        attention[name] = {
            "kernel": kernel.at[:, 1].set(kernel[:, 0]),
            "bias": bias.at[1].set(bias[0]),
        }
    out = attention["out"]["kernel"]
    attention["out"] = dict(
        attention["out"],
        kernel=out.at[0].set(out[0] * out_split[0]).at[1].set(out[0] * out_split[1]),
    )
    params = dict(variables["params"])
    params["block0"] = dict(params["block0"], attention=attention)
    return {"params": params}


def test_two_identical_heads_merge_back_into_one():
    model = ViT(embed_dim=8, heads=(2,), head_dim=4, mlp_dims=(16,))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = _duplicated_heads(model, randomized(init_variables(model, 0, x.shape)))
    heads = next(g for g in ifjax.discover_groups(model, variables, x) if g.kind == "heads")
    dense = model.apply(variables, x)

    # by hand: one head with head 0's query/key/value and the sum of both projections
    attention = variables["params"]["block0"]["attention"]
    one_head = ViT(embed_dim=8, heads=(1,), head_dim=4, mlp_dims=(16,))
    by_hand = jax.tree.map(lambda a: a, variables)
    by_hand["params"]["block0"]["attention"] = {
        name: {"kernel": attention[name]["kernel"][:, :1], "bias": attention[name]["bias"][:1]}
        for name in ("query", "key", "value")
    } | {
        "out": {
            "kernel": attention["out"]["kernel"][:1] + attention["out"]["kernel"][1:2],
            "bias": attention["out"]["bias"],
        }
    }
    np.testing.assert_allclose(one_head.apply(by_hand, x), dense, rtol=1e-5, atol=1e-5)

    for head_merge in ("average", "values"):
        small, pruned, plans = ifjax.prune(
            model, variables, heads, widths={heads.index: 1}, example_input=x,
            head_merge=head_merge,
        )  # fmt: skip
        np.testing.assert_allclose(plans[0].reader_map, [[1.0, 1.0]], atol=1e-6)
        np.testing.assert_allclose(plans[0].writer_map, [[0.5, 0.5]], atol=1e-6)
        assert small.heads == (1,)
        np.testing.assert_allclose(small.apply(pruned, x), dense, rtol=1e-5, atol=1e-5)

    # "map" sums query, key and value as the reference sums channels: logits x 4
    small, pruned, _ = ifjax.prune(
        model, variables, heads, widths={heads.index: 1}, example_input=x, head_merge="map"
    )
    doubled = jax.tree.map(lambda a: a, by_hand)
    for name in ("query", "key", "value"):
        doubled["params"]["block0"]["attention"][name] = jax.tree.map(
            lambda a: 2 * a, by_hand["params"]["block0"]["attention"][name]
        )
    np.testing.assert_allclose(
        small.apply(pruned, x), one_head.apply(doubled, x), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(small.apply(pruned, x), dense, atol=1e-3)


def test_head_merge_values_keeps_queries_and_keys_of_kept_heads():
    model = ViT(embed_dim=8, heads=(3,), head_dim=4, mlp_dims=(16,))
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    variables = randomized(init_variables(model, 3, x.shape))
    heads = next(g for g in ifjax.discover_groups(model, variables, x) if g.kind == "heads")
    pruner = ifjax.intra_fusion(None, head_merge="values")
    plan = pruner.plan(variables, heads, width=2)
    pruned = pruner.apply(variables, heads, plan)
    before = variables["params"]["block0"]["attention"]
    after = pruned["params"]["block0"]["attention"]
    keep = np.asarray(plan.keep)
    for name in ("query", "key"):
        np.testing.assert_array_equal(after[name]["kernel"], before[name]["kernel"][:, keep])
    mean = np.einsum("kj,ijd->ikd", plan.writer_map, before["value"]["kernel"])
    np.testing.assert_allclose(after["value"]["kernel"], mean, rtol=1e-6)
    np.testing.assert_allclose(np.sum(plan.writer_map, axis=1), 1.0, rtol=1e-6)
    total = np.einsum("kj,jdo->kdo", plan.reader_map, before["out"]["kernel"])
    np.testing.assert_allclose(after["out"]["kernel"], total, rtol=1e-6)


def test_residual_stream_only_when_asked():
    model, variables, x = _linen(False)
    groups = ifjax.discover_groups(model, variables, x)
    _, _, plans = ifjax.prune(model, variables, "all", sparsity=0.5, example_input=x)
    assert len(plans) == len(groups) - 1
    small, pruned, _ = ifjax.prune(model, variables, "residual", sparsity=0.5, example_input=x)
    assert pruned["params"]["pos_embedding"].shape == (1, 17, 8)
    assert pruned["params"]["block0"]["LayerNorm_0"]["scale"].shape == (8,)
    assert small.apply(pruned, x).shape == (4, 10)
    with pytest.raises(ValueError, match="LayerNorm: its masked form"):
        ifjax.prune(model, variables, "residual", sparsity=0.5, example_input=x, masked=True)
    module, xn = clients.nnx_vit()
    small_module, _ = ifjax.prune(module, "residual", sparsity=0.5, example_input=xn)
    assert small_module.norm.scale.shape == (8,) and small_module(xn).shape == (4, 10)


def test_pruned_vit_runs_in_the_users_code():
    model, variables, x = _linen(False)
    labels = jnp.arange(x.shape[0]) % 10
    small, pruned, _ = ifjax.prune(model, variables, "all", sparsity=0.5, example_input=x)
    assert isinstance(small, clients.VisionTransformer)
    logits = jax.jit(lambda v, x: small.apply(v, x))(pruned, x)
    np.testing.assert_allclose(logits, small.apply(pruned, x), rtol=1e-5, atol=1e-5)
    trained, loss = clients.linen_vit_train_step(small, pruned, x, labels)
    assert np.isfinite(loss)
    assert jax.tree.map(jnp.shape, trained) == jax.tree.map(jnp.shape, pruned)

    module, xn = clients.nnx_vit()
    small_module, _ = ifjax.prune(module, "all", sparsity=0.5, example_input=xn)
    before = small_module(xn)
    loss = clients.nnx_train_step(small_module, xn, labels)
    assert np.isfinite(loss) and not np.allclose(small_module(xn), before)


def test_bad_input_names_the_layer():
    model, variables, x = _linen(False)
    groups = ifjax.discover_groups(model, variables, x)
    heads = groups[4]
    with pytest.raises(ValueError, match=r"4 heads of block0/MultiHeadDotProductAttention_0"):
        ifjax.prune(model, variables, heads, widths={heads.index: 0}, example_input=x)
    with pytest.raises(ValueError, match=r"would prune every one of group 4 \(4 heads of block0"):
        ifjax.prune(model, variables, heads, sparsity=0.8, example_input=x)
    mlp = groups[3]
    with pytest.raises(ValueError, match=r"24 neurons of block0/MlpBlock_0"):
        ifjax.prune(model, variables, mlp, widths={mlp.index: 0}, example_input=x)
    with pytest.raises(ValueError, match="unknown groups 'attention'"):
        ifjax.prune(model, variables, "attention", sparsity=0.5, example_input=x)


class _RotaryAttention(nn.Module):
    """Rotary position embeddings rotate halves of each head: a slice ifjax cannot
    analyse (the halves of the per-head dimensions)."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="query")(x)
        k = nn.DenseGeneral((2, 4), name="key")(x)
        v = nn.DenseGeneral((2, 4), name="value")(x)
        q = jnp.concatenate([-q[..., 2:], q[..., :2]], axis=-1)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(8, axis=(-2, -1), name="out")(y)


class _RotaryNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        return nn.Dense(2)(_RotaryAttention(name="rotary_attention")(x).mean(1))


def test_attention_that_cannot_be_analysed_is_named():
    x = jnp.ones((2, 5, 3))
    variables = _RotaryNet().init(jax.random.key(0), x)
    with pytest.raises(ifjax.GraphError, match=r"slices the channel axis.*rotary_attention"):
        ifjax.discover_groups(_RotaryNet(), variables, x)


def test_vit_of_models_spec_and_for_variables():
    model = ViT(embed_dim=8, heads=(2, 3), head_dim=4, mlp_dims=(16, 12))
    x = jnp.zeros((2, 32, 32, 3))
    variables = init_variables(model, 0, x.shape)
    assert build_model(model_spec(model)) == model
    widths = {}
    for g in ifjax.discover_groups(model, variables, x):
        widths[g.index] = max(1, g.size // 2)
    small, pruned, _ = ifjax.prune(
        model, variables, tuple(ifjax.discover_groups(model, variables, x)), widths=widths,
        example_input=x,
    )  # fmt: skip
    assert small == model.for_variables(pruned)
    assert (small.embed_dim, small.heads, small.mlp_dims) == (4, (1, 1), (8, 6))
    assert jax.tree.map(jnp.shape, init_variables(small, 0, x.shape)) == jax.tree.map(
        jnp.shape, pruned
    )


def test_nnx_vit_pieces_accept_modules():
    module, x = clients.nnx_vit()
    groups = ifjax.discover_groups(module, x)
    heads = groups[2]
    scores = ifjax.group_importance(module, heads, "l1")
    assert scores.shape == (4,)
    plan = ifjax.intra_fusion(0.5).plan(module, heads)
    small = ifjax.intra_fusion(0.5).apply(module, heads, plan)
    assert isinstance(small, nnx.Module) and small.blocks[1].attention.num_heads == 2

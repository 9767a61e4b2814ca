"""Dependency groups, discovered by tracing a model's jaxpr.

The model is traced once with :func:`jax.make_jaxpr`; every value of the jaxpr is
annotated as either an *activation* (depends on the input; its channel axis belongs to a
channel space) or a *parameter expression* (depends on variables only). Convolutions and
Dense layers open a new channel space for their output (they *write* it) and *read*
their input's space; elementwise operations between activations (residual additions)
merge spaces; per-channel parameters combined with an activation (biases, BatchNorm)
are attached to its space. Every space that is neither the model's input nor its output
is one :class:`Group`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from ifjax._model import ModelView, view_and_input

Path = tuple[str, ...]

__all__ = [
    "BatchNormRef",
    "GraphError",
    "Group",
    "Reader",
    "Writer",
    "discover_groups",
    "path_str",
    "trace_groups",
    "view_groups",
]


def path_str(path: Path) -> str:
    """ "params/conv0/kernel" for ("params", "conv0", "kernel")."""
    return "/".join(path)


@dataclasses.dataclass(frozen=True)
class BatchNormRef:
    """A BatchNorm applied directly to a writing layer's output (foldable into it)."""

    scale: Path | None
    bias: Path | None
    mean: Path
    var: Path

    @property
    def module(self) -> Path:
        return self.mean[1:-1]


@dataclasses.dataclass(frozen=True)
class Writer:
    """A layer whose output channels are the group's channels.

    Attributes:
      kernel: path of the kernel in the variables tree.
      axis: the kernel's output-channel axis.
      bias: path of the layer's bias (1-D, per channel), if any.
      batchnorm: the BatchNorm that follows the layer directly, if any.
    """

    kernel: Path
    axis: int
    bias: Path | None = None
    batchnorm: BatchNormRef | None = None

    @property
    def module(self) -> Path:
        return self.kernel[1:-1]


@dataclasses.dataclass(frozen=True)
class Reader:
    """A layer whose input channels are the group's channels.

    The input axis has ``outer * size * inner`` entries; entry ``(o, c, i)`` belongs to
    channel ``c``. A Dense layer after flattening an (H, W, C) map has ``outer = H*W``.
    """

    kernel: Path
    axis: int
    outer: int = 1
    inner: int = 1

    @property
    def module(self) -> Path:
        return self.kernel[1:-1]

    @property
    def flattened(self) -> bool:
        return self.outer * self.inner > 1


@dataclasses.dataclass(frozen=True)
class Group:
    """Channels that must be pruned together.

    Attributes:
      index: 0 for the group nearest the output, counting backwards through the network.
      size: number of channels n.
      writers: layers writing the channels, in execution order.
      readers: layers reading them, in execution order.
      channel_params: every 1-D per-channel variable of the group (biases, BatchNorm
        scale/bias/mean/var), as (path, axis) pairs.
    """

    index: int
    size: int
    writers: tuple[Writer, ...]
    readers: tuple[Reader, ...]
    channel_params: tuple[tuple[Path, int], ...]

    def describe(self) -> str:
        """One line: index, size, writing and reading modules."""
        w = ", ".join(path_str(x.module) for x in self.writers)
        r = ", ".join(path_str(x.module) for x in self.readers)
        return f"group {self.index} (n={self.size}): writes [{w}] reads [{r}]"


# ----------------------------------------------------------------------------- tracing


@dataclasses.dataclass(frozen=True)
class _Act:
    space: int
    axis: int
    outer: int = 1
    inner: int = 1
    source: int | None = None  # leaf index of the kernel that wrote it (affine ops since)


@dataclasses.dataclass(frozen=True)
class _Param:
    leaves: frozenset[int]
    direct: int | None = None  # the leaf itself (up to dtype conversion)


@dataclasses.dataclass(frozen=True)
class _Stat:
    """Depends on activations but was reduced over their channel axis (LayerNorm's mean
    and variance, a softmax's normalizer): combined back elementwise it couples nothing
    new, and no layer may read it. ``leaves``: variables combined with it on the way
    (LayerNorm's scale multiplies the inverse deviation first), attached to the channels
    it is combined with."""

    leaves: frozenset[int] = frozenset()


_STAT = _Stat()


# A jitted function of this name taking (NHWC input, HWIO kernel, ...) is analysed as a
# convolution whatever it computes inside: models can implement convolutions their own
# way (e.g. patches + matmul for speed) and stay analysable.
CONVOLUTION_NAME = "conv_general_dilated"


class GraphError(ValueError):
    """The model contains an operation the dependency analysis cannot handle, or cannot
    be traced at all. The message names the operation and the layer."""

    def __init__(self, message: str, located: bool = False):
        super().__init__(message)
        self.located = located


def _location(eqn) -> str:
    """The layer (Flax name stack) and the user's source line of an equation."""
    parts = []
    stack = str(eqn.source_info.name_stack)
    if stack:
        parts.append(f"in layer {stack}")
    frames = getattr(eqn.source_info.traceback, "frames", None) or []
    libraries = ("/flax/", "/jax/", "/jaxlib/", "/ifjax/", "/site-packages/")
    for frame in frames:  # innermost first: the first frame of the user's own code
        if not any(part in frame.file_name for part in libraries):
            parts.append(f"at {frame.file_name}:{frame.line_num} ({frame.function_name})")
            break
    return ", ".join(parts) or "location unknown"


_AFFINE = {"add", "sub", "mul", "div", "convert_element_type", "copy", "copy_p"}
_ELEMENTWISE_BINARY = {
    "add", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem", "select_n", "clamp",
    "add_any", "nextafter", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
}  # fmt: skip
_ELEMENTWISE_UNARY = {
    "neg", "exp", "exp2", "log", "log1p", "tanh", "logistic", "rsqrt", "sqrt", "abs",
    "sign", "integer_pow", "convert_element_type", "copy", "copy_p", "erf", "sin", "cos",
    "square", "reduce_precision", "stop_gradient", "expm1", "floor", "ceil", "round",
    "is_finite", "not", "erf_inv", "cbrt", "optimization_barrier",
}  # fmt: skip
_POOLS = {"reduce_window_max", "reduce_window_sum", "reduce_window_min", "reduce_window"}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"}
_CALLS = {"pjit", "jit", "custom_jvp_call", "custom_vjp_call", "closed_call", "remat",
          "checkpoint", "custom_vjp_call_jaxpr", "core_call"}  # fmt: skip


class _Tracer:
    """Abstract interpretation of a jaxpr over channel spaces."""

    def __init__(self, leaf_shapes: Sequence[tuple[int, ...]]):
        self.leaf_shapes = leaf_shapes
        self.parent: list[int] = []
        self.space_size: list[int] = []
        self.writers: list[tuple[int, int, int, int]] = []  # (space, leaf, axis, order)
        self.readers: list[tuple[int, int, int, int, int, int]] = []
        self.attached: list[tuple[int, int, int, int | None]] = []  # space, leaf, axis, src
        self.frozen: set[int] = set()
        self.order = 0

    # union-find over channel spaces
    def new_space(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.space_size.append(size)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.space_size[a] != self.space_size[b]:
                raise GraphError(f"{where}: adds activations with different channel counts")
            self.parent[b] = a
        return a

    # evaluation
    def run(self, jaxpr: jax_core.Jaxpr, env_in: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}
        for v, a in zip(jaxpr.invars, env_in, strict=True):
            env[v] = a
        for v in jaxpr.constvars:
            env[v] = None

        def read(v):
            return None if isinstance(v, jax_core.Literal) else env.get(v)

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            try:
                outs = self.equation(eqn, ins)
            except GraphError as error:
                if error.located:
                    raise
                raise GraphError(f"{error} ({_location(eqn)})", located=True) from None
            for v, a in zip(eqn.outvars, outs, strict=True):
                env[v] = a
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        if not any(isinstance(a, _Act) for a in ins):
            if any(isinstance(a, _Stat) for a in ins):
                if name in ("conv_general_dilated", "dot_general"):
                    raise GraphError(f"{name}: a layer reads values reduced over channels")
                leaves = frozenset().union(
                    *(a.leaves for a in ins if isinstance(a, (_Param, _Stat)))
                )
                return [_Stat(leaves)] * len(eqn.outvars)
            leaves = frozenset().union(*(a.leaves for a in ins if isinstance(a, _Param)))
            if not leaves:
                return [None] * len(eqn.outvars)
            direct = None
            if name == "convert_element_type" and isinstance(ins[0], _Param):
                direct = ins[0].direct
            return [_Param(leaves, direct)] * len(eqn.outvars)
        if name in _CALLS:
            return self.call(eqn, ins)
        if name == "conv_general_dilated":
            return [self.conv(eqn, ins)]
        if name == "dot_general":
            return [self.dot(eqn, ins)]
        if name in _ELEMENTWISE_BINARY or name in _ELEMENTWISE_UNARY:
            return [self.elementwise(eqn, ins)] * len(eqn.outvars)
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            return [handler(eqn, ins[0])]
        if name in _POOLS:
            return [self.pool(eqn, ins[0])]
        if name in _REDUCTIONS:
            return [self.reduction(eqn, ins[0])]
        raise GraphError(
            f"cannot analyse operation {name!r} on activations (shape "
            f"{tuple(eqn.outvars[0].aval.shape)}); ifjax supports conv, dense, batch norm, "
            "residual additions, pooling, elementwise activations and flatten"
        )

    def call(self, eqn, ins):
        params = eqn.params
        if params.get("name") == CONVOLUTION_NAME:
            return [self.named_conv(eqn, ins)]
        sub = params.get("jaxpr") or params.get("call_jaxpr") or params.get("fun_jaxpr")
        if sub is None:
            raise GraphError(f"operation {eqn.primitive.name!r} has no inner jaxpr to analyse")
        sub = sub.jaxpr if hasattr(sub, "jaxpr") else sub
        return self.run(sub, ins[: len(sub.invars)])

    def kernel_leaf(self, a: Any, what: str) -> int:
        if not isinstance(a, _Param) or a.direct is None:
            raise GraphError(f"{what}: the kernel is not a plain model variable")
        return a.direct

    def conv(self, eqn, ins) -> _Act:
        lhs, rhs = ins
        dn = eqn.params["dimension_numbers"]
        if not isinstance(lhs, _Act) or isinstance(rhs, _Act):
            raise GraphError("conv_general_dilated: a convolution whose kernel is an activation")
        if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
            raise GraphError(
                "conv_general_dilated: grouped/depthwise convolutions are not supported"
            )
        leaf = self.kernel_leaf(rhs, "conv_general_dilated")
        if lhs.axis != dn.lhs_spec[1] or lhs.outer * lhs.inner != 1:
            raise GraphError("conv_general_dilated: input channels are not on the feature axis")
        self.add_reader(lhs, leaf, dn.rhs_spec[1])
        out = eqn.outvars[0].aval.shape[dn.out_spec[1]]
        return self.add_writer(leaf, dn.rhs_spec[0], out, dn.out_spec[1])

    def named_conv(self, eqn, ins) -> _Act:
        """A jitted function named ``conv_general_dilated``: NHWC input, HWIO kernel."""
        lhs, rhs = ins[:2]
        if not isinstance(lhs, _Act) or lhs.axis != len(eqn.invars[0].aval.shape) - 1:
            raise GraphError(f"{CONVOLUTION_NAME}: expects an NHWC activation as first input")
        leaf = self.kernel_leaf(rhs, CONVOLUTION_NAME)
        kernel = self.leaf_shapes[leaf]
        out_shape = eqn.outvars[0].aval.shape
        if kernel[-2] != eqn.invars[0].aval.shape[-1] or kernel[-1] != out_shape[-1]:
            raise GraphError(f"{CONVOLUTION_NAME}: kernel {kernel} is not HWIO for its input")
        self.add_reader(lhs, leaf, len(kernel) - 2)
        return self.add_writer(leaf, len(kernel) - 1, kernel[-1], len(out_shape) - 1)

    def dot(self, eqn, ins) -> _Act:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        x, k = ins
        swap = not isinstance(x, _Act)
        if swap:
            x, k, lc, rc = k, x, rc, lc
        if isinstance(k, _Act) or lb or rb or len(lc) != 1:
            raise GraphError("dot_general: only activation x kernel products are supported")
        leaf = self.kernel_leaf(k, "dot_general")
        if lc[0] != x.axis:
            raise GraphError("dot_general: contracts an axis other than the channel axis")
        kshape = self.leaf_shapes[leaf]
        if len(kshape) != 2:
            raise GraphError("dot_general: kernels must be 2-D (in, out)")
        self.add_reader(x, leaf, rc[0])
        out_axis = 1 - rc[0]
        x_rank = len(eqn.invars[1 if swap else 0].aval.shape)
        position = 0 if swap else x_rank - 1
        return self.add_writer(leaf, out_axis, kshape[out_axis], position)

    def add_reader(self, x: _Act, leaf: int, axis: int) -> None:
        self.order += 1
        self.readers.append((x.space, leaf, axis, x.outer, x.inner, self.order))

    def add_writer(self, leaf: int, axis: int, size: int, position: int) -> _Act:
        self.order += 1
        space = self.new_space(size)
        self.writers.append((space, leaf, axis, self.order))
        return _Act(space, position, source=leaf)

    def elementwise(self, eqn, ins) -> _Act:
        name = eqn.primitive.name
        acts = [a for a in ins if isinstance(a, _Act)]
        first = acts[0]
        rank = len(eqn.outvars[0].aval.shape)
        for a in acts[1:]:
            if (a.axis, a.outer, a.inner) != (first.axis, first.outer, first.inner):
                raise GraphError(f"{name}: combines activations whose channel axes differ")
            self.union(first.space, a.space, name)
        for v, a in zip(eqn.invars, ins, strict=True):
            if isinstance(a, _Param):
                self.attach(first, a, tuple(v.aval.shape), rank)
            elif isinstance(a, _Stat) and a.leaves:
                self.attach_statistic(first, a)
        keeps_source = (
            len(acts) == 1 and name in _AFFINE and not any(isinstance(a, _Stat) for a in ins)
        )
        source = first.source if keeps_source else None
        return dataclasses.replace(first, space=self.find(first.space), source=source)

    def attach(self, act: _Act, param: _Param, shape: tuple[int, ...], rank: int) -> None:
        """Records per-channel variables combined elementwise with an activation."""
        shape = (1,) * (rank - len(shape)) + shape
        size = self.space_size[self.find(act.space)]
        per_channel = (
            act.outer * act.inner == 1 and shape[act.axis] == size and math.prod(shape) == size
        )
        if not per_channel:
            if math.prod(shape) > 1:
                raise GraphError(
                    f"a variable of shape {shape} is combined with activations in a way that "
                    "is not per channel"
                )
            return
        for leaf in param.leaves:
            leaf_shape = self.leaf_shapes[leaf]
            if math.prod(leaf_shape) != size:
                continue
            axis = next((i for i, d in enumerate(leaf_shape) if d == size), 0)
            self.attached.append((act.space, leaf, axis, act.source))

    def attach_statistic(self, act: _Act, stat: _Stat) -> None:
        """Per-channel variables that entered a reduced value (LayerNorm's scale)."""
        size = self.space_size[self.find(act.space)]
        for leaf in stat.leaves:
            shape = self.leaf_shapes[leaf]
            if act.outer * act.inner == 1 and math.prod(shape) == size and size in shape:
                self.attached.append((act.space, leaf, shape.index(size), None))
            elif math.prod(shape) > 1:
                raise GraphError(
                    f"a variable of shape {shape} is combined with values reduced over "
                    "channels in a way that is not per channel"
                )

    def op_broadcast_in_dim(self, eqn, x: _Act) -> _Act:
        dims = eqn.params["broadcast_dimensions"]
        return dataclasses.replace(x, axis=dims[x.axis], source=None)

    def op_transpose(self, eqn, x: _Act) -> _Act:
        return dataclasses.replace(x, axis=list(eqn.params["permutation"]).index(x.axis))

    def op_squeeze(self, eqn, x: _Act) -> _Act:
        dims = eqn.params["dimensions"]
        if x.axis in dims:
            raise GraphError("squeeze: removes the channel axis")
        return dataclasses.replace(x, axis=x.axis - sum(d < x.axis for d in dims))

    def op_expand_dims(self, eqn, x: _Act) -> _Act:
        axis = x.axis
        for d in sorted(eqn.params["dimensions"]):
            axis += d <= axis
        return dataclasses.replace(x, axis=axis)

    def op_pad(self, eqn, x: _Act) -> _Act:
        if any(eqn.params["padding_config"][x.axis]):
            raise GraphError("pad: pads the channel axis")
        return dataclasses.replace(x, source=None)

    def op_reshape(self, eqn, x: _Act) -> _Act:
        old = tuple(eqn.invars[0].aval.shape)
        new = tuple(eqn.params["new_sizes"])
        before = math.prod(old[: x.axis])
        # the new axis that holds the channel axis: products of the dims before it agree
        for b in range(len(new)):
            lead = math.prod(new[:b])
            if lead > before or lead * new[b] < before * old[x.axis]:
                continue
            lo = next((i for i in range(x.axis + 1) if math.prod(old[:i]) == lead), None)
            hi = next(
                (j for j in range(x.axis, len(old)) if math.prod(old[: j + 1]) == lead * new[b]),
                None,
            )
            if lo is None or hi is None:
                break
            outer = x.outer * math.prod(old[lo : x.axis])
            inner = x.inner * math.prod(old[x.axis + 1 : hi + 1])
            return _Act(x.space, b, outer, inner, source=None)
        raise GraphError(f"reshape {old} -> {new}: splits the channel axis")

    def pool(self, eqn, x: _Act) -> _Act:
        if eqn.params["window_dimensions"][x.axis] != 1:
            raise GraphError(f"{eqn.primitive.name}: pools across channels")
        return dataclasses.replace(x, source=None)

    def reduction(self, eqn, x: _Act) -> _Act | _Stat:
        axes = eqn.params["axes"]
        if x.axis in axes:
            if x.outer * x.inner != 1:
                raise GraphError(f"{eqn.primitive.name}: reduces over the channel axis")
            return _STAT
        return dataclasses.replace(x, axis=x.axis - sum(a < x.axis for a in axes), source=None)

    def op_concatenate(self, eqn, x: _Act) -> _Act:
        raise GraphError(
            "concatenate: concatenation of activations along channels is not supported"
        )


# ----------------------------------------------------------------------------- groups


def _flatten_variables(variables: Mapping[str, Any]) -> tuple[list[Path], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    paths = [tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in p) for p, _ in flat]
    return paths, [leaf for _, leaf in flat], treedef


def _batchnorm_of(module_leaves: dict[str, Path]) -> BatchNormRef | None:
    names = {p[0] + "/" + p[-1]: p for p in module_leaves.values()}
    mean, var = names.get("batch_stats/mean"), names.get("batch_stats/var")
    if mean is None or var is None:
        return None
    return BatchNormRef(names.get("params/scale"), names.get("params/bias"), mean, var)


def _writer(tracer: _Tracer, paths: list[Path], leaf: int, axis: int, root: int) -> Writer:
    kernel = paths[leaf]
    bias, modules = None, {}
    for space, other, _, source in tracer.attached:
        if source != leaf or tracer.find(space) != root:
            continue
        p = paths[other]
        if p[1:-1] == kernel[1:-1]:
            bias = p
        else:
            modules.setdefault(p[1:-1], {})[p] = p
    norms = [bn for m in modules.values() if (bn := _batchnorm_of(m)) is not None]
    return Writer(kernel, axis, bias, norms[0] if len(norms) == 1 else None)


def _build_groups(tracer: _Tracer, paths: list[Path], excluded: set[int]) -> list[Group]:
    by_root: dict[int, dict[str, list]] = {}
    for space, leaf, axis, order in tracer.writers:
        root = tracer.find(space)
        by_root.setdefault(root, {"w": [], "r": []})["w"].append((order, leaf, axis))
    for space, leaf, axis, outer, inner, order in tracer.readers:
        root = tracer.find(space)
        if root in by_root:
            by_root[root]["r"].append((order, Reader(paths[leaf], axis, outer, inner)))
    groups = []
    for root, entries in by_root.items():
        if root in excluded:
            continue
        writers = tuple(
            _writer(tracer, paths, leaf, axis, root) for _, leaf, axis in sorted(entries["w"])
        )
        readers = tuple(r for _, r in sorted(entries["r"], key=lambda t: t[0]))
        channel = sorted(
            {(paths[leaf], axis) for s, leaf, axis, _ in tracer.attached if tracer.find(s) == root}
        )
        last = max(order for order, _, _ in entries["w"])
        groups.append((last, Group(0, tracer.space_size[root], writers, readers, tuple(channel))))
    groups.sort(key=lambda t: -t[0])
    return [dataclasses.replace(g, index=i) for i, (_, g) in enumerate(groups)]


def trace_groups(
    apply: Callable[[Any, Any], Any],
    variables: Mapping[str, Any],
    example_input: Any,
    what: str = "the model",
) -> tuple[Group, ...]:
    """The groups of ``apply(variables, x)``, a pure function of a variables tree.

    ``what`` names the computation in errors (e.g. ``"Net.apply(variables, x)"``).
    """
    paths, leaves, treedef = _flatten_variables(variables)
    shapes = [tuple(np.shape(x)) for x in leaves]
    abstract = [
        jax.ShapeDtypeStruct(s, jnp.result_type(x)) for s, x in zip(shapes, leaves, strict=True)
    ]
    x_abstract = jax.ShapeDtypeStruct(np.shape(example_input), np.asarray(example_input).dtype)
    try:
        closed = jax.make_jaxpr(lambda flat, x: apply(treedef.unflatten(flat), x))(
            abstract, x_abstract
        )
    except Exception as error:  # the user's model failed: say which call and why
        hint = ""
        if "unbound axis name" in str(error):
            hint = (
                " (it needs a named axis: trace it in evaluation mode, e.g. "
                "apply_kwargs={'train': False})"
            )
        raise GraphError(
            f"cannot trace {what} on an input of shape {x_abstract.shape}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}{hint}"
        ) from error
    tracer = _Tracer(shapes)
    input_space = tracer.new_space(int(x_abstract.shape[-1]))
    env = [_Param(frozenset([i]), i) for i in range(len(leaves))]
    env.append(_Act(input_space, len(x_abstract.shape) - 1))
    outs = tracer.run(closed.jaxpr, env)
    excluded = {tracer.find(input_space)}
    excluded |= {tracer.find(o.space) for o in jax.tree.leaves(outs) if isinstance(o, _Act)}
    return tuple(_build_groups(tracer, paths, excluded))


def view_groups(view: ModelView, example_input: Any) -> tuple[Group, ...]:
    """The groups of a :class:`~ifjax._model.ModelView`."""
    return trace_groups(view.apply, view.variables, example_input, view.describe)


def discover_groups(
    model: Any,
    *args: Any,
    apply_kwargs: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Group, ...]:
    """Finds the coupled channel groups of a Flax model by tracing its computation.

    Linen: ``discover_groups(model, variables, example_input, apply_kwargs=None)``.
    NNX: ``discover_groups(module, example_input, call_kwargs=None)`` (the module must be
    in evaluation mode: ``module.eval()``).

    Args:
      model: a Flax Linen or NNX module, built from convolutions, Dense/Linear layers,
        BatchNorm, LayerNorm, residual additions, pooling, means, dropout, elementwise
        activations and flatten, auto-named or not, in ``Sequential`` or not.
      *args: the Linen module's variables (``{"params": ..., "batch_stats": ...}``) and
        an input batch, or the NNX module's input batch (only shape and dtype are used).
      apply_kwargs: extra arguments of every ``model.apply`` (e.g. ``{"train": False}``).
      call_kwargs: extra arguments of every NNX call (e.g. ``{"rngs": nnx.Rngs(0)}``).

    Returns:
      The groups, ordered like the reference: group 0 is nearest the output. Paths are
      those of the variables tree (for NNX: ``params``/``batch_stats`` and the module's
      attribute path, e.g. ``("params", "layers", "0", "kernel")``).

    Raises:
      GraphError: the model cannot be traced with these arguments, or contains an
        operation the analysis cannot handle (a concatenation of channels, a grouped
        convolution, GroupNorm, ...); the message names the operation and the layer.

    Example:
      >>> groups = discover_groups(model, variables, jnp.zeros((1, 32, 32, 3)))
      >>> print(groups[0].describe())  # doctest: +SKIP
      group 0 (n=512): writes [conv7] reads [classifier]
    """
    view, example_input = view_and_input(model, args, apply_kwargs, call_kwargs)
    return view_groups(view, example_input)

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
from ifjax._tree import tree_get

Path = tuple[str, ...]

__all__ = [
    "GROUP_KINDS",
    "BatchNormRef",
    "GraphError",
    "Group",
    "Partition",
    "Reader",
    "SizeOf",
    "Writer",
    "discover_groups",
    "path_str",
    "resolve_segments",
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
      bias: path of the layer's bias (per channel along its axis 0), if any.
      batchnorm: the BatchNorm that follows the layer directly, if any.
      outer, inner: layout of the output axis (and of the bias's axis 0), as for
        :class:`Reader`: a Dense layer whose outputs are reshaped into heads writes head
        c as the ``inner = head_dim`` entries ``c * head_dim ...``.
      role: for attention heads, ``"query_key"`` (its per-head dimensions are
        contracted with another activation's: queries and keys) or ``"value"``.
    """

    kernel: Path
    axis: int
    bias: Path | None = None
    batchnorm: BatchNormRef | None = None
    outer: int = 1
    inner: int = 1
    role: str = ""

    @property
    def module(self) -> Path:
        return self.kernel[1:-1]


@dataclasses.dataclass(frozen=True)
class Reader:
    """A layer whose input channels are the group's channels.

    The input axis has ``outer * size * inner`` entries; entry ``(o, c, i)`` belongs to
    channel ``c``. A Dense layer after flattening an (H, W, C) map has ``outer = H*W``.
    A grouped convolution (``groups`` > 1) reads its input channels in ``groups`` equal
    blocks: its kernel's input axis holds one block's channels, and block g is read by
    the g-th block of its output axis ``output_axis``. A reader of a concatenation reads
    the group's channels from the segment of its input axis that
    :attr:`Group.segments` gives.
    """

    kernel: Path
    axis: int
    outer: int = 1
    inner: int = 1
    groups: int = 1
    output_axis: int = -1

    @property
    def module(self) -> Path:
        return self.kernel[1:-1]

    @property
    def flattened(self) -> bool:
        return self.outer * self.inner > 1


GROUP_KINDS = ("channels", "neurons", "heads", "residual")


@dataclasses.dataclass(frozen=True)
class SizeOf:
    """The current channel count of another group, read from one of its writers (the
    kernel's ``axis`` has ``layout`` entries per channel): a segment of a concatenation
    that comes before a group's own channels and shrinks when that group is pruned."""

    kernel: Path
    axis: int
    layout: int = 1

    def read(self, variables: Mapping[str, Any]) -> int:
        return int(np.shape(tree_get(variables, self.kernel))[self.axis]) // self.layout


@dataclasses.dataclass(frozen=True)
class Partition:
    """The group's channels form ``count`` equal contiguous blocks that must keep equal
    numbers of channels: the convolution groups of a grouped convolution, or the norm
    groups of a GroupNorm (``normalizes``: the block statistics change when channels
    are pruned). ``layer``: the module path of the layer."""

    layer: str
    count: int
    normalizes: bool = False

    def describe(self) -> str:
        if self.normalizes:
            return f"the {self.count} norm groups of GroupNorm {self.layer}"
        return f"the {self.count} convolution groups of grouped convolution {self.layer}"


@dataclasses.dataclass(frozen=True)
class Group:
    """Channels that must be pruned together.

    Attributes:
      index: 0 for the group nearest the output, counting backwards through the network.
      size: number of channels n (for attention heads: the number of heads).
      writers: layers writing the channels, in execution order.
      readers: layers reading them, in execution order.
      channel_params: every per-channel variable of the group (biases, BatchNorm
        scale/bias/mean/var, LayerNorm scale/bias, a position embedding or class token),
        as (path, axis) pairs: the variable's channels lie along ``axis``.
      kind: what the channels are. ``"channels"``: convolution output channels;
        ``"neurons"``: hidden units written and read by Dense layers (a transformer's
        MLP); ``"heads"``: attention heads (each head's query, key and value kernels
        and its slice of the output projection, pruned as a whole); ``"residual"``:
        channels a LayerNorm normalizes over (a transformer's residual stream: pruning
        them changes the normalization statistics, so ``prune(..., "all")`` leaves them
        out and prunes them only when asked for).
      partitions: equal blocks the channels are pruned in (grouped convolutions,
        GroupNorm): every block keeps the same number of channels.
      segments: for a variable (a reader's kernel or a per-channel variable) that holds
        a concatenation of several groups' channels along its axis, the segments before
        this group's: their channel counts (fixed, or :class:`SizeOf` another group,
        read when the group is pruned). Variables not listed hold this group's channels
        only.
    """

    index: int
    size: int
    writers: tuple[Writer, ...]
    readers: tuple[Reader, ...]
    channel_params: tuple[tuple[Path, int], ...]
    kind: str = "channels"
    partitions: tuple[Partition, ...] = ()
    segments: tuple[tuple[Path, tuple[int | SizeOf, ...]], ...] = ()

    @property
    def blocks(self) -> int:
        """Number of equal blocks every pruning keeps equal (1: none)."""
        return math.lcm(1, *(p.count for p in self.partitions))

    @property
    def normalized_in_blocks(self) -> bool:
        """A GroupNorm normalizes the channels (pruning changes its statistics)."""
        return any(p.normalizes for p in self.partitions)

    def start(self, path: Path) -> int:
        """Where the group's channels start along the axis of variable ``path`` (0 unless
        it holds a concatenation; the group must be resolved, see
        :func:`resolve_segments`)."""
        for p, before in self.segments:
            if p == path:
                if not all(isinstance(b, int) for b in before):
                    raise ValueError("the group's segments are not resolved: resolve_segments")
                return sum(before)
        return 0

    @property
    def layer(self) -> str:
        """The innermost module holding all of the group's layers (``block3/attention``
        for the heads of block 3), else the writing layer if there is one (``conv3``),
        else "" (the model: a residual stream)."""
        modules = [w.module for w in self.writers] + [r.module for r in self.readers]
        common = modules[0]
        for module in modules[1:]:
            n = 0
            while n < min(len(common), len(module)) and common[n] == module[n]:
                n += 1
            common = common[:n]
        if not common and len(self.writers) == 1:
            common = self.writers[0].module
        return path_str(common)

    def describe(self) -> str:
        """One line: index, size, kind, layer, writing and reading modules."""
        w = ", ".join(path_str(x.module) for x in self.writers)
        r = ", ".join(path_str(x.module) for x in self.readers)
        where = f" of {self.layer}" if self.layer else ""
        return f"group {self.index} ({self.kind}{where}, n={self.size}): writes [{w}] reads [{r}]"


def resolve_segments(variables: Mapping[str, Any], group: Group) -> Group:
    """The group with the channel counts of the segments before its own (in
    concatenations) read from ``variables``: its offsets then are plain integers."""
    if not group.segments or all(
        all(isinstance(b, int) for b in before) for _, before in group.segments
    ):
        return group
    segments = tuple(
        (path, (sum(b if isinstance(b, int) else b.read(variables) for b in before),))
        for path, before in group.segments
    )
    return dataclasses.replace(group, segments=segments)


# ----------------------------------------------------------------------------- tracing


@dataclasses.dataclass(frozen=True)
class _Dim:
    """A tracked axis of an activation: its ``outer * n * inner`` entries are laid out as
    (o, c, i), entry (o, c, i) belonging to channel c of ``space`` (n channels)."""

    axis: int
    space: int
    outer: int = 1
    inner: int = 1


@dataclasses.dataclass(frozen=True)
class _Act:
    """A value that depends on the input. ``dims``: its tracked axes (usually one, the
    channel axis; two inside attention: heads and the per-head dimensions; none for
    values whose channels were contracted away, e.g. single-head attention weights).
    ``source``: leaf index of the kernel that wrote it (only affine ops since)."""

    dims: tuple[_Dim, ...]
    source: int | None = None

    def at(self, axis: int) -> _Dim | None:
        return next((d for d in self.dims if d.axis == axis), None)

    def only(self, what: str) -> _Dim:
        """The single channel axis (layers that read channels need exactly one)."""
        if len(self.dims) != 1:
            raise GraphError(f"{what}: reads an activation with {len(self.dims)} channel axes")
        return self.dims[0]

    def mapped(self, axis_map: Callable[[int], int], source: int | None = None) -> _Act:
        dims = tuple(dataclasses.replace(d, axis=axis_map(d.axis)) for d in self.dims)
        return _Act(dims, source)


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


@dataclasses.dataclass
class _Factor:
    """``space`` is the product of ``first`` (outer) and ``second`` (inner): a channel
    axis split into (heads, per-head dimensions) by a reshape, or such two axes merged
    back. ``error``: raised when neither factor turns out to be attention heads."""

    space: int
    first: int
    second: int
    error: str | None


class _Tracer:
    """Abstract interpretation of a jaxpr over channel spaces."""

    def __init__(self, leaf_shapes: Sequence[tuple[int, ...]], paths: Sequence[Path]):
        self.leaf_shapes = leaf_shapes
        self.paths = paths
        self.parent: list[int] = []
        self.space_size: list[int] = []
        self.writers: list[tuple[int, int, int, int]] = []  # (space, leaf, axis, order)
        self.readers: list[tuple[int, int, int, int, int, int, int, int]] = []
        self.attached: list[tuple[int, int, int, int | None]] = []  # space, leaf, axis, src
        self.factors: list[_Factor] = []
        self.heads: list[int] = []  # spaces batched in a product of two activations
        self.contracted: list[int] = []  # spaces contracted in such products (q/k dims)
        self.carried: list[int] = []  # spaces carried through them (value dims)
        self.normalized: list[int] = []  # spaces reduced over (LayerNorm statistics)
        self.reduced_in: dict[int, str] = {}  # such a space -> the layer reducing it
        # channel concatenations: (space, ((part space or None, size), ...), location)
        self.concats: list[tuple[int, tuple[tuple[int | None, int], ...], str]] = []
        self.partitions: list[tuple[int, Partition]] = []  # grouped convolutions
        self.conv_leaves: set[int] = set()
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

    def size(self, s: int) -> int:
        return self.space_size[self.find(s)]

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
        if name == "concatenate":
            return [self.concatenate(eqn, ins)]
        handler = getattr(self, f"op_{name}", None)
        if handler is not None and isinstance(ins[0], _Act):
            return [handler(eqn, ins[0])]
        if name in _POOLS:
            return [self.pool(eqn, ins[0])]
        if name in _REDUCTIONS:
            return [self.reduction(eqn, ins[0])]
        raise GraphError(
            f"cannot analyse operation {name!r} on activations (shape "
            f"{tuple(eqn.outvars[0].aval.shape)}); ifjax supports conv, dense, batch norm, "
            "layer norm, attention, residual additions, pooling, elementwise activations, "
            "slicing and flatten"
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

    def kernel_leaf(self, a: Any, what: str, shape: Sequence[int]) -> int:
        """The variable a layer's kernel is: the variable itself, or computed from that
        one variable alone with its shape (a weight-standardized kernel: each output
        channel's weights standardized; its output channels prune exactly, pruning its
        input channels changes the standardization statistics)."""
        if isinstance(a, _Param):
            if a.direct is not None:
                return a.direct
            if len(a.leaves) == 1:
                (leaf,) = a.leaves
                if self.leaf_shapes[leaf] == tuple(shape):
                    return leaf
        raise GraphError(
            f"{what}: the kernel is not a model variable, nor computed from one variable of "
            "its shape (e.g. weight standardization)"
        )

    def conv(self, eqn, ins) -> _Act:
        """A convolution reads its input channels and writes a new space; a depthwise one
        (one group per input channel) passes its channels through, its kernel (output
        axis) joining their group as a writer; a grouped one reads and writes channels
        in blocks (see :class:`Partition`)."""
        lhs, rhs = ins
        dn = eqn.params["dimension_numbers"]
        if not isinstance(lhs, _Act) or isinstance(rhs, _Act):
            raise GraphError("conv_general_dilated: a convolution whose kernel is an activation")
        if eqn.params["batch_group_count"] != 1:
            raise GraphError("conv_general_dilated: batch-grouped convolutions are not supported")
        leaf = self.kernel_leaf(rhs, "conv_general_dilated", eqn.invars[1].aval.shape)
        x = lhs.only("conv_general_dilated")
        if x.axis != dn.lhs_spec[1] or x.outer * x.inner != 1:
            raise GraphError("conv_general_dilated: input channels are not on the feature axis")
        self.conv_leaves.add(leaf)
        groups = eqn.params["feature_group_count"]
        channels = eqn.invars[0].aval.shape[dn.lhs_spec[1]]
        out = eqn.outvars[0].aval.shape[dn.out_spec[1]]
        layer = path_str(self.paths[leaf][1:-1])
        if groups > 1 and groups == channels:
            if out != channels:
                raise GraphError(
                    f"conv_general_dilated: depthwise convolution {layer} with channel "
                    f"multiplier {out // channels} (only multiplier 1 is supported)"
                )
            self.order += 1
            self.writers.append((x.space, leaf, dn.rhs_spec[0], self.order))
            return _Act((_Dim(dn.out_spec[1], x.space),), source=leaf)
        self.add_reader(x, leaf, dn.rhs_spec[1], groups, dn.rhs_spec[0] if groups > 1 else -1)
        space = self.add_writer(leaf, dn.rhs_spec[0], out)
        if groups > 1:
            partition = Partition(layer, groups)
            self.partitions += [(x.space, partition), (space, partition)]
        return _Act((_Dim(dn.out_spec[1], space),), source=leaf)

    def named_conv(self, eqn, ins) -> _Act:
        """A jitted function named ``conv_general_dilated``: NHWC input, HWIO kernel."""
        lhs, rhs = ins[:2]
        rank = len(eqn.invars[0].aval.shape)
        if not isinstance(lhs, _Act) or [d.axis for d in lhs.dims] != [rank - 1]:
            raise GraphError(f"{CONVOLUTION_NAME}: expects an NHWC activation as first input")
        leaf = self.kernel_leaf(rhs, CONVOLUTION_NAME, eqn.invars[1].aval.shape)
        kernel = self.leaf_shapes[leaf]
        out_shape = eqn.outvars[0].aval.shape
        if kernel[-2] != eqn.invars[0].aval.shape[-1] or kernel[-1] != out_shape[-1]:
            raise GraphError(f"{CONVOLUTION_NAME}: kernel {kernel} is not HWIO for its input")
        self.add_reader(lhs.dims[0], leaf, len(kernel) - 2)
        self.conv_leaves.add(leaf)
        space = self.add_writer(leaf, len(kernel) - 1, kernel[-1])
        return _Act((_Dim(len(out_shape) - 1, space),), source=leaf)

    def dot(self, eqn, ins) -> _Act:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        x, k = ins
        if isinstance(x, _Act) and isinstance(k, _Act):
            return self.product(eqn, x, k)
        swap = not isinstance(x, _Act)
        if swap:
            x, k, lc, rc, lb, rb = k, x, rc, lc, rb, lb
        if k is None:
            return self.constant_dot(eqn, x, lc, lb, swap)
        if lb or rb:
            raise GraphError("dot_general: batched products with a kernel are not supported")
        leaf = self.kernel_leaf(k, "dot_general", eqn.invars[0 if swap else 1].aval.shape)
        tracked = {d.axis: d for d in x.dims}
        if any(a not in tracked for a in lc):
            raise GraphError("dot_general: contracts an axis other than the channel axis")
        if len(lc) != len(tracked):
            raise GraphError("dot_general: leaves a channel axis of its input uncontracted")
        if len(lc) > 1 and any(tracked[a].outer * tracked[a].inner != 1 for a in lc):
            raise GraphError("dot_general: contracts a flattened channel axis with others")
        for a, kernel_axis in zip(lc, rc, strict=True):
            self.add_reader(tracked[a], leaf, kernel_axis)
        kshape = self.leaf_shapes[leaf]
        free = [i for i in range(len(kshape)) if i not in rc]
        x_rank = len(eqn.invars[1 if swap else 0].aval.shape)
        first = 0 if swap else x_rank - len(lc)
        dims = tuple(
            _Dim(first + j, self.add_writer(leaf, axis, kshape[axis]))
            for j, axis in enumerate(free)
        )
        return _Act(dims, source=leaf)

    def constant_dot(self, eqn, x: _Act, lc, lb, swap: bool) -> _Act:
        """A product with a constant over non-channel axes (``jax.image.resize``'s
        interpolation matrices): the channels pass through."""
        if any(d.axis in (*lc, *lb) for d in x.dims):
            raise GraphError("dot_general: contracts the channel axis with a constant")
        rank = len(eqn.invars[1 if swap else 0].aval.shape)
        free = [a for a in range(rank) if a not in lc and a not in lb]
        first = len(lb)
        if swap:  # the activation is the right operand: after the left one's free axes
            first += len(eqn.invars[0].aval.shape) - len(lc) - len(lb)
        return x.mapped(lambda a: first + free.index(a))

    def product(self, eqn, x: _Act, y: _Act) -> _Act:
        """A product of two activations (attention: queries x keys, weights x values).
        Channel axes paired in it become one space; those on batch axes are attention
        heads, the others (contracted or carried) per-head dimensions."""
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        ranks = [len(v.aval.shape) for v in eqn.invars]

        def pair(a: int, b: int, kind: list[int]) -> int | None:
            da, db = x.at(a), y.at(b)
            if (da is None) != (db is None):
                raise GraphError(
                    "dot_general: pairs a channel axis of one activation with a non-channel "
                    "axis of the other"
                )
            if da is None:
                return None
            if (da.outer, da.inner) != (db.outer, db.inner):
                raise GraphError("dot_general: pairs channel axes of different layouts")
            kind.append(self.union(da.space, db.space, "dot_general"))
            return kind[-1]

        for a, b in zip(lc, rc, strict=True):
            pair(a, b, self.contracted)
        dims = []
        for position, (a, b) in enumerate(zip(lb, rb, strict=True)):
            space = pair(a, b, self.heads)
            if space is not None:
                d = x.at(a)
                dims.append(_Dim(position, space, d.outer, d.inner))
        position = len(lb)
        for act, rank, used in ((x, ranks[0], (*lc, *lb)), (y, ranks[1], (*rc, *rb))):
            for a in range(rank):
                if a in used:
                    continue
                d = act.at(a)
                if d is not None:
                    self.carried.append(d.space)
                    dims.append(dataclasses.replace(d, axis=position))
                position += 1
        return _Act(tuple(dims))

    def add_reader(
        self, x: _Dim, leaf: int, axis: int, groups: int = 1, output_axis: int = -1
    ) -> None:
        self.order += 1
        self.readers.append(
            (x.space, leaf, axis, x.outer, x.inner, self.order, groups, output_axis)
        )

    def add_writer(self, leaf: int, axis: int, size: int) -> int:
        self.order += 1
        space = self.new_space(size)
        self.writers.append((space, leaf, axis, self.order))
        return space

    def merge(self, name: str, acts: Sequence[_Act]) -> tuple[_Dim, ...]:
        """The channel axes of activations combined position by position: those on the
        same axis become one space."""
        by_axis: dict[int, _Dim] = {}
        for act in acts:
            for d in act.dims:
                seen = by_axis.get(d.axis)
                if seen is None:
                    by_axis[d.axis] = d
                    continue
                if (seen.outer, seen.inner) != (d.outer, d.inner):
                    raise GraphError(f"{name}: combines activations whose channel axes differ")
                self.union(seen.space, d.space, name)
        return tuple(
            dataclasses.replace(d, space=self.find(d.space)) for _, d in sorted(by_axis.items())
        )

    def check_broadcast(self, name: str, eqn, ins: list[Any], dims: tuple[_Dim, ...]) -> None:
        """Activations not tracked on a channel axis of the result must broadcast along it."""
        for v, a in zip(eqn.invars, ins, strict=True):
            if not isinstance(a, _Act):
                continue
            shape = (1,) * (len(eqn.outvars[0].aval.shape) - len(v.aval.shape)) + tuple(
                v.aval.shape
            )
            for d in dims:
                if a.at(d.axis) is None and shape[d.axis] != 1:
                    raise GraphError(f"{name}: combines activations whose channel axes differ")

    def elementwise(self, eqn, ins) -> _Act:
        name = eqn.primitive.name
        acts = [a for a in ins if isinstance(a, _Act)]
        dims = self.merge(name, acts)
        self.check_broadcast(name, eqn, ins, dims)
        result = _Act(dims)
        rank = len(eqn.outvars[0].aval.shape)
        source = acts[0].source if len(acts) == 1 else None
        for v, a in zip(eqn.invars, ins, strict=True):
            if isinstance(a, _Param):
                self.attach(result, a, tuple(v.aval.shape), rank, source)
            elif isinstance(a, _Stat) and a.leaves:
                self.attach_statistic(result, a)
        keeps_source = (
            len(acts) == 1 and name in _AFFINE and not any(isinstance(a, _Stat) for a in ins)
        )
        return _Act(dims, source if keeps_source else None)

    def concatenate(self, eqn, ins) -> _Act:
        """Along a non-channel axis (a class token before the patches): the pieces share
        their channels; variables among them (the token) are per-channel variables.
        Along the channel axis: a new space made of segments, each the channels of its
        piece (constants, e.g. zero channels, are segments of no group)."""
        axis = eqn.params["dimension"]
        acts = [a for a in ins if isinstance(a, _Act)]
        if any(a.at(axis) is not None for a in acts):
            parts = []
            for v, a in zip(eqn.invars, ins, strict=True):
                size = int(v.aval.shape[axis])
                if a is None:
                    parts.append((None, size))
                    continue
                d = a.at(axis) if isinstance(a, _Act) else None
                if d is None or len(a.dims) != 1 or d.outer * d.inner != 1:
                    raise GraphError(
                        "concatenate: joins channels of activations with variables or with "
                        "activations of other channel axes"
                    )
                parts.append((d.space, size))
            space = self.new_space(sum(size for _, size in parts))
            self.concats.append((space, tuple(parts), _location(eqn)))
            return _Act((_Dim(axis, space),))
        dims = self.merge("concatenate", acts)
        result = _Act(dims)
        rank = len(eqn.outvars[0].aval.shape)
        for v, a in zip(eqn.invars, ins, strict=True):
            if isinstance(a, _Param):
                self.attach(result, a, tuple(v.aval.shape), rank, None)
            elif isinstance(a, _Stat):
                raise GraphError("concatenate: joins values reduced over channels")
        return result

    def leaf_axis(self, leaf: int, shape: tuple[int, ...], axis: int, size: int) -> int | None:
        """The axis of variable ``leaf`` that becomes ``axis`` of ``shape`` (its value at
        the operation, after reshapes/broadcasts that only add leading axes)."""
        leaf_shape = self.leaf_shapes[leaf]
        pad = len(shape) - len(leaf_shape)
        if pad >= 0:
            padded = (1,) * pad + leaf_shape
            fits = all(p in (1, s) for p, s in zip(padded, shape, strict=True))
            if fits and padded[axis] == size and axis >= pad:
                return axis - pad
        if math.prod(leaf_shape) == size and size in leaf_shape:
            return leaf_shape.index(size)
        return None

    def attach(
        self, act: _Act, param: _Param, shape: tuple[int, ...], rank: int, source: int | None
    ) -> None:
        """Records per-channel variables combined with an activation (biases, BatchNorm,
        a position embedding or class token: per channel and position)."""
        shape = (1,) * (rank - len(shape)) + shape
        for d in act.dims:
            size = self.size(d.space)
            full = d.outer * size * d.inner
            if shape[d.axis] == 1 and full != 1:
                continue
            if d.outer * d.inner != 1:
                raise GraphError(
                    f"a variable of shape {shape} is combined with activations in a way that "
                    "is not per channel"
                )
            for leaf in param.leaves:
                axis = self.leaf_axis(leaf, shape, d.axis, size)
                if axis is not None:
                    self.attached.append((d.space, leaf, axis, source))

    def attach_statistic(self, act: _Act, stat: _Stat) -> None:
        """Per-channel variables that entered a reduced value (LayerNorm's scale)."""
        for leaf in stat.leaves:
            shape = self.leaf_shapes[leaf]
            size = math.prod(shape)
            dims = [d for d in act.dims if d.outer * d.inner == 1 and self.size(d.space) == size]
            if dims and size in shape:
                self.attached.append((dims[-1].space, leaf, shape.index(size), None))
            elif size > 1:
                raise GraphError(
                    f"a variable of shape {shape} is combined with values reduced over "
                    "channels in a way that is not per channel"
                )

    def op_broadcast_in_dim(self, eqn, x: _Act) -> _Act:
        dims = eqn.params["broadcast_dimensions"]
        return x.mapped(lambda a: dims[a])

    def op_transpose(self, eqn, x: _Act) -> _Act:
        permutation = list(eqn.params["permutation"])
        return x.mapped(permutation.index, x.source)

    def op_squeeze(self, eqn, x: _Act) -> _Act:
        dims = eqn.params["dimensions"]
        if any(d.axis in dims for d in x.dims):
            raise GraphError("squeeze: removes the channel axis")
        return x.mapped(lambda a: a - sum(d < a for d in dims), x.source)

    def op_expand_dims(self, eqn, x: _Act) -> _Act:
        def moved(axis: int) -> int:
            for d in sorted(eqn.params["dimensions"]):
                axis += d <= axis
            return axis

        return x.mapped(moved, x.source)

    def op_pad(self, eqn, x: _Act) -> _Act:
        if any(any(eqn.params["padding_config"][d.axis]) for d in x.dims):
            raise GraphError("pad: pads the channel axis")
        return x.mapped(lambda a: a)

    def op_slice(self, eqn, x: _Act) -> _Act:
        """Static slicing (``x[:, 0]``: the class token) of non-channel axes."""
        shape = eqn.invars[0].aval.shape
        start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
        strides = eqn.params["strides"] or (1,) * len(shape)
        for d in x.dims:
            if (start[d.axis], limit[d.axis], strides[d.axis]) != (0, shape[d.axis], 1):
                raise GraphError("slice: slices the channel axis")
        return x.mapped(lambda a: a)

    def op_dynamic_slice(self, eqn, x: _Act) -> _Act:
        shape = eqn.invars[0].aval.shape
        for d in x.dims:
            if eqn.params["slice_sizes"][d.axis] != shape[d.axis]:
                raise GraphError("dynamic_slice: slices the channel axis")
        return x.mapped(lambda a: a)

    def reshape_dim(self, eqn, d: _Dim, old: tuple, new: tuple) -> list[_Dim]:
        before = math.prod(old[: d.axis])
        end = before * old[d.axis]
        # the new axis that holds the channel axis: products of the dims before it agree
        for b in range(len(new)):
            lead = math.prod(new[:b])
            if lead > before or lead * new[b] < end:
                continue
            lo = next((i for i in range(d.axis + 1) if math.prod(old[:i]) == lead), None)
            hi = next(
                (j for j in range(d.axis, len(old)) if math.prod(old[: j + 1]) == lead * new[b]),
                None,
            )
            if lo is None or hi is None:
                break
            outer = d.outer * math.prod(old[lo : d.axis])
            inner = d.inner * math.prod(old[d.axis + 1 : hi + 1])
            return [_Dim(b, d.space, outer, inner)]
        # split into several axes: into (heads, per-head dimensions) if two of them
        message = f"reshape {old} -> {new}: splits the channel axis"
        first = next((b for b in range(len(new) + 1) if math.prod(new[:b]) == before), None)
        last = next(
            (b for b in range(len(new)) if math.prod(new[: b + 1]) == end and b >= (first or 0)),
            None,
        )
        if d.outer * d.inner != 1 or first is None or last is None:
            raise GraphError(message)
        parts = [b for b in range(first, last + 1) if new[b] != 1]
        if len(parts) != 2:
            raise GraphError(message)
        outer_space, inner_space = (self.new_space(new[b]) for b in parts)
        error = f"{message} ({_location(eqn)})"
        self.factors.append(_Factor(d.space, outer_space, inner_space, error))
        return [_Dim(parts[0], outer_space), _Dim(parts[1], inner_space)]

    def op_reshape(self, eqn, x: _Act) -> _Act:
        old = tuple(eqn.invars[0].aval.shape)
        new = tuple(eqn.params["new_sizes"])
        placed: dict[int, list[_Dim]] = {}
        for d in x.dims:
            for moved in self.reshape_dim(eqn, d, old, new):
                placed.setdefault(moved.axis, []).append(moved)
        dims = []
        for axis, here in sorted(placed.items()):
            if len(here) == 1:
                dims.append(here[0])
                continue
            # two channel axes merged into one (heads and per-head dimensions, flattened)
            outer, inner = sorted(here, key=lambda d: -d.inner)
            n_outer, n_inner = self.size(outer.space), self.size(inner.space)
            if len(here) != 2 or (outer.inner, inner.outer) != (
                n_inner * inner.inner,
                outer.outer * n_outer,
            ):
                raise GraphError(f"reshape {old} -> {new}: merges channel axes")
            split = next(
                (
                    f
                    for f in self.factors
                    if (self.find(f.first), self.find(f.second))
                    == (self.find(outer.space), self.find(inner.space))
                ),
                None,
            )
            if split is not None:  # merged back as it was split: the same channels
                space = self.find(split.space)
            else:
                space = self.new_space(n_outer * n_inner)
                self.factors.append(_Factor(space, outer.space, inner.space, None))
            dims.append(_Dim(axis, space, outer.outer, inner.inner))
        return _Act(tuple(dims))

    def pool(self, eqn, x: _Act) -> _Act:
        if any(eqn.params["window_dimensions"][d.axis] != 1 for d in x.dims):
            raise GraphError(f"{eqn.primitive.name}: pools across channels")
        return x.mapped(lambda a: a)

    def reduction(self, eqn, x: _Act) -> _Act | _Stat:
        axes = eqn.params["axes"]
        reduced = [d for d in x.dims if d.axis in axes]
        if reduced:
            if any(d.outer * d.inner != 1 for d in reduced):
                raise GraphError(f"{eqn.primitive.name}: reduces over the channel axis")
            self.normalized.extend(d.space for d in reduced)
            for d in reduced:
                self.reduced_in[d.space] = str(eqn.source_info.name_stack)
            return _STAT
        return x.mapped(lambda a: a - sum(r < a for r in axes))


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


@dataclasses.dataclass
class _Entries:
    """What touches one space (a union-find root), layouts included. ``segments``: for
    a leaf reading this space from a concatenation, the pieces before it
    ((root or None, size), ...)."""

    writers: list[tuple[int, int, int, int, int]] = dataclasses.field(default_factory=list)
    readers: list[tuple[int, int, int, int, int, int, int]] = dataclasses.field(
        default_factory=list
    )
    attached: list[tuple[int, int, int | None, int, int]] = dataclasses.field(default_factory=list)
    segments: dict[int, tuple[tuple[int | None, int], ...]] = dataclasses.field(
        default_factory=dict
    )
    partitions: set[Partition] = dataclasses.field(default_factory=set)

    def add(self, other: _Entries, outer: int, inner: int) -> None:
        """Adds ``other``'s entries with their layouts refined by (outer, inner)."""
        self.writers += [(o, lf, ax, a * outer, b * inner) for o, lf, ax, a, b in other.writers]
        self.readers += [
            (o, lf, ax, a * outer, b * inner, g, oa) for o, lf, ax, a, b, g, oa in other.readers
        ]
        self.attached += [(lf, ax, s, a * outer, b * inner) for lf, ax, s, a, b in other.attached]
        if other.segments or other.partitions:
            raise GraphError("attention heads made of concatenated or grouped channels")


def _entries(tracer: _Tracer, heads: set[int]) -> tuple[dict[int, _Entries], set[int]]:
    """Entries per root, those of factored spaces moved to their heads factor; and the
    roots that are not groups (factored spaces)."""
    entries: dict[int, _Entries] = {}
    get = lambda s: entries.setdefault(tracer.find(s), _Entries())
    for space, leaf, axis, order in tracer.writers:
        get(space).writers.append((order, leaf, axis, 1, 1))
    for space, leaf, axis, outer, inner, order, groups, output_axis in tracer.readers:
        get(space).readers.append((order, leaf, axis, outer, inner, groups, output_axis))
    for space, leaf, axis, source in tracer.attached:
        get(space).attached.append((leaf, axis, source, 1, 1))
    for space, partition in tracer.partitions:
        get(space).partitions.add(partition)
    normalized = {tracer.find(s) for s in tracer.normalized}
    reduced_in = {tracer.find(s): layer for s, layer in tracer.reduced_in.items()}
    factored = set()
    for factor in tracer.factors:
        whole = tracer.find(factor.space)
        first, second = tracer.find(factor.first), tracer.find(factor.second)
        if first in heads:
            target, layout = first, (1, tracer.space_size[second])
        elif second in heads:
            target, layout = second, (tracer.space_size[first], 1)
        elif second in normalized and first not in normalized:
            # split into (norm groups, channels per group), statistics per norm group
            partition = Partition(reduced_in[second], tracer.space_size[first], normalizes=True)
            get(whole).partitions.add(partition)
            continue
        elif factor.error is not None:
            raise GraphError(factor.error, located=True)
        else:
            continue
        if whole in entries and whole != target:
            entries.setdefault(target, _Entries()).add(entries.pop(whole), *layout)
        factored.add(whole)
    return entries, factored


def _concatenations(tracer: _Tracer) -> dict[int, tuple[list[tuple[int | None, int]], str]]:
    """Each concatenation's root -> its pieces (root of a group's channels, or None for
    constants; size), nested concatenations flattened, and its location."""
    direct: dict[int, tuple[tuple[tuple[int | None, int], ...], str]] = {}
    for space, parts, where in tracer.concats:
        root = tracer.find(space)
        if root in direct:
            raise GraphError(f"concatenate: adds two concatenations of channels ({where})", True)
        direct[root] = (parts, where)

    def pieces(root: int) -> list[tuple[int | None, int]]:
        out: list[tuple[int | None, int]] = []
        for part, size in direct[root][0]:
            r = None if part is None else tracer.find(part)
            out += pieces(r) if r in direct else [(r, size)]
        return out

    flat = {root: (pieces(root), where) for root, (_, where) in direct.items()}
    for parts, where in flat.values():
        roots = [r for r, _ in parts if r is not None]
        if len(set(roots)) != len(roots):
            raise GraphError(f"concatenate: concatenates the same channels twice ({where})", True)
    return flat


def _distribute(entries: dict[int, _Entries], concats: Mapping[int, Any]) -> None:
    """Moves what reads a concatenation to the groups of its pieces, with the pieces
    before each as its segment."""
    for root, (parts, where) in concats.items():
        found = entries.pop(root, None)
        if found is None:
            continue
        if found.writers:
            raise GraphError(
                "concatenate: a concatenation of channels is combined with a layer's output "
                f"(e.g. added to it) ({where})",
                True,
            )
        if found.partitions or any(g > 1 for *_, g, _ in found.readers):
            raise GraphError(
                f"concatenate: a grouped convolution or GroupNorm reads a concatenation ({where})",
                True,
            )
        for i, (piece, _) in enumerate(parts):
            if piece is None:
                continue
            target = entries.setdefault(piece, _Entries())
            for reader in found.readers:
                target.readers.append(reader)
                target.segments[reader[1]] = tuple(parts[:i])
            for attached in found.attached:
                target.attached.append(attached)
                target.segments[attached[0]] = tuple(parts[:i])


def _roles(tracer: _Tracer, heads: set[int]) -> dict[int, str]:
    """Role of each kernel writing attention heads, from the per-head dimensions it
    writes (its other output axis, or the other factor of its split output)."""
    split = {}
    for f in tracer.factors:
        first, second = tracer.find(f.first), tracer.find(f.second)
        split[tracer.find(f.space)] = second if first in heads else first
    contracted = {tracer.find(s) for s in tracer.contracted}
    carried = {tracer.find(s) for s in tracer.carried}
    roles: dict[int, str] = {}
    for space, leaf, _, _ in tracer.writers:
        root = tracer.find(space)
        dims = split.get(root, root)
        if dims in contracted:
            roles[leaf] = "query_key"
        elif dims in carried:
            roles.setdefault(leaf, "value")
    return roles


def _group(
    paths: list[Path],
    entries: _Entries,
    size: int,
    kind: str,
    roles: Mapping[int, str],
    sizes: Mapping[int, SizeOf],
) -> Group:
    writer_leaves = {leaf for _, leaf, _, _, _ in entries.writers}
    biases: dict[int, tuple[Path, tuple[int, int]]] = {}
    modules: dict[int, dict[Path, dict[Path, Path]]] = {}  # writer leaf -> module -> leaves
    channel = set()
    for leaf, axis, source, outer, inner in entries.attached:
        p = paths[leaf]
        is_bias = source in writer_leaves and p[1:-1] == paths[source][1:-1]
        if is_bias:
            biases[source] = (p, (outer, inner))
        elif source is not None:
            modules.setdefault(source, {}).setdefault(p[1:-1], {})[p] = p
        if outer * inner == 1:
            channel.add((p, axis))
        elif not is_bias:  # a bias split into heads is merged with its writer's layout
            raise GraphError(
                f"{path_str(p)}: a per-channel variable of a channel axis split into heads is "
                "not supported"
            )
    writers = []
    for _, leaf, axis, outer, inner in sorted(entries.writers):
        bias, layout = biases.get(leaf, (None, (outer, inner)))
        if layout != (outer, inner):
            bias = None
        norms = [_batchnorm_of(m) for m in modules.get(leaf, {}).values()]
        norms = [bn for bn in norms if bn is not None]
        batchnorm = norms[0] if len(norms) == 1 and outer * inner == 1 else None
        role = roles.get(leaf, "") if kind == "heads" else ""
        writers.append(Writer(paths[leaf], axis, bias, batchnorm, outer, inner, role))
    readers = tuple(
        Reader(paths[leaf], axis, outer, inner, groups, output_axis)
        for _, leaf, axis, outer, inner, groups, output_axis in sorted(entries.readers)
    )
    segments = tuple(
        sorted(
            (paths[leaf], tuple(size if r not in sizes else sizes[r] for r, size in before))
            for leaf, before in entries.segments.items()
        )
    )
    partitions = tuple(sorted(entries.partitions, key=lambda p: (p.layer, p.count)))
    for partition in partitions:
        if size % partition.count:
            raise GraphError(f"{partition.describe()}: {size} channels are not divisible")
    return Group(
        0, size, tuple(writers), readers, tuple(sorted(channel)), kind, partitions, segments
    )


def _build_groups(tracer: _Tracer, paths: list[Path], excluded: set[int]) -> list[Group]:
    heads = {tracer.find(s) for s in tracer.heads}
    head_dims = {tracer.find(s) for s in (*tracer.contracted, *tracer.carried)} - heads
    roles = _roles(tracer, heads)
    normalized = {tracer.find(s) for s in tracer.normalized}
    entries, factored = _entries(tracer, heads)
    concats = _concatenations(tracer)
    for root, (parts, _) in concats.items():
        if root in excluded:  # a concatenation is the output: so are its pieces
            excluded |= {r for r, _ in parts if r is not None}
    _distribute(entries, concats)
    found_groups = {
        root: found
        for root, found in entries.items()
        if found.writers and root not in excluded | factored | head_dims
    }
    sizes = {}  # where each group's current channel count can be read
    for root, found in found_groups.items():
        _, leaf, axis, outer, inner = min(found.writers)
        sizes[root] = SizeOf(paths[leaf], axis, outer * inner)
    groups = []
    for root, found in found_groups.items():
        if root in heads:
            kind = "heads"
        elif root in normalized:
            kind = "residual"
        elif all(leaf not in tracer.conv_leaves for _, leaf, _, _, _ in found.writers):
            kind = "neurons"
        else:
            kind = "channels"
        group = _group(paths, found, tracer.space_size[root], kind, roles, sizes)
        last = max(order for order, *_ in found.writers)
        groups.append((last, group))
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
    tracer = _Tracer(shapes, paths)
    input_space = tracer.new_space(int(x_abstract.shape[-1]))
    env = [_Param(frozenset([i]), i) for i in range(len(leaves))]
    env.append(_Act((_Dim(len(x_abstract.shape) - 1, input_space),)))
    outs = tracer.run(closed.jaxpr, env)
    excluded = {tracer.find(input_space)}
    excluded |= {
        tracer.find(d.space) for o in jax.tree.leaves(outs) if isinstance(o, _Act) for d in o.dims
    }
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
      model: a Flax Linen or NNX module, built from convolutions (depthwise and grouped
        ones too), Dense/Linear layers, attention, BatchNorm, LayerNorm, GroupNorm,
        residual additions, concatenations, pooling, means, resizing, dropout,
        elementwise activations and flatten, auto-named or not, in ``Sequential`` or not.
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
        operation the analysis cannot handle (a depthwise convolution with a channel
        multiplier, a concatenation added to a layer's output, a kernel computed from
        several variables, ...); the message names the operation and the layer.

    Example:
      >>> groups = discover_groups(model, variables, jnp.zeros((1, 32, 32, 3)))
      >>> print(groups[0].describe())  # doctest: +SKIP
      group 0 (n=512): writes [conv7] reads [classifier]
    """
    view, example_input = view_and_input(model, args, apply_kwargs, call_kwargs)
    return view_groups(view, example_input)

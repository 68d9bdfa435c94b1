"""Split a model at a layer, and store and run the parts without generating code.

A model is traced with ``torch.fx`` and cut at one node of the traced graph (a module's
output or a functional op such as ``relu``):

* ``upstream``: input -> features at the layer, ``(B, *input_shape) -> (B, *feature_shape)``;
* ``downstream``: features -> logits, ``(B, *feature_shape) -> (B, K)``.

Each part becomes a :class:`GraphProgram`: a list of steps over a fixed allow-list
(standard ``torch.nn`` layers rebuilt from their constructor arguments, a few torch
functions and tensor methods) that ``forward`` interprets one by one. Archives store a
part as the JSON description of its steps plus its weights in safetensors, and loading
builds the same object from them: nothing in an archive is ever turned into Python source
(``torch.fx``'s code generation pastes names into the ``forward`` it writes and executes,
so an archive's strings would become code), and every name, argument name and argument
value is checked against a strict pattern or an allow-list first. ``torch.export``'s own
loader is not used either, because it falls back to ``pickle`` for some members.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import fx, nn

from handlers.errors import ArchiveError

GRAPH_FORMAT_VERSION = 1

# Leaf modules a stored graph may contain, rebuilt from their constructor arguments.
SAFE_MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.Conv1d, nn.Conv2d, nn.Linear, nn.Bilinear,
        nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU,
        nn.Softmax, nn.LogSoftmax,
        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
        nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    )
}

# Free functions a stored graph may call, by their qualified name.
SAFE_FUNCTIONS: dict[str, Callable] = {
    "operator.add": operator.add,
    "operator.sub": operator.sub,
    "operator.mul": operator.mul,
    "operator.truediv": operator.truediv,
    "operator.getitem": operator.getitem,
    "operator.neg": operator.neg,
    "torch.flatten": torch.flatten,
    "torch.cat": torch.cat,
    "torch.stack": torch.stack,
    "torch.relu": torch.relu,
    "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh,
    "torch.mean": torch.mean,
    "torch.sum": torch.sum,
    "torch.add": torch.add,
    "torch.mul": torch.mul,
    "torch.matmul": torch.matmul,
    "torch.reshape": torch.reshape,
    "torch.nn.functional.relu": F.relu,
    "torch.nn.functional.gelu": F.gelu,
    "torch.nn.functional.silu": F.silu,
    "torch.nn.functional.linear": F.linear,
    "torch.nn.functional.max_pool1d": F.max_pool1d,
    "torch.nn.functional.max_pool2d": F.max_pool2d,
    "torch.nn.functional.avg_pool1d": F.avg_pool1d,
    "torch.nn.functional.avg_pool2d": F.avg_pool2d,
    "torch.nn.functional.adaptive_avg_pool1d": F.adaptive_avg_pool1d,
    "torch.nn.functional.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "torch.nn.functional.dropout": F.dropout,
    "torch.nn.functional.softmax": F.softmax,
}
_FUNCTION_NAMES = {id(fn): name for name, fn in SAFE_FUNCTIONS.items()}

# Tensor methods a stored graph may call.
SAFE_METHODS = frozenset({
    "view", "reshape", "flatten", "relu", "mean", "sum", "size", "squeeze", "unsqueeze",
    "contiguous", "add", "mul", "permute", "transpose", "sigmoid", "tanh", "clamp", "max",
})

# Keyword names a stored call to a function or method may pass (module constructors take
# the names of their own signature).
SAFE_KEYWORDS = frozenset({
    "dim", "keepdim", "start_dim", "end_dim", "inplace", "kernel_size", "stride", "padding", "dilation",
    "ceil_mode", "return_indices", "count_include_pad", "divisor_override", "output_size", "p", "training",
    "min", "max", "approximate", "dtype", "_stacklevel", "alpha", "other", "input", "shape", "weight", "bias",
    "tensors", "negative_slope",
})

# Every name in a stored graph is checked against these before anything is built.
_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_]{1,64}")
_STRING_VALUE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")  # "tanh", "same", "zeros", …
MAX_NODES = 20_000
MAX_PATH_DEPTH = 16
MAX_ARGUMENT_DEPTH = 8
MAX_ARGUMENT_ITEMS = 4096  # items of a stored list or tuple, and of a list or tuple a step makes
# What a graph may write and compute, far above real models (torchvision's traced literals are dims,
# sizes, strides and indices up to 4096; at 224x224 a VGG-11 holds 2**22.6 elements per example at
# once, a DenseNet-121 2**21) and far below what would take a server's memory or its GIL for long.
MAX_INT = 1 << 24  # an int in the graph or a module's arguments: a size such as output_size or a repeat count
MAX_COMPUTED_INT = 1 << 63  # an int a step makes (shape arithmetic): a squaring chain stops at its second step
MAX_ELEMENTS_PER_EXAMPLE = 1 << 26  # tensor elements a step reads, and the program holds at once, per example
# The multiply-adds of one run, per example: those of the layers whose cost grows faster than what they
# read and make (convolutions, linear maps, matrix products, pools), and one per element every other step
# reads or makes. ResNet-50 at 224x224 takes 2**32, VGG-16 2**34; 2**36 is minutes of one core at worst
# (a Bilinear's kernel), where an unbounded graph takes hours.
MAX_MULTIPLY_ADDS_PER_EXAMPLE = 1 << 36
MAX_VALUES_PER_RUN = 1 << 20  # tensors, numbers and items of sequences the steps read or make, visited to check
MAX_VETTED_SHAPES = 1024  # input shapes remembered as within the bounds; past them, each call is vetted again

_CONSTRUCTOR_SKIP = {"self", "device", "dtype"}
_OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")


class UnsafeGraphError(ValueError):
    """A graph uses an operation outside the allow-list, or its description is malformed."""


class GraphLimitError(ArchiveError):
    """A stored graph, run, goes past the interpreter's bounds on what a step reads or makes: the
    archive's fault, at load (the archive is refused) or on a request's batch."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) into an ``fx.GraphModule``."""
    model.eval()
    return fx.symbolic_trace(model)


def layer_names(model: nn.Module) -> list[str]:
    """Names of the traced graph's nodes that can be chosen as the explained layer."""
    return [n.name for n in trace(model).graph.nodes if n.op in ("call_module", "call_function", "call_method")]


# --------------------------------------------------------------------------- programs

@dataclass(frozen=True)
class Ref:
    """An argument that is the value of an earlier step, by the step's name."""

    name: str


@dataclass(frozen=True)
class Step:
    """One operation: ``name = target(*args, **kwargs)`` (``op`` says how ``target`` is found).

    op     : "get_attr", "call_module", "call_function" or "call_method"
    target : an attribute or module path of the program, an allow-listed function or method name
    args, kwargs : plain values, with :class:`Ref` for the values of earlier steps
    """

    name: str
    op: str
    target: str
    args: tuple = ()
    kwargs: dict | None = None
    function: Callable | None = None  # a call_function's callable (resolved from the allow-list)


@dataclass
class Program:
    """What a :class:`GraphProgram` interprets.

    input_name  : the name its input is known by
    steps       : the operations in order
    output      : the returned value, with :class:`Ref` to steps
    description : what an archive stores; None for programs derived in process (taps)
    """

    input_name: str
    steps: list[Step]
    output: Any
    description: dict | None = None


# operator's arithmetic takes tensors and numbers, as in traced models (tensor math, shape arithmetic):
# on a list or string, `[0] * n` would build n items before any bound could count them.
_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.neg})
_NUMBERS = (torch.Tensor, int, float)

# Layers whose output has their input's shape and dtype, whatever their arguments: vetted without running.
_SHAPE_PRESERVING_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Softmax, nn.LogSoftmax,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
)

_RESERVED_NAMES = frozenset({"program", "with_taps", "_plan", "_release", "_vetted"})


class GraphProgram(nn.Module):
    """A part of a model as a list of steps that ``forward`` interprets; no code is generated.

    Submodules, parameters and buffers are registered under the same names as in the traced
    model, so ``state_dict`` (and :func:`weights_sha256`) are the same as the traced part's.
    The program itself lives in the attribute ``program`` (so no submodule may be named
    ``program`` or one of the private names in ``_RESERVED_NAMES``). Intermediate values are
    released after their last use, as generated code would.
    Before the first call with an input of a given shape (and grad mode), the program runs once on
    meta tensors of that shape, which allocate nothing, and each step is checked against the bounds
    before and after it (:data:`MAX_ELEMENTS_PER_EXAMPLE`, :data:`MAX_MULTIPLY_ADDS_PER_EXAMPLE` and
    the others above). So a crafted graph is refused with :class:`GraphLimitError` naming its step
    before any of its memory or time is taken, even by a step that makes far more than it reads (a
    broadcast outer product, a convolution's padding), and a graph whose shapes depend on its values
    is refused. Calls with a vetted shape run unchecked; so does ``torch.jit``'s tracer (ONNX
    export), which needs the shape vetted before.
    """

    def __init__(self, root: nn.Module, program: Program):
        super().__init__()
        reserved = sorted(set(root._modules) & _RESERVED_NAMES)
        if reserved:
            raise UnsafeGraphError(f"a module may not be named {reserved[0]!r}: GraphProgram uses that name")
        for name, child in root.named_children():
            self.add_module(name, child)
        for name, tensor in root.named_parameters(recurse=False):
            self.register_parameter(name, tensor)
        for name, tensor in root.named_buffers(recurse=False):
            self.register_buffer(name, tensor)
        self.program = program
        # Modules are moved in place by ``.to()``, so holding them is safe; a tensor attribute
        # is read at each call.
        self._plan = []
        for step in program.steps:
            if step.op == "get_attr":
                owner, _, leaf = step.target.rpartition(".")
                self._plan.append(("attr", self.get_submodule(owner) if owner else self, leaf))
            elif step.op == "call_method":
                self._plan.append(("method", step.target, None))
            else:
                target = self.get_submodule(step.target) if step.op == "call_module" else step.function
                self._plan.append(("arithmetic" if target in _ARITHMETIC else "call", target, None))
        self._vetted: set = set()  # (shape, dtype, grad mode) of inputs whose run on meta tensors passed the bounds
        last_use: dict[str, int] = {}
        for i, step in enumerate(program.steps):
            for ref in _refs((step.args, step.kwargs)):
                last_use[ref] = i
        kept = set(_refs(program.output))
        self._release = [tuple(n for n, j in last_use.items() if j == i and n not in kept)
                         for i in range(len(program.steps))]

    def forward(self, x):
        key = (x.shape, x.dtype, torch.is_grad_enabled())
        if key not in self._vetted:
            if torch.jit.is_tracing():
                # The tracer (ONNX export) makes sizes traced values, on which meta kernels fail.
                key = (torch.Size(int(d) for d in x.shape), x.dtype, key[2])
                if key not in self._vetted:
                    raise RuntimeError(f"run a GraphProgram on inputs of shape {tuple(key[0])} before tracing it")
            else:
                self._vet(*key)
                if len(self._vetted) < MAX_VETTED_SHAPES:
                    self._vetted.add(key)
        return self._run(x)

    def _run(self, x, bounds: _ShapeBounds | None = None):
        """Interpret the steps on ``x``; with ``bounds``, each step is checked against them."""
        env = {self.program.input_name: x}
        for step, (kind, target, leaf), release in zip(self.program.steps, self._plan, self._release):
            if kind == "attr":
                env[step.name] = getattr(target, leaf)
                continue
            args = _fill(step.args, env)
            kwargs = _fill(step.kwargs, env) if step.kwargs else {}
            env[step.name] = (_call(kind, target, args, kwargs) if bounds is None
                              else bounds.call(step, kind, target, args, kwargs, release))
            for name in release:
                del env[name]
        return _fill(self.program.output, env)

    def _vet(self, shape: torch.Size, dtype: torch.dtype, grad: bool) -> None:
        """Run the program on a meta tensor of ``shape`` and ``dtype`` (shapes only: nothing is
        allocated), checking each step against the bounds before and after it; ``grad``: the real
        run records for autograd, which keeps every value until the backward pass.

        Raises
        ------
        GraphLimitError
            At the first step past a bound, or whose output's shape depends on values (a boolean
            mask's selection, a size read from a tensor).
        """
        twin = self.__dict__.get("_meta_twin")
        if twin is None:
            # The same modules with every weight on the meta device; the weights themselves are not copied.
            memo = {id(t): nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
                    for t in self.parameters()}
            memo.update({id(t): torch.empty_like(t, device="meta") for t in self.buffers()})
            memo[id(self.program)] = self.program  # read only; shared rather than copied
            twin = copy.deepcopy(self, memo)
            self.__dict__["_meta_twin"] = twin  # not a submodule: .to(), state_dict() and hashes skip it
        x = torch.empty(shape, dtype=dtype, device="meta")
        with torch.no_grad():
            twin._run(x, _ShapeBounds(self.program.input_name, x, keep_all=grad))

    def with_taps(self, layers: list[str], transform: Callable[[torch.Tensor], torch.Tensor]
                  | Sequence[Callable[[torch.Tensor], torch.Tensor]], keep_output: bool = True) -> "GraphProgram":
        """This program also returning ``transform`` of the values of ``layers`` (one transform for
        every layer, or a sequence of them, one per layer).

        Returns a program ``input -> (output, *taps)`` sharing this one's modules; each tap is
        transformed right where its layer is computed, so an in-place operation further on
        cannot alter it. Without ``keep_output``, the program ends after the deepest tap and
        returns the taps alone.

        Raises
        ------
        ValueError
            If a name is not a step of this program.
        """
        names = [step.name for step in self.program.steps]
        missing = [name for name in layers if name not in names]
        if missing:
            raise ValueError(f"layers {missing} are not nodes of the graph; choose among {sorted(names)}")
        steps, taps = [], []
        for step in self.program.steps:
            steps.append(step)
            for j, name in enumerate(layers):
                if step.name == name:
                    tap = f"{name}__tap{j}"
                    function = transform if callable(transform) else transform[j]
                    steps.append(Step(tap, "call_function", "transform", (Ref(name),), None, function))
                    taps.append(Ref(tap))
        if keep_output:
            output = (self.program.output, *taps)
        else:
            tap_names = {t.name for t in taps}
            deepest = max((i for i, step in enumerate(steps) if step.name in tap_names), default=-1)
            steps, output = steps[:deepest + 1], tuple(taps)
        return GraphProgram(self, Program(self.program.input_name, steps, output)).eval()


def _call(kind: str, target, args, kwargs):
    """A step's call: a tensor method on its first argument, or a module or function."""
    return getattr(args[0], target)(*args[1:], **kwargs) if kind == "method" else target(*args, **kwargs)


class _ShapeBounds:
    """What a run on meta tensors is held to, step by step: tensor elements read, and held at once
    (with each step's scratch), and the run's multiply-adds, per example of the batch; the values a
    step reads or makes, the ints and sequences it makes; what `operator`'s arithmetic takes.

    ``keep_all``: the run records for autograd (grad mode on), which keeps every step's value alive
    until the backward pass, so nothing is counted as released.
    """

    def __init__(self, input_name: str, x: torch.Tensor, keep_all: bool):
        examples = max(1, len(x) if x.dim() else 1)
        self.budget = MAX_ELEMENTS_PER_EXAMPLE * examples
        self.work_budget = MAX_MULTIPLY_ADDS_PER_EXAMPLE * examples
        self.work = 0
        self.visited = 0
        self.keep_all = keep_all
        # Held memory is counted by storage, in elements: a view holds all of its base, and a value
        # that shares its input's storage (a view, an in-place op) holds nothing more.
        self.held = 0
        # storage -> [it, its elements, the values in the run that hold it]; the storage is kept alive
        # while counted (meta storages take no memory) so that its identity is not reused by a new one.
        self.storages: dict[int, list] = {}
        self.storages_of: dict[str, list[int]] = {}  # value -> the storages it holds
        self._hold(input_name, [x])

    def call(self, step: Step, kind: str, target, args, kwargs, released: tuple[str, ...]):
        """The step's value, once checked; ``released``: the values the run drops after it."""
        # Checked before the call: a torch.cat of 4096 references makes 4096 times what it reads.
        read = sum(t.numel() for t in self._tensors(step.name, (args, kwargs)))
        if read > self.budget:
            raise GraphLimitError(f"node {step.name} reads more than {MAX_ELEMENTS_PER_EXAMPLE} tensor "
                                  "elements per example")
        if kind == "arithmetic" and not all(isinstance(a, _NUMBERS) for a in args):
            raise GraphLimitError(f"node {step.name}: {step.target} takes tensors and numbers only")
        try:
            if (isinstance(target, _SHAPE_PRESERVING_MODULES) and len(args) == 1 and not kwargs
                    and type(args[0]) is torch.Tensor and args[0].is_floating_point()):
                value = torch.empty_like(args[0])  # the same shape; meta kernels take ~1 ms for a BatchNorm
            else:
                value = _call(kind, target, args, kwargs)
        except (NotImplementedError, RuntimeError) as exc:
            # Meta kernels check shapes as the real ones do, so any other failure (a shape
            # mismatch) is raised as the real run would raise it.
            if isinstance(exc, NotImplementedError) or "meta tensor" in str(exc):
                raise GraphLimitError(f"node {step.name}: its output's shape depends on the values of "
                                      "its input, which the interpreter cannot bound") from exc
            raise
        made = self._tensors(step.name, value, made=True)
        out = sum(t.numel() for t in made)
        multiply_adds, scratch = _cost(target, args, kwargs, value, out)
        self._hold(step.name, made)
        if self.held + scratch > self.budget:
            raise GraphLimitError(f"node {step.name}: the program would hold more than "
                                  f"{MAX_ELEMENTS_PER_EXAMPLE} tensor elements per example at once")
        self.work += multiply_adds + read + out  # a step without a reduction: one per element it touches
        if self.work > self.work_budget:
            raise GraphLimitError(f"node {step.name}: the program would take more than "
                                  f"{MAX_MULTIPLY_ADDS_PER_EXAMPLE} multiply-adds per example")
        if not self.keep_all:
            for name in released:
                self._drop(name)
        return value

    def _tensors(self, name: str, value, made: bool = False) -> list[torch.Tensor]:
        """The tensors in ``value``, each time it appears; the run visits at most
        :data:`MAX_VALUES_PER_RUN` values (sequences that share sequences would otherwise take
        exponential time to walk). ``made``: ``value`` is what step ``name`` made, whose ints and
        sequences are checked against the bounds."""
        tensors, stack = [], [value]
        while stack:
            item = stack.pop()
            self.visited += 1
            if self.visited > MAX_VALUES_PER_RUN:
                raise GraphLimitError(f"node {name}: the program would read or make more than "
                                      f"{MAX_VALUES_PER_RUN} values")
            if isinstance(item, torch.Tensor):
                tensors.append(item)
            elif isinstance(item, (tuple, list)):
                if made and len(item) > MAX_ARGUMENT_ITEMS:
                    raise GraphLimitError(f"node {name} makes a sequence of {len(item)} items, "
                                          f"more than {MAX_ARGUMENT_ITEMS}")
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif made and type(item) is int and not -MAX_COMPUTED_INT < item < MAX_COMPUTED_INT:
                raise GraphLimitError(f"node {name} makes an integer beyond ±{MAX_COMPUTED_INT}")
        return tensors

    def _hold(self, name: str, tensors: list[torch.Tensor]) -> None:
        self.storages_of[name] = []
        for t in tensors:
            storage = t.untyped_storage()
            key = storage._cdata  # the storage's identity: the Python object is made anew on each call
            if key not in self.storages:
                self.storages[key] = [storage, storage.nbytes() // t.element_size(), 0]
                self.held += self.storages[key][1]
            self.storages[key][2] += 1
            self.storages_of[name].append(key)

    def _drop(self, name: str) -> None:
        for key in self.storages_of.pop(name, ()):
            self.storages[key][2] -= 1
            if not self.storages[key][2]:
                self.held -= self.storages.pop(key)[1]


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)
_POOLS = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.MaxPool2d: 2, nn.AvgPool2d: 2}
_POOL_FUNCTIONS = {F.max_pool1d: 1, F.avg_pool1d: 1, F.max_pool2d: 2, F.avg_pool2d: 2}
_ADAPTIVE_POOLS_2D = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, *_ADAPTIVE_POOLS_2D)
_ADAPTIVE_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)


def _cost(target, args, kwargs, value, out: int) -> tuple[int, int]:
    """``(multiply_adds, scratch)`` of a call whose cost grows faster than its inputs and its ``out``
    output elements (``(0, 0)`` for the others, which the element bounds cover), from the shapes
    alone: multiply_adds, each output element's reduction; scratch, the tensor elements the kernel
    allocates beside its output (a convolution's unfolded input and padded copy, a batched product's
    broadcast operands, advanced indexing's int64 indices)."""
    if isinstance(target, _CONVOLUTIONS):
        reduction = target.in_channels // target.groups * math.prod(target.kernel_size)
        scratch = out // target.out_channels * reduction
        if target.padding_mode != "zeros":  # F.pad makes a padded copy of the input first (twice, measured)
            x, dims = args[0], len(target.kernel_size)
            pads = ([d * (k - 1) for d, k in zip(target.dilation, target.kernel_size)] if target.padding == "same"
                    else [0] * dims if target.padding == "valid" else [2 * p for p in target.padding])
            grid = x.shape[-dims:]
            scratch += 2 * x.numel() // math.prod(grid) * math.prod(n + p for n, p in zip(grid, pads))
        return out * reduction, scratch
    if isinstance(target, nn.Linear):
        return out * target.in_features, 0
    if isinstance(target, nn.Bilinear):
        return out * target.in1_features * target.in2_features, 0
    if target is F.linear:
        return out * (kwargs["weight"] if "weight" in kwargs else args[1]).shape[-1], 0
    if target is torch.matmul:
        a = kwargs["input"] if "input" in kwargs else args[0]
        b = kwargs["other"] if "other" in kwargs else args[1]
        scratch = 0
        if a.dim() > 2 or b.dim() > 2:
            batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
            scratch = batch * (math.prod(a.shape[-2:]) + math.prod(b.shape[-2:]))
        return out * a.shape[-1], scratch
    if type(target) in _POOLS:
        return out * _kernel_area(target.kernel_size, _POOLS[type(target)]), 0
    if target in _POOL_FUNCTIONS:
        kernel_size = kwargs["kernel_size"] if "kernel_size" in kwargs else args[1]
        return out * _kernel_area(kernel_size, _POOL_FUNCTIONS[target]), 0
    if isinstance(target, _ADAPTIVE_POOLS) or target in _ADAPTIVE_POOL_FUNCTIONS:
        # Each output element reduces a window of at most ceil(in / out) + 1 inputs along each pooled dim.
        x, pooled = args[0], (value[0] if isinstance(value, tuple) else value)  # (pooled, indices) with return_indices
        dims = 2 if isinstance(target, _ADAPTIVE_POOLS_2D) or target is F.adaptive_avg_pool2d else 1
        window = math.prod(-(-n // max(1, m)) + 1 for n, m in zip(x.shape[-dims:], pooled.shape[-dims:]))
        return out * window, 0
    if target is operator.getitem and isinstance(args[1], (tuple, torch.Tensor)):
        # Tensor indices are broadcast together and each converted to int64 at the output's size.
        indices = sum(isinstance(i, torch.Tensor) for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        return 0, 2 * indices * out
    return 0, 0


def _kernel_area(kernel_size, dims: int) -> int:
    """A pool's window in elements; one size, alone or in a 1-item sequence, is every dim's."""
    sizes = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size,)
    return math.prod(sizes * dims if len(sizes) == 1 else sizes)


def _fill(value, env: dict):
    """``value`` with every :class:`Ref` replaced by its step's value."""
    kind = type(value)
    if kind is Ref:
        return env[value.name]
    if kind is tuple or kind is list:
        return kind(_fill(v, env) for v in value)
    if kind is dict:
        return {k: _fill(v, env) for k, v in value.items()}
    if kind is slice:
        return slice(_fill(value.start, env), _fill(value.stop, env), _fill(value.step, env))
    return value


def _refs(value):
    """The step names that ``value`` refers to."""
    kind = type(value)
    if kind is Ref:
        yield value.name
    elif kind is tuple or kind is list:
        for v in value:
            yield from _refs(v)
    elif kind is dict:
        for v in value.values():
            yield from _refs(v)
    elif kind is slice:
        yield from _refs((value.start, value.stop, value.step))


_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6)
_NON_NEGATIVE_FUNCTIONS = {torch.relu, F.relu}


def non_negative_layers(program: GraphProgram) -> list[str]:
    """Names of the program's ReLU steps (whose outputs are never negative), in order."""
    names = []
    for step in program.program.steps:
        if ((step.op == "call_module" and isinstance(program.get_submodule(step.target), _NON_NEGATIVE_MODULES))
                or (step.op == "call_function" and step.function in _NON_NEGATIVE_FUNCTIONS)
                or (step.op == "call_method" and step.target == "relu")):
            names.append(step.name)
    return names


def split(model: nn.Module, layer: str) -> tuple[GraphProgram, GraphProgram]:
    """Cut ``model`` at the node named ``layer``.

    Returns
    -------
    upstream : GraphProgram
        ``(B, *input_shape) -> (B, *feature_shape)``.
    downstream : GraphProgram
        ``(B, *feature_shape) -> (B, K)``.

    Both are built from their stored description, as an archive's parts are, so a model
    that packages is a model that loads.

    Raises
    ------
    ValueError
        If no node has that name, or the downstream reads any value computed before the
        layer other than the layer itself (a skip connection around it), so the layer
        does not separate the graph.
    UnsafeGraphError
        If a part uses an operation that archives do not allow.
    """
    gm = trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    if layer not in nodes or nodes[layer].op in ("placeholder", "output", "get_attr"):
        raise ValueError(f"layer {layer!r} is not an operation of the traced graph; choose one of {layer_names(model)}")
    cut = nodes[layer]
    if len([n for n in gm.graph.nodes if n.op == "placeholder"]) != 1:
        raise ValueError("only models with a single tensor input can be split")

    upstream_nodes = _ancestors(cut)
    upstream_graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in upstream_nodes:
            copied[node] = upstream_graph.node_copy(node, lambda n: copied[n])
    upstream_graph.output(copied[cut])

    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    needed = _ancestors(output_node) - upstream_nodes
    downstream_graph = fx.Graph()
    features = downstream_graph.placeholder("features")
    mapped: dict[fx.Node, fx.Node] = {cut: features}
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        for arg in node.all_input_nodes:
            if arg not in mapped and arg.op != "get_attr":
                raise ValueError(
                    f"layer {layer!r} does not separate the graph: {node.name!r} also reads {arg.name!r}, "
                    "computed before the layer (a skip connection around it); choose a later layer"
                )
        if node.op == "output":
            downstream_graph.output(mapped[node.args[0]] if isinstance(node.args[0], fx.Node) else
                                    fx.map_arg(node.args[0], lambda n: mapped[n]))
        else:
            mapped[node] = downstream_graph.node_copy(node, lambda n: mapped[n] if n in mapped else _copy_attr(n, downstream_graph, mapped))

    parts = []
    for graph in (upstream_graph, downstream_graph):
        part = fx.GraphModule(gm, graph)
        part.delete_all_unused_submodules()
        description, tensors = _describe(part)
        parts.append(_build(description, tensors))
    return parts[0], parts[1]


def _copy_attr(node: fx.Node, graph: fx.Graph, mapped: dict[fx.Node, fx.Node]) -> fx.Node:
    mapped[node] = graph.node_copy(node)
    return mapped[node]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


# --------------------------------------------------------------------------- storage

def weights_sha256(*parts: nn.Module) -> str:
    """A hash of the parts' parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for i, part in enumerate(parts):
        for name, tensor in sorted(part.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{i}/{name}/{t.dtype}/{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dump_graph_module(program: GraphProgram) -> tuple[bytes, bytes]:
    """Describe a part as (graph JSON, safetensors weights)."""
    description = program.program.description
    if description is None:
        raise UnsafeGraphError("this program was derived in process (e.g. with taps) and cannot be stored")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in program.state_dict().items()}
    return json.dumps(description, sort_keys=True).encode(), save_safetensors(tensors)


def load_graph_module(graph_json: bytes, weights: bytes) -> GraphProgram:
    """Rebuild a part from :func:`dump_graph_module`'s output, executing nothing from it.

    Every name is checked against a strict pattern; every module type, function, method and
    keyword name against the allow-lists; arguments must be JSON scalars (strings short
    identifiers such as ``"tanh"``), lists, or tagged tuples, slices and dtypes; the weights
    must match the rebuilt modules' names and shapes exactly.
    """
    try:
        description = json.loads(graph_json)
        tensors = load_safetensors(weights)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UnsafeGraphError(f"malformed graph description or weights: {exc}") from exc
    return _build(description, tensors)


def _describe(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """A traced part as (description, weights); raise UnsafeGraphError for anything a loader
    would refuse."""
    modules: dict[str, dict] = {}
    nodes: list[dict] = []
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op, "args": _encode(node.args), "kwargs": _encode(node.kwargs)}
        if node.op == "call_module":
            modules[node.target] = _describe_module(gm.get_submodule(node.target), node.target)
            entry["target"] = node.target
        elif node.op == "call_function":
            name = _FUNCTION_NAMES.get(id(node.target))
            if name is None:
                raise UnsafeGraphError(f"node {node.name!r} calls {node.target!r}, which archives do not allow")
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in SAFE_METHODS:
                raise UnsafeGraphError(f"node {node.name!r} calls method {node.target!r}, which archives do not allow")
            entry["target"] = node.target
        else:  # placeholder, get_attr, output
            entry["target"] = str(node.target)
        nodes.append(entry)
    tensors = {k: v.detach() for k, v in gm.state_dict().items()}
    return {"format_version": GRAPH_FORMAT_VERSION, "modules": modules, "nodes": nodes}, tensors


def _describe_module(module: nn.Module, qualname: str) -> dict:
    cls_name = type(module).__name__
    if SAFE_MODULES.get(cls_name) is not type(module):
        raise UnsafeGraphError(f"module {qualname!r} of type {type(module).__qualname__} is not allowed in archives")
    kwargs = {}
    for param in inspect.signature(type(module).__init__).parameters.values():
        if param.name in _CONSTRUCTOR_SKIP or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name == "bias":
            value = getattr(module, "bias", None) is not None
        elif hasattr(module, param.name):
            value = getattr(module, param.name)
        else:
            continue
        kwargs[param.name] = list(value) if isinstance(value, tuple) else value
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        kwargs["elementwise_affine" if isinstance(module, nn.LayerNorm) else "affine"] = module.weight is not None
    return {"type": cls_name, "kwargs": kwargs}


def _build(description, tensors: dict[str, torch.Tensor]) -> GraphProgram:
    """The one way a program is made from a description: everything checked, nothing generated."""
    try:
        if not isinstance(description, dict) or description.get("format_version") != GRAPH_FORMAT_VERSION:
            raise UnsafeGraphError(f"not a graph description of format version {GRAPH_FORMAT_VERSION}")
        modules, nodes = description.get("modules"), description.get("nodes")
        if not isinstance(modules, dict) or not isinstance(nodes, list):
            raise UnsafeGraphError("a graph description needs `modules` (an object) and `nodes` (a list)")
        if len(modules) > MAX_NODES or len(nodes) > MAX_NODES:
            raise UnsafeGraphError(f"more than {MAX_NODES} modules or nodes")
        root = nn.Module()
        # Modules are made without memory; the stored weights are assigned to them below.
        with torch.device("meta"):
            for qualname, desc in modules.items():
                _set_submodule(root, _checked_path(qualname, "module path"), _make_module(qualname, desc))
        attributes = [n.get("target") for n in nodes if isinstance(n, dict) and n.get("op") == "get_attr"]
        for path in attributes:
            path = _checked_path(path, "attribute path")
            if path not in tensors:
                raise UnsafeGraphError(f"the weights lack the attribute {_show(path)}")
            owner, _, leaf = path.rpartition(".")
            parent = _get_or_make(root, owner)
            if leaf not in parent._buffers and leaf not in parent._parameters:
                parent.register_buffer(leaf, torch.empty(0, device="meta"))
        missing, unexpected = root.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise UnsafeGraphError(f"the weights do not match the graph: missing {_show(missing)}, "
                                   f"unexpected {_show(unexpected)}")
        input_name, steps, output = _steps(nodes, set(modules))
        return GraphProgram(root, Program(input_name, steps, output, description)).eval()
    except UnsafeGraphError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, ArithmeticError) as exc:
        raise UnsafeGraphError(f"malformed graph description: {_show(str(exc))}") from exc


def _make_module(qualname: str, desc) -> nn.Module:
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str) or not isinstance(desc.get("kwargs"), dict):
        raise UnsafeGraphError(f"module {_show(qualname)}: needs a `type` and `kwargs`")
    cls = SAFE_MODULES.get(desc["type"])
    if cls is None:
        raise UnsafeGraphError(f"module type {_show(desc['type'])} is not allowed in archives")
    accepted = set(inspect.signature(cls.__init__).parameters) - _CONSTRUCTOR_SKIP
    for key, value in desc["kwargs"].items():
        if key not in accepted:
            raise UnsafeGraphError(f"module {_show(qualname)}: {cls.__name__} takes no argument {_show(key)}")
        _check_value(value, f"module {_show(qualname)} argument {key}", 0)
    return cls(**desc["kwargs"])


def _steps(nodes: list, module_paths: set[str]) -> tuple[str, list[Step], Any]:
    """The nodes as checked steps: (input name, steps, output)."""
    seen: set[str] = set()
    input_name, steps, output = None, [], None
    for i, entry in enumerate(nodes):
        if not isinstance(entry, dict) or set(entry) != {"name", "op", "target", "args", "kwargs"}:
            raise UnsafeGraphError(f"node {i}: needs exactly name, op, target, args and kwargs")
        name, op, target = entry["name"], entry["op"], entry["target"]
        if not isinstance(name, str) or not _NODE_NAME.fullmatch(name) or name in seen:
            raise UnsafeGraphError(f"node {i}: name {_show(name)} is not an identifier, or is used twice")
        if op not in _OPS or not isinstance(target, str):
            raise UnsafeGraphError(f"node {name}: unknown op {_show(op)}")
        if output is not None:
            raise UnsafeGraphError(f"node {name} follows the output")
        try:
            args, kwargs = _decode(entry["args"], seen, 0), _decode(entry["kwargs"], seen, 0)
        except UnsafeGraphError as exc:
            raise UnsafeGraphError(f"node {name}: {exc}") from exc
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise UnsafeGraphError(f"node {name}: args must be a list and kwargs a dict")
        if op == "placeholder":
            if input_name is not None or steps or not _NODE_NAME.fullmatch(target):
                raise UnsafeGraphError(f"node {name}: one input, first, named by an identifier")
            input_name = name
        elif op == "output":
            if len(args) != 1 or kwargs:
                raise UnsafeGraphError("the output node takes one argument")
            output = args[0]
        else:
            for key in kwargs:
                if op != "call_module" and key not in SAFE_KEYWORDS:
                    raise UnsafeGraphError(f"node {name}: keyword {_show(key)} is not allowed")
            function = None
            if op == "call_module" and target not in module_paths:
                raise UnsafeGraphError(f"node {name} calls an undeclared module {_show(target)}")
            if op == "call_module" and kwargs:
                raise UnsafeGraphError(f"node {name}: module calls take no keywords")
            if op == "call_function":
                function = SAFE_FUNCTIONS.get(target)
                if function is None:
                    raise UnsafeGraphError(f"function {_show(target)} is not allowed in archives")
            if op == "call_method" and (target not in SAFE_METHODS or not args):
                raise UnsafeGraphError(f"method {_show(target)} is not allowed in archives")
            if op == "get_attr":
                _checked_path(target, "attribute path")
            steps.append(Step(name, op, target, tuple(args), kwargs or None, function))
        seen.add(name)
    if input_name is None or output is None:
        raise UnsafeGraphError("a graph needs one input and one output node")
    return input_name, steps, output


def _checked_path(path, what: str) -> str:
    """A dotted path of module or attribute names, each plain (letters, digits, ``_``)."""
    segments = path.split(".") if isinstance(path, str) else []
    if not segments or len(segments) > MAX_PATH_DEPTH or not all(_PATH_SEGMENT.fullmatch(s) for s in segments):
        raise UnsafeGraphError(f"{what} {_show(path)} is not a dotted path of plain names")
    return path


def _check_value(value, where: str, depth: int) -> None:
    """A constructor argument: None, a bool or number (ints within ±MAX_INT), a short identifier
    string, or a list of them."""
    if isinstance(value, list):
        if depth >= MAX_ARGUMENT_DEPTH or len(value) > MAX_ARGUMENT_ITEMS:
            raise UnsafeGraphError(f"{where}: nested too deep or too long")
        for v in value:
            _check_value(v, where, depth + 1)
    elif isinstance(value, str):
        if not _STRING_VALUE.fullmatch(value):
            raise UnsafeGraphError(f"{where}: string {_show(value)} is not a short identifier")
    elif not (value is None or isinstance(value, (bool, int, float))):
        raise UnsafeGraphError(f"{where}: {_show(value)} is not a JSON scalar")
    elif type(value) is int and abs(value) > MAX_INT:
        raise UnsafeGraphError(f"{where}: the integer {_show(value)} is beyond ±{MAX_INT}")


def _set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    owner, _, leaf = qualname.rpartition(".")
    parent = _get_or_make(root, owner)
    if leaf in parent._modules:
        raise UnsafeGraphError(f"module path {_show(qualname)} is declared twice")
    parent.add_module(leaf, module)


def _get_or_make(root: nn.Module, path: str) -> nn.Module:
    """The container module at ``path``, made (empty) where missing."""
    parent = root
    for part in path.split(".") if path else ():
        if part not in parent._modules:
            parent.add_module(part, nn.Module())
        parent = parent._modules[part]
    return parent


def _show(value, limit: int = 80) -> str:
    """A value from an archive, quoted and cut short, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _encode(value):
    """fx node arguments as JSON: nodes by name, tuples, slices, dtypes, Ellipsis tagged."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsafeGraphError(f"cannot store the argument {value!r} of type {type(value).__name__}")


_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")}
_TAGS = ("node", "tuple", "dict", "slice", "ellipsis", "dtype")


def _decode(value, defined: set[str], depth: int):
    """Stored arguments -> values, with :class:`Ref` to earlier steps; everything checked."""
    if depth > MAX_ARGUMENT_DEPTH:
        raise UnsafeGraphError("arguments nested too deep")
    if isinstance(value, list):
        if len(value) > MAX_ARGUMENT_ITEMS:
            raise UnsafeGraphError("an argument list is too long")
        return [_decode(v, defined, depth + 1) for v in value]
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in _TAGS:
            raise UnsafeGraphError(f"unknown argument encoding {_show(sorted(value))}")
        tag, inner = next(iter(value.items()))
        if tag == "node":
            if inner not in defined:
                raise UnsafeGraphError(f"an argument refers to an unknown or later node {_show(inner)}")
            return Ref(inner)
        if tag == "dict":
            if not isinstance(inner, dict) or len(inner) > MAX_ARGUMENT_ITEMS:
                raise UnsafeGraphError("a dict argument must be an object")
            for key in inner:
                if not _NODE_NAME.fullmatch(key):
                    raise UnsafeGraphError(f"keyword {_show(key)} is not an identifier")
            return {k: _decode(v, defined, depth + 1) for k, v in inner.items()}
        if tag in ("tuple", "slice"):
            if not isinstance(inner, list) or (tag == "slice" and len(inner) != 3):
                raise UnsafeGraphError(f"a {tag} argument must be a list")
            if len(inner) > MAX_ARGUMENT_ITEMS:
                raise UnsafeGraphError("a tuple argument is too long")
            items = [_decode(v, defined, depth + 1) for v in inner]
            return tuple(items) if tag == "tuple" else slice(*items)
        if tag == "ellipsis":
            return Ellipsis
        if inner not in _DTYPES:
            raise UnsafeGraphError(f"dtype {_show(inner)} is not allowed")
        return _DTYPES[inner]
    if isinstance(value, str):
        if not _STRING_VALUE.fullmatch(value):
            raise UnsafeGraphError(f"string argument {_show(value)} is not a short identifier")
        return value
    if type(value) is int and abs(value) > MAX_INT:
        raise UnsafeGraphError(f"the integer argument {_show(value)} is beyond ±{MAX_INT}")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise UnsafeGraphError(f"unknown argument {_show(value)}")

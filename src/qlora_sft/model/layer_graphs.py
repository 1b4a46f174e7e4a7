"""CUDA graphs of the checkpointed decoder layers (`QLORA_SFT_LAYER_GRAPHS`).

With activation offloading (`offload.OffloadedCheckpoint`) each decoder layer runs three times per
micro batch: a forward without gradients, then in the backward its recompute and its backward. At a
small micro batch on a fast GPU the host, not the GPU, sets the pace: it spends longer queueing a
layer's kernels (Python, autograd, op dispatch; some 220 per layer and micro batch) than the GPU
spends running them (8B at 2 x 2048 tokens on an H200: ~0.45 s of host work per micro batch against
~0.36 s of GPU work, docs/benchmarks.md). Here each layer's forward without gradients, and its
recompute and backward together, are captured once into CUDA graphs and replayed afterwards: one
launch in place of the layer's kernels.

What a replay needs, and how it is kept true:
  * the same shapes: a graph per layer and per signature of its inputs (shapes and dtypes as
    copied in, the non-tensor arguments, autocast). A packed row is padded to a multiple of
    `ROW_GRANULE` tokens, the padding an example of its own; its example boundaries (`cu_seq_lens_*`,
    one more entry than it has examples, which vary) to a bucket of at least `MIN_BOUNDS` entries of
    empty examples, which the varlen kernel skips; its longest example to the recipe's
    `data.max_length` (or a power of two), an upper bound the kernel accepts;
  * the same addresses: inputs are copied into static buffers (the layer input, output and their
    gradients as views of one arena for all signatures), outputs and gradients copied out; weights
    are read where they are, so the optimizer's in-place updates of the adapters reach every replay.
    Only launches whose weights stay put use it: one GPU, and DDP for the forward
    (`offload_checkpointed_inputs`), never FSDP or ZeRO-3, which gather weights into new memory
    each time. The backward's graph returns the adapters' gradients, which are added to `.grad`
    after the replay as autograd would; DDP's reducer hooks on that accumulation, so under DDP the
    backward runs eagerly;
  * nothing on the host inside: a layer with forward hooks, dropout in training, a positional
    argument, or a non-tensor argument that is not a plain value runs eagerly; pre-forward hooks
    marked replay-safe (the host head's prefetch, `replay_safe`) run eagerly before each replay of
    an older transformers' checkpointed `__call__`; a capture that fails (an operation a graph
    cannot hold) is logged once and that layer and signature run eagerly from then on.

Each graph's layer and signature run eagerly the first time they are seen (lazy set-up: compiled
kernels, one-time checks) and are captured the second time. All graphs share one memory pool and
keep nothing in it between replays (their inputs and outputs are outside it), so the pool holds the
largest single graph's intermediates.

Measured (8B on one H200, docs/benchmarks.md, 2026-12-03 late): the same losses as eager; 97% of
the layers' calls replayed; 1.02x at 2 x 2048, 0.97-0.99x at 4 x 2048; the reserved peak 0.6-1.8
GiB higher (the pool beside the allocator's own cache). So it is a benchmark switch, off."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# QLORA_SFT_LAYER_GRAPHS (a benchmark switch): `on` replays the checkpointed decoder layers from CUDA
# graphs (the forward without gradients, and the recompute with the backward where the launch
# allows), `forward` only the forward, `off` (or unset) none
LAYER_GRAPHS_ENV = "QLORA_SFT_LAYER_GRAPHS"
LAYER_GRAPHS = ("off", "forward", "on")
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
LENGTH_KEYS = ("max_length_q", "max_length_k")
MIN_BOUNDS = 16  # padded boundary tensors hold at least this many entries (14 examples and the padding)
ROW_GRANULE = 128  # a packed row is padded to a multiple of this many tokens (fewer shapes, fewer captures)
# input signatures given graphs at most (each holds 2 x 32 graphs and its own copies of the keyword
# arguments): packed micro batches have a few padded lengths and boundary buckets; more run eagerly
MAX_SIGNATURES = 6
_PLAIN = (type(None), bool, int, float, str)


def layer_graphs(env: Any = None) -> str:
    """QLORA_SFT_LAYER_GRAPHS, checked: `off` (unset), `forward` or `on`."""
    from ..launch import env_choice

    return env_choice(LAYER_GRAPHS_ENV, LAYER_GRAPHS, env)


def replay_safe(hook: Any) -> Any:
    """Mark a forward pre-hook of a decoder layer as one that may run before a replay of the layer's
    graph instead of inside the layer's call (it returns None and queues nothing the graph needs)."""
    hook._qlora_sft_replay_safe = True
    return hook


def bucket(n: int) -> int:
    """How many entries a padded boundary tensor of `n` entries holds: the next power of two, at
    least `MIN_BOUNDS` (each bucket is another capture, so few of them)."""
    return max(MIN_BOUNDS, 1 << (n - 1).bit_length())


def padded_boundaries(cu: torch.Tensor, size: int, rows: int) -> torch.Tensor:
    """`cu` (0, the end of each example) for a row padded to `rows`: the padding one more example
    (attending only to itself), then empty examples up to `size` entries. The real examples attend
    as before (the kernel, and the per-example path, skip an empty example)."""
    out = cu.new_empty(size)
    out[: cu.numel()].copy_(cu)
    out[cu.numel() :] = rows
    return out


def layer_call(run: Any) -> tuple[torch.nn.Module, Any, bool] | None:
    """From the `run` a checkpointed layer hands its checkpoint function: the layer, the function to
    capture, and whether `run` would have run the layer's hooks; None where `run` is neither of
    transformers' forms (`partial(forward, layer, **kw)`, newer; `partial(layer.__call__, **kw)`
    through `super().__call__`, older)."""
    if not isinstance(run, functools.partial):
        return None
    func, args = run.func, run.args
    if len(args) == 1 and isinstance(args[0], torch.nn.Module):
        return args[0], functools.partial(func, args[0]), False
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "")
    if not args and isinstance(owner, torch.nn.Module) and name in ("__call__", "_wrapped_call_impl"):
        return owner, owner.forward, True
    return None


def layer_problem(layer: torch.nn.Module, hooked: bool) -> str | None:
    """Why this layer's calls cannot be replayed (what would not run, or not run the same), or None."""
    from torch.nn.modules import module as nn_module

    if getattr(layer, "_hf_hook", None) is not None:
        return "accelerate's hooks move its weights"
    if hooked:
        if layer._forward_hooks or layer._backward_hooks or layer._backward_pre_hooks:
            return "it has forward or backward hooks"
        if layer._forward_pre_hooks_with_kwargs or not all(
            getattr(h, "_qlora_sft_replay_safe", False) for h in layer._forward_pre_hooks.values()
        ):
            return "it has forward pre-hooks that a replay would skip"
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return "global module hooks are set"
    for m in layer.modules():
        if m.training and isinstance(m, torch.nn.Dropout) and m.p > 0:
            return "it has dropout in training"
        if m.training and float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0:
            return "its attention has dropout in training"
    return None


def _padded_shape(t: torch.Tensor, dim: int | None, rows: int) -> tuple[int, ...]:
    """`t`'s shape with its row dimension `dim` (None: none) padded to `rows`: its static copy's."""
    shape = list(t.shape)
    if dim is not None:
        shape[dim] = rows
    return tuple(shape)


def _describe(value: Any, n: int, rows: int) -> Any:
    """A hashable description of one argument for a signature, as its static copy is shaped (the
    row dimension, of size `n`, padded to `rows`); TypeError for what has none."""
    if isinstance(value, torch.Tensor):
        return ("tensor", _padded_shape(value, _row_dim(value, n), rows), value.dtype, value.device)
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_describe(v, n, rows) for v in value))
    if isinstance(value, _PLAIN):
        return ("value", value)
    raise TypeError(type(value).__name__)


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _leaves(v)]
    return []


def _rebuild(value: Any, tensors: list[torch.Tensor]) -> Any:
    """`value` with its tensors replaced, in order, by `tensors` (consumed from the front)."""
    if isinstance(value, torch.Tensor):
        return tensors.pop(0)
    if isinstance(value, tuple | list):
        return type(value)(_rebuild(v, tensors) for v in value)
    return value


def _row_dim(t: torch.Tensor, rows: int) -> int | None:
    """The dimension of a keyword argument that runs along the packed row (the rotary tables, the
    positions), or None: the first of its size."""
    return next((d for d, n in enumerate(t.shape) if n == rows), None)


class Arena:
    """The layer input, output and their gradients for every signature's graphs, as views of one
    set of buffers of the longest padded row so far (per hidden size and dtype): the graphs of
    shorter rows read and write their first rows."""

    def __init__(self, rows: int, hidden: torch.Tensor) -> None:
        shape = (*hidden.shape[:-2], rows, hidden.shape[-1])
        self.rows = rows
        self.hidden, self.out, self.grad_out, self.grad_hidden = (
            torch.empty(shape, dtype=hidden.dtype, device=hidden.device) for _ in range(4)
        )


class StaticInputs:
    """What the graphs of one signature read and write: the layer input and its output and their
    gradients (views of the `Arena`, `rows` long, the row padded), and the keyword arguments. `load`
    copies a call's inputs in, the row's padding zeroed; an argument that is the same tensor,
    unchanged, as the one loaded last (the rotary tables and the boundaries, for every layer of one
    forward) is not copied again."""

    def __init__(self, arena: Arena, rows: int, hidden: torch.Tensor, kwargs: dict[str, Any], sizes: dict[str, int]):
        self.rows, self.sizes = rows, sizes  # the padded row; padded boundary keys -> their bucket
        cut = (slice(None),) * (hidden.dim() - 2) + (slice(0, rows),)
        self.hidden, self.out, self.grad_out, self.grad_hidden = (
            arena.hidden[cut],
            arena.out[cut],
            arena.grad_out[cut],
            arena.grad_hidden[cut],
        )
        self.kwargs: dict[str, Any] = {}
        self.dims: dict[str, list[int | None]] = {}  # each argument tensor's row dimension
        n = hidden.shape[-2]
        for name, value in kwargs.items():
            if name in sizes:
                self.kwargs[name] = value.new_empty(sizes[name])
                continue
            leaves = _leaves(value)
            self.dims[name] = [_row_dim(t, n) for t in leaves]
            fresh = [
                torch.empty(_padded_shape(t, d, rows), dtype=t.dtype, device=t.device)
                for t, d in zip(leaves, self.dims[name], strict=True)
            ]
            self.kwargs[name] = _rebuild(value, fresh)
        self.last: dict[str, list[tuple[torch.Tensor, int]]] = {}

    def load(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        _fill(self.hidden, hidden, hidden.dim() - 2)
        for name, value in kwargs.items():
            sources = _leaves(value)
            if not sources:
                continue
            seen = [(t, t._version) for t in sources]
            last = self.last.get(name)
            if last is not None and all(a is b and va == vb for (a, va), (b, vb) in zip(last, seen, strict=True)):
                continue
            if name in self.sizes:
                self.kwargs[name].copy_(padded_boundaries(value, self.sizes[name], self.rows))
            else:
                for dst, src, d in zip(_leaves(self.kwargs[name]), sources, self.dims[name], strict=True):
                    _fill(dst, src, d)
            self.last[name] = seen

    def load_grad(self, grad: torch.Tensor) -> None:
        _fill(self.grad_out, grad, grad.dim() - 2)


def _fill(dst: torch.Tensor, src: torch.Tensor, dim: int | None) -> None:
    """`src` into the first rows of `dst` along `dim` (all of it where None), the rest zeroed."""
    if dim is None or src.shape[dim] == dst.shape[dim]:
        dst.copy_(src)
        return
    n = src.shape[dim]
    dst.narrow(dim, 0, n).copy_(src)
    dst.narrow(dim, n, dst.shape[dim] - n).zero_()


@dataclass
class Backward:
    """A captured recompute and backward, and the parameters whose gradients it writes."""

    graph: Any
    params: list[torch.nn.Parameter]
    grads_out: list[torch.Tensor | None]  # each parameter's gradient, static; None: it got none


class LayerGraphs:
    """The captured layers of one process (see the module's docstring). `backward`: the recompute
    and backward are captured too (one GPU), else only the forward without gradients."""

    def __init__(self, device: torch.device, backward: bool, longest: int | None = None) -> None:
        self.device = device
        self.with_backward = backward
        self.longest = longest  # the recipe's longest example (data.max_length), where known
        cuda = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.graphs: dict[Any, Any] = {}  # key -> a CUDAGraph or Backward, or None: runs eagerly
        self.seen: set[Any] = set()
        self.inputs: dict[Any, StaticInputs] = {}
        self.arenas: dict[Any, Arena] = {}
        self.grad_buffers: dict[Any, list[torch.Tensor]] = {}
        self.layers: dict[int, str | None] = {}  # id(layer) -> why it runs eagerly, or None
        self.kept: list[torch.nn.Module] = []  # the layers whose ids are keys (so no id is reused)
        self.warm = False
        self.full = False  # MAX_SIGNATURES reached (logged once)
        self.counts = {"forward": 0, "backward": 0, "captures": 0, "failures": 0}

    def report(self) -> dict[str, Any]:
        """How often the graphs replayed and were captured, and the memory their pool reserves on
        the GPU (outside what `max_memory_allocated` counts after the captures: a card must hold it
        besides the allocator's peak)."""
        held = 0
        if self.pool is not None:
            pool = tuple(self.pool)
            segments = torch.cuda.memory_snapshot()
            held = sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) == pool)
        return {**self.counts, "pool_gib": held / 2**30, "backward_on": self.with_backward}

    # -- what every call does first -------------------------------------------------------------

    def _prepare(self, run: Any, hidden: torch.Tensor, args: tuple[Any, ...], autocast: tuple[bool, Any]) -> Any:
        """(layer, fn, hooked, kwargs, static), or None where this call runs eagerly."""
        usable = not args and hidden.device == self.device and hidden.dim() >= 2 and hidden.shape[-2] >= 2
        call = layer_call(run) if usable else None
        if call is None or (self.stream is not None and torch.cuda.is_current_stream_capturing()):
            return None
        layer, fn, hooked = call
        if id(layer) not in self.layers:
            self._judge(layer, layer_problem(layer, hooked))
        if self.layers[id(layer)]:
            return None
        kwargs, sizes = dict(run.keywords), {}
        n = rows = hidden.shape[-2]
        for name in BOUNDARY_KEYS:
            cu = kwargs.get(name)
            if isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.device == self.device:
                sizes[name] = bucket(cu.numel() + 1)
        if sizes and kwargs.get("attention_mask") is None:
            rows = -(-n // ROW_GRANULE) * ROW_GRANULE  # the padding is an example of its own
            for name in LENGTH_KEYS:
                longest = kwargs.get(name)
                if isinstance(longest, int):
                    kwargs[name] = self._longest(longest, rows - n, rows)
        elif sizes:
            return None
        try:
            described = []
            for k, v in kwargs.items():
                if k in sizes:
                    described.append((k, ("boundaries", sizes[k], v.dtype)))
                else:
                    described.append((k, _describe(v, n, rows)))
        except TypeError:
            return None
        signature = (
            ("hidden", (*hidden.shape[:-2], rows, hidden.shape[-1]), hidden.dtype),
            tuple(sorted(described)),
            autocast,
        )
        static = self._static(signature, hidden, kwargs, sizes, rows)
        if static is None:
            return None
        return layer, fn, hooked, kwargs, static

    def _longest(self, longest: int, padding: int, rows: int) -> int:
        """The longest example a graph is captured for (a launch parameter of the attention kernel,
        fixed in the graph): the recipe's `data.max_length` where this micro batch is within it, else
        the next power of two. Not the whole row: the kernel runs a block per 128 positions of it for
        every example, most of them with nothing to do (at 4 x 2048 that cost ~3% of a step)."""
        if self.longest is not None and longest <= self.longest:
            bound = self.longest
        else:
            bound = 1 << max(7, (longest - 1).bit_length())
        return min(rows, max(bound, padding))

    def _judge(self, layer: torch.nn.Module, problem: str | None) -> None:
        if id(layer) not in self.layers:
            self.kept.append(layer)
        self.layers[id(layer)] = problem
        if problem:
            log.info("layer graphs: %s runs eagerly: %s", type(layer).__name__, problem)

    def _static(
        self, signature: Any, hidden: torch.Tensor, kwargs: dict[str, Any], sizes: dict[str, int], rows: int
    ) -> StaticInputs | None:
        """The static buffers of `signature`, made at its first call; None past `MAX_SIGNATURES`. A
        longer row than the arena holds makes a longer arena and drops the graphs of the old one (they
        are captured again as their shapes come)."""
        inputs = self.inputs.get(signature)
        if inputs is not None:
            return inputs
        if len(self.inputs) >= MAX_SIGNATURES:
            if not self.full:
                log.info("layer graphs: %d input shapes have graphs; other shapes run eagerly", MAX_SIGNATURES)
                self.full = True
            return None
        where = (tuple(hidden.shape[:-2]), hidden.shape[-1], hidden.dtype)
        arena = self.arenas.get(where)
        if arena is None or arena.rows < rows:
            if arena is not None:  # (the keys hold the old buffers: all of them go)
                self.graphs.clear()
                self.inputs.clear()
                self.seen.clear()
            arena = self.arenas[where] = Arena(rows, hidden)
        inputs = self.inputs[signature] = StaticInputs(arena, rows, hidden, kwargs, sizes)
        return inputs

    def _first(self, key: Any) -> bool:
        """True the first time `key` is seen: that call runs eagerly (lazy set-up outside graphs)."""
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    # -- the forward without gradients ----------------------------------------------------------

    def forward(self, run: Any, hidden: torch.Tensor, args: tuple[Any, ...]) -> Any:
        """`run(hidden, *args)` without gradients, from the layer's graph where it has one."""
        kind = self.device.type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        prepared = self._prepare(run, hidden, args, autocast)
        if prepared is None:
            return run(hidden, *args)
        layer, fn, hooked, kwargs, static = prepared
        key = ("forward", id(layer), static)
        if key not in self.graphs:
            if self._first(key):
                out = run(hidden, *args)
                if not (isinstance(out, torch.Tensor) and out.shape == hidden.shape and out.dtype == hidden.dtype):
                    self._judge(layer, "its output is not one tensor shaped as its input")
                return out
            body = functools.partial(self._forward_body, fn, static)
            self.graphs[key] = self._capture(layer, body, {"enabled": autocast[0], "dtype": autocast[1]}, grad=False)
        graph = self.graphs[key]
        if graph is None:
            return run(hidden, *args)
        if hooked:
            for hook in layer._forward_pre_hooks.values():
                hook(layer, (hidden,))
        static.load(hidden, kwargs)
        graph.replay()
        self.counts["forward"] += 1
        return static.out.narrow(-2, 0, hidden.shape[-2]).clone()

    @staticmethod
    def _forward_body(fn: Any, static: StaticInputs) -> None:
        static.out.copy_(fn(static.hidden, **static.kwargs))

    # -- the recompute and backward ---------------------------------------------------------------

    def backward(
        self, run: Any, hidden: torch.Tensor, args: tuple[Any, ...], grads: tuple[Any, ...], autocast: dict[str, Any]
    ) -> torch.Tensor | None:
        """The layer's input gradient for output gradients `grads`, its parameters' gradients added to
        their `.grad`, from the layer's graph; None where this call must run eagerly (the caller
        does, as before)."""
        if not self.with_backward or len(grads) != 1 or not isinstance(grads[0], torch.Tensor):
            return None
        (grad,) = grads
        if grad.shape != hidden.shape or grad.dtype != hidden.dtype:
            return None
        prepared = self._prepare(run, hidden, args, (autocast["enabled"], autocast["dtype"]))
        if prepared is None:
            return None
        layer, fn, _, kwargs, static = prepared
        key = ("backward", id(layer), static)
        if key not in self.graphs:
            if self._first(key):
                return None
            params = [p for p in layer.parameters() if p.requires_grad]
            if any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
                self._judge(layer, "a hook on its parameters' gradients (as DDP's) would not run")
                return None
            self.graphs[key] = self._capture_backward(layer, fn, static, params, autocast)
        entry = self.graphs[key]
        if entry is None:
            return None
        static.load(hidden, kwargs)
        static.load_grad(grad)
        entry.graph.replay()
        self.counts["backward"] += 1
        for p, g in zip(entry.params, entry.grads_out, strict=True):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)  # (as autograd accumulates a second micro batch's gradient)
        return static.grad_hidden.narrow(-2, 0, hidden.shape[-2]).clone()

    def _capture_backward(
        self, layer: torch.nn.Module, fn: Any, static: StaticInputs, params: list[Any], autocast: dict[str, Any]
    ) -> Backward | None:
        shapes = tuple((tuple(p.shape), p.dtype) for p in params)
        buffers = self.grad_buffers.get(shapes)
        if buffers is None:  # shared by the layers of one shape: each replay's are read at once
            buffers = self.grad_buffers[shapes] = [torch.empty_like(p) for p in params]
        entry = Backward(None, params, list(buffers))

        def body() -> None:
            h = static.hidden.detach().requires_grad_(True)
            out = fn(h, **static.kwargs)
            got = torch.autograd.grad([out], [h, *params], [static.grad_out], allow_unused=True)
            static.grad_hidden.copy_(got[0])
            for i, g in enumerate(got[1:]):
                if g is None:
                    entry.grads_out[i] = None
                else:
                    entry.grads_out[i].copy_(g)

        entry.graph = self._capture(layer, body, autocast, grad=True)
        return entry if entry.graph is not None else None

    # -- capture ----------------------------------------------------------------------------------

    def _capture(self, layer: torch.nn.Module, body: Any, autocast: dict[str, Any], grad: bool) -> Any:
        """`body()` captured on the side stream into a graph of the shared pool, with gradients on
        where `grad`, under `autocast`; None (logged) where the capture fails."""
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        graph = torch.cuda.CUDAGraph()
        kind = self.device.type
        try:
            with torch.cuda.stream(self.stream):
                if not self.warm:  # cuBLAS's handle and workspace for this stream, outside any graph
                    for dtype in (torch.float32, torch.bfloat16):
                        a = torch.ones(16, 16, dtype=dtype, device=self.device)
                        torch.addmm(a, a, a)
                    self.warm = True
                with (
                    torch.set_grad_enabled(grad),
                    # a cast cached inside a graph would outlive it
                    torch.autocast(kind, dtype=autocast["dtype"], enabled=autocast["enabled"], cache_enabled=False),
                ):
                    graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                    try:
                        body()
                    finally:
                        graph.capture_end()
        except Exception as exc:  # an operation a graph cannot hold: this layer runs eagerly
            compute.wait_stream(self.stream)
            self.counts["failures"] += 1
            first = str(exc).splitlines()[0] if str(exc) else ""
            log.warning(
                "layer graphs: capturing %s failed (%s: %s); it runs eagerly",
                type(layer).__name__,
                type(exc).__name__,
                first,
            )
            return None
        compute.wait_stream(self.stream)
        self.counts["captures"] += 1
        return graph

"""What waits in host memory instead of on the GPU. `train.offload_activations`: gradient
checkpointing whose layer inputs wait for the backward pass in pinned host memory, copied there and
back on a side stream (`OffloadedCheckpoint`); `offload_checkpointed_inputs` points the checkpointed
decoder layers at it. `model.embedding_in_host_memory`: the frozen input embedding table stays in
host memory and only each batch's rows reach the GPU (`HostEmbedding`). `model.lm_head_in_host_memory`:
the frozen output head stays in pinned host memory and is copied to the GPU for each forward's loss
only, freed once the loss's backward has used it (`HostHead`)."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

# Benchmark switches for issue 29's ablation rows (docs/benchmarks.md), not recipe keys: what they
# trade was measured there and the defaults stand.
# `0`: an offloaded layer input comes back to the GPU only when its own layer's backward needs it, not
# prefetched while the layer above runs its backward (one fetched input alive instead of two; each
# fetch then holds up the compute while it copies).
OFFLOAD_PREFETCH_ENV = "QLORA_SFT_OFFLOAD_PREFETCH"
# A whole number: the vocabulary width of the tiles trl's fused output head computes the loss in
# (trl's `_CHUNKED_LOGPROB_CHUNK_SIZE`, 32768; a tile is up to 4,096 tokens x this many logits).
HEAD_TILE_ENV = "QLORA_SFT_HEAD_TILE"
# QLORA_SFT_HEAD_LEAD (a benchmark switch): how many decoder layers before the end of the forward
# the copy of a head in host memory starts (`HostHead.LEAD`, 8); a longer lead overlaps a slower copy
HEAD_LEAD_ENV = "QLORA_SFT_HEAD_LEAD"


def _switch_error(name: str, raw: str, want: str) -> Exception:
    from ..errors import UserError

    return UserError(f"{name}={raw!r}: {want}; unset it for the default")


def prefetch_offloaded_inputs(env: Any = None) -> bool:
    """QLORA_SFT_OFFLOAD_PREFETCH, checked (`launch.env_switch`): on unless set to 0."""
    from ..launch import env_switch

    return env_switch(OFFLOAD_PREFETCH_ENV, env) is not False


def _env_whole(name: str, low: int, high: int, what: str, env: Any) -> int | None:
    """A benchmark switch that names a whole number from `low` to `high`, checked; None where unset."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return None
    if not raw.isdecimal() or not low <= int(raw) <= high:
        raise _switch_error(name, raw, f"name a whole number of {what} from {low} to {high}")
    return int(raw)


def head_tile(env: Any = None) -> int | None:
    """QLORA_SFT_HEAD_TILE: the vocabulary width of trl's fused head tiles, or None (trl's own, 32768)."""
    return _env_whole(HEAD_TILE_ENV, 256, 1 << 20, "logits (trl's is 32768)", env)


def head_lead(env: Any = None) -> int:
    """QLORA_SFT_HEAD_LEAD: how many decoder layers before the last a `HostHead`'s copy starts
    (`HostHead.LEAD` where unset)."""
    lead = _env_whole(HEAD_LEAD_ENV, 1, 4096, f"decoder layers (the default is {HostHead.LEAD})", env)
    return HostHead.LEAD if lead is None else lead


def apply_head_tile(env: Any = None) -> int | None:
    """Set trl's fused head's tile width where QLORA_SFT_HEAD_TILE asks; returns what was set."""
    tile = head_tile(env)
    if tile is None:
        return None
    from trl.trainer import utils as trl_utils

    if not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        raise _switch_error(
            HEAD_TILE_ENV, str(tile), "this trl has no `_CHUNKED_LOGPROB_CHUNK_SIZE` (its fused head changed)"
        )
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = tile
    return tile


class HeldInput:
    """One checkpointed layer's input while it waits for the backward pass: in pinned host memory,
    copied there and back on a side stream (`copy_stream`) so the copies overlap the compute
    stream's work instead of queueing in it. Every GPU block involved belongs to the compute stream,
    which waits for the copy before the block can be freed or read, so no block outlives its use:
    the forward's input is released once the layer's forward is queued (`release`), after its copy
    to the host; `fetch` starts the copy back into a block allocated on the compute stream (the layer whose
    backward runs just before prefetches it); `take` makes the compute stream wait for it."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.device = hidden.device
        self.gpu: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.done: Any = None
        cuda = hidden.device.type == "cuda"
        self.host: torch.Tensor | None = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=cuda)
        if not cuda:
            self.host.copy_(hidden.detach())
            return
        stream = copy_stream(hidden.device)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))  # the input is computed
        with torch.cuda.stream(stream):
            self.host.copy_(hidden.detach(), non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(stream)
        self.source = hidden  # kept until the copy has read it (`release`)

    def release(self) -> None:
        """Let the forward's input go once the compute stream has waited for its copy."""
        if self.source is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done)
            self.source = None

    def fetch(self) -> None:
        if self.gpu is not None or self.host is None:
            return
        self.release()
        if self.device.type != "cuda":
            self.gpu = self.host.to(self.device)
            return
        compute = torch.cuda.current_stream(self.device)
        self.gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        stream = copy_stream(self.device)
        stream.wait_stream(compute)  # the block may be one the compute stream just freed
        with torch.cuda.stream(stream):
            self.gpu.copy_(self.host, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(stream)
        self.gpu.record_stream(stream)  # a block dropped before `take` outlives the copy

    def take(self) -> torch.Tensor:
        self.fetch()
        gpu, self.gpu, self.host = self.gpu, None, None
        assert gpu is not None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self.done)
        return gpu


_LAST_HELD: dict[torch.device, HeldInput] = {}
_PREFETCH = True  # set from QLORA_SFT_OFFLOAD_PREFETCH when offloading starts (offload_checkpointed_inputs)
# the layers' CUDA graphs (QLORA_SFT_LAYER_GRAPHS, `layer_graphs.LayerGraphs`), or None: eager
_GRAPHS: Any = None


@functools.cache
def copy_stream(device: torch.device) -> Any:
    """The side stream that carries offloaded activations to the host and back, one per GPU."""
    return torch.cuda.Stream(device)


class OffloadedCheckpoint(torch.autograd.Function):
    """Gradient checkpointing of one decoder layer whose input waits for the backward pass in pinned
    host memory instead of on the GPU (unsloth's "unsloth" checkpointing; torchtune's activation
    offloading does the same for all saved tensors). The forward starts the copy of the layer input
    to the host on a side stream and runs the layer without saving anything; the backward takes the
    input back (prefetched while the layer above ran its backward), starts the copy of the layer
    below's input, recomputes the layer with the forward's autocast and RNG state, and
    backpropagates through it. What stays on the GPU between forward and backward is one layer's
    activations at a time, not every layer's input (for an 8B Llama with 4 x 2048 tokens, 1.68 GiB
    less on an H100)."""

    @staticmethod
    def forward(ctx: Any, run: Any, hidden: torch.Tensor, *args: Any) -> Any:
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        kind = hidden.device.type
        ctx.autocast = {
            "device_type": kind,
            "enabled": torch.is_autocast_enabled(kind),
            "dtype": torch.get_autocast_dtype(kind),
            "cache_enabled": torch.is_autocast_cache_enabled(),
        }
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if kind == "cuda" else None
        ctx.held = HeldInput(hidden)
        # the layer below runs its backward next: this one's backward prefetches its input
        # (QLORA_SFT_OFFLOAD_PREFETCH=0: it does not; its own backward fetches it)
        ctx.below = _LAST_HELD.get(hidden.device) if _PREFETCH else None
        _LAST_HELD[hidden.device] = ctx.held
        with torch.no_grad():
            out = run(hidden, *args) if _GRAPHS is None else _GRAPHS.forward(run, hidden, args)
        ctx.held.release()  # the stream waits here, after the layer's kernels, for the copy
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        hidden = ctx.held.take().detach()
        if ctx.below is not None:
            ctx.below.fetch()
        ctx.held = ctx.below = None
        if _GRAPHS is not None:
            grad = _GRAPHS.backward(ctx.run, hidden, ctx.args, grads, ctx.autocast)
            if grad is not None:
                return (None, grad, *([None] * len(ctx.args)))
        hidden.requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g)
            for o, g in zip(outs, grads, strict=False)
            if torch.is_tensor(o) and o.requires_grad and g is not None
        ]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, hidden.grad, *([None] * len(ctx.args)))


def offloaded_checkpoint(run: Any, hidden: torch.Tensor, *args: Any) -> Any:
    """A `_gradient_checkpointing_func` for transformers' decoder layers (called as
    `func(partial(forward, **kwargs), hidden_states, *positional)`). A forward without gradients
    (evaluation in train mode) has no backward to wait for: it runs the layer as is."""
    if not torch.is_grad_enabled():
        return run(hidden, *args)
    return OffloadedCheckpoint.apply(run, hidden, *args)


def offload_checkpointed_inputs(model: Any, graphs: str = "off", longest: int | None = None) -> int:
    """Point every checkpointed decoder layer at `offloaded_checkpoint`; returns how many. Called at
    the start of training, after transformers/TRL have (re)enabled checkpointing. `graphs`
    (`layer_graphs.LAYER_GRAPHS`, as the launch allows it): which of the layers' calls replay CUDA
    graphs on a GPU; `longest`: the longest example a packed row holds (data.max_length), if known."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .layer_graphs import LayerGraphs

    global _PREFETCH, _GRAPHS
    _PREFETCH = prefetch_offloaded_inputs()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for m in layers:
        m._gradient_checkpointing_func = offloaded_checkpoint
    device = next((p.device for m in layers for p in m.parameters()), None)
    _GRAPHS = None
    if graphs != "off" and device is not None and device.type == "cuda":
        _GRAPHS = LayerGraphs(device, backward=graphs == "on", longest=longest)
    return len(layers)


class HostEmbedding(torch.nn.Embedding):
    """`model.embedding_in_host_memory`: the frozen input embedding kept in host memory. Each
    forward copies the batch's token ids to the host, gathers only their rows there, into pinned
    memory on a CUDA machine, and copies those rows (tokens x hidden, 64 MiB for 8,192 tokens of an
    8B Llama) to the compute device; the GPU never holds the vocabulary x hidden table. Its output
    needs no gradient (the embedding is frozen; `enable_input_require_grads` marks it for
    checkpointing as before)."""

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        device = embedding.weight.device
        super().__init__(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            _weight=embedding.weight.detach().to("cpu"),
            _freeze=True,
        )
        self.compute_device = device

    def _apply(self, fn: Any, recurse: bool = True) -> HostEmbedding:
        # The table stays in host memory whatever moves or casts the model: transformers' Trainer
        # moves a PeftModel to the GPU when it does not see bitsandbytes' quantization through it,
        # which took the table back to the GPU (found on an H200, 2026-11-30).
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.weight.device)
        pinned = self.compute_device.type == "cuda" and self.weight.device.type == "cpu"
        # the rows land in pinned memory (the caching host allocator keeps the block until the
        # non-blocking copy that reads it is done); the table itself is never copied, so not pinned
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.weight.dtype, pin_memory=pinned)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows)
        return rows.view(*ids.shape, self.embedding_dim).to(self.compute_device, non_blocking=True)


def _pattern_problem(model: Any, module: Any, key: str, table: str, target_modules: Any) -> str | None:
    """lora.target_modules as one regular expression (not `all-linear`), which peft matches against
    each module's whole name, naming the table: LoRA would adapt it (the list form is refused by
    `launch.check_launch_compat`, from the names alone)."""
    import re

    if not isinstance(target_modules, str) or target_modules == "all-linear":
        return None
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None or not re.fullmatch(target_modules, name):
        return None
    return (
        f"model.{key}: lora.target_modules {target_modules!r} matches the {table} ({name}), which LoRA would then "
        f"adapt; a table in host memory stays frozen. Leave {name} out of the pattern, or remove the key for this "
        "model."
    )


def embedding_problem(model: Any, target_modules: Any = None) -> str | None:
    """Why `model.embedding_in_host_memory` cannot move this model's input embedding (tied, not a
    plain `nn.Embedding`, matched by the lora.target_modules pattern `target_modules`), or None. Reads
    only the modules' names, types and ties: a model on the meta device answers as the loaded one
    (`model.load.check_host_tables`, before any weight loads)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        return (
            "model.embedding_in_host_memory: this model's input embedding is its output head (tied), which "
            "computes on the GPU. Remove the key for this model."
        )
    if type(embedding) is not torch.nn.Embedding:
        return (
            f"model.embedding_in_host_memory: this model's input embedding is a {type(embedding).__name__}, not a "
            "plain torch Embedding; its forward may do more than look rows up, so it stays on the GPU. Remove the key "
            "for this model."
        )
    return _pattern_problem(model, embedding, "embedding_in_host_memory", "input embedding", target_modules)


def embedding_in_host_memory(model: Any, target_modules: Any = None) -> tuple[str, int]:
    """Replace the model's input embedding with a `HostEmbedding` of the same weights, freeing its
    GPU copy. Returns the parameter's name (for DDP to leave alone: DDP refuses a module whose
    parameters are on two device types) and the bytes moved off the GPU. Only a plain
    `nn.Embedding` is replaced: a subclass may compute more in its forward (Gemma scales its rows)."""
    from ..errors import UserError

    problem = embedding_problem(model, target_modules)
    if problem:
        raise UserError(problem)
    host = HostEmbedding(model.get_input_embeddings())
    model.set_input_embeddings(host)
    name = next(n for n, p in model.named_parameters() if p is host.weight)
    return name, host.weight.numel() * host.weight.element_size()


@functools.cache
def head_stream(device: torch.device) -> Any:
    """The side stream that copies a `HostHead` to the GPU. Not `copy_stream`: the last layers'
    inputs go to the host during the same forward, and would wait behind the head's copy."""
    return torch.cuda.Stream(device)


class HostHead(torch.nn.Module):
    """`model.lm_head_in_host_memory`: the frozen output head (a plain bias-free `nn.Linear`) kept in
    pinned host memory. Each forward of the model copies it to the GPU on a side stream, started
    `LEAD` decoder layers before the end so the copy overlaps their compute; the loss reads it as
    `weight` (trl's fused head reads `lm_head.weight` directly) and its autograd node keeps the copy
    until the loss's backward, the first of the backward, has used it. So the GPU holds no
    vocabulary x hidden table while the decoder layers' backward runs, where a step's peak is.

    The table is the module's parameter `weight` (state dict, names and DDP's ignore list as
    before); the attribute `weight` is the GPU copy while a forward holds it (`arm` ... `release`,
    from hooks on the model that `host_head_hooks` installs), the host parameter otherwise. On the
    CPU there is nothing to copy: the attribute is the parameter."""

    # decoder layers before the end of the forward whose forward starts the copy. The decoder's
    # layers have one shape and each keeps its input (on the GPU, or offloaded), so what is alive
    # does not fall from one layer to the next: the forward's peak is at its last layers, which
    # ran with the copy alive at any lead, and a longer lead does not raise it. 8B at 2 x 2048 on
    # an H200 (2026-12-03): two layers' compute was shorter than the 1 GiB copy; 8 ran 1.086x
    # faster, the same peak.
    LEAD = 8

    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.compute_device = head.weight.device
        table = head.weight.detach().to("cpu")
        if self.compute_device.type == "cuda":
            table = table.pin_memory()  # a non-blocking copy to the GPU needs pinned memory
        # set in `_parameters` directly: `register_parameter` refuses a name the class has (`weight`)
        self._parameters["weight"] = torch.nn.Parameter(table, requires_grad=False)
        self.bias = None
        self.armed = False
        self.staged: torch.Tensor | None = None
        self.ready: Any = None

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.take() if self.armed else self._parameters["weight"]

    def _apply(self, fn: Any, recurse: bool = True) -> HostHead:
        return self  # stays in host memory whatever moves or casts the model (as HostEmbedding)

    def arm(self) -> None:
        """A forward of the model begins: its loss will read `weight` on the compute device."""
        self.release()
        self.armed = True

    def prefetch(self) -> None:
        """Start the copy to the compute device (a decoder layer near the end calls it)."""
        if not self.armed or self.staged is not None:
            return
        table = self._parameters["weight"]
        if self.compute_device.type != "cuda":
            self.staged = table  # the compute device is the host: nothing to copy
            return
        compute = torch.cuda.current_stream(self.compute_device)
        self.staged = torch.empty(table.shape, dtype=table.dtype, device=self.compute_device)
        stream = head_stream(self.compute_device)
        stream.wait_stream(compute)  # the block may be one the compute stream just freed
        with torch.cuda.stream(stream):
            self.staged.copy_(table, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.staged.record_stream(stream)  # a copy dropped before it is read outlives the copy

    def take(self) -> torch.Tensor:
        self.prefetch()
        assert self.staged is not None
        if self.ready is not None:
            torch.cuda.current_stream(self.compute_device).wait_event(self.ready)
            self.ready = None
        return self.staged

    def release(self) -> None:
        """The forward is over: drop this module's hold on the copy (the loss's autograd node may
        keep it until its backward)."""
        self.armed, self.staged, self.ready = False, None, None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.armed:
            return torch.nn.functional.linear(hidden, self.take())
        # called outside a forward of the model (generation, a caller of its own): copy for this call
        self.arm()
        try:
            return torch.nn.functional.linear(hidden, self.take())
        finally:
            self.release()


def head_problem(model: Any, target_modules: Any = None) -> str | None:
    """Why `model.lm_head_in_host_memory` cannot move this model's output head (none, tied, not a plain
    bias-free `nn.Linear`, matched by the lora.target_modules pattern), or None; as
    `embedding_problem`, a model on the meta device answers."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    key = "model.lm_head_in_host_memory"
    if head is None:
        return f"{key}: this model has no output head to keep in host memory. Remove the key for this model."
    if embedding is not None and head.weight is embedding.weight:
        return (
            f"{key}: this model's output head is its input embedding (tied), which one copy serves. Remove the key "
            "for this model."
        )
    if type(head) is not torch.nn.Linear or head.bias is not None:
        what = "a torch Linear with a bias" if type(head) is torch.nn.Linear else f"a {type(head).__name__}"
        return (
            f"{key}: this model's output head is {what}, not a plain bias-free torch Linear; it stays on the GPU. "
            "Remove the key for this model."
        )
    return _pattern_problem(model, head, "lm_head_in_host_memory", "output head", target_modules)


def lm_head_in_host_memory(model: Any, target_modules: Any = None) -> tuple[str, int]:
    """Replace the model's output head with a `HostHead` of the same weights, freeing its GPU copy.
    Returns the parameter's name (for DDP to leave alone) and the bytes moved off the GPU. Only a
    plain bias-free `nn.Linear` not tied to the input embedding is replaced."""
    from ..errors import UserError

    problem = head_problem(model, target_modules)
    if problem:
        raise UserError(problem)
    head = model.get_output_embeddings()
    host = HostHead(head)
    model.set_output_embeddings(host)
    name = next(n for n, p in model.named_parameters() if p is host._parameters["weight"])
    return name, head.weight.numel() * head.weight.element_size()


def host_head_hooks(model: Any) -> HostHead | None:
    """Wire a `HostHead` into the forward of `model` (the outermost module a trainer calls, e.g. the
    PeftModel): armed as the forward begins, its copy started `LEAD` decoder layers before the end
    (or at once where the decoder's layers are not found), released when the forward returns or
    raises; its table pinned again if something cast it since. Returns the head, or None where the
    model has none."""
    head = model.get_output_embeddings()
    if not isinstance(head, HostHead):
        return None
    table = head._parameters["weight"]
    if head.compute_device.type == "cuda" and not table.is_pinned():
        # model.upcast_frozen: peft's prepare_model_for_kbit_training replaced the table by an fp32
        # copy in pageable memory, from which each copy to the GPU would stall the host
        table.data = table.data.pin_memory()
    model.register_forward_pre_hook(lambda module, args: head.arm())
    model.register_forward_hook(lambda module, args, out: head.release(), always_call=True)
    from .layer_graphs import replay_safe

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        # (replay-safe: a replayed layer's graph leaves its pre-hooks out, which then run before it)
        prefetch = replay_safe(lambda module, args: head.prefetch())
        layers[max(0, len(layers) - head_lead())].register_forward_pre_hook(prefetch)
    else:
        model.register_forward_pre_hook(lambda module, args: head.prefetch())
    return head

"""What waits in host memory instead of on the GPU. `train.offload_activations`: gradient
checkpointing whose layer inputs wait for the backward pass in pinned host memory, copied there and
back on a side stream (`OffloadedCheckpoint`); `offload_checkpointed_inputs` points the checkpointed
decoder layers at it. `model.embedding_in_host_memory`: the frozen input embedding table stays in
host memory and only each batch's rows reach the GPU (`HostEmbedding`)."""

from __future__ import annotations

import functools
from typing import Any

import torch


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
        ctx.below = _LAST_HELD.get(hidden.device)
        _LAST_HELD[hidden.device] = ctx.held
        with torch.no_grad():
            out = run(hidden, *args)
        ctx.held.release()  # the stream waits here, after the layer's kernels, for the copy
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        hidden = ctx.held.take().detach().requires_grad_(True)
        if ctx.below is not None:
            ctx.below.fetch()
        ctx.held = ctx.below = None
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


def offload_checkpointed_inputs(model: Any) -> int:
    """Point every checkpointed decoder layer at `offloaded_checkpoint`; returns how many. Called at
    the start of training, after transformers/TRL have (re)enabled checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for m in layers:
        m._gradient_checkpointing_func = offloaded_checkpoint
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


def embedding_in_host_memory(model: Any) -> tuple[str, int]:
    """Replace the model's input embedding with a `HostEmbedding` of the same weights, freeing its
    GPU copy. Returns the parameter's name (for DDP to leave alone: DDP refuses a module whose
    parameters are on two device types) and the bytes moved off the GPU. Only a plain
    `nn.Embedding` is replaced: a subclass may compute more in its forward (Gemma scales its rows)."""
    from ..errors import UserError

    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        raise UserError(
            "model.embedding_in_host_memory: this model's input embedding is its output head (tied), which "
            "computes on the GPU. Remove the key for this model."
        )
    if type(embedding) is not torch.nn.Embedding:
        raise UserError(
            f"model.embedding_in_host_memory: this model's input embedding is a {type(embedding).__name__}, not a "
            "plain torch Embedding; its forward may do more than look rows up, so it stays on the GPU. Remove the key "
            "for this model."
        )
    host = HostEmbedding(embedding)
    model.set_input_embeddings(host)
    name = next(n for n, p in model.named_parameters() if p is host.weight)
    return name, host.weight.numel() * host.weight.element_size()

"""Low-memory loading: checkpoint shards -> quantized parameters, one tensor at a time, placed per rank.

transformers quantizes a model onto each process's GPU, so under FSDP and ZeRO-3 every rank would
first hold the whole 4-bit model on its GPU, and a model whose 4-bit weights exceed one GPU could
not load at all. This loader never holds the whole model in 16 bits, on a GPU or in CPU memory:

1. the model skeleton is built on the meta device (buffers real, e.g. RoPE frequencies), and its
   linear layers become bitsandbytes `Linear4bit` through transformers' own quantizer, so peft, TRL
   and the Trainer see exactly the model `from_pretrained` would build;
2. the safetensors shards are read one tensor at a time; each linear weight is quantized on the
   GPU (CPU without one) right away, with the recipe's settings;
3. each tensor's data goes where the launch mode wants it (`data_device`): this rank's GPU (one GPU,
   DDP), CPU memory (the rank that materialises the model under FSDP/ZeRO-3: FSDP moves it to the
   GPU one wrapped layer at a time, DeepSpeed one parameter at a time, each sharding as it goes), or
   nowhere (`meta`: the other ranks, which get their shard from rank 0's broadcast). Quantization
   constants (absmax etc., about 1/64 of the 4-bit bytes) live on every rank's GPU: bitsandbytes
   needs them beside every shard and they are not broadcast.

Pre-quantized bitsandbytes 4-bit checkpoints (`*-bnb-4bit`, written by `save_pretrained` of a 4-bit
model) load the same way: their packed weights are used as stored, and packed bytes stored as uint8
are reinterpreted in the compute dtype when FSDP/ZeRO-3 need one dtype (the bytes are identical,
only the element type differs; tested).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger("qlora_sft")

# tensors stored beside a pre-quantized 4-bit weight `<module>.weight`
QUANT_STATE_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)


def checkpoint_files(name_or_path: str, revision: str | None = None, what: str = "model") -> tuple[Path, list[Path]]:
    """The model folder and its safetensors files (a hub id is fetched where the hub is reachable).
    `what` names the model in errors."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    name_or_path,
                    revision=revision,
                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
                )
            )
        except Exception as exc:
            raise UserError(
                f"{what} {name_or_path!r} not found locally and not downloadable ({type(exc).__name__}). "
                "Give the path to a local model folder."
            ) from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{what} folder {folder} holds no .safetensors weights (only safetensors are read)")
    return folder, files


def is_quant_state_key(key: str, present: set[str]) -> bool:
    """A quantization constant stored beside a pre-quantized weight (read together with it)."""
    return key.endswith(QUANT_STATE_SUFFIXES) and re.sub(r"\.weight\..*$", ".weight", key) in present


def stored_quant_state(f: Any, key: str, present: set[str], device: torch.device) -> Any:
    """The bitsandbytes QuantState stored beside weight `key` of an open safetensors file, or None
    when the weight is not pre-quantized."""
    from bitsandbytes.functional import QuantState

    keys = [key + s for s in QUANT_STATE_SUFFIXES if key + s in present]
    if not keys:
        return None
    return QuantState.from_dict({k[len(key) + 1 :]: f.get_tensor(k) for k in keys}, device=device)


def prequantized_config(config: Any) -> dict[str, Any] | None:
    """The bitsandbytes 4-bit settings a checkpoint was saved with, or None for a 16/32-bit one."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise UserError(
            f"the checkpoint is quantized with {qc.get('quant_method')!r}; qlora-sft trains on full-precision "
            "or bitsandbytes 4-bit checkpoints"
        )
    if qc.get("load_in_8bit"):
        raise UserError("the checkpoint is stored in bitsandbytes 8-bit; use its full-precision original")
    return qc


@dataclass
class LoadStats:
    tensors: int = 0
    quantized: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    renamed_storage: int = 0  # pre-quantized weights reinterpreted in another storage dtype
    loaded: set[str] = field(default_factory=set)  # parameter names filled from the checkpoint
    skipped: list[str] = field(default_factory=list)  # checkpoint tensors that match no parameter

    def line(self) -> str:
        extra = f", {self.renamed_storage} pre-quantized weights re-typed" if self.renamed_storage else ""
        return (
            f"low-memory loader: {self.tensors} tensors ({self.quantized} quantized{extra}), "
            f"{self.bytes_read / 2**30:.2f} GiB read in {self.seconds:.1f} s"
        )


def load_low_memory(
    path: str,
    qconfig: Any,
    *,
    dtype: torch.dtype,
    data_device: torch.device,
    compute_device: torch.device,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Any:
    """A causal LM from `path`, quantized with `qconfig` (a transformers BitsAndBytesConfig for
    4-bit, or None for no quantization), tensor by tensor, its data on `data_device`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder, files = checkpoint_files(path, revision)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    pre = prequantized_config(config)
    if pre is not None and qconfig is None:
        raise UserError(
            f"{path} is stored in 4-bit (bitsandbytes); set quantization.method to "
            f"{pre.get('bnb_4bit_quant_type', 'nf4')} to train on it"
        )
    if qconfig is not None and getattr(qconfig, "load_in_8bit", False):
        raise UserError("the low-memory loader quantizes to 4 bits only; int8 loads with model.loader: transformers")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is built plain; the quantizer below converts it

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    quantizer = None
    if qconfig is not None:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=pre is not None)
        quantizer.preprocess_model(
            model=model, dtype=dtype, device_map={"": compute_device}, checkpoint_files=None, use_kernels=False
        )

    stats = _fill(model, files, dtype=dtype, data_device=data_device, compute_device=compute_device)
    model.tie_weights()
    _check_complete(model, stats, path)
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()
    log.info("%s; weights on %s", stats.line(), data_device)
    return model


def _fill(
    model: Any, files: list[Path], *, dtype: torch.dtype, data_device: torch.device, compute_device: torch.device
) -> LoadStats:
    import bitsandbytes as bnb
    from safetensors import safe_open

    t0 = time.time()
    stats = LoadStats()
    params = dict(model.named_parameters(remove_duplicate=False))
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            present = set(keys)
            for key in keys:
                if is_quant_state_key(key, present):
                    continue  # read together with its weight
                if key not in params:
                    stats.skipped.append(key)
                    continue
                module_name, _, pname = key.rpartition(".")
                module = model.get_submodule(module_name)
                old = params[key]
                if isinstance(module, bnb.nn.Linear4bit) and pname == "weight":
                    new = _quantized_weight(f, key, present, module, old, dtype, data_device, compute_device, stats)
                    stats.quantized += 1
                else:
                    t = f.get_tensor(key)
                    stats.bytes_read += t.numel() * t.element_size()
                    if t.is_floating_point():
                        t = t.to(old.dtype)
                    new = torch.nn.Parameter(t.to(data_device), requires_grad=old.requires_grad)
                module._parameters[pname] = new
                stats.loaded.add(key)
                stats.tensors += 1
    stats.seconds = time.time() - t0
    return stats


def _quantized_weight(
    f: Any,
    key: str,
    present: set[str],
    module: Any,
    old: Any,
    dtype: torch.dtype,
    data_device: torch.device,
    compute_device: torch.device,
    stats: LoadStats,
) -> Any:
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit

    storage = module.quant_storage if getattr(module, "quant_storage", None) is not None else old.quant_storage
    t = f.get_tensor(key)
    stats.bytes_read += t.numel() * t.element_size()
    qs = stored_quant_state(f, key, present, compute_device)
    if qs is not None:  # pre-quantized: packed bytes as stored, quantization constants beside them
        packed = t
        if packed.dtype != storage:
            nbytes = packed.numel() * packed.element_size()
            if nbytes % torch.tensor([], dtype=storage).element_size():
                raise UserError(f"{key}: {nbytes} packed bytes cannot be stored as {storage}")
            packed = packed.reshape(-1).view(torch.uint8).view(storage).reshape(-1, 1)
            stats.renamed_storage += 1
    else:
        w = t.to(compute_device, dtype=dtype)
        packed, qs = quantize_4bit(
            w,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=storage,
        )
        del w
    param = bnb.nn.Params4bit(
        packed.to(data_device),
        requires_grad=False,
        quant_state=qs,
        blocksize=qs.blocksize,
        compress_statistics=qs.nested,
        quant_type=qs.quant_type,
        quant_storage=packed.dtype,
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = qs
    return param


def _check_complete(model: Any, stats: LoadStats, path: str) -> None:
    """Every parameter came from the checkpoint (tied ones through their source), and every tensor of
    the checkpoint went somewhere."""
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in stats.loaded}
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights of the model are not in the checkpoint: {missing[:4]}")
    if stats.skipped:
        problems.append(f"{len(stats.skipped)} checkpoint tensors match no weight of the model: {stats.skipped[:4]}")
    if problems:
        raise UserError(
            f"model.name_or_path {path}: the low-memory loader maps checkpoint tensors to the model by name, "
            f"and {'; '.join(problems)}. This architecture stores its weights under other names; load it with "
            "model.loader: transformers (under FSDP/ZeRO-3 every GPU then holds the whole 4-bit model while "
            "loading)."
        )

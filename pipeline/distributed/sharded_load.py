"""Building and loading a model that no process holds whole: ZeRO-3 partitions from the first byte.

Under ZeRO-3 every parameter is split over the data-parallel ranks: of an n-element parameter, rank
r of W keeps the flat elements [r * p, (r + 1) * p) with p = ceil(n / W), the last partition padded
(DeepSpeed's layout: runtime/zero/partition_parameters.py `_partition_param`). A model built whole
and handed to DeepSpeed is moved whole onto every GPU first and only partitioned in the optimizer
(engine `_configure_distributed_model`): for Mixtral-8x7B 93 GB of host RAM per process and an
out-of-memory on an 80 GB GPU. So under ZeRO-3 the stages build this way instead:

1. `build_partitioned`: the model is constructed under `deepspeed.zero.Init` with the run's
   DeepSpeed config; each module's parameters are partitioned as soon as that module is built (at
   most one module's weights exist whole, for a moment), and the engine leaves them where they are.
2. `load_partitions`: every rank reads, for each tensor of the HF checkpoint, only the bytes that
   fall into its own partitions. A safetensors tensor is one contiguous byte range, and every piece
   of the name table (a whole tensor, expert e's w1 / w3 rows of the fused gate_up_proj, its w2) is
   one contiguous element range of its native parameter, so the overlap with a partition is one
   read (`pipeline.safetensors_io`). Nothing is gathered, nothing is broadcast.
   `random_init` (model.preset): each parameter's init is drawn whole on the CPU, in
   `Mixtral.init_weights` order from the same generator as a one-process run, and the rank keeps
   its slice; the main process streams the same tensors to base/.
3. LoRA adapters are created whole in every process (small); DeepSpeed partitions them in
   `prepare`. `match_engine_dtype` casts them as the engine would have (it skips a model built
   under zero.Init). `size_zero3_buffers` sizes DeepSpeed's gather and bucket limits to the model.

Afterwards the parameters' own shapes are [0]: `full_shape` / `parameter_count` give the real ones,
`gathered` makes some of them whole for a moment (`merge_adapter_fp32`, DPO's, merges an SFT
adapter layer by layer that way and cuts it to the experts an expert-parallel rank holds; eval
merges as export does, pipeline/adapter_merge.py), `forward_gathers` lets a forward run before
DeepSpeed's engine exists (DPO's reference pass) and `trainable_state_dict` collects the adapter at
the end without gathering the frozen base.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import NAME_TABLE, hf_to_native, load_pretrained, save_pretrained, weight_files
from model.config import MixtralConfig
from model.transformer import Mixtral, init_parameter
from pipeline.distributed.expert_parallel import ExpertPlacement, load_local_experts, shard_experts
from pipeline.safetensors_io import READ_CHUNK_BYTES, read_into, read_safetensors_header


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (DeepSpeed marks them with a ds_id)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    if getattr(param, "quant_state", None) is not None:
        return param.quant_state.shape  # a 4-bit Linear4bit weight: its values, not its packed bytes
    return param.ds_shape if is_partitioned(param) else param.shape


def parameter_count(params) -> int:
    """Elements of the whole parameters, partitioned or 4-bit or not."""
    return sum(math.prod(full_shape(p)) for p in params)


def model_parameter_count(model: nn.Module) -> int:
    """`parameter_count` of the model's parameters plus its 4-bit expert stacks (buffers)."""
    from model.quant import NF4Experts

    stacks = sum(math.prod(m.shape) for m in model.modules() if isinstance(m, NF4Experts))
    return parameter_count(model.parameters()) + stacks


def zero3_config() -> dict:
    """The run's DeepSpeed config (accelerate's plugin, built by `parallel.make_accelerator`)."""
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin
    if plugin is None or plugin.deepspeed_config["zero_optimization"].get("stage") != 3:
        raise RuntimeError("a ZeRO-3 build needs the run's Accelerator, made with parallel.zero_stage=3, first")
    return plugin.deepspeed_config


def engine_dtype(ds_config: dict, dtype: torch.dtype) -> torch.dtype:
    """The dtype DeepSpeed's engine gives the parameters: bf16 under its bf16 mode, else the model's."""
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else dtype


def build_partitioned(config: MixtralConfig, ds_config: dict, dtype: torch.dtype) -> Mixtral:
    """All experts, every parameter partitioned at construction; the values are not set yet."""
    import deepspeed

    # Module constructors draw their own inits (on the GPU under zero.Init): keep the generators as
    # they were, so that `random_init` draws what a one-process run draws.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    want = engine_dtype(ds_config, dtype)
    # DeepSpeed (0.19) honours an explicit zero.Init dtype only where its accelerator reports fp16
    # support (an operator-precedence slip in Init._set_dtype): on a CPU without it every parameter
    # is built in bf16. Without a dtype it takes the config's (bf16, fp16, else fp32): pass none
    # when that is the one wanted, and check what was built either way.
    implied = (torch.bfloat16 if ds_config.get("bf16", {}).get("enabled")
               else torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    with torch.random.fork_rng(devices=devices), deepspeed.zero.Init(
        config_dict_or_path=ds_config, dtype=None if want == implied else want
    ):
        model = Mixtral(config)
    unpartitioned = [n for n, p in model.named_parameters() if not is_partitioned(p)]
    if unpartitioned:
        raise RuntimeError(f"zero.Init left parameters whole: {unpartitioned[:3]}")
    built = {p.ds_tensor.dtype for p in model.parameters()}
    if built != {want}:
        raise RuntimeError(f"zero.Init built the partitions in {sorted(map(str, built))}, not {want}: set "
                           f"model.dtype to match the DeepSpeed config's bf16/fp16 setting")
    size_zero3_buffers(ds_config, model)
    return model


def size_zero3_buffers(ds_config: dict, model: Mixtral) -> None:
    """DeepSpeed's ZeRO-3 buffer and gather sizes for this model (values the config sets are kept).

    DeepSpeed's defaults are absolute numbers of elements: up to 1e9 gathered elements stay live, a
    weight stays whole between two uses less than 1e9 gathered elements apart, gradients are
    reduced through a 5e8-element bucket. For Mixtral-8x7B (1.45e9 elements a decoder layer) the
    first two are less than a layer; for a model of under 1e9 elements they keep every weight whole
    from its first use in the forward to its last in the backward, the whole model in every process
    (measured, bench/bench_zero3_memory.py: 2.3x the checkpoint's bytes per process with 2
    processes), and the 5e8-element bucket alone is 2 GB in fp32. Here, in units of this model:
    one decoder layer live and kept for reuse (with activation checkpointing a layer's recomputed
    forward and its backward use the same gather), parameters gathered one at a time, and
    accelerate's `auto` sizes for the buckets (hidden^2; 0.9 hidden^2 prefetched; weights under
    10 hidden elements stay whole).
    """
    zero = ds_config["zero_optimization"]
    layer = max(parameter_count(layer.parameters()) for layer in model.layers)
    hidden = model.config.hidden_size
    zero.setdefault("stage3_max_live_parameters", layer)
    zero.setdefault("stage3_max_reuse_distance", layer)
    zero.setdefault("stage3_allgather_sequential", True)
    zero.setdefault("reduce_bucket_size", hidden * hidden)
    zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)


def own_range(param: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): the elements of the flattened whole parameter this rank's partition holds."""
    size = param.ds_tensor.ds_numel
    lo = size * dist.get_rank(group=param.ds_process_group)
    return min(lo, param.ds_numel), min(lo + size, param.ds_numel)


def _piece_range(native_shape: torch.Size, piece: str, expert: int | None) -> tuple[int, tuple[int, ...]]:
    """(first element, shape) of a name-table piece inside its flattened native parameter."""
    if piece in ("all", "stack"):
        return 0, tuple(native_shape)
    experts, rows, cols = native_shape  # gate_up_proj [E, 2F, H] or down_proj [E, H, F]
    if piece == "w2":
        return expert * rows * cols, (rows, cols)
    half = rows // 2  # w1 = rows [:F] of expert e, w3 = rows [F:]
    return expert * rows * cols + (half * cols if piece == "w3" else 0), (half, cols)


def load_partitions(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Fill this rank's partition of every parameter from an HF Mixtral checkpoint dir.

    Checks as `model.checkpoint.load_weights` does (names, shapes, layer and expert ids against
    config.json, every element of every parameter written exactly once); reads about 1/W of the
    checkpoint's bytes on each of W ranks.
    """
    path = Path(checkpoint)
    config = model.config
    params = dict(model.named_parameters())
    whole = [n for n, p in params.items() if not is_partitioned(p)]
    if whole:
        raise ValueError(f"load_partitions: {whole[:3]} are not ZeRO-3 partitioned; build with build_partitioned")
    filled: dict[str, list[tuple[int, int, str]]] = {name: [] for name in params}
    staging = torch.empty(READ_CHUNK_BYTES, dtype=torch.uint8)
    bounce = torch.empty(0)  # CPU landing buffer when partitions live on a GPU
    for file in weight_files(path):
        where = str(path / file)
        fd = os.open(path / file, os.O_RDONLY)
        try:
            for hf_name, stored in read_safetensors_header(path / file).items():
                target = hf_to_native(hf_name, where=where)
                if target.layer is not None and target.layer >= config.num_hidden_layers:
                    raise ValueError(f"{where}: tensor {hf_name} is for layer {target.layer}, but config.json "
                                     f"has num_hidden_layers={config.num_hidden_layers}")
                if target.expert is not None and target.expert >= config.num_local_experts:
                    raise ValueError(f"{where}: tensor {hf_name} is for expert {target.expert}, but config.json "
                                     f"has num_local_experts={config.num_local_experts}")
                param = params[target.native]
                start, shape = _piece_range(param.ds_shape, target.piece, target.expert)
                if tuple(stored.shape) != shape:
                    raise ValueError(f"{where}: tensor {hf_name} has shape {list(stored.shape)}, but config.json "
                                     f"implies {list(shape)}; the checkpoint and its config.json disagree")
                stop = start + math.prod(shape)
                filled[target.native].append((start, stop, hf_name))
                lo, hi = own_range(param)
                a, b = max(start, lo), min(stop, hi)
                if a >= b:
                    continue  # another rank's bytes: never read
                dest = param.ds_tensor.data[a - lo:b - lo]  # [b - a], contiguous
                if dest.device.type != "cpu":
                    if bounce.numel() < b - a or bounce.dtype != dest.dtype:
                        bounce = torch.empty(b - a, dtype=dest.dtype)
                    read_into(fd, stored.elements(a - start, b - start), bounce[:b - a], staging, f"{where}: {hf_name}")
                    dest.copy_(bounce[:b - a])
                else:
                    read_into(fd, stored.elements(a - start, b - start), dest, staging, f"{where}: {hf_name}")
        finally:
            os.close(fd)
    for name, pieces in filled.items():
        _check_coverage(path, name, sorted(pieces), params[name].ds_numel)


def _check_coverage(path: Path, name: str, pieces: list[tuple[int, int, str]], numel: int) -> None:
    """The checkpoint's pieces of one native parameter tile it exactly: nothing missing, nothing twice."""
    end = 0
    for start, stop, hf_name in pieces:
        if start < end:
            raise ValueError(f"{path}: tensor {hf_name} fills part of {name} that another tensor already filled")
        if start > end:
            raise ValueError(f"{path}: checkpoint is missing part of {name} (elements {end}..{start - 1}); "
                             f"the HF names that fill it are in model/checkpoint.py NAME_TABLE")
        end = stop
    if end != numel:
        rules = [r.hf for r in NAME_TABLE if r.native.split(".")[-1] == name.split(".")[-1]]
        raise ValueError(f"{path}: checkpoint is missing {name} (elements {end}..{numel - 1}; stored as {rules[:3]})")


def random_init(config: MixtralConfig, dtype: torch.dtype, ds_config: dict | None,
                save_to: Path | None = None) -> Mixtral:
    """A random-init model (model.preset), the same on every rank and for every launch.

    Built on the meta device and drawn parameter by parameter (`Mixtral.init_weights` order, fp32,
    on the CPU, then cast): a one-process run and a ZeRO-3 run draw the same numbers. Under ZeRO-3
    (`ds_config`) each rank keeps its slices of those draws. ``save_to``: also write the weights
    there as an HF checkpoint (the base the adapter is trained on), one tensor at a time.
    """
    if ds_config is None:
        model = Mixtral(config, device="meta").to_empty(device="cpu")
        model.init_weights()
        model = model.to(dtype)
        if save_to is not None:
            save_pretrained(model, save_to)
        return model
    model = build_partitioned(config, ds_config, dtype)
    draws = _drawn_partitions(model)
    if save_to is None:
        for _ in draws:
            pass
    else:
        save_pretrained(Mixtral(config, device="meta"), save_to, dtype=dtype, native_tensors=draws)
    return model


def _drawn_partitions(model: Mixtral) -> Iterator[tuple[str, torch.Tensor]]:
    """Draw each parameter whole, keep this rank's slice, and hand on (name, whole draw)."""
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        whole = torch.empty(param.ds_shape, dtype=torch.float32)
        init_parameter(name, whole, std)
        lo, hi = own_range(param)
        with torch.no_grad():
            param.ds_tensor.data[:hi - lo].copy_(whole.view(-1)[lo:hi])
        yield name, whole


def match_engine_dtype(model: nn.Module, ds_config: dict) -> None:
    """Cast the parameters zero.Init did not build (LoRA adapters) to the engine's dtype, as the
    engine does for a model it partitions itself (it skips the cast for a zero.Init model).

    Each cast parameter keeps the dtype it was built with as `built_dtype`: the trainer saves the
    fp32 master copy in that dtype (`parallel.master_or_module_copy`), not the engine's bf16 copy."""
    dtype = engine_dtype(ds_config, torch.float32)
    if dtype == torch.float32:
        return
    for param in model.parameters():
        if not is_partitioned(param) and param.is_floating_point():
            param.built_dtype = param.dtype
            param.data = param.data.to(dtype)


def checkpoint_loader(dtype: torch.dtype, place: ExpertPlacement | None, ds_config: dict | None,
                      quantization: str | None = None) -> Callable[..., nn.Module]:
    """``load(path, adapter=None)`` -> the Mixtral checkpoint at ``path`` as this run holds it: this
    rank's experts (EP, `place` with more than one rank), or ZeRO-3 partitions (`ds_config`), or
    whole; `quantization` ("nf4"): the QLoRA base, each weight quantized as soon as it is read (on
    this process's GPU where there is one: bitsandbytes' CPU quantizer runs at ~25M values/s per core).

    ``adapter``: a PEFT adapter trained on the full-precision base, merged in fp32 (DPO's SFT
    adapter). Under `quantization` the merge is streamed into the 4-bit base
    (`adapter_merge.load_merged`: each weight merged, cast and quantized on the quantization device
    in turn), so the merged model never exists whole in `dtype` (93 GB at Mixtral-8x7B in bf16)."""
    if ds_config is None or (place is not None and place.ep_size > 1):
        quantize_device = quantization_device() if quantization is not None else None
        sharded = place is not None and place.ep_size > 1

        def load_whole_or_experts(path, adapter=None):
            if adapter is not None and quantization is not None:
                from pipeline.adapter_merge import load_merged
                from pipeline.run_record import Source

                return load_merged(Source(Path(path), [Path(adapter)], [], {}), dtype=dtype,
                                   on_meta=(lambda model: shard_experts(model, place)) if sharded else None,
                                   quantization=quantization, quantize_device=quantize_device)
            options = dict(dtype=dtype, quantization=quantization, quantize_device=quantize_device)
            model = load_local_experts(path, place, **options) if sharded else load_pretrained(path, **options)
            return model if adapter is None else merge_adapter_fp32(model, adapter)

        return load_whole_or_experts
    if quantization is not None:
        raise ValueError("a 4-bit base is not partitioned by ZeRO-3 (pipeline/preflight.py refuses the pairing)")

    def load(path, adapter=None):
        model = build_partitioned(MixtralConfig.from_hf(Path(path) / "config.json"), ds_config, dtype)
        load_partitions(model, path)
        return model if adapter is None else merge_adapter_fp32(model, adapter)

    return load


def quantization_device() -> torch.device:
    """Where a QLoRA base is quantized and kept: this process's GPU (accelerate's), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


EXPERT_LORA_TENSORS = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")


def merge_adapter_fp32(base: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """``base`` with the PEFT adapter in ``adapter_dir`` merged: W = cast(fp32(W) + fp32(s * B A)).

    DPO's merge of the SFT adapter into a base it holds as it trains (this rank's experts, ZeRO-3
    partitions or 4-bit). PEFT's own merge adds a delta already rounded to the weight dtype (two
    roundings in bf16); this sums in fp32 with `model.lora.add_lora_delta`, export's and eval's
    merge, and rounds once. Expert tensors of an adapter trained on all experts are cut to the
    experts ``base`` holds (``base.expert_ids``).
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    # Registers the expert LoRA layer with PEFT before the config builds the adapter.
    from model import lora, quant

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {adapter_dir} holds no PEFT adapter (safetensors)")
    state = load_file(str(path))
    keep = torch.tensor(base.expert_ids)
    for name in list(state):
        if name.rsplit(".", 1)[-1] in EXPERT_LORA_TENSORS and state[name].shape[0] != len(keep):
            state[name] = state[name][keep]  # [E, ...] -> [El, ...]
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    peft_model = get_peft_model(base, config)
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise ValueError(f"{path}: tensors the model has no place for: {result.unexpected_keys[:3]}")
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and quant.is_nf4_linear(module.get_base_layer()):
                _merge_into_nf4_linear(module)
                continue
            if not isinstance(module, lora.ExpertLoraLayer | LoraLinear):
                continue
            # ZeRO-3: this layer's weights whole for the merge, then partitioned again.
            with gathered(module.get_base_layer().parameters()):
                if isinstance(module, lora.ExpertLoraLayer):
                    module.merge()  # per expert, summed in fp32 (model/lora.py)
                    continue
                weight = module.get_base_layer().weight
                merged = weight.to(torch.float32, copy=True)  # [out, in]
                _add_linear_deltas(module, merged)
                weight.copy_(merged.to(weight.dtype))
    # The deltas are in the weights now: drop the adapter layers without merging them again.
    return peft_model.unload()


def _merge_into_nf4_linear(module) -> None:
    """A PEFT LoRA layer over a 4-bit Linear4bit: W = quantize(cast(fp32(dequantize(W)) + fp32(s * B A)))."""
    from model import quant

    base = module.get_base_layer()
    weight = quant.dequantize_linear(base)
    merged = weight.to(torch.float32, copy=True)
    _add_linear_deltas(module, merged)
    base.weight = quant.nf4_linear(merged.to(weight.dtype)).weight


def _add_linear_deltas(module, merged: torch.Tensor) -> None:
    """In place on the fp32 copy of a PEFT LoRA Linear's weight: every active adapter's delta, by
    `model.lora.add_lora_delta` (export's and eval's merge)."""
    from model.lora import add_lora_delta

    for adapter in module.active_adapters:
        parts = {"A": module.lora_A[adapter].weight, "B": module.lora_B[adapter].weight}  # [R, in], [out, R]
        add_lora_delta(merged, {k: v.float().to(merged.device) for k, v in parts.items()}, module.scaling[adapter])


def gathered(params) -> contextlib.AbstractContextManager:
    """Within: the given ZeRO-3 parameters whole on every rank (a collective); changes made on rank 0
    are kept (every rank should make the same ones). A no-op for parameters that are not partitioned."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextlib.contextmanager
def forward_gathers(model: nn.Module):
    """Forwards of a ZeRO-3 partitioned model before DeepSpeed's engine (whose hooks come with
    `prepare`) exists: each module gathers its own parameters before its forward and releases them
    after, a ZeRO-3 leaf module (the MoE block, `parallel.apply`) all of its parameters at once.
    No gradients. Every rank must run the same forwards (each gather is a collective). A no-op for a
    model without partitioned parameters."""
    if not any(is_partitioned(p) for p in model.parameters()):
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import z3_leaf_module

    handles = []
    open_contexts: dict[int, list] = {}

    def hook(module, recurse):
        external = [p for _, p in module.ds_external_parameters()] if hasattr(module, "ds_external_parameters") else []
        params = [p for p in [*module.parameters(recurse=recurse), *external] if is_partitioned(p)]

        def pre(mod, args):
            # A weight an enclosing module has gathered already (its external parameter) stays as it is.
            context = deepspeed.zero.GatheredParameters(
                [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE])
            context.__enter__()
            open_contexts.setdefault(id(mod), []).append(context)

        def post(mod, args, output):
            open_contexts[id(mod)].pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    def visit(module):
        if z3_leaf_module(module):
            hook(module, recurse=True)
            return
        if any(is_partitioned(p) for p in module.parameters(recurse=False)) or hasattr(module, "ds_external_parameters"):
            hook(module, recurse=False)
        for child in module.children():
            visit(child)

    visit(model)
    try:
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


def trainable_state_dict(model: nn.Module, dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """The trainable parameters whole, on the CPU of rank 0 ({} elsewhere); every rank must call.

    Gathers one parameter at a time, and only trainable ones: a LoRA run's end never makes the frozen
    base whole anywhere (DeepSpeed's own 16-bit consolidation gathers every parameter onto rank 0).
    A parameter DeepSpeed cast for mixed precision comes from its fp32 master copy, in the dtype the
    stage built it with (`dtypes`; `parallel.master_or_module_copy`).
    """
    import deepspeed

    from pipeline.distributed.parallel import master_or_module_copy

    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (dtypes or {}).get(name, param.dtype) != param.dtype:
            tensor = master_or_module_copy(name, param, dtypes)  # whole on every rank
            if dist.get_rank() == 0:
                out[name] = tensor.to("cpu", copy=True)
            continue
        with deepspeed.zero.GatheredParameters([param]):
            if dist.get_rank() == 0:
                out[name] = param.detach().to("cpu", copy=True)
    return out

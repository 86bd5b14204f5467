"""Hugging Face safetensors checkpoints <-> the native model, through one name table.

HF layouts read: per-expert (`block_sparse_moe.experts.{e}.w1/w2/w3`, as released and as
transformers writes by default) and transformers 5's fused (`mlp.experts.gate_up_proj/down_proj`).
Written: the per-expert layout, sharded, with `model.safetensors.index.json`.

    model = load_pretrained(path, dtype=torch.bfloat16)   # or load_weights(model, path) into one built here
    save_pretrained(model, out_dir, max_shard_size="5GB")

The shard plan (`hf_plan`, `plan_shards`, `shard_index`), `generation_config` and `write_json` are
also what pipeline/export writes with: one definition of the files a checkpoint and an export share.

This module reads and writes a `Mixtral` it is given (or builds one on the meta device); the model
never imports it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import DTYPE_NAMES, MixtralConfig
from model.transformer import Mixtral


@dataclass(frozen=True)
class NameRule:
    hf: str  # HF name template ({i} layer, {e} expert)
    native: str  # native parameter template
    piece: str  # "all": whole tensor; "w1"/"w3": rows [:F]/[F:] of expert e; "w2": expert e; "stack": all experts
    export: bool = True  # False: read-only alias (transformers 5 fused names)
    # llama.cpp's GGUF name ({i} layer): the same piece, for every expert at once ([experts, ...]).
    gguf: str | None = None


NAME_TABLE: tuple[NameRule, ...] = (
    NameRule("model.embed_tokens.weight", "embed_tokens.weight", "all", gguf="token_embd.weight"),
    NameRule(
        "model.layers.{i}.input_layernorm.weight",
        "layers.{i}.input_layernorm.weight",
        "all",
        gguf="blk.{i}.attn_norm.weight",
    ),
    NameRule(
        "model.layers.{i}.self_attn.q_proj.weight",
        "layers.{i}.self_attn.q_proj.weight",
        "all",
        gguf="blk.{i}.attn_q.weight",
    ),
    NameRule(
        "model.layers.{i}.self_attn.k_proj.weight",
        "layers.{i}.self_attn.k_proj.weight",
        "all",
        gguf="blk.{i}.attn_k.weight",
    ),
    NameRule(
        "model.layers.{i}.self_attn.v_proj.weight",
        "layers.{i}.self_attn.v_proj.weight",
        "all",
        gguf="blk.{i}.attn_v.weight",
    ),
    NameRule(
        "model.layers.{i}.self_attn.o_proj.weight",
        "layers.{i}.self_attn.o_proj.weight",
        "all",
        gguf="blk.{i}.attn_output.weight",
    ),
    NameRule(
        "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.post_attention_layernorm.weight",
        "all",
        gguf="blk.{i}.ffn_norm.weight",
    ),
    NameRule(
        "model.layers.{i}.block_sparse_moe.gate.weight",
        "layers.{i}.moe.gate.weight",
        "all",
        gguf="blk.{i}.ffn_gate_inp.weight",
    ),
    NameRule(
        "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        "layers.{i}.moe.experts.gate_up_proj",
        "w1",
        gguf="blk.{i}.ffn_gate_exps.weight",
    ),
    NameRule(
        "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
        "layers.{i}.moe.experts.down_proj",
        "w2",
        gguf="blk.{i}.ffn_down_exps.weight",
    ),
    NameRule(
        "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
        "layers.{i}.moe.experts.gate_up_proj",
        "w3",
        gguf="blk.{i}.ffn_up_exps.weight",
    ),
    NameRule("model.norm.weight", "norm.weight", "all", gguf="output_norm.weight"),
    NameRule("lm_head.weight", "lm_head.weight", "all", gguf="output.weight"),
    NameRule("model.layers.{i}.mlp.gate.weight", "layers.{i}.moe.gate.weight", "all", export=False),
    NameRule(
        "model.layers.{i}.mlp.experts.gate_up_proj",
        "layers.{i}.moe.experts.gate_up_proj",
        "stack",
        export=False,
    ),
    NameRule(
        "model.layers.{i}.mlp.experts.down_proj", "layers.{i}.moe.experts.down_proj", "stack", export=False
    ),
)


def _template_regex(template: str) -> re.Pattern:
    return re.compile(
        "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$"
    )


_HF_PATTERNS = [(_template_regex(rule.hf), rule) for rule in NAME_TABLE]


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: native parameter, and the expert / row half it fills."""

    native: str
    piece: str
    layer: int | None
    expert: int | None


def hf_to_native(hf_name: str, where: str = "") -> Target:
    for pattern, rule in _HF_PATTERNS:
        match = pattern.match(hf_name)
        if match:
            groups = match.groupdict()
            layer = int(groups["i"]) if "i" in groups else None
            expert = int(groups["e"]) if "e" in groups else None
            native = rule.native.format(i=layer) if layer is not None else rule.native
            return Target(native, rule.piece, layer, expert)
    raise ValueError(
        f"unknown tensor name {hf_name!r}{' in ' + where if where else ''}: not a Mixtral weight "
        "(known names are the templates in model/checkpoint.py NAME_TABLE)"
    )


_NATIVE_PATTERNS = [(_template_regex(rule.native), rule) for rule in NAME_TABLE if rule.export]


def export_rules(native_name: str, who: str) -> list[tuple[NameRule, str | None]]:
    """The written-name rules of one native parameter, each with its layer index (None outside layers);
    ``who`` names the caller in the error for a parameter the table does not know."""
    rules = []
    for pattern, rule in _NATIVE_PATTERNS:
        match = pattern.match(native_name)
        if match:
            rules.append((rule, match.groupdict().get("i")))
    if not rules:
        raise ValueError(
            f"{who}: unknown native parameter {native_name!r} (see NAME_TABLE in model/checkpoint.py)"
        )
    return rules


def hf_tensors(
    model_or_state_dict, expert_ids: list[int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) one at a time in the per-expert layout (views, no copies).

    Accepts a `Mixtral` (uses its `expert_ids`) or a native state dict (all experts, or `expert_ids`).
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        expert_ids = getattr(model_or_state_dict, "expert_ids", None) if expert_ids is None else expert_ids
        state = model_or_state_dict.state_dict()
    else:
        state = model_or_state_dict
    for native_name, tensor in state.items():
        for rule, layer in export_rules(native_name, "hf_tensors"):
            if rule.piece == "all":
                yield rule.hf.format(i=layer), tensor
                continue
            ids = list(range(tensor.shape[0])) if expert_ids is None else list(expert_ids)
            if len(ids) != tensor.shape[0]:
                raise ValueError(
                    f"hf_tensors: {native_name} holds {tensor.shape[0]} experts but expert_ids={ids}"
                )
            ffn = tensor.shape[1] // 2
            for local, expert in enumerate(ids):
                piece = {"w1": tensor[local, :ffn], "w3": tensor[local, ffn:], "w2": tensor[local]}[
                    rule.piece
                ]
                yield rule.hf.format(i=layer, e=expert), piece


# ---- loading -----------------------------------------------------------------------------


def weight_files(path: Path) -> list[str]:
    """The safetensors files of a checkpoint dir (from its index when sharded), checked to exist."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {path}: {missing}")
        return files
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ValueError(f"{path}: only pickle weights (.bin/.pt) found; convert them to safetensors first")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _expected_pieces(model) -> dict[str, set]:
    """Native name -> the pieces that must be loaded into it (so that nothing stays uninitialised)."""
    expected = {}
    for name, _ in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            expected[name] = {(p, e) for e in model.expert_ids for p in ("w1", "w3")}
        elif name.endswith("experts.down_proj"):
            expected[name] = {("w2", e) for e in model.expert_ids}
        else:
            expected[name] = {("all", None)}
    return expected


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    on_meta: Callable[[Mixtral], object] | None = None,
    quantization: str | None = None,
    quantize_device: str | torch.device | None = None,
) -> Mixtral:
    """The Mixtral of an HF checkpoint dir (config.json + safetensors): built on the meta device,
    allocated once on `device`, then filled shard by shard (`load_weights`).

    `on_meta(model)`: applied to the model on the meta device before anything is allocated, e.g.
    `pipeline.distributed.expert_parallel.shard_experts` keeping one rank's experts: only those are then
    allocated and read. `dtype`: config.json's torch_dtype when None. `quantization`,
    `quantize_device`: see `load_weights`.
    """
    path = Path(path)
    config = MixtralConfig.from_hf(path / "config.json")
    weight_files(path)  # a missing or pickle-only checkpoint fails before anything is allocated
    with torch.device("meta"):
        model = Mixtral(config, dtype=dtype or config.dtype)
    if on_meta is not None:
        on_meta(model)
    model = model.to_empty(device=device)
    load_weights(model, path, quantization=quantization, quantize_device=quantize_device or device)
    return model


def load_weights(model: Mixtral, path: str | Path, *, quantization: str | None = None,
                 quantize_device: str | torch.device | None = None) -> None:
    """Copy an HF checkpoint dir's tensors into `model`'s (allocated) parameters, in place.

    Reads only the experts the model holds (`model.expert_ids`): another rank's experts are never
    read. Raises on an unknown name, a shape, layer or expert id that `model.config` does not
    imply, a tensor filled twice, or one missing.

    `quantization="nf4"` (model/quant.py): each weight QLoRA stores 4-bit is quantized (on
    `quantize_device`, default the weight's device) as soon as its last piece is read and its
    full-precision copy released, so the model never exists whole in its dtype: the peak is the
    4-bit model plus the weights of the file being read that are not yet complete (about one
    layer's expert stack).
    """
    path = Path(path)
    config = model.config
    files = weight_files(path)
    params = dict(model.named_parameters())
    local_of = {e: i for i, e in enumerate(model.expert_ids)}
    ffn = config.intermediate_size
    pending = _expected_pieces(model)
    to_quantize = set()
    if quantization is not None:
        from model import quant

        quant.check_quantization(quantization)
        to_quantize = set(quant.quantized_parameter_names(model))

    def loaded(native: str) -> None:
        if native in to_quantize and not pending[native]:
            quant.quantize_parameter(model, native, quantize_device or params[native].device)
            del params[native]  # the last reference to the full-precision tensor

    with torch.no_grad():
        for file in files:
            with safe_open(str(path / file), framework="pt", device="cpu") as shard:
                for hf_name in shard.keys():
                    target = hf_to_native(hf_name, where=str(path / file))
                    if target.layer is not None and target.layer >= config.num_hidden_layers:
                        raise ValueError(
                            f"{path / file}: tensor {hf_name} is for layer {target.layer}, but config.json "
                            f"has num_hidden_layers={config.num_hidden_layers}"
                        )
                    if target.native not in params:  # complete and quantized already
                        if target.expert is not None and target.expert not in local_of:
                            continue  # another rank's expert: never read
                        raise ValueError(
                            f"{path / file}: tensor {hf_name} fills {target.native}, which other tensors already filled"
                        )
                    param = params[target.native]
                    if target.piece == "stack":
                        halves = ("w1", "w3") if target.native.endswith("gate_up_proj") else ("w2",)
                        sliced = shard.get_slice(hf_name)
                        expected = [config.num_local_experts, *param.shape[1:]]
                        if list(sliced.get_shape()) != expected:
                            _shape_error(hf_name, path / file, expected, sliced.get_shape())
                        _claim(
                            pending,
                            target.native,
                            [(p, e) for e in model.expert_ids for p in halves],
                            hf_name,
                            path / file,
                        )
                        for local, expert in enumerate(model.expert_ids):
                            param[local].copy_(sliced[expert : expert + 1][0])
                        del param
                        loaded(target.native)
                        continue
                    if target.expert is not None:
                        if target.expert >= config.num_local_experts:
                            raise ValueError(
                                f"{path / file}: tensor {hf_name} is for expert {target.expert}, but config.json "
                                f"has num_local_experts={config.num_local_experts}"
                            )
                        if target.expert not in local_of:
                            continue  # another rank's expert: never read
                        local = local_of[target.expert]
                        dest = {"w1": param[local, :ffn], "w3": param[local, ffn:], "w2": param[local]}[
                            target.piece
                        ]
                        key = (target.piece, target.expert)
                    else:
                        dest, key = param, ("all", None)
                    shape = shard.get_slice(hf_name).get_shape()
                    if list(dest.shape) != list(shape):
                        _shape_error(hf_name, path / file, list(dest.shape), shape)
                    _claim(pending, target.native, [key], hf_name, path / file)
                    dest.copy_(shard.get_tensor(hf_name))
                    del dest, param
                    loaded(target.native)
    missing = sorted(
        _hf_name(name, piece, expert) for name, pieces in pending.items() for piece, expert in pieces
    )
    if missing:
        raise ValueError(
            f"{path}: checkpoint is missing {len(missing)} tensor(s) that config.json implies, "
            f"e.g. {missing[:4]}"
        )
    if quantization is not None:
        quant.mark_quantized(model, quantization)


def _hf_name(native: str, piece: str, expert: int | None) -> str:
    for rule in NAME_TABLE:
        match = _template_regex(rule.native).match(native)
        if rule.export and match and rule.piece == piece:
            return rule.hf.format(i=match.groupdict().get("i"), e=expert)
    raise AssertionError(f"no export rule for {native} {piece}")


def _claim(pending: dict[str, set], native: str, keys: list, hf_name: str, file: Path) -> None:
    for key in keys:
        if key not in pending[native]:
            raise ValueError(
                f"{file}: tensor {hf_name} fills {native} {key}, which another tensor already filled"
            )
        pending[native].discard(key)


def _shape_error(hf_name: str, file: Path, expected, got) -> None:
    raise ValueError(
        f"{file}: tensor {hf_name} has shape {list(got)}, but config.json implies {list(expected)}; "
        "the checkpoint and its config.json disagree"
    )


# ---- shard plans and the files beside them (shared with pipeline/export) ---------------------

_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: want an int of bytes or e.g. '5GB', '500MB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclass
class TensorPlan:
    """One tensor as it will be written: name, shape and bytes in the written dtype."""

    name: str
    shape: tuple[int, ...]
    nbytes: int


def hf_plan(model_or_state_dict, dtype: torch.dtype) -> list[TensorPlan]:
    """Every HF tensor (per-expert layout, `hf_tensors` order) as written in `dtype`, from shapes
    alone: a model or state dict on the meta device plans as well as a real one."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [TensorPlan(n, tuple(t.shape), t.numel() * itemsize) for n, t in hf_tensors(model_or_state_dict)]


def plan_shards(entries: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy, in order: a new shard when the next tensor would pass the limit (as transformers does)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(n: int, prefix: str = "model") -> list[str]:
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def shard_index(shards: list[list[TensorPlan]], file_names: list[str]) -> dict:
    """The content of model.safetensors.index.json for these shards (written when there are two or more)."""
    return {
        "metadata": {"total_size": sum(e.nbytes for shard in shards for e in shard)},
        "weight_map": {e.name: file_names[k] for k, shard in enumerate(shards) for e in shard},
    }


def generation_config(config: MixtralConfig, transformers_version: str | None = None) -> dict:
    """generation_config.json: the special tokens; the export also names the transformers version
    of the released file it reproduces."""
    generation = {
        "_from_model_config": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }
    if transformers_version is not None:
        generation["transformers_version"] = transformers_version
    return generation


def write_json(path: Path, data: dict, *, sort_keys: bool = False) -> None:
    """Every JSON file the pipeline writes (checkpoint and export configs, training state, run
    records): 2-space indent, UTF-8 text, trailing newline; written beside ``path`` and renamed onto
    it, so a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---- saving ------------------------------------------------------------------------------


def save_pretrained(
    model: Mixtral,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    native_tensors: Iterator[tuple[str, torch.Tensor]] | None = None,
) -> None:
    """config.json, generation_config.json and per-expert safetensors shards (+ index), written to
    a temporary directory next to `path` and renamed into place; an existing `path` is replaced.

    `native_tensors`: the values, as (native name, whole tensor) in `model.state_dict()` order, for
    a `model` that only gives the names and shapes (built on the meta device): each tensor is
    copied into its shard as it arrives, so the caller may produce them one at a time.
    """
    path = Path(path)
    limit = parse_size(max_shard_size)
    if model.expert_ids != list(range(model.config.num_local_experts)):
        raise ValueError(
            "save_pretrained: this model holds only some experts; gather all experts before saving"
        )
    dtype = dtype or next(model.parameters()).dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"save_pretrained: dtype {dtype} is not one of {list(DTYPE_NAMES)}")

    # Plan the shards from shapes alone, so only one shard's tensors are ever copied at a time.
    shards = plan_shards(hf_plan(model, dtype), limit)
    file_names = shard_file_names(len(shards))

    tmp = new_temp_dir(path)
    try:
        config = model.config.to_hf()
        config["torch_dtype"] = DTYPE_NAMES[dtype]
        write_json(tmp / "config.json", config, sort_keys=True)
        write_json(tmp / "generation_config.json", generation_config(model.config))
        if native_tensors is None:
            pieces = hf_tensors(model)
        else:
            pieces = (piece for name, tensor in native_tensors for piece in hf_tensors({name: tensor}))
        order = iter([(k, entry.name) for k, shard in enumerate(shards) for entry in shard])
        data: dict[str, torch.Tensor] = {}
        for name, tensor in pieces:
            k, planned = next(order, (None, None))
            if name != planned:
                raise ValueError(f"save_pretrained: got tensor {name} where the plan expects {planned}")
            # clone: w1/w3 views share storage, which safetensors refuses to write.
            data[name] = tensor.detach().to("cpu", dtype).clone()
            if len(data) == len(shards[k]):
                save_file(data, str(tmp / file_names[k]), metadata={"format": "pt"})
                data = {}
        missing = next(order, None)
        if missing is not None:
            raise ValueError(f"save_pretrained: no tensor arrived for {missing[1]}")
        if len(shards) > 1:
            write_json(tmp / "model.safetensors.index.json", shard_index(shards, file_names))
        make_readable(tmp)  # safetensors writes 0600
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def new_temp_dir(out: Path) -> Path:
    """An empty sibling of ``out`` to write into, then `publish_dir`, with the modes a plain mkdir
    gives under the umask (mkdtemp makes it 0700; checkpoints and exports are for others to read)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(tree: Path) -> None:
    """Modes a plain ``mkdir``/``open`` would give under the umask (0755 / 0644 with the usual 022):
    temp dirs and some writers (safetensors) create 0700 / 0600."""
    mask = current_umask()
    tree.chmod(0o777 & ~mask)
    for path in tree.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename a finished temp dir to ``out``; an existing ``out`` is moved aside first, then deleted,
    so ``out`` is at every moment either the old complete dir or the new one."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)

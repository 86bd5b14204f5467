"""DPO reference log-probs computed once before training and cached next to the dataset, in
``<data.output_dir>/ref_logps/``, keyed by a hash of the reference weights and the dataset
fingerprints; training then runs no reference forward.

Every rank scores its share of the pairs (expert parallelism: the same number of forwards on every
rank), the main process writes the cache atomically and every rank reads it back.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.distributed import sharded_load
from pipeline.distributed.comm import group_device
from pipeline.training.batches import collate_pairs
from pipeline.training.dpo_loss import split_pairs
from pipeline.training.tasks import Reference

REF_CACHE_DIR = "ref_logps"


def from_main_process(value, accelerator):
    """The main process's ``value`` on every rank (what it found on disk, its weights' hash)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def reference_fingerprint(model: nn.Module, accelerator=None) -> str:
    """sha256 of the reference weights: every base parameter, none of the trainable adapters.

    PEFT's trainable copies (``lora_*``, ``modules_to_save``) are left out: with the adapters
    disabled the model computes with the other tensors only. A ZeRO-3 partitioned parameter holds
    only this rank's slice: each rank hashes its slices and the ranks' hashes are hashed together
    (a collective: every rank calls with the ``accelerator``).
    """
    digest = hashlib.sha256()
    params = dict(model.named_parameters())
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or "modules_to_save" in name:
            continue
        tensor = getattr(params.get(name), "ds_tensor", tensor)
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    if accelerator is None or not any(sharded_load.is_partitioned(p) for p in params.values()):
        return digest.hexdigest()
    from accelerate.utils import gather_object

    return hashlib.sha256("|".join(gather_object([digest.hexdigest()])).encode()).hexdigest()


def ref_cache_path(data_dir: str | os.PathLike, split: str, dataset, model_key: str, autocast: str) -> Path:
    key = hashlib.sha256(f"{model_key}|{dataset._fingerprint}|{len(dataset)}|{autocast}".encode()).hexdigest()
    return Path(data_dir) / REF_CACHE_DIR / f"{split}-{key[:24]}.safetensors"


def rank_block(n: int, rank: int, world: int) -> list[int]:
    """Row indices rank ``rank`` of ``world`` scores: its contiguous ceil(n / world) block, padded
    with its last row (row 0 if it has none) so that every rank has the same count."""
    block = -(-n // world)
    mine = list(range(min(rank * block, n), min((rank + 1) * block, n)))
    return mine + [mine[-1] if mine else 0] * (block - len(mine))


@torch.no_grad()
def compute_reference_log_probs(
    policy: nn.Module, reference: Reference, dataset, batch_size: int, autocast=None, accelerator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) reference log-probs of every pair, in dataset order.

    With an ``accelerator`` of P processes, every rank scores a contiguous block of ceil(N / P) pairs
    and the blocks are gathered: P times faster under data parallelism, and under expert parallelism
    (a forward is a collective there) every rank runs the same number of forwards, a short block
    being padded with its own last row (or row 0) whose result is dropped.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    n = len(dataset)
    padded = rank_block(n, rank, world)
    block = len(padded)
    chosen, rejected = [], []
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    for start in range(0, block, batch_size):
        rows = [dataset[i] for i in padded[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_pairs(rows).items()}
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            c, r = split_pairs(reference(policy, batch))
        chosen.append(c.float())
        rejected.append(r.float())
    policy.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)  # [block] each
    if world > 1:
        device = group_device()
        chosen, rejected = accelerator.gather(chosen.to(device)), accelerator.gather(rejected.to(device))  # [P * block]
    return chosen[:n].cpu(), rejected[:n].cpu()


def attach_reference_log_probs(
    dataset,
    split: str,
    *,
    policy: nn.Module,
    reference: Reference,
    data_dir: str,
    model_key: str,
    batch_size: int,
    accelerator,
):
    """The dataset with ref_chosen_logps/ref_rejected_logps columns, from the cache or computed now.

    Every rank scores its share of the pairs, the main process writes the cache (atomically) and
    the others read it. The main process's file check decides for all, so no rank starts forwards
    (collectives under expert parallelism) that the others skip.
    """
    from safetensors.torch import load_file, save_file

    path = ref_cache_path(data_dir, split, dataset, model_key, str(accelerator.mixed_precision))
    missing = from_main_process(not path.is_file(), accelerator)
    if missing:
        chosen, rejected = compute_reference_log_probs(
            policy, reference, dataset, batch_size, autocast=accelerator.autocast, accelerator=accelerator
        )
    if missing and accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file({"chosen": chosen, "rejected": rejected}, str(tmp), metadata={"model_key": model_key})
        os.replace(tmp, path)
        accelerator.print(f"dpo: reference log-probs of {len(dataset)} {split} pairs cached in {path}")
    accelerator.wait_for_everyone()
    cached = load_file(str(path))
    if cached["chosen"].shape[0] != len(dataset):
        raise ValueError(
            f"{path}: {cached['chosen'].shape[0]} cached pairs for {len(dataset)} rows; delete it"
        )
    dataset = dataset.add_column("ref_chosen_logps", cached["chosen"].tolist())
    return dataset.add_column("ref_rejected_logps", cached["rejected"].tolist())

"""Host syncs of a training step on the accelerator code path, counted on the CPU (host_syncs.py).

The accelerator path is forced with every experts module's `use_grouped_mm = True` (what CUDA runs:
`torch._grouped_mm` on padded groups, whole-tensor SwiGLU, LoRA's grouped products); attention
runs the CPU's per-document kernel, whose layout is built like the others (`batch_layout`).
What must hold: no sync inside a layer, forward or backward (the same count with 2 and with 4
layers, none in backward), and a small fixed number per step: the batch layout (one read) and the
labelled tokens of the loss (one nonzero).
"""

import pytest
import torch
import torch.distributed as dist
from host_syncs import HostSyncs
from packed_batches import packed_rows, preference_rows

from model import Mixtral, MixtralConfig
from model.attention import batch_layout
from model.moe import MixtralExperts

PER_STEP = {"tolist": 1, "nonzero": 1}  # batch_layout's one read, chunked_lm_loss's labelled tokens


def accelerator_model(num_layers: int, lora: bool = False) -> torch.nn.Module:
    cfg = MixtralConfig.preset("tiny")
    cfg.num_hidden_layers, cfg.vocab_size = num_layers, 300
    torch.manual_seed(0)
    model = Mixtral(cfg)
    if lora:
        from model.lora import apply_lora

        model = apply_lora(model, r=4, alpha=8)
    for module in model.modules():
        if isinstance(module, MixtralExperts):
            module.use_grouped_mm = True
    return model


def sft_step_syncs(model) -> tuple[HostSyncs, HostSyncs]:
    ids, docs, positions, labels = packed_rows()
    with HostSyncs() as forward:
        out = model(input_ids=ids, position_ids=positions, document_ids=docs, labels=labels, loss_reduction="sum", logits_chunk_size=16)
        loss = out.loss + 0.02 * out.aux_loss + 0.001 * out.z_loss
    with HostSyncs() as backward:
        loss.backward()
    # read after the step: every layer routed the real tokens top-2
    assert out.expert_counts.sum(1).tolist() == [2 * int((docs >= 0).sum())] * out.expert_counts.shape[0]
    return forward, backward


@pytest.mark.parametrize("lora", [False, True])
def test_sft_step_has_no_host_sync_per_layer(lora):
    counts = {layers: sft_step_syncs(accelerator_model(layers, lora)) for layers in (2, 4)}
    for forward, backward in counts.values():
        assert dict(forward.counts) == PER_STEP
        assert backward.total == 0, dict(backward.counts)


def test_dpo_step_has_no_host_sync_per_layer():
    from pipeline.recipe import DPOSection
    from pipeline.training.batches import collate_pairs
    from pipeline.training.tasks import DPOTask, Reference

    batch = collate_pairs(preference_rows())
    totals = {}
    for layers in (2, 4):
        model = accelerator_model(layers, lora=True)
        task = DPOTask(DPOSection(), aux_coef=0.02, z_coef=0.0, reference=Reference(None), logits_chunk_size=8)
        with HostSyncs() as forward:
            out = task.forward(model, batch)
        with HostSyncs() as backward:
            (out.loss_sum + out.extra).backward()
        assert backward.total == 0, dict(backward.counts)
        totals[layers] = dict(forward.counts)
    # Policy and reference forwards (a layout and a loss each) and the task's token count (int()).
    assert totals[2] == totals[4] == {"tolist": 2, "nonzero": 2, "item/int/bool/float": 1}


@pytest.mark.parametrize("backend", ["sdpa", "varlen", "flex"])
def test_batch_layout_reads_the_host_once(backend):
    _, docs, _, _ = packed_rows()
    with HostSyncs() as syncs:
        layout = batch_layout(*docs.shape, torch.device("cpu"), docs, None, backend)
    assert not isinstance(layout.attention, torch.Tensor)
    assert dict(syncs.counts) == {"tolist": 1}


@pytest.fixture
def one_process_group():
    """A gloo group of one process: the expert-parallel dispatch runs its all_to_all path with ep=1."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_expert_parallel_step_has_one_host_sync_per_layer(one_process_group):
    """Uneven all_to_all needs the exchanged counts on the host: exactly one read per MoE layer
    in forward, none in backward, on top of the step's PER_STEP."""
    from pipeline.distributed.expert_parallel import ExpertPlacement, install_dispatch

    per_layers = {}
    for layers in (2, 4):
        model = accelerator_model(layers)
        install_dispatch(model, ExpertPlacement(model.config.num_local_experts, 1, 0), one_process_group)
        forward, backward = sft_step_syncs(model)
        assert backward.total == 0, dict(backward.counts)
        per_layers[layers] = forward.total - sum(PER_STEP.values())
    assert per_layers == {2: 2, 4: 4}

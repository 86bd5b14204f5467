"""Regional compilation (`Mixtral.compile_blocks`, recipe key `model.compile`): each decoder layer is
one graph on the accelerator path, and a compiled step computes what the eager one does.

The accelerator path is what CUDA runs: bf16 (torch._grouped_mm's meta kernel, which tracing uses,
takes bf16 only), every experts module's `use_grouped_mm = True`, attention through varlen (with the
CPU stand-in kernel of conftest.py) or FlexAttention (forward only: it has no CPU backward).
"""

import contextlib
import warnings

import pytest
import torch
from test_host_syncs import accelerator_model, packed_rows

from model.attention import BucketLayout, rope_cos_sin


def bf16_accelerator_model(num_layers: int, lora: bool):
    model = accelerator_model(num_layers)
    if lora:
        from model.lora import apply_lora

        model = apply_lora(model, r=8, alpha=16)  # r 8: bf16 rows of 16 bytes, as torch._grouped_mm needs
    return model.to(torch.bfloat16)


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_a_decoder_layer_is_one_graph_on_the_accelerator_path(backend, lora, request):
    if backend == "varlen":
        request.getfixturevalue("varlen_on_cpu")
    model = base_of(bf16_accelerator_model(2, lora))
    model.attention_backend = backend
    ids, docs, positions, _ = packed_rows()
    layout = model.batch_layout(ids, docs)  # outside the layers: host reads allowed
    h = model.embed_tokens(ids)
    cos, sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta, h.dtype)
    torch._dynamo.reset()
    # FlexAttention has no backward on the CPU: trace its forward without autograd.
    with torch.no_grad() if backend == "flex" else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = torch._dynamo.explain(model.layers[0])(h, cos, sin, layout)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def step(model, rows, checkpointing=False):
    """Loss and every trainable parameter's gradient after one forward + backward."""
    ids, docs, positions, labels = rows
    base_of(model).gradient_checkpointing = checkpointing
    model.zero_grad()
    out = model(input_ids=ids, position_ids=positions, document_ids=docs, labels=labels,
                loss_reduction="sum", logits_chunk_size=16)
    (out.loss + 0.02 * out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(got, want, tol):
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name].float(), grad.float(), atol=tol, rtol=tol, msg=name)


def test_compiled_layers_train_like_eager_on_the_accelerator_path(varlen_on_cpu):
    """LoRA on attention and experts, bf16, varlen attention, torch._grouped_mm; with and without
    activation checkpointing."""
    rows = packed_rows()
    model = bf16_accelerator_model(2, lora=True)
    base_of(model).attention_backend = "varlen"
    want = step(model, rows)
    torch._dynamo.reset()
    base_of(model).compile_blocks(backend="aot_eager")
    for checkpointing in (False, True):
        assert_same_step(step(model, rows, checkpointing), want, tol=2e-2)


def test_compiled_layers_on_the_cpu_keep_the_bucketed_attention_eager():
    """The CPU's default path: buckets change every batch, so their attention runs outside the graph."""
    rows = packed_rows()
    model = accelerator_model(2)
    for module in model.modules():
        if hasattr(module, "use_grouped_mm"):
            module.use_grouped_mm = None  # the CPU kernels
    want = step(model, rows)
    torch._dynamo.reset()
    model.compile_blocks(backend="eager")  # graphs run as traced: this checks the cut, not a compiler
    layout = model.batch_layout(rows[0], rows[1])
    assert isinstance(layout.attention, BucketLayout) and hasattr(layout.attention.attend, "__wrapped__")
    assert_same_step(step(model, rows), want, tol=1e-5)

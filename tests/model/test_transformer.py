import pytest
import torch

from model import Mixtral, MixtralConfig
from model.attention import build_attention_mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny-odd")
    cfg.vocab_size = 500
    cfg.initializer_range = 0.1
    return Mixtral(cfg)


def test_packed_row_equals_documents_alone(model):
    torch.manual_seed(1)
    a = torch.randint(0, 500, (1, 5))
    b = torch.randint(0, 500, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    documents = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        out = model(packed, position_ids=positions, document_ids=documents).logits
        alone_a, alone_b = model(a).logits, model(b).logits
    torch.testing.assert_close(out[:, :5], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], alone_b, atol=1e-5, rtol=1e-5)
    # Without document ids, b attends to a: the test would notice a missing mask.
    with torch.no_grad():
        leaky = model(packed, position_ids=positions).logits
    assert (leaky[:, 5:] - alone_b).abs().max() > 1e-3


def test_padding_document_ids_are_not_counted(model):
    ids = torch.randint(0, 500, (1, 6))
    documents = torch.tensor([[0, 0, 0, 0, -1, -1]])
    with torch.no_grad():
        out = model(ids, document_ids=documents)
        alone = model(ids[:, :4])
    torch.testing.assert_close(out.logits[:, :4], alone.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.expert_counts, alone.expert_counts)
    assert out.expert_counts.sum(-1).tolist() == [4 * 2] * 3
    torch.testing.assert_close(out.aux_loss, alone.aux_loss)


def test_mask_builder_causal_fast_path_and_blocks():
    assert build_attention_mask(2, 5, torch.device("cpu")) is None
    mask = build_attention_mask(1, 4, torch.device("cpu"), document_ids=torch.tensor([[0, 0, 1, 1]]))
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_through_model(model, reduction):
    ids = torch.randint(0, 500, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    model.zero_grad()
    plain = model(ids, labels=labels, loss_reduction=reduction)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(ids, labels=labels, loss_reduction=reduction, logits_chunk_size=4)
    assert chunked.logits is None
    chunked.loss.backward()
    torch.testing.assert_close(chunked.loss, plain.loss)
    assert (
        chunked.num_label_tokens.item() == plain.num_label_tokens.item() == 2 * 8 - 2
    )  # labels[1:3] were ignored
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("chunk", [None, 4])
def test_per_token_loss_equals_log_softmax_of_logits(model, chunk):
    ids = torch.randint(0, 500, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    logits = model(ids).logits.detach()
    out = model(ids, labels=labels, loss_reduction="none", logits_chunk_size=chunk)
    assert out.loss.shape == (2, 9)
    # Position s scores labels[s + 1]; the last position and ignored labels hold 0.
    expected = torch.zeros(2, 9)
    logp = torch.log_softmax(logits.float(), dim=-1)
    for b in range(2):
        for s in range(8):
            if labels[b, s + 1] != -100:
                expected[b, s] = -logp[b, s, labels[b, s + 1]]
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert out.loss[0, :2].eq(0).all() and out.loss[:, -1].eq(0).all()
    weights = torch.linspace(0.5, 2.0, 18).view(2, 9)
    model.zero_grad()
    (out.loss * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (model(ids, labels=labels, loss_reduction="none").loss * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-documents"])
def test_gradient_checkpointing_same_grads(model, packed):
    ids = torch.randint(0, 500, (2, 8))
    # Packed rows go through the per-document attention (a DocumentLayout crosses the checkpoint).
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1, -1, -1]]) if packed else None
    results = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        out = model(ids, labels=ids, document_ids=documents)
        (out.loss + 0.02 * out.aux_loss + 0.001 * out.z_loss).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.gradient_checkpointing = False
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], atol=0, rtol=0, msg=n)


def test_sum_backward_through_model(model):
    # `.sum().backward()` hands zero-stride grads down to the grouped GEMMs.
    model.zero_grad()
    model(torch.randint(0, 500, (1, 6))).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_expert_parallel_block_refuses_to_run_alone():
    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 100
    partial = Mixtral(cfg)
    assert partial.expert_ids == list(range(8))
    for layer in partial.layers:  # what expert parallelism does from outside (pipeline/distributed/expert_parallel.py)
        layer.moe.experts.gate_up_proj = torch.nn.Parameter(layer.moe.experts.gate_up_proj[[1, 5]])
        layer.moe.experts.num_experts = 2
    with pytest.raises(RuntimeError, match="expert-parallel"):
        partial(torch.zeros(1, 3, dtype=torch.long))


def test_forward_refuses_an_attention_mask(model):
    # Padding has one encoding, document id -1: a mask passed out of habit must not be ignored.
    with pytest.raises(TypeError, match="document_ids = -1"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long))

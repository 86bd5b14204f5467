"""Activations of one decoder layer and of the LM head / loss, from the tensors the model's code keeps
(model/transformer.py, attention.py, moe.py, lora.py, losses.py): what a layer saves for backward
(`layer_saved`, checked against autograd in tests/pipeline/test_plan.py), the extra of its forward
and backward, the no-grad forward, and a micro-batch's total with and without checkpointing."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.plan.lines import GB, INDEX, Line
from pipeline.plan.setup import Setup


@dataclass
class LayerShape:
    T: int  # tokens of the micro-batch on this rank
    H: int
    nh: int
    nkv: int
    D: int
    E: int
    K: int
    F: int
    s: int  # activation bytes
    M: int  # rows this rank's experts compute
    ep: bool
    cuda: bool  # CUDA kernels (grouped GEMM, PEFT-style LoRA); else the CPU kernels (fused expert LoRA)
    trained_base: bool  # full fine-tuning: norms, projections, router and experts take gradients
    lora_attention: tuple[str, ...] = ()
    lora_experts: bool = False
    r: int = 16
    dropout: bool = False

    @property
    def N(self) -> int:
        return self.T * self.K

    @property
    def dropout_bytes(self) -> int:
        """Per element of a dropout: its output and its mask (bool from CUDA's fused kernel; the
        CPU's dropout multiplies by a noise tensor of the input's dtype)."""
        return self.s + (1 if self.cuda else self.s)


def layer_saved(x: LayerShape) -> list[tuple[str, float]]:
    """The tensors one decoder layer keeps for backward (model/transformer.py, attention.py, moe.py,
    lora.py), beyond its input. Checked against the tensors autograd saves, on CPU (tests)."""
    T, H, s, N, M = x.T, x.H, x.s, x.N, x.M
    out: list[tuple[str, float]] = []

    def norm(tag: str) -> None:
        # bf16 keeps its fp32 upcast (the fp32 input is the input itself); the gain's gradient
        # needs the normalised input.
        out.append((f"{tag}: rsqrt [T] fp32" + (", fp32 upcast [T, H]" if s == 2 else ""),
                    T * 4 + (T * H * 4 if s == 2 else 0)))
        if x.trained_base:
            out.append((f"{tag}: normalised input [T, H]", T * H * s))

    q, kv = x.nh * x.D, x.nkv * x.D
    # A frozen projection keeps no input; its LoRA A keeps it, or its dropout's output instead.
    lora_reads_input = not x.dropout
    norm("input norm")
    if x.trained_base or (lora_reads_input and {"q_proj", "k_proj", "v_proj"} & set(x.lora_attention)):
        out.append(("attention input [T, H]", T * H * s))
    for proj, width_in in (("q", H), ("k", H), ("v", H), ("o", q)):
        if f"{proj}_proj" in x.lora_attention:
            out.append((f"{proj}_proj LoRA A output [T, r]", T * x.r * s))
            if x.dropout:
                out.append((f"{proj}_proj LoRA dropout output and mask [T, in]", T * width_in * x.dropout_bytes))
    # (The per-document index tensors are the batch's layout, made once per batch, not per layer.)
    out.append(("attention q, k, v per document [T, (nh+2nkv) D], output, logsumexp",
                T * (q + 2 * kv) * s + T * q * s + T * x.nh * 4))
    if x.trained_base or (lora_reads_input and "o_proj" in x.lora_attention):
        out.append(("o_proj input [T, nh D]", T * q * s))
    out.append(("residual after attention [T, H]", T * H * s))
    norm("post-attention norm")
    if x.trained_base:
        out.append(("router input [T, H]", T * H * s))
    out.append(("router: fp32 softmax [T, E], top-k ids, renormalised weights [T, K] and their sum",
                T * (x.E * 4 + x.K * (INDEX + 4) + 4)))
    out.append(("dispatch indices, slot weights [T K]", N * (2 * INDEX + s)))
    # The CPU's fused expert LoRA keeps its inputs whatever is frozen; CUDA's grouped GEMMs keep
    # an input only for a trained weight or a LoRA A reading it.
    keeps_inputs = x.trained_base or not x.cuda or (x.lora_experts and lora_reads_input)
    if keeps_inputs:
        out.append(("expert input rows [M, H]", M * H * s))
    out.append(("expert gate_up [M, 2F]", M * 2 * x.F * s))
    if keeps_inputs:
        out.append(("expert SwiGLU output [M, F]", M * x.F * s))
    if x.lora_experts:
        out.append(("expert LoRA low-rank rows [M, 3r]", M * 3 * x.r * s))
        if x.dropout:
            out.append(("expert LoRA dropout outputs and masks [M, H + F]", M * (H + x.F) * x.dropout_bytes))
    if x.ep:
        out.append(("expert outputs kept for the combine [M, H], row order", M * (H * s + INDEX)))
    # The combine adds the weighted rows into zeros (index_add): the MoE output itself is not kept.
    out.append(("expert outputs and weighted outputs [T K, H]", 2 * N * H * s))
    return out


def layer_backward_extra(x: LayerShape) -> float:
    """Above the saved tensors, the largest moment of a layer's backward: the SwiGLU backward's
    d(gate_up) [M, 2F] and then the expert input gradient [M, H], after the combine's [T K, H]
    tensors were released."""
    return x.M * (2 * x.F + x.H) * x.s - 2 * x.N * x.H * x.s


def layer_forward_extra(x: LayerShape) -> float:
    """Above the saved tensors, the largest moment of a layer's forward: the weighted expert
    outputs before the scatter; CUDA's unfused expert LoRA also holds base + LoRA gate_up."""
    if x.cuda and x.lora_experts:
        return 2 * x.M * 2 * x.F * x.s
    return x.M * x.H * x.s


def layer_no_grad_peak(x: LayerShape) -> float:
    """One layer's forward without autograd (eval, DPO's reference pass): x_sorted, gate_up, the
    SwiGLU output and the expert output live together (gate_up until the experts' forward returns),
    next to a few [T, H] tensors of the layer."""
    experts = x.M * (2 * x.H + 3 * x.F) * x.s
    if x.cuda and x.lora_experts:
        experts = max(experts, x.M * (x.H + 3 * 2 * x.F) * x.s)
    return experts + 4 * x.T * x.H * x.s + x.T * (x.E * (x.s + 4) + x.K * 16)


def layer_shape(setup: Setup, config, *, tokens: int, routing: str) -> LayerShape:
    ep, K, E = setup.ep, config.num_experts_per_tok, config.num_local_experts
    N = tokens * K
    if ep > 1 and routing == "worst":
        # Every EP rank's tokens send as many slots here as this rank's E/ep experts can take.
        M = ep * tokens * min(K, E // ep)
    else:
        M = N
    targets = setup.lora_targets if setup.lora else ()
    return LayerShape(
        T=tokens, H=config.hidden_size, nh=config.num_attention_heads, nkv=config.num_key_value_heads,
        D=config.head_dim, E=E, K=K, F=config.intermediate_size, s=setup.act, M=M, ep=ep > 1,
        cuda=setup.device == "cuda", trained_base=not setup.lora,
        lora_attention=tuple(t for t in targets if t.endswith("_proj")),
        lora_experts="experts" in targets, r=setup.lora_r, dropout=setup.lora_dropout > 0,
    )


@dataclass
class Activations:
    """A training micro-batch's activations on one rank."""

    saved: float  # kept for backward when the loss starts its backward
    backward_peak: float  # above `saved - one layer` during the backward of a layer
    forward_peak: float
    how: str


def activations(setup: Setup, config, *, routing: str, checkpointing: bool) -> Activations:
    tokens = setup.rows * setup.seq
    x = layer_shape(setup, config, tokens=tokens, routing=routing)
    per_layer = sum(b for _, b in layer_saved(x))
    L = config.num_hidden_layers
    stream = tokens * x.H * x.s  # one layer's input
    rope = 2 * tokens * x.D * x.s + tokens * (3 * INDEX)  # cos, sin, the batch's document layout
    head = tokens * x.H * x.s * (3 if x.s == 2 else 2) + tokens * 4  # final norm's saved tensors
    if checkpointing:
        saved = L * stream + rope + head
        bwd = per_layer + layer_backward_extra(x)
        how = f"{L} layer inputs [T={tokens:,}, H] x {x.s} B; one layer recomputed in backward"
    else:
        saved = L * (stream + per_layer) + rope + head
        bwd = layer_backward_extra(x)
        how = f"{L} layers x {per_layer / GB:.3f} GB saved (T={tokens:,}, M={x.M:,} expert rows)"
    return Activations(saved=saved, backward_peak=bwd, forward_peak=layer_forward_extra(x), how=how)


def forward_only_peak(setup: Setup, config, tokens: int) -> float:
    """No-grad forward (eval, DPO's reference pass): one layer's tensors at a time."""
    return layer_no_grad_peak(layer_shape(setup, config, tokens=tokens, routing="balanced"))


def logits_lines(setup: Setup, config, *, trained_head: bool, tokens: int, grad: bool = True) -> Line:
    """The LM head and loss of one micro-batch (model/losses.py), the largest [C, V] moment."""
    V, H = config.vocab_size, config.hidden_size
    labelled = tokens - setup.rows  # every token but each row's first predicts a label
    s = setup.act
    if setup.chunk:
        n = -(-labelled // setup.chunk)
        C = -(-labelled // n)
        hidden = labelled * H * s  # the labelled rows of hidden, gathered once
        if not grad:
            # checkpointed chunks run plainly: logits, their fp32 copy, log_softmax
            return Line("logits chunk (no grad)", C * V * (s + 4 + (4 if s == 2 else 0)) + hidden,
                        f"{n} chunk(s) of {C:,} tokens x V={V:,}", kind="logits")
        if trained_head:
            # backward recomputes a chunk: log-probs + incoming + outgoing grad in fp32
            return Line("logits chunk, recomputed in backward", 12 * C * V + 2 * hidden,
                        f"{n} chunk(s) of {C:,} tokens x V={V:,} x 12 B", kind="logits")
        # frozen head: logits, fp32 copy (bf16) and log-probs of a chunk in forward; d hidden kept
        return Line("logits chunk, frozen head (forward)", C * V * (s + 4 + (4 if s == 2 else 0)) + 2 * hidden,
                    f"{n} chunk(s) of {C:,} tokens x V={V:,}", kind="logits")
    if not grad:
        return Line("logits (no grad)", tokens * V * (s + 4 + (4 if s == 2 else 0)),
                    f"[T={tokens:,}, V={V:,}] logits + fp32 copy + log-probs", kind="logits")
    return Line("logits [T, V] and their log-softmax backward", tokens * V * (12 + (s if s == 2 else 0)),
                f"[T={tokens:,}, V={V:,}] x (12 B fp32 + the logits)", kind="logits")

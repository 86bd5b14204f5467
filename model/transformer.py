"""The Mixtral decoder: embeddings -> L x (attention + MoE) -> norm -> lm_head, with losses.

Shape legend: B batch, S sequence, T = B*S tokens, H hidden, E experts, V vocab, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import cpu_kernels
from model.attention import (
    ATTENTION_BACKENDS,
    Attention,
    BatchLayout,
    BucketLayout,
    KVCache,
    RMSNorm,
    batch_layout,
    rope_cos_sin,
    varlen_available,
)
from model.config import MixtralConfig
from model.losses import (
    IGNORE_INDEX,
    chunked_lm_loss,
    load_balancing_loss,
    masked_ce,
    router_z_loss,
    shift_labels,
)
from model.moe import MoEBlock, count_per_expert, route_tokens


@dataclass
class MixtralOutput:
    logits: torch.Tensor | None  # [B, S, V], None with logits_chunk_size
    loss: torch.Tensor | None  # CE only: scalar, or [B, S] per token with loss_reduction="none"
    num_label_tokens: torch.Tensor | None  # long scalar; None without labels
    aux_loss: torch.Tensor  # load balancing (transformers' definition)
    z_loss: torch.Tensor  # router z-loss
    expert_counts: torch.Tensor  # [L, E] long, top-k slots per expert, padding excluded
    router_logits: tuple[torch.Tensor, ...] | None  # L x [T, E] with output_router_logits


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, *, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = Attention(config, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype
        )
        self.moe = MoEBlock(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            device=device,
            dtype=dtype,
        )

    def forward(self, h, cos, sin, layout: BatchLayout, cache=None):
        """h [B, S, H] -> (h [B, S, H], router_logits [T, E]); `layout` is the batch's, computed once."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, layout.attention, cache)
        moe_out, router_logits = self.moe(self.post_attention_layernorm(h), layout.real_tokens)
        return h + moe_out, router_logits


class Mixtral(nn.Module):
    def __init__(self, config: MixtralConfig, *, device=None, dtype=None):
        """Every layer with all of its experts; build on the meta device (`device="meta"`) where
        memory matters, then apply parallelism (pipeline/) and materialise."""
        super().__init__()
        self.config = config
        # The experts this model holds, in the order its expert tensors store them: all of them.
        # Expert parallelism keeps a rank's block from outside the model
        # (pipeline.distributed.expert_parallel.shard_experts, which updates this); model/checkpoint reads it.
        self.expert_ids = list(range(config.num_local_experts))
        self.gradient_checkpointing = False
        # Attention kernel for packed / padded rows (model.attention): "auto" = "varlen" on CUDA in
        # bf16/fp16 where torch has it, else "sdpa"; "flex", "sdpa" or "mask" to choose one.
        self.attention_backend = "auto"
        # Set by `compile_blocks`: every decoder layer runs as a compiled region.
        self.blocks_compiled = False
        H, V = config.hidden_size, config.vocab_size
        # On the meta device (shapes only: checkpoint loading, export planning) nothing is initialised:
        # meta tensors hold no values, and nn.Embedding's own normal_ on meta imports torch._dynamo
        # (measured 1.3-5 s per process). `device` or an enclosing `with torch.device("meta")` say so.
        on_meta = torch.device(device).type == "meta" if device is not None else torch.empty(0).is_meta
        self.embed_tokens = nn.Embedding(
            V, H, device=device, dtype=dtype,
            _weight=torch.empty(V, H, device=device, dtype=dtype) if on_meta else None,
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(H, config.rms_norm_eps, device=device, dtype=dtype)
        self.lm_head = nn.Linear(H, V, bias=False, device=device, dtype=dtype)
        if not on_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for the norms (HF's init), drawn
        parameter by parameter in `named_parameters` order."""
        for name, param in self.named_parameters():
            init_parameter(name, param, self.config.initializer_range)

    def compile_blocks(self, **options) -> None:
        """Compile each decoder layer as a region of its own (`torch.compile` per layer, as torchtitan
        does; the layers share one compiled graph). The per-batch work that needs host values
        (`batch_layout`) and the loss stay outside, in eager; inside a layer the accelerator path has
        no graph break. `options` go to torch.compile (e.g. backend="aot_eager")."""
        cpu_kernels.keep_out_of_compiled_graphs()
        for layer in self.layers:
            layer.compile(**options)
        self.blocks_compiled = True

    def attention_kernel(self, device: torch.device) -> str:
        """The backend `attention_backend` resolves to for a batch on `device`: "auto" is "varlen" on
        CUDA in half precision, "flex" on CUDA otherwise when the layers are compiled (FlexAttention
        is fused only there), else "sdpa"."""
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"Mixtral.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.attention_backend != "auto":
            return self.attention_backend
        dtype = self.embed_tokens.weight.dtype
        if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        if device.type != "cuda":
            return "sdpa"
        if dtype in (torch.bfloat16, torch.float16) and varlen_available():
            return "varlen"
        return "flex" if self.blocks_compiled else "sdpa"

    def batch_layout(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> BatchLayout:
        """Where the batch's documents and padding (document id -1) lie, for every layer of one
        forward; `forward` calls it, or takes one made beforehand (`layout=`). One host sync where
        there are document_ids, none otherwise."""
        B, S = input_ids.shape
        layout = batch_layout(B, S, input_ids.device, document_ids, self.config.sliding_window,
                              self.attention_kernel(input_ids.device))
        if self.blocks_compiled and isinstance(layout.attention, BucketLayout):
            layout.attention.outside_compiled_graphs()
        return layout

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        logits_chunk_size: int | None = None,
        output_router_logits: bool = False,
        kv_cache: KVCache | None = None,
        layout: BatchLayout | None = None,
        logits_to_keep: int | None = None,
        attention_mask: None = None,
    ) -> MixtralOutput:
        """`document_ids` [B, S]: the document of its row each token belongs to (packed rows; no
        attention across documents), -1 on padding; None: one document per row, no padding.
        `labels` [B, S]: IGNORE_INDEX (-100) where not scored; shifted inside (`shift_labels`).
        `kv_cache` (a `KVCache(num_hidden_layers)`): incremental decoding of rows without padding
        or packing; input_ids are the tokens after the cached ones, and the cache is extended.
        `layout`: `self.batch_layout(...)` of this batch, instead of document_ids.
        `logits_to_keep`: logits of the last n positions only (generation), no labels.
        `attention_mask`: removed (padding is document id -1 only); passing one raises."""
        if attention_mask is not None:
            raise TypeError(
                "Mixtral.forward: attention_mask is not taken; mark padding with document_ids = -1 "
                "(one document per row: document_ids = attention_mask - 1)"
            )
        B, S = input_ids.shape
        device = input_ids.device
        past = 0
        if kv_cache is not None:
            if document_ids is not None or layout is not None:
                raise ValueError("Mixtral: kv_cache decodes unpadded, unpacked rows: pass no document_ids")
            past = kv_cache.length
        if logits_to_keep is not None and (labels is not None or logits_to_keep < 1):
            raise ValueError("Mixtral: logits_to_keep is a positive number of last positions, for calls without labels")
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=device).expand(B, S)
        if layout is None:
            layout = BatchLayout(None) if kv_cache is not None else self.batch_layout(input_ids, document_ids)

        h = self.embed_tokens(input_ids)  # [B, S, H]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        all_router_logits = []
        for i, layer in enumerate(self.layers):
            cache = None if kv_cache is None else kv_cache.layers[i]
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                h, router_logits = checkpoint(layer, h, cos, sin, layout, use_reentrant=False)
            else:
                h, router_logits = layer(h, cos, sin, layout, cache)
            all_router_logits.append(router_logits)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]  # [B, n, H]: only these positions are read
        h = self.norm(h)

        logits = loss = num_label_tokens = None
        if labels is None or logits_chunk_size is None:
            logits = self.lm_head(h)  # [B, S, V]
        if labels is not None:
            targets = shift_labels(labels).reshape(-1)  # [T]
            num_label_tokens = (targets != IGNORE_INDEX).sum()
            if logits_chunk_size is not None:
                loss = chunked_lm_loss(
                    h.reshape(B * S, -1), self.lm_head.weight, targets, logits_chunk_size, loss_reduction
                )
            else:
                loss = masked_ce(logits.reshape(B * S, -1), targets, loss_reduction)
            if loss_reduction == "none":
                loss = loss.view(B, S)  # position s holds the CE of predicting labels[s + 1]

        top_k = self.config.num_experts_per_tok
        token_mask = layout.token_mask
        return MixtralOutput(
            logits=logits,
            loss=loss,
            num_label_tokens=num_label_tokens,
            aux_loss=load_balancing_loss(all_router_logits, top_k, token_mask),
            z_loss=router_z_loss(all_router_logits, token_mask),
            expert_counts=_expert_counts(all_router_logits, top_k, token_mask),
            router_logits=tuple(all_router_logits) if output_router_logits else None,
        )


@torch.no_grad()
def init_parameter(name: str, param: torch.Tensor, std: float) -> None:
    """`Mixtral.init_weights` for one parameter (by its name in the model), in place.

    Drawing the same names and shapes in the same order from the same generator gives the same
    weights however the parameters are stored (whole, or one at a time for a sharded model).
    """
    if name.endswith("layernorm.weight") or name == "norm.weight":
        param.fill_(1.0)
    else:
        param.normal_(0.0, std)


@torch.no_grad()
def _expert_counts(
    router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """L x [T, E] -> [L, E] long: routed top-k slots per expert, with the routing the MoE blocks used."""
    num_experts = router_logits[0].shape[-1]
    counts = []
    for logits in router_logits:
        _, expert_ids = route_tokens(logits, top_k)  # [T, K]
        weight = None if token_mask is None else token_mask[:, None].expand(expert_ids.shape)
        counts.append(count_per_expert(expert_ids, num_experts, weight))
    return torch.stack(counts)

"""LoRA SFT step: our pipeline vs transformers MixtralForCausalLM + PEFT, CPU fp32 by default (make bench-sft).

    python bench/bench_sft.py [--steps 3] [--threads 2] [--seq 1024] [--batch 4]
    python bench/bench_sft.py --device cuda --dtype bf16        # make bench-gpu

Same model shape on both sides (--preset; on the CPU "bench-small": hidden 512, 4 layers, 8
experts top-2, ffn 1792, 8 heads, 2 kv heads, vocab 32000; on CUDA "bench-8x7b-2layers":
Mixtral-8x7B's layers, hidden 4096, ffn 14336, 32 heads, 8 kv heads, 2 of them), LoRA r=16 /
alpha 32 on q/k/v/o and on the experts, the same packed SFT rows (the bundled chats prepared at --seq tokens, answer-only
labels), AdamW, router aux loss 0.02.

- ours: the real pipeline step: `pipeline.training.model_setup.build_model` from the tiny recipe with the bench
  overrides, `Trainer.train_step` (global-token CE + aux, clipping, AdamW, schedule), chunked
  LM loss on the labelled tokens only, grouped expert LoRA.
- peer: `MixtralForCausalLM` + PEFT `LoraConfig(target_modules=q/k/v/o,
  target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj])`, a plain
  forward(labels) / backward / AdamW step loop. It gets position_ids and no 2-D attention_mask,
  so transformers masks attention within each packed document, like ours (same attention work).

Each side runs in its own subprocess (so neither pollutes the other's peak memory); peak memory
is the process's ru_maxrss (weights, activations, optimizer and the Python/torch runtime alike).
The first --warmup steps (1 on CPU) are not timed.

Saved for backward: after the timed steps each side runs two more forwards with labels (one row,
then the step's rows) under `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor
autograd keeps for backward (ops and custom Functions' save_for_backward alike), and counts the
distinct storages that are not parameters, in bytes. Inside the decoder layers: "KB per token per
layer" is the growth from the one row to the batch per token (the activations), "MB per layer" the
part that does not grow with tokens (PEFT's `target_parameters` builds W + delta-W for every
expert in each forward and keeps it for backward). "Whole forward" adds embedding, final norm, LM
head and loss, per token of the larger batch.

Device and dtype (`--device`, `--dtype`) are the same for both sides. Ours gets them the way a real
run does: the recipe (`model.dtype` = bfloat16 and `train.mixed_precision` = bf16 for `--dtype
bf16`: bf16 base, fp32 adapters, bf16 autocast, as recipes/mixtral-8x7b/sft_lora.yaml) and
`parallel.make_accelerator`, whose `prepare` puts the model on the accelerator's device. For
`--device cpu` the child runs with ACCELERATE_USE_CPU=true (accelerate's own switch, what
`accelerate launch --cpu` sets), so a GPU machine does not move our side to the GPU while the peer
stays on the CPU; each side checks the device it ended up on. The peer is cast to the dtype
(PEFT keeps its adapters fp32) and runs its forward under the same bf16 autocast.

--device cuda: timed between torch.cuda.synchronize() calls; peak memory is
torch.cuda.max_memory_allocated (the process's tensors on the GPU) instead of RSS; MFU =
lora_step_flops / seconds / the device's peak dense bf16 FLOP/s (see lora_step_flops and
PEAK_BF16_TFLOPS; --peak-tflops overrides). GPU defaults: rows of 4096 tokens (the 8x7B recipe's
max_seq_len) x batch 8 = 32k tokens a step (with 2 layers of 8x7B shape the step is short enough
that fewer tokens would measure launch overhead); 20 timed steps after 3 warm-ups (the first steps pay cuBLAS set-up and allocator
growth). The bundled chats give only 21 full rows of 4096 tokens, so rows are reused in turn; a
repeated row costs the same on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # pipeline/ and model/ without an installed package (the GPU hosts' python3)
RECIPE = ROOT / "recipes/tiny/sft.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 16
# Peak dense (no sparsity) bf16 tensor-core TFLOP/s by device name, first match wins (NVIDIA's
# datasheets: H100 SXM and H200 989, H100 PCIe 756; NVL parts are left to --peak-tflops). Other
# devices need --peak-tflops.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", None), ("H200 NVL", None), ("H100", 989.0), ("H200", 989.0),
)
DEVICE_DEFAULTS = {  # model, seq, batch, steps, warmup (why: module docstring)
    "cpu": {"preset": "bench-small", "seq": 1024, "batch": 4, "steps": 3, "warmup": 1},
    "cuda": {"preset": "bench-8x7b-2layers", "seq": 4096, "batch": 8, "steps": 20, "warmup": 3},
}


def require_cuda() -> None:
    """Stop before any work when --device cuda has no GPU to run on (make bench-gpu relies on it)."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        raise SystemExit(2)


def pick_rows(lengths: list[int], count: int) -> list[int]:
    """Indices of the `count` longest rows (the bench measures full-width batches). When there are
    fewer rows than that, the ones within 5% of the longest are repeated in turn instead of
    filling up with the short leftover rows of the packing."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if len(order) >= count:
        return order[:count]
    full = [i for i in order if lengths[i] >= 0.95 * lengths[order[0]]]
    return [full[k % len(full)] for k in range(count)]


def read_rows(train_dir: Path) -> list[dict]:
    """The rows `datasets.save_to_disk` wrote (the Arrow stream files its state.json names), read
    with pyarrow alone: the same rows as `datasets.load_from_disk`, on a GPU host without
    `datasets` too."""
    import pyarrow as pa

    state = json.loads((train_dir / "state.json").read_text())
    files = [pa.ipc.open_stream(str(train_dir / f["filename"])).read_all() for f in state["_data_files"]]
    return pa.concat_tables(files).to_pylist()


def load_rows(data_dir: str, count: int) -> tuple[list[dict], int]:
    """(rows, how many of them are distinct)."""
    train = read_rows(Path(data_dir) / "train")
    if not train:
        raise SystemExit(f"{data_dir}/train has no rows")
    picked = pick_rows([len(row["input_ids"]) for row in train], count)
    return [train[i] for i in picked], len(set(picked))


def check_data_dir(data_dir: str, seq: int) -> None:
    """A --data dir must be pipeline.prep's SFT output at --seq tokens, or the rows are not what the
    table says."""
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"--data {data_dir}: no manifest.json (want pipeline.prep's output dir)")
    data = json.loads(manifest.read_text())["data"]
    if data.get("kind") != "sft" or data.get("max_seq_len") != seq:
        raise SystemExit(f"--data {data_dir}: prepared as kind={data.get('kind')} max_seq_len="
                         f"{data.get('max_seq_len')}, the bench wants kind=sft max_seq_len={seq} (--seq)")


def lora_step_flops(cfg, rank: int, tokens: int, labelled: int) -> float:
    """FLOPs a LoRA SFT step needs for `tokens` tokens of which `labelled` carry a loss term.

    A frozen weight costs 2 FLOPs per token forward and 2 backward (the gradient w.r.t. its input
    only, no weight gradient): 4. A trainable adapter weight costs 6 (forward, input gradient,
    weight gradient). Per token and layer the active frozen weights are q/k/v/o (2*H*Dq + 2*H*Dkv),
    the router (H*E) and the K routed experts' w1/w2/w3 (3*H*F each); the adapters, rank r on
    q/k/v/o and on each routed expert's w1, w2, w3, have r*(in + out) weights per projection.
    The LM head (V*H, frozen) counts only at labelled positions, where the loss needs it: ours
    computes only those, the peer all of them (that extra work is not counted; MFU counts what
    the step needs, with one formula for both sides).

        flops = tokens * (4 * L * (2*H*Dq + 2*H*Dkv + H*E + 3*K*H*F)
                          + 6 * L * r * ((H+Dq) * 2 + (H+Dkv) * 2 + 3*K*(H+F)))
              + labelled * 4 * V * H

    Left out: attention scores (within each packed document; the bundled chats are ~40 tokens
    long, so < 1% here), norms, softmax and SwiGLU element-wise work, the embedding lookup, and
    that layer 0's q/k/v need no input gradient (< 1%). The peer's expert LoRA is one rank-r LoRA
    on the fused [2F, H] gate_up (fewer adapter weights than ours on w1 and w3): ours is counted.
    """
    H, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    Dq, Dkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    E, K, V = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.vocab_size
    frozen = L * (2 * H * Dq + 2 * H * Dkv + H * E + 3 * K * H * F)
    adapters = L * rank * (2 * (H + Dq) + 2 * (H + Dkv) + 3 * K * (H + F))
    return tokens * (4 * frozen + 6 * adapters) + labelled * 4 * V * H


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The device's peak dense bf16 TFLOP/s: --peak-tflops, else PEAK_BF16_TFLOPS by name, else None."""
    if override is not None:
        return override
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


class SavedForBackward:
    """Bytes of the tensor storages autograd keeps for backward during `with` (parameters left
    out), all of them and those saved inside the given layers' forwards."""

    def __init__(self, model, layers):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.layers, self.inside = list(layers), 0
        self.all: dict[int, int] = {}  # storage address -> bytes
        self.in_layers: dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address and address not in self.params:
            self.all[address] = storage.nbytes()
            if self.inside:
                self.in_layers[address] = storage.nbytes()
        return tensor

    def _enter(self, *args):
        self.inside += 1

    def _leave(self, *args):
        self.inside -= 1

    def __enter__(self):
        import torch

        self._handles = [h for layer in self.layers for h in (layer.register_forward_pre_hook(self._enter),
                                                             layer.register_forward_hook(self._leave))]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def saved_activations(model, layers, forward, batches: list[dict]) -> dict:
    """What one forward with labels (`forward(batch)`, grad on) saves for backward, measured on two
    batches of different token counts: per token per layer the slope between them (activations
    grow with tokens), per layer the rest (tensors of fixed size, such as PEFT's W + delta-W), and
    the whole forward's bytes per token on the larger batch."""
    layer_bytes, all_bytes, tokens = [], [], []
    for batch in batches:
        with SavedForBackward(model, layers) as saved:
            loss = forward(batch)
        del loss  # frees the graph and what it saved
        layer_bytes.append(sum(saved.in_layers.values()))
        all_bytes.append(sum(saved.all.values()))
        tokens.append(int((batch["document_ids"] >= 0).sum()))
    per_token = (layer_bytes[1] - layer_bytes[0]) / (tokens[1] - tokens[0])
    return {"saved_layer_bytes_per_token_layer": per_token / len(layers),
            "saved_fixed_bytes_per_layer": (layer_bytes[0] - per_token * tokens[0]) / len(layers),
            "saved_bytes_per_token": all_bytes[1] / tokens[1]}


def saved_batches(task, rows: list[dict], batch: int, device) -> list[dict]:
    """One row, then `batch` rows (at least 2): the two token counts of `saved_activations`."""
    return [{k: v.to(device) for k, v in task.collate(rows[:n]).items()} for n in (1, max(2, batch))]


def peaks(device: str) -> dict:
    """Peak memory so far, MB: the process's resident memory, and on CUDA its GPU tensors."""
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def device_sync(device: str):
    """What to call before reading the clock: CUDA kernels run asynchronously."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def run_ours(args, rows: list[dict], extra: tuple[str, ...] = ()) -> dict:
    """`extra`: more recipe overrides (bench/bench_qlora.py: the 4-bit base)."""
    import torch

    from pipeline.distributed import parallel
    from pipeline.sft import load_recipe
    from pipeline.training.model_setup import build_model
    from pipeline.training.tasks import SFTTask
    from pipeline.training.tracking import Tracker
    from pipeline.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(str(RECIPE), [
            f"model.preset={args.preset}", "lora.enabled=true", f"lora.r={RANK}", f"lora.alpha={2 * RANK}",
            "lora.dropout=0.0", f"model.logits_chunk_size={args.chunk}",
            f"train.micro_batch_size={args.batch}", "train.grad_accum_steps=1",
            f"train.max_steps={args.steps + args.warmup}",
            f"model.dtype={'bfloat16' if args.dtype == 'bf16' else 'float32'}",
            f"train.mixed_precision={args.dtype}",
            "tracking.report_to=none", f"output_dir={tmp}/out", f"data.output_dir={args.data}", *extra,
        ])
        torch.manual_seed(0)
        model = build_model(recipe, Path(tmp), is_main=False)
        # As pipeline.sft.run builds it; the device is accelerate's (ACCELERATE_USE_CPU: --device cpu).
        accelerator = parallel.make_accelerator(
            recipe.parallel, micro_batch_size=recipe.train.micro_batch_size,
            grad_accum_steps=recipe.train.grad_accum_steps, max_grad_norm=recipe.train.max_grad_norm,
            mixed_precision=recipe.train.mixed_precision, log_with=None, project_dir=tmp,
        )
        if accelerator.device.type != args.device:
            raise SystemExit(f"ours: accelerate chose {accelerator.device}, the bench asked for {args.device}")
        tracker = Tracker(accelerator, tmp, report_to="none", project="bench", run_name=None, tags=[], config={})
        task = SFTTask(aux_coef=recipe.model.router_aux_loss_coef, z_coef=0.0,
                       logits_chunk_size=recipe.model.logits_chunk_size)
        trainer = Trainer(accelerator=accelerator, model=model, task=task, train_data=rows, eval_data=None,
                          config=recipe.train, output_dir=tmp, tracker=tracker, progress_bar=False)
        sync = device_sync(args.device)
        times, cpu_times, tokens, labelled, losses = [], [], 0, 0, []
        for step in range(args.steps + args.warmup):
            labelled_before = trainer.trained_tokens
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics, step_tokens = trainer.train_step()
            sync()
            trainer.step += 1
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
                tokens += step_tokens
                labelled += trainer.trained_tokens - labelled_before  # label tokens (count_units)
            losses.append(metrics["loss"])
        params = next(p for p in trainer.model.parameters() if not p.requires_grad)
        peak = peaks(args.device)  # before the measuring forwards below
        with accelerator.autocast():
            saved = saved_activations(trainer.model, model.get_base_model().layers,
                                      lambda batch: task.forward(trainer.model, batch).loss_sum,
                                      saved_batches(task, rows, args.batch, params.device))
    return {"seconds": sum(times), "tokens": tokens, "labelled": labelled, "losses": losses, **saved,
            **peak, "cpu_seconds": sum(cpu_times), "where": f"{params.device.type} {params.dtype}",
            "impl": f"native fused expert LoRA, frozen-head CE in chunks of {args.chunk}, attention per document"}


def run_peer(args, rows: list[dict]) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig as HFConfig
    from transformers import MixtralForCausalLM

    from model import MixtralConfig
    from pipeline.training.tasks import SFTTask

    cfg = HFConfig(**MixtralConfig.preset(args.preset).to_hf())
    cfg.output_router_logits = True  # the aux loss is part of the objective, as on our side
    cfg.router_aux_loss_coef = 0.02
    torch.manual_seed(0)
    bf16 = args.dtype == "bf16"
    model = MixtralForCausalLM(cfg).to(device=args.device, dtype=torch.bfloat16 if bf16 else torch.float32)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, lora)  # adapters in fp32 over a bf16 base (autocast_adapter_dtype)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    task = SFTTask(aux_coef=0.0, z_coef=0.0, logits_chunk_size=None)
    sync = device_sync(args.device)
    times, cpu_times, tokens, labelled, losses = [], [], 0, 0, []
    for step in range(args.steps + args.warmup):
        batch = task.collate(rows[step * args.batch:(step + 1) * args.batch])
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        on_device = {k: v.to(args.device) for k, v in batch.items()}
        # attention_mask=None: transformers then finds the packed documents from position_ids (restarts)
        # and masks attention within each one, as our document_ids mask does (with a 2-D mask it
        # would attend across documents). Padding restarts at position 0 each token: it sees itself.
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=on_device["input_ids"], attention_mask=None,
                        position_ids=on_device["position_ids"], labels=on_device["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            tokens += int((batch["document_ids"] >= 0).sum())
            labelled += task.count_units(batch)
        losses.append(float(out.loss))
    impl = getattr(model.get_base_model().config, "_experts_implementation", None) or "default"
    params = next(p for p in model.parameters() if not p.requires_grad)
    peak = peaks(args.device)  # before the measuring forwards below
    with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=bf16):
        saved = saved_activations(
            model, model.get_base_model().model.layers,
            lambda batch: model(input_ids=batch["input_ids"], attention_mask=None,
                                position_ids=batch["position_ids"], labels=batch["labels"]).loss,
            saved_batches(task, rows, args.batch, args.device))
    return {"seconds": sum(times), "tokens": tokens, "labelled": labelled, "losses": losses, **saved,
            **peak, "where": f"{params.device.type} {params.dtype}", "cpu_seconds": sum(cpu_times),
            "impl": f"transformers {impl} experts + PEFT target_parameters, packed causal mask (from position_ids)"}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        require_cuda()
    rows, distinct = load_rows(args.data, (args.steps + args.warmup) * args.batch)
    # Both sides get the same rows; our trainer groups them into batches in its seeded order
    # (the rows are the longest packed ones, all close to --seq tokens).
    result = run_ours(args, rows) if args.side == "ours" else run_peer(args, rows)
    expected = f"{args.device} {'torch.bfloat16' if args.dtype == 'bf16' else 'torch.float32'}"
    if result["where"] != expected:  # the frozen base weights must be where the bench says
        raise SystemExit(f"{args.side}: base weights are {result['where']}, the bench asked for {expected}")
    result["distinct_rows"] = distinct
    if args.device == "cuda":
        result["device_name"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="both sides run here")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: bf16 base weights, fp32 adapters, bf16 autocast (both sides)")
    parser.add_argument("--preset", choices=["bench-small", "bench-8x7b-2layers"],
                        help="model shape (default: bench-small on cpu, bench-8x7b-2layers on cuda)")
    parser.add_argument("--steps", type=int, help="timed steps per side (default: 3 cpu, 20 cuda)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 1 cpu, 3 cuda)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, help="packed row length (default: 1024 cpu, 4096 cuda)")
    parser.add_argument("--batch", type=int, help="rows per step (default: 4 cpu, 8 cuda)")
    parser.add_argument("--chunk", type=int, default=1024, help="our logits_chunk_size (tokens)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense bf16 TFLOP/s for MFU (default: by device name)")
    parser.add_argument("--data", help="a pipeline.prep output dir of recipes/tiny/sft.yaml at --seq tokens "
                        "(default: prepared afresh); prepared elsewhere for a host without mistral-common")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def print_cpu_table(args, results: dict) -> None:
    peer, ours = results["peer"], results["ours"]
    tps = {k: r["tokens"] / r["seconds"] for k, r in results.items()}
    # CPU seconds of the process: less sensitive than wall time to other jobs on a shared machine
    # (a busy machine stretches wall time, not the work done), reported beside it.
    cpu_tps = {k: r["tokens"] / r["cpu_seconds"] for k, r in results.items()}
    print("| side | implementation | tokens/s (wall) | s/step | tokens/CPU-s | peak RSS (MB) | "
          "saved for backward: KB per token per layer | + MB per layer | whole forward, KB per token | "
          "load avg (1 min, after) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, key in (("transformers + PEFT", "peer"), ("ours (pipeline)", "ours")):
        r = results[key]
        print(f"| {name} | {r['impl']} | {tps[key]:.0f} | {r['seconds'] / args.steps:.2f} | {cpu_tps[key]:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {kb(r, 'saved_layer_bytes_per_token_layer')} | {mb(r)} | "
              f"{kb(r, 'saved_bytes_per_token')} | {r['load']:.2f} |")
    print(f"| **ours / peer** | | **{tps['ours'] / tps['peer']:.2f}x** | | **{cpu_tps['ours'] / cpu_tps['peer']:.2f}x** | "
          f"**{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x** | {saved_ratio(results, 'saved_layer_bytes_per_token_layer')} | "
          f"| {saved_ratio(results, 'saved_bytes_per_token')} | |")


def kb(result: dict, key: str) -> str:
    return f"{result[key] / 1024:.1f}"


def mb(result: dict) -> str:
    return f"{result['saved_fixed_bytes_per_layer'] / 2**20:.1f}"


def saved_ratio(results: dict, key: str) -> str:
    return f"**{results['ours'][key] / results['peer'][key]:.2f}x**"


def print_cuda_table(args, results: dict) -> None:
    from model import MixtralConfig

    peer, ours = results["peer"], results["ours"]
    cfg = MixtralConfig.preset(args.preset)
    name = ours["device_name"]
    peak = peak_tflops(name, args.peak_tflops)
    tps = {k: r["tokens"] / r["seconds"] for k, r in results.items()}
    flops = {k: lora_step_flops(cfg, RANK, r["tokens"], r["labelled"]) / r["seconds"]  # FLOP/s
             for k, r in results.items()}
    mfu = {k: f"{100 * f / (peak * 1e12):.1f}%" if peak else "n/a" for k, f in flops.items()}
    print(f"device: {name}; MFU = lora_step_flops / s / "
          + (f"{peak:.0f} TFLOP/s (peak dense bf16)" if peak else "? (unknown device: pass --peak-tflops)"))
    print("| side | implementation | tokens/s | s/step | TFLOP/s (needed) | MFU | peak GPU memory (MB) | "
          "saved for backward: KB per token per layer | + MB per layer | whole forward, KB per token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, key in (("transformers + PEFT", "peer"), ("ours (pipeline)", "ours")):
        r = results[key]
        print(f"| {label} | {r['impl']} | {tps[key]:.0f} | {r['seconds'] / args.steps:.4f} | "
              f"{flops[key] / 1e12:.1f} | {mfu[key]} | {r['peak_gpu_mb']:.0f} | "
              f"{kb(r, 'saved_layer_bytes_per_token_layer')} | {mb(r)} | {kb(r, 'saved_bytes_per_token')} |")
    print(f"| **ours / peer** | | **{tps['ours'] / tps['peer']:.2f}x** | | | | "
          f"**{ours['peak_gpu_mb'] / peer['peak_gpu_mb']:.2f}x** | "
          f"{saved_ratio(results, 'saved_layer_bytes_per_token_layer')} | | {saved_ratio(results, 'saved_bytes_per_token')} |")


def main() -> None:
    args = parse_args()
    if args.side:
        child(args)
        return
    if args.device == "cuda":
        require_cuda()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    # Both sides with our entry points' allocator setting (pipeline/__init__.py): huge pages for large CPU tensors.
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    env.pop("ACCELERATE_USE_CPU", None)
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate's cpu=True: our side stays on the CPU on a GPU host
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or f"{tmp}/data"
        if not args.data:
            subprocess.run([sys.executable, "-m", "pipeline.prep", str(RECIPE), f"data.output_dir={data}",
                            f"data.max_seq_len={args.seq}"], cwd=ROOT, env=env, check=True, capture_output=True)
        check_data_dir(data, args.seq)
        results = {}
        for side in ("peer", "ours"):
            cmd = [sys.executable, __file__, "--side", side, "--data", str(Path(data).resolve()),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--seq", str(args.seq),
                   "--batch", str(args.batch), "--chunk", str(args.chunk), "--device", args.device,
                   "--dtype", args.dtype, "--preset", args.preset]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{side} side failed:\n{proc.stderr[-4000:]}")
            results[side] = json.loads(line[0][len("RESULT "):])
            results[side]["load"] = os.getloadavg()[0]

    peer, ours = results["peer"], results["ours"]
    reused = (f"; {ours['distinct_rows']} distinct rows reused in turn"
              if ours["distinct_rows"] < (args.steps + args.warmup) * args.batch else "")
    print(f"\nLoRA SFT step, model {args.preset}, {args.device.upper()} {args.dtype}, {args.threads} threads, batch {args.batch} x seq "
          f"{args.seq}, r={RANK} on attention + experts, {args.steps} timed steps (+{args.warmup} warm-up); "
          f"attention within packed documents on both sides{reused}; THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}\n")
    if args.device == "cuda":
        print_cuda_table(args, results)
    else:
        print_cpu_table(args, results)
    print("\ntargets: tokens/s >= 2x, peak memory <= 0.7x")
    print(f"first-step losses (CE on answers + aux): peer {peer['losses'][0]:.4f}, ours {ours['losses'][0]:.4f}")


if __name__ == "__main__":
    main()

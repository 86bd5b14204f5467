"""A finished plan (`Plan`): its peaks per GPU and per node, the verdict, and the table it prints."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.plan.lines import CUDA_RESERVE_GB, GB, Moment, fmt_gb
from pipeline.plan.setup import Counts, Setup
from pipeline.preflight import Pairing

KINDS = (("weights", "weights"), ("grads", "gradients"), ("optimizer", "optimizer state"),
         ("activations", "activations"), ("logits", "logits / loss"), ("comm", "communication buffers"),
         ("other", "other"))


@dataclass
class Plan:
    pairing: Pairing
    setup: Setup
    counts: Counts
    moments: list[Moment]  # the recipe's checkpointing, worst-case routing (what the verdict uses)
    balanced: list[Moment]  # the same with balanced routing
    activation_table: dict[tuple[bool, str], float]
    gpu_memory: float
    host_memory: float | None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_moment(self) -> Moment:
        return max(self.moments, key=lambda m: m.gpu() if self.setup.device == "cuda" else m.one_process())

    @property
    def reserve(self) -> float:
        return CUDA_RESERVE_GB * GB if self.setup.device == "cuda" else 0.0

    @property
    def peak_gpu(self) -> float:
        m = self.peak_moment
        return (m.gpu() if self.setup.device == "cuda" else m.one_process()) + self.reserve

    @property
    def peak_host(self) -> float:
        return max(m.host_per_node(self.setup.per_node) for m in self.moments)

    @property
    def fits(self) -> bool:
        host_ok = self.host_memory is None or self.peak_host <= self.host_memory
        return self.peak_gpu <= self.gpu_memory and host_ok

    def phase_peaks(self, moments: list[Moment] | None = None) -> dict[str, float]:
        """Per phase, the largest moment of all torch tensors of the main process (a CPU launch's
        measure: bench/plan_probe.py)."""
        out: dict[str, float] = {}
        for m in moments or self.moments:
            out[m.phase] = max(out.get(m.phase, 0.0), m.one_process())
        return out

    def verdict(self) -> str:
        host = f"host {self.peak_host / GB:,.1f} GB per node"
        if self.host_memory is not None:
            host += f" of {self.host_memory / GB:,.0f} GB"
        where = "per GPU" if self.setup.device == "cuda" else "per process"
        return (f"plan: {'fits' if self.fits else 'does not fit'}: peak {self.peak_gpu / GB:,.1f} GB {where} "
                f"of {self.gpu_memory / GB:,.0f} GB; {host}")

    def render(self) -> str:
        s, c, p = self.setup, self.counts, self.pairing
        parallel = "no DeepSpeed" if not s.zero else f"DeepSpeed ZeRO-{s.zero}"
        if s.offload_optimizer or s.offload_params:
            parallel += " + offload " + " and ".join(
                x for x, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on)
        if s.ep > 1:
            parallel += f", expert parallel {s.ep}"
        precision = "bf16" if s.bf16 else "fp32"
        out = [
            f"plan for {self.source}",
            f"  {s.stage}: {s.processes} process(es) on {s.nodes} node(s), {parallel}, {precision}, {s.device}",
            f"  model ({p.config_source}): {c.total:,} parameters, {c.active / 1e9:.2f}B active per token"
            + (f"; {c.trainable:,} trainable" if s.stage != "eval" else ""),
        ]
        if s.stage != "eval":
            out.append(f"  rank 0 holds {c.local:,} parameters, {c.local_trainable:,} trainable "
                       f"({s.rows} rows x {s.seq} tokens per micro-batch, grad accumulation {s.grad_accum})")
        out.append("  startup checks: all passed" + (f"; not run: {'; '.join(p.skipped)}" if p.skipped else ""))
        peak = self.peak_moment
        out.append("")
        out.append(f"per {'GPU' if s.device == 'cuda' else 'process'} (rank 0) at its peak: {peak.phase}, {peak.name}")
        for kind, label in KINDS:
            lines = [ln for ln in peak.lines if ln.kind == kind and (s.device == "cpu" or not ln.host) and ln.tensor]
            if lines:
                out.append(f"  {label:<24}{fmt_gb(sum(ln.bytes for ln in lines)):>12}   "
                           + "; ".join(f"{ln.what}: {ln.how}" if ln.how else ln.what for ln in lines))
        if self.reserve:
            out.append(f"  {'CUDA context (assumed)':<24}{fmt_gb(self.reserve):>12}   CUDA, NCCL, cuBLAS outside "
                       "PyTorch's allocator; not measured here")
        out.append(f"  {'total':<24}{fmt_gb(self.peak_gpu):>12}")
        if s.stage != "eval":
            out.append("")
            out.append(f"activations of one micro-batch ({s.rows * s.seq:,} tokens), kept for backward + "
                       "a layer's backward:")
            out.append(f"  {'':<34}{'balanced routing':>18}{'worst-case routing':>20}")
            for ckpt in (False, True):
                label = f"checkpointing {'on' if ckpt else 'off'}" + (" (recipe)" if ckpt == s.checkpointing else "")
                out.append(f"  {label:<34}{fmt_gb(self.activation_table[ckpt, 'balanced']):>18}"
                           f"{fmt_gb(self.activation_table[ckpt, 'worst']):>20}")
        out.append("")
        out.append(f"per {'GPU' if s.device == 'cuda' else 'process'} by moment (worst-case routing"
                   f"{'; balanced in brackets' if s.ep > 1 else ''}):")
        for m, b in zip(self.moments, self.balanced, strict=True):
            value = m.gpu() + self.reserve if s.device == "cuda" else m.one_process()
            other = b.gpu() + self.reserve if s.device == "cuda" else b.one_process()
            extra = f"  ({fmt_gb(other)})" if s.ep > 1 and abs(other - value) > 0.5e6 else ""
            out.append(f"  {m.phase + ': ' + m.name:<58}{fmt_gb(value):>12}{extra}")
        if s.device == "cuda":
            out.append("")
            out.append(f"host RAM per node ({s.per_node} process(es)):")
            seen = set()
            for m in self.moments:
                host = m.host_per_node(s.per_node)
                key = (m.phase, round(host))
                if host and key not in seen:
                    seen.add(key)
                    lines = "; ".join(f"{ln.what}" for ln in m.lines if ln.host)
                    out.append(f"  {m.phase + ': ' + m.name:<58}{fmt_gb(host):>12}   {lines}")
        if self.notes:
            out.append("")
            out += [f"note: {n}" for n in self.notes]
        out.append(self.verdict())
        return "\n".join(out)

"""Choose how much to compress before spending any compute.

Each candidate (sparsity x quantization type) gets an estimated memory
footprint and an ideal roofline projection of decode and prefill speed on the
target profile. The planner picks the least compression -- lowest sparsity,
then highest precision -- that meets every budget (budgets.py: the one table of
budgets and the one least-compression rule). Estimates only decide what to
build; the sign-off uses the profiler's measured figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .. import formats
from ..errors import UserError
from . import budgets as budget_table
from .schema import Profile

GB = 1e9
DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Efficiency:
    """The fractions of peak that real inference reaches: decode of the copy bandwidth, prefill of the matmul peak.

    An ideal roofline (1, 1) overstates every runtime: llama.cpp's decode reaches about two thirds of
    a CPU's copy bandwidth and its prefill a fraction of the matmul peak. Measured once on this host
    (`efficiency_from`), the same fractions applied to the profile's peaks project a candidate the way
    a measured artifact is projected, so the planner and the profiler agree.
    """

    decode: float = 1.0
    prefill: float = 1.0
    source: str = "ideal roofline"


IDEAL = Efficiency()


@dataclass(frozen=True)
class ModelShape:
    """The few numbers that memory and speed depend on."""

    blocks: int
    params_per_block: int
    embedding_params: int  # token embedding table
    head_params: int  # 0 when tied to the embedding
    other_params: int  # final norm etc.
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        import torch
        from transformers import AutoModelForCausalLM

        from ..models import adapter_for

        adapter = adapter_for(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        blocks = adapter.blocks(model)
        per_block = sum(p.numel() for p in blocks[0].parameters())
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        head_params = 0 if head is emb else head.numel()
        total = sum(p.numel() for p in model.parameters())
        return cls(
            blocks=len(blocks), params_per_block=per_block, embedding_params=emb.numel(),
            head_params=head_params, other_params=total - per_block * len(blocks) - emb.numel() - head_params,
            kv_heads=adapter.kv_heads(config), head_dim=adapter.head_dim(config),
        )

    def kv_bytes_per_token(self, kept_blocks: int, runtime: str) -> int:
        """KV-cache bytes one token adds (keys and values of every kept block) in `runtime`."""
        return 2 * kept_blocks * self.kv_heads * self.head_dim * formats.runtime(runtime).kv_bytes


@dataclass
class Candidate:
    """One way to compress (sparsity x quantization type) with its projected figures and budget verdicts.

    The quality curve's points are candidates too, with their perplexity measured (curve.CurvePoint).
    """

    sparsity: float
    removed_blocks: int
    kept_blocks: int
    quant: str
    weights_gb: float
    kv_cache_gb: float
    overhead_gb: float
    memory_gb: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    meets: dict[str, bool] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return all(self.meets.values())

    def figures(self) -> dict[str, float]:
        """The projected figures, named as the budget table names them."""
        return {"memory_gb": self.memory_gb, "decode_tokens_per_s": self.decode_tokens_per_s,
                "time_to_first_token_s": self.time_to_first_token_s}

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


@dataclass
class Plan:
    profile: str
    chosen: Candidate
    candidates: list[Candidate]
    fixed: dict
    efficiency: Efficiency = IDEAL

    def to_dict(self) -> dict:
        return {"profile": self.profile, "chosen": self.chosen.to_dict(), "fixed": self.fixed,
                "candidates": [c.to_dict() for c in self.candidates], "efficiency": asdict(self.efficiency),
                "note": "estimates: weights by bits per weight, KV cache at the profile's context and batch, "
                        "speeds by a roofline on the profile's peak bandwidth and compute times the efficiency"}


def removed_for(blocks: int, sparsity: float) -> int:
    return math.ceil(blocks * sparsity - 1e-9)



def step_load(shape: ModelShape, runtime: str, quant: str, kept: int, kv_read_bytes: float = 0.0) -> tuple[float, float]:
    """(bytes read, FLOPs) per decoded token: every kept block and the LM head (the embedding when tied) once."""
    rt = formats.runtime(runtime)
    bits = formats.spec(rt.name, quant).bits
    emb_bits = rt.embedding_bits or bits
    head_bits = emb_bits if shape.head_params == 0 else bits
    head_params = shape.head_params or shape.embedding_params
    block_params = kept * shape.params_per_block
    return (block_params * bits / 8 + head_params * head_bits / 8 + kv_read_bytes,
            2.0 * (block_params + head_params))


def efficiency_from(shape: ModelShape, runtime: str, quant: str, kept: int, decode_tokens_per_s: float,
                    prefill_tokens_per_s: float, context_tokens: float, host_bandwidth_gbps: float,
                    host_tflops: float, source: str) -> Efficiency:
    """The fractions an artifact measured on this host reached (decode at `context_tokens` of KV cache)."""
    kv = shape.kv_bytes_per_token(kept, runtime) * context_tokens
    bytes_per_step, flops = step_load(shape, runtime, quant, kept, kv)
    return Efficiency(decode=decode_tokens_per_s * bytes_per_step / (host_bandwidth_gbps * GB),
                      prefill=prefill_tokens_per_s * flops / (host_tflops * 1e12), source=source)


def estimate(shape: ModelShape, profile: Profile, sparsity: float, quant: str, efficiency: Efficiency = IDEAL) -> Candidate:
    runtime = formats.runtime(profile.runtime)
    bits = formats.spec(runtime.name, quant).bits
    removed = removed_for(shape.blocks, sparsity)
    kept = shape.blocks - removed
    emb_bits = runtime.embedding_bits or bits
    weights = (kept * shape.params_per_block + shape.head_params) * bits / 8 \
        + shape.embedding_params * emb_bits / 8 + shape.other_params * 4
    kv = shape.kv_bytes_per_token(kept, runtime.name) * profile.context_length * profile.batch_size
    overhead = runtime.overhead_gb * GB
    memory = weights + kv + overhead

    # Decode reads the weights once per step and the KV cache at half the context on average,
    # at the fraction of peak bandwidth real decoding reaches; prefill of one prompt is
    # compute-bound matmuls, and at least one pass over the weights.
    bytes_per_step, flops_per_token = step_load(shape, runtime.name, quant, kept, kv / 2)
    bandwidth = profile.memory_bandwidth_gbps * GB * efficiency.decode
    compute = profile.compute_tflops * 1e12 * efficiency.prefill
    step_s = max(bytes_per_step / bandwidth, flops_per_token * profile.batch_size / compute)
    decode = profile.batch_size / step_s if step_s > 0 else math.inf
    ttft = max(flops_per_token * profile.prompt_tokens / compute, bytes_per_step / bandwidth)

    c = Candidate(sparsity, removed, kept, quant, weights / GB, kv / GB, overhead / GB, memory / GB, decode, ttft)
    c.meets = budget_table.meets(c.figures(), profile.budgets)  # NaN/Inf never meets a budget
    return c


def _precision_order(profile: Profile) -> list[str]:
    return sorted(profile.quant_types, key=lambda q: -formats.spec(profile.runtime, q).bits)


def plan(shape: ModelShape, profile: Profile, sparsity: float | None = None, quant: str | None = None,
         sparsities: tuple[float, ...] = DEFAULT_SPARSITIES, efficiency: Efficiency = IDEAL) -> Plan:
    """The least-compressed candidate meeting every budget, and the whole table."""
    if sparsity is not None and not 0 <= sparsity < 1:  # also refuses NaN
        raise UserError(f"--sparsity must be in [0, 1), got {sparsity}")
    if quant is not None and quant not in profile.quant_types:
        raise UserError(f"--quant {quant!r} is not offered by profile {profile.name} "
                        f"({profile.runtime}: {', '.join(profile.quant_types)})")
    levels = [sparsity] if sparsity is not None else list(sparsities)
    levels = [s for s in levels if removed_for(shape.blocks, s) < shape.blocks]
    if not levels:
        raise UserError(f"--sparsity {sparsity:g} would remove all {shape.blocks} blocks of the model; "
                        f"give a smaller --sparsity (at most {(shape.blocks - 1) / shape.blocks:.2f})")
    quants = [quant] if quant else _precision_order(profile)
    candidates = [estimate(shape, profile, s, q, efficiency) for s in levels for q in quants]
    fixed = {"sparsity": sparsity, "quant": quant}
    chosen, closest = budget_table.least_compression(  # candidates run from least to most compressed
        candidates, lambda c: c.fits, lambda c: budget_table.shortfall(c.figures(), profile.budgets))
    if chosen is not None:
        return Plan(profile.name, chosen, candidates, fixed, efficiency)
    figures = closest.figures()
    against = ", ".join(b.describe(figures[b.figure], getattr(profile.budgets, b.name)) for b in budget_table.PROJECTED)
    raise UserError(f"no candidate meets the {profile.name} budgets; closest is sparsity {closest.sparsity:g} + "
                    f"{closest.quant}: {against} (projected)")

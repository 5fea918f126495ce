"""The fused linear layer: a frozen neighbour weight plus learnable low-rank fusion terms.

`W = W_n + LoRA + Σ_k (B_k·A_k) ⊙ W_pk (+ frozen, already materialized terms)`,
bias `b = b_n + Σ_k c_k ⊙ b_pk`.

Written by hand rather than as a PEFT tuner: PEFT's LoRA layer gives the
additive `B·A` delta, but a fusion term is a Hadamard product of a low-rank
matrix with *another layer's* frozen weight, several such terms live on one
layer (one per fused block, Eq. 10), each with its own learning rate, and the
bias is fused too. None of that maps onto a PEFT config, so we follow the same
shape (wrap the base layer, `delta_weight()`, `merge()`) without the dependency.

Trained factors are kept in float32 ("master copies"); the effective weight is
computed in float32 and cast to the input's dtype, so a bf16 GPU run trains
fp32 factors. The forward builds the effective weight once per call (cheap
next to the token matmul), and `merge()` uses the very same arithmetic, so a
folded layer computes the fused function to the bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming_uniform(shape: tuple[int, int]) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


class FusedLinear(nn.Module):
    """Wraps a frozen `nn.Linear` (the neighbour `n`); holds fusion terms and a LoRA delta."""

    def __init__(self, base: nn.Linear, lora_rank: int = 0, lora_scale: float = 1.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        out_f, in_f = base.weight.shape
        self.in_features, self.out_features = in_f, out_f
        dev = base.weight.device
        self.lora_scale = lora_scale
        if lora_rank > 0:
            r = min(lora_rank, out_f, in_f)
            self.lora_A = nn.Parameter(_kaiming_uniform((r, in_f)).to(dev))
            self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=dev))
        else:
            self.lora_A = self.lora_B = None
        self.fusion_A = nn.ParameterList()
        self.fusion_B = nn.ParameterList()
        self.fusion_bias = nn.ParameterList()
        # frozen W_p (and b_p) per term, float32, as non-persistent buffers so .to(device) moves them
        self._n_terms = 0
        self._static: list[float | None] = []  # fixed coefficient (static fusion) or None

    # -- building -----------------------------------------------------------
    def add_fusion(self, weight_p: torch.Tensor, bias_p: torch.Tensor | None, rank: int,
                   static_coefficient: float | None = None) -> None:
        """Add one term `(B·A) ⊙ W_p`: B = 0, A Kaiming-uniform, so the function is unchanged.

        With `static_coefficient` the term is the fixed `c · W_p` (no factors; static-fusion ablation).
        """
        if weight_p.shape != self.base.weight.shape:
            raise ValueError(f"fused weight shape {tuple(weight_p.shape)} != {tuple(self.base.weight.shape)}")
        dev = self.base.weight.device
        out_f, in_f = weight_p.shape
        r = min(rank, out_f, in_f)
        k = self._n_terms
        self.register_buffer(f"source_w{k}", weight_p.detach().to(dev, torch.float32).clone(), persistent=False)
        self.register_buffer(f"source_b{k}", None if bias_p is None else bias_p.detach().to(dev, torch.float32).clone(),
                             persistent=False)
        self._n_terms += 1
        self._static.append(static_coefficient)
        if static_coefficient is None:
            self.fusion_A.append(nn.Parameter(_kaiming_uniform((r, in_f)).to(dev)))
            self.fusion_B.append(nn.Parameter(torch.zeros(out_f, r, device=dev)))
            if bias_p is not None and self.base.bias is not None:
                self.fusion_bias.append(nn.Parameter(torch.zeros(out_f, device=dev)))
            else:
                self.fusion_bias.append(nn.Parameter(torch.zeros(0, device=dev), requires_grad=False))
        else:  # placeholders keep term indices aligned
            self.fusion_A.append(nn.Parameter(torch.zeros(0, device=dev), requires_grad=False))
            self.fusion_B.append(nn.Parameter(torch.zeros(0, device=dev), requires_grad=False))
            self.fusion_bias.append(nn.Parameter(torch.zeros(0, device=dev), requires_grad=False))

    @property
    def _sources(self) -> list[torch.Tensor]:
        return [getattr(self, f"source_w{k}") for k in range(self._n_terms)]

    @property
    def _bias_sources(self) -> list[torch.Tensor | None]:
        return [getattr(self, f"source_b{k}") for k in range(self._n_terms)]

    # -- parameters by role (for the optimiser's two learning rates) -----------
    def fusion_parameters(self) -> list[nn.Parameter]:
        """The trainable fusion factors, by role: empty placeholders (static terms, no bias) are left out.

        Not by `requires_grad`: training switches that off at its end, and a retry must get the
        same factors back (it once got none and silently trained LoRA only).
        """
        return [p for p in (*self.fusion_A, *self.fusion_B, *self.fusion_bias) if p.numel()]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.lora_A, self.lora_B) if p is not None]

    # -- the function ----------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """Everything added to `W_n`, in float32 even inside a bf16 autocast region.

        Under autocast `B @ A` would run in bf16 during training while `merge()` (outside
        autocast) computed it in fp32, so the folded model would differ from the trained one.
        """
        dev = self.base.weight.device
        with torch.autocast(dev.type, enabled=False):
            w = torch.zeros(self.out_features, self.in_features, device=dev, dtype=torch.float32)
            if self.lora_A is not None:
                w = w + (self.lora_B @ self.lora_A) * self.lora_scale
            for a, b, src, c in zip(self.fusion_A, self.fusion_B, self._sources, self._static):
                w = w + (c * src if c is not None else (b @ a) * src)
        return w

    def delta_bias(self) -> torch.Tensor | None:
        if self.base.bias is None:
            return None
        d = torch.zeros(self.out_features, device=self.base.bias.device, dtype=torch.float32)
        for coef, src, c in zip(self.fusion_bias, self._bias_sources, self._static):
            if src is None:
                continue
            d = d + (c * src if c is not None else coef * src)
        return d

    def effective_weight(self) -> torch.Tensor:
        return self.base.weight.float() + self.delta_weight()

    def effective_bias(self) -> torch.Tensor | None:
        if self.base.bias is None:
            return None
        return self.base.bias.float() + self.delta_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight().to(x.dtype)
        b = self.effective_bias()
        return F.linear(x, w, None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain `nn.Linear` (the base layer's dtype/device) computing this layer's function."""
        base = self.base
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(self.effective_weight().to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(self.effective_bias().to(base.bias.dtype))
        out.weight.requires_grad_(False)
        if out.bias is not None:
            out.bias.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        lora = 0 if self.lora_A is None else self.lora_A.shape[0]
        return f"in={self.in_features}, out={self.out_features}, lora_rank={lora}, fusion_terms={len(self._sources)}"


def wrap_block(adapter, block: nn.Module, lora_rank: int, lora_scale: float) -> dict[str, FusedLinear]:
    """Replace every linear layer of a block by a FusedLinear (idempotent)."""
    out = {}
    for name, lin in adapter.block_linears(block).items():
        if not isinstance(lin, FusedLinear):
            lin = FusedLinear(lin, lora_rank, lora_scale)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, lin)
        out[name] = lin
    return out


def effective_linear(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) in float32 of a plain or fused linear: an already-fused `p` is materialized."""
    if isinstance(lin, FusedLinear):
        return lin.effective_weight().detach(), (None if lin.base.bias is None else lin.effective_bias().detach())
    return lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach().float()


@torch.no_grad()
def fold_block(adapter, block: nn.Module) -> int:
    """Merge every FusedLinear of a block into a plain nn.Linear; returns how many were merged."""
    count = 0
    for name in adapter.linear_names(block):
        lin = block.get_submodule(name)
        if isinstance(lin, FusedLinear):
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, lin.merge())
            count += 1
    return count


def fold_model(adapter, model: nn.Module) -> int:
    """Merge all fused layers of a model into dense weights."""
    return sum(fold_block(adapter, b) for b in adapter.blocks(model))

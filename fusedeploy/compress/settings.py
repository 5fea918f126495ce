"""Compression settings, the named recipes (`paper`, `cpu`, `quick`), and the job that names one run.

Every field can be overridden by a YAML file or `key=value` pairs; unknown
keys are a one-line UserError, not a silent typo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..builtin import DEFAULT_CALIB, DEFAULT_METHOD
from ..errors import UserError

if TYPE_CHECKING:
    import torch

class CompressSettings(BaseModel):
    """All knobs of a compression run. Defaults are the paper's (the `paper` recipe; docs/algorithm.md)."""

    # allow_inf_nan=False: an infinite or NaN learning rate, beta or scale would only surface as a
    # diverged run much later; every float setting must be a finite number.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    seed: int = 0
    # data
    mi_samples: int = Field(32, ge=1, description="calibration sequences for MI / BI / SLEB scoring")
    ft_samples: int = Field(1024, ge=1, description="sequences for local distillation")
    seq_len: int = Field(2048, ge=2)
    # --calib self: how the dense model samples its own calibration text
    self_temperature: float = Field(1.0, gt=0, description="sampling temperature of self-generated calibration text")
    self_top_p: float = Field(1.0, gt=0, le=1, description="nucleus (top-p) of self-generated calibration text")
    self_greedy_tokens: int = Field(0, ge=0, description="tokens after the start taken greedily, then sampled")
    self_prompt_tokens: int = Field(0, ge=0, description="tokens of the built-in text each sequence starts from "
                                                         "(0 = one random vocabulary token)")
    self_builtin_share: float = Field(0.0, ge=0, le=1, description="share of the sequences taken whole from the "
                                                                   "built-in text instead of sampled")
    self_sample_tokens: int = Field(0, ge=0, description="length of each self-written sample, cut into seq_len windows "
                                                         "(0 = seq_len: one window per sample)")
    # group and fusion
    group_size: int = Field(7, ge=1, description="G: neighbours around the removed block")
    fusion_rank: int = Field(128, ge=1, description="r of the (B·A) fusion coefficients (capped at min(out, in))")
    lora_rank: int = Field(128, ge=0, description="rank of the neighbours' LoRA (0 = none)")
    lora_scale: float = 1.0
    train_norms: bool = True
    # distillation
    epochs: int = Field(20, ge=0)
    batch_size: int = Field(8, ge=2, description="mini-batch; >= 2 because the KL softmax runs over the batch")
    lr_fusion: float = Field(1e-3, gt=0, description="fusion factors A, B and bias coefficients")
    lr_other: float = Field(9.65e-6, gt=0, description="LoRA and norms")
    lr_mi_lora: float = Field(1e-3, gt=0, description="LoRA learning rate in the mi-lora ablation (no fusion factors)")
    warmup: float = Field(0.0, ge=0, lt=1, description="share of each group's steps spent warming the learning "
                                                       "rate up linearly before the cosine decay (0 = none, the paper)")
    # beyond the paper, each off in the `paper` recipe
    target: Literal["group", "dense"] = Field(
        "group", description="what a group's distillation reproduces: the group's own output with p (the paper) "
                             "or the dense model's hidden state at the same depth (corrects earlier groups' error)")
    heal_steps: int = Field(0, ge=0, description="final healing pass of methods that train: optimizer steps of logit "
                                                 "distillation from the dense model into a LoRA on every kept block "
                                                 "(0 = off)")
    heal_rank: int = Field(8, ge=1, description="LoRA rank of the healing pass")
    heal_lr: float = Field(2e-4, gt=0, description="learning rate of the healing pass")
    repair_init: Literal["none", "lstsq"] = Field(
        "none", description="start of a repair: none (the paper) or lstsq, the removed block's least-squares linear "
                            "map folded into the block before it, then fused and distilled (compress/repair_init.py)")
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # static fusion ablation: W_n + c * W_p with c fixed; None = 1 / (number of neighbours)
    static_coefficient: float | None = None
    # guards
    max_retries: int = Field(2, ge=0, description="retries of a diverging distillation")
    lr_backoff: float = Field(0.3, gt=0, lt=1)
    # fusegpt-evo (appendix §1.2): the evolutionary search over which blocks to remove (search.py)
    evo_generations: int = Field(5, ge=1, le=1000, description="fusegpt-evo: generations of the block-set search")
    evo_candidates: int = Field(5, ge=1, le=1000, description="fusegpt-evo: new block sets evaluated per generation")
    # execution
    offload: bool = Field(False, description="keep blocks on CPU and move one group at a time to the device")
    score_batch: int = Field(8, ge=1, description="sequences per forward when scoring / caching")

    @field_validator("self_prompt_tokens")
    @classmethod
    def _prompt_leaves_room(cls, value: int, info: ValidationInfo) -> int:
        if value and value >= info.data.get("seq_len", value + 1):
            raise ValueError(f"must be below seq_len ({info.data['seq_len']}), or the model would write nothing")
        return value

    @field_validator("self_sample_tokens")
    @classmethod
    def _sample_is_whole_windows(cls, value: int, info: ValidationInfo) -> int:
        length = info.data.get("seq_len")
        if value and length and value % length:
            raise ValueError(f"must be a multiple of seq_len ({length}), so every window is whole")
        return value


RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    # SmolLM2-135M at 25 % (8 of 30 blocks) in under 15 min on a 2-core CPU (BENCHMARKS.md).
    # Shrinks: scoring set 32x2048 -> 4x256 tokens, distillation set 1024x2048 -> 128x256 seen once
    # (16 optimizer steps per group instead of 2560; distinct tokens rather than repeated epochs).
    # Rebalances for the short budget: LoRA/norm rate 9.65e-6 -> 1e-3 (a zero-initialised LoRA barely
    # moves in 16 steps at the paper's rate) with the LoRA rank 128 -> 32, and the fusion rate
    # 1e-3 -> 1e-2 after a 10 % warm-up, so the fusion terms (whose updates scale with |W_p| ~ 0.2)
    # keep pace with the LoRA instead of being outrun six-fold. Adds the healing pass (16 steps).
    # Keeps G, the fusion rank, mini-batch and the loss.
    "cpu": {"mi_samples": 4, "ft_samples": 128, "seq_len": 256, "epochs": 1, "lr_other": 1e-3,
            "lr_fusion": 1e-2, "warmup": 0.1, "lora_rank": 32, "heal_steps": 16, "heal_lr": 2e-3},
    # smoke test on tiny models: seconds
    "quick": {"mi_samples": 2, "ft_samples": 8, "seq_len": 32, "epochs": 1, "batch_size": 4,
              "group_size": 3, "fusion_rank": 8, "lora_rank": 4},
}


def _parse_value(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; users mean the number
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["epochs=2", "lr_fusion=5e-4"]` -> {"epochs": 2, "lr_fusion": 0.0005}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = _parse_value(value.strip())
        except ValueError:  # e.g. an integer of thousands of digits
            raise UserError(f"--set {key.strip()}: the value cannot be read as a setting "
                            f"({value.strip()[:20]}...)") from None
    return out


def default_recipe() -> str:
    """`paper` when a CUDA GPU is visible, else `cpu` (the paper budget would take days on a CPU)."""
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"


def load_recipe(name: str | None = None, overrides: dict | None = None, config_file: str | Path | None = None) -> CompressSettings:
    """Recipe defaults, then a YAML file's keys, then `overrides` (later wins). None = default_recipe()."""
    name = name or default_recipe()
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    values = dict(RECIPES[name])
    if config_file is not None:
        from ..preflight import check_yaml_mapping

        values.update(check_yaml_mapping(config_file, "config file"))
    values.update(overrides or {})
    try:
        return CompressSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UserError(f"bad compression setting {loc!r}: {err['msg']}") from None


@dataclass(frozen=True)
class CompressJob:
    """One compression run as a single value: what to compress, into where, how far and how.

    The command line, the build's compress stage and the benchmarks each describe a run once and
    hand it to `compress_model` whole, instead of threading a dozen arguments through every phase.
    `settings` are the recipe's hyperparameters (`CompressSettings`, None = `load_recipe()`); the
    rest says which model, output, data and device, and how much host memory the run may take
    (`max_host_memory`; `stream` forces the streamed or the in-memory plan, for tests and
    benchmarks). The driver checks the values in its first phase
    and fingerprints the resumable state from them (model, method, sparsity, calib, calib_part,
    settings, keep_steps, with the device and dtype they resolve to). `resume` and `force` only say
    what to do with an earlier run's state or output. A progress callback is not part of the job:
    it changes no output.
    """

    model: str  # a name, folder or GGUF file (`preflight.model_location`)
    out: str | os.PathLike  # the output folder; the state of an unfinished run sits beside it
    sparsity: float  # share of the blocks to remove, 0 < sparsity < 1
    method: str = DEFAULT_METHOD  # a row of `methods.REGISTRY`
    calib: str = DEFAULT_CALIB  # calibration text, or "self" (the dense model samples its own)
    calib_part: str | None = None  # "calib": only that part of a text evaluation shares (`data.split`)
    settings: CompressSettings | None = None
    resume: bool = False  # continue the saved state of an interrupted run
    force: bool = False  # replace a finished output, discard a saved state
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    keep_steps: bool = False  # also keep what rebuilds the model after every removal (`steps.rebuild`)
    max_host_memory: float | None = None  # GB the run may use on the host (None: the machine's; `hostplan`)
    stream: bool | None = None  # blocks read from disk when used: None = when the in-memory plan does not fit

    def __post_init__(self):
        if self.settings is None:
            object.__setattr__(self, "settings", load_recipe())

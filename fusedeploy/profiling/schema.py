"""Hardware profiles: the schema, and loading by name or path with one-line errors.

Profiles are data (`profiles/*.yaml` at the repository root); units are in the
field names so a YAML file reads unambiguously.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from .. import formats
from ..errors import UserError
from ..preflight import check_yaml_mapping


class Budgets(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_memory_gb: float = Field(gt=0)
    min_decode_tokens_per_s: float = Field(ge=0)
    max_time_to_first_token_s: float = Field(gt=0)
    # quality: the deployed compressed artifact's perplexity / the dense artifact's at the same precision,
    # both measured in the deployed runtime on evaluation text that calibration never read
    max_perplexity_ratio: float | None = Field(None, ge=1)
    # task accuracy (build --eval-tasks): the largest drop, dense minus compressed, over the tasks, as a
    # fraction (0.02 = two points of accuracy)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    # zero-shot retention (build --zero-shot): the deployed model's HellaSwag acc_norm over the dense
    # model's, on the same seeded subset, at least this (0.95: keeps 95 % of the dense accuracy)
    min_zero_shot_retention: float | None = Field(None, gt=0, le=1)
    # serving: output tokens/s of the served deployed artifact under `serving_concurrency` clients
    # (one of the profile's `serving.concurrency`; default: the highest), projected like decode speed
    min_serving_tokens_per_s: float | None = Field(None, ge=0)
    serving_concurrency: int | None = Field(None, ge=1)


class Serving(BaseModel):
    """The serving load test of the build's profile stage: `fusedeploy bench-serve`'s settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    concurrency: list[PositiveInt] = Field(default_factory=lambda: [1, 4], min_length=1)  # clients, one level each
    duration_s: float = Field(10.0, gt=0)  # per level; each level stops by itself
    max_tokens: int = Field(32, ge=1)  # output tokens per request

    @field_validator("concurrency")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"concurrency {value} repeats a level")
        return value


def _default_zero_shot_items() -> int:
    from ..evaluate.zero_shot import DEFAULT_ITEMS

    return DEFAULT_ITEMS


class ZeroShot(BaseModel):
    """The zero-shot subset a build scores (`build --zero-shot`): its size and the permutation's seed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # default 1112: the standard error of an accuracy at most 1.5 points whatever the accuracy
    items: PositiveInt = Field(default_factory=_default_zero_shot_items)
    seed: int = Field(0, ge=0)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf bandwidth would divide by zero

    name: str
    description: str = ""
    memory_total_gb: float = Field(gt=0)
    memory_available_gb: float = Field(gt=0)
    memory_bandwidth_gbps: float = Field(gt=0)  # GB/s, peak
    compute_tflops: float = Field(gt=0)  # dense peak at the runtime's working precision
    cpu_cores: int = Field(ge=1)
    accelerator: str | None = None
    runtime: str  # a runtime of fusedeploy.formats (its file-format name is accepted too)
    quant_types: list[str] = Field(min_length=1)
    context_length: int = Field(ge=16)
    batch_size: int = Field(ge=1)
    prompt_tokens: int = Field(ge=1)  # prompt length for time-to-first-token
    budgets: Budgets
    serving: Serving | None = None  # the serving load test; off unless set (or budgeted, or `build --serve-load`)
    zero_shot: ZeroShot | None = None  # the subset `build --zero-shot` scores (None: ZeroShot's defaults)
    sources: list[str] = Field(min_length=1)  # where each hardware figure comes from

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        """One name per runtime; the old spelling (its file format, e.g. `gguf`) still loads."""
        try:
            return formats.runtime(value).name
        except UserError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        allowed = formats.precision_names(self.runtime)
        bad = [q for q in self.quant_types if q not in allowed]
        if bad:
            raise ValueError(f"quant_types {bad} are not {self.runtime} types ({', '.join(allowed)})")
        if self.memory_available_gb > self.memory_total_gb:
            raise ValueError("memory_available_gb is larger than memory_total_gb")
        if self.budgets.max_memory_gb > self.memory_available_gb:
            raise ValueError("budgets.max_memory_gb is larger than memory_available_gb")
        if self.prompt_tokens > self.context_length:
            raise ValueError("prompt_tokens is larger than context_length")
        return self._serving_budget()

    def _serving_budget(self) -> Profile:
        """A serving budget turns the load test on (default settings when the profile gives none) and names
        the client count it is judged at (default: the highest level), so the dumped profile says both."""
        b = self.budgets
        if b.serving_concurrency is not None and b.min_serving_tokens_per_s is None:
            raise ValueError("budgets.serving_concurrency is set without budgets.min_serving_tokens_per_s")
        if b.min_serving_tokens_per_s is None:
            return self
        if self.serving is None:
            self.serving = Serving()
        if b.serving_concurrency is None:
            b.serving_concurrency = max(self.serving.concurrency)
        elif b.serving_concurrency not in self.serving.concurrency:
            raise ValueError(f"budgets.serving_concurrency {b.serving_concurrency} is not one of "
                             f"serving.concurrency {self.serving.concurrency}")
        return self

    def with_serving(self, on: bool | None) -> Profile:
        """The profile a build runs: `--serve-load` (True) adds the load test with default settings where the
        profile has none; `--no-serve-load` (False) drops it and its budget; None leaves the profile as it is."""
        if on is None or (on and self.serving is not None):
            return self
        if on:
            return self.model_copy(update={"serving": Serving()})
        budgets = self.budgets.model_copy(update={"min_serving_tokens_per_s": None, "serving_concurrency": None})
        return self.model_copy(update={"serving": None, "budgets": budgets})


# A wheel install has no repository beside the package; pyproject's data-files puts the
# shipped profiles under <prefix>/share/fusedeploy/profiles instead.
CHECKOUT_PROFILES = Path(__file__).resolve().parents[2] / "profiles"
INSTALLED_PROFILES = Path(sys.prefix) / "share" / "fusedeploy" / "profiles"


def profiles_dir() -> Path:
    """`$FUSEDEPLOY_PROFILES`, else the repository's `profiles/` (a checkout), else the installed copy."""
    env = os.environ.get("FUSEDEPLOY_PROFILES")
    if env:
        return Path(env)
    return CHECKOUT_PROFILES if CHECKOUT_PROFILES.is_dir() else INSTALLED_PROFILES


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "profile"
    return f"field '{where}': {err['msg']}"


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or the user's own YAML file by path."""
    path = Path(name_or_path).expanduser()
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = profiles_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown profile {name_or_path!r}; shipped: {', '.join(shipped_profiles())} "
                            "(or give a path to your own .yaml)")
    elif not path.is_file():
        raise UserError(f"profile file not found: {name_or_path}")
    data = check_yaml_mapping(path, "profile")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"profile {path}: {_first_error(exc)}") from None

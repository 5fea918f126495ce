"""Hardware profiles: the schema, and loading by name or path with one-line errors.

Profiles are data (`profiles/*.yaml` at the repository root); units are in the
field names so a YAML file reads unambiguously.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import formats
from ..errors import UserError


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
        return self


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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"profile {path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"profile {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"profile {path}: expected a mapping of fields at the top level")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"profile {path}: {_first_error(exc)}") from None

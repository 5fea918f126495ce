"""The build: a resumable stage runner and the plan -> ... -> report pipeline."""

from .flow import BuildOptions, build
from .stages import Stage, run_stage

__all__ = ["BuildOptions", "Stage", "build", "run_stage"]

"""The build pipeline: plan -> compress -> export -> verify -> profile -> report into one folder.

Modules: `stages` (the resumable stage runner: one folder and manifest per
stage, skipped when its key -- everything it reads -- is unchanged) and
`flow` (`BuildOptions` and `build`, the stages in order).
"""

from .flow import BuildOptions, build
from .stages import Stage, run_stage

__all__ = ["BuildOptions", "Stage", "build", "run_stage"]

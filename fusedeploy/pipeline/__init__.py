"""The build pipeline: plan -> compress -> export -> verify -> profile -> report into one folder.

Modules: `stages` (one module per stage, each a frozen config, its declared
inputs and `run`; and the resumable runner: one folder and manifest per stage,
skipped when its key -- everything it reads -- is unchanged), `flow`
(`BuildOptions`, the preflight and `build`, the stages in order) and `curve`
(the quality-vs-sparsity curve's measurement and choice).
"""

from .flow import BuildOptions, build
from .stages import Stage, run_stage

__all__ = ["BuildOptions", "Stage", "build", "run_stage"]

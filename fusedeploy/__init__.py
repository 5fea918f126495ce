"""FuseDeploy: compress a decoder-only LM with FuseGPT and ship it to a small device.

Where things live (dependencies point down; docs/design.md has the whole map):
- `cli` -- the `fusedeploy` command: parses, calls the library, prints.
- `pipeline/` -- `fusedeploy build`: the stages and the resumable stage runner.
- `formats` -- the one catalogue of runtimes and precisions, and the `Artifact` stages exchange.
- `compress/` -- FuseGPT and the baselines: scorers, repairs, the fused layer, the driver.
- `models/` -- one adapter per architecture family, and model loading.
- `data/` -- text sources and token sampling.
- `evaluate/` -- perplexity behind one interface for PyTorch, llama.cpp and ONNX Runtime.
- `profiling/` -- hardware profiles, the planner, measurement, projection, the report.
- `builtin` (shipped models), `errors` (UserError), `console`, `hub`, `model_facts` (`fusedeploy info`).
The exporters (GGUF, ONNX, verify) are the sibling top-level package `exporters`.
"""

__version__ = "0.1.0"

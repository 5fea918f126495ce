"""FuseGPT compression: scores, fused layers, local distillation, the iterative driver, folding.

Modules: `methods` (the registry: a scorer and a repair per method), `settings` (recipes, and
`CompressJob`, one run), `activations` (host-resident activation sets streamed per mini-batch),
`runner` (blocks run standalone on those activations, offloaded or not), `scores` (MI with cached
prefix, BI, SLEB), `search` (a one-shot method's set: the lowest scores, or fusegpt-evo's
evolutionary search), `fused` (FusedLinear, fold), `distill` (groups, repairs, local KL distillation
with rollback), `parallel` (torch.distributed split of scoring and distillation), `state`
(resumable state as JSON + safetensors), `hostplan` (host memory: the in-memory or the streamed plan),
`streaming` (blocks read from safetensors only while used), `shards` (a checkpoint written tensor by
tensor), `driver` (`compress_model(job)`: setup, restore, iterate, write the checkpoint).

Choices where the algorithm leaves room (docs/algorithm.md; documented here and in the modules):
- After each iteration every FusedLinear is merged into a plain dense layer. An already-fused
  neighbour's earlier terms *and its LoRA* therefore become one frozen matrix and the next
  iteration adds a fresh pair and a fresh LoRA (zero-initialised) on top; an already-fused `p`
  is its materialized weight. The computed function never changes (docs/algorithm.md, step 3, allows the
  materialization), the resumable state is a plain state_dict, and the final fold is exact.
- static-fusion uses the fixed coefficient c = 1 / (number of neighbours): each of the G
  neighbours receives an equal share of p's weights, W_n + W_p / G (settings.static_coefficient).
- mi-lora trains the neighbours' LoRA (lr_mi_lora = 1e-3, the fusion factors' rate) and norms
  with the same local distillation, but no fusion terms; with the paper's 9.65e-6 LoRA rate a
  zero-initialised LoRA would barely move in a CPU budget. The `cpu` recipe raises FuseGPT's own
  LoRA/norm rate (lr_other) to 1e-3 for the same reason, so there MI + LoRA is exactly FuseGPT
  without the fusion terms.
- Divergence guard: NaN during training, or a final distillation loss above the starting loss,
  rolls the group back and retries with lr x lr_backoff (max_retries times), then keeps the
  untrained fusion (= p removed) and records `gave_up`.

Public API::

    from fusedeploy.compress import CompressJob, compress_model, load_recipe
    settings = load_recipe("cpu", {"epochs": 2})
    job = CompressJob("smollm2-135m", "out/", 0.25, method="fusegpt", calib="data.txt", settings=settings)
    report = compress_model(job)
"""

import importlib

# Each public name and the module that defines it. Imported on first use, so that a light
# submodule (`methods`, the registry the command line's help lists) loads without torch.
_PUBLIC = {
    "driver": ("blocks_to_remove", "compress_model", "has_resumable_state", "state_dir"),
    "fused": ("FusedLinear", "fold_block", "fold_model"),
    "methods": ("METHODS", "REGISTRY"),
    "settings": ("RECIPES", "CompressJob", "CompressSettings", "load_recipe", "parse_overrides"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value

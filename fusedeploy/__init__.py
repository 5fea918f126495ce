"""FuseDeploy: compress a decoder-only LM with FuseGPT and ship it to a small device."""

__version__ = "0.1.0"

"""Stage 5, profile: every artifact measured in its runtime, in its own process, and projected onto the profile.

With a serving section the deployed artifact is also load-tested behind the HTTP server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import say
from .verify import artifacts as exported

NAME = "profile"
INPUTS = ("export", "plan")
WRITES = ("profile.json", "serve.log")


@dataclass(frozen=True)
class Config:
    # The projection reads the whole profile (hardware figures, context, batch), the model's shape
    # and each runtime's KV-cache width; the export stage's key holds the removed blocks.
    prompt_tokens: int
    new_tokens: int
    runs: int
    profile: dict
    shape: dict
    kv_bytes: dict  # runtime -> bytes per KV-cache element


def run(config: Config, inputs: dict, work: Path) -> dict:
    from ...profiling.measure import calibrate_host, measure_artifact, project
    from ...profiling.planner import ModelShape
    from ...profiling.schema import Profile

    profile, shape = Profile.model_validate(config.profile), ModelShape(**config.shape)
    k = inputs["export"].settings["k"]
    artifacts = exported(inputs["export"])
    host = calibrate_host()
    results = {"host": host.to_dict(), "artifacts": {}}
    for name, a in artifacts.items():
        say(f"profile {name}")
        measured = measure_artifact(a.path, prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens,
                                    runs=config.runs)
        kept = shape.blocks - (k if a.variant == "compressed" else 0)
        kv_bytes = shape.kv_bytes_per_token(kept, a.runtime)
        results["artifacts"][name] = {"measured": measured,
                                      "projected": project(measured, host, profile, kv_bytes, a.size_bytes)}
    if profile.serving is not None:  # the load test, of the deployed artifact only; its settings are in the key
        from ...serve.load_step import serving_step

        name = next(n for n, a in artifacts.items() if a.variant == "compressed" and a.runtime == profile.runtime)
        say(f"serve {name} under load: {profile.serving.concurrency} clients, {profile.serving.duration_s:g} s")
        served = serving_step(artifacts[name].path, profile, host, work / "serve.log")
        results["serving"] = {"artifact": name, **served}
    (work / "profile.json").write_text(json.dumps(results, indent=2))
    return results

"""Where does a compression's CPU time go against a plain forward? One process, the built-in SmolLM2.

Times (mean of 2 after a warm-up) a whole-model forward of 8 x 256 tokens with the real weights and
with random ones, the compression runner's block-by-block replay of the same tokens, and one
forward + backward through a group of 8 blocks as local distillation runs it.
"""
import time

import torch

from fusedeploy.compress.runner import BlockRunner
from fusedeploy.models import adapter_for
from fusedeploy.models.loading import load_model
from transformers import LlamaForCausalLM


def timed(f, n=2):
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


model, _, _ = load_model("smollm2-135m", device="cpu", dtype="float32")
model.eval().requires_grad_(False)
rand = LlamaForCausalLM(model.config).float().eval().requires_grad_(False)
ids = torch.randint(0, model.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))
runner = BlockRunner(model, adapter_for(model), torch.device("cpu"), torch.float32)
runner.capture_kwargs(256)
h0 = torch.cat([h for _, h in runner.block0_inputs(ids, 8).batches(8)])
with torch.no_grad():
    real = timed(lambda: model(input_ids=ids, use_cache=False))
    rnd = timed(lambda: rand(input_ids=ids, use_cache=False))
    replay = timed(lambda: runner.run_range(0, 30, h0))
group = [runner.blocks[i] for i in range(10, 18)]
for b in group:
    b.requires_grad_(True)


def step():
    out = runner.run_range(10, 18, h0)
    out.float().pow(2).mean().backward()


fb = timed(step)
print(f"threads {torch.get_num_threads()} | forward 8x256 real {real:.2f} s, random {rnd:.2f} s | "
      f"block replay of 30 blocks {replay:.2f} s | group of 8 fwd+bwd {fb:.2f} s", flush=True)

"""Is bf16 worth it for compression on this CPU? fp32 against bf16 for the matmuls that dominate it.

Profiles of a compression (py-spy) put 60-70 % of its time in Linear forward and backward. This times
one SmolLM2-135M-shaped MLP (576 -> 1536 -> 576, SiLU gate) forward and backward on 2048 tokens,
fp32 then bf16, twice each, mean of 20 steps after a warm-up. A CPU with AVX512-BF16 runs bf16
matmuls natively; one without converts and may be slower.
"""
import time

import torch

torch.manual_seed(0)
print("threads", torch.get_num_threads(), "torch", torch.__version__)
for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
    up = torch.nn.Linear(576, 1536, bias=False).to(dtype)
    gate = torch.nn.Linear(576, 1536, bias=False).to(dtype)
    down = torch.nn.Linear(1536, 576, bias=False).to(dtype)
    x = torch.randn(2048, 576, dtype=dtype, requires_grad=True)

    def step():
        y = down(torch.nn.functional.silu(gate(x)) * up(x))
        y.float().square().mean().backward()

    step()
    start = time.perf_counter()
    for _ in range(20):
        step()
    print(dtype, f"{(time.perf_counter() - start) / 20 * 1000:.1f} ms per forward + backward")

"""Greedy against sampled decoding on one running server: milliseconds per output token of one request at a
time (64 tokens, ignore_eos), twice each, alternating. Start the server first, e.g.

    fusedeploy serve fg25-int4 --port 8812 --parallel 4 --ctx 512 &
    python benchmarks/log/2026-12-06-sampling-cost.py http://127.0.0.1:8812 ../shared/data/wikitext-2/test.txt
"""
import json
import sys
import time

import httpx

url, text = sys.argv[1], sys.argv[2]
prompt = open(text, encoding="utf-8").read()[5000:5600]
out: dict[float, list[float]] = {}
for temperature in (0.0, 1.0, 0.0, 1.0):
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 64, "temperature": temperature,
                                                  "ignore_eos": True}, timeout=120)
    r.raise_for_status()
    n = r.json()["usage"]["completion_tokens"]
    out.setdefault(temperature, []).append(round((time.perf_counter() - t0) / n * 1000, 1))
print(json.dumps({f"temperature {k}": v for k, v in out.items()}), "ms per output token")

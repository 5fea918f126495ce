"""`fusedeploy bench-serve` and guidellm against the same server under the same load, side by side.

For each artifact (a .gguf file or an ONNX Runtime GenAI folder) this starts
`fusedeploy serve ARTIFACT` on a free port, writes one prompt file, and runs
both load generators against the server, one after the other:

- the same route: streamed /v1/completions, greedy, `ignore_eos`, exactly
  --output-tokens tokens per request (guidellm sends `max_tokens` and
  `ignore_eos` from the file's `output_tokens_count`);
- the same prompts: --prompt-tokens tokens each by the model's tokenizer,
  windows of the built-in corpus at random offsets (no shared prefix), in a
  JSONL file both read (`prompt`, `prompt_tokens_count`, `output_tokens_count`);
- the same load: --concurrency clients sending back to back, for --duration
  seconds (guidellm: `--profile kind=concurrent,streams=C` and
  `--constraint kind=max_duration,seconds=D`).

It prints requests/s, output tokens/s, time to first token and inter-token
latency from both. Throughput is taken the same way from both: completed
requests and streamed output tokens (cut-off requests' too) over the
measured window. Inter-token latency is not quite the same figure:
bench-serve's percentiles are over every gap between tokens, guidellm's over
each request's mean gap. guidellm runs its own worker processes, which on a
machine with few cores compete with the server for CPU (bench-serve is one
asyncio process), so compare the two on a machine with cores to spare; a
large gap there means one of the tools (or the server) misbehaves.

Offline: guidellm reads the tokenizer from a local folder (--tokenizer, the
model folder; an ONNX folder carries its own), HF_HUB_OFFLINE=1 is set.

    python benchmarks/serve_crosscheck.py build/x/export/model.gguf build/x/export/model-onnx \\
        --tokenizer build/x/compress/model --concurrency 4 --duration 30 --out-json crosscheck.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def exact_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` windows of the built-in corpus that tokenize to exactly `length` tokens, at random offsets."""
    from fusedeploy.data.sources import builtin_text

    ids = tokenizer(builtin_text(), add_special_tokens=False)["input_ids"]
    if len(ids) <= length:
        raise SystemExit(f"error: the built-in corpus has {len(ids)} tokens, not more than --prompt-tokens {length}")
    rng, out = random.Random(seed), []
    for _ in range(count * 20):
        start = rng.randrange(0, len(ids) - length)
        text = tokenizer.decode(ids[start:start + length])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == length:
            out.append(text)
            if len(out) == count:
                return out
    raise SystemExit(f"error: could not cut {count} prompts of exactly {length} tokens from the built-in corpus")


def start_server(artifact: Path, parallel: int, ctx: int, api_key: str) -> tuple[subprocess.Popen, str, str]:
    """`fusedeploy serve` on a free port: (process, base URL, model id)."""
    proc = subprocess.Popen([sys.executable, "-m", "fusedeploy.cli", "serve", str(artifact), "--port", "0",
                             "--parallel", str(parallel), "--ctx", str(ctx), "--api-key", api_key],
                            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving "):  # "serving ID (runtime, --parallel N) at http://HOST:PORT/v1  ..."
            model_id = line.split()[1]
            url = line.split(" at ")[1].split()[0].removesuffix("/v1")
            return proc, url, model_id
    proc.kill()
    raise SystemExit(f"error: the server for {artifact} did not start:\n{''.join(lines)}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_bench_serve(url: str, key: str, prompts: Path, args) -> dict:
    from fusedeploy.serve.bench import bench_serve

    level = bench_serve(url, [args.concurrency], args.duration, prompts=prompts, output_len=str(args.output_tokens),
                        api_key=key, seed=args.seed)["levels"][0]
    ms = lambda d, k: None if d.get(k) is None else 1000 * d[k]  # noqa: E731
    return {"requests_per_s": level["requests_per_s"], "output_tokens_per_s": level["output_tokens_per_s"],
            "ttft_ms_p50": ms(level["ttft_s"], "p50"), "ttft_ms_p95": ms(level["ttft_s"], "p95"),
            "itl_ms_p50": ms(level["token_latency_s"], "p50"), "itl_ms_p95": ms(level["token_latency_s"], "p95"),
            "completed": level["requests_completed"], "errors": level["errors"]}


def run_guidellm(url: str, key: str, model_id: str, prompts: Path, tokenizer: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "guidellm", "run",
           # greedy, as bench-serve asks: guidellm sends no temperature of its own, so a server's
           # default (1.0, sampling) would decide, and og's sampler costs more per token than its argmax
           "--backend", json.dumps({"kind": "openai_http", "target": url, "model": model_id, "api_key": key,
                                    "request_format": "/v1/completions", "extras": {"body": {"temperature": 0.0}}}),
           "--profile", f"kind=concurrent,streams={args.concurrency}",
           "--constraint", f"kind=max_duration,seconds={args.duration:g}",
           "--data", f"kind=json_file,path={prompts}",
           "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    done = subprocess.run(cmd, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=args.duration + 600)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"error: guidellm failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    run = json.loads(out.read_text())["benchmarks"][0]
    metrics, window = run["metrics"], run["duration"]

    def stat(name: str, key: str, group: str = "successful"):
        d = metrics[name][group]
        return d["median"] if key == "p50" else d["percentiles"][key]

    totals = metrics["request_totals"]
    # over guidellm's measured window, as its summary line gives them (output tokens of cut-off requests too)
    return {"requests_per_s": totals["successful"] / window,
            "output_tokens_per_s": metrics["output_token_count"]["total"]["total_sum"] / window,
            "ttft_ms_p50": stat("time_to_first_token_ms", "p50"), "ttft_ms_p95": stat("time_to_first_token_ms", "p95"),
            "itl_ms_p50": stat("inter_token_latency_ms", "p50"), "itl_ms_p95": stat("inter_token_latency_ms", "p95"),
            "completed": totals["successful"], "errors": totals["errored"]}


ROWS = [("requests/s", "requests_per_s"), ("output tokens/s", "output_tokens_per_s"),
        ("TTFT p50 (ms)", "ttft_ms_p50"), ("TTFT p95 (ms)", "ttft_ms_p95"),
        ("inter-token p50 (ms)", "itl_ms_p50"), ("inter-token p95 (ms)", "itl_ms_p95"),
        ("requests completed", "completed"), ("errors", "errors")]


def table(name: str, bench: dict, guide: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [f"## {name}", "", "| | bench-serve | guidellm |", "|---|---:|---:|"]
    lines += [f"| {label} | {fmt(bench.get(k))} | {fmt(guide.get(k))} |" for label, k in ROWS]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", type=Path, help=".gguf files or ONNX Runtime GenAI folders")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="Hugging Face tokenizer folder (the model folder); default: the artifact's folder")
    ap.add_argument("--concurrency", type=int, default=4, help="clients sending back to back (both tools)")
    ap.add_argument("--parallel", type=int, default=None, help="server slots (default: --concurrency)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per tool")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args()
    if args.concurrency < 1 or args.duration <= 0 or args.prompt_tokens < 1 or args.output_tokens < 1:
        ap.error("--concurrency, --duration, --prompt-tokens and --output-tokens must be positive")
    for a in args.artifacts:
        if not a.exists():
            ap.error(f"no such artifact: {a}")
        if args.tokenizer is None and not (a.is_dir() and (a / "tokenizer_config.json").is_file()):
            ap.error(f"{a} carries no tokenizer: give --tokenizer MODEL_FOLDER")

    import secrets

    from transformers import AutoTokenizer

    results = {}
    with tempfile.TemporaryDirectory(prefix="fusedeploy-crosscheck-") as tmp:
        for artifact in args.artifacts:
            tokenizer_dir = args.tokenizer or artifact
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            # enough distinct prompts for both runs at a generous request rate
            count = max(200, int(args.concurrency * args.duration * 4))
            prompts = Path(tmp, f"{artifact.name}-prompts.jsonl")
            prompts.write_text("".join(json.dumps({"prompt": p, "prompt_tokens_count": args.prompt_tokens,
                                                   "output_tokens_count": args.output_tokens}) + "\n"
                                       for p in exact_prompts(tokenizer, count, args.prompt_tokens, args.seed)))
            key = secrets.token_urlsafe(16)
            proc, url, model_id = start_server(artifact, args.parallel or args.concurrency, args.ctx, key)
            try:
                bench = run_bench_serve(url, key, prompts, args)
                guide = run_guidellm(url, key, model_id, prompts, tokenizer_dir, Path(tmp, f"{artifact.name}.json"),
                                     args)
            finally:
                stop(proc)
            results[str(artifact)] = {"bench_serve": bench, "guidellm": guide}
            print(table(f"{artifact} (concurrency {args.concurrency}, {args.prompt_tokens} prompt + "
                        f"{args.output_tokens} output tokens, {args.duration:g} s)", bench, guide), flush=True)
            print(flush=True)
    if args.out_json:
        args.out_json.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(args).items() if k != "artifacts"},
                                             "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""One iteration of the `paper` recipe on random-initialised models with real shapes, timed part by part.

Speed and memory need no trained weights, so the model is built from a config with the shapes of
SmolLM2-135M, Llama-3.2-1B or Llama-3.1-8B and random weights. One iteration is what the driver
does per removed block: build the MI activation cache, score every block, run the fine-tuning set
to the group, compute the teacher, distil, fold. Scoring runs at the paper's full size (32 x 2048
tokens). Distillation runs `--ft-samples` sequences for `--epochs` epochs; its per-step time is
steady, so the paper's 1024 sequences x 20 epochs (2560 steps) is projected from it, and so are
the passes over the fine-tuning set (teacher, evaluations), which scale with its length.

    python benchmarks/gpu_scale.py --shape llama-3.1-8b --out-json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

SHAPES = {
    # hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings (from each model's config.json)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def build(shape: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # random init is fast on the GPU; the engine keeps fp32 master weights
        model = LlamaForCausalLM(cfg).float().eval()
    model.requires_grad_(False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--ft-samples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--offload", action="store_true", help="blocks on the host, one group on the device")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    ap.add_argument("--set", action="append", default=[], help="setting override key=value (smoke tests)")
    args = ap.parse_args()

    from fusedeploy.compress.activations import reset_stream_stats
    from fusedeploy.compress.distill import distill_group, fold_group, group_range
    from fusedeploy.compress.driver import blocks_to_remove
    from fusedeploy.compress.runner import BlockRunner
    from fusedeploy.compress.scores import ActivationCache, mi_scores
    from fusedeploy.compress.settings import load_recipe, parse_overrides
    from fusedeploy.models import adapter_for

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = (lambda: torch.cuda.max_memory_allocated(dev)) if cuda else (lambda: 0)
    reset_peak = (lambda: torch.cuda.reset_peak_memory_stats(dev)) if cuda else (lambda: None)
    settings = load_recipe("paper", {"ft_samples": args.ft_samples, "epochs": args.epochs,
                                     "offload": args.offload, **parse_overrides(args.set)})
    rec: dict = {"shape": args.shape, "offload": args.offload, "settings": settings.model_dump(),
                 "gpu": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
                 "load_before": os.getloadavg()[0]}
    t = time.time()
    model = build(args.shape, dev)
    if args.offload:
        model.to("cpu")
    sync()
    rec["params"] = sum(p.numel() for p in model.parameters())
    rec["time_build_s"] = time.time() - t
    adapter = adapter_for(model)
    n = len(adapter.blocks(model))
    stats = reset_stream_stats()
    reset_peak()
    runner = BlockRunner(model, adapter, dev, torch.bfloat16 if cuda else torch.float32, offload=args.offload)
    g = torch.Generator().manual_seed(0)
    mi_ids = torch.randint(0, model.config.vocab_size, (settings.mi_samples, settings.seq_len), generator=g)
    ft_ids = torch.randint(0, model.config.vocab_size, (settings.ft_samples, settings.seq_len), generator=g)
    b = settings.score_batch

    def lap(name, t0):
        sync()
        rec[name] = round(time.time() - t0, 3)
        print(f"{args.shape}: {name} {rec[name]:.2f} s, device peak {peak() / 2**30:.2f} GiB", flush=True)
        return time.time()

    t = time.time()
    runner.capture_kwargs(settings.seq_len)
    cache = ActivationCache(runner, runner.block0_inputs(mi_ids, b), b)
    t = lap("time_mi_cache_s", t)
    scores = mi_scores(cache)
    t = lap("time_mi_score_s", t)
    rec["device_peak_scoring_bytes"] = peak()
    p = min(range(n), key=lambda i: scores[i])
    lo, hi = group_range(n, p, settings.group_size)
    ft_x0 = runner.block0_inputs(ft_ids, b)
    x = runner.run_range_batched(0, lo, ft_x0, b)
    t = lap("time_ft_prefix_s", t)
    reset_peak()
    epoch_times = []
    t_epoch = [time.time()]

    def progress(kind, done, total, status):
        if kind == "epoch":
            sync()
            epoch_times.append(time.time() - t_epoch[0])
            t_epoch[0] = time.time()
            print(f"  epoch {done}/{total} {epoch_times[-1]:.2f} s {status}", flush=True)

    d = distill_group(runner, lo, hi, p, x, "learned", settings, seed=0, progress=progress)
    t = lap("time_distill_s", t)
    rec["device_peak_distill_bytes"] = peak()
    rec["fold_error"] = fold_group(runner, lo, hi, p, x, b)
    t = lap("time_fold_s", t)
    runner.remove(p)
    del cache.states[lo + 1:]
    cache.refresh_from(lo)
    lap("time_refresh_s", t)

    steps = len(x) // settings.batch_size
    rec["epoch_times_s"] = [round(e, 3) for e in epoch_times]
    steady = epoch_times[1:] or epoch_times
    rec["step_s"] = sum(steady) / len(steady) / steps
    # distill time outside the epochs: teacher + 2 evaluations + snapshot, all linear in ft_samples
    rec["distill_passes_s"] = rec["time_distill_s"] - sum(epoch_times)
    rec["loss_before"], rec["loss_after"] = d["loss_before"], d["loss_after"]
    rec["stream_peak_bytes"] = stats.peak_bytes
    rec["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # Projection to the paper's budget: 1024 sequences x 20 epochs, ceil(N * sparsity) iterations.
    paper = load_recipe("paper")
    scale = paper.ft_samples / settings.ft_samples
    paper_steps = paper.ft_samples // paper.batch_size * paper.epochs
    distill_full = rec["step_s"] * paper_steps + (rec["distill_passes_s"] + rec["time_ft_prefix_s"]) * scale
    k = blocks_to_remove(n, args.sparsity)
    # scoring cost ~ candidate-suffix block runs: sum over j<n of (n - 1 - j) plus the cache's n
    per_block_run = rec["time_mi_score_s"] / (n * (n - 1) / 2)
    score_total = sum(per_block_run * (m * (m - 1) / 2 + m) for m in range(n, n - k, -1))
    rec["projection"] = {
        "iterations": k, "paper_steps_per_iteration": paper_steps,
        "distill_per_iteration_s": round(distill_full, 1),
        "score_total_s": round(score_total, 1),
        "total_s": round(score_total + k * (distill_full + rec["time_fold_s"]), 1),
    }
    rec["load_after"] = os.getloadavg()[0]
    print(json.dumps(rec, indent=1), flush=True)
    results = json.loads(open(args.out_json).read()) if os.path.exists(args.out_json) else []
    results.append(rec)
    with open(args.out_json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

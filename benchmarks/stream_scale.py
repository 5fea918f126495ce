"""Host memory of one compression iteration on a model of real size, streamed from disk or held whole.

A random-initialised checkpoint with the shapes of a named model (`gpu_scale.SHAPES`) is written
once, tensor by tensor in the chosen dtype, so making it never needs the model in memory; the
built-in SmolLM2's tokenizer is saved beside it (its ids are a prefix of any larger vocabulary,
and speed and memory do not depend on which words the ids are). Then one compression run per
`--mode` removes one block with the `quick` recipe, each in a fresh child process that imports
everything first and resets the kernel's high-water mark (/proc/self/clear_refs) before the
run: `peak` is VmHWM, `baseline` the resident size at the reset, and the run's own plan
(compression.json `memory.host_plan`) is recorded beside them.

    python benchmarks/stream_scale.py --shape llama-3.1-8b --dtype bfloat16 --modes streamed \
        --folder runs/scale --out-json benchmarks/results/stream-scale-8b.json
    python benchmarks/stream_scale.py --shape llama-3.2-1b --modes memory,streamed \
        --folder runs/scale --out-json benchmarks/results/stream-scale-1b.json

The checkpoint (16 GB for 8B in bf16) and each run's output stay under `--folder`; remove them
afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fusedeploy
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
DTYPES = ("float32", "bfloat16", "float16")


def write_checkpoint(shape: str, dtype_name: str, folder: Path) -> Path:
    """A random checkpoint of `shape` in `folder` (kept when complete: `complete.json` is written last)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from fusedeploy.compress.hostplan import meta_model
    from fusedeploy.models.loading import load_tokenizer, resolve_model
    from gpu_scale import SHAPES

    marker = folder / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"shape": shape, "dtype": dtype_name}:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, dtype=dtype_name)
    skeleton = meta_model(config)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, index, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        if shard:
            index += 1
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, param in skeleton.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, dtype=dtype)
        else:
            value = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)
        size = value.numel() * value.element_size()
        if shard_bytes + size > SHARD_BYTES:
            flush()
        shard[name] = value
        shard_bytes += size
        total += size
    flush()
    names = sorted(set(weight_map.values()))
    if len(names) > 1:  # the index names shard files by the count, as save_pretrained does
        renamed = {old: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, old in enumerate(names)}
        for old, new in renamed.items():
            (folder / old).rename(folder / new)
        weight_map = {k: renamed[v] for k, v in weight_map.items()}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        (folder / names[0]).rename(folder / "model.safetensors")
    config.save_pretrained(folder)
    load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(folder)
    marker.write_text(json.dumps({"shape": shape, "dtype": dtype_name}))
    return folder


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(model: str, out: str, mode: str) -> None:
    """One run in this fresh process; prints its JSON record."""
    import accelerate  # noqa: F401  (everything the run imports lazily, imported before the baseline)
    import huggingface_hub.serialization  # noqa: F401
    import psutil  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import fusedeploy.data  # noqa: F401
    from fusedeploy.compress import CompressJob, compress_model, driver, load_recipe  # noqa: F401
    from fusedeploy.models.loading import load_config, load_tokenizer, resolve_model

    load_tokenizer(resolve_model(model))
    n = load_config(resolve_model(model)).num_hidden_layers
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status("VmRSS")
    t0 = time.time()
    job = CompressJob(model, out, 1.0 / n, calib="builtin", settings=load_recipe("quick"), force=True,
                      stream={"streamed": True, "memory": False, "auto": None}[mode])
    report = compress_model(job)
    print(json.dumps({"mode": mode, "baseline": baseline, "peak": _status("VmHWM"), "wall_s": time.time() - t0,
                      "removed": report["removed_blocks"], "plan": report["memory"]["host_plan"],
                      "timings": report.get("timings")}))


def main() -> None:
    from gpu_scale import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the checkpoint's dtype on disk")
    ap.add_argument("--modes", default="streamed", help="comma-separated: streamed, memory, auto")
    ap.add_argument("--folder", default="runs/scale")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "OUT", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    root = Path(args.folder)
    t0 = time.time()
    model = write_checkpoint(args.shape, args.dtype, root / f"{args.shape}-{args.dtype}")
    disk = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    record = {"benchmark": "host memory of one streamed iteration", "shape": args.shape, "dtype": args.dtype,
              "checkpoint_bytes": disk, "write_s": round(time.time() - t0, 1), "runs": [],
              "cpus": os.cpu_count()}
    for mode in args.modes.split(","):
        load = os.getloadavg()
        out = root / f"{args.shape}-{args.dtype}-{mode}-out"
        proc = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--out-json", "-",
                               "--child", str(model), str(out), mode], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run.update(load_before=load, load_after=os.getloadavg())
        record["runs"].append(run)
        gb = 1e9
        print(f"{args.shape} {args.dtype} {mode}: baseline {run['baseline'] / gb:.2f} GB, peak {run['peak'] / gb:.2f} GB "
              f"(+{(run['peak'] - run['baseline']) / gb:.2f}), planned {run['plan']['streamed' if mode != 'memory' else 'in_memory'] / gb:.2f} GB, "
              f"{run['wall_s']:.0f} s, load {load[0]:.2f} -> {run['load_after'][0]:.2f}", flush=True)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

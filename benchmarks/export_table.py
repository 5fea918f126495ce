"""Every GGUF type and ONNX variant of one model: file size, export time, perplexity in its own runtime.

    python benchmarks/export_table.py --model smollm2-135m --label dense \
        --data ../shared/data/wikitext-2/test.txt --json runs/export-dense.json

All rows score the same windows (the model's HF tokenizer, no special tokens,
ctx 512, first 20 windows by default). For the built-in SmolLM2 the original
Q4_1 GGUF it was converted from is measured too (the external cross-check).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.gguf import export_gguf  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from fusedeploy import formats  # noqa: E402
from fusedeploy.data import eval_windows, load_text, tokenize  # noqa: E402
from fusedeploy.evaluate import LlamaCppBackend, OnnxRuntimeBackend, TorchBackend, perplexity  # noqa: E402
from fusedeploy.models.loading import load_model  # noqa: E402


def render(paths: list[str]) -> str:
    """Markdown tables from the JSON files this script writes."""
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
        base = rows[0]["ppl"]
        out.append(f"### {data['label']}: `{data['model']}` ({data['windows']} windows x {data['ctx']} tokens)\n")
        out.append("| artifact | runtime | size (MiB) | export (s) | PPL | PPL / PyTorch |")
        out.append("|---|---|---:|---:|---:|---:|")
        for r in rows:
            size = f"{r['bytes'] / 2**20:.1f}" if r["bytes"] else "-"
            exp = f"{r['export_s']:.1f}" if r["export_s"] is not None else "-"
            out.append(f"| {r['artifact']} | {r['runtime']} | {size} | {exp} | {r['ppl']:.3f} | {r['ppl'] / base:.4f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--render":
        print(render(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--label", default="dense")
    ap.add_argument("--data", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--work", default="runs/export-table", help="scratch folder for the artifacts")
    ap.add_argument("--gguf-types", default=",".join(formats.precision_names("llama.cpp")))
    ap.add_argument("--onnx", default="fp32,int8,int4",
                    help="ONNX variants: a precision, or int4:ALGO / int8:ALGO for the builder's quantization method")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts")
    ap.add_argument("--pytorch-ppl", type=float, default=None,
                    help="reuse a PyTorch perplexity measured by an earlier run on the same windows")
    ap.add_argument("--no-original", action="store_true", help="skip the original GGUF row")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()

    work = Path(args.work) / args.label
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer, source = load_model(args.model, device="cpu", dtype="float32")
    windows = eval_windows(tokenize(tokenizer, load_text(args.data)), args.ctx, args.max_windows)
    rows = []

    def report(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"model": args.model, "label": args.label, "data": args.data,
                                                   "ctx": args.ctx, "windows": len(windows),
                                                   "machine": f"{platform.machine()} {platform.processor()}",
                                                   "rows": rows}, indent=2))

    t0 = time.perf_counter()
    ppl = args.pytorch_ppl or perplexity(TorchBackend(model), windows).ppl
    report({"artifact": "PyTorch fp32", "runtime": "pytorch", "bytes": None, "export_s": None, "ppl": ppl,
            "eval_s": None if args.pytorch_ppl else time.perf_counter() - t0})
    del model
    if source.origin_gguf and not args.no_original:
        t0 = time.perf_counter()
        backend = LlamaCppBackend(source.origin_gguf, n_ctx=args.ctx)
        ppl = perplexity(backend, windows).ppl
        backend.close()
        report({"artifact": "original GGUF Q4_1 (package file)", "runtime": "llama.cpp",
                "bytes": Path(source.origin_gguf).stat().st_size, "export_s": None, "ppl": ppl,
                "eval_s": time.perf_counter() - t0})
    for qtype in filter(None, args.gguf_types.split(",")):
        out = work / f"model-{qtype}.gguf"
        t0 = time.perf_counter()
        export_gguf(args.model, out, qtype=qtype, force=True)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend = LlamaCppBackend(out, n_ctx=args.ctx)
        ppl = perplexity(backend, windows).ppl
        backend.close()
        report({"artifact": f"GGUF {qtype}", "runtime": "llama.cpp", "bytes": out.stat().st_size,
                "export_s": export_s, "ppl": ppl, "eval_s": time.perf_counter() - t0})
        if not args.keep:
            out.unlink()
    for variant in filter(None, args.onnx.split(",")):
        precision, _, algo = variant.partition(":")
        out = work / f"onnx-{variant.replace(':', '-')}"
        t0 = time.perf_counter()
        export_onnx(args.model, out, quantize=precision, force=True, **({"algo": algo} if algo else {}))
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend = OnnxRuntimeBackend(out)
        ppl = perplexity(backend, windows).ppl
        del backend
        report({"artifact": f"ONNX {variant}", "runtime": "onnxruntime", "bytes": formats.size_bytes(out),
                "export_s": export_s, "ppl": ppl, "eval_s": time.perf_counter() - t0})
        if not args.keep:
            shutil.rmtree(out)

    if args.json:
        print(render([args.json]))


if __name__ == "__main__":
    main()

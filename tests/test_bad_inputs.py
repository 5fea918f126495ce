"""Every bad input ends in exactly one `error:` line, exit 2, no traceback, and changes nothing on disk.

Table-driven: each case is a command line run against a small "world" folder
(a tiny model, text files, broken JSONL/YAML/configs, planted foreign folders);
the whole folder is hashed before and after each case. Any `--flag` an error
advises must be a flag of the command that printed it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

LONG = "x" * 300  # longer than any file system's name limit
DIGITS = "9" * 5000

# (id, command line with {w} = world folder, {m} = tiny model folder, text the error must contain)
CASES = [
    # eval
    ("eval-missing-data", "eval --model {m} --data {w}/missing.txt", "text source not found"),
    ("eval-jsonl-list-line", "eval --model {m} --data {w}/list.jsonl", "not an object"),
    ("eval-jsonl-number-line", "eval --model {m} --data {w}/num.jsonl", "not an object"),
    ("eval-jsonl-not-json", "eval --model {m} --data {w}/badjson.jsonl", "not valid JSON"),
    ("eval-jsonl-not-utf8", "eval --model {m} --data {w}/latin1.jsonl", "not UTF-8"),
    ("eval-jsonl-no-field", "eval --model {m} --data {w}/nofield.jsonl", "no field 'text'"),
    ("eval-max-windows-negative", "eval --model {m} --data {w}/text.txt --max-windows -1", "--max-windows must be at least 1"),
    ("eval-max-windows-zero", "eval --model {m} --data {w}/text.txt --max-windows 0", "--max-windows must be at least 1"),
    ("eval-ctx-one", "eval --model {m} --data {w}/text.txt --ctx 1", "--ctx must be at least 2"),
    ("eval-ctx-not-a-number", "eval --model {m} --ctx abc", "Invalid value"),
    ("eval-unknown-flag", "eval --no-such-flag", "No such option"),
    ("eval-unknown-runtime", "eval --model {m} --data {w}/text.txt --runtime tpu", "unknown --runtime"),
    ("eval-llamacpp-needs-gguf", "eval --model {m} --data {w}/text.txt --runtime llama.cpp", "needs a .gguf file"),
    ("eval-random-gguf", "eval --model {w}/random.gguf --data {w}/text.txt", "random.gguf"),
    ("eval-model-without-tokenizer", "eval --model {w}/notok --data {w}/text.txt", "tokenizer"),
    ("eval-config-without-model-type", "eval --model {w}/llama-nomt --data {w}/text.txt", "has no model_type"),
    ("eval-config-not-json", "eval --model {w}/badcfg --data {w}/text.txt", "not valid JSON"),
    ("eval-config-not-object", "eval --model {w}/listcfg --data {w}/text.txt", "not a JSON object"),
    ("eval-unsupported-architecture", "eval --model {w}/gpt2 --data {w}/text.txt", "unsupported architecture"),
    ("eval-too-long-model-path", "eval --model {w}/" + LONG + " --data {w}/text.txt", "longer than the file system allows"),
    ("eval-too-long-data-path", "eval --model {m} --data {w}/" + LONG + ".txt", "longer than the file system allows"),
    ("eval-empty-data-folder", "eval --model {m} --data {w}/empty", "holds no .txt files"),
    ("eval-random-onnx", "eval --model {w}/random.onnx --data {w}/text.txt --runtime onnxruntime", "model.onnx"),
    ("eval-unknown-dtype", "eval --model {m} --data {w}/text.txt --dtype fp8", "unknown --dtype"),
    ("eval-no-cuda", "eval --model {m} --data {w}/text.txt --device cuda:7", "CUDA"),
    ("eval-text-shorter-than-window", "eval --model {m} --data {w}/short.txt --ctx 1000", "fewer than one window"),
    # info
    ("info-unknown-model", "info not-a-model", "model not found"),
    ("info-no-model-type", "info {w}/llama-nomt", "has no model_type"),
    ("info-plain-file", "info {w}/afile", "neither a Hugging Face folder"),
    ("info-folder-without-config", "info {w}/empty", "no config.json"),
    ("info-gpt2", "info {w}/gpt2", "unsupported architecture"),
    # compress
    ("compress-sparsity-zero", "compress --model {m} --sparsity 0 --out {w}/c", "sparsity must be between 0 and 1"),
    ("compress-sparsity-above-one", "compress --model {m} --sparsity 1.5 --out {w}/c", "sparsity must be between 0 and 1"),
    ("compress-sparsity-all-blocks", "compress --model {m} --sparsity 0.99 --recipe quick --out {w}/c", "at least one must remain"),
    ("compress-unknown-method", "compress --model {m} --method nope --recipe quick --out {w}/c", "unknown method"),
    ("compress-unknown-recipe", "compress --model {m} --recipe turbo --out {w}/c", "unknown recipe"),
    ("compress-fp16-on-a-cpu", "compress --model {m} --device cpu --dtype float16 --out {w}/c",
     "--dtype float16 has no fast compute path on cpu"),
    ("compress-config-not-utf8", "compress --model {m} --config {w}/latin1.yaml --out {w}/c", "not UTF-8"),
    ("compress-config-invalid-yaml", "compress --model {m} --config {w}/invalid.yaml --out {w}/c", "not valid YAML"),
    ("compress-config-list", "compress --model {m} --config {w}/list.yaml --out {w}/c", "expected a mapping"),
    ("compress-config-missing", "compress --model {m} --config {w}/missing.yaml --out {w}/c", "not found"),
    ("compress-config-unknown-key", "compress --model {m} --config {w}/unknown.yaml --out {w}/c", "bad compression setting"),
    ("compress-set-5000-digits", "compress --model {m} --set epochs=" + DIGITS + " --out {w}/c", "--set"),
    ("compress-set-without-equals", "compress --model {m} --set epochs --out {w}/c", "key=value"),
    ("compress-set-negative-epochs", "compress --model {m} --set epochs=-1 --out {w}/c", "bad compression setting"),
    ("compress-set-unknown-key", "compress --model {m} --set nope=1 --out {w}/c", "bad compression setting"),
    ("compress-set-lr-inf", "compress --model {m} --set lr_fusion=inf --out {w}/c", "finite number"),
    ("compress-set-lr-minus-inf", "compress --model {m} --set lr_other=-inf --out {w}/c", "finite number"),
    ("compress-set-heal-lr-nan", "compress --model {m} --set heal_lr=nan --out {w}/c", "finite number"),
    ("compress-set-beta-nan", "compress --model {m} --set beta1=nan --out {w}/c", "finite number"),
    ("compress-set-lora-scale-inf", "compress --model {m} --set lora_scale=inf --out {w}/c", "finite number"),
    ("compress-config-yaml-inf", "compress --model {m} --config {w}/inf-lr.yaml --out {w}/c", "finite number"),
    ("compress-nan-weights", "compress --model {w}/nanmodel --recipe quick --calib {w}/text.txt --out {w}/c",
     "NaN or Inf weights"),
    ("compress-out-is-input", "compress --model {m} --recipe quick --out {m} --force", "is the input"),
    ("compress-out-inside-input", "compress --model {m} --recipe quick --out {m}/sub", "inside the input"),
    ("compress-out-contains-input", "compress --model {m} --recipe quick --out {w} --force", "contains the input"),
    ("compress-force-foreign-folder", "compress --model {m} --recipe quick --out {w}/foreign --force", "did not make"),
    ("compress-foreign-folder", "compress --model {m} --recipe quick --out {w}/foreign", "did not make"),
    ("compress-out-is-file", "compress --model {m} --recipe quick --out {w}/afile", "is a file"),
    ("compress-out-unwritable", "compress --model {m} --recipe quick --out /sys/fusedeploy-test/c", "cannot write"),
    ("compress-out-too-long", "compress --model {m} --recipe quick --out {w}/" + LONG, "longer than the file system allows"),
    ("compress-calib-jsonl-list", "compress --model {m} --recipe quick --calib {w}/list.jsonl --out {w}/c", "not an object"),
    ("compress-calib-missing", "compress --model {m} --recipe quick --calib {w}/missing.txt --out {w}/c", "text source not found"),
    ("compress-model-without-tokenizer", "compress --model {w}/notok --recipe quick --out {w}/c", "tokenizer"),
    ("compress-host-memory-below-one-group", "compress --model {m} --recipe quick --calib {w}/text.txt "
     "--max-host-memory 0.01 --out {w}/c", "even with its blocks streamed"),
    ("compress-host-memory-zero", "compress --model {m} --max-host-memory 0 --out {w}/c",
     "--max-host-memory must be a positive number"),
    ("compress-host-memory-nan", "compress --model {m} --max-host-memory nan --out {w}/c",
     "--max-host-memory must be a positive number"),
    # export gguf
    ("gguf-unknown-type", "export gguf --model {m} --out {w}/o.gguf --type q3", "unknown GGUF type"),
    ("gguf-out-is-input", "export gguf --model {m} --out {m} --force", "is the input"),
    ("gguf-out-inside-input", "export gguf --model {m} --out {m}/x.gguf", "inside the input"),
    ("gguf-force-foreign-file", "export gguf --model {m} --out {w}/foreign.gguf --force", "did not make"),
    ("gguf-force-foreign-folder", "export gguf --model {m} --out {w}/foreign --force", "did not make"),
    ("gguf-ours-without-force", "export gguf --model {m} --out {w}/ours.gguf", "pass --force"),
    ("gguf-from-gguf", "export gguf --model {w}/ours.gguf --out {w}/o.gguf", "not a .gguf file"),
    ("gguf-out-unwritable", "export gguf --model {m} --out /sys/fusedeploy-test/o.gguf", "cannot write"),
    ("gguf-imatrix-direct-type", "export gguf --model {m} --out {w}/o.gguf --type f16 --imatrix-data {w}/text.txt", "importance matrix"),
    ("gguf-imatrix-empty", "export gguf --model {m} --out {w}/o.gguf --type q4_0 --imatrix-data {w}/empty.txt", "holds no text"),
    ("gguf-imatrix-one-window-short", "export gguf --model {m} --out {w}/o.gguf --type q4_0 --imatrix-data {w}/short.txt", "fewer than one window"),
    ("gguf-unsupported-architecture", "export gguf --model {w}/gpt2 --out {w}/o.gguf", "unsupported architecture"),
    ("gguf-out-under-a-file", "export gguf --model {m} --out {w}/afile/o.gguf", "is a file"),
    # export onnx
    ("onnx-unknown-quantize", "export onnx --model {m} --out {w}/onnx --quantize int3", "unknown ONNX quantization"),
    ("onnx-force-foreign-folder", "export onnx --model {m} --out {w}/foreign --force", "did not make"),
    ("onnx-out-is-input", "export onnx --model {m} --out {m} --force", "is the input"),
    ("onnx-out-is-file", "export onnx --model {m} --out {w}/afile", "is a file"),
    ("onnx-no-model-type", "export onnx --model {w}/llama-nomt --out {w}/onnx", "has no model_type"),
    # verify
    ("verify-missing-artifact", "verify {w}/missing.gguf --reference {m}", "not found"),
    ("verify-random-onnx", "verify {w}/random.onnx --reference {m}", "not an artifact FuseDeploy can run"),
    ("verify-random-gguf", "verify {w}/random.gguf --reference {m}", "not a readable GGUF"),
    ("verify-max-windows-zero", "verify {w}/ours.gguf --reference {m} --max-windows 0", "--max-windows must be at least 1"),
    ("verify-folder-not-artifact", "verify {w}/empty --reference {m}", "not an artifact FuseDeploy can run"),
    ("verify-jsonl-no-field", "verify {w}/ours.gguf --reference {m} --data {w}/nofield.jsonl --ctx 8", "no field 'text'"),
    # profiles
    ("profiles-show-unknown", "profiles show nope", "unknown profile"),
    ("profiles-show-infinite-bandwidth", "profiles show {w}/inf.yaml", "finite"),
    ("profiles-show-zero-compute", "profiles show {w}/zero.yaml", "compute_tflops"),
    ("profiles-show-nan", "profiles show {w}/nan.yaml", "finite"),
    ("profiles-show-not-utf8", "profiles show {w}/latin1-profile.yaml", "not UTF-8"),
    ("profiles-show-invalid-yaml", "profiles show {w}/invalid.yaml", "not valid YAML"),
    ("profiles-show-list", "profiles show {w}/list.yaml", "expected a mapping"),
    ("profiles-show-missing-file", "profiles show {w}/missing.yaml", "not found"),
    ("plan-sparsity-all-blocks", "profiles plan edge-8gb --model {m} --sparsity 0.99", "would remove all 6 blocks"),
    ("plan-sparsity-negative", "profiles plan edge-8gb --model {m} --sparsity -0.1", "--sparsity must be in [0, 1)"),
    ("plan-unknown-quant", "profiles plan edge-8gb --model {m} --quant q3", "is not offered"),
    ("plan-infinite-profile", "profiles plan {w}/inf.yaml --model {m}", "finite"),
    ("plan-no-model-type", "profiles plan edge-8gb --model {w}/llama-nomt", "has no model_type"),
    # bench-serve (checked before any connection: the server address is closed)
    ("bench-duration-inf", "bench-serve http://127.0.0.1:1 --duration inf", "--duration must be a positive, finite"),
    ("bench-duration-nan", "bench-serve http://127.0.0.1:1 --duration nan", "--duration must be a positive, finite"),
    ("bench-duration-zero", "bench-serve http://127.0.0.1:1 --duration 0", "--duration must be a positive, finite"),
    ("bench-duration-negative", "bench-serve http://127.0.0.1:1 --duration -5", "--duration must be a positive, finite"),
    ("bench-concurrency-empty-item", "bench-serve http://127.0.0.1:1 --concurrency 1,,2", "item 2 is empty"),
    ("bench-concurrency-trailing-comma", "bench-serve http://127.0.0.1:1 --concurrency 1,2,", "item 3 is empty"),
    ("bench-concurrency-not-integer", "bench-serve http://127.0.0.1:1 --concurrency 1,2.5", "item 2 is '2.5'"),
    ("bench-concurrency-zero", "bench-serve http://127.0.0.1:1 --concurrency 0,4", "item 1 is '0'"),
    ("bench-concurrency-negative", "bench-serve http://127.0.0.1:1 --concurrency 4,-1", "item 2 is '-1'"),
    ("bench-concurrency-5000-digits", "bench-serve http://127.0.0.1:1 --concurrency " + DIGITS, "item 1 is"),
    ("bench-max-tokens-zero", "bench-serve http://127.0.0.1:1 --max-tokens 0", "--max-tokens must be at least 1"),
    # build
    ("build-unknown-profile", "build --profile nope --model {m} --out {w}/b", "unknown profile"),
    ("build-unknown-recipe", "build --profile edge-8gb --model {m} --recipe turbo --out {w}/b", "unknown --recipe"),
    ("build-unknown-dtype", "build --profile edge-8gb --model {m} --dtype fp8 --out {w}/b", "unknown --dtype"),
    ("build-fp16-on-a-cpu", "build --profile edge-8gb --model {m} --device cpu --dtype fp16 --out {w}/b",
     "no fast compute path on cpu"),
    ("build-host-memory-negative", "build --profile edge-8gb --model {m} --max-host-memory -1 --out {w}/b",
     "--max-host-memory must be a positive number"),
    ("build-ppl-ratio-below-one", "build --profile edge-8gb --model {m} --max-ppl-ratio 0.5 --out {w}/b", "at least 1"),
    ("build-sparsity-all-blocks", "build --profile edge-8gb --model {m} --sparsity 0.99 --out {w}/b", "would remove all"),
    ("build-out-is-file", "build --profile edge-8gb --model {m} --out {w}/afile", "is a file"),
    ("build-out-stage-named-folders", "build --profile edge-8gb --model {m} --out {w}/stagey", "did not make"),
    ("build-out-foreign-files", "build --profile edge-8gb --model {m} --out {w}/foreign", "did not make"),
    ("build-out-is-input", "build --profile edge-8gb --model {m} --out {m}", "is the input"),
    ("build-unknown-runtime", "build --profile edge-8gb --model {m} --runtime tflite --out {w}/b", "unknown runtime"),
    ("build-force-and-resume", "build --profile edge-8gb --model {m} --force --resume --out {w}/b", "pass one of them"),
    ("build-infinite-profile", "build --profile {w}/inf.yaml --model {m} --out {w}/b", "finite"),
    ("build-out-unwritable", "build --profile edge-8gb --model {m} --out /sys/fusedeploy-test/b", "cannot write"),
    ("build-calib-jsonl-list", "build --profile edge-8gb --model {m} --sparsity 0.34 --calib {w}/list.jsonl --out {w}/b", "not an object"),
    ("build-eval-data-missing", "build --profile edge-8gb --model {m} --eval-data {w}/missing.txt --out {w}/b", "text source not found"),
    ("build-unknown-quant", "build --profile edge-8gb --model {m} --quant q3 --out {w}/b", "is not offered"),
    ("build-model-without-tokenizer", "build --profile edge-8gb --model {w}/notok --out {w}/b", "tokenizer"),
    ("build-eval-tasks-empty-data", "build --profile edge-8gb --model {m} --eval-tasks {w}/task-empty --out {w}/b", "is empty"),
    ("build-eval-tasks-blank-data", "build --profile edge-8gb --model {m} --eval-tasks {w}/task-blank/tiny.yaml --out {w}/b", "is empty"),
    ("build-eval-tasks-data-not-json", "build --profile edge-8gb --model {m} --eval-tasks {w}/task-badjson --out {w}/b", "not valid JSON"),
    ("build-eval-tasks-csv-header-only", "build --profile edge-8gb --model {m} --eval-tasks {w}/task-csv --out {w}/b", "no rows"),
    ("build-accuracy-drop-without-tasks", "build --profile edge-8gb --model {m} --max-accuracy-drop 0.02 --out {w}/b", "add --eval-tasks"),
    ("build-profile-accuracy-budget-without-tasks", "build --profile {w}/accuracy.yaml --model {m} --out {w}/b", "budgets.max_accuracy_drop"),
    ("build-zero-shot-retention-without-data", "build --profile edge-8gb --model {m} --min-zero-shot-retention 0.9 --out {w}/b", "add --zero-shot"),
    ("build-profile-zero-shot-budget-without-data", "build --profile {w}/zeroshot.yaml --model {m} --out {w}/b", "budgets.min_zero_shot_retention"),
    ("build-zero-shot-missing", "build --profile edge-8gb --model {m} --zero-shot {w}/missing.jsonl --out {w}/b", "not found"),
    ("build-zero-shot-three-choices", "build --profile edge-8gb --model {m} --zero-shot {w}/hs-three.jsonl --out {w}/b", "list of 4 strings"),
    ("build-zero-shot-items-without-data", "build --profile edge-8gb --model {m} --zero-shot-items 100 --out {w}/b", "no --zero-shot data"),
    ("build-calib-empty", "build --profile edge-8gb --model {m} --sparsity 0.34 --calib {w}/empty.txt --out {w}/b", "holds no text"),
    ("build-calib-too-short", "build --profile edge-8gb --model {m} --sparsity 0.34 --calib {w}/short.txt --out {w}/b", "too few calibration tokens"),
    ("build-out-user-file-in-stage", "build --profile edge-8gb --model {m} --out {w}/ourbuild", "plan/notes.txt"),
    ("build-calib-blank-jsonl", "build --profile edge-8gb --model {m} --sparsity 0.34 --calib {w}/blank.jsonl --out {w}/b", "holds no text"),
    ("build-eval-data-empty", "build --profile edge-8gb --model {m} --eval-data {w}/empty.txt --out {w}/b", "holds no text"),
    ("build-out-too-long", "build --profile edge-8gb --model {m} --out {w}/" + LONG, "longer than the file system allows"),
]


def _edge_profile() -> dict:
    return yaml.safe_load((REPO / "profiles" / "edge-8gb.yaml").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory, smol_tokenizer):
    """A folder of inputs, good and bad; nothing in it may change while the cases run."""
    import gguf
    from transformers import GPT2Config

    from .tiny import save_tiny_model

    w = tmp_path_factory.mktemp("world")
    m = save_tiny_model("llama", smol_tokenizer, w / "model")
    (w / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    (w / "short.txt").write_text("Too short.")
    (w / "empty.txt").write_text("")
    (w / "blank.jsonl").write_text("\n  \n")
    task = "task: tiny\ndataset_path: {kind}\ndataset_kwargs:\n  data_files:\n    test: {data}\noutput_type: multiple_choice\n"
    for name, kind, data, content in (("task-empty", "json", "data.jsonl", ""), ("task-blank", "json", "data.jsonl", "\n\n"),
                                      ("task-badjson", "json", "data.jsonl", '{"query": "a"}\n{"query": \n'),
                                      ("task-csv", "csv", "data.csv", "query,label\n")):
        (w / name).mkdir()
        (w / name / data).write_text(content)
        (w / name / "tiny.yaml").write_text(task.format(kind=kind, data=data))
    (w / "list.jsonl").write_text('{"text": "fine"}\n[1, 2, 3]\n')
    (w / "num.jsonl").write_text("3\n")
    (w / "badjson.jsonl").write_text('{"text": "unterminated\n')
    (w / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (w / "nofield.jsonl").write_text('{"body": "hello"}\n')
    (w / "latin1.yaml").write_bytes("epochs: 1 # caf\xe9\n".encode("latin-1"))
    (w / "invalid.yaml").write_text("epochs: [1,\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "unknown.yaml").write_text("nope: 1\n")
    (w / "inf-lr.yaml").write_text("lr_fusion: .inf\n")
    profile = _edge_profile()
    (w / "inf.yaml").write_text(yaml.safe_dump({**profile, "memory_bandwidth_gbps": float("inf"),
                                                "compute_tflops": float("inf")}))
    (w / "accuracy.yaml").write_text(yaml.safe_dump({**profile, "budgets": {**profile["budgets"],
                                                                            "max_accuracy_drop": 0.02}}))
    (w / "zeroshot.yaml").write_text(yaml.safe_dump({**profile, "budgets": {**profile["budgets"],
                                                                            "min_zero_shot_retention": 0.95}}))
    (w / "hs-three.jsonl").write_text('{"query": "A man", "choices": ["a", "b", "c", "d"], "label": 0}\n'
                                      '{"query": "A dog", "choices": ["a", "b", "c"], "label": 0}\n')
    (w / "zero.yaml").write_text(yaml.safe_dump({**profile, "compute_tflops": 0}))
    (w / "nan.yaml").write_text(yaml.safe_dump({**profile, "memory_bandwidth_gbps": float("nan")}))
    (w / "latin1-profile.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (w / "notok").mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (m / f).exists():
            shutil.copy(m / f, w / "notok" / f)
    _copy_with_a_nan_weight(m, w / "nanmodel")
    (w / "llama-nomt").mkdir()  # transformers would guess "llama" from this name
    cfg = json.loads((m / "config.json").read_text())
    cfg.pop("model_type")
    (w / "llama-nomt" / "config.json").write_text(json.dumps(cfg))
    (w / "badcfg").mkdir()
    (w / "badcfg" / "config.json").write_text("{not json")
    (w / "listcfg").mkdir()
    (w / "listcfg" / "config.json").write_text("[1, 2]")
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(w / "gpt2")
    (w / "random.onnx").write_bytes(bytes(range(256)) * 8)
    (w / "random.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (w / "afile").write_text("a plain file\n")
    (w / "empty").mkdir()
    (w / "foreign").mkdir()
    (w / "foreign" / "notes.txt").write_text("the user's notes\n")
    (w / "stagey" / "export").mkdir(parents=True)
    (w / "stagey" / "export" / "thesis.tex").write_text("the user's thesis\n")
    (w / "stagey" / "report").mkdir()
    (w / "stagey" / "report" / "draft.md").write_text("draft\n")
    (w / "ourbuild" / "plan").mkdir(parents=True)  # a build of ours with the user's notes in a stage's folder
    (w / "ourbuild" / ".fusedeploy").write_text('{"kind": "build"}')
    (w / "ourbuild" / "plan" / "manifest.json").write_text('{"stage": "plan"}')
    (w / "ourbuild" / "plan" / "notes.txt").write_text("the user's notes\n")
    (w / "foreign.gguf").write_bytes((w / "random.gguf").read_bytes())  # a GGUF-named file that is not ours
    writer = gguf.GGUFWriter(w / "ours.gguf", "llama")  # a (tiny, unloadable) GGUF stamped by FuseDeploy
    writer.add_string("fusedeploy.export_type", "f16")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w


def _copy_with_a_nan_weight(model: Path, dest: Path) -> None:
    """A copy of the model with one NaN in a block's weight (a checkpoint broken by an earlier diverged run)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, dest)
    weights = load_file(dest / "model.safetensors")
    name = next(k for k in sorted(weights) if ".layers.2." in k and k.endswith("proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under `root` (names, file contents, modes): any change at all shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f" {p.stat().st_mode:o}"
        else:
            out[rel] = f"dir {p.stat().st_mode:o}"
    return out


def _command_flags(words: list[str]) -> set[str]:
    """Every option of the (sub)command named by the leading words of a command line."""
    import typer.main

    from fusedeploy.cli import app

    cmd = typer.main.get_command(app)
    flags = {"--help"} | {o for p in cmd.params for o in p.opts}
    for word in words:
        sub = getattr(cmd, "commands", {}).get(word)
        if sub is None:
            break
        cmd = sub
        flags |= {o for p in cmd.params for o in getattr(p, "opts", [])}
    return flags


@pytest.mark.parametrize("case_id,line,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_error(run_cli, world, case_id, line, expected):
    argv = line.format(w=world, m=world / "model").split()
    before = tree_digest(world)
    code, out, err = run_cli(*argv)
    assert "Traceback" not in err + out, err
    assert code == 2, (code, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert err.splitlines()[0] == lines[0], "something (an empty progress line?) was printed before error:"
    assert expected in lines[0], lines[0]
    advised = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", lines[0])) - set(argv)  # echoing the user's own is fine
    assert advised <= _command_flags(argv), f"advises flags the command lacks: {advised - _command_flags(argv)}"
    assert tree_digest(world) == before, "a failed command changed files"


def test_the_table_is_big_enough():
    commands = {c[1].split()[0] for c in CASES}
    assert len(CASES) >= 60 and commands >= {"eval", "info", "compress", "export", "verify", "profiles", "build",
                                             "bench-serve"}

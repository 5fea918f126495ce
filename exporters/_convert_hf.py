"""Child-process entry point: run llama.cpp's converter on one folder, plus FuseDeploy's own keys.

    python _convert_hf.py SPEC.json

Started by `exporters.gguf` (see `exporters/llama_converter.py` for why in a
child process). It imports nothing from FuseDeploy: its `gguf` must be the
gguf-py that ships with the converter. SPEC names the converter folder, the
model folder, the output file and type, the model name, optionally a JSON
list of `tokenizer.*` keys (from the GGUF the model was converted from) that
replace the converter's vocabulary, and extra key/value pairs (provenance,
per-block facts) that are written after the converter's own, replacing a key
of the same name, and `class_options`: attributes set on the converter class
as its command-line switches would (Qwen 3.5: `no_mtp`, i.e. `--no-mtp`). The outcome is written as
JSON to SPEC["result"]: {"ok": true, "arch": ...} or {"error": kind, ...}.

The converter's classes are used as llama.cpp's own `main()` uses them; the
one subclass here only adds to `set_gguf_parameters`, `set_vocab` and
`prepare_metadata` (to report the per-block facts it is about to write),
hooks every converter model class has. A converter class that only wraps
another and delegates to it (`self.impl`: Mistral 3's, which picks Ministral 3
or Mistral 4 by model_type) gets the same hooks on the delegate, which is the
one that writes.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def _add_kv(writer, gguf, key: str, kind: str, value) -> None:
    writer.remove_key(key)
    if kind == "str":
        writer.add_string(key, str(value))
    elif kind == "u32":
        writer.add_uint32(key, int(value))
    elif kind == "f32":
        writer.add_float32(key, float(value))
    elif kind == "bool":
        writer.add_bool(key, bool(value))
    elif kind == "array":
        writer.add_array(key, list(value))
    else:
        raise ValueError(f"unknown value kind {kind!r} for {key}")


def _add_tokenizer(writer, gguf, keys_json: str) -> None:
    """The `tokenizer.*` keys of the GGUF the model was converted from (read by the parent)."""
    for name, main, sub, value in json.loads(Path(keys_json).read_text(encoding="utf-8")):
        writer.remove_key(name)
        writer.add_key_value(name, value, gguf.GGUFValueType(main),
                             sub_type=None if sub is None else gguf.GGUFValueType(sub))


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _without(folder: Path, name: str, scratch: Path) -> Path:
    """A view of `folder` (same name, symlinked files) without `name`.

    transformers saves a tokenizer it read from a GGUF file with that GGUF
    copied as tokenizer.model; the converter takes any tokenizer.model for a
    SentencePiece model (Llama's and Gemma's vocabularies, Gemma's embedding
    trim), so it must not see this one. Its vocabulary comes from the GGUF.
    """
    view = scratch / folder.name
    view.mkdir(parents=True)
    for entry in folder.iterdir():
        if entry.name != name:
            (view / entry.name).symlink_to(entry.resolve())
    return view


def _facts(writer, gguf, keys) -> dict:
    """Per-block facts of what the writer is about to write (see exporters.gguf.per_block_facts)."""
    import re

    kv, arch = writer.kv_data[0], writer.arch
    arrays = {}
    for key in keys:
        value = kv.get(f"{arch}.{key}")
        if value is not None and value.type == gguf.GGUFValueType.ARRAY:
            arrays[key] = [v.item() if hasattr(v, "item") else v for v in value.value]
    blocks = {int(m.group(1)) for shard in writer.tensors for name in shard if (m := re.match(r"blk\.(\d+)\.", name))}
    return {"arch": arch, "block_count": int(kv[f"{arch}.block_count"].value), "blocks": sorted(blocks),
            "arrays": arrays}


def convert(spec: dict) -> dict:
    conv = Path(spec["converter"])
    sys.path[:0] = [str(conv / "gguf-py"), str(conv)]
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    model_dir = Path(spec["model_dir"])
    tokenizer_kv = spec.get("tokenizer_kv")
    if tokenizer_kv and _is_gguf(model_dir / "tokenizer.model"):
        model_dir = _without(model_dir, "tokenizer.model", Path(spec["scratch"]))
    hparams = ModelBase.load_hparams(model_dir, False)
    try:
        arch = get_model_architecture(hparams, ModelType.TEXT)
    except ValueError:  # the config names no architecture the converter can read
        return {"error": "unknown-architecture", "architecture": hparams.get("model_type", "unknown")}
    try:
        base = get_model_class(arch)
    except NotImplementedError:
        return {"error": "unknown-architecture", "architecture": arch}
    extra = spec.get("kv", [])
    facts: dict = {}

    def with_our_hooks(cls):
        class FuseDeployModel(cls):  # type: ignore[misc,valid-type]
            model_arch = cls.model_arch

            def set_gguf_parameters(self):
                super().set_gguf_parameters()
                for key, kind, value in extra:
                    _add_kv(self.gguf_writer, gguf, key.replace("{arch}", self.gguf_writer.arch), kind, value)

            def prepare_metadata(self, vocab_only: bool):
                super().prepare_metadata(vocab_only)
                facts.update(_facts(self.gguf_writer, gguf, spec.get("per_block_keys", [])))

            def set_vocab(self):
                if tokenizer_kv:
                    _add_tokenizer(self.gguf_writer, gguf, tokenizer_kv)
                else:
                    super().set_vocab()

        FuseDeployModel.__name__ = FuseDeployModel.__qualname__ = f"FuseDeploy{cls.__name__}"
        return FuseDeployModel

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[spec["outtype"]]
    with torch.inference_mode():
        for name, value in spec.get("class_options", {}).items():  # as the converter's switches set them
            setattr(base, name, value)
        model = with_our_hooks(base)(model_dir, ftype, Path(spec["outfile"]), model_name=spec.get("model_name"))
        impl = getattr(model, "impl", None)
        if isinstance(impl, ModelBase):  # a wrapper that delegates everything to a per-model_type converter
            impl.__class__ = with_our_hooks(type(impl))  # (Mistral 3: Ministral 3 or Mistral 4 inside)
        model.write()
    return {"ok": True, "hf_arch": arch, "facts": facts}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.DEBUG if spec.get("verbose") else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        result = convert(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides what the user sees
        import traceback

        traceback.print_exc()
        result = {"error": "exception", "type": type(exc).__name__, "message": str(exc).strip()}
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    sys.exit(0 if result.get("ok") else 3)


if __name__ == "__main__":
    # Running this file puts its own folder (exporters/, which has a gguf.py) first on
    # sys.path; drop it so that `import gguf` finds the converter's gguf-py.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    main()

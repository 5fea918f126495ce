"""The format catalogue: every row is complete and consistent, lookups refuse what they do not know."""

from __future__ import annotations

import json

import pytest

from fusedeploy import formats
from fusedeploy.errors import UserError
from fusedeploy.formats import Artifact


def _gguf_file(path, file_type: int | None = None, export_type: str | None = None):
    """A header-only GGUF file recording a file type and/or FuseDeploy's export type."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    if export_type is not None:
        writer.add_string("fusedeploy.export_type", export_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_precision_row_is_complete_and_its_peer_exists():
    for rt, rows in formats.PRECISIONS.items():
        assert rows, rt
        for name, p in rows.items():
            assert p.runtime == rt and p.name == name and 0 < p.bits <= 32
            assert p.tolerance in formats.TOLERANCES
            assert p.made_by in (formats.GGUF_PY, formats.LLAMA_QUANTIZE, formats.GENAI_BUILDER)
            other = next(r for r in formats.RUNTIMES if r != rt)
            assert formats.peer(rt, name, other) in formats.PRECISIONS[other]
            assert formats.peer(rt, name, rt) == name


def test_gguf_rows_name_distinct_llama_cpp_file_types_that_round_trip():
    import gguf

    rows = formats.PRECISIONS["llama.cpp"].values()
    numbers = [p.llama_file_type() for p in rows]
    assert len(set(numbers)) == len(numbers)
    assert formats.spec("llama.cpp", "q4_k_m").llama_file_type() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for p in rows:
        assert formats.precision_for_llama_file_type(p.llama_file_type()) is p
    with pytest.raises(UserError, match="GGUF file type 99 is not one FuseDeploy knows"):
        formats.precision_for_llama_file_type(99)


def test_unknown_precision_or_runtime_is_an_error_not_the_loosest_tolerance():
    with pytest.raises(UserError, match=r"unknown llama.cpp precision 'q3_xyz'; choose from f32, "):
        formats.spec("llama.cpp", "q3_xyz")
    with pytest.raises(UserError, match="unknown onnxruntime precision 'f16'"):
        formats.spec("onnx", "f16")
    with pytest.raises(UserError, match="unknown runtime 'tflite'; choose from llama.cpp, onnxruntime"):
        formats.runtime("tflite")
    with pytest.raises(UserError, match="unknown llama.cpp precision"):
        Artifact("m.gguf", "llama.cpp", "q3_xyz")


def test_one_name_per_runtime_with_the_file_format_as_alias():
    assert formats.runtime("gguf") is formats.runtime("llama.cpp") is formats.LLAMA_CPP
    assert formats.runtime("onnx") is formats.ONNXRUNTIME
    assert Artifact("m.gguf", "gguf", "f16").runtime == "llama.cpp"
    # each runtime's backend reports itself under the same name (eval, verify, profile results)
    for rt in formats.RUNTIMES.values():
        assert rt.backend_class().name == rt.name


def test_which_runtime_opens_a_path_and_the_size_of_an_artifact(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"x" * 1000)
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"x" * 300)
    (onnx_dir / "model.onnx_data").write_bytes(b"x" * 700)
    (onnx_dir / "tokenizer.json").write_bytes(b"x" * 5000)  # not weights: not counted
    assert formats.runtime_for_path(gguf_file) is formats.LLAMA_CPP
    assert formats.runtime_for_path(onnx_dir) is formats.ONNXRUNTIME
    assert formats.runtime_for_path(onnx_dir / "model.onnx") is formats.ONNXRUNTIME
    assert formats.size_bytes(gguf_file) == 1000
    assert formats.size_bytes(onnx_dir) == formats.size_bytes(onnx_dir / "model.onnx") == 1000
    with pytest.raises(UserError, match="not an artifact FuseDeploy can run"):
        formats.runtime_for_path(tmp_path)


def test_artifact_round_trips_through_a_stage_manifest(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x" * 10)
    art = Artifact(tmp_path / "m.gguf", "llama.cpp", "q8_0", "compressed", "/models/x")
    data = json.loads(json.dumps(art.to_dict(root=tmp_path)))
    assert data == {"path": "m.gguf", "runtime": "llama.cpp", "precision": "q8_0", "variant": "compressed",
                    "reference": "/models/x", "size_bytes": 10}
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "m.gguf").rename(moved / "m.gguf")
    again = Artifact.from_dict(data, root=moved)
    assert again.path == moved / "m.gguf" and again.spec.tolerance == "8bit" and again.size_bytes == 10


def test_artifact_reads_its_precision_from_the_file(tmp_path):
    import gguf

    recorded = _gguf_file(tmp_path / "a.gguf", int(gguf.LlamaFileType.MOSTLY_F16), export_type="q6_k")
    assert Artifact.at(recorded).precision == "q6_k"  # FuseDeploy's record wins
    foreign = _gguf_file(tmp_path / "b.gguf", int(gguf.LlamaFileType.MOSTLY_Q4_1))
    assert Artifact.at(foreign).precision == "q4_1" and Artifact.at(foreign).spec.tolerance == "4bit"
    unknown = _gguf_file(tmp_path / "c.gguf", int(gguf.LlamaFileType.MOSTLY_IQ2_XXS))
    with pytest.raises(UserError, match="is not one FuseDeploy knows"):
        Artifact.at(unknown)
    with pytest.raises(UserError, match="artifact not found"):
        Artifact.at(tmp_path / "missing.gguf")


def test_verify_refuses_an_unknown_precision_before_running_anything(tmp_path):
    from exporters.verify import verify_artifact

    odd = _gguf_file(tmp_path / "odd.gguf", export_type="q3_xyz")
    with pytest.raises(UserError, match="unknown llama.cpp precision 'q3_xyz'"):
        verify_artifact(odd, "no-such-reference-is-loaded")

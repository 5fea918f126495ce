"""Compressing a model larger than the host-memory budget: blocks streamed from safetensors.

The promise: a streamed run writes the very files an in-memory run writes (byte for byte), its
resident memory stays under the budget it planned against, it resumes after a kill, and what it
cannot do (sample its own calibration text, heal every block at once, fit one group) is refused
in one line before any weight is read. Random-initialised models, CPU, fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedeploy.compress import CompressJob, compress_model, load_recipe
from fusedeploy.errors import UserError
from .conftest import REPO, SAMPLE_TEXT
from .interrupts import Interrupt, stop_at
from .tiny import save_tiny_model

MB = 1_000_000
# What the streamed run may add to its process's resident memory (see _run_child): above the plan's
# fixed overhead (hostplan.RUN_OVERHEAD) plus what this model's streamed plan counts; the model's
# weights are 3.1x this.
ALLOWANCE = 160 * MB


def _byte_tokenizer():
    """A 256-symbol byte-level tokenizer made here: a small embedding keeps the blocks the bulk of the weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """156 blocks of width 256: 491 MB of fp32 weights, 3.1 MB per block, a 0.3 MB embedding (tied).

    The weights are drawn directly (N(0, 0.02), norms near 1) and saved with safetensors: the
    model's own initialisation of 123 M parameters would take most of the test's time.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("deep") / "llama"
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=768, num_hidden_layers=156,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  tie_word_embeddings=True, max_position_embeddings=256)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    weights = {name: (1 + 0.1 * torch.randn(t.shape, generator=gen)) if "norm" in name
               else 0.02 * torch.randn(t.shape, generator=gen)
               for name, t in skeleton.state_dict().items() if name != "lm_head.weight"}
    skeleton.config.save_pretrained(folder)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(SAMPLE_TEXT.read_text()[:20000])
    return str(path)


def _run_child(model: Path, calib: str, out: Path, mode: str, allowance: int) -> dict:
    """One compression in a fresh process (tests/streamed_child.py); its baseline and high-water mark.

    The child imports everything the run uses, then resets the kernel's high-water mark to its
    resident size (the interpreter, torch, transformers: the baseline) and hands the run a budget
    of baseline + `allowance`. What is checked is the peak minus the baseline, against `allowance`.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tests.streamed_child", str(model), calib, str(out), mode,
                           str(allowance)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "compression.json" and p.is_file()}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streamed_checkpoint_is_bitwise_the_in_memory_one_under_a_budget(deep_llama, calib_file, tmp_path):
    """The budget is under a third of the weights; the plan streams, and the peak stays under it.

    Memory is the process's own high-water mark (VmHWM), reset after the imports: what the run
    adds on top of the interpreter and libraries, which the plan counts separately as "this process".
    """
    weights = (deep_llama / "model.safetensors").stat().st_size
    assert weights >= 3 * ALLOWANCE
    dense = _run_child(deep_llama, calib_file, tmp_path / "in-memory", "memory", 0)
    streamed = _run_child(deep_llama, calib_file, tmp_path / "streamed", "auto", ALLOWANCE)
    assert dense["plan"]["mode"] == "in-memory" and streamed["plan"]["mode"] == "streamed"
    assert streamed["removed"] == dense["removed"]
    a, b = _files(tmp_path / "in-memory"), _files(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b.get(k)]
    added = streamed["peak"] - streamed["baseline"]
    assert added <= ALLOWANCE, f"streamed run added {added / MB:.1f} MB over its {ALLOWANCE / MB:.0f} MB allowance"
    assert dense["peak"] - dense["baseline"] >= weights  # the in-memory run does hold the whole model
    assert not (tmp_path / "streamed.state").exists()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """The suite's 6-block tiny Llama, with the byte tokenizer."""
    return str(save_tiny_model("llama", _byte_tokenizer(), tmp_path_factory.mktemp("tiny") / "llama"))


def test_a_killed_streamed_run_resumes_to_the_same_checkpoint(tiny_llama, calib_file, tmp_path):
    settings = load_recipe("quick")

    compress_model(CompressJob(tiny_llama, tmp_path / "whole", 0.34, calib=calib_file, settings=settings,
                               stream=False))
    out = tmp_path / "streamed"
    with pytest.raises(Interrupt):
        compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, stream=True),
                       progress=stop_at("iteration", 1))
    state = tmp_path / "streamed.state"
    facts = json.loads((state / "state.json").read_text())
    assert facts["fingerprint"]["streamed"] and facts["weights"] is None
    assert sorted(facts["block_files"].values()) == sorted(p.name for p in state.glob("block-*.safetensors"))
    assert not out.exists()  # nothing that looks finished
    with pytest.raises(UserError, match="different run"):  # the in-memory path does not take a streamed state
        compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, resume=True,
                                   stream=False))
    report = compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, resume=True))
    assert report["resumed"] and report["memory"]["host_plan"]["mode"] == "streamed"  # the state's mode
    assert _files(out) == _files(tmp_path / "whole")
    assert not state.exists()


def test_spilled_activations_compute_the_same_and_leave_no_file(tmp_path):
    from fusedeploy.compress.activations import spilling
    from fusedeploy.compress.runner import BlockRunner
    from fusedeploy.compress.scores import ActivationCache, mi_scores
    from fusedeploy.models import adapter_for

    from .tiny import tiny_model

    model = tiny_model("llama", 256).requires_grad_(False)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    scores = {}
    for spill in (None, tmp_path / "out"):
        runner = BlockRunner(model, adapter_for(model), torch.device("cpu"), torch.float32)
        runner.capture_kwargs(24)
        with spilling(spill):
            cache = ActivationCache(runner, runner.block0_inputs(ids, 4), batch=4)
            scores[spill] = (mi_scores(cache), cache.final.data.clone())
    (a, fa), (b, fb) = scores.values()
    assert a == b and torch.equal(fa, fb)
    assert list(tmp_path.iterdir()) == []  # mapped files are unlinked once mapped


def test_streaming_refuses_what_it_cannot_do(tiny_llama, calib_file, tmp_path):
    quick = load_recipe("quick")
    with pytest.raises(UserError, match="--calib"):
        compress_model(CompressJob(tiny_llama, tmp_path / "a", 0.34, calib="self", settings=quick, stream=True))
    with pytest.raises(UserError, match="heal_steps=0"):
        compress_model(CompressJob(tiny_llama, tmp_path / "b", 0.34, calib=calib_file,
                                   settings=load_recipe("quick", {"heal_steps": 2}), stream=True))
    with pytest.raises(UserError, match="even with its blocks streamed"):
        compress_model(CompressJob(tiny_llama, tmp_path / "c", 0.34, calib=calib_file, settings=quick,
                                   max_host_memory=0.01))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method,overrides,keep_steps", [
    ("fusegpt-oneshot", {}, True),
    ("fusegpt-evo", {"evo_generations": 2, "evo_candidates": 2}, True),
    ("fusegpt", {"target": "dense"}, False),
    ("sleb", {}, False),
    ("static-fusion", {}, False),
    ("mi-lora", {}, False),
])
def test_every_method_streamed_writes_what_it_writes_in_memory(method, overrides, keep_steps, tiny_llama,
                                                                calib_file, tmp_path):
    """Same blocks removed, same files (kept steps included), for each kind of scorer, selection and repair."""
    outs = {}
    for stream in (False, True):
        out = tmp_path / f"stream-{stream}"
        report = compress_model(CompressJob(tiny_llama, out, 0.34, method=method, calib=calib_file,
                                            settings=load_recipe("quick", overrides), stream=stream,
                                            keep_steps=keep_steps))
        assert report["memory"]["host_plan"]["mode"] == ("streamed" if stream else "in-memory")
        outs[stream] = out
    a, b = outs.values()
    assert _files(a) == _files(b)
    if keep_steps:
        assert _files(a / "steps") == _files(b / "steps") and len(_files(a / "steps")) == 6  # 3 removals


def test_the_plan_streams_spills_or_refuses_by_the_budget(monkeypatch):
    """Decisions from shapes alone: 32 blocks of 100 MB, a 10 MB trunk, this process counted as 400 MB."""
    from fusedeploy.compress import hostplan
    from fusedeploy.compress.distill import REPAIRS

    monkeypatch.setattr(hostplan, "resident_bytes", lambda: 400 * MB)
    shapes = hostplan.Shapes(n_blocks=32, block_bytes=100 * MB, trunk_bytes=10 * MB, linear_sides=20_000,
                             hidden=4096, vocab=32_000)
    small = load_recipe("quick", {"group_size": 3})

    def plan(gb, settings=small):
        return hostplan.plan(shapes, settings, REPAIRS["fusion"], 4, True, int(gb * hostplan.GB))

    roomy = plan(100)
    assert roomy.mode == "in-memory" and roomy.in_memory > 32 * 100 * MB
    tight = plan(3)
    assert tight.mode == "streamed" and not tight.spill and tight.streamed <= 3 * hostplan.GB < tight.in_memory
    # 2 GB per cached state; the group's training keeps 2.6 GB of its mini-batch's activations
    many = load_recipe("quick", {"group_size": 3, "mi_samples": 64, "seq_len": 2048})
    spilled = plan(6, many)
    assert spilled.mode == "streamed" and spilled.spill and spilled.streamed_spilled <= 6 * hostplan.GB
    with pytest.raises(UserError, match="even with its blocks streamed.*group_size"):
        plan(1)
    assert hostplan.plan(shapes, small, REPAIRS["fusion"], 4, True, 100 * 10**9, force_stream=True).mode == "streamed"
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="positive number"):
            hostplan.budget_bytes(bad)


def test_the_in_memory_plan_counts_the_healing_pass_where_it_runs(monkeypatch):
    """The healing pass (after the last group, in memory only) raises the in-memory peak where its
    logits outweigh a group's extras, for a repair that trains; a repair that does not train never heals."""
    from fusedeploy.compress import hostplan
    from fusedeploy.compress.distill import REPAIRS

    monkeypatch.setattr(hostplan, "resident_bytes", lambda: 400 * MB)
    # SmolLM2-135M's shapes: 30 blocks of 17 MB, a 113 MB tied embedding, a 49,152-token vocabulary
    shapes = hostplan.Shapes(n_blocks=30, block_bytes=17 * MB, trunk_bytes=113 * MB, linear_sides=10_176,
                             hidden=576, vocab=49_152)

    def in_memory(repair, **overrides):
        return hostplan.plan(shapes, load_recipe("cpu", overrides), REPAIRS[repair], 4, True, 10**12).in_memory

    assert in_memory("fusion") > in_memory("fusion", heal_steps=0)
    assert in_memory("lora") > in_memory("lora", heal_steps=0)
    assert in_memory("static") == in_memory("static", heal_steps=0)


def test_a_planted_block_file_is_refused_not_unpickled(tiny_llama, calib_file, tmp_path):
    import pickle

    settings = load_recipe("quick")

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, stream=True),
                       progress=stop_at("iteration", 1))
    marker = tmp_path / "pwned"
    planted = next((tmp_path / "out.state").glob("block-*.safetensors"))
    planted.write_bytes(pickle.dumps({"x": str(marker)}))
    with pytest.raises(UserError, match="unreadable block file"):
        compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, resume=True))
    assert not marker.exists() and not out.exists()


def test_build_hands_its_budget_to_compression_outside_the_stage_key(monkeypatch, tmp_path):
    """`build --max-host-memory` reaches the compression job; the stage's config (its key) does not carry it."""
    import dataclasses

    import fusedeploy.compress as compress_pkg
    from fusedeploy.pipeline import stages
    from fusedeploy.pipeline.stages import compress as stage

    seen = {}

    def fake(job, progress=None):
        seen["budget"] = job.max_host_memory
        raise RuntimeError("stop")

    monkeypatch.setattr(compress_pkg, "compress_model", fake)
    config = stage.Config(0.25, "fusegpt", "quick", "builtin", None, None, None, False)
    assert "max_host_memory" not in {f.name for f in dataclasses.fields(config)}
    with stages.announcing(lambda msg: None, None, 12.5), pytest.raises(RuntimeError, match="stop"):
        stage.run(config, {"model": tmp_path}, tmp_path)
    assert seen["budget"] == 12.5


def test_the_block_by_block_writer_writes_what_save_pretrained_writes_when_sharded(tmp_path):
    """Shards, index and header layout byte for byte, with a shard size small enough to split a tiny model."""
    from fusedeploy.compress.shards import ShardedWriter, entries_of
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from .tiny import tiny_model

    model = tiny_model("llama", 256, tie_word_embeddings=True)
    (tmp_path / "stock").mkdir()
    (tmp_path / "ours").mkdir()
    model.save_pretrained(tmp_path / "stock", max_shard_size=200_000)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    with ShardedWriter(tmp_path / "ours", entries_of(state.items()), model.num_parameters(),
                       max_shard_size=200_000) as writer:
        for name in reversed(list(state)):  # any order: each tensor lands at its planned offset
            writer.put(name, state[name])
    stock = {p.name: p.read_bytes() for p in (tmp_path / "stock").glob("model*")}
    assert len(stock) > 2 and "model.safetensors.index.json" in stock
    assert {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()} == stock


def test_a_sharded_checkpoint_streams_from_its_index(tmp_path, calib_file):
    """Blocks read through model.safetensors.index.json from several shards; the output is the in-memory one."""
    from .tiny import tiny_model

    source = tmp_path / "sharded"
    tiny_model("llama", 256).save_pretrained(source, max_shard_size=300_000)
    _byte_tokenizer().save_pretrained(source)
    assert len(list(source.glob("model-*.safetensors"))) > 2
    outs = []
    for stream in (False, True):
        outs.append(tmp_path / f"out-{stream}")
        compress_model(CompressJob(str(source), outs[-1], 0.34, calib=calib_file, settings=load_recipe("quick"),
                                   stream=stream))
    assert _files(outs[0]) == _files(outs[1])

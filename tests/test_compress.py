"""Compression engine on tiny random models (llama, gemma3_text, qwen2): fast, CPU, fp32."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fusedeploy.compress import CompressJob, FusedLinear, compress_model, fold_model, load_recipe
from fusedeploy.compress.distill import REPAIRS, attach_fusion, distill_group, group_range
from fusedeploy.compress.runner import BlockRunner, default_compute_dtype
from fusedeploy.compress.scores import ActivationCache, mi_scores
from .reference import mi_scores_bruteforce
from fusedeploy.errors import UserError
from fusedeploy.models import adapter_for
from fusedeploy.models.loading import load_tokenizer, resolve_model
from .interrupts import Interrupt, stop_at
from .tiny import save_tiny_model, tiny_model

VOCAB = 300
TYPES = ["llama", "gemma3_text", "qwen2", "ministral3", "qwen3_5_text"]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tiny")
    return {t: str(save_tiny_model(t, tokenizer, root / t)) for t in TYPES}


def _ids(n=2, t=24, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_group_range_shifts_inward():
    assert group_range(30, 0, 7) == (0, 8)
    assert group_range(30, 29, 7) == (22, 30)
    assert group_range(30, 10, 7) == (7, 15)
    assert group_range(5, 2, 7) == (0, 5)  # fewer blocks than G+1: all of them
    for p in range(30):
        lo, hi = group_range(30, p, 7)
        assert hi - lo == 8 and lo <= p < hi


def test_fused_linear_at_init_is_the_neighbour_and_merges():
    torch.manual_seed(0)
    base, other = torch.nn.Linear(16, 24, bias=True), torch.nn.Linear(16, 24, bias=True)
    x = torch.randn(3, 16)
    ref = base(x)
    fl = FusedLinear(base, lora_rank=4)
    fl.add_fusion(other.weight, other.bias, rank=8)
    fl.add_fusion(other.weight * 2, other.bias, rank=32)  # rank capped at min(out, in)
    assert fl.fusion_A[1].shape == (16, 16)
    assert torch.equal(fl(x), ref)
    with torch.no_grad():  # make every term non-zero: merge must still equal the forward
        for p in fl.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    out = fl(x)
    assert not torch.allclose(out, ref)
    merged = fl.merge()
    assert type(merged) is torch.nn.Linear
    assert torch.equal(merged(x), out)
    expected = base.weight + fl.lora_B @ fl.lora_A + (fl.fusion_B[0] @ fl.fusion_A[0]) * other.weight \
        + (fl.fusion_B[1] @ fl.fusion_A[1]) * other.weight * 2
    assert torch.allclose(merged.weight, expected, atol=1e-6)
    assert torch.allclose(merged.bias, base.bias + fl.fusion_bias[0] * other.bias + fl.fusion_bias[1] * other.bias)


def _runner(model):
    adapter = adapter_for(model)
    r = BlockRunner(model, adapter, torch.device("cpu"), torch.float32)
    r.capture_kwargs(24)
    return r


@pytest.mark.parametrize("model_type", TYPES)
def test_standalone_blocks_reproduce_the_model(model_type):
    model = tiny_model(model_type, VOCAB).requires_grad_(False)
    runner = _runner(model)
    ids = _ids()
    got = []
    hook = runner.adapter.final_norm(model).register_forward_pre_hook(lambda m, a: got.append(a[0]))
    model(input_ids=ids, use_cache=False)
    hook.remove()
    h = runner.run_range(0, len(runner.blocks), runner.block0_inputs(ids, 2).data)
    assert torch.allclose(h, got[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_cached_mi_equals_bruteforce(model_type):
    model = tiny_model(model_type, VOCAB).requires_grad_(False)
    runner = _runner(model)
    ids = _ids()
    cache = ActivationCache(runner, runner.block0_inputs(ids, 2), batch=2)
    cached = mi_scores(cache)
    brute = mi_scores_bruteforce(model, runner.adapter, ids)
    assert len(cached) == 6
    assert max(abs(a - b) for a, b in zip(cached, brute)) < 1e-5
    assert max(brute) > 1e-3  # removing a block is visible
    # after removing a block, refreshing from it gives the brute-force scores of the smaller model
    runner.remove(2)
    cache.block_removed(2)
    brute2 = mi_scores_bruteforce(model, runner.adapter, ids)
    assert max(abs(a - b) for a, b in zip(mi_scores(cache), brute2)) < 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "ministral3"])
def test_fusion_init_then_training_then_fold_matches(model_type, tmp_path):
    model = tiny_model(model_type, VOCAB).requires_grad_(False)
    ids = _ids(8, 24, seed=1)
    ref_logits = model(input_ids=ids, use_cache=False).logits
    runner = _runner(model)
    settings = load_recipe("quick", {"epochs": 3, "group_size": 3})
    lo, hi = group_range(6, 2, 3)
    p = 2
    # At init the fused neighbours compute exactly their original function.
    pruned = copy.deepcopy(model)
    adapter = runner.adapter
    adapter.remove_blocks(pruned, [p])
    pruned_logits = pruned(input_ids=ids, use_cache=False).logits
    attach_fusion(runner, lo, hi, p, REPAIRS["fusion"], settings)
    n_fused = sum(isinstance(m, FusedLinear) for m in model.modules())
    assert n_fused == 7 * (hi - lo - 1)
    with torch.no_grad():
        h = runner.run_range(0, 6, runner.block0_inputs(ids, 8).data, skip=p)
        logits_init = model.lm_head(adapter.final_norm(model)(h))
    if model_type == "gemma3_text":
        cap = model.config.final_logit_softcapping
        if cap:
            logits_init = torch.tanh(logits_init / cap) * cap
    assert torch.equal(logits_init, pruned_logits) or _rel(logits_init, pruned_logits) < 1e-6
    # Train a few steps: losses move, then folding gives dense layers with the same function.
    fold_model(adapter, model)
    x = runner.run_range_batched(0, lo, runner.block0_inputs(ids, 8), 8)
    rec = distill_group(runner, lo, hi, p, x, REPAIRS["fusion"], settings, seed=0)
    assert rec["attempts"] and rec["loss_before"] > 0
    fused_layers = [m for m in model.modules() if isinstance(m, FusedLinear)]
    assert any(float(m.fusion_B[0].abs().max()) > 0 for m in fused_layers)  # training happened
    runner.remove(p)
    with torch.no_grad():
        fused_logits = model(input_ids=ids, use_cache=False).logits
        fold_model(adapter, model)
        assert not any(isinstance(m, FusedLinear) for m in model.modules())
        folded_logits = model(input_ids=ids, use_cache=False).logits
    assert _rel(folded_logits, fused_logits) < 1e-5
    assert not torch.allclose(folded_logits, ref_logits)
    # The folded, renumbered model saves as a stock checkpoint that reloads to identical logits.
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "folded")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded", dtype=torch.float32).eval()
    assert len(reloaded.model.layers) == 5 == reloaded.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits, folded_logits)


def test_distillation_reduces_loss_and_rolls_back_divergence():
    model = tiny_model("llama", VOCAB).requires_grad_(False)
    ids = _ids(16, 24, seed=2)
    runner = _runner(model)
    x = runner.block0_inputs(ids, 8)
    good = distill_group(runner, 0, 4, 1, x, REPAIRS["fusion"], load_recipe("quick", {"epochs": 4, "batch_size": 8}), seed=0)
    assert good["loss_after"] < good["loss_before"]
    assert good["attempts"][0]["status"] == "ok"
    fold_model(runner.adapter, model)
    # An absurd learning rate diverges: every attempt is rolled back, the block is left untrained.
    model2 = tiny_model("llama", VOCAB).requires_grad_(False)
    runner2 = _runner(model2)
    x2 = runner2.block0_inputs(ids, 8)
    bad = distill_group(runner2, 0, 4, 1, x2, REPAIRS["fusion"],
                        load_recipe("quick", {"epochs": 2, "batch_size": 8, "lr_fusion": 1e6, "lr_other": 1e6,
                                              "max_retries": 1}), seed=0)
    assert [a["status"] != "ok" for a in bad["attempts"]] == [True, True]
    assert bad["gave_up"] and bad["loss_after"] == bad["loss_before"]
    assert bad["attempts"][1]["lr_scale"] < bad["attempts"][0]["lr_scale"]
    for m in model2.modules():
        if isinstance(m, FusedLinear):
            assert float(m.fusion_B[0].abs().max()) == 0.0  # rolled back to the init


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "ministral3", "qwen3_5_text"])
def test_compress_end_to_end_reloads_with_stock_transformers(model_type, tiny_dirs, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = compress_model(CompressJob(tiny_dirs[model_type], out, 0.3, method="fusegpt", calib=calib_file,
                                        settings=load_recipe("quick")))
    assert report["blocks_before"] == 6 and report["blocks_after"] == 4 and len(report["removed_blocks"]) == 2
    saved = json.loads((out / "compression.json").read_text())
    assert saved["removed_blocks"] == report["removed_blocks"]
    it0 = saved["iterations"][0]
    assert len(it0["mi_scores"]) == 6 and len(saved["iterations"][1]["mi_scores"]) == 5
    assert it0["removed_original"] == min(range(6), key=lambda i: it0["mi_scores"][i])
    assert "loss_before" in it0 and "loss_after" in it0 and saved["seed"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 4 and len(reloaded.model.layers) == 4
    assert [sorted({m.layer_idx for m in l.modules() if hasattr(m, "layer_idx")}) for l in reloaded.model.layers] \
        == [[0], [1], [2], [3]]
    if model_type in ("gemma3_text", "qwen3_5_text"):
        orig_types = tiny_model(model_type, VOCAB).config.layer_types
        kept = saved["kept_blocks"]
        assert reloaded.config.layer_types == [orig_types[i] for i in kept]
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    assert not out.with_name("out.state").exists()


def test_resume_after_interrupt_equals_uninterrupted(tiny_dirs, calib_file, tmp_path):
    from safetensors.torch import load_file

    settings = load_recipe("quick")
    full = compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "full", 0.5, calib=calib_file, settings=settings))

    with pytest.raises(Interrupt):
        compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "part", 0.5, calib=calib_file, settings=settings),
                       progress=stop_at("iteration", 2))
    assert not (tmp_path / "part").exists()  # nothing that looks finished
    assert (tmp_path / "part.state" / "state.json").exists()
    with pytest.raises(UserError, match="--resume"):
        compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "part", 0.5, calib=calib_file, settings=settings))
    with pytest.raises(UserError, match=r"different run \(settings\.seed: saved 0, now 1\)"):
        compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "part", 0.5, calib=calib_file,
                                   settings=load_recipe("quick", {"seed": 1}), resume=True))
    saved_dtype = default_compute_dtype(torch.device("cpu"))  # the interrupted run's
    other = torch.float32 if saved_dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(UserError, match=rf"different run \(dtype: saved {saved_dtype}, now {other}\)"):
        compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "part", 0.5, calib=calib_file,
                                   settings=settings, resume=True, dtype=other))
    resumed = compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "part", 0.5, calib=calib_file,
                                         settings=settings, resume=True))
    assert resumed["resumed"] and resumed["removed_blocks"] == full["removed_blocks"]
    strip = lambda its: [{k: v for k, v in r.items() if not k.startswith("time")} for r in its]  # noqa: E731
    assert strip(resumed["iterations"]) == strip(full["iterations"])
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sleb", "shortgpt", "mi", "mi-lora", "static-fusion", "fusegpt-oneshot"])
def test_every_method_runs_and_records(method, tiny_dirs, calib_file, tmp_path):
    report = compress_model(CompressJob(tiny_dirs["qwen2"], tmp_path / method, 0.25, method=method, calib=calib_file,
                                        settings=load_recipe("quick")))
    assert report["blocks_after"] == 4 and len(set(report["removed_blocks"])) == 2
    first = report["iterations"][0]
    key = {"sleb": "sleb_scores", "shortgpt": "bi_scores"}.get(method, "mi_scores")
    assert len(first[key]) == 6
    if method == "static-fusion":
        assert first["loss_after"] == first["loss_before"] and first["attempts"] == []
    if method == "mi-lora":
        assert first["loss_after"] < first["loss_before"]


def test_guards(tiny_dirs, calib_file, tmp_path):
    q = load_recipe("quick")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="between 0 and 1"):
            compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "x", bad, calib=calib_file, settings=q))
    with pytest.raises(UserError, match="at least one must remain"):
        compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "x", 0.99, calib=calib_file, settings=q))
    small = tmp_path / "small.txt"
    small.write_text("just a few words")
    with pytest.raises(UserError, match="too few calibration tokens"):
        compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "x", 0.2, calib=str(small), settings=q))
    with pytest.raises(UserError, match="unknown method"):
        compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "x", 0.2, method="magic", calib=calib_file,
                                   settings=q))
    with pytest.raises(UserError, match="unknown recipe"):
        load_recipe("fast")
    with pytest.raises(UserError, match="epoch"):
        load_recipe("quick", {"epoch": 3})
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="did not make"):  # not ours: never replaced, not even with force
        compress_model(CompressJob(tiny_dirs["llama"], tmp_path / "done", 0.2, calib=calib_file, settings=q,
                                   force=True))


def test_recipes_and_yaml_overrides(tmp_path):
    from fusedeploy.compress import parse_overrides

    paper = load_recipe("paper")
    assert (paper.mi_samples, paper.ft_samples, paper.seq_len, paper.group_size, paper.fusion_rank,
            paper.lora_rank, paper.epochs, paper.lr_fusion, paper.lr_other) == (32, 1024, 2048, 7, 128, 128, 20,
                                                                                1e-3, 9.65e-6)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 5\nlr_fusion: 2.0e-4\n")
    s = load_recipe("cpu", parse_overrides(["epochs=7", "seed=3"]), config_file=cfg)
    assert (s.epochs, s.lr_fusion, s.seed, s.seq_len) == (7, 2e-4, 3, 256)
    assert parse_overrides(["lr_other=1e-3", "offload=true", "static_coefficient=null"]) == {
        "lr_other": 1e-3, "offload": True, "static_coefficient": None}


def test_cli_compress(tiny_dirs, calib_file, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "fusedeploy.cli", "compress", "--model", tiny_dirs["llama"], "--sparsity", "0.2",
           "--method", "shortgpt", "--calib", calib_file, "--out", str(out), "--recipe", "quick", "--set", "seed=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "compression.json").read_text())["seed"] == 1
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    bad = subprocess.run(cmd[:7] + ["1.5"] + cmd[8:] + ["--force"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr

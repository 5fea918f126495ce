"""The compression engine's promises beyond the algorithm: bounded device memory, offload and
multi-process runs equal to the plain run, retries that really retrain, and a resume state that
is never unpickled. Tiny models, CPU, fp32."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusedeploy.compress import CompressJob, FusedLinear, compress_model, load_recipe
from fusedeploy.compress.activations import reset_stream_stats
from fusedeploy.compress.distill import REPAIRS, distill_group
from fusedeploy.compress.runner import BlockRunner, default_compute_dtype
from fusedeploy.compress.scores import ActivationCache, mi_scores
from fusedeploy.errors import UserError
from fusedeploy.models import adapter_for
from .interrupts import Interrupt, stop_at
from .tiny import tiny_model

VOCAB = 300
ROOT = Path(__file__).resolve().parents[1]


def _runner(model, offload=False):
    r = BlockRunner(model, adapter_for(model), torch.device("cpu"), torch.float32, offload=offload)
    r.capture_kwargs(24)
    return r


def _ids(n, seed=0):
    return torch.randint(0, VOCAB, (n, 24), generator=torch.Generator().manual_seed(seed))


def test_device_activation_peak_does_not_grow_with_calibration_sequences():
    """Scoring and distillation stream mini-batches: the bytes on the device are the same for 8 or 32 sequences."""
    peaks = {}
    for n in (8, 32):
        model = tiny_model("llama", VOCAB).requires_grad_(False)
        runner = _runner(model)
        stats = reset_stream_stats()
        cache = ActivationCache(runner, runner.block0_inputs(_ids(n), 4), batch=4)
        mi_scores(cache)
        x = runner.block0_inputs(_ids(n, seed=1), 4)
        distill_group(runner, 0, 4, 1, x, REPAIRS["fusion"], load_recipe("quick", {"batch_size": 4}), seed=0)
        peaks[n] = stats.peak_bytes
        one_batch = 4 * 24 * model.config.hidden_size * 4
        assert stats.live_bytes == 0  # every batch handed out was released
        assert one_batch <= stats.peak_bytes <= 4 * one_batch  # a few mini-batches, never the whole set
        assert len(x) == n and x.nbytes == n * 24 * model.config.hidden_size * 4  # the set itself is on the host
    assert peaks[8] == peaks[32]


def test_offloaded_run_is_bitwise_equal(tiny_llama, calib_file, tmp_path):
    outs = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        rep = compress_model(CompressJob(tiny_llama, out, 0.34, method="fusegpt", calib=calib_file,
                                         settings=load_recipe("quick", {"offload": offload})))
        outs[offload] = (rep, load_file(out / "model.safetensors"))
    (a_rep, a), (b_rep, b) = outs[False], outs[True]
    assert a_rep["removed_blocks"] == b_rep["removed_blocks"]
    assert a_rep["compute_dtype"] == str(default_compute_dtype(torch.device("cpu"))).split(".")[-1]
    assert [r["mi_scores"] for r in a_rep["iterations"]] == [r["mi_scores"] for r in b_rep["iterations"]]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cpu_bf16(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    """Make torch's CPU probes report the given bf16 hardware."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_bf16_on_a_cpu_computes_in_bf16_over_fp32_weights(tiny_llama, calib_file, tmp_path, monkeypatch, caplog):
    """Asked for on a CPU without native bf16 it still runs, and the user is told it is the slow path."""
    from fusedeploy.compress.runner import autocast_for

    cpu_bf16(monkeypatch, avx512_bf16=False, amx=False)

    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with autocast_for(torch.device("cpu"), torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with autocast_for(torch.device("cpu"), torch.float32):
        assert layer(x).dtype == torch.float32
    out = tmp_path / "bf16"
    rep = compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=load_recipe("quick"),
                                     dtype="bfloat16"))
    assert rep["compute_dtype"] == "bfloat16" and rep["removed_blocks"]
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    warned = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == 1 and "--dtype float32" in warned[0]


def test_bf16_is_not_called_slow_where_the_cpu_computes_it(monkeypatch):
    from fusedeploy.compress.runner import emulated_bf16_warning

    cpu = torch.device("cpu")
    cpu_bf16(monkeypatch, avx512_bf16=True, amx=False)
    assert emulated_bf16_warning(cpu, torch.bfloat16) is None
    cpu_bf16(monkeypatch, avx512_bf16=False, amx=False)
    assert emulated_bf16_warning(cpu, torch.bfloat16) is not None
    assert emulated_bf16_warning(cpu, torch.float32) is None
    assert emulated_bf16_warning(torch.device("cuda"), torch.bfloat16) is None


def test_compression_defaults_to_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, torch.float32)):
        cpu_bf16(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
        assert default_compute_dtype(cpu) == expected
    assert default_compute_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert default_compute_dtype(cpu) == torch.float32  # a torch without the probes: fp32


def test_retry_after_divergence_trains_the_fusion_factors():
    """A retried group must train the fusion terms again, not only the LoRA (a past bug)."""
    model = tiny_model("llama", VOCAB).requires_grad_(False)
    runner = _runner(model)
    x = runner.block0_inputs(_ids(16, seed=2), 8)
    settings = load_recipe("quick", {"epochs": 2, "batch_size": 8, "max_retries": 1, "lr_backoff": 1e-9,
                                     "lr_fusion": 1e6, "lr_other": 1e6})
    seen = []
    real_adam = torch.optim.Adam

    def spy(groups, **kw):
        seen.append({g["name"]: [p for p in g["params"]] for g in groups})
        return real_adam(groups, **kw)

    torch.optim.Adam = spy
    try:
        rec = distill_group(runner, 0, 4, 1, x, REPAIRS["fusion"], settings, seed=0)
    finally:
        torch.optim.Adam = real_adam
    assert rec["attempts"][0]["status"] != "ok"  # the absurd rate diverged and was rolled back
    assert rec["attempts"][1]["status"] == "ok"  # the backed-off retry trained
    first, retry = seen
    assert len(retry["fusion"]) == len(first["fusion"]) > 0
    assert rec["attempts"][1]["trained"]["fusion"] == rec["attempts"][0]["trained"]["fusion"] > 0
    fused = [m for m in model.modules() if isinstance(m, FusedLinear)]
    assert any(float(m.fusion_B[0].abs().max()) > 0 for m in fused)  # the retry moved them off zero


class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_state_file_is_never_unpickled(tiny_llama, calib_file, tmp_path):
    settings = load_recipe("quick")
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"version": 1, "x": _Planted(str(marker))})
    out = tmp_path / "out"
    state = tmp_path / "out.state"
    state.mkdir()
    (state / "state.pt").write_bytes(payload)  # the old pickle format: never read
    (state / "state.json").write_text('{"version": 2, "fingerprint": {"model": "x"}, "weights": "blocks-1.safetensors"}')
    (state / "blocks-1.safetensors").write_bytes(payload)
    with pytest.raises(UserError, match="different run"):  # refused on its fingerprint, before any weights
        compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, resume=True))

    with pytest.raises(UserError, match="state.pt"):  # --force deletes only what FuseDeploy wrote
        compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, force=True))
    (state / "state.pt").unlink()
    with pytest.raises(Interrupt):  # a genuine state of this run ...
        compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, force=True),
                       progress=stop_at("iteration", 1))
    weights = list(state.glob("blocks-*.safetensors"))
    assert len(weights) == 1 and not (state / "state.pt").exists()
    weights[0].write_bytes(payload)  # ... whose weights were swapped for a pickle
    with pytest.raises(UserError, match="unreadable"):
        compress_model(CompressJob(tiny_llama, out, 0.34, calib=calib_file, settings=settings, resume=True))
    assert not marker.exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_process_gloo_run_equals_one_process(tiny_llama, calib_file, tmp_path):
    """torchrun --nproc-per-node 2, FuseGPT-Evo: the same search, same blocks removed, same weights (fp32
    tolerance), rank 0 writes."""
    settings = ["--recipe", "quick", "--set", "batch_size=4", "--set", "ft_samples=8", "--dtype", "float32",
                "--method", "fusegpt-evo"]
    common = ["compress", "--model", tiny_llama, "--sparsity", "0.34", "--calib", calib_file, *settings]
    one = tmp_path / "one"
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "fusedeploy", *common, "--out", str(one)], check=True, env=env,
                   cwd=ROOT, capture_output=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m", "fusedeploy", *common, "--out", str(two)]
    proc = subprocess.run(torchrun, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    a_rep = json.loads((one / "compression.json").read_text())
    b_rep = json.loads((two / "compression.json").read_text())
    assert b_rep["processes"] == 2 and a_rep["processes"] == 1
    assert a_rep["removed_blocks"] == b_rep["removed_blocks"]
    assert a_rep["method"] == "fusegpt-evo" and a_rep["oneshot_scores"]["scores"] == pytest.approx(
        b_rep["oneshot_scores"]["scores"], abs=1e-6)
    sa, sb = a_rep["search"]["evaluated"], b_rep["search"]["evaluated"]  # the sets were dealt out to two ranks
    assert [e["set"] for e in sa] == [e["set"] for e in sb] and len(sa) > 1
    assert [e["kl"] for e in sa] == pytest.approx([e["kl"] for e in sb], abs=1e-6)
    for ra, rb in zip(a_rep["iterations"], b_rep["iterations"]):
        assert ra["loss_after"] == pytest.approx(rb["loss_after"], rel=1e-4)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert not (tmp_path / "two.state").exists()


def test_a_step_of_a_deeper_run_is_bitwise_the_run_stopped_there(tiny_llama, calib_file, tmp_path):
    """The quality curve: step k of an iterative run to 3 removals equals a separate run that removes k
    (iterative FuseGPT picks each block knowing only the ones before it; Evo searches a set per sparsity)."""
    from fusedeploy.compress import steps

    settings = load_recipe("quick")
    deep = compress_model(CompressJob(tiny_llama, tmp_path / "deep", 0.5, method="fusegpt", calib=calib_file,
                                      settings=settings, keep_steps=True))
    assert steps.available(tmp_path / "deep") == [1, 2, 3]
    short = compress_model(CompressJob(tiny_llama, tmp_path / "short", 0.3, method="fusegpt", calib=calib_file,
                                       settings=settings))
    assert short["removed_blocks"] == deep["removed_blocks"][:2]
    model, _ = steps.rebuild(tmp_path / "deep", 2)
    ref = load_file(tmp_path / "short" / "model.safetensors")
    got = {k: v for k, v in model.state_dict().items() if k in ref}
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert model.config.num_hidden_layers == 4
    final, _ = steps.rebuild(tmp_path / "deep", 3)  # the last step is the output itself
    out = load_file(tmp_path / "deep" / "model.safetensors")
    assert all(torch.equal(final.state_dict()[k], out[k]) for k in out)
    with pytest.raises(UserError, match="no step 4"):
        steps.rebuild(tmp_path / "deep", 4)


def test_self_generated_calibration_is_seeded_and_drives_a_run(tiny_llama, tmp_path):
    from fusedeploy.compress.calibration import generate_samples
    from fusedeploy.models.loading import load_model

    model, tok, _ = load_model(tiny_llama, device="cpu", dtype="float32")
    a = generate_samples(model, tok, 5, 12, seed=3, batch=2)
    b = generate_samples(model, tok, 5, 12, seed=3, batch=2)
    c = generate_samples(model, tok, 5, 12, seed=4, batch=2)
    assert a.shape == (5, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 5  # distinct samples, not one repeated text
    # greedy tokens first: they are the model's top choices, and sampling takes over after them
    full = generate_samples(model, tok, 5, 12, seed=3, batch=2, greedy=11)
    with torch.no_grad():
        assert torch.equal(model(full).logits[:, :-1].argmax(-1), full[:, 1:])
    mixed = generate_samples(model, tok, 5, 12, seed=3, batch=2, greedy=3)
    assert torch.equal(mixed[:, :4], full[:, :4]) and not torch.equal(mixed[:, 4:], full[:, 4:])
    # no calib given: the default is the model's own samples, and the report says so; every progress
    # call carries the four documented arguments (a benchmark's strict callback once broke on it)
    seen = []
    report = compress_model(CompressJob(tiny_llama, tmp_path / "self", 0.16, settings=load_recipe("quick")),
                            progress=lambda kind, done, total, status: seen.append((kind, done, total)))
    assert report["calib"] == "self" and report["blocks_after"] == 5
    writing = [(d, t) for k, d, t in seen if k == "calibration"]  # a log shows the minutes spent writing
    assert writing[0] == (0, 10) and writing[-1] == (10, 10)


def test_self_calibration_can_start_from_or_mix_in_the_builtin_text(tiny_llama):
    from fusedeploy.compress.calibration import generate_samples, self_calibration
    from fusedeploy.data import load_text, tokenize
    from fusedeploy.models.loading import load_model

    model, tok, _ = load_model(tiny_llama, device="cpu", dtype="float32")
    builtin = ",".join(map(str, tokenize(tok, load_text("builtin")).tolist())) + ","

    def from_builtin(row) -> bool:  # the row is a window of the built-in text's tokens
        return ("," + ",".join(map(str, row.tolist())) + ",") in "," + builtin

    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = generate_samples(model, tok, 2, 12, seed=3, prompts=prompts, greedy=2)
    assert torch.equal(out[:, :3], prompts)  # each sequence goes on from its prompt
    with torch.no_grad():  # and the greedy tokens come right after it
        assert torch.equal(model(out[:, :4]).logits[:, 2:4].argmax(-1), out[:, 3:5])

    base = load_recipe("quick", {"seq_len": 12, "seed": 1})
    plain = self_calibration(model, tok, 8, base)
    prompted = self_calibration(model, tok, 8, base.model_copy(update={"self_prompt_tokens": 5}))
    assert all(from_builtin(r[:5]) for r in prompted) and not any(from_builtin(r[:5]) for r in plain)
    assert not all(from_builtin(r) for r in prompted)  # the rest is written by the model
    mixed = self_calibration(model, tok, 8, base.model_copy(update={"self_builtin_share": 0.25}))
    whole = [i for i, r in enumerate(mixed) if from_builtin(r)]
    assert len(whole) == 2 and whole != [6, 7]  # two whole windows, spread among the sampled rows
    assert torch.equal(mixed, self_calibration(model, tok, 8, base.model_copy(update={"self_builtin_share": 0.25})))
    with pytest.raises(UserError, match="self_prompt_tokens.*below seq_len"):
        load_recipe("quick", {"seq_len": 12, "self_prompt_tokens": 12})


def test_self_calibration_can_cut_longer_samples_into_windows(tiny_llama):
    from fusedeploy.compress.calibration import generate_samples, self_calibration
    from fusedeploy.models.loading import load_model

    model, tok, _ = load_model(tiny_llama, device="cpu", dtype="float32")
    settings = load_recipe("quick", {"seq_len": 12, "seed": 1, "self_sample_tokens": 36})
    rows = self_calibration(model, tok, 8, settings)
    windows = generate_samples(model, tok, 3, 36, seed=1).reshape(9, 12)  # three samples, three windows each
    picked = [next(i for i, w in enumerate(windows) if torch.equal(r, w)) for r in rows]  # each row is a window
    assert len(set(picked)) == 8 and len({i // 3 for i in picked[:4]}) > 1  # distinct; the first rows span samples
    assert torch.equal(rows, self_calibration(model, tok, 8, settings))
    with pytest.raises(UserError, match="self_sample_tokens.*multiple of seq_len"):
        load_recipe("quick", {"seq_len": 12, "self_sample_tokens": 30})

"""Nothing lost, nothing stale, nothing half-done: data-loss cases, kill -9 and resume, NaN, moved builds.

The kill tests run the real command line in a subprocess and SIGKILL it at a
stage; the same command must then finish the build, reusing what was done.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from fusedeploy import outputs

from .conftest import REPO
from .interrupts import Interrupt, stop_at
from .processes import children_where

PY = sys.executable


def _cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "fusedeploy.cli", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False if it exited first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            proc.kill()
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the kill point")


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith((".old", ".lock"))
            or ".old-" in p.name]


# ---------------------------------------------------------------- data loss


def test_force_never_replaces_a_foreign_tree_but_replaces_ours(run_cli, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    for argv in (("export", "gguf", "--model", model, "--out", foreign, "--force"),
                 ("export", "onnx", "--model", model, "--out", foreign, "--force"),
                 ("compress", "--model", model, "--recipe", "quick", "--out", foreign, "--force")):
        code, _, err = run_cli(*argv)
        assert code == 2 and "did not make" in err
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"

    out = tmp_path / "m.gguf"
    planted = [tmp_path / ".m.gguf.tmp-abcd1234", tmp_path / ".m.gguf.old-12345"]  # a killed export's leftovers
    for p in planted:
        p.write_bytes(b"half")
    keep = tmp_path / ".m.gguf.mine"  # not a name FuseDeploy writes: never touched
    keep.write_text("user file")
    old_mask = os.umask(0o022)
    try:
        assert run_cli("export", "gguf", "--model", model, "--out", out, "--type", "f32")[0] == 0
        first = out.stat().st_ino
        assert run_cli("export", "gguf", "--model", model, "--out", out, "--type", "f32")[0] == 2  # no --force
        assert run_cli("export", "gguf", "--model", model, "--out", out, "--type", "f32", "--force")[0] == 0
    finally:
        os.umask(old_mask)
    assert out.stat().st_ino != first and outputs.is_ours(out)
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)  # the user's umask, not tempfile's 0600
    assert not any(p.exists() for p in planted) and keep.read_text() == "user file"
    assert not list(tmp_path.glob(".m.gguf.lock"))


def test_compress_clears_a_killed_final_write_and_uses_the_umask(run_cli, tiny_model_dir, tmp_path):
    out = tmp_path / "c"
    leftovers = [tmp_path / ".c.k2j4x9ab.tmp", tmp_path / ".c.q8w7e6rt.old"]  # a kill during the final write
    for p in leftovers:
        (p / "inner").mkdir(parents=True)
        (p / "inner" / "model.safetensors").write_bytes(b"0" * 1000)
    old_mask = os.umask(0o022)
    try:
        code, _, err = run_cli("compress", "--model", tiny_model_dir("llama"), "--sparsity", "0.2", "--method",
                               "shortgpt", "--recipe", "quick", "--out", out)
    finally:
        os.umask(old_mask)
    assert code == 0, err
    assert not any(p.exists() for p in leftovers) and outputs.is_ours(out) and (out / outputs.MARKER).is_file()
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)  # not tempfile's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.fixture(scope="module")
def interrupted_state(tiny_model_dir, tmp_path_factory):
    """(model, the state folder of a `--keep-steps` compress stopped after its first removed block)."""
    from fusedeploy.compress import CompressJob, compress_model, load_recipe

    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("interrupted") / "c"

    with pytest.raises(Interrupt):
        compress_model(CompressJob(str(model), out, 0.2, method="shortgpt", settings=load_recipe("quick"),
                                   keep_steps=True), progress=stop_at("iteration", 1))
    state = out.with_name("c.state")
    assert (state / "state.json").is_file() and list((state / "steps").glob("step-1.*"))
    return model, state


# (id, files someone put in the state folder while the run was stopped); the resumed run must keep them
STATE_PLANTS = [
    ("nothing-planted", []),
    ("notes-in-state", ["notes.txt"]),
    ("notes-in-steps", ["steps/mine.txt"]),
    ("tmp-named-file", ["draft.tmp"]),
    ("state-like-name-in-a-folder", ["backup/state.json"]),
]


@pytest.mark.parametrize("case_id,planted", STATE_PLANTS, ids=[c[0] for c in STATE_PLANTS])
def test_resume_removes_only_its_own_state(run_cli, interrupted_state, tmp_path, caplog, case_id, planted):
    model, state = interrupted_state
    shutil.copytree(state, tmp_path / "c.state")
    for name in planted:
        (tmp_path / "c.state" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c.state" / name).write_text(f"the user's {name}\n")
    code, _, err = run_cli("compress", "--model", model, "--sparsity", "0.2", "--method", "shortgpt", "--recipe",
                           "quick", "--keep-steps", "--resume", "--out", tmp_path / "c")
    assert code == 0 and "Traceback" not in err, err
    assert json.loads((tmp_path / "c" / "compression.json").read_text())["resumed"]
    assert sorted(p.name for p in (tmp_path / "c" / "steps").iterdir()) == \
        ["step-1.json", "step-1.safetensors", "step-2.json", "step-2.safetensors"]  # no user file published
    warnings = [r.getMessage() for r in caplog.records if "did not write" in r.getMessage()]
    if not planted:
        assert not (tmp_path / "c.state").exists() and not warnings
        return
    left = sorted(str(p.relative_to(tmp_path / "c.state")) for p in (tmp_path / "c.state").rglob("*") if p.is_file())
    assert left == sorted(planted)  # the user's files, and nothing of the run's state
    assert all((tmp_path / "c.state" / n).read_text() == f"the user's {n}\n" for n in planted)
    assert len(warnings) == 1 and "kept" in warnings[0] and planted[0].split("/")[0] in warnings[0]


def test_force_refuses_a_state_folder_with_foreign_files_in_its_steps(run_cli, interrupted_state, tmp_path):
    model, state = interrupted_state
    shutil.copytree(state, tmp_path / "c.state")
    (tmp_path / "c.state" / "steps" / "mine.txt").write_text("mine")
    code, _, err = run_cli("compress", "--model", model, "--sparsity", "0.2", "--method", "shortgpt", "--recipe",
                           "quick", "--keep-steps", "--force", "--out", tmp_path / "c")
    assert code == 2 and "did not write" in err and "steps/mine.txt" in err, err
    assert (tmp_path / "c.state" / "steps" / "mine.txt").read_text() == "mine" and not (tmp_path / "c").exists()


def test_output_equal_to_input_is_refused_before_any_work(run_cli, tiny_model_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    import fusedeploy.compress as compress

    monkeypatch.setattr(compress, "compress_model", lambda *a, **k: pytest.fail("compute started"))
    for argv in (("export", "gguf", "--model", model, "--out", model, "--force"),
                 ("export", "onnx", "--model", model, "--out", model, "--force"),
                 ("compress", "--model", model, "--out", model, "--force"),
                 ("compress", "--model", model, "--out", model / "inner")):
        code, _, err = run_cli(*argv)
        assert code == 2 and ("is the input" in err or "inside the input" in err), err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_build_never_touches_a_folder_that_is_not_a_build(run_cli, tiny_model_dir, tmp_path):
    out = tmp_path / "work"
    (out / "export").mkdir(parents=True)
    (out / "export" / "thesis.tex").write_text("years of work")
    code, _, err = run_cli("build", "--profile", "edge-8gb", "--model", tiny_model_dir("llama"), "--out", out,
                           "--recipe", "quick", "--sparsity", "0.34")
    assert code == 2 and "did not make" in err
    assert (out / "export" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in out.rglob("*")) == ["export", "thesis.tex"]


def test_unwritable_or_full_output_fails_before_compute(run_cli, tiny_model_dir, tmp_path, monkeypatch):
    import fusedeploy.compress as compress
    from fusedeploy import preflight

    monkeypatch.setattr(compress, "compress_model", lambda *a, **k: pytest.fail("compute started"))
    model = tiny_model_dir("llama")
    code, _, err = run_cli("compress", "--model", model, "--recipe", "quick", "--out", "/sys/fusedeploy-test/c")
    assert code == 2 and "cannot write to /sys" in err
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1024))
    code, _, err = run_cli("compress", "--model", model, "--recipe", "quick", "--out", tmp_path / "c")
    assert code == 2 and "free" in err and "needs about" in err
    assert not (tmp_path / "c").exists()
    monkeypatch.undo()
    code, _, err = run_cli("compress", "--model", model, "--recipe", "quick", "--calib", tmp_path / "none.txt",
                           "--out", tmp_path / "new" / "deeper" / "c")
    assert code == 2 and list(tmp_path.iterdir()) == []  # no folder left behind for an output never written


# ---------------------------------------------------------------- NaN


def test_verify_fails_nan_logits_with_its_reason(tiny_model_dir, tmp_path, monkeypatch):
    from exporters import verify
    from exporters.gguf import export_gguf

    model = tiny_model_dir("llama")
    artifact = export_gguf(model, tmp_path / "m.gguf", "f32")
    assert verify.verify_artifact(artifact, str(model), "builtin", ctx=64, max_windows=2).passed
    from fusedeploy.formats import Artifact

    real_open = Artifact.open

    class NaNBackend:  # a runtime that returns NaN at 2 % of positions
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def logits(self, ids):
            out = self.inner.logits(ids)
            out[:: 50] = np.nan
            return out

        def close(self):
            self.inner.close()

    monkeypatch.setattr(Artifact, "open", lambda self, *a, **k: NaNBackend(real_open(self, *a, **k)))
    result = verify.verify_artifact(artifact, str(model), "builtin", ctx=64, max_windows=2)
    assert not result.passed
    assert any("NaN or infinite" in f for f in result.failures), result.failures


def _nan_start(*a, **k):
    return float("nan")


def _fold_into_inf(real):
    def fold(runner, lo, hi, p, x, batch):
        error = real(runner, lo, hi, p, x, batch)
        with torch.no_grad():
            next(runner.blocks[lo].parameters()).view(-1)[0] = float("inf")
        return error

    return fold


# (id, extra compress arguments, (module, attribute, replacement factory) or None, text of the error line)
DIVERGENCE_CASES = [
    ("healing-loss-becomes-nan", ["--set", "heal_steps=2", "--set", "heal_lr=1e30"], None, "healing pass diverged"),
    ("distillation-loss-nan-before-training", [], ("fusedeploy.compress.distill", "_eval_loss", lambda real: _nan_start),
     "local distillation cannot start"),
    ("group-weights-become-inf", [], ("fusedeploy.compress.driver", "fold_group", _fold_into_inf),
     "holds NaN or Inf weights"),
]


@pytest.mark.parametrize("case_id,extra,patch,expected", DIVERGENCE_CASES, ids=[c[0] for c in DIVERGENCE_CASES])
def test_a_diverged_compression_fails_in_one_line_and_writes_no_output(run_cli, tiny_model_dir, tmp_path,
                                                                        monkeypatch, case_id, extra, patch, expected):
    import importlib

    if patch is not None:
        module = importlib.import_module(patch[0])
        monkeypatch.setattr(module, patch[1], patch[2](getattr(module, patch[1])))
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "c"
    code, _, err = run_cli("compress", "--model", tiny_model_dir("llama"), "--recipe", "quick", "--sparsity", "0.34",
                           "--calib", text, "--out", out, *extra)
    assert "Traceback" not in err, err
    errors = [x for x in err.splitlines() if x.startswith("error:")]  # after the progress bars of the work done
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert err.rstrip().splitlines()[-1] == errors[0], err
    assert not out.exists() and _temporaries(tmp_path) == []  # nothing that looks like a finished output
    assert text.read_text().startswith("The quick")


# (id, compress arguments after --model): mistakes every torchrun rank meets before the process group starts
RANK_CASES = [
    ("non-finite-setting", ["--set", "lr_fusion=inf"], "finite number"),
    ("sparsity-zero", ["--sparsity", "0"], "sparsity must be between 0 and 1"),
    ("unknown-method", ["--method", "nope", "--recipe", "quick"], "unknown method"),
]


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize("case_id,args,expected", RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_under_torchrun_only_rank_0_prints_the_error(run_cli, tiny_model_dir, tmp_path, monkeypatch, case_id, args,
                                                     expected, rank):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    code, out, err = run_cli("compress", "--model", tiny_model_dir("llama"), *args, "--out", tmp_path / "c")
    assert code == 2 and "Traceback" not in err + out, err
    if rank == "0":
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    else:
        assert err.strip() == "" and out.strip() == "", err  # rank 0 has said it
    assert list(tmp_path.iterdir()) == []


def test_signoff_and_planner_fail_non_finite_figures():
    from fusedeploy.judge import at_least, at_most
    from fusedeploy.profiling.report import signoff

    assert not at_most(float("nan"), 1.0) and not at_least(float("nan"), 0.0) and not at_most(float("inf"), 1e9)
    assert at_most(5.0, float("inf"))
    profile = {"budgets": {"max_memory_gb": 1.0, "min_decode_tokens_per_s": 1.0, "max_time_to_first_token_s": 1.0}}
    deployed = {"name": "a", "projected": {"memory_gb": 0.1, "decode_tokens_per_s": float("nan"),
                                           "time_to_first_token_s": 0.1}}
    s = signoff(profile, deployed, [{"artifact": "a", "passed": True, "ppl_ratio": float("nan")}])
    assert s["result"] == "FAIL"
    assert "not a finite number" in s["budgets"]["min_decode_tokens_per_s"]["reason"]
    assert s["verify"]["result"] == "FAIL" and "ppl_ratio is nan" in s["verify"]["reasons"][0]


def test_busy_host_is_flagged_not_signed_off_silently():
    from fusedeploy.profiling.report import signoff

    profile = {"budgets": {"max_memory_gb": 1.0, "min_decode_tokens_per_s": 1.0, "max_time_to_first_token_s": 1.0}}
    measured = {"host_load": {"busy": True, "cores": 2, "others_cores_before": 1.5, "others_cores_during": 1.8},
                "spread": 0.4, "stable": False, "runs": 9}
    deployed = {"name": "a", "measured": measured,
                "projected": {"memory_gb": 0.1, "decode_tokens_per_s": 5.0, "time_to_first_token_s": 0.1}}
    s = signoff(profile, deployed, [])
    flags = s["measurement"]
    assert not flags["trusted"] and len(flags["warnings"]) == 2 and "busy host" in flags["warnings"][0]
    quiet = signoff(profile, {**deployed, "measured": {"host_load": {"busy": False}, "spread": 0.02,
                                                       "stable": True}}, [])
    assert quiet["measurement"]["trusted"] and not quiet["measurement"]["warnings"]


# ---------------------------------------------------------------- kill -9 and resume


@pytest.fixture(scope="module")
def killed_build(tiny_model_dir, tmp_path_factory):
    """One build killed at export (after its first artifact), at verify and at profile, then finished.

    Every run is the same command line. Returns (build folder, facts gathered at the kill points).
    """
    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("killed") / "b"
    argv = ("build", "--profile", "edge-8gb", "--model", model, "--out", out, "--recipe", "quick",
            "--sparsity", "0.34")
    facts = {}
    first = out / "export.partial" / "compressed-gguf-f16.gguf"
    assert _kill_when(_cli(*argv), lambda: first.is_file()), "build ended before its export"
    facts["first_export_mtime"] = first.stat().st_mtime_ns

    assert _kill_when(_cli(*argv), lambda: (out / "verify.partial").is_dir()), "build ended before verify"
    facts["export_finished"] = (out / "export" / "manifest.json").is_file()

    proc = _cli(*argv)
    workers: list[psutil.Process] = []

    def profiling() -> bool:
        workers[:] = children_where(proc.pid, lambda argv: "fusedeploy.profiling.worker" in " ".join(argv))
        return bool(workers)

    assert _kill_when(proc, profiling), "build ended before profiling"
    gone, alive = psutil.wait_procs(workers, timeout=5)
    facts["orphaned_workers"] = len(alive)
    for p in alive:
        p.kill()

    done = _cli(*argv)
    _, err = done.communicate(timeout=900)
    facts["final_code"], facts["final_err"] = done.returncode, err
    return out, facts


def test_killed_build_resumes_with_the_same_command(killed_build):
    out, facts = killed_build
    assert facts["final_code"] in (0, 1), facts["final_err"]  # 1: a budget failed; never 2 or a traceback
    assert "Traceback" not in facts["final_err"] and "already exists" not in facts["final_err"]
    for stage in ("plan", "compress", "export", "verify", "profile", "report"):
        assert json.loads((out / stage / "manifest.json").read_text())["status"] == "complete"
    assert facts["export_finished"]
    # the artifact finished before the first kill was reused, not rewritten
    assert (out / "export" / "compressed-gguf-f16.gguf").stat().st_mtime_ns == facts["first_export_mtime"]
    assert json.loads((out / "export" / "manifest.json").read_text())["resumed"]
    assert facts["orphaned_workers"] == 0  # the profiler's worker died with its parent
    assert _temporaries(out.parent) == [] and not list(out.glob("*.partial"))
    report = json.loads((out / "report" / "report.json").read_text())
    host = report["artifacts"][0]["measured"]["host_load"]
    assert {"others_cores_before", "others_cores_during", "busy"} <= set(host)
    assert "measurement" in report["signoff"]


def test_moved_build_verifies_against_its_own_model(killed_build, tmp_path):
    from fusedeploy.pipeline import BuildOptions, build

    out, _ = killed_build
    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(out, moved)
    exported = json.loads((moved / "export" / "manifest.json").read_text())["outputs"]
    assert exported["compressed-gguf-f16"]["reference"] == "compress/model"  # relative to the build folder
    shutil.rmtree(out / "compress")  # the old location's model is gone: a stale path would fail or mislead
    opts = BuildOptions.quick(profile="edge-8gb", model=json.loads((moved / "report" / "report.json").read_text())
                              ["model"], out=str(moved), sparsity=0.34, verify_windows=2)
    report = build(opts)
    assert report["stages"]["compress"]["skipped"] and report["stages"]["export"]["skipped"]
    assert not report["stages"]["verify"]["skipped"]
    verified = json.loads((moved / "verify" / "verify.json").read_text())
    assert verified["compressed-gguf-f16"]["windows"] == 2 and verified["compressed-gguf-f16"]["passed"]


def test_sigterm_removes_temporaries(tiny_model_dir, tmp_path):
    out = tmp_path / "o.gguf"
    proc = _cli("export", "gguf", "--model", tiny_model_dir("llama"), "--out", out, "--type", "f32")
    killed = False
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(tmp_path.glob(".o.gguf.tmp-*")):
            proc.send_signal(signal.SIGTERM)
            killed = True
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    if not killed:
        pytest.skip("the export finished before it could be interrupted")
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp file, no lock, no half output


# ---------------------------------------------------------------- build folder and stage runner


def test_build_folder_claim_force_and_legacy(tmp_path):
    from fusedeploy.errors import UserError

    stages = {"plan": ("plan.json",), "export": ("compressed-*",)}
    out = tmp_path / "b"
    outputs.claim_build_folder(out, stages)  # new: created and marked
    assert (out / outputs.MARKER).is_file()
    (out / "plan").mkdir()
    (out / "plan" / "manifest.json").write_text(json.dumps({"stage": "plan"}))
    (out / "export.partial").mkdir()
    (out / "export.partial" / "compressed-gguf-q4_0.gguf").write_bytes(b"x")
    outputs.claim_build_folder(out, stages)  # ours: resumed, nothing removed
    assert (out / "export.partial" / "compressed-gguf-q4_0.gguf").exists()
    outputs.claim_build_folder(out, stages, force=True)  # --force: start over, ours only
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER]

    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not make"):
        outputs.claim_build_folder(out, stages, force=True)
    assert (out / "notes.txt").read_text() == "mine"

    legacy = tmp_path / "old-build"  # made before markers existed: recognised by its manifests
    (legacy / "plan").mkdir(parents=True)
    (legacy / "plan" / "manifest.json").write_text(json.dumps({"stage": "plan"}))
    outputs.claim_build_folder(legacy, stages)
    assert (legacy / outputs.MARKER).is_file()


def test_one_writer_per_output(tmp_path):
    import fcntl

    with outputs.claim(tmp_path / "o.gguf"):
        with outputs.claim(tmp_path / "o.gguf"):  # the same process again (CLI and library): fine
            pass
        assert (tmp_path / ".o.gguf.lock").exists()
    assert list(tmp_path.iterdir()) == []
    fd = os.open(tmp_path / ".o.gguf.lock", os.O_RDWR | os.O_CREAT)  # another process's lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code = subprocess.run([PY, "-c", "from fusedeploy import outputs\nwith outputs.claim(%r): pass"
                               % str(tmp_path / "o.gguf")], cwd=REPO, capture_output=True, text=True)
        assert code.returncode != 0 and "another FuseDeploy run is writing" in code.stderr
    finally:
        os.close(fd)


def test_a_stage_killed_before_its_rename_is_not_redone(tmp_path, monkeypatch):
    from fusedeploy.pipeline import stages

    calls = []

    def run(work):
        calls.append(1)
        (work / "out.txt").write_text("done")
        return {"file": "out.txt"}

    real = stages._promote
    monkeypatch.setattr(stages, "_promote", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(tmp_path, stages.Stage("s", run, {"v": 1}))
    monkeypatch.setattr(stages, "_promote", real)
    result = stages.run_stage(tmp_path, stages.Stage("s", run, {"v": 1}))
    assert calls == [1] and (tmp_path / "s" / "out.txt").read_text() == "done" and not result["skipped"]
    assert not (tmp_path / "s.partial").exists()

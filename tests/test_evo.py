"""fusegpt-evo: the MI-seeded evolutionary search over the removed set (search.py). Tiny models, CPU, fp32."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fusedeploy.compress import METHODS, CompressJob, compress_model, load_recipe
from fusedeploy.compress.parallel import Ranks
from fusedeploy.compress.runner import BlockRunner
from fusedeploy.compress.scores import ActivationCache, mi_scores
from fusedeploy.compress.search import SELECTIONS, evolve, removal_kl
from fusedeploy.errors import UserError
from fusedeploy.models import adapter_for
from .interrupts import Interrupt, stop_at
from .reference import removal_kl_bruteforce
from .tiny import tiny_model

VOCAB = 300
EVO = {"evo_generations": 2, "evo_candidates": 3}


def _fitness(weights):
    """A synthetic criterion with an interaction term, so that the best set is not the seed."""
    def f(sets):
        return [sum(weights[i] for i in s) + (0.5 if {0, 1} <= s else 0.0) for s in sets]
    return f


def _without_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time_s"}


# -- the search on its own -------------------------------------------------------------------------
def test_evolve_is_seeded_distinct_and_never_worse():
    weights = [0.3, 0.1, 0.9, 0.2, 0.05, 0.7, 0.4, 0.15, 0.6, 0.8]
    seed_set = frozenset({1, 2, 5})  # deliberately poor: the search must improve on it
    calls = []
    a = evolve(10, seed_set, _fitness(weights), 5, 5, seed=3, progress=lambda *x: calls.append(x))
    b = evolve(10, seed_set, _fitness(weights), 5, 5, seed=3)
    assert a == b  # same seed, same search
    c = evolve(10, seed_set, _fitness(weights), 5, 5, seed=4)
    assert [r["set"] for r in c["evaluated"]] != [r["set"] for r in a["evaluated"]]
    ev = a["evaluated"]
    assert a["evaluations"] == len(ev) == 1 + 5 * 5 and not a["exhausted"]
    assert ev[0] == {"generation": 0, "move": "seed", "set": [1, 2, 5], "kl": pytest.approx(1.7)}
    assert len({tuple(r["set"]) for r in ev}) == len(ev)  # never a set twice
    assert all(len(r["set"]) == 3 and all(0 <= i < 10 for i in r["set"]) for r in ev)
    assert [r["generation"] for r in ev] == [0] + [g for g in range(1, 6) for _ in range(5)]
    assert {r["move"] for r in ev[1:]} <= {"neighbour", "random", "double", "random-set"}
    assert a["best_kl"] == min(r["kl"] for r in ev) < a["seed_kl"]
    assert a["best_kl"] == pytest.approx(sum(weights[i] for i in a["best_set"]))
    assert [x[1] for x in calls] == list(range(1, 27)) and {x[2] for x in calls} == {26}
    assert all(x[0] == "search" and "best KL" in x[3] for x in calls)
    # elitism: every generation's parent is the best set so far, so the best never gets worse
    best_so_far = [min(r["kl"] for r in ev[:k + 1]) for k in range(len(ev))]
    assert best_so_far == sorted(best_so_far, reverse=True)


def test_evolve_stops_when_every_set_is_evaluated():
    calls = []
    rec = evolve(4, frozenset({2}), _fitness([0.4, 0.3, 0.2, 0.1]), 3, 3, seed=0,
                 progress=lambda *x: calls.append(x))
    assert rec["exhausted"] and rec["space"] == 4 and rec["evaluations"] == 4
    assert sorted(tuple(r["set"]) for r in rec["evaluated"]) == [(0,), (1,), (2,), (3,)]
    assert rec["best_set"] == [3]
    assert calls[-1][1] == calls[-1][2] == 4  # the bar ends where the search did
    # a seed that is already the best stays the best (ties keep the earlier set)
    flat = evolve(5, frozenset({0, 1}), lambda sets: [1.0] * len(sets), 2, 2, seed=0)
    assert flat["best_set"] == [0, 1] and flat["best_kl"] == flat["seed_kl"]


# -- the criterion ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3_5_text"])
def test_removal_kl_is_zero_for_nothing_removed_and_matches_full_forwards(model_type, monkeypatch):
    from fusedeploy.compress import search

    model = tiny_model(model_type, VOCAB).requires_grad_(False)
    adapter = adapter_for(model)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    sets = [frozenset(), frozenset({2}), frozenset({0, 4})]
    got = {}
    for offload, chunk in ((False, None), (True, None), (False, VOCAB * 5)):  # 5-token logits chunks too
        if chunk:
            monkeypatch.setattr(search, "_LOGIT_ELEMENTS", chunk)
        runner = BlockRunner(model, adapter, torch.device("cpu"), torch.float32, offload=offload)
        runner.capture_kwargs(24)
        cache = ActivationCache(runner, runner.block0_inputs(ids, 2), batch=2)  # 2 mini-batches: 2 + 1
        got[offload, chunk] = removal_kl(cache, sets)
    assert got[False, None] == pytest.approx(got[True, None], abs=1e-7)
    assert got[False, None] == pytest.approx(got[False, VOCAB * 5], rel=1e-5, abs=1e-7)
    kl = got[False, None]
    assert abs(kl[0]) < 1e-7
    assert kl[1] > 1e-4 and kl[2] > 1e-4
    for s, value in zip(sets[1:], kl[1:]):
        assert value == pytest.approx(removal_kl_bruteforce(model, adapter, ids, s), rel=1e-4, abs=1e-7)


def test_the_evo_selection_is_seeded_and_ordered_by_mi():
    model = tiny_model("llama", VOCAB).requires_grad_(False)
    runner = BlockRunner(model, adapter_for(model), torch.device("cpu"), torch.float32)
    runner.capture_kwargs(24)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    cache = ActivationCache(runner, runner.block0_inputs(ids, 2), batch=2)
    scores = mi_scores(cache)
    settings = load_recipe("quick", EVO)
    order, rec = SELECTIONS["evo"].choose(scores, 2, cache, settings, None, Ranks())
    order2, rec2 = SELECTIONS["evo"].choose(scores, 2, cache, settings, None, Ranks())
    assert order == order2 and _without_time(rec) == _without_time(rec2)
    assert rec["seed_set"] == sorted(sorted(range(6), key=lambda i: scores[i])[:2])
    assert sorted(order) == rec["best_set"] and order == sorted(order, key=lambda i: scores[i])
    assert rec["evaluations"] == 1 + 2 * 3 and rec["best_kl"] <= rec["seed_kl"]
    assert rec["tokens"] == 2 * 24 and rec["time_s"] >= 0
    assert SELECTIONS["score"].choose(scores, 2, cache, settings, None, Ranks()) == (
        sorted(range(6), key=lambda i: scores[i])[:2], None)


# -- whole runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evo_run(tiny_llama, calib_file, tmp_path_factory):
    """One uninterrupted fusegpt-evo run: (report, output folder, progress calls, log lines)."""
    out = tmp_path_factory.mktemp("evo") / "full"
    calls, lines = [], []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("fusedeploy.compress.search")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        report = compress_model(CompressJob(tiny_llama, out, 0.3, method="fusegpt-evo", calib=calib_file,
                                            settings=load_recipe("quick", EVO)),
                                progress=lambda *x: calls.append(x))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return report, out, calls, lines


def test_evo_run_records_the_search_and_reloads(evo_run):
    from transformers import AutoModelForCausalLM

    report, out, calls, lines = evo_run
    saved = json.loads((out / "compression.json").read_text())
    assert saved["search"] == report["search"] and saved["method"] == "fusegpt-evo"
    s = report["search"]
    mi = report["oneshot_scores"]["scores"]
    assert report["oneshot_scores"]["kind"] == "mi" and len(mi) == 6
    assert s["generations"] == 2 and s["candidates"] == 3 and s["evaluations"] == len(s["evaluated"]) == 7
    assert s["seed_set"] == sorted(sorted(range(6), key=lambda i: mi[i])[:2])
    assert s["evaluated"][0]["set"] == s["seed_set"] and s["evaluated"][0]["kl"] == s["seed_kl"]
    assert len({tuple(r["set"]) for r in s["evaluated"]}) == 7
    assert s["best_kl"] == min(r["kl"] for r in s["evaluated"]) <= s["seed_kl"]
    assert report["removed_blocks"] == s["order"] == sorted(s["best_set"], key=lambda i: mi[i])
    assert report["timings"]["search_s"] == s["time_s"] > 0
    first = report["iterations"][0]
    assert first["mi_scores"] == mi and "loss_after" in first and "mi_scores" not in report["iterations"][1]
    searched = [c for c in calls if c[0] == "search"]
    assert [c[1] for c in searched] == list(range(1, 8)) and all(c[2] == 7 for c in searched)
    assert any("fusegpt-evo search: 7 block sets" in line for line in lines)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 4 and len(reloaded.model.layers) == 4
    assert not out.with_name("full.state").exists()


def test_interrupted_after_the_search_resumes_without_searching(evo_run, tiny_llama, calib_file, tmp_path):
    from safetensors.torch import load_file

    full, full_out, _, _ = evo_run
    settings = load_recipe("quick", EVO)
    part = tmp_path / "part"
    state = tmp_path / "part.state"

    with pytest.raises(Interrupt):
        compress_model(CompressJob(tiny_llama, part, 0.3, method="fusegpt-evo", calib=calib_file, settings=settings),
                       progress=stop_at("epoch"))  # after the search, before any removal
    facts = json.loads((state / "state.json").read_text())
    assert facts["removed"] == [] and facts["weights"] is None and not list(state.glob("blocks-*"))
    assert facts["plan"] == full["removed_blocks"]
    assert _without_time(facts["search"]) == _without_time(full["search"])  # same seed, same search
    assert facts["fingerprint"]["settings"]["evo_generations"] == 2
    with pytest.raises(UserError, match="different run"):  # the search's own settings are part of the run
        compress_model(CompressJob(tiny_llama, part, 0.3, method="fusegpt-evo", calib=calib_file,
                                   settings=load_recipe("quick", {**EVO, "evo_candidates": 4}), resume=True))
    bad = tmp_path / "bad.state"  # a copy that claims a removal but carries no weights: refused
    shutil.copytree(state, bad)
    (bad / "state.json").write_text(json.dumps({**facts, "removed": [facts["plan"][0]]}))
    with pytest.raises(UserError, match="lacks its weights"):
        compress_model(CompressJob(tiny_llama, tmp_path / "bad", 0.3, method="fusegpt-evo", calib=calib_file,
                                   settings=settings, resume=True))

    calls = []
    resumed = compress_model(CompressJob(tiny_llama, part, 0.3, method="fusegpt-evo", calib=calib_file,
                                         settings=settings, resume=True), progress=lambda *x: calls.append(x))
    assert not [c for c in calls if c[0] in ("search", "score")]  # neither scored nor searched again
    assert resumed["resumed"] and resumed["search"] == facts["search"]
    assert resumed["removed_blocks"] == full["removed_blocks"]
    strip = lambda its: [{k: v for k, v in r.items() if not k.startswith("time")} for r in its]  # noqa: E731
    assert strip(resumed["iterations"]) == strip(full["iterations"])
    a, b = load_file(full_out / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_from_before_the_search_field_resumes_another_method(tiny_llama, calib_file, tmp_path):
    """States written before fusegpt-evo have no `search` and no evo settings in their fingerprint (nor
    repair_init, which came later still and is left out while off)."""
    settings = load_recipe("quick")
    part = tmp_path / "part"

    with pytest.raises(Interrupt):
        compress_model(CompressJob(tiny_llama, part, 0.3, method="shortgpt", calib=calib_file, settings=settings),
                       progress=stop_at("iteration", 1))
    path = tmp_path / "part.state" / "state.json"
    facts = json.loads(path.read_text())
    assert not any(k.startswith("evo_") or k == "repair_init" for k in facts["fingerprint"]["settings"])
    assert facts.pop("search") is None
    path.write_text(json.dumps(facts))  # as an older FuseDeploy wrote it
    resumed = compress_model(CompressJob(tiny_llama, part, 0.3, method="shortgpt", calib=calib_file,
                                         settings=settings, resume=True))
    assert resumed["resumed"] and resumed["search"] is None and len(resumed["removed_blocks"]) == 2


def test_evo_settings_are_validated():
    s = load_recipe("paper")
    assert (s.evo_generations, s.evo_candidates) == (5, 5)
    for bad in ({"evo_generations": 0}, {"evo_candidates": -1}, {"evo_candidates": 1.5}):
        with pytest.raises(UserError, match="evo_"):
            load_recipe("quick", bad)


def test_cli_lists_every_method():
    r = subprocess.run([sys.executable, "-m", "fusedeploy.cli", "compress", "--help"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    assert "fusegpt-evo" in METHODS
    for name in METHODS:
        assert name in r.stdout, name


def test_the_command_line_lists_methods_without_loading_torch():
    """--help reads the method registry; the package's heavy modules load only when a command runs."""
    probe = "import sys, fusedeploy.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_without_a_method_compress_and_build_run_the_default(tiny_llama, calib_file, tmp_path):
    from fusedeploy.builtin import DEFAULT_METHOD
    from fusedeploy.pipeline.flow import BuildOptions

    out = tmp_path / "default"
    r = subprocess.run([sys.executable, "-m", "fusedeploy.cli", "compress", "--model", str(tiny_llama),
                        "--sparsity", "0.3", "--calib", str(calib_file), "--out", str(out), "--recipe", "quick"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "compression.json").read_text())
    assert saved["method"] == DEFAULT_METHOD == "fusegpt"
    assert saved["search"] is None and len(saved["iterations"][1]["mi_scores"]) == 5  # re-scored: iterative
    assert CompressJob(tiny_llama, out, 0.3).method == BuildOptions.__dataclass_fields__["method"].default \
        == DEFAULT_METHOD  # the library, the build and the command line share one default

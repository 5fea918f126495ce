"""The options beyond the paper: learning-rate warm-up, dense-model targets for each group, and the
final healing pass. Tiny models, CPU, fp32."""

from __future__ import annotations

import math

import pytest
import torch

from fusedeploy.compress import CompressJob, compress_model, load_recipe
from fusedeploy.compress import driver as driver_mod
from fusedeploy.compress.distill import lr_factor
from fusedeploy.compress import heal as heal_mod
from fusedeploy.compress.heal import heal, sliced_kl_backward, token_kl
from fusedeploy.compress.runner import BlockRunner
from fusedeploy.errors import UserError
from fusedeploy.models import adapter_for
from .interrupts import Interrupt, stop_at
from .tiny import tiny_model

VOCAB = 300


def test_warmup_ramps_then_follows_the_cosine_to_zero():
    total = 20
    # no warm-up: the paper's cosine, unchanged to the bit
    assert all(lr_factor(s, total, 0) == 0.5 * (1 + math.cos(math.pi * min(s, total) / total)) for s in range(25))
    ramp = [lr_factor(s, total, 4) for s in range(total + 1)]
    assert ramp[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(ramp[3:], ramp[4:]))  # then only down
    assert ramp[total] == 0.0


def test_dense_targets_are_the_dense_models_hidden_states_at_the_groups_end(tiny_llama, calib_file, tmp_path,
                                                                             monkeypatch):
    """With target=dense every group learns the dense model's hidden state after its last original block."""
    from transformers import AutoModelForCausalLM

    from fusedeploy.compress.driver import _setup

    targets = []
    real = driver_mod.distill_group

    def spy(*args, target=None, **kwargs):
        targets.append(target.data.clone())
        return real(*args, target=target, **kwargs)

    monkeypatch.setattr(driver_mod, "distill_group", spy)
    settings = load_recipe("quick", {"target": "dense", "group_size": 2})
    report = compress_model(CompressJob(tiny_llama, tmp_path / "out", 0.5, calib=calib_file, settings=settings,
                                        dtype="float32"))  # compared with an fp32 forward at fp32 tolerance
    ends = [it["group_original"][-1] for it in report["iterations"]]
    assert len(targets) == len(ends) == 3 and report["settings"]["target"] == "dense"

    run = _setup(CompressJob(tiny_llama, tmp_path / "again", 0.5, calib=calib_file, settings=settings, device="cpu",
                             dtype="float32"))
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():  # hidden_states[k] is the input of block k (the last one is after the final norm)
        hidden = dense(input_ids=run.ft_ids, output_hidden_states=True, use_cache=False).hidden_states[:-1]
    compared = [(end, t) for end, t in zip(ends, targets) if end + 1 < len(hidden)]
    assert compared
    for end, target in compared:
        assert torch.allclose(target, hidden[end + 1], atol=1e-5)


def test_dense_targets_change_the_result_and_the_paper_default_does_not(tiny_llama, calib_file, tmp_path):
    from safetensors.torch import load_file

    outs = {}
    for name, extra in (("group", {}), ("explicit", {"target": "group", "warmup": 0.0}), ("dense", {"target": "dense"})):
        compress_model(CompressJob(tiny_llama, tmp_path / name, 0.34, calib=calib_file,
                                   settings=load_recipe("quick", extra)))
        outs[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.equal(outs["group"][k], outs["explicit"][k]) for k in outs["group"])
    assert any(not torch.equal(outs["group"][k], outs["dense"][k]) for k in outs["group"])


def test_healing_brings_the_logits_closer_to_the_dense_model_and_leaves_a_plain_model():
    teacher = tiny_model("llama", VOCAB, seed=0).requires_grad_(False)
    student = tiny_model("llama", VOCAB, seed=0).requires_grad_(False)
    adapter = adapter_for(student)
    adapter.remove_blocks(student, [2, 3])
    ids = torch.randint(0, VOCAB, (16, 24), generator=torch.Generator().manual_seed(3))
    settings = load_recipe("quick", {"heal_steps": 30, "heal_rank": 4, "heal_lr": 3e-3, "batch_size": 8})

    def distance():
        with torch.no_grad():
            return float(token_kl(student(input_ids=ids, use_cache=False).logits,
                                  teacher(input_ids=ids, use_cache=False).logits))

    runner = BlockRunner(teacher, adapter_for(teacher), torch.device("cpu"), torch.float32)
    runner.capture_kwargs(24)
    dense_final = runner.run_range_batched(0, 6, runner.block0_inputs(ids, 8), 8)
    before = distance()
    record = heal(student, adapter, ids, dense_final, settings, torch.device("cpu"), torch.float32)
    after = distance()
    assert after < 0.8 * before
    assert record["steps"] == 30 and record["loss_last_quarter"] < record["loss_first"]
    names = [type(m).__name__ for m in student.modules()]
    assert "Linear" in names and not any("lora" in n.lower() for n in names)  # merged into plain layers
    assert not any(p.requires_grad for p in student.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(student.model.layers[0].self_attn.q_proj.weight,
                                                      teacher.model.layers[0].self_attn.q_proj.weight))


def test_the_sliced_healing_loss_equals_the_whole_one_with_the_same_gradients(monkeypatch):
    """Slices of 7 tokens (the last one shorter) against the logits of all 2 x 24 tokens at once. The
    student shares the dense model's head and final norm, as a compressed model does."""
    teacher = tiny_model("llama", VOCAB, seed=0).requires_grad_(False)
    student = tiny_model("llama", VOCAB, seed=0)
    adapter = adapter_for(student)
    adapter.remove_blocks(student, [2, 3])
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense_logits = teacher(input_ids=ids).logits
    dense_before_norm = _last_block_output(teacher, ids)  # what the healing pass's dense store holds
    assert torch.allclose(adapter.logits(teacher, dense_before_norm), dense_logits, atol=1e-5)

    whole = token_kl(student(input_ids=ids).logits, dense_logits)
    whole.backward()
    expected = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    monkeypatch.setattr(heal_mod, "LOGIT_ELEMENTS", VOCAB * 7)
    loss = sliced_kl_backward(student, adapter, student.model(input_ids=ids).last_hidden_state, dense_before_norm)
    assert loss == pytest.approx(whole.item(), rel=1e-5)
    got = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 0
    for name in got:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-7), name


def _last_block_output(model, ids):
    captured = {}
    last = adapter_for(model).blocks(model)[-1]
    handle = last.register_forward_hook(lambda mod, args, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return captured["h"]


def test_a_healed_run_resumes_to_the_same_model_and_reloads_stock(tiny_llama, calib_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    settings = load_recipe("quick", {"heal_steps": 4, "target": "dense"})
    full = compress_model(CompressJob(tiny_llama, tmp_path / "full", 0.5, calib=calib_file, settings=settings))
    assert full["heal"]["steps"] == 4 and full["heal"]["loss_first"] > 0

    with pytest.raises(Interrupt):
        compress_model(CompressJob(tiny_llama, tmp_path / "part", 0.5, calib=calib_file, settings=settings),
                       progress=stop_at("heal", 2))
    assert not (tmp_path / "part").exists()
    resumed = compress_model(CompressJob(tiny_llama, tmp_path / "part", 0.5, calib=calib_file, settings=settings,
                                         resume=True))
    assert resumed["heal"] == full["heal"]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 3


def test_healing_with_offload_is_one_error(tiny_llama, calib_file, tmp_path):
    with pytest.raises(UserError, match="heal_steps"):
        compress_model(CompressJob(tiny_llama, tmp_path / "x", 0.34, calib=calib_file,
                                   settings=load_recipe("quick", {"heal_steps": 2, "offload": True})))
    assert not (tmp_path / "x").exists()


def _block_inputs(runner, ids, lo):
    runner.capture_kwargs(ids.shape[1])
    return runner.run_range_batched(0, lo, runner.block0_inputs(ids, 8), 8)


def _squared(a, b) -> float:
    return float(((a.double() - b.double()) ** 2).sum())


def test_lstsq_init_folds_a_map_that_stands_in_for_the_removed_block_better_than_removal():
    """Block 3 removed, its map folded into block 2: block 2's new output is closer to what block 3 wrote
    than plain removal leaves, by exactly the residual the record states, and nothing else changed."""
    from fusedeploy.compress.repair_init import lstsq_init

    model = tiny_model("llama", VOCAB, seed=0).requires_grad_(False)
    runner = BlockRunner(model, adapter_for(model), torch.device("cpu"), torch.float32)
    ids = torch.randint(0, VOCAB, (16, 24), generator=torch.Generator().manual_seed(5))
    lo, p = 1, 3
    x = _block_inputs(runner, ids, lo)
    whole = torch.cat([h for _, h in x.batches(16)])
    with torch.no_grad():
        before, removed_output = runner.run_range(lo, p, whole), runner.run_range(lo, p + 1, whole)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    record = lstsq_init(runner, lo, p, x, 8)
    with torch.no_grad():
        after = runner.run_range(lo, p, whole)
    plain, fit = _squared(removed_output, before), _squared(removed_output, after)
    assert fit < 0.9 * plain
    assert record["residual_plain"] == pytest.approx(plain, rel=1e-4)
    assert record["residual_fit"] == pytest.approx(fit, rel=1e-3)
    assert record["tokens"] == 16 * 24 and record["into"] == "mlp.down_proj"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed == [f"model.layers.{p - 1}.mlp.down_proj.weight"]

    # the group's first block removed: no block of the group before it, nothing folded
    assert "skipped" in lstsq_init(runner, p, p, runner.run_range_batched(lo, p, x, 8), 8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in model.state_dict().items())


def test_lstsq_init_starts_a_run_and_is_recorded(tiny_llama, calib_file, tmp_path):
    report = compress_model(CompressJob(tiny_llama, tmp_path / "m", 0.34, calib=calib_file,
                                        settings=load_recipe("quick", {"repair_init": "lstsq"})))
    inits = [r["repair_init"] for r in report["iterations"]]
    assert len(inits) == len(report["removed_blocks"]) > 0 and report["settings"]["repair_init"] == "lstsq"
    folded = [i for i in inits if "skipped" not in i]
    assert folded and all(i["residual_fit"] < i["residual_plain"] for i in folded)


@pytest.mark.parametrize("family, method, says", [("gemma3_text", "fusegpt", "norm first"),
                                                   ("llama", "mi", "repairs nothing")])
def test_lstsq_init_where_it_cannot_apply_is_one_error(tiny_model_dir, calib_file, tmp_path, family, method, says):
    job = CompressJob(str(tiny_model_dir(family)), tmp_path / "m", 0.34, method=method, calib=calib_file,
                      settings=load_recipe("quick", {"repair_init": "lstsq"}))
    with pytest.raises(UserError, match=says) as err:
        compress_model(job)
    assert "\n" not in str(err.value) and "repair_init" in str(err.value)
    assert not (tmp_path / "m").exists()

"""The stage runner skips unchanged stages, redoes changed ones, and never shows a half-done stage as finished."""

import json

import pytest

from fusedeploy.pipeline.stages import MANIFEST, Stage, run_stage


class Recorder:
    def __init__(self):
        self.calls = []

    def stage(self, name, settings=None, inputs=None, fail_after_partial=False):
        def run(work):
            self.calls.append(name)
            (work / "progress.txt").write_text("half" if fail_after_partial else "done")
            if fail_after_partial:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-stage
            (work / "out.txt").write_text(f"{name} {settings}")
            return {"file": "out.txt"}

        return Stage(name, run, settings or {}, inputs or {})


def test_unchanged_stages_are_skipped_and_changed_ones_rerun(tmp_path):
    rec = Recorder()
    source = tmp_path / "model.txt"
    source.write_text("weights v1")
    build = tmp_path / "build"
    first = run_stage(build, rec.stage("compress", {"sparsity": 0.25}, {"model": source}))
    run_stage(build, rec.stage("export", {"q": "f16"}, {"model": build / "compress"}))
    assert rec.calls == ["compress", "export"] and not first["skipped"]

    again = run_stage(build, rec.stage("compress", {"sparsity": 0.25}, {"model": source}))
    run_stage(build, rec.stage("export", {"q": "f16"}, {"model": build / "compress"}))
    assert again["skipped"] and rec.calls == ["compress", "export"]

    run_stage(build, rec.stage("compress", {"sparsity": 0.5}, {"model": source}))  # new settings
    run_stage(build, rec.stage("export", {"q": "f16"}, {"model": build / "compress"}))  # its input changed
    assert rec.calls == ["compress", "export", "compress", "export"]
    assert (build / "compress" / "out.txt").read_text() == "compress {'sparsity': 0.5}"

    source.write_text("weights v2")  # same settings, new input content
    run_stage(build, rec.stage("compress", {"sparsity": 0.5}, {"model": source}))
    assert rec.calls[-1] == "compress" and len(rec.calls) == 5


def test_an_interrupted_stage_leaves_the_finished_one_intact_and_resumes(tmp_path):
    rec = Recorder()
    build = tmp_path / "build"
    run_stage(build, rec.stage("report", {"v": 1}))
    before = (build / "report" / MANIFEST).read_text()
    with pytest.raises(KeyboardInterrupt):
        run_stage(build, rec.stage("report", {"v": 2}, fail_after_partial=True))
    assert (build / "report" / MANIFEST).read_text() == before  # the finished stage is untouched
    assert not (build / "report.partial" / MANIFEST).exists()  # the partial never looks finished
    assert (build / "report.partial" / "progress.txt").read_text() == "half"

    result = run_stage(build, rec.stage("report", {"v": 2}))
    assert result["resumed"] and not (build / "report.partial").exists()
    manifest = json.loads((build / "report" / MANIFEST).read_text())
    assert manifest["settings"] == {"v": 2} and manifest["status"] == "complete"


def test_a_stage_folder_holding_the_users_files_is_neither_wiped_nor_replaced(tmp_path):
    """Work and finished folders are removed only when they hold nothing but what the stage declares it writes."""
    from fusedeploy.errors import UserError

    rec = Recorder()
    build = tmp_path / "build"

    def stage(v, **kw):
        s = rec.stage("report", {"v": v}, **kw)
        s.writes = ("progress.txt", "out.txt")
        return s

    with pytest.raises(KeyboardInterrupt):
        run_stage(build, stage(1, fail_after_partial=True))
    (build / "report.partial" / "mine.txt").write_text("the user's")
    with pytest.raises(UserError, match="mine.txt"):  # new settings would wipe the stale partial
        run_stage(build, stage(2))
    assert (build / "report.partial" / "mine.txt").read_text() == "the user's"

    (build / "report.partial" / "mine.txt").unlink()
    run_stage(build, stage(2))  # the stale partial, ours only, is wiped and the stage finishes
    (build / "report" / "mine.txt").write_text("the user's")
    assert run_stage(build, stage(2))["skipped"]  # an unchanged finished stage is only read
    with pytest.raises(UserError, match="mine.txt"):  # a changed one would replace the folder
        run_stage(build, stage(3))
    assert (build / "report" / "mine.txt").read_text() == "the user's"
    assert rec.calls == ["report", "report"]  # refused before any work

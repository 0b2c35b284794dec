"""The run and prepare work directory layouts keep the names existing runs and jobs have on disk."""

from pathlib import Path

import numpy as np

from coca.layout import RunLayout, is_temporary, step_name, step_of
from coca.prepare.layout import WorkLayout, shard_name


def test_run_layout_names():
    run = RunLayout("runs/a")
    assert run == RunLayout(Path("runs/a"))
    assert run.step_dir(500) == Path("runs/a/checkpoints/step_00000500")
    assert (run.config, run.model, run.metrics) == (Path("runs/a/config.yaml"), Path("runs/a/model"),
                                                    Path("runs/a/metrics.jsonl"))
    assert step_name(7) == "step_00000007" and step_of("step_00000007") == 7
    assert step_of("step_00000007.damaged") is None and step_of(".step_00000007.x1") is None
    assert is_temporary(".step_00000007.old") and not is_temporary("step_00000007")


def test_run_layout_has_started(tmp_path):
    run = RunLayout(tmp_path)
    assert not run.has_started()
    run.config.write_text("model: {}\n")
    assert not run.has_started()  # a config and no checkpoint: a run that never saved one
    (run.checkpoints / "step_00000002.damaged").mkdir(parents=True)
    assert run.has_started()


def test_work_layout_names_and_uids():
    work = WorkLayout("out/_work")
    assert work.filter_dir(3) == Path("out/_work/filter/task_000003")
    assert work.meta_file(3) == Path("out/_work/filter/task_000003/meta.parquet")
    assert work.emit_dir(3) == Path("out/_work/dedup/emit/task_000003")
    assert work.bucket_dir(4) == Path("out/_work/dedup/buckets/part_000004")
    assert work.cc_dir("visual", 2, 5) == Path("out/_work/dedup/cc_visual/round_002/part_000005")
    assert work.label_dir(6) == Path("out/_work/dedup/labels/part_000006")
    assert work.dedup_file == Path("out/_work/dedup.parquet") and shard_name(12) == "000012.tar"
    uid = WorkLayout.uid(3, 12)
    assert uid == "0000030000012" and WorkLayout.task_of(uid) == 3
    assert WorkLayout.format_uid(int(uid)) == uid and WorkLayout.task_of(int(uid)) == 3
    assert WorkLayout.task_of(np.array([int(uid), 12])).tolist() == [3, 0]

"""Where `coca data prepare` keeps its work, and how a sample's id is spelled, in one place:

    OUT/NNNNNN.tar                                   output shards
    OUT/_work/filter/task_NNNNNN/                    one filter task (samples.tar, meta.parquet, rejects.parquet, ...)
    OUT/_work/dedup.parquet                          stage 2's result
    OUT/_work/dedup/emit/task_NNNNNN/                partitioned dedup, pass 1 (one per filter task)
    OUT/_work/dedup/buckets/part_NNNNNN/             pass 2 (one per key partition)
    OUT/_work/dedup/cc_NAME/round_NNN/part_NNNNNN/   pass 3 (one per connected-components round and node partition)
    OUT/_work/dedup/labels/part_NNNNNN/              pass 4 (one per node partition)
    OUT/_work/dedup/centroids.npy                    semantic deduplication's k-means centroids

A task's directory is written under a hidden name (``.task_NNNNNN.tmpPID``) and renamed when done.

A sample's uid is its filter task (6 digits) and its row in that task (7 digits): 13 digits, so
uids sort in input order, and as an integer its task is ``uid // UID_TASK``.
"""

from __future__ import annotations

from pathlib import Path

from ..layout import Entry, Layout

TASK_DIGITS, ROW_DIGITS = 6, 7
UID_DIGITS = TASK_DIGITS + ROW_DIGITS
UID_TASK = 10 ** ROW_DIGITS


def shard_name(index: int) -> str:
    """Output shard ``index``'s file name: ``000012.tar``."""
    return f"{index:06d}.tar"


def _numbered(prefix: str, n: int) -> str:
    return f"{prefix}_{n:06d}"


class WorkLayout(Layout):
    """The paths of one prepare job's work directory (``OUT/_work``)."""

    filter = Entry("filter")
    dedup = Entry("dedup")
    dedup_file = Entry("dedup.parquet")
    centroids = Entry("dedup", "centroids.npy")

    @staticmethod
    def uid(task: int, row: int) -> str:
        """The uid of row ``row`` of filter task ``task``: ``"0000030000012"``."""
        return f"{task:0{TASK_DIGITS}d}{row:0{ROW_DIGITS}d}"

    @staticmethod
    def format_uid(number: int) -> str:
        """A uid held as an integer, spelled as a uid again."""
        return f"{number:0{UID_DIGITS}d}"

    @staticmethod
    def task_of(uid: str | int):
        """The filter task of a uid (a string), or of uids held as integers (an int or an array)."""
        return int(uid[:TASK_DIGITS]) if isinstance(uid, str) else uid // UID_TASK

    def filter_dir(self, task: int) -> Path:
        return self.filter / _numbered("task", task)

    def meta_file(self, task: int) -> Path:
        return self.filter_dir(task) / "meta.parquet"

    def filter_temporaries(self) -> list[Path]:
        """Filter task directories a crashed run left half-written."""
        return list(self.filter.glob(".task_*"))

    def emit_dir(self, task: int) -> Path:
        return self.dedup / "emit" / _numbered("task", task)

    def bucket_dir(self, q: int) -> Path:
        return self.dedup / "buckets" / _numbered("part", q)

    def cc_round(self, name: str, rnd: int) -> Path:
        return self.dedup / f"cc_{name}" / f"round_{rnd:03d}"

    def cc_dir(self, name: str, rnd: int, p: int) -> Path:
        return self.cc_round(name, rnd) / _numbered("part", p)

    def cc_parts(self, name: str, rnd: int) -> list[Path]:
        """The finished partitions of a connected-components round, in order."""
        return sorted(self.cc_round(name, rnd).glob("part_*"))

    def label_dir(self, p: int) -> Path:
        return self.dedup / "labels" / _numbered("part", p)

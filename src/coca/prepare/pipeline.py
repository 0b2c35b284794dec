"""`coca data prepare`: raw image-text pairs -> filtered, deduplicated, shuffled webdataset shards.

Three stages, each made of tasks whose completion is a rename, so a rerun after a crash redoes
only unfinished tasks and the output never holds a half-written shard:

1. filter (one task per input tar shard, or per ``rows_per_task`` rows of a CSV/Parquet file), in
   parallel: decode, filter, hash; accepted samples go to ``OUT/_work/filter/task_N/samples.tar``
   (already in their output form) with their hashes in ``meta.parquet``; rejected ones to
   ``rejects.parquet`` with the reason.
2. dedup (one process, over the hashes only): exact and near-duplicate images (and optionally
   captions) grouped; the first sample of each group in input order is kept, the others are
   recorded with the id they duplicate (``OUT/_work/dedup.parquet``).
3. shard (one task per output shard), in parallel: the kept samples in a seeded global shuffle,
   ``samples_per_shard`` per ``OUT/NNNNNN.tar`` (``{key}.jpg``, ``{key}.txt``, ``{key}.json``).

Then ``OUT/rejects.parquet`` (every rejected sample with its reason: nothing is dropped without a
record) and ``OUT/stats.json`` (counts in and out by reason).
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..config import ConfigError
from ..data.readers import (
    PARQUET_SUFFIX,
    TABLE_SUFFIXES,
    TAR_SUFFIXES,
    CsvSource,
    expand_braces,
    has_suffix,
    is_tar,
    read_tar_groups,
)
from ..data.samples import Skipped
from ..errors import InputNotFound, UserError
from ..io import atomic_write_bytes, atomic_write_text, commit_dir
from .config import PrepareConfig
from .decontaminate import build_eval_index, eval_index
from .dedup import partitioned_duplicates, single_process_duplicates
from .engine import parallel_map
from .filters import process_sample
from .layout import WorkLayout, shard_name
from .semantic import EMBEDDINGS_FILE, check_model, embed_images

REJECT_COLUMNS = ("uid", "key", "source", "reason", "duplicate_of", "eval_file", "similarity")


@dataclass(frozen=True)
class Task:
    index: int
    path: str
    start: int = 0   # table rows [start, stop); tar tasks read the whole shard
    stop: int = -1

    @property
    def is_tar(self) -> bool:
        return is_tar(self.path)


# ------------------------------------------------------------------------------------ inputs

def list_tasks(inputs: list[str], cfg: PrepareConfig) -> list[Task]:
    paths: list[str] = []
    for pattern in inputs:
        for p in expand_braces(pattern):
            path = Path(p)
            if path.is_dir():
                found = sorted(str(x) for x in path.iterdir() if has_suffix(x, TAR_SUFFIXES))
                if not found:
                    raise InputNotFound(f"input directory {p!r} has no .tar shards")
                paths += found
            elif path.is_file():
                paths.append(str(path))
            else:
                raise InputNotFound(f"input {p!r} not found")
    tasks: list[Task] = []
    for p in paths:
        if is_tar(p):
            tasks.append(Task(len(tasks), p))
        elif has_suffix(p, TABLE_SUFFIXES):
            n = len(_read_table(p, cfg.image_column, cfg.caption_column, cfg.image_root))
            for start in range(0, n, cfg.rows_per_task):
                tasks.append(Task(len(tasks), p, start, min(n, start + cfg.rows_per_task)))
        else:
            raise UserError(f"input {p!r}: expected .tar shards, a directory of them, or {'/'.join(TABLE_SUFFIXES)}")
    if not tasks:
        raise UserError("no input samples")
    return tasks


@functools.lru_cache(maxsize=4)
def _read_table(path: str, image_column: str, caption_column: str, image_root: str) -> list[tuple[Path | None, object]]:
    """(image path, raw caption) rows of a CSV/TSV (``CsvSource``) or Parquet file."""
    if not has_suffix(path, PARQUET_SUFFIX):
        src = CsvSource(path, image_root or None, image_column, caption_column)
        return [(src.image_path(i), src.raw_caption(i)) for i in range(len(src))]
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    for col in (image_column, caption_column):
        if col not in table.column_names:
            raise UserError(f"{path}: no column {col!r} (columns: {table.column_names}); "
                             "set image_column / caption_column")
    root = Path(image_root) if image_root else Path(path).parent
    return [(root / image if image else None, caption)
            for image, caption in zip(table.column(image_column).to_pylist(), table.column(caption_column).to_pylist())]


def read_task(task: Task, cfg: PrepareConfig):
    """Yield (key, source, image bytes or None, raw caption or None), or Skipped for corrupt members."""
    if task.is_tar:
        for group in read_tar_groups(task.path):
            if isinstance(group, Skipped):
                yield group
            else:
                yield group.key, f"{task.path}:{group.key}", group.image, group.caption
        return
    rows = _read_table(task.path, cfg.image_column, cfg.caption_column, cfg.image_root)
    for i in range(task.start, task.stop):
        image_path, caption = rows[i]
        data = None
        if image_path is not None:
            try:
                data = image_path.read_bytes()
            except OSError:
                data = None
        yield str(i), f"{task.path}:{i}:{image_path}", data, caption


# ----------------------------------------------------------------------------- stage 1: filter

def filter_task(task: Task, cfg: PrepareConfig, work: str) -> dict:
    """Filter and hash one input task into ``work/filter/task_N`` (skipped if already done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    final = WorkLayout(work).filter_dir(task.index)
    if final.is_dir():
        return json.loads((final / "counts.json").read_text())
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta, rejects, counts = [], [], Counter()
    evaluation = eval_index(work, cfg.dedup.phash_max_distance) if cfg.dedup.against else None
    keep_images = bool(cfg.filters.similarity_model or cfg.dedup.semantic_model)
    with tarfile.open(tmp / "samples.tar", "w") as tf:
        for n, item in enumerate(read_task(task, cfg)):
            counts["input"] += 1
            uid = WorkLayout.uid(task.index, n)
            if isinstance(item, Skipped):
                rejects.append({"uid": uid, "key": item.key, "source": task.path, "reason": item.reason,
                                "duplicate_of": None})
                continue
            key, source, image_bytes, caption_raw = item
            reason, rec = process_sample(image_bytes, caption_raw, cfg.filters, key, cfg.jpeg_quality)
            matched = evaluation.match(rec["phash"]) if evaluation and not reason else None
            if reason or matched:
                rejects.append({"uid": uid, "key": key, "source": source, "reason": reason or "eval_overlap",
                                "duplicate_of": None, "eval_file": matched})
                continue
            row = {"uid": uid, "key": key, "source": source, "width": rec["width"], "height": rec["height"],
                   "caption": rec["caption"], "pixel_sha1": rec["pixel_sha1"],
                   "phash": [_signed(h) for h in rec["phash"]],  # stored as int64
                   "regions": [_signed(h) for h in rec["regions"]], "content_box": rec["content_box"],
                   "caption_sha1": rec["caption_sha1"], "minhash": rec["minhash"]}
            if keep_images:  # the similarity filter and the embeddings run batched at the end of the task
                row.update(_image=rec["_image"], _jpeg=rec["jpeg"])
            else:
                _add_sample(tf, row, rec["jpeg"])
            meta.append(row)
        if keep_images:
            if cfg.filters.similarity_model:
                meta = _similarity_filter(meta, rejects, cfg)
            if cfg.dedup.semantic_model:  # row i of the embeddings is row i of meta.parquet
                np.save(tmp / EMBEDDINGS_FILE, embed_images([r["_image"] for r in meta], cfg.dedup.semantic_model))
            for row in meta:
                _add_sample(tf, row, row.pop("_jpeg"))
                del row["_image"]
    counts["accepted"] = len(meta)
    counts.update(f"rejected:{r['reason']}" for r in rejects)
    pq.write_table(pa.Table.from_pylist(meta, schema=_meta_schema()), tmp / "meta.parquet")
    pq.write_table(pa.Table.from_pylist(rejects, schema=_reject_schema()), tmp / "rejects.parquet")
    (tmp / "counts.json").write_text(json.dumps(dict(counts)))
    commit_dir(tmp, final)
    return dict(counts)


def _meta_schema():
    import pyarrow as pa
    return pa.schema([("uid", pa.string()), ("key", pa.string()), ("source", pa.string()), ("width", pa.int32()),
                      ("height", pa.int32()), ("caption", pa.string()), ("pixel_sha1", pa.string()),
                      ("phash", pa.list_(pa.int64())), ("regions", pa.list_(pa.int64())),
                      ("content_box", pa.list_(pa.int32())), ("caption_sha1", pa.string()),
                      ("minhash", pa.list_(pa.uint32()))])


def _reject_schema():
    import pyarrow as pa
    return pa.schema([(c, pa.float64() if c == "similarity" else pa.string()) for c in REJECT_COLUMNS])


_similarity_models: dict = {}


def _similarity_filter(meta: list[dict], rejects: list[dict], cfg: PrepareConfig) -> list[dict]:
    """Reject pairs whose image-text cosine under a coca model is below the threshold."""
    import torch

    from ..cpu import one_cpu_thread
    from ..data.transforms import eval_transform
    from ..loading import load_model
    path = cfg.filters.similarity_model
    if path not in _similarity_models:  # once per worker process
        _similarity_models[path] = load_model(path)
    model = _similarity_models[path]
    transform = eval_transform(model.cfg.vision.image_size)
    kept = []
    with torch.no_grad(), one_cpu_thread(next(model.parameters()).device):  # the same decisions on every engine
        for start in range(0, len(meta), 64):
            chunk = meta[start:start + 64]
            images = torch.stack([transform(r["_image"]) for r in chunk])
            sims = (model.encode_image(images) * model.encode_text(model.tokenizer.encode([r["caption"] for r in chunk]))
                    ).sum(-1).tolist()
            for row, sim in zip(chunk, sims):
                if sim < cfg.filters.similarity_threshold:
                    rejects.append({"uid": row["uid"], "key": row["key"], "source": row["source"],
                                    "reason": "low_similarity", "duplicate_of": None})
                else:
                    kept.append(row)
    return kept


def _signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


def _add_sample(tf: tarfile.TarFile, row: dict, jpeg: bytes) -> None:
    """The sample exactly as it will appear in an output shard: {uid}.jpg, .txt and .json."""
    uid = row["uid"]
    info = {"key": uid, "source": row["source"], "source_key": row["key"], "width": row["width"],
            "height": row["height"], "pixel_sha1": row["pixel_sha1"],
            "phash": f"{row['phash'][0] & ((1 << 64) - 1):016x}", "caption_sha1": row["caption_sha1"],
            "content_box": row["content_box"]}  # the picture without uniform borders: left, top, right, bottom
    _add_member(tf, f"{uid}.jpg", jpeg)
    _add_member(tf, f"{uid}.txt", row["caption"].encode())
    _add_member(tf, f"{uid}.json", json.dumps(info).encode())


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical input gives identical bytes
    tf.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------ stage 2: dedup

def dedup_stage(work: Path, tasks: list[Task], cfg: PrepareConfig, log) -> Path:
    """``work/dedup.parquet`` (skipped if already written), in one process or partitioned
    (``dedup.partitioned``; by default with the Ray engine). Both give the same file."""
    out = WorkLayout(work).dedup_file
    if out.is_file():
        return out
    t0 = time.time()
    if _partitioned(cfg):
        run = functools.partial(_run_tasks, cfg=cfg)
        partitioned_duplicates(work, len(tasks), cfg, run, log)
    else:
        single_process_duplicates(work, len(tasks), cfg)
        log(f"dedup: {time.time() - t0:.1f}s")
    return out


def _partitioned(cfg: PrepareConfig) -> bool:
    return cfg.engine == "ray" if cfg.dedup.partitioned is None else cfg.dedup.partitioned


def _run_tasks(fn, items, desc, cfg: PrepareConfig):
    return parallel_map(fn, items, cfg.engine, cfg.workers, cfg.ray_address, desc)


# ------------------------------------------------------------------------------ stage 3: shard

def shard_task(job: tuple[int, list[str]], work: str, out: str) -> int:
    """Write output shard ``job[0]`` with the samples ``job[1]`` (uids), in that order, copying
    their members from the filter tasks' tars."""
    index, uids = job
    final = Path(out) / shard_name(index)
    if final.is_file():
        return len(uids)
    layout = WorkLayout(work)
    by_task: dict[int, set[str]] = {}
    for uid in uids:
        by_task.setdefault(layout.task_of(uid), set()).add(uid)
    members: dict[str, bytes] = {}
    for task_id, wanted in by_task.items():
        with tarfile.open(layout.filter_dir(task_id) / "samples.tar") as tf:
            for member in tf:
                if member.name.split(".")[0] in wanted:
                    members[member.name] = tf.extractfile(member).read()
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    with tarfile.open(tmp, "w") as tf:
        for uid in uids:
            for ext in ("jpg", "txt", "json"):
                _add_member(tf, f"{uid}.{ext}", members[f"{uid}.{ext}"])
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return len(uids)


# ---------------------------------------------------------------------------------- execution

def _remove_temporaries(out: Path, work: Path) -> None:
    """Half-written task directories and shards of a crashed run (one driver per output directory)."""
    layout = WorkLayout(work)
    for p in [*layout.filter_temporaries(), *out.glob(".*.tar.tmp*"), *layout.dedup.rglob(".*.tmp*")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def run_prepare(inputs: list[str], output: str, cfg: PrepareConfig, log=print) -> dict:
    """The whole job (resumable: rerun the same command after a crash)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    t0 = time.time()
    out = Path(output)
    work = out / "_work"
    layout = WorkLayout(work)
    work.mkdir(parents=True, exist_ok=True)
    config_file = out / "prepare_config.yaml"
    settings = {"inputs": list(inputs), **cfg.to_dict()}
    runtime = ("engine", "workers", "ray_address")  # may change between runs of the same job
    if config_file.is_file():
        before = yaml.safe_load(config_file.read_text())
        if {k: v for k, v in before.items() if k not in runtime} != {k: v for k, v in settings.items() if k not in runtime}:
            raise ConfigError(f"{out} was prepared with other inputs or settings ({config_file}); "
                              "use a new output directory")
    else:
        atomic_write_text(config_file, yaml.safe_dump(settings, sort_keys=False))
    _remove_temporaries(out, work)
    tasks = list_tasks(inputs, cfg)
    done = sum(layout.filter_dir(t.index).is_dir() for t in tasks)
    log(f"{len(tasks)} input tasks ({done} already done), engine {cfg.engine}")
    against = build_eval_index(cfg.dedup.against, work, cfg.filters.max_pixels, functools.partial(_run_tasks, cfg=cfg),
                               log) if cfg.dedup.against else None
    if cfg.dedup.semantic_model:  # a model that cannot be used fails here, before any work
        info = check_model(work, cfg.dedup.semantic_model)
        log(f"semantic deduplication: embeddings of size {info['embed_dim']} at {info['image_size']} px, "
            f"cosine >= {cfg.dedup.semantic_threshold}")
    counts = Counter()
    for c in _run_tasks(functools.partial(filter_task, cfg=cfg, work=str(work)), tasks, "filter", cfg):
        counts.update(c)
    dedup_file = dedup_stage(work, tasks, cfg, log)

    dedup = pq.read_table(dedup_file).to_pydict()
    kept = [u for u, d in zip(dedup["uid"], dedup["duplicate_of"]) if d is None]
    order = np.random.default_rng(cfg.seed).permutation(len(kept))
    kept = [kept[i] for i in order]
    jobs = [(i, kept[s:s + cfg.samples_per_shard]) for i, s in enumerate(range(0, len(kept), cfg.samples_per_shard))]
    written = _run_tasks(functools.partial(shard_task, work=str(work), out=str(out)), jobs, "shard", cfg)

    # every rejection, with its reason: filter rejects of all tasks, then duplicates
    tables = [pq.read_table(layout.filter_dir(t.index) / "rejects.parquet") for t in tasks]
    dup_rows = [{"uid": u, "key": k, "source": src, "reason": r, "duplicate_of": d, "similarity": sim}
                for u, k, src, d, r, sim in zip(dedup["uid"], dedup["key"], dedup["source"], dedup["duplicate_of"],
                                                dedup["reason"], dedup["similarity"]) if d is not None]
    rejects = pa.concat_tables(tables + [pa.Table.from_pylist(dup_rows, schema=_reject_schema())])
    buf = io.BytesIO()
    pq.write_table(rejects, buf)
    atomic_write_bytes(out / "rejects.parquet", buf.getvalue())
    by_reason = Counter(rejects.column("reason").to_pylist())
    stats = {
        "input_samples": counts["input"], "passed_filters": counts["accepted"],
        "duplicates": len(dup_rows), "output_samples": sum(written), "shards": len(jobs),
        "samples_per_shard": cfg.samples_per_shard, "rejected_by_reason": dict(sorted(by_reason.items())),
        "tasks": len(tasks), "engine": cfg.engine, **({"evaluation_images": against} if against else {}), "seconds": round(time.time() - t0, 1),
    }
    assert stats["input_samples"] == stats["output_samples"] + sum(by_reason.values()), "a sample went unaccounted"
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1) + "\n")
    log(f"{stats['input_samples']} samples in, {stats['output_samples']} out in {len(jobs)} shards; "
        f"rejected: {dict(by_reason)}")
    return stats

"""Stage 2 of `coca data prepare` partitioned over workers: the same groups, representatives and
reasons as the single-process path and as a brute-force computation, on Ray as locally; resumable
after SIGKILL; dead workers retried."""

import functools
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from coca.prepare.config import load_prepare_config
from coca.prepare.dedup import (
    REASONS,
    partitioned_duplicates,
    single_process_duplicates,
)
from coca.prepare.engine import WorkerDied, parallel_map
from coca.prepare.hashing import MINHASH_BANDS
from coca.prepare.planted import synthetic_hash_records

sys.path.insert(0, os.path.dirname(__file__))
from test_prepare import SMALL, prepare_planted, read_output, rejects_of  # noqa: E402
from worker_faults import always_die, die_once  # noqa: E402


def sequential(fn, items, desc):
    return [fn(x) for x in items]


def brute_force(work: Path, n_tasks: int, cfg) -> dict:
    """{uid: (duplicate_of, reason)} from every pair compared in plain Python, and components found
    by a breadth-first search, stage by stage as the module docstring defines them."""
    rows = []
    for t in range(n_tasks):
        rows += pq.read_table(work / "filter" / f"task_{t:06d}" / "meta.parquet").to_pylist()
    n, d = len(rows), cfg.dedup
    phash = [[h & (2 ** 64 - 1) for h in r["phash"]] for r in rows]
    regions = [[h & (2 ** 64 - 1) for h in r["regions"]] for r in rows]

    def regions_agree(x, y):  # the centre (the middle of the 3 x 3) and enough regions within distance
        close = [bin(a ^ b).count("1") <= d.region_max_distance for a, b in zip(x, y)]
        return d.region_min_agree > 0 and close[4] and sum(close) >= d.region_min_agree
    bands = [[tuple(r["minhash"][b * 4:(b + 1) * 4]) for b in range(MINHASH_BANDS)] for r in rows]
    kinds = {"exact": [], "near": [], "caption": []}
    for i in range(n):
        for j in range(i + 1, n):
            a, b = rows[i], rows[j]
            if d.exact_images and a["pixel_sha1"] == b["pixel_sha1"]:
                kinds["exact"].append((i, j))
            if d.near_images and (min(bin(x ^ y).count("1") for x in phash[i] for y in phash[j]) <= d.phash_max_distance
                                  or regions_agree(regions[i], regions[j])):
                kinds["near"].append((i, j))
            if d.captions and (a["caption_sha1"] == b["caption_sha1"] or (
                    any(x == y for x, y in zip(bands[i], bands[j]))
                    and sum(x == y for x, y in zip(a["minhash"], b["minhash"])) / 64 >= d.caption_jaccard)):
                kinds["caption"].append((i, j))

    def smallest_in_component(edges):
        graph = {i: [] for i in range(n)}
        for i, j in edges:
            graph[i].append(j)
            graph[j].append(i)
        label = {}
        for start in range(n):  # in increasing order: the first to reach a component is its smallest
            if start in label:
                continue
            label[start], todo = start, [start]
            while todo:
                for y in graph[todo.pop()]:
                    if y not in label:
                        label[y] = start
                        todo.append(y)
        return label

    exact_dup = {j for i, j in kinds["exact"]}
    image = smallest_in_component(kinds["exact"] + kinds["near"])
    final = smallest_in_component(kinds["exact"] + kinds["near"] + kinds["caption"])
    out = {}
    for i, r in enumerate(rows):
        if final[i] != i:
            reason = REASONS[0] if i in exact_dup else REASONS[1] if image[i] != i else REASONS[2]
            out[r["uid"]] = (rows[final[i]]["uid"], reason)
    return out


def dedup_rows(path: Path) -> dict:
    return {r["uid"]: (r["duplicate_of"], r["reason"]) for r in pq.read_table(path).to_pylist()
            if r["duplicate_of"] is not None}


@pytest.mark.parametrize("captions, exact", [(False, True), (True, True), (False, False)])
def test_partitioned_equals_single_process_and_brute_force(tmp_path, captions, exact):
    n, tasks = 600, 7
    counts = synthetic_hash_records(tmp_path / "single", n, tasks, seed=4, captions=captions, chain_length=5)
    synthetic_hash_records(tmp_path / "parts", n, tasks, seed=4, captions=captions, chain_length=5)
    cfg = load_prepare_config(None, [f"dedup.captions={str(captions).lower()}", "dedup.partition_samples=70",
                                     f"dedup.exact_images={str(exact).lower()}"])
    single = single_process_duplicates(tmp_path / "single", tasks, cfg)
    parts, report = partitioned_duplicates(tmp_path / "parts", tasks, cfg, sequential, lambda *a: None)
    assert parts.read_bytes() == single.read_bytes()  # the same file, byte for byte
    expected = brute_force(tmp_path / "single", tasks, cfg)
    assert dedup_rows(parts) == expected
    reasons = [r for _, r in expected.values()]
    if exact:
        assert reasons.count("duplicate_exact") >= counts["exact_copies"] * 0.9
    else:  # exact copies are found by their identical pHashes: buckets of 3+ copies linked in a star
        assert reasons.count("duplicate_near_image") >= counts["exact_copies"] + counts["near_copies"] * 0.9
    assert reasons.count("duplicate_near_image") >= (counts["near_copies"] + counts["overlay_copies"]) * 0.9
    assert ("duplicate_caption" in reasons) == captions
    # the chains need several rounds of connected components, over several partitions
    assert report["partitions"] == 9 and report["cc_rounds"]["image"] >= 3
    chains = [u for u, (rep, _) in expected.items() if int(u) % 10 ** 7 % 20 == 3]
    assert chains  # chain links, joined to their chain's first link through the others


def test_partitioned_with_sampled_lsh_tables(tmp_path):
    """Beyond 5,461 samples the LSH tables are random bit samples: both paths use the same ones."""
    n, tasks = 8000, 4
    synthetic_hash_records(tmp_path / "single", n, tasks, seed=5)
    synthetic_hash_records(tmp_path / "parts", n, tasks, seed=5)
    cfg = load_prepare_config(None, ["dedup.partition_samples=3000"])
    single = single_process_duplicates(tmp_path / "single", tasks, cfg)
    parts, report = partitioned_duplicates(tmp_path / "parts", tasks, cfg, sequential, lambda *a: None)
    assert report["lsh_tables"] > 7 and report["partitions"] == 3  # not the 7 pigeonhole bands
    assert parts.read_bytes() == single.read_bytes()
    assert len(dedup_rows(parts)) > 0.15 * n


def test_ray_and_partitioned_local_give_the_same_output_as_one_process(planted, tmp_path):
    pytest.importorskip("ray")
    root, _, _ = planted
    single = prepare_planted(root, tmp_path / "single", "dedup.partitioned=false")
    local = prepare_planted(root, tmp_path / "local", "dedup.partitioned=true", "dedup.partition_samples=30")
    ray = prepare_planted(root, tmp_path / "ray", "engine=ray", "dedup.partition_samples=30")
    assert len(list((ray / "_work" / "dedup" / "buckets").glob("part_*"))) == 6  # 160 samples / 30
    for out in (local, ray):
        for name in ["rejects.parquet", "_work/dedup.parquet", *(p.name for p in single.glob("*.tar"))]:
            assert (out / name).read_bytes() == (single / name).read_bytes(), name
    assert {r["reason"] for r in rejects_of(ray)} == {"duplicate_exact", "duplicate_near_image"}


KILL_AT_COMMIT = """
import os, signal, sys
from coca.prepare import dedup
commit, calls = dedup._commit, []
def killed(tmp, final, info):  # SIGKILL with a task's files written but not yet renamed
    calls.append(final)
    if len(calls) == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(tmp, final, info)
dedup._commit = killed
from coca.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kill_at", [6, 13])  # in the bucket pass; in a connected-components round
def test_sigkill_in_partitioned_dedup_then_rerun_gives_the_same_output(planted, tmp_path, kill_at):
    root, _, _ = planted
    args = ["data", "prepare", "--input", str(root / "in"), "--output", str(tmp_path / "out")]
    args += sum((["--set", s] for s in [*SMALL, "workers=1", "dedup.partitioned=true",
                                        "dedup.partition_samples=30"]), [])
    proc = subprocess.run([sys.executable, "-c", KILL_AT_COMMIT.replace("{n}", str(kill_at)), *args],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    dedup_dir = tmp_path / "out" / "_work" / "dedup"
    finished = {p: p.stat().st_ino for pattern in ("emit/task_*", "*/part_*", "cc_*/round_*/part_*")
                for p in dedup_dir.glob(pattern)}
    assert len(finished) == kill_at - 1 and list(dedup_dir.rglob(".*.tmp*"))
    assert not (tmp_path / "out" / "_work" / "dedup.parquet").exists()
    from coca.cli import main
    assert main(args) == 0
    assert {p: p.stat().st_ino for p in finished} == finished  # finished tasks were not redone
    assert not list(dedup_dir.rglob(".*.tmp*"))
    reference = prepare_planted(root, tmp_path / "reference", "dedup.partitioned=false")
    for name in ["rejects.parquet", "stats.json", *(p.name for p in reference.glob("*.tar"))]:
        a, b = (tmp_path / "out" / name).read_bytes(), (reference / name).read_bytes()
        assert a == b or name == "stats.json" and json.loads(a)["output_samples"] == json.loads(b)["output_samples"]


# ------------------------------------------------------------------------------ dead workers

def test_a_killed_local_worker_is_retried_then_reported(tmp_path):
    fn = functools.partial(die_once, marker_dir=str(tmp_path))
    assert parallel_map(fn, list(range(6)), "local", workers=2, desc="t") == [x * x for x in range(6)]
    with pytest.raises(WorkerDied, match="died 3 times.*rerun the same command"):
        parallel_map(always_die, list(range(4)), "local", workers=2, desc="t")


def test_a_killed_ray_worker_is_retried(tmp_path):
    ray = pytest.importorskip("ray")
    import worker_faults
    ray.cloudpickle.register_pickle_by_value(worker_faults)  # Ray's workers do not import from tests/
    fn = functools.partial(die_once, marker_dir=str(tmp_path))
    assert parallel_map(fn, list(range(4)), "ray", workers=2, desc="t") == [x * x for x in range(4)]
    assert (tmp_path / "1.seen").exists()


def test_an_unreachable_ray_address_is_a_clear_error(planted, tmp_path):
    root, _, _ = planted
    proc = subprocess.run([sys.executable, "-m", "coca.cli", "data", "prepare", "--input", str(root / "in"),
                           "--output", str(tmp_path / "out"), "--set", "engine=ray",
                           "--set", "ray_address=127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot reach the Ray cluster at ray_address='127.0.0.1:1'" in proc.stderr
    assert not (tmp_path / "out" / "stats.json").exists()


# ---------------------------------------------------------------------- evaluation-set overlap

@pytest.fixture(scope="module")
def contaminated(tmp_path_factory):
    """24 evaluation images (half JPEG at the top, half PNG in a subfolder) and training shards of
    40 distinct pictures plus 16 copies of evaluation images (exact, resized, recompressed, cropped)."""
    import io

    from PIL import Image

    from coca.prepare.planted import planted_eval_copies, planted_samples, write_shards
    root = tmp_path_factory.mktemp("contaminated")
    evals, copies, truth = planted_eval_copies(24, 16, seed=2, size=128)
    files = {}
    for i, (name, data) in enumerate(evals):
        if i % 2:  # PNG, in a subfolder: the exact copies of these are of the decoded pixels
            path = root / "eval" / "sub" / name.replace(".jpg", ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.open(io.BytesIO(data)).save(path)
        else:
            path = root / "eval" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        files[name] = str(path)
    distinct, _ = planted_samples(40, 0, seed=9, size=128)
    samples = distinct + copies
    order = np.random.default_rng(0).permutation(len(samples))
    write_shards([samples[i] for i in order], root / "in", 14)
    return root, {key: files[name] for key, name in truth.items()}


def test_training_copies_of_evaluation_images_are_rejected_with_the_file_they_copy(contaminated, tmp_path):
    root, expected = contaminated
    out = prepare_planted(root, tmp_path / "out", f"dedup.against={root / 'eval'}")
    rejects = rejects_of(out)
    found = {r["key"]: r["eval_file"] for r in rejects if r["reason"] == "eval_overlap"}
    assert found == expected  # every copy, of each kind, and nothing else; with the file it copies
    assert all(r["eval_file"] is None for r in rejects if r["reason"] != "eval_overlap")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["evaluation_images"] == {"images": 24, "unreadable": 0}
    assert stats["output_samples"] == 40 and stats["rejected_by_reason"] == {"eval_overlap": 16}
    pytest.importorskip("ray")
    ray = prepare_planted(root, tmp_path / "ray", f"dedup.against={root / 'eval'}", "engine=ray")
    assert (ray / "rejects.parquet").read_bytes() == (out / "rejects.parquet").read_bytes()


def test_bad_evaluation_sets_are_clear_errors(contaminated, tmp_path, capsys):
    from coca.cli import main
    root, _ = contaminated

    def prepare(against, out):
        return main(["data", "prepare", "--input", str(root / "in"), "--output", str(tmp_path / out),
                     "--set", "filters.min_side=64", "--set", "workers=1", "--set", f"dedup.against={against}"])

    assert prepare(tmp_path / "missing", "a") == 2
    assert "not an image file, folder, glob pattern or list file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    assert prepare(tmp_path / "empty", "b") == 2
    assert "contains no images" in capsys.readouterr().err
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    (tmp_path / "bad.txt").write_text(f"{tmp_path / 'broken.jpg'}\n{tmp_path / 'gone.jpg'}\n")
    assert prepare(tmp_path / "bad.txt", "c") == 2
    assert "none of the 2 evaluation images could be read" in capsys.readouterr().err
    good = sorted((root / "eval").glob("*.jpg"))[:3]
    (tmp_path / "mixed.txt").write_text("\n".join(map(str, [*good, tmp_path / "broken.jpg"])) + "\n")
    assert prepare(tmp_path / "mixed.txt", "d") == 0  # the unreadable one is reported and counted
    assert "1 of 4 evaluation images could not be read" in capsys.readouterr().out
    stats = json.loads((tmp_path / "d" / "stats.json").read_text())
    assert stats["evaluation_images"] == {"images": 3, "unreadable": 1}


# ------------------------------------------------------------------- web-style near duplicates

@pytest.fixture(scope="module")
def web_planted(tmp_path_factory):
    """120 pictures, 80 copies (10 of each of the 8 copy kinds), 9 groups of 3 look-alikes, a blank
    picture and one with only a sliver of content between wide bars, in 4 tar shards."""
    from coca.prepare.planted import (
        jpeg,
        random_photo,
        web_planted_samples,
        write_shards,
    )
    root = tmp_path_factory.mktemp("web")
    samples, truth, kinds = web_planted_samples(120, 80, 9, seed=5, size=128)
    sliver = Image.new("RGB", (128, 128), (20, 20, 20))
    sliver.paste(random_photo(3, 128).crop((0, 0, 128, 8)), (0, 60))  # 8 of 128 rows: under 10%
    samples += [("blank", jpeg(Image.new("RGB", (128, 128), (200, 30, 30))), "a plain red square picture"),
                ("sliver", jpeg(sliver), "a thin strip of a picture")]
    write_shards(samples, root / "in", 60)
    return root, samples, truth, kinds


def test_web_copies_are_found_and_look_alikes_kept(web_planted, tmp_path):
    from coca.prepare.planted import (
        LOOKALIKE_KINDS,
        WEB_COPY_KINDS,
        found_copies,
        score,
    )
    root, samples, truth, kinds = web_planted
    out = prepare_planted(root, tmp_path / "out")
    rejects = rejects_of(out)
    kept = read_output(out)[0]
    uid_to_key = {r["uid"]: r["key"] for r in rejects} | {u: info["source_key"] for u, (_, info) in kept.items()}
    reasons = {uid_to_key[r["uid"]]: r["reason"] for r in rejects}
    assert reasons["blank"] == reasons["sliver"] == "no_content"
    result = score(rejects, uid_to_key, truth)
    assert result["precision"] == 1.0 and result["recall"] >= 0.97
    found = found_copies(rejects, uid_to_key, truth)
    for kind in WEB_COPY_KINDS:  # without trimming, borders are found ~1 in 2; without regions, caption bars too
        copies = [k for k, v in kinds.items() if v == kind]
        assert sum(k in found for k in copies) >= 0.9 * len(copies), kind
    lookalikes = [k for k, v in kinds.items() if v in LOOKALIKE_KINDS]
    assert len(lookalikes) == 27 and not any(k in reasons for k in lookalikes)
    # each kept sample's JSON says where its content is
    assert all(len(info["content_box"]) == 4 for _, info in kept.values())


def test_web_dedup_is_the_same_partitioned_and_on_ray(web_planted, tmp_path):
    pytest.importorskip("ray")
    root = web_planted[0]
    single = prepare_planted(root, tmp_path / "single", "dedup.partitioned=false")
    local = prepare_planted(root, tmp_path / "local", "dedup.partitioned=true", "dedup.partition_samples=40")
    ray = prepare_planted(root, tmp_path / "ray", "engine=ray", "dedup.partition_samples=40")
    assert (ray / "_work" / "dedup" / "emit" / "task_000000" / "region.npy").is_file()
    for out in (local, ray):
        for name in ["rejects.parquet", "_work/dedup.parquet", *(p.name for p in single.glob("*.tar"))]:
            assert (out / name).read_bytes() == (single / name).read_bytes(), name


@pytest.mark.parametrize("colour", ["black", "white", (37, 140, 90), "blurred"])
@pytest.mark.parametrize("horizontal", [False, True])
def test_content_box_finds_the_picture_between_bars(colour, horizontal):
    """Bars of 5 px, 12% and 22% of the side, pasted around a picture at a known place and
    JPEG-compressed: the box is that place within 2 px."""
    from coca.prepare.hashing import content_box
    from coca.prepare.planted import jpeg, random_photo
    picture = random_photo(11, 120)
    for bar in (5, 14, 26):
        size = (120 + 2 * bar, 120) if horizontal else (120, 120 + 2 * bar)
        if colour == "blurred":  # close to constant: a smooth ramp of 6 grey levels
            ramp = np.linspace(100, 106, size[0])[None, :, None].repeat(size[1], 0).repeat(3, 2)
            canvas = Image.fromarray(ramp.astype(np.uint8))
        else:
            canvas = Image.new("RGB", size, colour)
        at = (bar, 0) if horizontal else (0, bar)
        canvas.paste(picture, at)
        decoded = Image.open(io.BytesIO(jpeg(canvas, 85)))
        box = content_box(decoded)
        expected = (*at, at[0] + 120, at[1] + 120)
        assert max(abs(a - b) for a, b in zip(box, expected)) <= 2, (bar, box, expected)
    assert content_box(picture) == (0, 0, 120, 120)  # nothing to trim
    assert content_box(Image.new("RGB", (50, 40), colour if colour != "blurred" else "grey")) is None


@pytest.mark.parametrize("setting, message", [
    ("dedup.region_min_agree=10", "region_min_agree must be in"), ("dedup.region_max_distance=-1", "region_max_distance"),
    ("filters.min_content=1", "min_content must be in"), ("filters.min_content=-0.2", "min_content must be in")])
def test_out_of_range_border_and_region_settings_are_clear_errors(setting, message):
    from coca.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        load_prepare_config(None, [setting])


# ------------------------------------------------------------------------------ semantic dedup

@pytest.fixture(scope="module")
def scene_model(tmp_path_factory):
    """The demo's coca-tiny (64 px, 8 px patches) trained 150 steps of 64, contrastive loss only and
    no augmentation, on 2,000 single-object synthetic scenes. The temperature is held at 1/5: with
    the usual learnable one (up to 1/100) scenes are told apart by small angles and every picture's
    embedding stays close to every other's; at 1/5 the contrast can only be won by spreading them."""
    from coca.config import load_run_config
    from coca.data.synthetic import SyntheticScenes
    from coca.demo import DEMO_CONFIG
    from coca.train import train
    root = tmp_path_factory.mktemp("scene_model")
    scenes = SyntheticScenes(2000, split="train", seed=3, image_size=64, max_objects=1)
    rows = ["filepath,caption"]
    for i in range(len(scenes)):
        image, caption = scenes.load(i)
        image.save(root / f"{i:04d}.png")
        rows.append(f"{root / f'{i:04d}.png'},{caption}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    no_augmentation = ["data.augment.crop_scale_min=1.0", "data.augment.flip_prob=0", "data.augment.brightness=0",
                       "data.augment.contrast=0", "data.augment.saturation=0"]
    cfg = load_run_config(str(DEMO_CONFIG), [
        "data.kind=csv", f"data.train={root / 'train.csv'}", "data.tokenizer_train_captions=2000", "data.workers=0",
        *no_augmentation, "model.init_logit_scale=1.6094", "model.max_logit_scale=5", "loss.caption_weight=0",
        "optim.lr=2e-3", "train.progress=false", "train.val_every=0", "train.tensorboard=false",
        f"train.steps={SCENE_STEPS}", f"train.checkpoint_every={SCENE_STEPS}", f"train.run_dir={root / 'run'}"])
    return train(cfg, log=lambda *a: None)["model_dir"]


SCENE_STEPS = 150


def rerendered_scenes(root: Path) -> tuple[list, dict]:
    """One single-object scene per (colour, shape) at 96 px, and a copy of each drawn again with
    other noise, another background shade and the object moved (what a re-shot picture changes)."""
    from coca.data.synthetic import COLOURS, SHAPES, Obj, render
    from coca.prepare.planted import jpeg, write_shards
    samples, truth = [], {}
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        obj = (Obj("large", colour, shape),)
        samples.append((f"o{i:03d}", jpeg(render(obj, 96, np.random.default_rng(i))), f"a large {colour} {shape}"))
        samples.append((f"c{i:03d}", jpeg(render(obj, 96, np.random.default_rng(1000 + i))), f"a big {colour} {shape}"))
        truth[f"c{i:03d}"] = f"o{i:03d}"
    order = np.random.default_rng(0).permutation(len(samples))
    write_shards([samples[i] for i in order], root / "in", 9)
    return samples, truth


def prepare_scenes(tmp_path: Path, out: Path, *extra: str) -> tuple[list, dict]:
    """`coca data prepare` on the scenes under tmp_path/in: its rejects and {uid: source key}."""
    from coca.cli import main
    sets = ["filters.min_side=32", "samples_per_shard=40", "workers=2", *extra]
    assert main(["data", "prepare", "--input", str(tmp_path / "in" / "{00000..00003}.tar"), "--output", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    rejects = rejects_of(out)
    return rejects, {r["uid"]: r["key"] for r in rejects} | {u: info["source_key"] for u, (_, info) in read_output(out)[0].items()}


def test_a_briefly_trained_model_finds_rerendered_copies_the_hashes_miss_and_keeps_distinct_scenes(scene_model, tmp_path):
    """Six scenes, one object each in another colour (its shape and size drawn at random), and three
    copies of each drawn again: other noise, another background shade, the object moved and resized
    by a few per cent; every caption the same. The hashes find at most a third of the copies; the
    semantic stage at 0.85 removes every copy as a duplicate of its own scene, and each scene keeps
    one picture.
    Colour is what 150 steps teach this model; which of three shapes an object has it has not yet
    learned to show in the embedding (scenes that differ only in shape are the demo model's case:
    BENCHMARKS.md, Semantic deduplication)."""
    from coca.data.synthetic import COLOURS, SHAPES, SIZES, Obj, render
    from coca.prepare.planted import found_copies, jpeg, write_shards
    rng = np.random.default_rng(11)
    samples, truth, scene_of = [], {}, {}
    for i, colour in enumerate(COLOURS):
        obj = (Obj(list(SIZES)[rng.integers(2)], colour, SHAPES[rng.integers(3)]),)
        for copy in range(4):
            key = f"s{i}_{copy}"
            samples.append((key, jpeg(render(obj, 96, np.random.default_rng(100 * i + copy))), "a picture"))
            scene_of[key] = i
            if copy:
                truth[key] = f"s{i}_0"
    order = rng.permutation(len(samples))
    write_shards([samples[j] for j in order], tmp_path / "in", 7)

    rejects, keys = prepare_scenes(tmp_path, tmp_path / "hashes")
    assert len(found_copies(rejects, keys, truth)) <= len(truth) // 3  # re-drawn, not copied: the hashes miss most

    # the margins, by hand: every picture's nearest picture of its own scene, and the nearest pair
    # of pictures of different scenes, against the threshold (a model that trained differently fails here)
    import coca
    from coca.data.transforms import eval_transform
    model = coca.load(scene_model)
    with torch.no_grad():
        emb = model.encode_image(torch.stack([eval_transform(model.cfg.vision.image_size)(
            Image.open(io.BytesIO(data)).convert("RGB")) for _, data, _ in samples]))
    cos, scene = (emb @ emb.T).numpy(), np.array([scene_of[k] for k, _, _ in samples])
    same = scene[:, None] == scene[None, :]
    nearest_own = np.where(same & ~np.eye(len(scene), dtype=bool), cos, -1).max(1).min()
    nearest_other = np.where(same, -1, cos).max()
    assert nearest_own >= 0.88 and nearest_other <= 0.82, (nearest_own, nearest_other)
    # the semantic stage alone: pHashes see grey levels only, so one outline in two colours on a
    # plain background is a near-image pair whatever the model says (hashes are not what is tested here)
    rejects, keys = prepare_scenes(tmp_path, tmp_path / "semantic", f"dedup.semantic_model={scene_model}",
                                   "dedup.semantic_threshold=0.85", "dedup.near_images=false")
    assert found_copies(rejects, keys, truth) == set(truth)
    removed = {keys[r["uid"]]: keys[r["duplicate_of"]] for r in rejects}
    assert all(scene_of[k] == scene_of[kept] for k, kept in removed.items())  # nothing removed for another scene
    kept = set(scene_of) - set(removed)
    assert sorted(scene_of[k] for k in kept) == list(range(len(COLOURS)))  # each scene keeps exactly one picture
    assert {r["reason"] for r in rejects} == {"duplicate_semantic"}
    assert all(0.85 <= r["similarity"] <= 1.0 for r in rejects)


def test_semantic_dedup_removes_exactly_the_pairs_an_independent_computation_links(scene_model, tmp_path):
    """Re-rendered copies the hashes miss; the semantic stage links exactly the pairs whose cosine,
    computed here by hand from ``encode_image``, reaches the threshold, keeps the smallest of each
    group and records each removed sample's highest cosine. The threshold is set from the model's
    own cosines (the top 3% of pairs, not on any pair's cosine), so that links, chains and
    unlinked pictures all occur."""
    import coca
    from coca.data.transforms import eval_transform
    from coca.prepare.hashing import UnionFind
    from coca.prepare.planted import found_copies
    samples, truth = rerendered_scenes(tmp_path)

    def prepare(out, *extra):
        return prepare_scenes(tmp_path, out, *extra)

    rejects, keys = prepare(tmp_path / "hashes")
    assert len(found_copies(rejects, keys, truth)) <= len(truth) // 2  # the hashes miss most re-rendered copies

    model = coca.load(scene_model)
    transform = eval_transform(model.cfg.vision.image_size)
    by_key = {k: Image.open(io.BytesIO(data)).convert("RGB") for k, data, _ in samples}
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.encode_image(torch.stack([transform(by_key[k]) for k in sorted(by_key)])),
                                            dim=-1).half().float()  # stored as float16
    cos = (emb @ emb.T).numpy()
    off_diagonal = np.sort(cos[np.triu_indices(len(cos), 1)])
    # about the top 3% of pairs: the middle of the widest gap between neighbouring cosines there,
    # so that no pair's cosine lies near the threshold
    lo, hi = int(0.965 * len(off_diagonal)), int(0.975 * len(off_diagonal))
    i = lo + int(np.argmax(off_diagonal[lo + 1:hi + 1] - off_diagonal[lo:hi]))
    threshold = float(off_diagonal[i] + off_diagonal[i + 1]) / 2
    assert np.abs(off_diagonal - threshold).min() > 2e-4
    rejects, keys = prepare(tmp_path / "semantic", f"dedup.semantic_model={scene_model}",
                            f"dedup.semantic_threshold={threshold}", "dedup.exact_images=false",
                            "dedup.near_images=false")  # semantic links only
    # the embeddings stage 1 stored are the model's, as computed here (float16 rounding aside)
    import pyarrow.parquet as pq
    work = tmp_path / "semantic" / "_work" / "filter"
    uids = [u for t in sorted(work.glob("task_*")) for u in pq.read_table(t / "meta.parquet", columns=["uid"]).column(0).to_pylist()]
    stored = np.concatenate([np.load(t / "embeddings.npy") for t in sorted(work.glob("task_*"))]).astype(np.float32)
    order = sorted(by_key)
    mine = emb.numpy()[[order.index(keys[u]) for u in uids]]
    assert np.abs(stored @ stored.T - mine @ mine.T).max() < 2e-3
    # the expected groups, by hand from the stored embeddings: every pair at or above the threshold,
    # the smallest uid of each group kept
    cos = stored @ stored.T
    uf = UnionFind(len(uids))
    for a in range(len(uids)):
        for b in range(a + 1, len(uids)):
            if cos[a, b] >= threshold:
                uf.union(a, b, "semantic")
    expected = {uids[i]: uids[uf.find(i)] for i in range(len(uids)) if uf.find(i) != i}
    semantic = {r["uid"]: r for r in rejects if r["reason"] == "duplicate_semantic"}
    assert expected and {u: r["duplicate_of"] for u, r in semantic.items()} == expected
    for uid, r in semantic.items():
        i = uids.index(uid)
        assert r["similarity"] == pytest.approx(max(cos[i, j] for j in range(len(uids)) if j != i), abs=1e-5)

    # partitioned over small clusters, locally and on Ray: the same output as one process
    single, _ = prepare(tmp_path / "single", f"dedup.semantic_model={scene_model}", "dedup.semantic_cluster_size=8",
                        "dedup.partitioned=false")
    for extra in (["dedup.partitioned=true", "dedup.partition_samples=10"], ["engine=ray", "dedup.partition_samples=10"]):
        out = tmp_path / extra[0].replace("=", "_")
        prepare(out, f"dedup.semantic_model={scene_model}", "dedup.semantic_cluster_size=8", *extra)
        for name in ["rejects.parquet", "_work/dedup.parquet", *(p.name for p in (tmp_path / "single").glob("*.tar"))]:
            assert (out / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), (extra, name)


def test_semantic_settings_and_models_that_do_not_fit_are_clear_errors(scene_model, tmp_path, capsys):
    import shutil

    from coca.cli import main
    from coca.config import ConfigError
    for bad in ("0", "1.5", "-0.3"):
        with pytest.raises(ConfigError, match="semantic_threshold must be in"):
            load_prepare_config(None, [f"dedup.semantic_threshold={bad}"])
    rerendered_scenes(tmp_path)
    shards = str(tmp_path / "in" / "{00000..00003}.tar")

    def prepare(out, model):
        return main(["data", "prepare", "--input", shards, "--output", str(out), "--set", "filters.min_side=32",
                     "--set", f"dedup.semantic_model={model}"])

    assert prepare(tmp_path / "a", tmp_path / "no_model") == 2
    assert "does not exist" in capsys.readouterr().err
    wrong = tmp_path / "wrong_size"  # a checkpoint whose image size does not fit its weights
    shutil.copytree(scene_model, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["vision"]["image_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    assert prepare(tmp_path / "b", wrong) == 2
    assert "does not match the model config" in capsys.readouterr().err
    # the embeddings of a work directory belong to one model: another one in its place is refused
    import dataclasses

    import coca
    other = tmp_path / "other"
    shutil.copytree(scene_model, other)
    assert prepare(tmp_path / "c", other) == 0
    trained = coca.load(scene_model)
    torch.manual_seed(0)
    coca.create_model(dataclasses.replace(trained.cfg, embed_dim=64)).save_pretrained(other, tokenizer=trained.tokenizer)
    assert prepare(tmp_path / "c", other) == 2
    assert "holds embeddings made with" in capsys.readouterr().err


def test_flat_content_is_not_mistaken_for_a_border():
    """A solid shape on a plain background, and a smooth gradient: their columns are each constant
    too, but they change colour at the shape's edge, and drift away from the outermost column's
    colour across the gradient, where trimming stops (both once lost the whole picture). A shape
    with its background's luminance is content too (it once was rejected as no_content)."""
    from coca.prepare.hashing import content_box
    from coca.prepare.planted import jpeg
    for colour in ((240, 205, 30), (37, 78, 225)):
        canvas = Image.new("RGB", (120, 100), (225, 225, 225))
        canvas.paste(Image.new("RGB", (40, 30), colour), (50, 40))
        box = content_box(Image.open(io.BytesIO(jpeg(canvas, 85))))
        assert box is not None and max(abs(a - b) for a, b in zip(box, (50, 40, 90, 70))) <= 2, (colour, box)
    ramp = Image.fromarray(np.linspace(0, 255, 160)[None, :].repeat(90, 0).astype(np.uint8)).convert("RGB")
    left, top, right, bottom = content_box(Image.open(io.BytesIO(jpeg(ramp, 90))))  # each column constant
    assert top == 0 and bottom == 90 and left < 16 and right > 144  # a few columns at most, not the picture
    # a yellow shape on the grey of its own luminance: blank in grey levels, content in colour
    grey = round(0.299 * 240 + 0.587 * 205 + 0.114 * 30)
    canvas = Image.new("RGB", (120, 100), (grey,) * 3)
    assert content_box(canvas) is None
    canvas.paste(Image.new("RGB", (40, 30), (240, 205, 30)), (50, 40))
    assert np.ptp(np.asarray(canvas.convert("L"))) <= 1
    assert content_box(Image.open(io.BytesIO(jpeg(canvas, 85)))) == (0, 0, 120, 100)  # kept, not trimmed


def test_pictures_blank_in_grey_are_hashed_in_colour():
    """Shapes with their background's luminance: kept (not no_content), hashed in a colour channel,
    so that two different ones are not near duplicates while a JPEG copy of one still is; a picture
    whose grey content is trimmed away entirely (a flat block in a corner) is kept whole, in colour
    or in grey alike (it was once rejected as no_content)."""
    from PIL import ImageDraw

    from coca.prepare.hashing import (
        content_box,
        image_hashes,
        regions_agree,
        variant_distance,
    )
    from coca.prepare.planted import jpeg
    grey = round(0.299 * 240 + 0.587 * 205 + 0.114 * 30)  # the luminance of (240, 205, 30)

    def picture(shape, box):
        canvas = Image.new("RGB", (160, 120), (grey,) * 3)
        draw = ImageDraw.Draw(canvas)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=(240, 205, 30))
        return canvas

    circle, square = picture("circle", (10, 10, 70, 70)), picture("square", (90, 50, 150, 110))
    assert np.ptp(np.asarray(circle.convert("L"))) <= 1
    a, b = image_hashes(circle), image_hashes(square)
    copy = image_hashes(Image.open(io.BytesIO(jpeg(circle, 70))).convert("RGB"))
    assert a["content_box"] == [0, 0, 160, 120]
    def regions(x, y):
        return np.array([x["regions"]], np.uint64), np.array([y["regions"]], np.uint64)

    assert variant_distance(a["phash"], b["phash"]) > 12 and not regions_agree(*regions(a, b), 4, 5)[0]
    assert variant_distance(a["phash"], copy["phash"]) <= 4 and regions_agree(*regions(a, copy), 4, 5)[0]
    corner = Image.new("RGB", (235, 402), (171, 0, 100))  # a flat block flush with two edges: trimmed
    corner.paste(Image.new("RGB", (94, 152), (219, 141, 8)), (0, 250))  # away like a border, yet content
    assert content_box(corner) == content_box(corner.convert("L")) == (0, 0, 235, 402)

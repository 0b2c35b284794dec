"""`coca data prepare`: hashes, filters with reasons, planted duplicates, bad input, resume after
SIGKILL, CSV/Parquet input, and the similarity filter (the Ray engine and the partitioned
deduplication: test_dedup.py)."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from coca.cli import main
from coca.config import ConfigError
from coca.prepare.config import FilterConfig, load_prepare_config
from coca.prepare.filters import boilerplate, check_caption, script_fraction
from coca.prepare.hashing import (
    hamming,
    hash_tables,
    jaccard_estimate,
    minhash,
    phash_variants,
    variant_distance,
)
from coca.prepare.planted import (
    COPY_KINDS,
    copy_of,
    jpeg,
    random_photo,
    score,
    write_shards,
)

SMALL = ["filters.min_side=64", "samples_per_shard=40", "workers=2"]


def read_output(out_dir):
    """{uid: (caption, info)} of every output sample, and the shard sizes."""
    samples, sizes = {}, []
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            names = tf.getnames()
            sizes.append(sum(n.endswith(".jpg") for n in names))
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name in names:
            if name.endswith(".json"):
                uid = name[:-5]
                Image.open(io.BytesIO(members[f"{uid}.jpg"])).verify()
                samples[uid] = (members[f"{uid}.txt"].decode(), json.loads(members[name]))
    return samples, sizes


def rejects_of(out_dir):
    import pyarrow.parquet as pq
    return pq.read_table(out_dir / "rejects.parquet").to_pylist()


# ------------------------------------------------------------------------------------ hashing

def test_phash_variants_find_copies_and_separate_distinct_images():
    rng = np.random.default_rng(0)
    originals = [jpeg(random_photo(i, 160)) for i in range(40)]
    hashes = [phash_variants(Image.open(io.BytesIO(d))) for d in originals]
    for data, h in zip(originals, hashes):
        for kind in COPY_KINDS:
            copy, _ = copy_of(data, "a b", kind, rng)
            assert variant_distance(h, phash_variants(Image.open(io.BytesIO(copy)))) <= 6, kind
    distinct = [variant_distance(hashes[i], hashes[j]) for i in range(40) for j in range(i + 1, 40)]
    assert min(distinct) > 6


def test_lsh_bands_guarantee_candidates_within_k():
    rng = np.random.default_rng(1)
    for k in (2, 4, 6):
        for _ in range(300):
            a = int(rng.integers(0, 2 ** 63)) * 2 + int(rng.integers(2))
            flips = rng.choice(64, int(rng.integers(0, k + 1)), replace=False)
            b = a
            for bit in flips:
                b ^= 1 << int(bit)
            assert hamming(a, b) <= k
            masks, scheme = hash_tables(1000, k)
            assert scheme == "bands" and any(a & m == b & m for m in masks)  # pigeonhole: one band is equal


@pytest.mark.parametrize("n", [2000, 40000])
def test_near_pairs_finds_planted_pairs_with_either_table_scheme(n):
    from coca.prepare.hashing import hash_tables, near_pairs
    rng = np.random.default_rng(2)
    hashes = rng.integers(0, 2 ** 63, size=(n, 1), dtype=np.int64).view(np.uint64) * np.uint64(2)
    planted = set()
    for t in range(100):  # item 2t+1 becomes a copy of item 2t at Hamming distance 1-4
        h = int(hashes[2 * t, 0])
        for bit in rng.choice(64, int(rng.integers(1, 5)), replace=False):
            h ^= 1 << int(bit)
        hashes[2 * t + 1, 0] = np.uint64(h)
        planted.add((2 * t, 2 * t + 1))
    i, j, scheme = near_pairs(hashes, 6)
    assert scheme == hash_tables(n, 6)[1] == ("bands" if n == 2000 else "sampled")
    found = set(zip(i.tolist(), j.tolist()))
    assert found <= planted and len(found) >= 99  # sampled tables: >= 0.99 recall by construction


def test_minhash_estimates_jaccard():
    a = minhash("a small red circle left of a large blue square")
    assert jaccard_estimate(a, minhash("A small red circle, left of a large blue square!")) == 1.0
    assert jaccard_estimate(a, minhash("a small red circle left of a large blue triangle")) > 0.6
    assert jaccard_estimate(a, minhash("two dogs playing in the snow near a wooden fence")) < 0.2


def test_caption_filters():
    cfg = FilterConfig()
    for text in ("IMG_1234.JPG", "DSC01234", "photo.png", "untitled", "Image 3", "see https://example.com/x",
                 "www.shop.com best deals", "N/A"):
        assert boilerplate(text), text
    assert not boilerplate("a photo of a dog on the beach")
    assert check_caption("dog", cfg) == "caption_too_short"
    assert check_caption("word " * 120, cfg) == "caption_too_long"
    assert check_caption("untitled image", cfg) == "boilerplate_caption"
    assert check_caption("a dog on a beach", cfg) is None
    latin = FilterConfig(scripts=["latin"])
    assert check_caption("собака на пляже у моря", latin) == "script"
    assert check_caption("a dog on a beach", latin) is None
    assert script_fraction("北京 city", ["latin"]) == pytest.approx(4 / 6)
    with pytest.raises(ConfigError, match="unknown"):
        load_prepare_config(None, ["filters.scripts=klingon"])
    with pytest.raises(ConfigError, match="engine"):
        load_prepare_config(None, ["engine=spark"])
    with pytest.raises(ConfigError, match="unknown config key 'filters.min_sid'"):
        load_prepare_config(None, ["filters.min_sid=3"])


# --------------------------------------------------------------------------------- end to end

def prepare_planted(root, out, *extra):
    assert main(["data", "prepare", "--input", str(root / "in" / "{00000..00003}.tar"), "--output", str(out),
                 *sum((["--set", s] for s in [*SMALL, *extra]), [])]) == 0
    return out


def test_planted_duplicates_are_removed_and_recorded(planted, capsys):
    root, samples, truth = planted
    out = prepare_planted(root, root / "out")
    assert "shards" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    kept, sizes = read_output(out)
    rejects = rejects_of(out)
    assert stats["input_samples"] == 160 and stats["output_samples"] == len(kept) == 120
    assert sizes == [40, 40, 40] and stats["shards"] == 3
    uid_to_key = {r["uid"]: r["key"] for r in rejects} | {u: info["source_key"] for u, (_, info) in kept.items()}
    result = score(rejects, uid_to_key, truth)
    assert result["recall"] == 1.0 and result["precision"] == 1.0
    assert {r["reason"] for r in rejects} <= {"duplicate_exact", "duplicate_near_image"}
    assert all(r["duplicate_of"] in uid_to_key for r in rejects)
    # the kept samples are the shuffled originals, with hashes and source in their JSON
    caption, info = next(iter(kept.values()))
    assert set(info) >= {"source", "width", "height", "pixel_sha1", "phash", "caption_sha1"}
    assert [u for u in kept] != sorted(kept)  # globally shuffled
    # the shards train as they are
    from coca.data.readers import WebDatasetSource
    src = WebDatasetSource(str(out / "{000000..000002}.tar"), shuffle_buffer=0)
    assert sum(1 for _ in src.iter_samples(0)) == 120


def _bad_input_tar(path):
    from test_readers import huge_png, image_bytes
    good = jpeg(random_photo(7, 96))
    members = [
        ("ok.jpg", good), ("ok.txt", b"a dog on a beach at sunset"),
        ("truncated.jpg", good[: len(good) // 2]), ("truncated.txt", b"a cat on a sofa"),
        ("zero.jpg", b""), ("zero.txt", b"an empty file here"),
        ("notimage.jpg", b"this is not an image at all"), ("notimage.txt", b"a text file in disguise"),
        ("huge.png", huge_png()), ("huge.txt", b"a decompression bomb here"),
        ("latin1.jpg", jpeg(random_photo(8, 96))), ("latin1.txt", "un caf\xe9 au lait".encode("latin-1")),
        ("nocaption.jpg", jpeg(random_photo(9, 96))),
        ("tiny.jpg", image_bytes(20, 20)), ("tiny.txt", b"a very small picture"),
        ("wide.jpg", image_bytes(400, 80)), ("wide.txt", b"a very wide banner image"),
        ("boiler.jpg", jpeg(random_photo(10, 96))), ("boiler.txt", b"untitled image"),
        ("short.jpg", jpeg(random_photo(11, 96))), ("short.txt", b"dog"),
    ]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("cut.jpg")
        info.size = 10_000
        tf.addfile(info, io.BytesIO(b"\xff" * 10_000))
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"\xff" * 10_000) + 100])  # the last member is cut short


def test_bad_input_is_rejected_with_reasons(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    _bad_input_tar(tmp_path / "bad.tar")
    out = tmp_path / "out"
    assert main(["data", "prepare", "--input", str(tmp_path / "bad.tar"), "--output", str(out),
                 "--set", "filters.min_side=64", "--set", "workers=1"]) == 0
    reasons = {r["key"]: r["reason"] for r in rejects_of(out)}
    assert reasons == {
        "truncated": "decode_error", "zero": "decode_error", "notimage": "decode_error",
        "huge": "too_many_pixels", "latin1": "bad_utf8", "nocaption": "missing_caption", "tiny": "too_small",
        "wide": "bad_aspect", "boiler": "boilerplate_caption", "short": "caption_too_short",
        "cut": "corrupt_tar_member",
    }
    kept, _ = read_output(out)
    assert [c for c, _ in kept.values()] == ["a dog on a beach at sunset"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_samples"] == 12 and sum(stats["rejected_by_reason"].values()) == 11


def _prepare_cmd(inputs, out, *extra):
    args = [sys.executable, "-m", "coca.cli", "data", "prepare", "--input", *inputs, "--output", str(out)]
    return args + sum((["--set", s] for s in [*SMALL, *extra]), [])


def test_rerun_after_sigkill_redoes_only_unfinished_tasks(planted, tmp_path):
    root, _, _ = planted
    inputs = [str(root / "in")]
    reference = tmp_path / "reference"
    subprocess.run(_prepare_cmd(inputs, reference, "workers=1"), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_prepare_cmd(inputs, out, "workers=1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list((out / "_work" / "filter").glob("task_*")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_ino for p in (out / "_work" / "filter").glob("task_*")}
    assert done and not (out / "stats.json").exists()
    subprocess.run(_prepare_cmd(inputs, out, "workers=1"), check=True, capture_output=True)
    assert {p.name: p.stat().st_ino for p in (out / "_work" / "filter").glob("task_*") if p.name in done} == done
    assert not list(out.glob(".*tmp*")) and not list((out / "_work" / "filter").glob(".*"))
    for shard in sorted(reference.glob("*.tar")):  # byte for byte the uninterrupted run's output
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert json.loads((out / "stats.json").read_text())["output_samples"] == 120
    # the same output directory with other settings is refused rather than mixed
    assert main(["data", "prepare", "--input", *inputs, "--output", str(out), "--set", "seed=5"]) == 2


def test_csv_and_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        random_photo(i, 96).save(tmp_path / "img" / f"{i}.png")
        rows.append({"filepath": f"img/{i}.png", "caption": f"picture number {i} of a garden"})
    rows.append({"filepath": "img/missing.png", "caption": "a photo that is not there"})
    rows.append({"filepath": "img/0.png", "caption": "the same garden again"})  # exact duplicate image
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("filepath,caption\n" + "".join(f"{r['filepath']},{r['caption']}\n" for r in rows))
    for name in ("pairs.parquet", "pairs.csv"):
        out = tmp_path / f"out_{name}"
        assert main(["data", "prepare", "--input", str(tmp_path / name), "--output", str(out),
                     "--set", "filters.min_side=64", "--set", "workers=1", "--set", "rows_per_task=3"]) == 0
        reasons = sorted(r["reason"] for r in rejects_of(out))
        assert reasons == ["duplicate_exact", "missing_image"]
        kept, _ = read_output(out)
        assert len(kept) == 6 and all(info["source"].startswith(str(tmp_path / name)) for _, info in kept.values())
    assert main(["data", "prepare", "--input", str(tmp_path / "pairs.csv"), "--output", str(tmp_path / "o3"),
                 "--set", "caption_column=text"]) == 2


def test_upper_case_tar_input_is_read_as_a_tar(tmp_path):
    samples = [(f"s{i}", jpeg(random_photo(i, 96)), f"picture number {i} of a garden") for i in range(4)]
    (shard,) = write_shards(samples, tmp_path / "in", 10)
    upper = tmp_path / "in" / "SHARD.TAR"
    os.rename(shard, upper)
    for source in (upper, upper.parent):  # the shard itself, and a directory that holds it
        out = tmp_path / f"out_{source.name}"
        assert main(["data", "prepare", "--input", str(source), "--output", str(out),
                     "--set", "filters.min_side=64", "--set", "workers=1"]) == 0
        kept, _ = read_output(out)
        assert sorted(info["source_key"] for _, info in kept.values()) == ["s0", "s1", "s2", "s3"]
        assert rejects_of(out) == []


def test_similarity_filter_with_a_coca_checkpoint(tmp_path):
    import torch

    import coca
    tok = coca.Tokenizer.train(["a photo of a garden", "a red square"] * 50, vocab_size=40, out_dir=tmp_path,
                               model_type="bpe")
    torch.manual_seed(0)
    model = coca.create_model("coca-tiny")
    model_dir = model.save_pretrained(tmp_path / "model", tokenizer=tok)
    captions = ["a photo of a garden", "a red square", "a garden", "a red photo", "a square garden", "a photo"]
    samples = [(f"s{i}", jpeg(random_photo(i, 96)), captions[i]) for i in range(6)]
    write_shards(samples, tmp_path / "in", 10)
    # the cosines computed here, independently: decode, resize + crop, both towers, cosine
    from coca.data.transforms import eval_transform
    model = coca.load(model_dir).eval()
    transform = eval_transform(model.cfg.vision.image_size)
    with torch.no_grad():
        images = torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for _, data, _ in samples])
        cos = torch.nn.functional.cosine_similarity(model.encode_image(images),
                                                    model.encode_text(model.tokenizer.encode(captions)), dim=-1)
    ranked = sorted(zip(cos.tolist(), [key for key, _, _ in samples]))
    gaps = [(ranked[i + 1][0] - ranked[i][0], i) for i in range(1, len(ranked) - 2)]
    gap, cut = max(gaps)
    assert gap > 1e-4  # a threshold between two cosines, far from both in float32
    threshold = (ranked[cut][0] + ranked[cut + 1][0]) / 2
    expected = {key for _, key in ranked[:cut + 1]}
    for t, want in ((threshold, expected), (ranked[0][0] - 1e-3, set()), (ranked[-1][0] + 1e-3, {k for _, k in ranked})):
        out = tmp_path / f"out{t}"
        assert main(["data", "prepare", "--input", str(tmp_path / "in"), "--output", str(out), "--set",
                     "filters.min_side=64", "--set", "workers=1", "--set", f"filters.similarity_model={model_dir}",
                     "--set", f"filters.similarity_threshold={t}"]) == 0
        assert {r["key"] for r in rejects_of(out) if r["reason"] == "low_similarity"} == want


def test_the_prepare_recipe_lists_every_setting_with_its_default():
    import yaml

    from coca.prepare.config import PrepareConfig

    def keys(d, prefix=""):
        return {f"{prefix}{k}" for k, v in d.items() for k in ([k] if not isinstance(v, dict) else
                                                                 keys(v, f"{prefix}{k}."))}
    recipe = yaml.safe_load(open("configs/prepare.yaml"))
    assert keys(recipe) == keys(PrepareConfig().to_dict())
    assert load_prepare_config("configs/prepare.yaml").to_dict() == PrepareConfig().to_dict()


def test_semantic_embeddings_do_not_depend_on_the_callers_thread_count(tmp_path):
    """Local workers, this process and Ray tasks run with different torch thread counts; the CPU's
    matmul kernels split their sums by it, which moved float16 embeddings by an ulp between engines."""
    import torch

    import coca
    from coca.config import get_preset
    from coca.cpu import one_cpu_thread
    from coca.data.synthetic import SyntheticScenes
    from coca.prepare.semantic import embed_images
    cfg = get_preset("coca-tiny").to_dict()
    cfg["vision"]["patch_size"] = 8
    torch.manual_seed(0)
    coca.create_model(cfg).save_pretrained(tmp_path / "model")
    scenes = SyntheticScenes(256, split="train", seed=5, image_size=64, max_objects=1)
    images = [scenes.load(i)[0] for i in range(256)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = embed_images(images, str(tmp_path / "model"))
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)
        one = embed_images(images, str(tmp_path / "model"))
    finally:
        torch.set_num_threads(before)
    assert two.tobytes() == one.tobytes()
    with one_cpu_thread("cuda"):  # another device: the CPU's thread count is left alone
        assert torch.get_num_threads() == before

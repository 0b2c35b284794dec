"""Dataset readers: good samples round-trip, bad samples become counted skips, bad arguments fail clearly.

All data is built in tmp_path with PIL and tarfile.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from coca.data.readers import (
    CsvSource,
    FolderSource,
    WebDatasetSource,
    expand_braces,
    split_shards,
)
from coca.data.samples import Skipped

# ------------------------------------------------------------------------------------- helpers


def image_bytes(w: int, h: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    # noise, so a truncated JPEG really lacks pixel data rather than ending in flat blocks
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny valid PNG whose IHDR claims width x height; PIL reads the size from the header."""
    data = bytearray(image_bytes(1, 1, "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over chunk type + data
    return bytes(data)


JPG = image_bytes(40, 30)
TRUNCATED_JPG = image_bytes(64, 64, seed=1)[: len(image_bytes(64, 64, seed=1)) // 2]


def write_tar(path, members: list[tuple[str, bytes]], gz: bool = False) -> str:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def sample_members(key: str, w: int, h: int, caption: str, fmt: str = "jpg", meta: bool = True):
    out = [(f"{key}.{fmt}", image_bytes(w, h, "PNG" if fmt == "png" else "JPEG")), (f"{key}.txt", caption.encode())]
    if meta:
        out.append((f"{key}.json", b'{"url": "x"}'))
    return out


def good(results):
    return [r for r in results if not isinstance(r, Skipped)]


def reasons(results) -> dict[str, str]:
    return {r.key: r.reason for r in results if isinstance(r, Skipped)}


# ------------------------------------------------------------------------------- brace expansion


@pytest.mark.parametrize("pattern, expected", [
    ("d/{000..003}.tar", ["d/000.tar", "d/001.tar", "d/002.tar", "d/003.tar"]),
    ("{8..11}", ["8", "9", "10", "11"]),
    ("{08..11}", ["08", "09", "10", "11"]),
    ("{3..1}", ["3", "2", "1"]),
    ("x-{a,b}.tar", ["x-a.tar", "x-b.tar"]),
    ("{a,b}/{0..1}", ["a/0", "a/1", "b/0", "b/1"]),
    ("{a,{b,c}}", ["a", "b", "c"]),
    ("plain/path.tar", ["plain/path.tar"]),
    ("lit{x}.tar", ["lit{x}.tar"]),
])
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize("pattern", ["a{0..2", "a}0", "{a,b}}"])
def test_expand_braces_unbalanced(pattern):
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces(pattern)


# --------------------------------------------------------------------------------- shard split


@pytest.mark.parametrize("n_shards, world, workers", [(10, 2, 3), (7, 1, 1), (4, 3, 2), (64, 4, 4)])
def test_split_shards_covers_each_shard_once(n_shards, world, workers):
    parts = [split_shards(n_shards, r, world, w, workers) for r in range(world) for w in range(workers)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n_shards))
    if n_shards < world * workers:
        assert [] in parts  # the surplus consumers get nothing


def test_split_shards_bad_args():
    with pytest.raises(ValueError):
        split_shards(4, 2, 2, 0, 1)
    with pytest.raises(ValueError):
        split_shards(4, 0, 1, 0, 0)


# ---------------------------------------------------------------------------------- webdataset


@pytest.fixture
def shards(tmp_path):
    """3 shards x 4 samples; sample (s, i) is (20 + 4s + i) x (10 + i) with caption 'shard s item i'."""
    paths = []
    for s in range(3):
        members = []
        for i in range(4):
            members += sample_members(f"{s:02d}{i:03d}", 20 + 4 * s + i, 10 + i, f"shard {s} item {i}",
                                      fmt="png" if i == 3 else "jpg", meta=i != 2)
        paths.append(write_tar(tmp_path / f"{s:05d}.tar", members))
    return paths


def test_webdataset_round_trip(tmp_path, shards):
    src = WebDatasetSource(str(tmp_path / "{00000..00002}.tar"), shuffle_buffer=0)
    assert src.shards == shards
    out = list(src.iter_samples(0))
    assert len(out) == 12 and not reasons(out)
    by_key = {k: (im, cap) for k, im, cap in out}
    for s in range(3):
        for i in range(4):
            im, cap = by_key[f"{s:02d}{i:03d}"]
            assert im.mode == "RGB" and im.size == (20 + 4 * s + i, 10 + i)
            assert cap == f"shard {s} item {i}"
    # without a buffer, samples keep their in-shard order, shards follow the epoch permutation
    order = src.shard_order(0)
    assert [k for k, _, _ in out] == [f"{s:02d}{i:03d}" for s in order for i in range(4)]


def test_webdataset_list_of_paths_and_directory_keys(tmp_path):
    # the key ends at the first dot of the basename; dots in directory names are kept
    path = write_tar(tmp_path / "a.tar", sample_members("sub.d/dir/k", 8, 6, "dir key"))
    out = list(WebDatasetSource([path], shuffle_buffer=1).iter_samples(0))
    assert len(out) == 1 and out[0][0] == "sub.d/dir/k" and out[0][2] == "dir key"


def test_webdataset_deterministic_order(tmp_path):
    paths = [write_tar(tmp_path / f"{s}.tar", [m for i in range(5) for m in sample_members(f"{s}_{i}", 4, 4, "c", meta=False)])
             for s in range(8)]
    src = WebDatasetSource(paths, shuffle_buffer=10, seed=3)
    keys = lambda epoch, ids=None: [r[0] for r in src.iter_samples(epoch, ids)]
    e0 = keys(0)
    assert e0 == keys(0) == [r[0] for r in WebDatasetSource(paths, shuffle_buffer=10, seed=3).iter_samples(0)]
    assert e0 != keys(1) and sorted(e0) == sorted(keys(1)) and len(set(e0)) == 40
    assert e0 != [r[0] for r in WebDatasetSource(paths, shuffle_buffer=10, seed=4).iter_samples(0)]
    # the buffer really shuffles within shards, not only the shard order
    assert e0 != [k for s in src.shard_order(0) for k in (f"{s}_{i}" for i in range(5))]

    # consumers' subsets partition the samples
    parts = [keys(0, split_shards(8, r, 2, w, 2)) for r in range(2) for w in range(2)]
    assert sorted(k for p in parts for k in p) == sorted(e0)
    assert keys(0, []) == []
    with pytest.raises(IndexError):
        keys(0, [8])


def test_webdataset_bad_samples(tmp_path):
    members = (
        sample_members("good0", 12, 9, "first good")
        + [("trunc.jpg", TRUNCATED_JPG), ("trunc.txt", b"truncated jpeg")]
        + [("zero.jpg", b""), ("zero.txt", b"zero bytes")]
        + [("notimg.jpg", b"this is not an image"), ("notimg.txt", b"text as jpg")]
        + [("huge.png", huge_png()), ("huge.txt", b"header says 100000x100000")]
        + [("badutf.jpg", JPG), ("badutf.txt", b"caf\xe9 \xff\xfe")]
        + [("nocap.jpg", JPG), ("nocap.json", b"{}")]
        + [("empty.jpg", JPG), ("empty.txt", b"  \n\t ")]
        + [("noimg.txt", b"caption only")]
        + sample_members("good1", 7, 5, "  second\n good  ")
    )
    path = write_tar(tmp_path / "bad.tar", members)
    out = list(WebDatasetSource(path, shuffle_buffer=4).iter_samples(0))
    assert reasons(out) == {
        "trunc": "decode_error", "zero": "decode_error", "notimg": "decode_error", "huge": "too_many_pixels",
        "badutf": "bad_utf8", "nocap": "missing_caption", "empty": "empty_caption", "noimg": "missing_image",
    }
    assert sorted((k, im.size, cap) for k, im, cap in good(out)) == [
        ("good0", (12, 9), "first good"), ("good1", (7, 5), "second good")]


def _cut_inside(path, member_name: str):
    """Truncate an uncompressed tar halfway through the data of one member."""
    with tarfile.open(path) as tf:
        m = tf.getmember(member_name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: m.offset_data + m.size // 2])


def test_webdataset_corrupt_tars(tmp_path):
    # cut in the middle of an image: the samples before it survive, one skip for the member
    a = write_tar(tmp_path / "a.tar", sample_members("a0", 5, 5, "a zero") + sample_members("a1", 6, 5, "a one")
                  + sample_members("a2", 64, 64, "a two") + sample_members("a3", 5, 5, "never read"))
    _cut_inside(a, "a2.jpg")
    # cut in the middle of a caption whose image was read: one skip, not also a missing_caption
    b = write_tar(tmp_path / "b.tar", sample_members("b0", 5, 6, "b zero", meta=False)
                  + [("b1.jpg", JPG), ("b1.txt", b"x" * 2000)])
    _cut_inside(b, "b1.txt")
    # cut in the json after a complete sample: the sample is kept
    c = write_tar(tmp_path / "c.tar", [("c0.jpg", JPG), ("c0.txt", b"c zero"), ("c0.json", b"{" + b" " * 3000 + b"}")])
    _cut_inside(c, "c0.json")
    # a zero-byte shard, a shard that is not a tar, a truncated gzip shard
    (tmp_path / "d.tar").write_bytes(b"")
    (tmp_path / "e.tar").write_bytes(b"definitely not a tar archive" * 40)
    f = write_tar(tmp_path / "f.tar.gz", [("f0.jpg", JPG), ("f0.txt", b"f zero"),
                                          ("f1.jpg", image_bytes(128, 128, seed=5)), ("f1.txt", b"f one")], gz=True)
    raw = open(f, "rb").read()
    open(f, "wb").write(raw[: len(raw) * 3 // 4])
    # a good shard after all of them still comes through
    g = write_tar(tmp_path / "g.tar", sample_members("g0", 9, 9, "g zero"))

    paths = [a, b, c, str(tmp_path / "d.tar"), str(tmp_path / "e.tar"), f, g]
    out = list(WebDatasetSource(paths, shuffle_buffer=3).iter_samples(0))
    skips = reasons(out)
    assert skips == {
        "a2": "corrupt_tar_member", "b1": "corrupt_tar_member", "c0": "corrupt_tar_member",
        str(tmp_path / "d.tar"): "corrupt_tar_member", str(tmp_path / "e.tar"): "corrupt_tar_member",
        "f1": "corrupt_tar_member"}
    assert Counter(r.reason for r in out if isinstance(r, Skipped)) == Counter({"corrupt_tar_member": 6})
    assert sorted((k, cap) for k, _, cap in good(out)) == [
        ("a0", "a zero"), ("a1", "a one"), ("b0", "b zero"), ("c0", "c zero"), ("f0", "f zero"), ("g0", "g zero")]


def test_webdataset_tar_cut_at_a_header_ends_the_shard_quietly(tmp_path):
    # tarfile reads a short or garbled header after the first as the end of the archive: the
    # shard just ends early, with the samples before it intact
    path = write_tar(tmp_path / "h.tar", sample_members("h0", 5, 5, "x") + sample_members("h1", 5, 5, "y"))
    with tarfile.open(path) as tf:
        offset = tf.getmember("h1.jpg").offset
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: offset + 100])
    out = list(WebDatasetSource(path, shuffle_buffer=0).iter_samples(0))
    assert [r[0] for r in out] == ["h0"]


def test_webdataset_construction_errors(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="00003.tar"):
        WebDatasetSource(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        WebDatasetSource([shards[0], str(tmp_path / "nope.tar")])
    with pytest.raises(ValueError, match="no shards"):
        WebDatasetSource([])
    with pytest.raises(ValueError, match="no shards"):
        WebDatasetSource("")


# ----------------------------------------------------------------------------------------- CSV


def test_csv_round_trip(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(image_bytes(10, 8))
    (tmp_path / "img" / "b.png").write_bytes(image_bytes(6, 12, "PNG"))
    abs_path = tmp_path / "elsewhere.jpg"
    abs_path.write_bytes(image_bytes(3, 4))
    (tmp_path / "data.csv").write_text(
        'id,filepath,caption\n'
        '1,img/a.jpg,"a dog, running"\n'
        '\n'
        f'2,img/b.png,un café  au lait\n'
        f'3,{abs_path},"multi\nline"\n', encoding="utf-8")
    src = CsvSource(tmp_path / "data.csv")
    assert len(src) == 3
    out = [src.load(i) for i in range(3)]
    assert [(im.mode, im.size, cap) for im, cap in out] == [
        ("RGB", (10, 8), "a dog, running"), ("RGB", (6, 12), "un café au lait"), ("RGB", (3, 4), "multi line")]
    with pytest.raises(IndexError):
        src.load(3)


def test_tsv_and_sniffed_separators_and_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.jpg").write_bytes(image_bytes(5, 7))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "d.tsv").write_text("url\ttext\nx.jpg\ta caption, with comma\n")
    src = CsvSource(tmp_path / "meta" / "d.tsv", image_root=tmp_path / "imgs", image_column="url", caption_column="text")
    assert src.sep == "\t"
    im, cap = src.load(0)
    assert im.size == (5, 7) and cap == "a caption, with comma"

    (tmp_path / "d.txt").write_text("filepath;caption\nimgs/x.jpg;semicolons\n")
    src = CsvSource(tmp_path / "d.txt")
    assert src.sep == ";" and src.load(0)[1] == "semicolons"


def test_csv_bad_samples(tmp_path):
    files = {"good.jpg": image_bytes(9, 4), "trunc.jpg": TRUNCATED_JPG, "zero.jpg": b"",
             "notimg.jpg": b"not an image at all", "huge.png": huge_png(), "ok.jpg": JPG}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "adir.jpg").mkdir()
    rows = [
        b"filepath,caption",
        b"good.jpg,fine",
        b"trunc.jpg,truncated",
        b"zero.jpg,zero bytes",
        b"notimg.jpg,text file",
        b"huge.png,huge header",
        b"missing.jpg,no such file",
        b"adir.jpg,a directory",
        b"ok.jpg,caf\xe9 latin-1",
        b"caf\xe9.jpg,bad bytes in the path",
        b'ok.jpg,"   "',
        b"ok.jpg,",
        b"ok.jpg",
        b",no image path",
        b"ok.jpg,last one is fine",
    ]
    (tmp_path / "bad.csv").write_bytes(b"\n".join(rows) + b"\n")
    src = CsvSource(tmp_path / "bad.csv")
    out = [src.load(i) for i in range(len(src))]
    assert [r.reason if isinstance(r, Skipped) else r[1] for r in out] == [
        "fine", "decode_error", "decode_error", "decode_error", "too_many_pixels", "missing_image",
        "missing_image", "bad_utf8", "bad_utf8", "empty_caption", "empty_caption", "missing_caption",
        "missing_image", "last one is fine",
    ]
    assert out[1].key == "trunc.jpg" and out[8].key == "caf\ufffd.jpg"
    assert out[0][0].size == (9, 4)


def test_csv_construction_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        CsvSource(tmp_path / "nope.csv")
    (tmp_path / "cols.csv").write_text("path,text\na.jpg,hi\n")
    with pytest.raises(ValueError, match=r"\['filepath', 'caption'\].*found columns \['path', 'text'\]") as e:
        CsvSource(tmp_path / "cols.csv")
    assert "caption_column='caption'" in str(e.value)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        CsvSource(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text(" \n\n")
    with pytest.raises(ValueError, match="empty"):
        CsvSource(tmp_path / "blank.csv")
    (tmp_path / "header.csv").write_text("filepath,caption\n")
    with pytest.raises(ValueError, match="no data rows"):
        CsvSource(tmp_path / "header.csv")


# -------------------------------------------------------------------------------- ImageFolder


def test_folder_round_trip(tmp_path):
    for rel, (w, h) in {"golden_retriever/a.jpg": (8, 6), "cat/b.png": (5, 5), "cat/sub/c.JPG": (4, 9),
                        "cat/.hidden.jpg": (2, 2), ".cache/x.jpg": (2, 2)}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(image_bytes(w, h, "PNG" if rel.endswith(".png") else "JPEG"))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"")

    src = FolderSource(tmp_path)
    assert src.classes == ["cat", "empty_class", "golden_retriever"]
    assert src.class_names == ["cat", "empty class", "golden retriever"]
    assert [p.relative_to(tmp_path).as_posix() for p in src.samples] == [
        "cat/b.png", "cat/broken.jpg", "cat/sub/c.JPG", "golden_retriever/a.jpg"]
    assert src.labels == [0, 0, 0, 2] and len(src) == 4
    im, cap = src.load(3)
    assert im.size == (8, 6) and cap == "a photo of a golden retriever."
    assert src.load(2)[0].size == (4, 9)
    assert src.load(1) == Skipped("decode_error", "cat/broken.jpg")

    templates = ("a photo of a {}.", "a {} in the wild.", "art of a {}.")
    src = FolderSource(tmp_path, templates=templates)
    assert src.load(0)[1] == "a photo of a cat."  # no rng: the first template
    caps = lambda seed: [src.load(0, np.random.default_rng([seed, i]))[1] for i in range(12)]
    assert caps(0) == caps(0) and set(caps(0)) == {t.format("cat") for t in templates}


def test_folder_construction_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_root"):
        FolderSource(tmp_path / "missing_root")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(JPG)
    with pytest.raises(ValueError, match="no class sub-folders"):
        FolderSource(tmp_path / "flat")
    (tmp_path / "noimg" / "dog").mkdir(parents=True)
    (tmp_path / "noimg" / "dog" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        FolderSource(tmp_path / "noimg")
    (tmp_path / "ok" / "dog").mkdir(parents=True)
    (tmp_path / "ok" / "dog" / "a.jpg").write_bytes(JPG)
    with pytest.raises(ValueError, match="empty"):
        FolderSource(tmp_path / "ok", templates=())
    with pytest.raises(ValueError, match="placeholder"):
        FolderSource(tmp_path / "ok", templates=("a photo of a {}.", "no slot here"))
    with pytest.raises(ValueError, match="exactly one"):
        FolderSource(tmp_path / "ok", templates=("a {} and a {}",))
    assert FolderSource(tmp_path / "ok", templates="a {}!").load(0)[1] == "a dog!"


def test_webdataset_resampled_mode_feeds_more_consumers_than_shards(tmp_path, shards):
    """4 ranks on 3 shards: the plain split refuses, resampled mode draws shards with replacement,
    a seeded stream per rank that resumes at a batch position exactly."""
    from coca.data.loader import WebDatasetStream

    src = WebDatasetSource(str(tmp_path / "{00000..00002}.tar"), shuffle_buffer=0)

    def stream(rank, resampled=True, start=0):
        return WebDatasetStream(src, lambda image, caption, seed: caption, lambda b: list(b), batch_size=2,
                                seed=0, start=start, rank=rank, world_size=4, resampled=resampled)

    with pytest.raises(ValueError, match="resampled"):
        next(iter(stream(3, resampled=False)))
    take = lambda s, n: [b for b, _ in zip(iter(s), range(n))]  # noqa: E731
    rank0 = take(stream(0), 8)
    assert rank0 == take(stream(0), 8)  # deterministic
    assert rank0 != take(stream(1), 8)  # each rank its own stream
    assert take(stream(0, start=3), 5) == rank0[3:]  # resumes at a batch position
    captions = {c for b in rank0 + take(stream(1), 8) + take(stream(2), 8) for c in b}
    assert {c.split()[1] for c in captions} == {"0", "1", "2"}  # every shard is drawn

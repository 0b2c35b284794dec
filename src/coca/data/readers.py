"""Dataset sources that yield raw (PIL RGB image, caption) pairs, or ``Skipped(reason, key)``.

Four layouts:

* ``CsvSource``        a CSV / TSV file naming an image path and a caption per row (map-style)
* ``CocoCaptionsSource`` a COCO / Karpathy captions file, every caption of an image a pair (map-style)
* ``FolderSource``     an ImageFolder tree, captions made from class names and templates (map-style)
* ``WebDatasetSource`` webdataset tar shards in the img2dataset layout (iterable, streamed)

A bad sample never raises: it comes back as ``Skipped`` with one of ``SKIP_REASONS`` so the
collator can count it. Bad *arguments* (a missing file, a header without the named columns, an
empty folder) raise at construction with a message that names what is wrong.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import InputNotFound, NotADirectory, UserError
from .samples import MAX_PIXELS, Skipped, decode_caption, decode_image

__all__ = [
    "CocoCaptionsSource", "CsvSource", "FolderSource", "WebDatasetSource", "expand_braces", "split_shards",
    "IMAGE_EXTENSIONS", "WDS_IMAGE_EXTENSIONS", "TAR_SUFFIXES", "TABLE_SUFFIXES", "is_tar",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # files any folder reader takes
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members of a webdataset sample
TAR_SUFFIXES = (".tar", ".tar.gz")  # the shards a directory of them is listed for
CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}  # a table's separator by suffix (any other is sniffed)
PARQUET_SUFFIX = ".parquet"
TABLE_SUFFIXES = (*CSV_SEPARATORS, PARQUET_SUFFIX)


def is_tar(path: str | os.PathLike) -> bool:
    """A tar shard, by its file name in any case: ``.tar`` anywhere in it (``x.tar``, ``x.TAR``, ``x.tar.gz``)."""
    return ".tar" in Path(path).name.lower()


def has_suffix(path: str | os.PathLike, suffixes: str | tuple[str, ...]) -> bool:
    """Whether the file name ends with one of ``suffixes``, in any case."""
    return Path(path).name.lower().endswith(suffixes)


def _read_bytes(path: Path) -> bytes | None:
    """File bytes, or None when the file cannot be opened (missing, a directory, no permission)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def _has_surrogates(text: str) -> bool:
    # Text decoded with errors="surrogateescape" carries each undecodable byte as a lone surrogate.
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _printable(text: str) -> str:
    """A key safe to print: surrogate-escaped bytes shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------- CSV


class CsvSource:
    """Map-style source over a CSV / TSV file with a header row.

    ``sep``: None infers it: ``.tsv`` -> tab, ``.csv`` -> comma, any other extension is sniffed
    from the header line (comma if sniffing fails). Fields may be quoted the usual CSV way.
    Relative image paths resolve against ``image_root`` (default: the CSV file's directory).

    The whole file is parsed once at construction; ``load`` only reads the image.
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 image_column: str = "filepath", caption_column: str = "caption",
                 sep: str | None = None, max_pixels: int = MAX_PIXELS):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputNotFound(f"CSV file {str(self.path)!r} not found")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.image_column, self.caption_column = image_column, caption_column
        self.max_pixels = max_pixels

        raw = self.path.read_bytes()
        # surrogateescape keeps undecodable bytes instead of failing the whole file; the rows that
        # hold them are found per field in load() and become Skipped("bad_utf8").
        text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
        if not text.strip():
            raise UserError(f"CSV file {str(self.path)!r} is empty (no header row)")
        self.sep = sep if sep is not None else self._infer_sep(text)

        # the csv module refuses a field over 128 KB, which would refuse the whole file for one
        # runaway caption; a field is bounded by the file (already in memory) instead
        csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self.sep)
        try:
            header = [h.strip() for h in next(reader)]
            missing = [c for c in (image_column, caption_column) if c not in header]
            if missing:
                raise UserError(
                    f"CSV file {str(self.path)!r}: header has no column(s) {missing}; expected "
                    f"image_column={image_column!r} and caption_column={caption_column!r}, "
                    f"found columns {[_printable(h) for h in header]} (separator {self.sep!r})")
            i_img, i_cap = header.index(image_column), header.index(caption_column)
            self._images: list[str | None] = []
            self._captions: list[str | None] = []
            for row in reader:
                if not row:  # blank line, not a sample
                    continue
                # A short row lacks the field: None becomes missing_image / missing_caption.
                self._images.append(row[i_img] if i_img < len(row) else None)
                self._captions.append(row[i_cap] if i_cap < len(row) else None)
        except csv.Error as e:
            # The csv module cannot resynchronise after e.g. an oversized field: the file is
            # malformed, not one sample, so say where.
            raise UserError(f"CSV file {str(self.path)!r} is malformed near line {reader.line_num}: {e}") from None
        if not self._images:
            raise UserError(f"CSV file {str(self.path)!r} has a header but no data rows")

    def _infer_sep(self, text: str) -> str:
        sep = CSV_SEPARATORS.get(self.path.suffix.lower())
        if sep is not None:
            return sep
        first_line = text.splitlines()[0]
        try:
            return csv.Sniffer().sniff(first_line, delimiters=",\t;|").delimiter
        except csv.Error:
            return ","

    def __len__(self) -> int:
        return len(self._images)

    def key(self, index: int) -> str:
        """The image path as written in the CSV (undecodable bytes shown as U+FFFD)."""
        image = self._images[index]
        return _printable(image) if image else f"row {index}"

    def captions(self, limit: int | None = None) -> Iterator[str]:
        """The valid captions, in file order, without reading any image (for tokenizer training)."""
        n = 0
        for caption in self._captions:
            if caption is None or _has_surrogates(caption):
                continue
            caption = decode_caption(caption)
            if isinstance(caption, str):
                yield caption
                n += 1
                if limit is not None and n >= limit:
                    return

    def image_path(self, index: int) -> Path | None:
        """Where row ``index``'s image is (relative paths resolved against ``image_root``)."""
        image = self._images[index]
        if not image or not image.strip():
            return None
        path = Path(image.strip())
        return path if path.is_absolute() else self.image_root / path

    def raw_caption(self, index: int) -> str | bytes | None:
        """The caption as written; one with undecodable bytes comes back as those bytes."""
        caption = self._captions[index]
        return caption.encode("utf-8", "surrogateescape") if caption and _has_surrogates(caption) else caption

    def load(self, index: int) -> tuple[Image.Image, str] | Skipped:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        image, caption = self._images[index], self._captions[index]
        key = self.key(index)
        if (image and _has_surrogates(image)) or (caption and _has_surrogates(caption)):
            return Skipped("bad_utf8", key)
        # The caption is checked first: it is cheap and spares reading an image we would drop.
        caption = decode_caption(caption, key)
        if isinstance(caption, Skipped):
            return caption
        path = self.image_path(index)
        if path is None:
            return Skipped("missing_image", key)
        data = _read_bytes(path)
        image = decode_image(data, self.max_pixels, key)  # None (unreadable) -> missing_image
        return image if isinstance(image, Skipped) else (image, caption)


# ------------------------------------------------------------------------------- COCO captions


class CocoCaptionsSource:
    """Map-style source over a captions annotation file: every caption of an image is one pair.

    Reads the formats ``coca eval caption`` reads (COCO captions, Karpathy's dataset_coco.json
    with ``split`` such as ``"train+restval"``, a list of ``{image, caption}``); image paths are
    resolved the same way (against ``image_root``, default the file's folder, or its parent).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", image_root: str | os.PathLike | None = None,
                 max_pixels: int = MAX_PIXELS, first_caption_only: bool = False):
        from .annotations import load_caption_annotations, resolve_image_root
        self.path = Path(path)
        items = load_caption_annotations(self.path, split)
        self.root = resolve_image_root([it["file_name"] for it in items],
                                       image_root if image_root else self.path.parent)
        self.max_pixels = max_pixels
        self.pairs = [(it["file_name"], caption) for it in items
                      for caption in (it["captions"][:1] if first_caption_only else it["captions"])]
        self.n_images = len(items)

    def __len__(self) -> int:
        return len(self.pairs)

    def captions(self, limit: int | None = None) -> Iterator[str]:
        for _, caption in self.pairs[:limit]:
            yield caption

    def load(self, index: int) -> tuple[Image.Image, str] | Skipped:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range [0, {len(self)})")
        name, caption = self.pairs[index]
        caption = decode_caption(caption, name)
        if isinstance(caption, Skipped):
            return caption
        image = decode_image(_read_bytes(self.root.path / name), self.max_pixels, name)
        return image if isinstance(image, Skipped) else (image, caption)


# ------------------------------------------------------------------------------------ ImageFolder


class FolderSource:
    """Map-style source over an ImageFolder tree: ``root/<class name>/**/<image>``.

    ``classes`` holds the sorted class folder names (also class folders that hold no image, so
    label indices always follow the sorted folder names); ``class_names`` the same with
    underscores turned into spaces, as used in captions; ``labels[i]`` is the class index of
    sample ``i``. Hidden folders and files (leading ".", e.g. ``.ipynb_checkpoints`` or macOS
    ``._x.jpg`` resource forks) are ignored. A single template string is accepted as one template.
    """

    def __init__(self, root: str | os.PathLike, templates: Sequence[str] | str = ("a photo of a {}.",),
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, max_pixels: int = MAX_PIXELS):
        if isinstance(templates, str):
            templates = (templates,)
        self.templates = tuple(templates)
        if not self.templates:
            raise UserError("templates is empty: give at least one template such as 'a photo of a {}.'")
        for t in self.templates:
            if not isinstance(t, str) or "{}" not in t:
                raise UserError(f"template {t!r} has no '{{}}' placeholder for the class name")
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError) as e:
                raise UserError(f"template {t!r} must take exactly one class name via '{{}}': {e}") from None
        self.root = Path(root)
        self.max_pixels = max_pixels
        if not self.root.exists():
            raise InputNotFound(f"image folder root {str(self.root)!r} not found")
        if not self.root.is_dir():
            raise NotADirectory(f"image folder root {str(self.root)!r} is not a directory")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise UserError(f"image folder root {str(self.root)!r} has no class sub-folders")
        self.class_names = [c.replace("_", " ") for c in self.classes]
        self.samples: list[Path] = []
        self.labels: list[int] = []
        for label, cls in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(self.root / cls, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted walk: stable order
                for name in sorted(filenames):
                    if not name.startswith(".") and name.lower().endswith(exts):
                        self.samples.append(Path(dirpath) / name)
                        self.labels.append(label)
        if not self.samples:
            raise UserError(f"image folder root {str(self.root)!r} has class folders {self.classes[:5]}"
                             f"{'...' if len(self.classes) > 5 else ''} but no images with extensions {list(exts)}")

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int, rng: np.random.Generator | None = None) -> str:
        template = self.templates[0] if rng is None else self.templates[int(rng.integers(len(self.templates)))]
        return template.format(self.class_names[self.labels[index]])

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[Image.Image, str] | Skipped:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        path = self.samples[index]
        key = path.relative_to(self.root).as_posix()
        image = decode_image(_read_bytes(path), self.max_pixels, key)
        return image if isinstance(image, Skipped) else (image, self.caption(index, rng))


# ----------------------------------------------------------------------------------- webdataset

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion, for shard lists.

    ``"d/{000..003}.tar"`` -> ``["d/000.tar", ..., "d/003.tar"]`` (a range whose ends have a
    leading zero is padded to the wider end, as bash does; a range may run downwards);
    ``"{a,b}"`` -> ``["a", "b"]``; several groups expand left to right like nested loops; comma
    lists may nest. Braces that hold neither a range nor a comma stay literal (as in bash).
    Unbalanced braces are a ValueError.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise UserError(f"unbalanced '}}' in {pattern!r}")
        return [pattern]
    depth, end, commas = 0, -1, []
    for i in range(start, len(pattern)):
        ch = pattern[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
        elif ch == "," and depth == 1:
            commas.append(i)
    if end < 0:
        raise UserError(f"unbalanced '{{' in {pattern!r}")
    prefix, body, rest = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    if "}" in prefix:
        raise UserError(f"unbalanced '}}' in {pattern!r}")
    tails = expand_braces(rest)

    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        padded = any(s.lstrip("-").startswith("0") and len(s.lstrip("-")) > 1 for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        alternatives = [f"{n:0{width}d}" for n in range(lo, hi + step, step)]
    elif commas:
        bounds = [start] + commas + [end]
        # each alternative may hold braces of its own
        alternatives = [alt for j in range(len(bounds) - 1)
                        for alt in expand_braces(pattern[bounds[j] + 1:bounds[j + 1]])]
    else:
        # "{x}" is literal in bash; keep it and expand what follows
        return [prefix + "{" + body + "}" + t for t in tails]
    return [prefix + alt + t for alt in alternatives for t in tails]


def split_shards(n_shards: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shard indices for one consumer: DataLoader ``worker`` of ``num_workers`` on ``rank`` of ``world_size``.

    Round-robin over the consumer index ``rank * num_workers + worker``, so every shard goes to
    exactly one consumer. With fewer shards than consumers (``world_size * num_workers``) the
    consumers past the last shard get an empty list and yield nothing: under DDP that means ranks
    see different numbers of samples, so use at least as many shards as consumers.
    """
    if n_shards < 0 or world_size < 1 or num_workers < 1:
        raise ValueError(f"need n_shards >= 0, world_size >= 1, num_workers >= 1; got {n_shards}, {world_size}, {num_workers}")
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank} / worker {worker} out of range for world_size {world_size} / num_workers {num_workers}")
    consumer, consumers = rank * num_workers + worker, world_size * num_workers
    return list(range(consumer, n_shards, consumers))


def _split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000123.jpg"`` -> ``("dir/000123", "jpg")``: key up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class _Group:
    """Members of one sample as read from a tar: raw bytes, decoded only when the sample is emitted."""

    __slots__ = ("key", "image", "caption", "unsupported")

    def __init__(self, key: str):
        self.key, self.image, self.caption = key, None, None
        self.unsupported = False  # a member that is a link or a device, not a regular file

    def add(self, ext: str, data: bytes) -> None:
        if ext in WDS_IMAGE_EXTENSIONS:
            if self.image is None:  # first image member wins if a sample has several
                self.image = data
        elif ext == "txt":
            self.caption = data
        # anything else (.json metadata, ...) is ignored

    @property
    def complete(self) -> bool:
        return self.image is not None and self.caption is not None

    def finished(self) -> "_Group | Skipped":
        """The group as read, or why it cannot be a sample when a link stood for a missing part."""
        return Skipped("unsupported_member", self.key) if self.unsupported and not self.complete else self


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class WebDatasetSource:
    """Iterable source over webdataset tar shards (img2dataset layout).

    Each sample is the consecutive tar members sharing a key: ``{key}.jpg|jpeg|png|webp`` plus
    ``{key}.txt``, optionally ``{key}.json`` (ignored). ``urls`` is a brace pattern
    (``"data/{00000..00009}.tar"``) or a list of local paths, taken as they are. All shards must
    exist at construction.
    """

    def __init__(self, urls: str | os.PathLike | Sequence[str | os.PathLike], shuffle_buffer: int = 1000,
                 seed: int = 0, max_pixels: int = MAX_PIXELS):
        if isinstance(urls, (str, os.PathLike)):
            pattern = os.fspath(urls)
            shards = expand_braces(pattern) if pattern.strip() else []
        else:
            shards = [os.fspath(u) for u in urls]
        if not shards:
            raise UserError(f"shard list {urls!r} expands to no shards")
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise InputNotFound(f"{len(missing)} of {len(shards)} shard(s) not found: {missing[:5]}{more}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.shards = shards
        self.shuffle_buffer, self.seed, self.max_pixels = shuffle_buffer, seed, max_pixels

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_order(self, epoch: int, shard_ids: Sequence[int] | None = None) -> list[int]:
        """Shard indices in this epoch's order: the epoch's permutation of all shards, restricted to
        ``shard_ids`` (so the consumers' subsets are disjoint slices of one global order)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        perm = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.shards)).tolist()
        if shard_ids is None:
            return perm
        wanted = set(shard_ids)
        bad = sorted(i for i in wanted if not 0 <= i < len(self.shards))
        if bad:
            raise IndexError(f"shard ids {bad} out of range [0, {len(self.shards)})")
        return [i for i in perm if i in wanted]

    def iter_samples(self, epoch: int, shard_ids: Sequence[int] | None = None, exact_order: Sequence[int] | None = None
                     ) -> Iterator[tuple[str, Image.Image, str] | Skipped]:
        """Yield ``(key, image, caption)`` or ``Skipped``, in an order fixed by (seed, epoch).

        ``shard_ids`` (indices into ``self.shards``) restricts reading to those shards; an empty
        list yields nothing. ``exact_order`` reads exactly these shards in this order, repeats
        included (resampled mode).
        """
        order = list(exact_order) if exact_order is not None else self.shard_order(epoch, shard_ids)
        records = (rec for i in order for rec in self._read_shard(self.shards[i]))
        if self.shuffle_buffer > 1:
            # its own stream, seeded by (seed, epoch) but independent of the shard permutation
            records = self._shuffled(records, np.random.default_rng([self.seed, epoch, 1]))
        for rec in records:
            yield rec if isinstance(rec, Skipped) else self._decode(rec)

    def _shuffled(self, records, rng: np.random.Generator):
        # The buffer holds raw bytes, not decoded images: 1000 encoded JPEGs are a few tens of MB,
        # 1000 decoded full-size images could be gigabytes.
        buf = []
        for rec in records:
            buf.append(rec)
            if len(buf) >= self.shuffle_buffer:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, group: _Group) -> tuple[str, Image.Image, str] | Skipped:
        if group.image is None:
            return Skipped("missing_image", group.key)
        caption = decode_caption(group.caption, group.key)  # None -> missing_caption
        if isinstance(caption, Skipped):  # checked first: cheap, and spares decoding the image
            return caption
        image = decode_image(group.image, self.max_pixels, group.key)
        return image if isinstance(image, Skipped) else (group.key, image, caption)

    def _read_shard(self, shard: str) -> Iterator[_Group | Skipped]:
        return read_tar_groups(shard)


def read_tar_groups(shard: str) -> Iterator[_Group | Skipped]:
    """Stream one tar and yield its samples as raw groups (``key``, ``image``, ``caption`` bytes).

    On a corrupt or truncated tar, exactly one ``Skipped("corrupt_tar_member")`` is yielded,
    for the member being read, and the rest of the shard is given up: the stream cannot be
    resynchronised. Samples completed before that point still come through. Note that
    ``tarfile`` itself treats a garbled header after the first one as the end of the archive,
    so such a shard just ends early without a skip.
    """
    pending: _Group | None = None
    member_key = None
    try:
        with tarfile.open(shard, mode="r|*") as tf:
            while True:
                member_key = None  # an error from here on is in a header: member unknown
                member = tf.next()
                if member is None:
                    break
                tf.members = []  # streaming mode keeps every header read: do not let that grow
                if member.isdir():
                    continue
                member_key, ext = _split_member_name(member.name)
                if pending is not None and pending.key != member_key:
                    yield pending.finished()
                    pending = None
                if pending is None:
                    pending = _Group(member_key)
                if not member.isfile():  # symlinks, hard links, devices: never followed
                    pending.unsupported = True
                    continue
                f = tf.extractfile(member)
                pending.add(ext, f.read() if f is not None else b"")
    except _TAR_ERRORS:
        # Blame the member being read; for a bad header, the open sample if it is still
        # incomplete (its next member is the likely victim), else the shard itself.
        if member_key is not None:
            key = member_key
        else:
            key = pending.key if pending is not None and not pending.complete else shard
        if pending is not None and (pending.key != key or pending.complete):
            yield pending.finished()  # finished before the corruption: keep it
        yield Skipped("corrupt_tar_member", key)
        return
    if pending is not None:
        yield pending.finished()

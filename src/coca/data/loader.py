"""From a ``DataConfig`` to batches: sources, per-sample seeded augmentation, resumable order.

Every training batch is a pure function of (seed, batch index): map-style sources draw a seeded
permutation per epoch and every sample's augmentation is seeded by its position in the stream.
A resumed run therefore continues with exactly the batches an uninterrupted run would have seen.

A batch is ``{"images", "tokens", "captions", "skipped"}`` (see ``samples.Collator``); tokens are
trimmed to the batch's longest caption.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..config import DataConfig
from ..errors import UserError
from ..tokenizer import trim_padding
from .readers import (
    CocoCaptionsSource,
    CsvSource,
    FolderSource,
    WebDatasetSource,
    split_shards,
)
from .samples import Collator, Skipped
from .synthetic import SyntheticScenes, caption_for
from .transforms import EvalTransform, TrainTransform


def sample_seed(seed: int, *position: int) -> int:
    """A well-mixed 63-bit seed for the sample at this position of the stream."""
    return int(np.random.SeedSequence([seed, *position]).generate_state(1, dtype=np.uint64)[0] >> 1)


def build_source(cfg: DataConfig, split: str, image_size: int):
    """The raw (image, caption) source for 'train' or 'val'; None when there is no validation set."""
    if cfg.kind == "synthetic":
        n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_val_size
        return SyntheticScenes(n, split=split, seed=cfg.synthetic_seed, image_size=image_size)
    spec = cfg.train if split == "train" else cfg.val
    if not spec:
        return None
    if cfg.kind == "csv":
        return CsvSource(spec, image_root=cfg.image_root or None, image_column=cfg.image_column,
                         caption_column=cfg.caption_column, max_pixels=cfg.max_pixels)
    if cfg.kind == "coco":
        # validation: one caption per image, or an image's other captions in the batch are false negatives
        return CocoCaptionsSource(spec, cfg.split if split == "train" else cfg.val_split,
                                  image_root=cfg.image_root or None, max_pixels=cfg.max_pixels,
                                  first_caption_only=split != "train")
    if cfg.kind == "folder":
        return FolderSource(spec, templates=tuple(t.strip() for t in cfg.templates.split("|")), max_pixels=cfg.max_pixels)
    return WebDatasetSource(spec, shuffle_buffer=cfg.shuffle_buffer if split == "train" else 0,
                            seed=cfg.synthetic_seed, max_pixels=cfg.max_pixels)


class SourceDataset(Dataset):
    """Map-style view: item (index, seed) -> transformed (tensor, caption) or ``Skipped``."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        index, seed = item
        if isinstance(self.source, FolderSource):
            out = self.source.load(index, np.random.default_rng(seed))
        else:
            out = self.source.load(index)
        if isinstance(out, Skipped):
            return out
        try:
            return self.transform(out[0], out[1], seed)
        except (OSError, ValueError):  # an image PIL opened but the transform cannot process
            return Skipped("decode_error", str(index))


class ResumableBatchSampler:
    """Endless batches of (index, seed) over seeded per-epoch permutations, from batch ``start``."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.start, self.shuffle = n, batch_size, seed, start, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in itertools.count(self.start):
            positions = range(b * self.batch_size, (b + 1) * self.batch_size)
            yield [(self._index(p), sample_seed(self.seed, p)) for p in positions]


class WebDatasetStream(IterableDataset):
    """Webdataset shards as a stream of collated batches. Worker w of W yields global batches
    w, w+W, ... (the DataLoader interleaves them in that order); on resume each worker skips the
    batches it had produced before ``start``."""

    def __init__(self, source: WebDatasetSource, transform, collate, batch_size: int, seed: int,
                 start: int = 0, rank: int = 0, world_size: int = 1, resampled: bool = False):
        self.source, self.transform, self.collate = source, transform, collate
        self.batch_size, self.seed, self.start, self.rank, self.world_size = batch_size, seed, start, rank, world_size
        self.resampled = resampled

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        consumers = workers * self.world_size
        shards = split_shards(self.source.num_shards, self.rank, self.world_size, worker, workers)
        if not shards and not self.resampled:
            raise UserError(f"{self.source.num_shards} shards cannot feed {consumers} data workers: use fewer "
                             "data.workers, more shards, or data.resampled=true")
        skip = max(0, -(-(self.start - worker) // workers))  # batches this worker made before `start`
        produced, batch = 0, []
        for epoch in itertools.count():
            if self.resampled:  # shards drawn with replacement, a seeded stream per consumer
                rng = np.random.default_rng([self.seed, self.rank, worker, epoch, 2])
                order = rng.integers(self.source.num_shards, size=max(1, self.source.num_shards // consumers))
                samples = self.source.iter_samples(epoch, exact_order=order.tolist())
            else:
                samples = self.source.iter_samples(epoch, shards)
            count = -1
            for count, sample in enumerate(samples):
                if produced < skip:  # only count samples towards skipped batches; no decode work
                    batch.append(None)
                elif isinstance(sample, Skipped):
                    batch.append(sample)
                else:
                    _, image, caption = sample
                    batch.append(self.transform(image, caption, sample_seed(self.seed, epoch, worker, count)))
                if len(batch) == self.batch_size:
                    if produced >= skip:
                        yield self.collate(batch)
                    produced, batch = produced + 1, []
            if count < 0:  # a pass over the shards with no sample at all would repeat forever
                listed = [str(self.source.shards[i]) for i in (order.tolist() if self.resampled else shards)]
                names = ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")
                raise UserError(f"data worker {worker}: epoch {epoch} over {names} yielded no sample: the shards "
                                "are empty or not tar files")


class TrimmingCollator(Collator):
    """Collator whose token batches are trimmed to the longest caption."""

    def __call__(self, samples):
        batch = super().__call__(samples)
        if batch["tokens"].numel():
            batch["tokens"] = trim_padding(batch["tokens"], self.tokenizer.pad_id)
        return batch


def ignore_stop_signals(_worker_id: int) -> None:
    """In a data worker: SIGTERM and SIGINT sent to the whole process group (``timeout``, Slurm,
    Ctrl-C) are for the main process, which checkpoints and then stops its workers itself.

    A SIGTERM from the main process itself (``terminate()``, which DataLoader and multiprocessing
    use on a worker that did not stop when asked, e.g. at interpreter exit) still ends the worker:
    the signal is blocked and a thread reads each one with its sender's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="sigterm-from-parent", daemon=True).start()


def train_batches(cfg: DataConfig, image_size: int, tokenizer, seed: int, start: int = 0,
                  rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Endless training batches, starting at batch index ``start`` (the resume position)."""
    source = build_source(cfg, "train", image_size)
    transform = TrainTransform.from_config(image_size, cfg.augment)
    collate = TrimmingCollator(tokenizer)
    common = dict(num_workers=cfg.workers, persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
                  worker_init_fn=ignore_stop_signals if cfg.workers else None,
                  # the workers' base seed from a generator of its own: starting the loader must not
                  # draw from torch's global one, whose checkpointed state patch dropout reads
                  generator=torch.Generator().manual_seed(seed + 7919 * rank + 104729 * start))
    if isinstance(source, WebDatasetSource):
        stream = WebDatasetStream(source, transform, collate, cfg.batch_size, seed, start, rank, world_size,
                                  cfg.resampled)
        return iter(DataLoader(stream, batch_size=None, **common))
    sampler = ResumableBatchSampler(len(source), cfg.batch_size, seed + 7919 * rank, start)
    return iter(DataLoader(SourceDataset(source, transform), batch_sampler=sampler, collate_fn=collate, **common))


def val_batches(cfg: DataConfig, image_size: int, tokenizer, max_batches: int) -> list[dict]:
    """A fixed validation set (first ``max_batches`` batches, no augmentation), built once."""
    source = build_source(cfg, "val", image_size)
    if source is None:
        return []
    transform, collate = EvalTransform(image_size), TrimmingCollator(tokenizer)
    if isinstance(source, WebDatasetSource):
        samples = (s if isinstance(s, Skipped) else transform(s[1], s[2]) for s in source.iter_samples(0))
    else:
        ds = SourceDataset(source, transform)
        samples = (ds[(i, 0)] for i in range(len(ds)))
    batches = []
    for chunk in _chunks(samples, cfg.batch_size):
        batch = collate(chunk)
        if batch["images"].shape[0] > 1:
            batches.append(batch)
        if len(batches) == max_batches:
            break
    return batches


def training_captions(cfg: DataConfig, limit: int) -> Iterator[str]:
    """Captions of the training source, for tokenizer training; images are not decoded where avoidable."""
    source = build_source(cfg, "train", 16)
    if isinstance(source, SyntheticScenes):
        yield from (caption_for(source.scene(i)) for i in range(min(limit, len(source))))
    elif isinstance(source, FolderSource):
        yield from (t.format(name) for name in source.class_names for t in source.templates)
    elif isinstance(source, (CsvSource, CocoCaptionsSource)):
        yield from source.captions(limit)
    else:
        samples = (s for s in source.iter_samples(0) if not isinstance(s, Skipped))
        yield from (caption for _, _, caption in itertools.islice(samples, limit))


def _chunks(iterable, n):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk

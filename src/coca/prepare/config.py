"""The typed configuration of `coca data prepare` (YAML + ``--set key=value``, like training)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import MAX_PIXELS, ConfigError, from_dict, read_config_data, to_dict


@dataclass
class FilterConfig:
    min_side: int = 200             # pixels; smaller images are rejected ("too_small")
    max_aspect: float = 3.0         # longer side / shorter side ("bad_aspect")
    max_pixels: int = MAX_PIXELS    # decompression-bomb guard, from the header ("too_many_pixels")
    min_words: int = 2              # caption length in words ("caption_too_short" / "caption_too_long")
    max_words: int = 100
    min_chars: int = 5              # caption length in characters
    max_chars: int = 1000
    boilerplate: bool = True        # file names, URLs, "image", "untitled", ... ("boilerplate_caption")
    scripts: list = field(default_factory=list)  # e.g. [latin]: keep captions mostly in these scripts ("script")
    min_script_fraction: float = 0.8
    similarity_model: str = ""      # a coca model directory: reject image-text cosine below the threshold
    similarity_threshold: float = 0.2
    min_content: float = 0.1        # fraction of each side left after trimming uniform borders; less is
                                    # a blank image ("no_content"); 0 keeps every image

    def __post_init__(self):
        if not 0 <= self.min_content < 1:
            raise ConfigError(f"filters.min_content must be in [0, 1), got {self.min_content}")
        if self.min_side < 1 or self.max_aspect < 1 or self.max_pixels < 1:
            raise ConfigError("filters.min_side and max_pixels must be >= 1 and max_aspect >= 1")
        if not 0 <= self.min_words <= self.max_words or not 0 <= self.min_chars <= self.max_chars:
            raise ConfigError("filters: need 0 <= min_words <= max_words and 0 <= min_chars <= max_chars")
        if isinstance(self.scripts, str):  # --set filters.scripts=latin,cyrillic
            self.scripts = [x.strip() for x in self.scripts.split(",") if x.strip()]
        unknown = [s for s in self.scripts if s not in SCRIPTS]
        if unknown:
            raise ConfigError(f"filters.scripts: unknown {unknown}; known: {sorted(SCRIPTS)}")


# Unicode ranges of the scripts the script filter knows (letters only are counted).
SCRIPTS = {
    "latin": [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)],
    "cyrillic": [(0x400, 0x4FF)],
    "greek": [(0x370, 0x3FF)],
    "cjk": [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7AF)],
    "arabic": [(0x600, 0x6FF)],
    "devanagari": [(0x900, 0x97F)],
}


@dataclass
class DedupConfig:
    exact_images: bool = True       # identical decoded pixels ("duplicate_exact")
    near_images: bool = True        # perceptual hash within phash_max_distance ("duplicate_near_image")
    phash_max_distance: int = 6     # Hamming distance of the 64-bit hashes
    region_min_agree: int = 5       # overlays: near duplicates when the centre and this many of the 9
                                    # region hashes agree (0: off) ...
    region_max_distance: int = 4    # ... within this Hamming distance
    captions: bool = False          # near-duplicate captions ("duplicate_caption"): off by default, as
                                    # short generic captions ("a photo of a dog") recur on distinct images
    caption_jaccard: float = 0.8    # MinHash-estimated Jaccard of character 5-grams
    partitioned: bool | None = None  # partitioned over workers (default: with engine ray) or in one process
    partition_samples: int = 100_000  # partitioned: samples per partition, which bounds each task's memory
    against: list = field(default_factory=list)  # evaluation images (folders, globs, list files): training
                                    # samples matching one are rejected ("eval_overlap")
    semantic_model: str = ""        # a coca model directory: semantic deduplication with its image
                                    # embeddings ("duplicate_semantic"); off when empty
    semantic_threshold: float = 0.95  # cosine of two images' embeddings at or above which they are duplicates
    semantic_cluster_size: int = 1000  # k-means clusters of about this many samples; pairs compared within them
    semantic_probes: int = 2        # each embedding is compared within its this many nearest clusters

    def __post_init__(self):
        if not 0 <= self.phash_max_distance <= 16:
            raise ConfigError(f"dedup.phash_max_distance must be in [0, 16], got {self.phash_max_distance}")
        if not 0 <= self.region_min_agree <= 9 or not 0 <= self.region_max_distance <= 16:
            raise ConfigError("dedup.region_min_agree must be in [0, 9] and dedup.region_max_distance in [0, 16], "
                              f"got {self.region_min_agree} and {self.region_max_distance}")
        if not 0 < self.caption_jaccard <= 1:
            raise ConfigError(f"dedup.caption_jaccard must be in (0, 1], got {self.caption_jaccard}")
        if not 0 < self.semantic_threshold <= 1:
            raise ConfigError(f"dedup.semantic_threshold must be in (0, 1], got {self.semantic_threshold}")
        if not 1 <= self.semantic_probes <= 16:
            raise ConfigError(f"dedup.semantic_probes must be in [1, 16], got {self.semantic_probes}")
        if self.semantic_cluster_size < 2:
            raise ConfigError(f"dedup.semantic_cluster_size must be >= 2, got {self.semantic_cluster_size}")
        if self.partition_samples < 1:
            raise ConfigError(f"dedup.partition_samples must be >= 1, got {self.partition_samples}")
        if isinstance(self.against, str):  # --set dedup.against=a/,b.txt
            self.against = [x.strip() for x in self.against.split(",") if x.strip()]


@dataclass
class PrepareConfig:
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    samples_per_shard: int = 10_000
    rows_per_task: int = 5_000      # CSV/Parquet input: rows per task (tar input: one task per shard)
    image_column: str = "filepath"
    caption_column: str = "caption"
    image_root: str = ""            # CSV/Parquet: base of relative image paths (default: the file's directory)
    seed: int = 0                   # the global shuffle
    engine: str = "local"           # local (processes on this machine) | ray
    workers: int = 0                # local: processes (0 = all cores)
    ray_address: str = ""           # ray: an existing cluster ("auto" or host:port); empty starts a local one
    jpeg_quality: int = 95          # non-JPEG inputs are re-encoded to JPEG at this quality

    def __post_init__(self):
        if self.samples_per_shard < 1 or self.rows_per_task < 1:
            raise ConfigError("samples_per_shard and rows_per_task must be >= 1")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"engine must be 'local' or 'ray', got {self.engine!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

    def to_dict(self) -> dict:
        return to_dict(self)


def load_prepare_config(path: str | None = None, overrides: list[str] | None = None) -> PrepareConfig:
    data = read_config_data(path, overrides)
    try:
        return from_dict(PrepareConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path + ': ' if path else ''}{e}") from None

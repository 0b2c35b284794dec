"""CLIP's byte-level BPE tokenizer, as open_clip's CoCa checkpoints were trained with.

The same ids as ``open_clip.get_tokenizer("coca_ViT-L-14")`` (tested on punctuation, unicode and
over-long text), from the merges file open_clip ships (``bpe_simple_vocab_16e6.txt.gz``), which a
converted model directory keeps a copy of: nothing is downloaded. Cleaning as open_clip's default:
``ftfy.fix_text``, HTML entities unescaped twice, whitespace collapsed, lower case.

Ids: 49,152 BPE pieces (256 bytes, 256 bytes ending a word, 48,894 merges), then
``<start_of_text>`` 49406 and ``<end_of_text>`` 49407; padding is 0, as open_clip pads. Unlike
open_clip's 76-id rows, ``encode`` leaves out ``<start_of_text>``: the model prepends it (it is the
decoder's start token), so a row is pieces, ``<end_of_text>``, then zeros, ``context_length`` (75)
long, and ``[start] + row`` is open_clip's row.
"""

from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache
from pathlib import Path

import torch

from .errors import InputNotFound, UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # merge lines the vocabulary keeps (the file's first line is a header)
SPECIAL = ("<start_of_text>", "<end_of_text>")
# contractions, letter runs, single digits, runs of other non-space characters (open_clip's pattern)
PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def packaged_vocab() -> Path | None:
    """The merges file inside the installed open_clip package, if there is one."""
    try:
        import open_clip
    except ImportError:
        return None
    path = Path(open_clip.__file__).parent / VOCAB_FILE
    return path if path.is_file() else None


@lru_cache()
def byte_to_char() -> dict[int, str]:
    """Every byte as a printable character: bytes that print stand for themselves, the others
    (controls, space, ...) take the characters from 256 on, in order (GPT-2's reversible map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 256
    for b in range(256):
        if b not in chars:
            chars[b] = chr(extra)
            extra += 1
    return chars


def clean(text: str) -> str:
    import ftfy
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    file_name = VOCAB_FILE

    def __init__(self, path: str | os.PathLike | None = None, context_length: int = 75):
        import regex
        path = packaged_vocab() if path is None else Path(path)
        if path is None:
            raise InputNotFound(f"no CLIP vocabulary given and none found in an installed open_clip package "
                                f"({VOCAB_FILE}); pass the model directory or the file")
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise InputNotFound(f"CLIP vocabulary {str(path)!r} not found")
        if context_length < 2:
            raise UserError(f"context_length must be >= 2 (one piece and <end_of_text>), got {context_length}")
        try:
            self._raw = path.read_bytes()
            lines = gzip.decompress(self._raw).decode("utf-8").split("\n")[1:MERGES + 1]
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a gzipped CLIP merges file: {e}") from None
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != MERGES or any(len(m) != 2 for m in merges):
            raise UserError(f"{path} is not CLIP's merges file: expected {MERGES} merge lines of two symbols")
        chars = list(byte_to_char().values())
        pieces = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL)
        self.path, self.context_length = path, context_length
        self._ids = {p: i for i, p in enumerate(pieces)}
        self._pieces = pieces
        self._ranks = {m: i for i, m in enumerate(merges)}
        self._words: dict[str, tuple[str, ...]] = {s: (s,) for s in SPECIAL}
        self._pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self._bytes = {c: b for b, c in byte_to_char().items()}
        self.vocab_size = len(pieces)
        self.start_id, self.eos_id = self._ids[SPECIAL[0]], self._ids[SPECIAL[1]]
        self.pad_id = 0

    def _bpe(self, word: str) -> tuple[str, ...]:
        """A pre-token's pieces: its characters, the last marked as ending the word, merged pair by
        pair, the lowest-ranked merge first, until no adjacent pair is a merge."""
        if word in self._words:
            return self._words[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self._ranks.get(pair, MERGES), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank = min(ranked)[0]
            if rank == MERGES:
                break
            pair, merged, i = list(zip(parts, parts[1:]))[min(ranked)[1]], [], 0
            while i < len(parts):  # every occurrence of the pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._words[word] = tuple(parts)
        return self._words[word]

    def encode_ids(self, text: str) -> list[int]:
        """The pieces of one text, without <start_of_text>, <end_of_text> or padding."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        chars = byte_to_char()
        ids = []
        # a piece covers at least one character: this cut never changes the kept pieces and bounds
        # the cost of a megabyte-long caption
        for token in self._pattern.findall(clean(text[: 64 * (self.context_length + 1)])):
            ids.extend(self._ids[p] for p in self._bpe("".join(chars[b] for b in token.encode("utf-8"))))
        return ids

    def encode(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """[B, context_length] LongTensor: pieces (truncated), <end_of_text>, then 0. A str gives B=1."""
        if isinstance(texts, str):
            texts = [texts]
        L = context_length or self.context_length
        out = torch.zeros((len(texts), L), dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} must be a str, got {type(text).__name__}")
            ids = self.encode_ids(text)[: L - 1] + [self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __call__(self, texts):
        return self.encode(texts)

    def decode(self, ids) -> str | list[str]:
        """One row (1-D) or a batch (2-D) as text; stops at <end_of_text>, skips <start_of_text>."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        text = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.start_id and 0 <= i < self.start_id:
                text.append(self._pieces[i])
        raw = bytes(self._bytes[c] for c in "".join(text))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def serialized_model(self) -> bytes:
        return self._raw

    def __repr__(self) -> str:
        return f"CLIPTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"

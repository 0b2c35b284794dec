"""SentencePiece tokenizer: train, load (ours or any ``.model``, T5's included), encode, decode.

Ids follow T5: pad 0 (also the decoder start token), eos 1, unk 2. A SentencePiece model
trained elsewhere may lack a pad or eos piece (LLaMA-style models have no pad); those special
tokens are then appended after its pieces, so ``vocab_size`` is the piece count plus them.
Every caption encodes to exactly ``context_length`` ids: pieces truncated to leave room for EOS,
then EOS, then padding.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import InputNotFound, UserError
from .io import atomic_write_bytes

MODEL_FILE = "tokenizer.model"


class Tokenizer:
    file_name = MODEL_FILE  # its name in a model directory

    def __init__(self, path: str | os.PathLike, context_length: int = 77):
        import sentencepiece as spm
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise InputNotFound(f"tokenizer model {str(path)!r} not found (train one with `coca tokenizer train`)")
        if context_length < 2:
            raise UserError(f"context_length must be >= 2 (one piece and EOS), got {context_length}")
        self.path = path
        self.context_length = context_length
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(path.read_bytes())
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on bad files
            raise UserError(f"{path} is not a SentencePiece model: {e}") from None
        n = self._sp.get_piece_size()
        extra = n
        self.pad_id = self._sp.pad_id()
        if self.pad_id < 0:
            self.pad_id, extra = extra, extra + 1
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            self.eos_id, extra = extra, extra + 1
        self.unk_id = self._sp.unk_id()
        self.num_pieces = n
        self.vocab_size = extra

    # --- training ------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts_or_file: str | os.PathLike | Iterable[str], vocab_size: int = 32000,
              out_dir: str | os.PathLike = ".", model_type: str = "unigram", character_coverage: float = 0.9995,
              hard_vocab_limit: bool = False, input_sentence_size: int = 10_000_000,
              context_length: int = 77) -> "Tokenizer":
        """Train on a text file (one caption per line) or an iterable of strings.

        With ``hard_vocab_limit=False`` a corpus too small for ``vocab_size`` gives a smaller
        vocabulary instead of failing; ``vocab_size`` on the result says what was learned.
        """
        import sentencepiece as spm
        if isinstance(texts_or_file, (str, os.PathLike)) and Path(texts_or_file).is_file():
            path = Path(texts_or_file)
            sentences = (line.rstrip("\n") for line in path.open(encoding="utf-8", errors="replace"))
        elif isinstance(texts_or_file, (str, os.PathLike)):
            raise InputNotFound(f"training text file {str(texts_or_file)!r} not found "
                                    "(pass a path to a file with one caption per line, or a list of strings)")
        else:
            sentences = iter(texts_or_file)
        sentences = (s for s in (str(x).strip() for x in sentences) if s)
        if vocab_size < 8:
            raise UserError(f"vocab_size must be at least 8, got {vocab_size}")
        first = next(sentences, None)
        if first is None:  # SentencePiece's own message for this is an internal assertion
            raise UserError("no caption to train a tokenizer on: every caption given is empty (or no sample "
                            "could be read)")
        sentences = itertools.chain([first], sentences)
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences, model_writer=buf, vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, hard_vocab_limit=hard_vocab_limit,
                pad_id=0, eos_id=1, unk_id=2, bos_id=-1, input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:
            raise UserError(f"SentencePiece training failed: {e}") from None
        out = atomic_write_bytes(Path(out_dir) / MODEL_FILE, buf.getvalue())
        return cls(out, context_length=context_length)

    # --- encode / decode -----------------------------------------------------------------------
    def encode(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """[B, context_length] LongTensor: pieces (truncated), EOS, then pad. A str gives B=1."""
        if isinstance(texts, str):
            texts = [texts]
        L = context_length or self.context_length
        out = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} must be a str, got {type(text).__name__}")
            # A piece spans at most 16 characters, so this cut never changes the kept pieces; it
            # bounds the cost of a pathological megabyte-long caption.
            ids = self._sp.encode(text.strip()[: 64 * L])[: L - 1] + [self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def encode_ids(self, text: str) -> list[int]:
        """The pieces of one text as ids, without EOS or padding (e.g. a caption start to continue)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._sp.encode(text.strip()[: 64 * self.context_length])

    def decode(self, ids) -> str | list[str]:
        """Inverse of encode for one row (1-D) or a batch (2-D); stops at EOS, skips pad/special ids."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        pieces = []
        for i in ids:
            if i == self.eos_id:
                break
            if i == self.pad_id or not 0 <= i < self.num_pieces or self._sp.is_control(i):
                continue
            pieces.append(int(i))
        return self._sp.decode(pieces)

    def __getstate__(self):  # DataLoader workers receive the tokenizer by pickling
        state = dict(self.__dict__)
        state["_sp"] = self._sp.serialized_model_proto()
        return state

    def __setstate__(self, state):
        import sentencepiece as spm
        proto = state.pop("_sp")
        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(proto)

    def __call__(self, texts):
        return self.encode(texts)

    def serialized_model(self) -> bytes:
        return self._sp.serialized_model_proto()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"


def trim_padding(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row: [B, 77] -> [B, longest caption].

    T5's relative positions make the model's outputs on the kept positions identical to the
    full-length ones (padding is masked everywhere), so a batch pays only for its longest caption
    rather than for all 77 positions. Web captions average well under 77 tokens.
    """
    used = (tokens != pad_id).any(0).nonzero()
    return tokens[:, : int(used.max()) + 1 if used.numel() else 1]


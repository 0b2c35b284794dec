"""Caption generation: greedy, beam search and top-k / top-p sampling, with a KV cache.

With ``use_cache=True`` (the default) each image is encoded once, the cross-attention keys and
values of its visual tokens are projected once per image (and shared by its beams and samples),
and every step feeds only the new positions through the decoder while self-attention keys/values
grow. ``use_cache=False`` recomputes the whole prefix each step; it exists to prove the cache exact
and to measure what it saves.

``compile=True`` runs each step through ``T5Decoder.static_step`` under ``torch.compile``: a
static cache (every slot attended, later ones masked), one graph for all steps, weights frozen into
it (on CPU the Linear layers then use prepacked GEMM weights, except at two rows; attention for
the one new position is written out for inductor to fuse). It pays a compile of seconds per
shape bucket (rows padded to a power of two, length to a multiple of 16), so it is for captioning
many images; tokens equal the eager cached path's (tested). The graphs belong to a
``CompiledDecoder`` (``coca.compiled_decoding``): pass one as ``compiled=`` and keep it to reuse
them across calls; ``compile=True`` without one compiles for that call only.

The options are the fields of one frozen ``GenerationConfig``, checked when it is built
(``validate`` adds the model's context length and the prefix); ``generate(model, images, config)``
takes one, and keyword options (``generate(model, images, max_new_tokens=20, strategy="beam")``)
build it or replace its fields.

Controls, with Hugging Face's semantics: ``repetition_penalty`` (CTRL: a logit of a token already
in the decoder input is divided by the penalty when positive, multiplied when negative) and
``no_repeat_ngram_size`` (a token that would complete an n-gram already in the decoder input is
banned). As in HF's encoder-decoder models, the decoder input includes the start token (= pad) and
the prefix. In beam search they act on log-probabilities, as HF's beam search does.

``prefix`` (text or ids) is a caption start that decoding continues; it is fed to the decoder in
one pass and is part of the returned tokens unless ``include_prefix=False``.

Output: LongTensor [B * num_return_sequences, T] of ids without the start token; a finished row
holds EOS followed by pad; T is the longest row. ``return_dict=True`` gives a ``GenerationOutput``
with per-sequence log-likelihoods under the model (the raw distribution: before penalties,
temperature and filtering, so they equal a teacher-forced forward pass) and the image embedding and
visual tokens computed on the way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled_decoding import CompiledDecoder
from .config import STRATEGIES, Strategy
from .errors import UserError


@dataclass
class GenerationOutput:
    """``tokens`` [R, T] (R = images x num_return_sequences, a row's sequences adjacent);
    ``scores`` [R]: sum of log p(token | image, earlier tokens) over the generated tokens (EOS
    included, prefix and pad excluded); ``normalized_scores`` = scores / ``num_tokens``;
    ``image_embeds`` [B, E] and ``visual_tokens`` [B, Q, D] per image."""
    tokens: Tensor
    scores: Tensor
    normalized_scores: Tensor
    num_tokens: Tensor
    image_embeds: Tensor | None
    visual_tokens: Tensor
    prefix_length: int


# --- logits processors (HF semantics) ---------------------------------------------------------

def apply_repetition_penalty(seq: Tensor, scores: Tensor, penalty: float) -> Tensor:
    """Every token id present in a row of ``seq`` [R, L] gets its score divided by ``penalty`` if
    positive, multiplied if negative (HF ``RepetitionPenaltyLogitsProcessor``)."""
    picked = scores.gather(1, seq)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seq, picked)


def ban_repeated_ngrams(seq: Tensor, scores: Tensor, n: int) -> Tensor:
    """Set to -inf every token that would complete an n-gram already present in its row of ``seq``
    (HF ``NoRepeatNGramLogitsProcessor``), vectorised over rows and positions."""
    R, L = seq.shape
    if L < n:  # no complete n-gram yet
        return scores
    if n == 1:  # every token already present is banned
        return scores.scatter(1, seq, float("-inf"))
    windows = seq.unfold(1, n, 1)                                  # [R, L-n+1, n]
    match = (windows[:, :, :-1] == seq[:, L - n + 1:].unsqueeze(1)).all(-1)  # prefix equals the last n-1
    V = scores.shape[1]
    banned = torch.where(match, windows[:, :, -1], V)              # V = "no ban" column, dropped below
    mask = torch.zeros(R, V + 1, dtype=torch.bool, device=scores.device).scatter_(1, banned, True)[:, :V]
    return scores.masked_fill(mask, float("-inf"))


class LogitsProcessors:
    """The processing chain applied to next-token scores before choosing, in HF's order."""

    def __init__(self, repetition_penalty: float, no_repeat_ngram_size: int, min_new_tokens: int, eos_id: int):
        self.penalty, self.ngram, self.min_new, self.eos = repetition_penalty, no_repeat_ngram_size, min_new_tokens, eos_id

    def __call__(self, seq: Tensor, scores: Tensor, new_tokens_so_far: int) -> Tensor:
        if self.penalty != 1.0:
            scores = apply_repetition_penalty(seq, scores, self.penalty)
        if self.ngram > 0:
            scores = ban_repeated_ngrams(seq, scores, self.ngram)
        if new_tokens_so_far < self.min_new:
            scores = scores.clone()  # the caller still reads the unprocessed scores
            scores[:, self.eos] = float("-inf")
        return scores


class _Stepper:
    """Returns next-token logits [rows, V] (fp32) for the newest position: without a cache, with the
    KV cache, or (``compiled``) through the compiled fixed-shape step over a static cache."""

    def __init__(self, model, visual_tokens: Tensor, max_len: int, use_cache: bool, repeat: int = 1,
                 compiled: CompiledDecoder | None = None):
        self.decoder = model.text_decoder
        self.cache = None
        self.static_step = None
        if use_cache and compiled is not None:
            # Shapes are bucketed so that a new batch size or length rarely compiles a new graph:
            # rows (images x beams or samples) padded to a power of two with copies of the last
            # one (rows are independent, so the real rows' results do not change), and the length
            # rounded up to a multiple of 16.
            self.rows = visual_tokens.shape[0] * repeat
            padded = 1 << (self.rows - 1).bit_length()
            self.cache = self.decoder.new_cache(visual_tokens, -(-max_len // 16) * 16, repeat=repeat, static=True,
                                                rows=padded)
            self.static_step = compiled.step()
            # fixed inputs, refilled each step: a new tensor (or a view with the growing
            # sequence's strides) would not match the compiled graph's guards
            self.position = torch.zeros(1, dtype=torch.long, device=visual_tokens.device)
            self.token = torch.zeros(padded, 1, dtype=torch.long, device=visual_tokens.device)
        elif use_cache:
            self.cache = self.decoder.new_cache(visual_tokens, max_len, repeat=repeat)
        else:
            self.visual = visual_tokens.repeat_interleave(repeat, 0) if repeat > 1 else visual_tokens

    def __call__(self, seq: Tensor) -> Tensor:
        if self.static_step is not None:  # a prefix goes through the step one position at a time
            cache = self.cache
            keys, values = [layer.k for layer in cache.layers], [layer.v for layer in cache.layers]
            for t in range(cache.length, seq.shape[1]):
                self.position.fill_(t)
                self.token[:self.rows].copy_(seq[:, t:t + 1])
                logits = self.static_step(self.token, self.position, keys, values, cache.cross, cache.bias_table)
                cache.advance()
            return logits[:self.rows]
        if self.cache is not None:  # only the positions not yet in the cache (the whole prefix at first)
            return self.decoder(seq[:, self.cache.length:], cache=self.cache)[:, -1].float()
        return self.decoder(seq, self.visual)[:, -1].float()

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def prefix_ids(model, prefix, device) -> Tensor:
    """A caption start as a 1-D LongTensor of ids (no EOS): text through the model's tokenizer, or ids."""
    if prefix is None or (isinstance(prefix, str) and not prefix.strip()):
        return torch.empty(0, dtype=torch.long, device=device)
    if isinstance(prefix, str):
        if model.tokenizer is None:
            raise UserError("a text prefix needs the model's tokenizer (load a model directory with tokenizer.model, "
                            "or pass the prefix as token ids)")
        ids = torch.tensor(model.tokenizer.encode_ids(prefix), dtype=torch.long)
    else:
        ids = torch.as_tensor(prefix, dtype=torch.long)
        if ids.dim() != 1:
            raise UserError(f"prefix ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
        V = model.cfg.text.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise UserError(f"prefix ids must be in [0, {V}), got {ids.tolist()}")
        if (ids == model.cfg.text.eos_id).any():
            raise UserError(f"prefix ids contain EOS ({model.cfg.text.eos_id}): a prefix is an unfinished caption")
    return ids.to(device)


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode, checked once when built (``validate`` adds what needs the model: its context
    length and the prefix). Frozen and hashable: equal configs can share a batch. ``seed`` seeds a
    generator per ``generate`` call (sampling); ``compile`` decodes through the compiled step."""
    strategy: Strategy = "greedy"
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 4
    num_return_sequences: int = 1
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    use_cache: bool = True
    compile: bool = False

    def __post_init__(self):
        """Refuse options that cannot work, naming the value and what is allowed."""
        if self.strategy not in STRATEGIES:
            raise UserError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not _is_int(self.max_new_tokens):
            raise UserError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        if self.strategy in ("beam", "open_clip_beam") and self.num_beams < 1:
            raise UserError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature} (use strategy='greedy' for argmax decoding)")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0 (1.0 = off, > 1 discourages repeats), got {self.repetition_penalty}")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise UserError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {self.no_repeat_ngram_size!r}")
        n_return = self.num_return_sequences
        if n_return < 1:
            raise UserError(f"num_return_sequences must be >= 1, got {n_return}")
        if n_return > 1 and self.strategy == "greedy":
            raise UserError(f"num_return_sequences={n_return} needs strategy 'beam' or 'sample' "
                            "(greedy decoding has one answer)")
        if n_return > 1 and self.strategy in ("beam", "open_clip_beam") and n_return > self.num_beams:
            raise UserError(f"num_return_sequences ({n_return}) must be <= num_beams ({self.num_beams})")
        if self.length_penalty != self.length_penalty:  # NaN
            raise UserError("length_penalty must be a number, got NaN")
        if self.compile and not self.use_cache:
            raise UserError("compile=True compiles the cached decoding step; it needs use_cache=True")

    def validate(self, context_length: int, n_prefix: int = 0) -> "GenerationConfig":
        """``self`` if it fits a model of ``context_length`` after a prefix of ``n_prefix`` tokens."""
        limit = context_length
        if n_prefix >= limit:
            raise UserError(f"the prefix has {n_prefix} tokens; it must be shorter than the model's context length {limit}")
        if self.max_new_tokens > limit - n_prefix:
            raise UserError(f"max_new_tokens must be in [1, {limit - n_prefix}] (the model's context length {limit}"
                            + (f" minus the {n_prefix} prefix tokens" if n_prefix else "") + f"), got {self.max_new_tokens}")
        return self

    @classmethod
    def of(cls, config: "GenerationConfig | None" = None, **options) -> "GenerationConfig":
        """``config`` (default: the defaults) with ``options`` in place of its fields."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}")
        config = cls() if config is None else config
        return replace(config, **options) if options else config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_compiled(model, config: GenerationConfig, compiled: CompiledDecoder | None) -> None:
    """A caller's ``compiled`` (which implies ``compile``) must be this model's and run the cache."""
    if compiled is not None:
        if not config.use_cache:
            raise UserError("compile=True compiles the cached decoding step; it needs use_cache=True")
        if compiled.decoder is not model.text_decoder:
            raise UserError("compiled= is a CompiledDecoder of another model's decoder")


@contextlib.contextmanager
def compiled_decoder(model, config: GenerationConfig, compiled: CompiledDecoder | None = None):
    """The ``CompiledDecoder`` that calls decoding as ``config`` says share: the caller's
    ``compiled``; else, with ``config.compile``, one of their own, whose graphs are dropped at the
    end of the block; else None (eager decoding)."""
    if compiled is not None or not config.compile:
        yield compiled
        return
    own = CompiledDecoder(model)
    try:
        yield own
    finally:
        own.forget()


@torch.no_grad()
def generate(model, images: Tensor, config: GenerationConfig | None = None, *, prefix=None,
             include_prefix: bool = True, return_dict: bool = False, generator: torch.Generator | None = None,
             compiled: CompiledDecoder | None = None, **options) -> Tensor | GenerationOutput:
    """Caption ``images`` as ``config`` says; keyword ``options`` (``max_new_tokens=...``,
    ``strategy=...``: the fields of ``GenerationConfig``) build one or replace its fields.
    ``compiled``: a ``CompiledDecoder`` of this model that the caller keeps, so its graphs serve
    every call; ``compile=True`` without one compiles for this call only."""
    config = GenerationConfig.of(config, **options)
    model.check_images(images)
    prefix = prefix_ids(model, prefix, images.device)
    config.validate(model.cfg.text.context_length, len(prefix))  # before the image encoder runs
    _check_compiled(model, config, compiled)
    image_embeds, visual_tokens = model.encode_image_tokens(images)
    out = decode(model, visual_tokens, config, prefix=prefix, include_prefix=include_prefix, generator=generator,
                 return_dict=return_dict, compiled=compiled)
    if return_dict:
        out.image_embeds = image_embeds
    return out


@torch.no_grad()
def decode(model, visual_tokens: Tensor, config: GenerationConfig | None = None, *, prefix: Tensor | None = None,
           include_prefix: bool = True, return_dict: bool = False, generator: torch.Generator | None = None,
           compiled: CompiledDecoder | None = None, **options) -> Tensor | GenerationOutput:
    """``generate`` from visual tokens [B, Q, D] already computed: needs only ``model.cfg.text`` and
    ``model.text_decoder``. ``prefix`` is a 1-D id tensor here (see ``prefix_ids``)."""
    config = GenerationConfig.of(config, **options)
    text = model.cfg.text
    prefix = torch.empty(0, dtype=torch.long, device=visual_tokens.device) if prefix is None else prefix
    config.validate(text.context_length, len(prefix))
    _check_compiled(model, config, compiled)
    with compiled_decoder(model, config, compiled) as compiled:
        tokens, scores, counts = _decode(model, visual_tokens, config, prefix, generator, return_dict, compiled)
    if include_prefix and len(prefix):
        tokens = torch.cat([prefix.expand(tokens.shape[0], -1), tokens], dim=1)
    if not return_dict:
        return tokens
    return GenerationOutput(tokens, scores, scores / counts.clamp(min=1), counts, None, visual_tokens, len(prefix))


def _decode(model, visual_tokens, config: GenerationConfig, prefix, generator, track_scores, compiled):
    c = config
    processors = LogitsProcessors(c.repetition_penalty, c.no_repeat_ngram_size, c.min_new_tokens, model.cfg.text.eos_id)
    if c.strategy == "open_clip_beam":
        return _open_clip_beam_search(model, visual_tokens, prefix, c.max_new_tokens, processors, c.num_beams,
                                      c.num_return_sequences, c.length_penalty, c.use_cache, compiled)
    if c.strategy == "beam" and c.num_beams > 1:
        return _beam_search(model, visual_tokens, prefix, c.max_new_tokens, processors, c.num_beams,
                            c.num_return_sequences, c.length_penalty, c.use_cache, compiled)
    sample = None
    if c.strategy == "sample":
        if generator is None and c.seed is not None:
            generator = torch.Generator(device=visual_tokens.device).manual_seed(c.seed)
        sample = lambda logits: _sample(logits, c.temperature, c.top_k, c.top_p, generator)  # noqa: E731
    repeat = c.num_return_sequences if c.strategy == "sample" else 1
    return _greedy_or_sample(model, visual_tokens, prefix, c.max_new_tokens, processors, c.use_cache, sample, repeat,
                             track_scores=track_scores, compiled=compiled)


def _start(model, rows: int, prefix: Tensor, device) -> Tensor:
    start = torch.full((rows, 1), model.cfg.text.start_id, dtype=torch.long, device=device)
    return torch.cat([start, prefix.expand(rows, -1)], dim=1)


def _greedy_or_sample(model, visual_tokens, prefix, max_new_tokens, processors, use_cache, sample, repeat,
                      track_scores, compiled=None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    pad, eos = model.cfg.text.pad_id, model.cfg.text.eos_id
    rows = visual_tokens.shape[0] * repeat
    step = _Stepper(model, visual_tokens, len(prefix) + max_new_tokens, use_cache, repeat=repeat, compiled=compiled)
    seq = _start(model, rows, prefix, visual_tokens.device)
    first_new = seq.shape[1]
    done = torch.zeros(rows, dtype=torch.bool, device=seq.device)
    scores = torch.zeros(rows, device=seq.device) if track_scores else None
    counts = torch.zeros(rows, dtype=torch.long, device=seq.device) if track_scores else None
    for t in range(max_new_tokens):
        logits = step(seq)
        processed = processors(seq, logits, t)
        nxt = processed.argmax(-1) if sample is None else sample(processed)
        nxt = nxt.masked_fill(done, pad)
        if track_scores:
            live = ~done
            scores += torch.where(live, F.log_softmax(logits, -1).gather(1, nxt[:, None])[:, 0], 0.0)
            counts += live
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return seq[:, first_new:], scores, counts


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator) -> Tensor:
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _beam_search(model, visual_tokens, prefix, max_new_tokens, processors, K, n_return, length_penalty,
                 use_cache, compiled=None) -> tuple[Tensor, Tensor, Tensor]:
    """Batched beam search. Beam scores are summed (processed) log-probabilities; finished
    hypotheses are ranked by score / length**length_penalty. A row stops when it holds K finished
    hypotheses that no running beam can beat (the standard heuristic), or at max_new_tokens. The
    raw log-likelihood of every beam is carried alongside for the returned scores."""
    pad, eos = model.cfg.text.pad_id, model.cfg.text.eos_id
    B, device = visual_tokens.shape[0], visual_tokens.device
    step = _Stepper(model, visual_tokens, len(prefix) + max_new_tokens, use_cache, repeat=K, compiled=compiled)
    seq = _start(model, B * K, prefix, device)
    first_new = seq.shape[1]
    beam_scores = torch.zeros(B, K, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    raw_scores = torch.zeros(B, K, device=device)
    finished: list[list[tuple[float, Tensor, float]]] = [[] for _ in range(B)]
    row_done = [False] * B
    offsets = (torch.arange(B, device=device) * K)[:, None]
    for t in range(max_new_tokens):
        raw = F.log_softmax(step(seq), dim=-1)  # [B*K, V]
        logprobs = processors(seq, raw, t)
        V = logprobs.shape[-1]
        cand = (beam_scores.view(-1, 1) + logprobs).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # at most K of these end in EOS
        src_beam, tok = top_idx // V, top_idx % V
        top_raw = raw_scores.gather(1, src_beam) + raw.view(B, K * V).gather(1, top_idx)
        is_eos = tok == eos
        # Finished hypotheses: EOS candidates ranked within the top K.
        for b, r in (is_eos[:, :K]).nonzero().tolist():
            if row_done[b] or top_scores[b, r].item() == float("-inf"):
                continue
            hyp = torch.cat([seq[b * K + src_beam[b, r], first_new:], seq.new_tensor([eos])])
            _add_hypothesis(finished[b], float(top_scores[b, r]) / (t + 1) ** length_penalty, hyp,
                            float(top_raw[b, r]), K)
        # Running beams: the best K candidates that do not end in EOS.
        keep = ~is_eos & ((~is_eos).cumsum(1) <= K)
        next_beam = src_beam[keep].view(B, K)
        next_tok = tok[keep].view(B, K)
        beam_scores = top_scores[keep].view(B, K)
        raw_scores = top_raw[keep].view(B, K)
        index = (offsets + next_beam).view(-1)
        seq = torch.cat([seq[index], next_tok.view(-1, 1)], dim=1)
        step.reorder(index)
        best_running = (beam_scores.max(1).values / (t + 1) ** length_penalty).tolist()
        for b in range(B):
            if not row_done[b] and len(finished[b]) == K and finished[b][-1][0] >= best_running[b]:
                row_done[b] = True
        if all(row_done):
            break
    n = seq.shape[1] - first_new
    for b in range(B):  # rows still running at the length limit: their beams compete too
        if not row_done[b]:
            for k in range(K):
                _add_hypothesis(finished[b], float(beam_scores[b, k]) / n ** length_penalty, seq[b * K + k, first_new:],
                                float(raw_scores[b, k]), K)
    best = [h for b in range(B) for h in finished[b][:n_return]]
    out = torch.full((len(best), max(len(h[1]) for h in best)), pad, dtype=torch.long, device=device)
    for i, (_, tokens, _) in enumerate(best):
        out[i, :len(tokens)] = tokens
    scores = torch.tensor([h[2] for h in best], device=device)
    counts = torch.tensor([len(h[1]) for h in best], device=device)
    return out, scores, counts


def _add_hypothesis(hyps: list[tuple[float, Tensor, float]], score: float, tokens: Tensor, raw: float, K: int) -> None:
    """Keep the K best (rank score, tokens, raw log-likelihood), sorted best first."""
    hyps.append((score, tokens.clone(), raw))
    hyps.sort(key=lambda h: h[0], reverse=True)
    del hyps[K:]


def _open_clip_beam_search(model, visual_tokens, prefix, max_new_tokens, processors, K, n_return, length_penalty,
                           use_cache, compiled=None) -> tuple[Tensor, Tensor, Tensor]:
    """open_clip's CoCa beam search (``generate(generation_type="beam_search")``, which runs
    transformers' ``BeamSearchScorer``), with the KV cache. It differs from ``_beam_search`` in
    three ways, all reproduced: beam scores sum the processed raw logits, not log-probabilities; a
    hypothesis's length counts the start token; a row is done when it holds K finished hypotheses
    and its worst beats the best of this step's 2K candidates over the current length. open_clip's
    ``num_beam_groups`` apply no diversity penalty, so its groups are identical searches: its
    ``num_beams=6, num_beam_groups=3`` is ``K=2`` here. Returned scores are raw log-likelihoods."""
    pad, eos = model.cfg.text.pad_id, model.cfg.text.eos_id
    B, device = visual_tokens.shape[0], visual_tokens.device
    step = _Stepper(model, visual_tokens, len(prefix) + max_new_tokens, use_cache, repeat=K, compiled=compiled)
    seq = _start(model, B * K, prefix, device)
    first_new = seq.shape[1]
    beam_scores = torch.full((B, K), -1e9, device=device)
    beam_scores[:, 0] = 0  # one live beam at first: the others would repeat it
    raw_scores = torch.zeros(B, K, device=device)
    hyps: list[list[tuple]] = [[] for _ in range(B)]  # (score, tokens, raw, ended with EOS), as added
    worst = [1e9] * B
    done = [False] * B

    def add(b: int, score: float, tokens: Tensor, raw: float, length: int, ended: bool) -> None:
        """transformers' ``BeamHypotheses.add``: keep the K best by score / length**penalty."""
        score = score / length ** length_penalty
        if len(hyps[b]) < K or score > worst[b]:
            hyps[b].append((score, tokens.clone(), raw, ended))
            if len(hyps[b]) > K:
                ranked = sorted((h[0], i) for i, h in enumerate(hyps[b]))
                del hyps[b][ranked[0][1]]
                worst[b] = ranked[1][0]
            else:
                worst[b] = min(score, worst[b])

    for t in range(max_new_tokens):
        logits = step(seq)                                  # [B*K, V] raw, fp32
        processed = processors(seq, logits, t)
        V = processed.shape[-1]
        top_scores, top_idx = (beam_scores.view(-1, 1) + processed).view(B, K * V).topk(2 * K, dim=1)
        top_raw = raw_scores.view(-1, 1) + F.log_softmax(logits, -1)
        top_raw = top_raw.view(B, K * V).gather(1, top_idx)
        src, tok = top_idx // V, top_idx % V
        length = seq.shape[1] + 1  # with the token chosen now (and the start token)
        scores_h, tok_h, src_h, raw_h = top_scores.tolist(), tok.tolist(), src.tolist(), top_raw.tolist()
        next_scores = torch.zeros(B, K, device=device)
        next_tok = torch.full((B, K), pad, dtype=torch.long, device=device)
        next_src = torch.zeros(B, K, dtype=torch.long, device=device)
        next_raw = torch.zeros(B, K, device=device)
        for b in range(B):
            if done[b]:  # finished rows carry pad; their beams are never read again
                continue
            j = 0
            for rank in range(2 * K):
                if tok_h[b][rank] == eos:
                    if rank < K:  # only an end among the K best candidates finishes a hypothesis
                        add(b, scores_h[b][rank], seq[b * K + src_h[b][rank], first_new:], raw_h[b][rank], length, True)
                else:
                    next_scores[b, j], next_tok[b, j] = scores_h[b][rank], tok_h[b][rank]
                    next_src[b, j], next_raw[b, j] = src_h[b][rank], raw_h[b][rank]
                    j += 1
                if j == K:
                    break
            done[b] = len(hyps[b]) == K and worst[b] >= max(scores_h[b]) / length ** length_penalty
        index = (torch.arange(B, device=device)[:, None] * K + next_src).view(-1)
        seq = torch.cat([seq[index], next_tok.view(-1, 1)], dim=1)
        step.reorder(index)
        beam_scores, raw_scores = next_scores, next_raw
        if all(done):
            break
    for b in range(B):  # rows still running at the length limit: their beams compete too
        if not done[b]:
            for k in range(K):
                add(b, float(beam_scores[b, k]), seq[b * K + k, first_new:], float(raw_scores[b, k]), seq.shape[1], False)
    best = []
    for b in range(B):
        ranked = sorted(hyps[b], key=lambda h: h[0])  # stable: of equal scores the later added wins, as in transformers
        for _, tokens, raw, ended in ranked[::-1][:n_return]:
            best.append((torch.cat([tokens, tokens.new_tensor([eos])]) if ended else tokens, raw))
    out = torch.full((len(best), max(len(h[0]) for h in best)), pad, dtype=torch.long, device=device)
    for i, (tokens, _) in enumerate(best):
        out[i, :len(tokens)] = tokens
    scores = torch.tensor([h[1] for h in best], device=device)
    counts = torch.tensor([len(h[0]) for h in best], device=device)
    return out, scores, counts

"""Our towers against the reference implementations, with the same (random) weights, in fp32."""

import pytest
import torch

import coca
from coca.convert import from_hf_t5, from_open_clip_vit

transformers = pytest.importorskip("transformers")

FP32_U = 2.0 ** -24  # fp32's unit roundoff: 24 significant bits, round to nearest


def assert_same_fp32_computation(ours, ref, depth: int, inner: int):
    """``ours`` and ``ref`` compute the same function in fp32, summing in orders the CPU's kernels
    choose. A dot product of ``inner`` terms summed in another order moves by about
    u * sqrt(inner) of its terms' scale (independent roundings add as a random walk), and ``depth``
    such operations stand in series, so the outputs agree to 4 u sqrt(inner * depth) of the
    output's largest magnitude, at 4 standard deviations. The bound scales with the output, not
    with each element: an element near 0 is a sum of large terms and carries their rounding.
    Measured: 4e-7 of the scale, with and without AVX-512; the bound is 30x that here, while a real
    error (a wrong bucket, a missing scale) moves outputs by 1e-2 and more."""
    tol = 4 * FP32_U * (inner * depth) ** 0.5 * ref.abs().max().item()
    torch.testing.assert_close(ours, ref, atol=tol, rtol=0)


# Operations in series, per layer: the norm, q/k/v, scores, their softmax times v, the output
# projection (5 per attention), and the gated MLP's three projections. The widest sum is d_ff.
T5_INNER = 96
T5_ENCODER_DEPTH = 3 * (1 + 5 + 1 + 3) + 1
T5_DECODER_DEPTH = 2 * (1 + 5 + 1 + 5 + 1 + 3) + 1 + 1  # + the final norm and the LM head


def make_hf_t5(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=300, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=3, num_decoder_layers=2,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)
    kw.update(overrides)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()
    # HF initialises norms to 1 and relative biases tiny; randomise them so every weight is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "relative_attention_bias" in name:
                p.normal_(1.0 if "layer_norm" in name else 0.0, 0.5)
    return model


def padded_tokens(B=3, L=40, vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (B, L), generator=g)
    for b, n in enumerate([L, L // 2, 5][:B]):  # rows of different real lengths
        tokens[b, n - 1] = 1
        tokens[b, n:] = 0
    return tokens


@torch.no_grad()
def test_t5_encoder_matches_hf():
    hf = make_hf_t5()
    encoder, _ = from_hf_t5(hf)
    tokens = padded_tokens()
    mask = tokens != 0
    ref = hf.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
    ours = encoder(tokens)
    # padded positions are never used; compare real tokens only
    assert_same_fp32_computation(ours[mask], ref[mask], T5_ENCODER_DEPTH, T5_INNER)


@torch.no_grad()
def test_t5_encoder_matches_hf_past_max_distance():
    # sequences longer than the 128-position max distance exercise the log-spaced buckets' clamp
    hf = make_hf_t5(relative_attention_max_distance=16, relative_attention_num_buckets=8)
    encoder, _ = from_hf_t5(hf, context_length=77)
    tokens = torch.randint(3, 300, (2, 60))
    assert_same_fp32_computation(encoder(tokens), hf.encoder(input_ids=tokens).last_hidden_state, T5_ENCODER_DEPTH, T5_INNER)


@torch.no_grad()
def test_t5_decoder_matches_hf_logits():
    hf = make_hf_t5()
    _, decoder = from_hf_t5(hf)
    visual_tokens = torch.randn(3, 17, 64)
    tokens = padded_tokens(L=30)
    ref = hf(encoder_outputs=(visual_tokens,), decoder_input_ids=tokens).logits
    assert_same_fp32_computation(decoder(tokens, visual_tokens), ref, T5_DECODER_DEPTH, T5_INNER)


@torch.no_grad()
def test_t5_decoder_cache_matches_full_pass():
    hf = make_hf_t5()
    _, decoder = from_hf_t5(hf)
    visual_tokens = torch.randn(2, 9, 64)
    tokens = torch.randint(3, 300, (2, 12))
    full = decoder(tokens, visual_tokens)
    cache = decoder.new_cache(visual_tokens, max_len=12)
    prefix = decoder(tokens[:, :5], cache=cache)  # prefill several positions, then one at a time
    steps = [decoder(tokens[:, i:i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat([prefix] + steps, dim=1), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_shared_embedding_after_conversion():
    encoder, decoder = from_hf_t5(make_hf_t5())
    assert encoder.embed_tokens is decoder.embed_tokens


def test_original_t5_is_rejected_with_reason():
    hf = make_hf_t5(feed_forward_proj="relu", tie_word_embeddings=True)
    with pytest.raises(coca.config.ConfigError, match="gated-gelu"):
        from_hf_t5(hf)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@torch.no_grad()
def test_vit_matches_open_clip(act):
    pytest.importorskip("open_clip")
    from open_clip.transformer import QuickGELU
    from open_clip.transformer import VisionTransformer as OCViT
    torch.manual_seed(0)
    ref = OCViT(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=3.0, output_dim=48,
                act_layer=QuickGELU if act == "quick_gelu" else torch.nn.GELU, output_tokens=True).eval()
    with torch.no_grad():  # open_clip zero/one-initialises norms and biases; randomise everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = from_open_clip_vit(ref)
    assert ours.cfg.act == act
    images = torch.randn(2, 3, 32, 32)
    pooled, tokens = ref(images)
    x = ours(images)
    assert x.shape == (2, 1 + 16, 64)
    # 3 layers of norm, attention (5) and a 2-projection MLP after the patch embedding (3 x 8 x 8 = 192 terms)
    depth = 1 + 1 + 3 * (1 + 5 + 1 + 2) + 1
    assert_same_fp32_computation(x[:, 1:], tokens, depth, 192)
    assert_same_fp32_computation(x[:, 0] @ ref.proj, pooled, depth + 1, 192)


def _hf_decoder_pair(seed=3):
    """An HF T5 with confident predictions and reachable EOS (so rows end at different steps), our
    decoder converted from it, a shim exposing what ``coca.generation.decode`` needs, and visual tokens."""
    from types import SimpleNamespace
    hf = make_hf_t5(seed=seed, vocab_size=60)
    with torch.no_grad():
        hf.lm_head.weight.mul_(3.0)
        hf.lm_head.weight[1] += 0.5 * hf.lm_head.weight[7]
    _, decoder = from_hf_t5(hf)
    shim = SimpleNamespace(cfg=SimpleNamespace(text=decoder.cfg), text_decoder=decoder)
    visual = torch.randn(6, 11, 64, generator=torch.Generator().manual_seed(5))
    return hf, shim, visual


def _hf_generate(hf, visual, prefix=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutput
    start = torch.zeros(visual.shape[0], 1, dtype=torch.long)  # HF repeats it per returned sequence
    if prefix is not None:
        start = torch.cat([start, prefix.expand(visual.shape[0], -1)], 1)
    out = hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=visual), decoder_input_ids=start,
                      do_sample=False, early_stopping=False, decoder_start_token_id=0, eos_token_id=1,
                      pad_token_id=0, **kwargs)
    return out[:, 1:]


def _until_eos(rows):  # HF fills finished beams with EOS, we with pad: compare up to EOS
    return [r[: r.index(1) + 1] if 1 in r else r for r in rows.tolist()]


@pytest.mark.parametrize("num_beams, length_penalty", [(1, 1.0), (3, 1.0), (4, 0.6), (4, 2.0)])
@torch.no_grad()
def test_generation_matches_hf_generate(num_beams, length_penalty):
    """Our greedy and beam search (with KV cache) against HF ``generate`` on the same T5 decoder."""
    from coca.generation import decode
    hf, shim, visual = _hf_decoder_pair()
    ref = _hf_generate(hf, visual, num_beams=num_beams, max_new_tokens=20, length_penalty=length_penalty)
    ours = decode(shim, visual, strategy="beam", num_beams=num_beams, max_new_tokens=20, length_penalty=length_penalty)
    assert len({len(r) for r in _until_eos(ref)}) > 1  # rows end at different steps
    assert _until_eos(ours) == _until_eos(ref)


@pytest.fixture(scope="module")
def varied_decoder():
    """An HF T5 whose outputs are long and varied: a 24-token vocabulary, no EOS bias and no
    sharpening, so EOS ends rows at many different steps and beam search often disagrees with
    greedy; 16 rows of visual tokens."""
    from types import SimpleNamespace
    hf = make_hf_t5(seed=11, vocab_size=24)
    _, decoder = from_hf_t5(hf)
    shim = SimpleNamespace(cfg=SimpleNamespace(text=decoder.cfg), text_decoder=decoder)
    return hf, shim, torch.randn(16, 11, 64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("num_beams", [2, 3, 5])
@torch.no_grad()
def test_beam_search_matches_hf_on_long_varied_outputs(varied_decoder, num_beams):
    """Beam search against HF ``generate`` where it is hard to get right: rows of many lengths,
    beam != greedy in several rows, length penalties that favour short and long hypotheses, and a
    minimum length. (It fails without the early-stopping check, and when finished hypotheses are
    taken from all 2K candidates instead of the top K.)"""
    from coca.generation import decode
    hf, shim, visual = varied_decoder
    greedy = _until_eos(decode(shim, visual, strategy="greedy", max_new_tokens=24))
    for length_penalty in (0.6, 1.0, 2.0):
        for min_new in (0, 6):
            kw = dict(num_beams=num_beams, max_new_tokens=24, min_new_tokens=min_new, length_penalty=length_penalty)
            ref = _until_eos(_hf_generate(hf, visual, **kw))
            ours = _until_eos(decode(shim, visual, strategy="beam", **kw))
            assert ours == ref, kw
            assert len({len(r) for r in ref}) >= 2 and min(len(r) for r in ref) >= min_new  # varied, min length held
            if min_new == 0:
                assert sum(a != b for a, b in zip(ref, greedy)) >= 2, kw  # beam search is not greedy here


@pytest.mark.parametrize("controls", [dict(repetition_penalty=1.8), dict(repetition_penalty=0.7),
                                      dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1),
                                      dict(repetition_penalty=1.3, no_repeat_ngram_size=3)])
@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_decoding_controls_match_hf_generate(controls, num_beams):
    """Repetition penalty and n-gram blocking give HF's tokens, greedy and in beam search, and with
    a prefix (HF: decoder_input_ids = start + prefix), with and without the KV cache."""
    from coca.generation import decode
    hf, shim, visual = _hf_decoder_pair(seed=4)
    plain = decode(shim, visual, strategy="beam", num_beams=num_beams, max_new_tokens=16, min_new_tokens=16)
    for prefix in (None, torch.tensor([7, 9, 7])):
        ref = _hf_generate(hf, visual, prefix=prefix, num_beams=num_beams, max_new_tokens=16, **controls)
        for use_cache in (True, False):
            ours = decode(shim, visual, prefix=prefix, strategy="beam", num_beams=num_beams, max_new_tokens=16,
                          use_cache=use_cache, **controls)
            assert _until_eos(ours) == _until_eos(ref), (prefix, use_cache)
    # the controls really changed what was decoded (a repetition penalty acts on log-probabilities in
    # HF's beam search, where it can leave a confident repeat in place: only checked greedy there)
    if num_beams > 1 and "no_repeat_ngram_size" not in controls:
        return
    changed = decode(shim, visual, strategy="beam", num_beams=num_beams, max_new_tokens=16, min_new_tokens=16,
                     **controls)
    assert not torch.equal(changed, plain)


@torch.no_grad()
def test_logits_processors_equal_hf_processors():
    from transformers import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    from coca.generation import apply_repetition_penalty, ban_repeated_ngrams
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 6, (5, 12), generator=g)  # a small alphabet: many repeats and n-grams
    scores = torch.randn(5, 10, generator=g) * 3
    for penalty in (0.5, 1.2, 3.0):
        torch.testing.assert_close(apply_repetition_penalty(seq, scores, penalty),
                                   RepetitionPenaltyLogitsProcessor(penalty)(seq, scores.clone()), rtol=0, atol=0)
    for n in (1, 2, 3, 4, 13, 14):
        ours = ban_repeated_ngrams(seq, scores, n)
        ref = NoRepeatNGramLogitsProcessor(n)(seq, scores.clone())
        assert torch.equal(ours.isinf(), ref.isinf()), n
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert ban_repeated_ngrams(seq, scores, 2).isinf().any()


@pytest.mark.parametrize("num_return_sequences", [2, 4])
@torch.no_grad()
def test_beam_num_return_sequences_matches_hf(num_return_sequences):
    from coca.generation import decode
    hf, shim, visual = _hf_decoder_pair()
    ref = _hf_generate(hf, visual, num_beams=4, max_new_tokens=12, num_return_sequences=num_return_sequences)
    ours = decode(shim, visual, strategy="beam", num_beams=4, max_new_tokens=12,
                  num_return_sequences=num_return_sequences)
    assert ours.shape[0] == 6 * num_return_sequences
    assert _until_eos(ours) == _until_eos(ref)

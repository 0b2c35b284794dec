import pytest
import torch

import coca


@pytest.fixture
def peaked():
    """coca-tiny with a sharpened LM head, so decoding makes confident, varied choices, and an EOS
    row copied from a token that greedy decoding emits in some rows at different steps, so rows end
    at different lengths (random weights alone never pick EOS)."""
    torch.manual_seed(0)
    model = coca.create_model("coca-tiny").eval()
    with torch.no_grad():
        W = model.text_decoder.lm_head.weight
        W.mul_(8.0)
        ids = model.generate(images_for(model, B=6), max_new_tokens=30, min_new_tokens=30).tolist()
        first = {}
        for row in ids:
            for tok in set(row):
                first.setdefault(tok, set()).add(row.index(tok))
        rows_with = {tok: sum(tok in row for row in ids) for tok in first}
        tok = max((t for t in first if 2 <= rows_with[t] < len(ids)), key=lambda t: len(first[t]))
        W[model.cfg.text.eos_id] = W[tok] * 1.02
    return model


def images_for(model, B=4, seed=0):
    s = model.cfg.vision.image_size
    return torch.randn(B, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_equals_uncached(peaked, strategy):
    images = images_for(peaked, B=5)
    a = peaked.generate(images, max_new_tokens=24, strategy=strategy, num_beams=3)
    b = peaked.generate(images, max_new_tokens=24, strategy=strategy, num_beams=3, use_cache=False)
    assert torch.equal(a, b)
    # the test is only meaningful if rows really differ and some end early
    assert len({tuple(r.tolist()) for r in a}) > 1


def test_cached_equals_uncached_full_length(tiny):
    images = images_for(tiny)
    for strategy in ("greedy", "beam"):
        a = tiny.generate(images, max_new_tokens=40, min_new_tokens=40, strategy=strategy)
        b = tiny.generate(images, max_new_tokens=40, min_new_tokens=40, strategy=strategy, use_cache=False)
        assert a.shape == (4, 40) and torch.equal(a, b)


def test_per_row_eos_then_padding(peaked):
    out = peaked.generate(images_for(peaked, B=6), max_new_tokens=30)
    eos, pad = peaked.cfg.text.eos_id, peaked.cfg.text.pad_id
    ended = 0
    for row in out.tolist():
        if eos in row:
            i = row.index(eos)
            assert all(t == pad for t in row[i + 1:])
            ended += 1
        assert pad not in row[: row.index(eos) if eos in row else len(row)]
    assert ended >= 1


def test_min_and_max_new_tokens(peaked):
    images = images_for(peaked)
    out = peaked.generate(images, max_new_tokens=12, min_new_tokens=12)
    assert out.shape == (4, 12) and (out != peaked.cfg.text.eos_id).all()
    assert peaked.generate(images, max_new_tokens=3).shape[1] <= 3


def test_batched_equals_one_by_one(peaked):
    images = images_for(peaked, B=3)
    batched = peaked.generate(images, max_new_tokens=15, strategy="beam", num_beams=3)
    for i in range(3):
        single = peaked.generate(images[i:i + 1], max_new_tokens=15, strategy="beam", num_beams=3)
        row = batched[i, :single.shape[1]]
        assert torch.equal(row, single[0]) and (batched[i, single.shape[1]:] == 0).all()


def test_beam_with_one_beam_is_greedy(peaked):
    images = images_for(peaked)
    assert torch.equal(peaked.generate(images, strategy="beam", num_beams=1, max_new_tokens=10),
                       peaked.generate(images, max_new_tokens=10))


def test_sampling_seeded_and_filtered(peaked):
    images = images_for(peaked)
    kw = dict(strategy="sample", max_new_tokens=10, min_new_tokens=10)
    a = peaked.generate(images, seed=1, **kw)
    assert torch.equal(a, peaked.generate(images, seed=1, **kw))
    assert not torch.equal(a, peaked.generate(images, seed=2, temperature=5.0, **kw))
    greedy = peaked.generate(images, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(peaked.generate(images, seed=3, top_k=1, **kw), greedy)
    assert torch.equal(peaked.generate(images, seed=3, top_p=1e-6, **kw), greedy)
    assert torch.equal(peaked.generate(images, seed=3, top_k=5, top_p=0.9, use_cache=False, **kw),
                       peaked.generate(images, seed=3, top_k=5, top_p=0.9, **kw))


def test_top_k_restricts_support(peaked):
    images = images_for(peaked, B=2)
    _, visual = peaked.encode_image_tokens(images)
    first_logits = peaked.text_decoder(torch.zeros(2, 1, dtype=torch.long), visual)[:, 0]
    allowed = first_logits.topk(3, dim=-1).indices
    for seed in range(10):
        tok = peaked.generate(images, strategy="sample", top_k=3, seed=seed, max_new_tokens=1, min_new_tokens=1)[:, 0]
        assert all(t in allowed[i] for i, t in enumerate(tok.tolist()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="nucleus"), "strategy"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=200), "context length"),
    (dict(min_new_tokens=40, max_new_tokens=10), "min_new_tokens"),
    (dict(strategy="sample", top_p=1.5), "top_p"),
    (dict(strategy="sample", top_k=0), "top_k"),
    (dict(strategy="sample", temperature=0.0), "temperature"),
    (dict(strategy="beam", num_beams=0), "num_beams"),
])
def test_bad_generation_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(images_for(tiny, B=1), **kwargs)

"""open_clip's CoCa as a second model family: converted random-weight open_clip CoCa models of both
published architectures against open_clip itself on the same weights (embeddings, logits, losses,
generated tokens), its tokenizer against open_clip's, and the converted directory through the
project's API."""

import copy

import pytest
import torch

import coca
from coca.clip_tokenizer import CLIPTokenizer
from coca.losses import CoCaLoss
from coca.convert import OPEN_CLIP_ARCHS, from_open_clip_coca, open_clip_coca_config, open_clip_coca_state

open_clip = pytest.importorskip("open_clip")
from open_clip.coca_model import CoCa as OpenClipCoCa  # noqa: E402


def shrunk(arch: str) -> dict:
    """The architecture's config with fewer layers (and for L-14 a smaller image): the same widths,
    heads and pooler, so every tensor kind and name is exercised, in seconds on a CPU."""
    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    cfg["vision_cfg"]["layers"] = 2
    cfg["text_cfg"]["layers"] = 2
    cfg["multimodal_cfg"]["layers"] = 2
    if arch == "coca_ViT-L-14":
        cfg["vision_cfg"]["image_size"] = 112
    return cfg


def reference(cfg: dict, seed: int = 0) -> OpenClipCoCa:
    torch.manual_seed(seed)
    model = OpenClipCoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"]).eval()
    dec = model.text_decoder  # open_clip leaves its LM head torch.empty
    torch.nn.init.normal_(dec.text_projection, std=dec.width ** -0.5)
    with torch.no_grad():  # a trained temperature; norms and biases away from 1 and 0, so that a swap shows
        model.logit_scale.fill_(4.6)
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


TEXTS = ["a dog on a couch.", "Two cats, asleep in the sun!", "x", "Ünïcödé café — 東京 🐶", "word " * 90]


@pytest.fixture(scope="module", params=list(OPEN_CLIP_ARCHS))
def pair(request):
    arch = request.param
    cfg = shrunk(arch)
    theirs = reference(cfg)
    ours = from_open_clip_coca(theirs.state_dict(), cfg)
    return arch, theirs, ours


def images_for(model, n=3, seed=1):
    s = model.cfg.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_presets_hold_every_tensor_of_the_published_architectures():
    """At full size, on the meta device: open_clip's coca_ViT-B-32 / -L-14 state dicts map onto our
    presets with every name and shape (what `coca convert open-clip` meets in the published files)."""
    for arch, preset in OPEN_CLIP_ARCHS.items():
        cfg = open_clip.get_model_config(arch)
        with torch.device("meta"):
            theirs = OpenClipCoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"])
            ours = coca.create_model(preset, device="meta")
        state = open_clip_coca_state(theirs.state_dict(), ours.cfg)
        expected = {n: tuple(p.shape) for n, p in ours.named_parameters()}
        assert {n: tuple(t.shape) for n, t in state.items()} == expected
        assert open_clip_coca_config(cfg).to_dict() | {"name": preset} == ours.cfg.to_dict()


def test_embeddings_logits_and_losses_equal_open_clip(pair):
    arch, theirs, ours = pair
    tok = open_clip.get_tokenizer(arch)
    images = images_for(ours)
    with torch.no_grad():
        ref = theirs(images, tok(TEXTS[:3]))
        got = ours(images, ours.tokenizer(TEXTS[:3]))
        torch.testing.assert_close(got["image_embeds"], ref["image_features"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["text_embeds"], ref["text_features"], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(ours.tokenizer(TEXTS[:3])), theirs.encode_text(tok(TEXTS[:3])),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=0, atol=1e-5)
        labels = ref["labels"]
        real = labels != 0  # logits at pad labels are never used (and depend on open_clip's pad rows)
        torch.testing.assert_close(got["logits"][real], ref["logits"][real], rtol=0, atol=1e-5)
        assert float(got["logit_scale"]) == pytest.approx(float(ref["logit_scale"]), rel=1e-6)
        loss_ref = open_clip.loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)
        clip_ref, caption_ref = loss_ref(**ref, output_dict=False)
        losses = CoCaLoss(1.0, 1.0, pad_id=0)(got, ours.tokenizer(TEXTS[:3]))
    assert float(losses.contrastive) == pytest.approx(float(clip_ref), abs=1e-5)
    assert float(losses.caption) == pytest.approx(float(caption_ref), abs=1e-5)


def test_short_captions_trimmed_or_not_give_the_same_results(pair):
    """The text tower always runs at full length (the CLS's position and mask depend on it), so a
    batch trimmed to its longest caption, as the trainer trims, changes nothing."""
    _, _, ours = pair
    tokens = ours.tokenizer(TEXTS[:3])
    trimmed = tokens[:, :int((tokens != 0).sum(1).max())]
    images = images_for(ours)
    with torch.no_grad():
        full, short = ours(images, tokens), ours(images, trimmed)
    torch.testing.assert_close(short["text_embeds"], full["text_embeds"], rtol=0, atol=1e-6)
    torch.testing.assert_close(short["logits"], full["logits"][:, :trimmed.shape[1]], rtol=0, atol=1e-5)


def test_cls_mask_setting_is_what_open_clip_computes(pair):
    """``text.cls_mask: correct`` equals open_clip's ``correct_cls_mask=True``, and differs from the
    legacy mask the released weights use."""
    arch, theirs, ours = pair
    fixed = copy.deepcopy(theirs)
    fixed.text.correct_cls_mask = True
    cfg = copy.deepcopy(ours.cfg)
    cfg.text.cls_mask = "correct"
    corrected = coca.create_model(cfg)
    corrected.load_state_dict(ours.state_dict())
    ids = open_clip.get_tokenizer(arch)(TEXTS[:3])
    ours_ids = ours.tokenizer(TEXTS[:3])
    with torch.no_grad():
        torch.testing.assert_close(corrected.eval().encode_text(ours_ids), fixed.encode_text(ids), rtol=0, atol=1e-5)
        assert (corrected.encode_text(ours_ids) - ours.encode_text(ours_ids)).abs().max() > 1e-4


def test_tokenizer_ids_equal_open_clip():
    theirs = open_clip.get_tokenizer("coca_ViT-L-14")
    ours = CLIPTokenizer()
    texts = TEXTS + ["Don't stop; it's 3:45pm & I'm  late...", "&amp;lt;b&amp;gt; html &quot;q&quot;",
                     "<start_of_text> inside", "", "   ", "C'est l'été, ¿qué?", "mojibake: cafÃ©", "tab\tnew\nline",
                     "!!!?!", "12345 6.7e-3", "ÆØÅ æøå ß ﬁ", "emoji 👩‍👩‍👧 flags 🇯🇵", "a" * 400]
    ref = theirs(texts)
    got = ours.encode(texts)
    assert got.shape == (len(texts), 75)
    assert torch.equal(torch.cat([torch.full((len(texts), 1), 49406), got], 1), ref)
    assert ours.decode(got[0]) == "a dog on a couch ."
    assert ours.encode_ids("a dog") == ref[0, 1:3].tolist()


@pytest.fixture(scope="module")
def ending(pair):
    """``ending(strength)``: the pair with <end_of_text> made likely enough that captions end at
    different steps (random weights never choose it): its LM-head column gains the mean decoder
    state's direction, scaled to ``strength`` x the median gap between the top logit and its own."""
    arch, theirs, ours = pair
    images = images_for(ours, n=6, seed=3)
    with torch.no_grad():
        seq = ours.generate(images, max_new_tokens=12)
        h = ours.text_decoder(ours.shift_right(seq), ours.encode_image_tokens(images)[1], return_hidden=True)
        h = h.reshape(-1, h.shape[-1])
        logits = ours.text_decoder.lm_head(h)
        gap = float((logits.max(-1).values - logits[:, 49407]).median())
        direction = h.mean(0) / h.mean(0).square().sum()

    def variant(strength: float):
        changed = copy.deepcopy(theirs)
        with torch.no_grad():
            changed.text_decoder.text_projection[:, 49407] += strength * gap * direction
        return arch, changed, from_open_clip_coca(changed.state_dict(), shrunk(arch)), images
    return variant


def until_end(rows: torch.Tensor) -> list[list[int]]:
    """Each row up to and including its first <end_of_text>."""
    return [row[:row.index(49407) + 1] if 49407 in row else row for row in rows.tolist()]


def test_generation_greedy_equals_open_clip(ending):
    """open_clip's ``generate`` (top_k=1, min_seq_len=5) recomputes every step; ours decodes with
    the KV cache, without it, and compiled: the same tokens. Where open_clip reaches its limit it
    writes <end_of_text> in the last slot; ours returns the caption cut there."""
    arch, theirs, ours, images = ending(0.9)
    with torch.no_grad():
        ref = theirs.generate(images, generation_type="top_k", top_k=1, seq_len=20, min_seq_len=5)[:, 1:]
    ends = [row.index(49407) for row in ref.tolist()]
    assert len(set(ends)) >= 3  # captions ended at several steps
    for options in ({}, {"use_cache": False}, *([{"compile": True}] if arch == "coca_ViT-B-32" else [])):
        got = ours.generate(images, max_new_tokens=19, min_new_tokens=4, **options)
        for row, want, end in zip(until_end(got), until_end(ref), ends):
            assert row == want if end < 18 else row[:18] == want[:18], options  # 18: open_clip's forced end


def test_generation_beam_search_equals_open_clip(ending):
    """``strategy="open_clip_beam"`` against open_clip's default beam search (6 beams in 3 groups,
    which are identical searches of 2) and another shape, tokens identical; finished and
    limit-reached hypotheses both occur."""
    arch, theirs, ours, images = ending(1.15)
    ended = []
    for seq_len, beams, groups, options in ((16, 6, 3, {}), (12, 4, 1, {"use_cache": False})):
        with torch.no_grad():
            ref = theirs.generate(images, generation_type="beam_search", seq_len=seq_len, num_beams=beams,
                                  num_beam_groups=groups)[:, 1:]
        got = ours.generate(images, strategy="open_clip_beam", num_beams=beams // groups,
                            max_new_tokens=seq_len - 1, min_new_tokens=4, **options)
        assert until_end(got) == until_end(ref), (seq_len, options)
        ended += [49407 in row for row in ref.tolist()]
    assert 2 <= sum(ended) < len(ended)  # finished hypotheses and ones stopped at the limit


def test_converted_directory_loads_with_the_project_api(pair, tmp_path):
    arch, theirs, ours = pair
    ours.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["bpe_simple_vocab_16e6.txt.gz", "config.json",
                                                                   "model.safetensors"]
    loaded = coca.load(tmp_path / "m")
    assert type(loaded).__name__ == "OpenCLIPCoCa" and isinstance(loaded.tokenizer, CLIPTokenizer)
    images = images_for(ours, n=2)
    tokens = loaded.tokenizer(TEXTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), ours.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), ours.encode_text(tokens), rtol=0, atol=0)
    scores = loaded.score(images, tokens)
    assert scores.sum.shape == (2,) and bool(torch.isfinite(scores.sum).all())
    # the score is the teacher-forced caption log-likelihood: open_clip's logits give the same
    with torch.no_grad():
        ref = theirs(images, open_clip.get_tokenizer(arch)(TEXTS[:2]))
    logp = ref["logits"].log_softmax(-1).gather(2, ref["labels"][..., None])[..., 0]
    torch.testing.assert_close(scores.sum, (logp * (ref["labels"] != 0)).sum(1), rtol=0, atol=1e-4)
    beams = loaded.generate(images, strategy="beam", num_beams=3, max_new_tokens=6)
    assert beams.shape[0] == 2
    text = loaded.tokenizer.decode(loaded.generate(images, max_new_tokens=4))
    assert len(text) == 2 and all(isinstance(t, str) for t in text)

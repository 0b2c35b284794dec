"""Packed text towers (``train.pack_text``) against the padded computation on the same weights:
the loss, the text embeddings and every parameter's gradient, with captions of every length
1..77 in one batch; patch dropout's token selection and its training-only use."""

import pytest
import torch

import coca
from coca.config import get_preset
from coca.losses import CoCaLoss
from coca.models.packing import TextPacking


def right_padded(lengths: list[int], width: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(3, vocab, (n,), generator=g)
        tokens[row, n - 1] = 1  # EOS last, as the tokenizer writes it
    return tokens


def test_attention_groups_hold_captions_of_similar_length():
    lengths = [7, 1, 3, 9, 2, 5, 8, 4]
    tokens = right_padded(lengths, 10, 50)
    packing = TextPacking.of(tokens, pad_id=0, buckets=3)
    rows = [g.rows.tolist() for g in packing.groups]
    assert rows == [[1, 2, 4], [0, 5, 7], [3, 6]]  # by length: 1 2 3 | 4 5 7 | 8 9, in batch order
    assert [g.width for g in packing.groups] == [3, 7, 9]
    states = torch.randn(packing.total, 2)
    for g in packing.groups:  # each group's grid holds its captions' packed states, row by row
        grid = g.unpack(states)
        starts = [sum(lengths[:r]) for r in g.rows.tolist()]
        for i, (r, start) in enumerate(zip(g.rows.tolist(), starts)):
            assert torch.equal(grid[i, :lengths[r]], states[start:start + lengths[r]])
            assert not grid[i, lengths[r]:].any()
    rebuilt = torch.zeros_like(states)
    for g in packing.groups:
        rebuilt = g.pack_into(rebuilt, g.unpack(states))
    assert torch.equal(rebuilt, states)


def test_packing_layout_against_a_python_loop():
    tokens = right_padded([3, 1, 5, 2], 8, 50)
    packing = TextPacking.of(tokens, pad_id=0)
    assert packing.width == 5 and packing.total == 11
    expected = [int(t) for row in tokens for t in row if t != 0]
    assert packing.pack(tokens).tolist() == expected
    assert packing.segments.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3]
    states = torch.randn(packing.total, 4)
    grid = packing.unpack(states)
    assert grid.shape == (4, 5, 4) and torch.equal(packing.pack(grid), states)
    assert torch.equal(grid[1, 1:], torch.zeros(4, 4))  # padding stays zero
    means = torch.stack([states[0:3].mean(0), states[3:4].mean(0), states[4:9].mean(0), states[9:11].mean(0)])
    torch.testing.assert_close(packing.mean(states), means)


def model_of(size: str) -> coca.CoCa:
    torch.manual_seed(0)
    if size == "tiny":
        return coca.create_model("coca-tiny")
    cfg = get_preset("coca-tiny").to_dict()  # mid-size: wider, deeper text towers and more heads
    cfg["text"].update(d_model=256, d_kv=32, num_heads=8, d_ff=768, encoder_layers=4, decoder_layers=4, vocab_size=2048)
    cfg["vision"].update(width=192, heads=6, mlp_dim=384, layers=2)
    return coca.create_model(cfg)


def step(model, images, tokens, loss_fn, pack):
    model.zero_grad(set_to_none=True)
    out = model(images, tokens, return_logits=loss_fn.wants_logits, pack_text=pack)
    losses = loss_fn(out, tokens)
    losses.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, out["text_embeds"].detach(), grads


@pytest.mark.parametrize("size, chunk, buckets", [("tiny", 0, 1), ("tiny", 48, 1), ("mid", 0, 1), ("tiny", 48, 3),
                                                 ("mid", 0, 4)])
def test_packed_text_towers_equal_the_padded_ones(size, chunk, buckets):
    """buckets > 1: attention in groups of captions of similar length, each at its own width."""
    model = model_of(size).train()
    t = model.cfg.text
    lengths = list(range(1, t.context_length + 1))  # 1..77, in an order that mixes long and short
    lengths = lengths[::2] + lengths[1::2][::-1]
    if size == "mid":
        lengths = lengths[::3]
    tokens = right_padded(lengths, t.context_length, t.vocab_size)
    s = model.cfg.vision.image_size
    images = torch.randn(len(lengths), 3, s, s, generator=torch.Generator().manual_seed(2))
    loss_fn = CoCaLoss(pad_id=t.pad_id, caption_chunk_tokens=chunk, lm_head_weight=model.text_decoder.lm_head.weight)
    packing = TextPacking.of(tokens, t.pad_id, buckets=buckets)
    assert len(packing.groups) == (0 if buckets == 1 else buckets)
    padded, packed = step(model, images, tokens, loss_fn, False), step(model, images, tokens, loss_fn, packing)
    for part in ("loss", "contrastive", "caption"):
        torch.testing.assert_close(getattr(packed[0], part), getattr(padded[0], part), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-6)
    assert packed[2].keys() == padded[2].keys() and len(padded[2]) == len(list(model.parameters()))
    for name, grad in padded[2].items():
        # fp32 sums over up to B x 77 positions in another order: relative to the tensor's scale
        scale = float(grad.abs().max())
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=name)


@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_flex_packed_attention_equals_the_padded_forward(size):
    """The GPU kernel (FlexAttention over the packed sequence with document masks and the position
    bias as a score modifier): forward only, as FlexAttention has no CPU backward; its gradients
    are checked on a GPU by ``benchmarks/gpu_check.py``."""
    model = model_of(size).train()
    t = model.cfg.text
    lengths = list(range(1, t.context_length + 1))
    lengths = (lengths[::2] + lengths[1::2][::-1])[::3 if size == "mid" else 1]
    tokens = right_padded(lengths, t.context_length, t.vocab_size)
    s = model.cfg.vision.image_size
    images = torch.randn(len(lengths), 3, s, s, generator=torch.Generator().manual_seed(2))
    loss_fn = CoCaLoss(pad_id=t.pad_id, lm_head_weight=model.text_decoder.lm_head.weight)
    with torch.no_grad():
        padded = model(images, tokens, return_logits=True)
        packing = TextPacking.of(tokens, t.pad_id, buckets=4, kernel="flex")
        assert packing.groups == ()
        packed = model(images, tokens, return_logits=True, pack_text=packing)
    rows = torch.cat([padded["logits"][b, :n] for b, n in enumerate(lengths)])
    torch.testing.assert_close(packed["logits"][0], rows, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed["text_embeds"], padded["text_embeds"], rtol=1e-5, atol=1e-6)
    for part in ("loss", "contrastive", "caption"):
        torch.testing.assert_close(getattr(loss_fn(packed, tokens), part), getattr(loss_fn(padded, tokens), part),
                                   rtol=1e-5, atol=1e-6)


def test_flex_packed_attention_refuses_attention_dropout():
    cfg = get_preset("coca-tiny").to_dict()
    cfg["text"]["dropout"] = 0.1
    model = coca.create_model(cfg).train()
    tokens = right_padded([3, 5], 8, model.cfg.text.vocab_size)
    with pytest.raises(ValueError, match="attention dropout"), torch.no_grad():
        model.encode_text(tokens, pack_text=TextPacking.of(tokens, 0, kernel="flex"))
    with pytest.raises(ValueError, match="kernel must be one of"):
        TextPacking.of(tokens, 0, kernel="nested")


def test_packed_attention_setting_picks_a_kernel_the_device_can_train_with():
    from coca.config import ConfigError, TrainConfig
    from coca.train.step import packed_attention_kernel
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert packed_attention_kernel("auto", cpu, 0.0) == packed_attention_kernel("auto", gpu, 0.0) == "groups"
    assert packed_attention_kernel("flex", gpu, 0.0) == "flex"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        packed_attention_kernel("flex", cpu, 0.0)
    with pytest.raises(ConfigError, match="no attention dropout"):
        packed_attention_kernel("flex", gpu, 0.1)
    with pytest.raises(ConfigError, match="train.packed_attention must be"):
        TrainConfig(run_dir="r", packed_attention="nested")


def test_packed_outputs_cover_the_real_tokens_only():
    model = model_of("tiny").eval()
    tokens = right_padded([4, 1, 7], 12, model.cfg.text.vocab_size)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(images, tokens, pack_text=True)
        padded = model(images, tokens)
    assert out["logits"].shape == (1, 12, model.cfg.text.vocab_size)
    assert out["caption_targets"][0].tolist() == [int(x) for x in tokens[tokens != 0]]
    rows = [padded["logits"][b, :n] for b, n in enumerate([4, 1, 7])]
    torch.testing.assert_close(out["logits"][0], torch.cat(rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_text(tokens, pack_text=True), model.encode_text(tokens), rtol=1e-5, atol=1e-6)


def test_packed_bf16_autocast_stays_close_to_padded():
    model = model_of("tiny").train()
    tokens = right_padded([5, 30, 2, 77, 12, 9], 77, model.cfg.text.vocab_size)
    images = torch.randn(6, 3, 64, 64)
    loss_fn = CoCaLoss(pad_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = loss_fn(model(images, tokens), tokens).loss
        packed = loss_fn(model(images, tokens, pack_text=True), tokens).loss
    # bf16 has 8 mantissa bits; the two differ by rounding in a different summation order only
    assert float(packed.detach()) == pytest.approx(float(padded.detach()), rel=2e-2)


# ---------------------------------------------------------------------------- patch dropout

def test_patch_dropout_keeps_the_class_token_and_a_random_share_of_patches():
    from coca.models.vit import drop_patches
    x = torch.arange(17.0)[None, :, None].repeat(3, 1, 2)  # token i holds the value i
    torch.manual_seed(0)
    kept = drop_patches(x, 0.5)
    assert kept.shape == (3, 9, 2)  # class token + 8 of 16 patches
    assert torch.equal(kept[:, 0], x[:, 0])
    for row in kept[:, 1:, 0]:
        assert len(set(row.tolist())) == 8 and row.min() >= 1  # distinct patches, never the class token
    assert not torch.equal(kept[0, 1:], kept[1, 1:])  # each image its own draw
    torch.manual_seed(0)
    assert torch.equal(drop_patches(x, 0.5), kept)  # the generator's state fixes the draw
    assert drop_patches(x, 0.99).shape[1] == 2  # at least one patch


def test_patch_dropout_changes_training_forward_only():
    model = model_of("tiny").train()
    images = torch.randn(2, 3, 64, 64)
    tokens = right_padded([3, 5], 8, model.cfg.text.vocab_size)
    torch.manual_seed(1)
    a = model(images, tokens, patch_dropout=0.5)["image_embeds"]
    b = model(images, tokens)["image_embeds"]
    assert not torch.allclose(a, b)
    torch.manual_seed(1)
    torch.testing.assert_close(model(images, tokens, patch_dropout=0.5)["image_embeds"], a)
    assert model.visual(images, 0.75).shape[1] == 1 + 4  # 16 patches at 64 px / 16


def test_patch_dropout_settings_are_checked():
    from coca.config import ConfigError, load_run_config
    for bad in ("train.patch_dropout=1.0", "train.patch_dropout=-0.1", "train.patch_dropout_until=1.5"):
        with pytest.raises(ConfigError, match="patch_dropout"):
            load_run_config(None, [bad])


def test_patch_dropout_stops_for_the_unmasked_tuning_steps():
    from types import SimpleNamespace
    from coca.config import load_run_config
    from coca.train.loop import Trainer
    tc = load_run_config(None, ["train.steps=20", "train.patch_dropout=0.5", "train.patch_dropout_until=0.75"]).train
    parts = SimpleNamespace(device=torch.device("cpu"), packed_attention="groups")
    model = SimpleNamespace(model=SimpleNamespace(family="t5"))
    options = [Trainer.step_options(SimpleNamespace(tc=tc, cfg=model, parts=parts, progress=SimpleNamespace(step=s)))
               for s in range(20)]  # progress.step = steps done before the one being taken
    assert [o.patch_dropout for o in options] == [0.5] * 15 + [0.0] * 5
    assert all(o.pack_text and o.attention_buckets == 4 for o in options)


# ---------------------------------------------------------------------------- coca plan

def test_plan_costs_packed_text_and_patch_dropout(capsys):
    from coca.cli import main
    from coca.config import load_run_config
    from coca.models.coca import create_model
    from coca.plan import plan
    from coca.summary import forward_flops
    cfg = lambda *s: load_run_config(None, ["data.batch_size=8", *s])  # noqa: E731  coca-tiny
    model = create_model("coca-tiny", device="meta")
    padded = plan(cfg("train.pack_text=false"), 1, 80, 312, 0.5)
    assert padded["forward_flops_per_sample"] == pytest.approx(forward_flops(model)["total"])
    packed = plan(cfg(), 1, 80, 312, 0.5, mean_caption_tokens=21.5)
    at = lambda n, p=0.0: forward_flops(model, 1, n, p)  # noqa: E731
    assert at(77)["total"] == pytest.approx(forward_flops(model)["total"])
    # between whole lengths the FLOPs are interpolated; the text towers cost ~ their tokens
    assert packed["forward_flops_per_sample"] == pytest.approx((at(21)["total"] + at(22)["total"]) / 2)
    assert at(22)["text_encoder"] / at(77)["text_encoder"] == pytest.approx(22 / 77, rel=0.1)
    assert at(22)["visual"] == at(77)["visual"]
    assert packed["activations_bytes"] < padded["activations_bytes"]
    assert packed["step_time_s"] < padded["step_time_s"]
    # patch dropout 0.5 for 80% of the steps: the vision tower on 1 + 8 of its 1 + 16 tokens there
    half = at(4, 0.5)
    v = model.cfg.vision
    patch_embedding = 2 * (v.image_size // v.patch_size) ** 2 * 3 * v.patch_size ** 2 * v.width  # all patches
    assert (half["visual"] - patch_embedding) / (at(4)["visual"] - patch_embedding) == pytest.approx(9 / 17, rel=0.05)
    dropped = plan(cfg("train.patch_dropout=0.5", "train.patch_dropout_until=0.8"), 1, 80, 312, 0.5,
                   mean_caption_tokens=4)
    assert dropped["forward_flops_per_sample"] == pytest.approx(0.8 * half["total"] + 0.2 * at(4)["total"])
    # memory is the largest step's: the unmasked tuning, unless masking lasts the whole run
    assert dropped["activations_bytes"] == plan(cfg(), 1, 80, 312, 0.5, mean_caption_tokens=4)["activations_bytes"]
    whole = plan(cfg("train.patch_dropout=0.5", "train.patch_dropout_until=1.0"), 1, 80, 312, 0.5,
                 mean_caption_tokens=4)
    assert whole["activations_bytes"] < dropped["activations_bytes"]
    assert main(["plan", "--mean-caption-tokens", "12", "--set", "train.patch_dropout=0.5"]) == 0
    assert "packed text towers at 12 tokens per caption" in capsys.readouterr().out
    for bad in ("0", "78"):
        assert main(["plan", "--mean-caption-tokens", bad]) == 2
    with pytest.raises(Exception, match="mean_caption_tokens"):
        load_run_config(None, ["data.mean_caption_tokens=0"])


def test_grad_cache_drops_the_same_patches_in_both_passes(monkeypatch):
    """GradCache's first pass (embeddings, no graph) and its second (with a graph) must drop the
    same patches of each micro-batch, or the cached embeddings' gradients belong to other inputs."""
    import coca.models.vit as vit
    from coca.train.distributed import World
    from coca.train.engines import build_engine
    from coca.train.step import StepOptions
    drawn, original = [], vit.drop_patches

    def recording(x, ratio):
        out = original(x, ratio)
        drawn.append(out.detach().clone())
        return out
    monkeypatch.setattr(vit, "drop_patches", recording)
    model = model_of("tiny").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    engine = build_engine("single", model, optimizer, scheduler, torch.device("cpu"), World())
    tokens = right_padded([3, 9, 5, 2], 12, model.cfg.text.vocab_size)
    images = torch.randn(4, 3, 64, 64)
    micro = list(zip(images.chunk(2), tokens.chunk(2)))
    engine.run_step(micro, CoCaLoss(pad_id=0), StepOptions(pack_text=True, patch_dropout=0.5))
    assert len(drawn) == 4  # two micro-batches, each in both passes
    for first, second in zip(drawn[:2], drawn[2:]):
        assert torch.equal(first, second)
    assert not torch.equal(drawn[0], drawn[1])

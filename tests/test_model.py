import json
import math

import pytest
import torch
import torch.nn.functional as F

import coca
from coca.config import ConfigError


def batch(model, B=3, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.vision.image_size
    images = torch.randn(B, 3, s, s, generator=g)
    tokens = torch.randint(3, model.cfg.text.vocab_size, (B, L), generator=g)
    for b in range(B):
        n = L - 3 * b
        tokens[b, n - 1], tokens[b, n:] = 1, 0
    return images, tokens


def test_presets_registered():
    names = coca.list_models()
    assert {"coca-large-v2", "coca-base", "coca-tiny"} <= set(names)


def test_large_preset_shapes_on_meta_device():
    model = coca.create_model("coca-large-v2", device="meta")
    t, v = model.cfg.text, model.cfg.vision
    assert (t.d_model, t.encoder_layers, t.decoder_layers, t.num_heads, t.d_kv, t.d_ff, t.vocab_size,
            t.context_length, t.relative_buckets, t.relative_max_distance) == (1024, 24, 24, 16, 64, 2816, 32000, 77, 32, 128)
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_dim) == (224, 14, 1024, 24, 16, 4096)
    assert model.cfg.n_gen_queries == 256
    assert sum(p.numel() for p in model.parameters()) == 1_096_310_785
    assert all(p.is_meta for p in model.parameters())


def test_create_model_accepts_config_object_and_dict():
    cfg = coca.config.get_preset("coca-tiny")
    assert coca.create_model(cfg, device="meta").cfg.name == "coca-tiny"
    assert coca.create_model(cfg.to_dict(), device="meta").cfg.text.d_model == cfg.text.d_model


def test_unknown_preset_and_keys_are_clear_errors():
    with pytest.raises(ConfigError, match="did you mean 'coca-large-v2'"):
        coca.create_model("coca-large")
    d = coca.config.get_preset("coca-tiny").to_dict()
    d["text"]["d_modle"] = 3
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        coca.create_model(d)
    d = coca.config.get_preset("coca-tiny").to_dict()
    d["vision"]["patch_size"] = 7
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        coca.create_model(d)


def test_forward_outputs(tiny):
    images, tokens = batch(tiny)
    out = tiny(images, tokens)
    B, L = tokens.shape
    assert out["image_embeds"].shape == out["text_embeds"].shape == (B, tiny.cfg.embed_dim)
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(out["text_embeds"].norm(dim=-1), torch.ones(B))
    assert out["logits"].shape == (B, L, tiny.cfg.text.vocab_size)
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    assert tiny.visual(images).shape == (B, 1 + tiny.cfg.vision.num_patches, tiny.cfg.vision.width)
    assert tiny.text_encoder(tokens).shape == (B, L, tiny.cfg.text.d_model)


def test_logit_scale_clamped_at_100(tiny):
    with torch.no_grad():
        tiny.logit_scale.fill_(math.log(500.0))
    assert tiny(*batch(tiny))["logit_scale"].item() == 100.0


def test_text_embedding_ignores_padding(tiny):
    _, tokens = batch(tiny)
    longer = torch.cat([tokens, torch.zeros(tokens.shape[0], 7, dtype=torch.long)], dim=1)
    torch.testing.assert_close(tiny.encode_text(tokens), tiny.encode_text(longer), atol=1e-5, rtol=1e-5)


def test_decoder_is_causal_and_logits_predict_same_position(tiny):
    images, tokens = batch(tiny, L=12)
    base = tiny(images, tokens)["logits"]
    changed = tokens.clone()
    changed[:, 6] = 5
    after = tiny(images, changed)["logits"]
    # logits[:, i] sees tokens[:, :i] only (inputs are shifted right)
    torch.testing.assert_close(after[:, :7], base[:, :7])
    assert not torch.allclose(after[:, 7:], base[:, 7:])


def test_shared_token_embedding(tiny):
    assert tiny.text_encoder.embed_tokens is tiny.text_decoder.embed_tokens
    assert tiny.text_decoder.lm_head.weight.data_ptr() != tiny.text_encoder.embed_tokens.weight.data_ptr()


def test_bad_inputs_are_clear_errors(tiny):
    images, tokens = batch(tiny)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        tiny(torch.randn(2, 3, 32, 32), tokens[:2])
    with pytest.raises(TypeError, match="floating-point"):
        tiny(torch.zeros(3, 3, 64, 64, dtype=torch.uint8), tokens)
    bad = tokens.clone()
    bad[0, 0] = tiny.cfg.text.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.encode_text(bad)  # user-facing entry points check ids; forward (the training step) does not sync
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.check_tokens(bad)
    with pytest.raises(ValueError, match="context_length"):
        tiny.encode_text(torch.ones(1, 78, dtype=torch.long))
    with pytest.raises(TypeError, match="integer ids"):
        tiny.encode_text(tokens.float())


def test_bf16_autocast_forward_backward(tiny):
    images, tokens = batch(tiny)
    tiny.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(images, tokens)
        loss = F.cross_entropy(out["logits"].flatten(0, 1).float(), tokens.flatten(), ignore_index=0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in tiny.parameters())
    assert tiny.visual.conv1.weight.dtype == torch.float32  # fp32 master weights


def within_one_bf16_rounding(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """``got`` (bf16) is the float64 ``exact`` rounded once to bf16, give or take fp32's own error:
    within 2^-8 relative (bf16's unit roundoff) plus 1e-6 of the largest value."""
    err = (got.double() - exact).abs()
    return bool((err <= exact.abs() * 2.0 ** -8 + 1e-6 * exact.abs().max()).all())


@pytest.mark.parametrize("form", ["autocast", "bf16 weights"])
def test_norms_compute_in_fp32_over_bf16_inputs(form):
    """Both BF16 forms (autocast over fp32 weights; DeepSpeed's bf16 weights) must normalise in fp32:
    rows with a large mean (8 +- 1, where bf16's spacing is 2^-4) lose the variance if the mean or
    the mean square is taken in bf16. Exact within one final rounding, on any CPU."""
    from coca.models.t5 import RMSNorm
    from coca.models.vit import LayerNorm
    torch.manual_seed(0)
    x = (8 + torch.randn(4, 16, 128)).to(torch.bfloat16)
    for norm in (LayerNorm(128), RMSNorm(128)):
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.uniform_(-0.5, 0.5)
        xd, w = x.double(), norm.weight.detach().to(torch.bfloat16).double()
        if isinstance(norm, LayerNorm):
            b = norm.bias.detach().to(torch.bfloat16).double()
            exact = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt() * w + b
        else:
            exact = xd / (xd.square().mean(-1, keepdim=True) + norm.eps).sqrt() * w
        if form == "bf16 weights":
            norm.to(torch.bfloat16)
            out = norm(x)
        else:
            with torch.no_grad():  # the weights as autocast would see them, for an exact reference
                norm.weight.copy_(norm.weight.to(torch.bfloat16).float())
                if getattr(norm, "bias", None) is not None:
                    norm.bias.copy_(norm.bias.to(torch.bfloat16).float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = norm(x)
        assert out.dtype == torch.bfloat16
        assert within_one_bf16_rounding(out, exact), (type(norm).__name__, (out.double() - exact).abs().max())


def test_losses_compute_in_fp32_over_bf16_inputs():
    """Given bf16 embeddings and logits, the losses are the float64 losses of the same values to
    fp32 accuracy (a missing cast would round the logits to bf16: 2^-8 of a logit of 14, ~0.05).
    The chunked caption loss rounds its logits to bf16 once, so it is within 2 * 2^-8 * max|logit|
    (cross-entropy moves by at most twice its largest logit change)."""
    from coca.losses import caption_loss, chunked_caption_loss, contrastive_loss
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, 64), dim=-1).to(torch.bfloat16)
    txt = F.normalize(img.float() + 0.3 * torch.randn(8, 64), dim=-1).to(torch.bfloat16)
    scale = torch.tensor(1 / 0.07)
    labels = torch.arange(8)

    def exact_contrastive(a, b):
        logits = scale.double() * a.double() @ b.double().T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    assert contrastive_loss(img, txt, scale).item() == pytest.approx(exact_contrastive(img, txt).item(), rel=1e-5)
    hidden, weight = torch.randn(4, 10, 32).to(torch.bfloat16), (torch.randn(50, 32) / 4).to(torch.bfloat16)
    tokens = torch.randint(1, 50, (4, 10))
    tokens[:, 7:] = 0
    logits = hidden.double() @ weight.double().T
    exact = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), ignore_index=0).item()
    assert caption_loss((hidden @ weight.T), tokens).item() == pytest.approx(
        F.cross_entropy((hidden @ weight.T).double().flatten(0, 1), tokens.flatten(), ignore_index=0).item(), rel=1e-5)
    chunked = chunked_caption_loss(hidden, weight, tokens, chunk_tokens=8).item()
    assert abs(chunked - exact) <= 2 * 2.0 ** -8 * logits.abs().max().item()


def test_attention_runs_in_the_implementation_its_caller_chose(monkeypatch):
    """SDPA_FP32 computes fp32 attention over bf16 inputs, under autocast (single/DDP BF16) and with
    bf16 weights (DeepSpeed BF16) alike, gradients included; SDPA keeps the inputs' dtype (the
    autocast dtype under autocast). BF16 training on CPU chooses SDPA_FP32, everything else SDPA."""
    from coca.models import attention as attention_module
    from coca.models.attention import SDPA, SDPA_FP32, set_attention
    from coca.models.t5 import T5Attention
    from coca.models.vit import MultiHeadAttention
    from coca.train.precision import training_attention
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, None if attn_mask is None else attn_mask.dtype))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    bias = torch.randn(1, 3, 9, 9, generator=g) * 3

    def by_hand(q, k, v):  # fp32 softmax(q k^T * scale + bias) v of the same bf16 inputs
        return ((q.float() @ k.float().transpose(-1, -2) * 0.25 + bias).softmax(-1) @ v.float())

    fp32 = (torch.float32,) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_module.attention(q, k, v, bias, scale=0.25, impl=SDPA_FP32)
    assert seen.pop() == fp32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), by_hand(q, k, v), atol=1e-2, rtol=1e-2)
    out = attention_module.attention(q, k, v, bias, scale=0.25, impl=SDPA_FP32)  # bf16 weights, no autocast
    assert seen.pop() == fp32 and out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    by_hand(q, k, v).square().sum().backward()
    for ours, ref in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)
    attention_module.attention(q, k, v, bias)  # SDPA: as given
    assert seen.pop() == (torch.bfloat16,) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # SDPA under autocast: the autocast dtype
        attention_module.attention(q.float(), k.float(), v.float(), bias)
    assert seen.pop() == (torch.bfloat16,) * 4
    attention_module.attention(q.float(), k.float(), v.float())
    assert seen.pop() == (torch.float32,) * 3 + (None,)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_attention(cpu, "bf16") is SDPA_FP32
    assert training_attention(cpu, "fp32") is SDPA and training_attention(cuda, "bf16") is SDPA
    model = coca.create_model("coca-tiny")
    set_attention(model, SDPA_FP32)
    t, v = model.cfg.text, model.cfg.vision
    owners = [m for m in model.modules() if isinstance(m, (MultiHeadAttention, T5Attention))]
    assert len(owners) == v.layers + 2 + t.encoder_layers + 2 * t.decoder_layers  # 2 poolers; self + cross
    assert all(m.attention_impl is SDPA_FP32 for m in owners)
    assert model.text_encoder.attention_impl is model.text_decoder.attention_impl is SDPA_FP32  # bias dtype

def test_gradient_checkpointing_gives_same_gradients(tiny):
    images, tokens = batch(tiny)
    tiny.train()

    def grads():
        tiny.zero_grad()
        out = tiny(images, tokens)
        (out["logits"].square().mean() + out["logit_scale"] * (out["image_embeds"] @ out["text_embeds"].T).sum()).backward()
        return [p.grad.clone() for p in tiny.parameters()]

    plain = grads()
    tiny.set_grad_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_save_and_load_roundtrip(tiny, tmp_path):
    images, tokens = batch(tiny)
    path = tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = coca.load(path)
    assert loaded.text_encoder.embed_tokens is loaded.text_decoder.embed_tokens
    with torch.no_grad():
        a, b = tiny(images, tokens), loaded(images, tokens)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_load_rejects_mismatched_checkpoint(tiny, tmp_path):
    path = tiny.save_pretrained(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text"]["vocab_size"] = 2048
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \(1024, 128\) but the config expects \(2048, 128\)"):
        coca.load(path)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        coca.load(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        coca.load(tmp_path / "m")
    coca.create_model("coca-tiny").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        coca.load(tmp_path / "m")


def test_trimmed_batch_gives_identical_outputs(tiny):
    from coca.tokenizer import trim_padding
    images, tokens = batch(tiny, L=77)
    tokens[:, 30:] = 0
    tokens[0, 29] = 1
    trimmed = trim_padding(tokens)
    assert trimmed.shape == (3, 30)
    full, short = tiny(images, tokens), tiny(images, trimmed)
    torch.testing.assert_close(short["text_embeds"], full["text_embeds"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short["logits"], full["logits"][:, :30], atol=1e-5, rtol=1e-5)
    assert trim_padding(torch.zeros(2, 77, dtype=torch.long)).shape == (2, 1)


def test_partial_activation_checkpointing_gives_the_same_gradients():
    import coca
    torch.manual_seed(0)
    model = coca.create_model("coca-tiny").train()
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(3, 100, (2, 9))
    grads = {}
    for blocks in (False, 2, True):
        model.zero_grad()
        model.set_grad_checkpointing(blocks)
        out = model(images, tokens)
        (out["logits"].square().mean() + out["image_embeds"].sum() + out["text_embeds"].sum()).backward()
        grads[blocks] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert [t.grad_checkpointing for t in (model.visual, model.text_encoder, model.text_decoder)] == [4, 3, 3]
    from coca.plan import (
        saved_activation_bytes,  # fewer saved activations with more checkpointed blocks
    )
    sizes = [saved_activation_bytes(model.cfg, 2, 9, n) for n in (0, 1, 2, True)]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
    for blocks in (2, True):
        assert len(grads[blocks]) == len(grads[False]) > 100
        for a, b in zip(grads[False], grads[blocks]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_config_and_the_losses_import_no_model_or_training_code():
    """No import circles: the config validates component names from coca.components (which
    imports nothing), and the losses take the process group as an argument."""
    import subprocess
    import sys
    code = ("import sys, coca.config, coca.losses, coca.components; "
            "print(sorted(m for m in sys.modules if m.startswith(('coca.models', 'coca.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

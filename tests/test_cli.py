import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import coca
from coca.cli import main
from coca.data.synthetic import SyntheticScenes


def demo_captions():
    return SyntheticScenes(300).captions()

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_lists_presets():
    out = subprocess.run([sys.executable, "-m", "coca.cli", "list"], capture_output=True, text=True, check=True).stdout
    for name in ("coca-large-v2", "coca-base", "coca-tiny"):
        assert name in out


def test_info_large_counts_and_flops(capsys):
    code, out, _ = run(capsys, "info", "coca-large-v2")
    assert code == 0
    assert "1,096,310,785" in out and "GFLOPs" in out
    for row in ("vision tower", "attentional poolers", "text encoder", "text decoder", "token embedding", "LM head"):
        assert row in out
    from coca.components import COMPONENTS
    listed = [line.split()[0] for line in out.splitlines() if "%" in line and line.split()[0] in COMPONENTS]
    assert listed == list(COMPONENTS)  # the names optim.freeze / optim.lr_mult take


def test_info_unknown_preset(capsys):
    code, _, err = run(capsys, "info", "coca-huge")
    assert code == 2 and "unknown model preset 'coca-huge'" in err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A HF T5 directory and an open_clip ViT file with coca-tiny's shapes, both random."""
    root = tmp_path_factory.mktemp("ckpt")
    preset = coca.config.get_preset("coca-tiny")
    t, v = preset.text, preset.vision
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=1100, d_model=t.d_model, d_kv=t.d_kv, num_heads=t.num_heads, d_ff=t.d_ff, num_layers=3,
        num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)).eval()
    hf.save_pretrained(root / "t5")
    tok = coca.Tokenizer.train(demo_captions(), vocab_size=40, out_dir=root / "tok")
    shutil.copy(tok.path, root / "t5" / "spiece.model")
    from open_clip.transformer import VisionTransformer as OCViT
    vit = OCViT(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers, heads=v.heads,
                mlp_ratio=v.mlp_dim / v.width, output_dim=64, output_tokens=True).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from safetensors.torch import save_file
    save_file({f"visual.{k}": v.contiguous() for k, v in vit.state_dict().items()}, str(root / "clip.safetensors"))
    torch.save(vit.state_dict(), root / "clip.bin")
    return root, hf, vit


@pytest.mark.parametrize("vit_file", ["clip.safetensors", "clip.bin"])
def test_init_from_t5_and_clip(capsys, checkpoints, vit_file):
    root, hf, vit = checkpoints
    out_dir = root / f"init-{vit_file}"
    code, out, err = run(capsys, "init", "--preset", "coca-tiny", "--t5", str(root / "t5"),
                         "--vit", str(root / vit_file), "--out", str(out_dir))
    assert code == 0, err
    model = coca.load(out_dir)
    assert model.tokenizer is not None
    tokens = torch.randint(3, 1024, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model.text_encoder(tokens), hf.encoder(input_ids=tokens).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
        visual = torch.randn(2, 16, model.cfg.text.d_model)
        torch.testing.assert_close(model.text_decoder(tokens, visual),
                                   hf(encoder_outputs=(visual,), decoder_input_ids=tokens).logits[..., :1024],
                                   atol=1e-4, rtol=1e-5)  # logits of HF's unit-std head reach ~30
        images = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model.visual(images)[:, 1:], vit(images)[1], atol=1e-5, rtol=1e-5)


def test_init_rejects_wrong_shapes(capsys, checkpoints):
    root, _, _ = checkpoints
    code, _, err = run(capsys, "init", "--preset", "coca-base", "--t5", str(root / "t5"), "--out", str(root / "x"))
    assert code == 2 and "does not fit preset coca-base" in err
    code, _, err = run(capsys, "init", "--preset", "coca-base", "--vit", str(root / "clip.safetensors"),
                       "--out", str(root / "x"))
    assert code == 2 and "expects" in err
    code, _, err = run(capsys, "init", "--preset", "coca-tiny", "--t5", str(root / "missing"), "--out", str(root / "x"))
    assert code == 2 and "config.json not found" in err


def test_caption_command(capsys, checkpoints, tmp_path):
    root, _, _ = checkpoints
    model_dir = root / "init-clip.safetensors"
    if not model_dir.exists():
        assert run(capsys, "init", "--preset", "coca-tiny", "--t5", str(root / "t5"), "--out", str(model_dir))[0] == 0
    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (80, 70), colour).save(p)
        paths.append(str(p))
    code, out, err = run(capsys, "caption", *paths, "--model", str(model_dir), "--strategy", "greedy",
                         "--max-new-tokens", "5", "--batch-size", "2")
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.strip().splitlines()] == paths
    code, _, err = run(capsys, "caption", str(tmp_path / "nope.png"), "--model", str(model_dir))
    assert code == 2 and "nope.png" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, _, err = run(capsys, "caption", str(tmp_path / "bad.png"), "--model", str(model_dir))
    assert code == 2 and "none of the 1 images could be read ({'decode_error': 1})" in err


def test_tokenizer_train_command(capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(demo_captions()))
    code, out, _ = run(capsys, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "50",
                       "--out", str(tmp_path / "tok"))
    assert code == 0 and (tmp_path / "tok" / "tokenizer.model").is_file()
    code, _, err = run(capsys, "tokenizer", "train", "--input", str(tmp_path / "none.txt"), "--out", str(tmp_path))
    assert code == 2 and "none.txt" in err


def test_demo_command(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path / "demo"), "--set", "train.steps=20",
                       "--set", "train.progress=false", "--set", "data.workers=0")
    assert code == 0
    assert "zero-shot accuracy" in out and "exact match" in out
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    for key in ("zeroshot_accuracy", "caption_exact_match", "cider", "wall_time_s"):
        assert key in metrics
    for name in ("curves.png", "gallery.png", "predictions.json", "metrics.jsonl", "config.yaml"):
        assert (tmp_path / "demo" / name).is_file()
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()


def test_user_errors_exit_2_and_bugs_show_their_traceback(capsys, monkeypatch):
    import coca.cli as cli
    from coca.errors import InputNotFound, UserError
    code, _, err = run(capsys, "eval", "zeroshot", "--model", "nowhere", "--images", "no-such-folder")
    assert code == 2 and err.strip().count("\n") == 0 and "no-such-folder" in err

    def bug(args):
        raise ValueError("an internal bug")  # not a UserError: must not be reported as bad input
    monkeypatch.setattr(cli, "cmd_list", bug)
    with pytest.raises(ValueError, match="internal bug"):
        cli.main(["list"])
    assert issubclass(InputNotFound, FileNotFoundError) and issubclass(UserError, ValueError)


def analytic_forward_flops(cfg) -> dict[str, int]:
    """The matmul FLOPs (2 per multiply-add) of one forward pass at batch 1 and full context,
    written out block by block from the config alone."""
    v, t = cfg.vision, cfg.text
    n = (v.image_size // v.patch_size) ** 2 + 1          # patches + class token
    w, d, inner, L, q = v.width, t.d_model, t.num_heads * t.d_kv, t.context_length, cfg.n_gen_queries

    def mm(m, k, n_):
        return 2 * m * k * n_

    def attention(lq, lk, width):                          # scores and the weighted sum, all heads
        return mm(lq, width, lk) + mm(lq, lk, width)
    vision = mm((n - 1), 3 * v.patch_size ** 2, w) + v.layers * (
        mm(n, w, 3 * w) + attention(n, n, w) + mm(n, w, w) + mm(n, w, v.mlp_dim) + mm(n, v.mlp_dim, w))

    def pooler(n_queries, context, context_dim):
        return mm(n_queries, d, d) + mm(context, context_dim, 2 * d) + attention(n_queries, context, d) + mm(n_queries, d, d)
    poolers = pooler(q, n, w) + pooler(1, q, d)
    ffn = mm(L, d, t.d_ff) * 2 + mm(L, t.d_ff, d)          # gated GELU: wi_0, wi_1, wo
    self_attn = mm(L, d, 3 * inner) + attention(L, L, inner) + mm(L, inner, d)
    encoder = t.encoder_layers * (self_attn + ffn)
    cross = mm(L, d, inner) + mm(q, d, 2 * inner) + attention(L, q, inner) + mm(L, inner, d)
    decoder = t.decoder_layers * (self_attn + cross + ffn) + mm(L, d, t.vocab_size)
    projections = 2 * mm(1, d, cfg.embed_dim)
    return {"visual": vision, "poolers": poolers, "text_encoder": encoder, "text_decoder": decoder,
            "total": vision + poolers + encoder + decoder + projections}


@pytest.mark.parametrize("preset, device", [("coca-tiny", "meta"), ("coca-base", "meta"), ("coca-large-v2", "meta"),
                                            ("coca-tiny", "cpu"), ("coca-base", "cpu")])
def test_forward_flops_equal_an_analytic_count(preset, device):
    """`coca info` and `coca plan` count on the meta device; on the CPU, attention dispatches to
    a kernel PyTorch's counter does not know, which once left every attention out."""
    import coca
    from coca.summary import forward_flops
    model = coca.create_model(preset, device=device)
    assert forward_flops(model) == analytic_forward_flops(model.cfg)

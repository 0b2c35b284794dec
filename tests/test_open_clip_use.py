"""A converted open_clip CoCa through the rest of the project: `coca eval` (caption, retrieval,
zero-shot by contrastive, likelihood and both), `coca caption`, `coca index`, `coca serve`, and a
caption-only fine-tune from it with ``train.init_from`` (frozen tower bitwise unchanged)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import coca
from coca.cli import main
from coca.clip_tokenizer import CLIPTokenizer
from coca.config import load_run_config
from coca.convert import from_open_clip_coca
from coca.train import train

open_clip = pytest.importorskip("open_clip")
httpx = pytest.importorskip("httpx")

TINY = {  # open_clip's CoCa config format, at the demo's size: 64 px, 128 wide, 2 layers
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "head_width": 32,
                   "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 17, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from open_clip.coca_model import CoCa
    from coca.evaluate.synthetic import write_eval_sets
    torch.manual_seed(0)
    theirs = CoCa(TINY["embed_dim"], TINY["multimodal_cfg"], TINY["text_cfg"], TINY["vision_cfg"]).eval()
    torch.nn.init.normal_(theirs.text_decoder.text_projection, std=128 ** -0.5)
    root = tmp_path_factory.mktemp("openclip-use")
    model = from_open_clip_coca(theirs.state_dict(), TINY)
    model.save_pretrained(root / "model")
    sets = write_eval_sets(root / "sets", n_classify=12, n_caption=16, seed=1, split="val")
    return root, theirs, sets


def test_evaluations_run_on_a_converted_model(converted):
    root, _, sets = converted
    model = str(root / "model")
    common = ["--model", model, "--workers", "0"]
    assert main(["eval", "caption", *common, "--images", str(root / "sets/captions"), "--annotations",
                 str(root / "sets/captions.json"), "--strategy", "open_clip_beam", "--num-beams", "2",
                 "--max-new-tokens", "6", "--out", str(root / "cap.json")]) == 0
    assert "CIDEr" in json.loads((root / "cap.json").read_text())["metrics"]
    assert main(["eval", "retrieval", *common, "--images", str(root / "sets/captions"), "--annotations",
                 str(root / "sets/captions.json"), "--out", str(root / "ret.json")]) == 0
    assert "i2t_R@1" in json.loads((root / "ret.json").read_text())["metrics"]
    assert main(["eval", "zeroshot", *common, "--images", str(root / "sets/classify"), "--classnames",
                 str(root / "sets/classnames.txt"), "--templates", str(root / "sets/templates.txt"), "--method", "both",
                 "--out", str(root / "zs.json")]) == 0
    metrics = json.loads((root / "zs.json").read_text())["metrics"]
    assert {"top1", "contrastive_top1", "likelihood_top1"} <= set(metrics) and metrics["n_images"] == 12


def test_caption_index_and_serve_run_on_a_converted_model(converted, tmp_path):
    root, _, _ = converted
    model = str(root / "model")
    cli = [sys.executable, "-m", "coca.cli"]
    done = subprocess.run(cli + ["caption", str(root / "sets/captions"), "--model", model, "--out", str(tmp_path / "c.jsonl"),
                                 "--max-new-tokens", "5", "--workers", "0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(lines) >= 15 and all(isinstance(x["caption"], str) for x in lines)
    done = subprocess.run(cli + ["index", str(root / "sets/captions"), "--model", model, "--out", str(tmp_path / "idx"),
                                 "--workers", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    from coca.serve.process import spawn_server
    proc, url = spawn_server(model, "--index", str(tmp_path / "idx"))
    try:
        image = next((root / "sets/captions").rglob("*.png")).read_bytes()
        r = httpx.post(url + "/v1/caption", files={"image": image}, data={"strategy": "greedy", "max_new_tokens": "5"})
        assert r.status_code == 200 and isinstance(r.json()["caption"], str), r.text
        r = httpx.post(url + "/v1/classify", files={"image": image}, data={"labels": "a red square, a blue circle"})
        assert r.status_code == 200 and len(r.json()["labels"]) == 2, r.text
        r = httpx.post(url + "/v1/search", json={"text": "a red square", "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
        assert httpx.get(url + "/").status_code == 200
    finally:
        proc.kill()
        proc.wait()


def test_caption_only_finetune_from_a_converted_model(converted, tmp_path):
    """As open_clip's MS-COCO checkpoints were made: the caption loss only, from the pretrained
    weights, here with the vision tower frozen (bitwise unchanged) and CLIP's tokenizer kept."""
    root, _, _ = converted
    init = root / "model"
    cfg = load_run_config(None, [
        f"train.run_dir={tmp_path / 'ft'}", f"train.init_from={init}", "data.kind=coco",
        f"data.train={root / 'sets/captions.json'}", f"data.image_root={root / 'sets/captions'}",
        "data.batch_size=4", "data.workers=0", "loss.contrastive_weight=0", "train.steps=3", "train.log_every=1",
        "train.val_every=0", "train.progress=false", "train.tensorboard=false", "train.precision=fp32",
        "optim.freeze=[visual]", "optim.lr=1e-3", "train.checkpoint_every=3"])
    assert cfg.model.family == "open_clip"
    train(cfg, log=lambda *a: None)
    lines = [json.loads(x) for x in (tmp_path / "ft/metrics.jsonl").read_text().splitlines() if '"split"' not in x]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["loss"] == pytest.approx(x["caption_loss"], rel=1e-6) for x in lines)  # the caption loss only
    assert lines[-1]["caption_loss"] < lines[0]["caption_loss"]
    before, after = load_file(init / "model.safetensors"), load_file(tmp_path / "ft/model/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not torch.equal(before["text_decoder.lm_head.weight"], after["text_decoder.lm_head.weight"])
    tuned = coca.load(tmp_path / "ft/model")
    assert type(tuned).__name__ == "OpenCLIPCoCa" and isinstance(tuned.tokenizer, CLIPTokenizer)

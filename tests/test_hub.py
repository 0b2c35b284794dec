"""`coca convert open-clip` on the published file names, ``hf-hub:`` names through a pre-filled
Hugging Face cache with the network off, and what a push uploads (files and model card)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coca
from coca import hub
from coca.cli import main

open_clip = pytest.importorskip("open_clip")
sys.path.insert(0, str(Path(__file__).parent))
from test_open_clip_family import images_for, reference, shrunk  # noqa: E402

ARCH = "coca_ViT-B-32"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A random-weight open_clip CoCa saved as open_clip publishes it: open_clip_pytorch_model.bin
    (and the safetensors twin) with open_clip_config.json."""
    cfg = shrunk(ARCH)
    theirs = reference(cfg)
    root = tmp_path_factory.mktemp("published")
    torch.save(theirs.state_dict(), root / "open_clip_pytorch_model.bin")
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return root, theirs


def hub_cache(cache: Path, repo: str, files: dict[str, Path | bytes]) -> None:
    """Files laid out as huggingface_hub caches a repository's snapshot."""
    base = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snap / name).write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())


def offline_env(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}


def test_convert_reads_the_published_files_and_equals_open_clip(published, tmp_path, capsys):
    root, theirs = published
    assert main(["convert", "open-clip", "--checkpoint", str(root), "--out", str(tmp_path / "m")]) == 0
    assert "wrote" in capsys.readouterr().out
    ours = coca.load(tmp_path / "m")
    images = images_for(ours, n=2)
    texts = ["a red square", "two dogs"]
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(ours.tokenizer(texts)),
                                   theirs.encode_text(open_clip.get_tokenizer(ARCH)(texts)), rtol=0, atol=1e-5)
    # the safetensors name, given as a file
    from safetensors.torch import save_file
    single = tmp_path / "st"
    single.mkdir()
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, single / "open_clip_model.safetensors")
    (single / "open_clip_config.json").write_text((root / "open_clip_config.json").read_text())
    assert main(["convert", "open-clip", "--checkpoint", str(single / "open_clip_model.safetensors"),
                 "--out", str(tmp_path / "m2")]) == 0
    assert coca.load(tmp_path / "m2").state_dict().keys() == ours.state_dict().keys()


def test_convert_errors_are_one_line(published, tmp_path, capsys):
    root, _ = published
    # the shrunk weights are not the published shapes: --arch says which it expected
    assert main(["convert", "open-clip", "--checkpoint", str(root / "open_clip_pytorch_model.bin"),
                 "--arch", ARCH, "--out", str(tmp_path / "x")]) != 0
    assert "does not match the model config" in capsys.readouterr().err
    assert main(["convert", "open-clip", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) != 0
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.bin"
    torch.save({"model": object()}, bad)
    assert main(["convert", "open-clip", "--checkpoint", str(bad), "--out", str(tmp_path / "z")]) != 0
    assert "weights_only=True" in capsys.readouterr().err


def test_hf_hub_names_load_from_the_cache_offline(published, tmp_path):
    """``coca.load("hf-hub:...")``, ``--model hf-hub:...`` and ``convert --checkpoint hf-hub:...``
    from a pre-filled cache with HF_HUB_OFFLINE=1; a name the cache lacks is a one-line error."""
    root, theirs = published
    model_dir = tmp_path / "ours"
    assert main(["convert", "open-clip", "--checkpoint", str(root), "--out", str(model_dir)]) == 0
    cache = tmp_path / "cache"
    hub_cache(cache, "org/coca-test", {n: model_dir / n for n in ("config.json", "model.safetensors",
                                                                 "bpe_simple_vocab_16e6.txt.gz")})
    hub_cache(cache, "laion/CoCa-test", {"open_clip_pytorch_model.bin": root / "open_clip_pytorch_model.bin",
                                         "open_clip_config.json": root / "open_clip_config.json"})
    env = offline_env(cache)
    code = ("import coca, torch; from coca.config import load_run_config;"
            "m = coca.load('hf-hub:org/coca-test'); r = coca.load(%r); x = torch.randn(1, 3, 224, 224);"
            "cfg = load_run_config(None, ['train.init_from=hf-hub:org/coca-test', 'train.run_dir=%s']);"
            "print(cfg.model.family, cfg.train.init_from.endswith('0123456789abcdef0123456789abcdef01234567'));"
            "print(float((m.encode_image(x) - r.encode_image(x)).abs().max()))") % (str(model_dir), tmp_path / "run")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["open_clip", "True", "0.0"], done.stdout  # init_from: the cached snapshot
    out = tmp_path / "from-hub"
    cli = [sys.executable, "-m", "coca.cli"]
    done = subprocess.run(cli + ["convert", "open-clip", "--checkpoint", "hf-hub:laion/CoCa-test", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    images = tmp_path / "photos"
    images.mkdir()
    from PIL import Image
    Image.new("RGB", (40, 30), "blue").save(images / "a.png")
    done = subprocess.run(cli + ["caption", str(images), "--model", "hf-hub:org/coca-test", "--max-new-tokens", "3",
                                 "--workers", "0", "--strategy", "greedy"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "a.png" in done.stdout, done.stderr[-2000:]
    for name in ("hf-hub:org/not-cached", "hf-hub:org/coca-test@v9"):
        done = subprocess.run(cli + ["caption", str(images), "--model", name], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in done.stderr
    from coca.errors import UserError
    with pytest.raises(UserError, match="hf-hub:ORG/NAME"):
        hub.parse("hf-hub:just-a-name")


def test_push_uploads_the_model_files_and_a_card(tmp_path, monkeypatch, capsys):
    model = coca.create_model("coca-tiny")
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  steps: 30\n")
    from coca.tokenizer import Tokenizer
    tok = Tokenizer.train(["a red square", "a blue circle", "two green triangles"] * 30, vocab_size=40, out_dir=tmp_path)
    model.save_pretrained(run / "best", tokenizer=tok)
    (run / "best" / "eval.json").write_text(json.dumps({"caption": {"CIDEr": 0.81, "BLEU-4": 0.2}}))
    plan = hub.push_plan(run / "best", "org/tiny")
    assert sorted(plan) == ["README.md", "config.json", "eval.json", "model.safetensors", "tokenizer.model"]
    card = plan["README.md"].decode()
    assert card.startswith("---\nlibrary_name: coca\n")
    assert 'coca.load("hf-hub:org/tiny")' in card and "preset `coca-tiny`" in card
    assert "## Training config" in card and "steps: 30" in card
    assert "| caption.CIDEr | 0.81 |" in card
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", str(run / "best"), "org/tiny", "--private"]) == 0
    assert uploaded["repo"] == ("org/tiny", True, True) and uploaded["files"] == plan
    assert "commit/1" in capsys.readouterr().out
    url = model.push_to_hub("org/tiny2")
    assert url.endswith("commit/1") and sorted(uploaded["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert main(["push", str(run / "best"), "org/tiny", "--dry-run"]) == 0
    assert "README.md" in capsys.readouterr().out
    assert main(["push", str(tmp_path), "org/tiny"]) != 0
    assert "is not a model directory" in capsys.readouterr().err

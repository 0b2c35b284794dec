import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import coca
from coca.config import ConfigError, OptimConfig, load_run_config
from coca.data.synthetic import Obj, SyntheticScenes, caption_for
from coca.data.transforms import TrainTransform, swap_left_right
from coca.losses import caption_loss, contrastive_loss
from coca.train.optim import lr_factor, param_groups

FAST = ["model.text.vocab_size=64", "data.tokenizer_vocab_size=64", "data.tokenizer_model_type=bpe",
        "data.tokenizer_train_captions=2000", "data.batch_size=8", "data.workers=0", "train.progress=false",
        "train.val_every=0", "train.log_every=1", "train.tensorboard=false", "train.threads=1",
        "train.precision=fp32", "optim.lr=1e-3"]


def config(tmp_path, *extra, name="run"):
    return load_run_config(None, FAST + [f"train.run_dir={tmp_path / name}", *extra])


def train_lines(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("split") != "val"]


def test_config_errors_and_overrides(tmp_path):
    cfg = load_run_config(None, ["optim.lr=3e-4", "model.preset=coca-tiny", "model.text.vocab_size=64"])
    assert cfg.optim.lr == 3e-4 and cfg.model.text.vocab_size == 64
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_run_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_run_config(None, ["train.stpes=1"])
    with pytest.raises(ConfigError, match="must be int"):
        load_run_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="data.kind"):
        load_run_config(None, ["data.kind=parquet"])
    with pytest.raises(ConfigError, match="data.train is required"):
        load_run_config(None, ["data.kind=csv"])
    with pytest.raises(FileNotFoundError):
        load_run_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(str(tmp_path / "bad.yaml"))


def test_shipped_configs_load():
    here = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in ("demo.yaml", "coca-large-v2.yaml"):
        cfg = load_run_config(os.path.join(here, name))
        assert cfg.loss.contrastive_weight == cfg.loss.caption_weight == 1.0
    large = load_run_config(os.path.join(here, "coca-large-v2.yaml"))
    assert large.model.name == "coca-large-v2" and large.train.precision == "bf16"
    assert large.optim.lr == 1e-4 and large.optim.warmup_frac == 0.1
    assert large.data.tokenizer_vocab_size == 32000 and large.model.text.context_length == 77


def test_precision_auto_is_bf16_only_where_bf16_matmuls_are_fast(monkeypatch, tmp_path):
    from pathlib import Path

    from coca import cpu as cpu_facts
    from coca.train import precision
    cpu = torch.device("cpu")
    for has, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda has=has: has)
        assert precision.resolve_precision("auto", cpu) == expected
        assert precision.resolve_precision("fp32", cpu) == "fp32" and precision.resolve_precision("bf16", cpu) == "bf16"
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert precision.resolve_precision("auto", torch.device("cuda")) == expected
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    monkeypatch.undo()
    assert cpu_facts.cpu_has_bf16_matmul(env={}) == (" amx_bf16" in flags or " avx512_bf16" in flags)
    for line, has in (("flags\t\t: fpu avx512f avx512_bf16 sse", True), ("flags\t\t: fpu amx_tile amx_bf16", True),
                      ("flags\t\t: fpu avx512f avx512_fp16 amx_tile", False), ("model name\t: amx_bf16 cpu", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\n{line}\n")
        assert cpu_facts.cpu_has_bf16_matmul(str(tmp_path / "cpuinfo"), env={}) == has, line
    assert not cpu_facts.cpu_has_bf16_matmul(str(tmp_path / "missing"), env={})
    # oneDNN restricted below AVX512-BF16 emulates bf16 (the demo's BF16 step measured several times
    # slower than fp32 under ONEDNN_MAX_CPU_ISA=AVX2), so auto is fp32 there whatever the CPU has
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    for limit, has in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False), ("AVX512_CORE_BF16", True),
                       ("AVX512_CORE_AMX", True), ("ALL", True), ("", True)):
        assert cpu_facts.cpu_has_bf16_matmul(str(tmp_path / "cpuinfo"), env={"ONEDNN_MAX_CPU_ISA": limit}) == has, limit
    assert load_run_config(None, ["train.precision=auto"]).train.precision == "auto"
    with pytest.raises(ConfigError, match="train.precision must be 'bf16', 'fp32' or 'auto', got 'fp16'"):
        load_run_config(None, ["train.precision=fp16"])


def test_swap_left_right():
    assert swap_left_right("a red circle left of a blue square") == "a red circle right of a blue square"
    assert swap_left_right("Left, RIGHT and leftover", "all") == "Right, LEFT and leftover"


def test_flip_commutes_with_canonical_captions():
    # flipping a scene reverses its left-to-right order; the swapped caption must be canonical again
    rng = np.random.default_rng(0)
    objects = [Obj(s, c, sh) for s in ("small", "large") for c in ("red", "blue", "orange") for sh in ("circle", "square")]
    for _ in range(200):
        a, b = rng.choice(len(objects), 2, replace=False)
        scene = (objects[a], objects[b])
        assert caption_for(scene[::-1]) == swap_left_right(caption_for(scene))


def test_train_transform_flip_swaps_caption_and_is_seeded():
    image, _ = SyntheticScenes(1).load(0)
    flip = TrainTransform(64, crop_scale_min=1.0, flip_prob=1.0, brightness=0, contrast=0, saturation=0, hue=0)
    keep = TrainTransform(64, crop_scale_min=1.0, flip_prob=0.0, brightness=0, contrast=0, saturation=0, hue=0)
    x, cap = flip(image, "a small red circle left of a blue square", seed=1)
    y, cap2 = keep(image, "a small red circle left of a blue square", seed=1)
    assert cap == "a small red circle right of a blue square" and cap2.endswith("left of a blue square")
    torch.testing.assert_close(x, y.flip(-1), atol=1e-5, rtol=0)
    aug = TrainTransform(64)
    a, b, c = aug(image, "x", 5)[0], aug(image, "x", 5)[0], aug(image, "x", 6)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    aug(image, "x", 7)
    assert torch.equal(state, torch.get_rng_state())  # augmentation never touches the global RNG


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_colour_jitter_equals_torchvision(name):
    from torchvision.transforms import v2

    from coca.data import transforms
    g = torch.Generator().manual_seed(0)
    for factor in (0.5, 0.83, 1.0, 1.2, 1.9):
        x = torch.rand(3, 17, 23, generator=g)
        ours = getattr(transforms, f"adjust_{name}")(x, factor)
        torch.testing.assert_close(ours, getattr(v2.functional, f"adjust_{name}")(x, factor), atol=2e-6, rtol=0)


def test_train_transform_crop_boxes_follow_scale_and_ratio():
    aug = TrainTransform(64, crop_scale_min=0.5)
    for seed in range(300):
        top, left, h, w = aug.crop_box(80, 100, torch.Generator().manual_seed(seed))
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 100
        assert 0.5 * 8000 * 0.9 <= h * w <= 8000 and 0.7 <= w / h <= 1.45


def test_crop_scale_one_keeps_the_whole_image_like_random_resized_crop():
    """scale (1, 1): the whole image, or for an aspect outside RandomResizedCrop's ratio range its
    fallback centre crop, without the 10 tries (which for such images can only fail, and for
    others find the whole image give or take a rounded pixel)."""
    from torchvision.transforms import v2
    whole = TrainTransform(64, crop_scale_min=1.0)
    expected = {(64, 64): (0, 0, 64, 64), (80, 100): (0, 0, 80, 100), (100, 80): (0, 0, 100, 80),
                (64, 200): (0, 57, 64, 85), (200, 64): (57, 0, 85, 64), (90, 67): (0, 0, 89, 67)}
    for (height, width), box in expected.items():
        assert whole.crop_box(height, width, torch.Generator().manual_seed(0)) == box
        if width / height > 4 / 3 or width / height < 3 / 4:  # torchvision reaches its fallback: the same box
            for seed in range(5):
                torch.manual_seed(seed)
                tv = v2.RandomResizedCrop(64, scale=(1.0, 1.0)).make_params([torch.zeros(3, height, width)])
                assert box == (tv["top"], tv["left"], tv["height"], tv["width"])


def test_synthetic_dataset_is_deterministic_with_disjoint_splits():
    a, b = SyntheticScenes(50, seed=3), SyntheticScenes(50, seed=3)
    assert a.captions() == b.captions()
    assert np.array_equal(np.asarray(a.load(7)[0]), np.asarray(b.load(7)[0]))
    assert a.captions() != SyntheticScenes(50, split="test", seed=3).captions()
    singles = SyntheticScenes(200, max_objects=1)
    assert all(" of " not in c for c in singles.captions())
    assert len({c.split()[2] + c.split()[3] for c in singles.captions()}) == 18  # all colour x shape classes
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes(5, split="dev")


def test_schedule_and_weight_decay_groups():
    assert lr_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 0.1) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(100, 100, 0.1, min_lr_ratio=0.1) == pytest.approx(0.1)
    model = coca.create_model("coca-tiny")
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    decay = [p for g in groups if g["weight_decay"] == 0.1 for p in g["params"]]
    no_decay = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay}
    assert "logit_scale" in no_decay_names and "text_encoder.embed_tokens.weight" in no_decay_names
    assert "visual.positional_embedding" in no_decay_names and "gen_pooler.query" in no_decay_names
    assert all(not n.endswith(".bias") for n in (names[id(p)] for p in decay))
    assert all(p.dim() == 2 or p.dim() == 4 for p in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_losses():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    logits = 10 * img @ txt.T
    expected = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, torch.tensor(10.0)), expected)
    cap_logits = torch.randn(2, 3, 5, generator=g)
    tokens = torch.tensor([[3, 1, 0], [4, 4, 1]])
    mask = tokens != 0
    ref = torch.nn.functional.cross_entropy(cap_logits[mask], tokens[mask])
    torch.testing.assert_close(caption_loss(cap_logits, tokens), ref)


def test_training_run_writes_metrics_checkpoints_and_model(tmp_path):
    from coca.train import train
    cfg = config(tmp_path, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                 "train.val_every=3", "train.val_batches=2", "data.synthetic_val_size=32", "train.tensorboard=true")
    summary = train(cfg, log=lambda *a: None)
    run = tmp_path / "run"
    lines = train_lines(run)
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x["loss"]) and "samples_per_s" in x and "lr" in x for x in lines)
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [v["step"] for v in vals] == [3, 6] and all("val_i2t_acc" in v for v in vals)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6
    assert any((run / "tb").iterdir())
    model = coca.load(summary["model_dir"])
    assert model.tokenizer is not None and model.cfg.text.vocab_size == 64


def test_training_learns(tmp_path):
    from coca.train import train
    train(config(tmp_path, "train.steps=40", "train.checkpoint_every=40", "data.batch_size=16"), log=lambda *a: None)
    losses = [x["caption_loss"] for x in train_lines(tmp_path / "run")]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])


def _train_cmd(run_dir, steps, every, *extra):
    overrides = FAST + [f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.checkpoint_every={every}", *extra]
    return [sys.executable, "-m", "coca.cli", "train"] + sum((["--set", o] for o in overrides), [])


def _wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(x["step"] >= step for x in train_lines(run_dir)):
            return
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def _webdataset_shards(directory, shards: int = 4, per_shard: int = 12) -> str:
    """img2dataset-layout shards of random pictures and captions; the brace pattern naming them."""
    from coca.prepare.planted import jpeg, random_caption, random_photo, write_shards
    rng = np.random.default_rng(0)
    samples = [(f"s{i:05d}", jpeg(random_photo(i, 48)), random_caption(rng)) for i in range(shards * per_shard)]
    write_shards(samples, directory, per_shard)
    return str(directory / f"{{00000..{shards - 1:05d}}}.tar")


@pytest.mark.parametrize("data", ["synthetic", "webdataset_2_workers_bf16"])
def test_resume_after_sigkill_is_exact(tmp_path, data):
    """Killed with SIGKILL after step 6 and rerun: the losses of all 10 steps equal an uninterrupted
    run's bit for bit. The real path: webdataset shards read by 2 loader workers (48 samples, so
    the run crosses epochs and resumes mid-epoch), BF16 autocast."""
    steps, every = 10, 4
    extra = [] if data == "synthetic" else [
        "data.kind=webdataset", f"data.train={_webdataset_shards(tmp_path / 'shards')}", "data.workers=2",
        "train.precision=bf16", "train.patch_dropout=0.5", "train.patch_dropout_until=0.7"]
    subprocess.run(_train_cmd(tmp_path / "straight", steps, every, *extra), check=True, capture_output=True)
    reference = {x["step"]: x["loss"] for x in train_lines(tmp_path / "straight")}

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run, steps, every, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    _wait_for_step(run, 6, proc)  # past the step-4 checkpoint, before the step-8 one
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers
    proc.wait()
    assert (run / "checkpoints" / "step_00000004").is_dir()
    done = subprocess.run(_train_cmd(run, steps, every, *extra), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout + done.stderr
    resumed = {x["step"]: x["loss"] for x in train_lines(run)}
    assert sorted(resumed) == list(range(1, steps + 1))  # no repeated or missing steps
    assert resumed == reference  # bitwise equal losses on CPU


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "term"
    proc = subprocess.Popen(_train_cmd(run, 1000, 500), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) >= 3
    assert b"stopped by signal" in out + err


def test_bad_samples_are_skipped_and_counted(tmp_path):
    from coca.train import train
    root = tmp_path / "data"
    root.mkdir()
    rows = ["filepath,caption"]
    for i in range(24):
        Image.new("RGB", (40, 48), (10 * i, 100, 200)).save(root / f"ok{i}.png")
        rows.append(f"ok{i}.png,a picture number {i}")
    (root / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    (root / "text.jpg").write_bytes(b"hello")
    rows += ["trunc.jpg,a truncated jpeg", "text.jpg,not an image", "missing.png,no file", "ok0.png,", "ok1.png,   "]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = config(tmp_path, "data.kind=csv", f"data.train={root / 'train.csv'}", "train.steps=8",
                 "train.checkpoint_every=8", "data.tokenizer_vocab_size=40")
    summary = train(cfg, log=lambda *a: None)
    assert summary["finished"]
    skipped = train_lines(tmp_path / "run")[-1]["skipped"]
    assert skipped.get("decode_error", 0) >= 2 and skipped.get("missing_image", 0) >= 1
    assert skipped.get("empty_caption", 0) >= 2


def test_checkpoint_of_the_same_step_is_replaced_whole_and_torn_metrics_lines_are_dropped(tmp_path):
    from coca.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
    from coca.train.metrics import MetricsLog
    model = coca.create_model("coca-tiny")
    save_checkpoint(tmp_path / "ck", 5, model, {"step": 5, "tag": "first"}, keep=2)
    save_checkpoint(tmp_path / "ck", 5, model, {"step": 5, "tag": "second"}, keep=2)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step_00000005"]  # no hidden leftovers
    assert load_checkpoint(checkpoint_dirs(tmp_path / "ck")[-1], model, "cpu")["tag"] == "second"
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-append
    MetricsLog(log, resume_step=2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]


def test_model_overrides_apply_to_the_default_preset():
    cfg = load_run_config(None, ["model.text.vocab_size=64"])
    assert cfg.model.name == "coca-tiny" and cfg.model.text.vocab_size == 64
    assert load_run_config(None, ["model.preset=coca-base"]).model.text.d_model == 768


def test_flip_swaps_only_spatial_left_and_right_by_default():
    cases = {  # caption -> its flipped version
        "a red circle left of a blue square": "a red circle right of a blue square",
        "a dog on the left, a cat to the right": "a dog on the right, a cat to the left",
        "a left-hand glove at the top-right corner": "a right-hand glove at the top-left corner",
        "Left of the tree, the lower left half": "Right of the tree, the lower right half",
        "she left the room": "she left the room",             # a verb
        "all right, the right to vote": "all right, the right to vote",
        "what is left over on the right side": "what is left over on the left side",
    }
    for caption, flipped in cases.items():
        assert swap_left_right(caption) == flipped, caption
    assert swap_left_right("she left the room", "all") == "she right the room"
    assert swap_left_right("a dog on the left", "none") == "a dog on the left"
    image, _ = SyntheticScenes(1).load(0)
    web = TrainTransform(64, crop_scale_min=1.0, flip_prob=1.0, brightness=0, contrast=0, saturation=0, hue=0)
    assert web(image, "she left the dog on the left", seed=0)[1] == "she left the dog on the right"
    with pytest.raises(ConfigError, match="flip_swap_words"):
        load_run_config(None, ["data.augment.flip_swap_words=some"])


def test_chunked_caption_loss_equals_the_full_one():
    from coca.losses import CoCaLoss
    torch.manual_seed(0)
    model = coca.create_model(load_run_config(None, ["model.text.vocab_size=300"]).model).train()
    images, tokens = torch.randn(3, 3, 64, 64), torch.randint(3, 300, (3, 11))
    tokens[:, 7:] = 0
    tokens[:, 6] = 1
    head = model.text_decoder.lm_head.weight
    results = {}
    for chunk in (0, 5, 64):  # 5: chunks that split captions; 64: one chunk holds the batch
        model.zero_grad()
        loss_fn = CoCaLoss(1.0, 1.0, 0, caption_chunk_tokens=chunk, lm_head_weight=head)
        losses = loss_fn(model(images, tokens, return_logits=loss_fn.wants_logits), tokens)
        losses.loss.backward()
        results[chunk] = (losses.caption.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    reference = torch.nn.functional.cross_entropy(model(images, tokens)["logits"].flatten(0, 1), tokens.flatten(),
                                                  ignore_index=0)
    for chunk in (0, 5, 64):
        torch.testing.assert_close(results[chunk][0], reference, rtol=1e-5, atol=1e-6)
        for a, b in zip(results[0][1], results[chunk][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="caption_chunk_tokens"):
        load_run_config(None, ["loss.caption_chunk_tokens=-1"])


def test_training_with_chunked_caption_loss_and_grad_cache_matches_plain(tmp_path):
    from coca.train import train
    plain = config(tmp_path, "train.steps=3", "train.checkpoint_every=3", name="plain")
    chunked = config(tmp_path, "train.steps=3", "train.checkpoint_every=3", "loss.caption_chunk_tokens=7", name="chunked")
    accum = config(tmp_path, "train.steps=3", "train.checkpoint_every=3", "loss.caption_chunk_tokens=7",
                   "train.accum_steps=2", "data.batch_size=4", name="accum")
    for cfg in (plain, chunked, accum):
        train(cfg, log=lambda *a: None)
    a, b, c = (train_lines(tmp_path / n) for n in ("plain", "chunked", "accum"))
    for x, y, z in zip(a, b, c):
        assert x["caption_loss"] == pytest.approx(y["caption_loss"], rel=1e-4)
        assert x["caption_loss"] == pytest.approx(z["caption_loss"], rel=1e-4)  # GradCache over 2 x 4 = the batch of 8
        assert x["loss"] == pytest.approx(z["loss"], rel=1e-4)


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tmp_path):
    """train.compile: the same losses within tolerance (compiling takes ~80 s on 2 cores: slow test)."""
    from coca.train import train
    eager = config(tmp_path, "train.steps=3", "train.checkpoint_every=3", name="eager")
    compiled = config(tmp_path, "train.steps=3", "train.checkpoint_every=3", "train.compile=true", name="compiled")
    for cfg in (eager, compiled):
        train(cfg, log=lambda *a: None)
    for x, y in zip(train_lines(tmp_path / "eager"), train_lines(tmp_path / "compiled")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_nonfinite_step_is_skipped_on_the_device_without_a_host_check(monkeypatch):
    """Fused AdamW skips the update of a non-finite step itself (found_inf): the engine's step needs
    no host synchronisation to decide. The weights and the optimiser's step count stay as they
    were; the step counts (the schedule advanced), the streak is one, and a clean step resets it."""
    from coca.config import OptimConfig
    from coca.losses import CoCaLoss
    from coca.train import engines
    from coca.train.distributed import World
    from coca.train.engines import build_engine
    from coca.train.optim import build_optimizer, build_scheduler
    torch.manual_seed(0)
    model = coca.create_model(load_run_config(None, ["model.text.vocab_size=64"]).model).train()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    engine = build_engine("single", model, opt, build_scheduler(opt, OptimConfig(), 10), torch.device("cpu"), World(),
                          grad_clip=1.0)
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(3, 64, (4, 8))
    poison = {"on": True}
    model.text_decoder.register_forward_hook(lambda m, a, out: out * float("nan") if poison["on"] else out)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    host_reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: host_reads.append(t) or real_bool(t))
    outcome = engine.run_step([(images, tokens)], CoCaLoss(1.0, 1.0, 0))
    assert not host_reads  # decided on the device
    monkeypatch.undo()
    assert outcome.counted and not torch.isfinite(outcome.losses.loss) and engine.streak.value() == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(float(s["step"]) == 0 for s in opt.state.values())  # Adam's bias correction did not advance
    assert engine.scheduler.last_epoch == 1
    poison["on"] = False
    outcome = engine.run_step([(images, tokens)], CoCaLoss(1.0, 1.0, 0))
    assert outcome.counted and engine.streak.value() == 0
    assert not torch.equal(model.visual.conv1.weight, before["visual.conv1.weight"])


def test_compiled_captioning_while_training_leaves_the_training_graph_compiled(tmp_path, monkeypatch):
    """train.compile with a captioning evaluation that decodes through the compiled step, every
    step: the evaluation's ``CompiledDecoder`` recompiles its own graphs for the new weights at each
    evaluation and never drops the training model's, which compiles once, at the first step
    (``torch.compiler.reset()`` on a weight change made it compile again after every evaluation).
    Dynamo's own backend for the training model (``eager``: its graph is counted and run as traced)
    keeps the test short, and dynamic shapes from the start keep a batch of longer captions from
    recompiling it; the decoding step compiles with inductor as it ships."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from coca.evaluate.synthetic import write_eval_sets
    from coca.evaluate.tasks import Evaluation
    from coca.train import train
    sets = write_eval_sets(tmp_path / "eval", n_classify=2, n_caption=4)
    training_compiles = CompileCounterWithBackend("eager")
    real_compile = torch.compile

    def compile_counting_modules(obj, **kwargs):  # the training model is a module, the decoding step a method
        if isinstance(obj, torch.nn.Module):
            return real_compile(obj, **{**kwargs, "backend": training_compiles, "dynamic": True})
        return real_compile(obj, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_counting_modules)
    seen = []  # (evaluation, training compiles so far) at each evaluation
    real_run = Evaluation.run
    monkeypatch.setattr(Evaluation, "run", lambda self, *a: seen.append((self, training_compiles.frame_count))
                        or real_run(self, *a))
    caption = {"task": "caption", "images": sets["captions"], "annotations": sets["annotations"], "compile": True,
               "strategy": "greedy", "max_new_tokens": 4, "batch_size": 4, "workers": 0}
    train(config(tmp_path, "train.steps=3", "train.checkpoint_every=3", "train.compile=true", "train.eval_every=1",
                 "train.eval=" + json.dumps([caption])), log=lambda *a: None)
    evaluation = seen[0][0]
    assert len(seen) == 3 and all(e is evaluation for e, _ in seen)  # after steps 1 and 2, and at the end
    assert evaluation.compiled.compiles == 3  # new weights at each evaluation: its graphs rebuilt
    assert [n for _, n in seen] == [training_compiles.frame_count] * 3 and training_compiles.frame_count >= 1
    evals = [r for r in train_lines(tmp_path / "run") if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3] and all("caption.CIDEr" in r for r in evals), evals


def test_a_failed_evaluation_is_recorded_and_a_bug_in_one_is_raised():
    """During training, an evaluation that fails on bad input (a UserError, e.g. its images are
    gone) is logged and recorded as "<name>.error"; any other exception is a bug and stops the run."""
    from types import SimpleNamespace

    from coca.errors import InputNotFound
    from coca.evaluate.tasks import EvalResult
    from coca.train.loop import run_evaluations

    class Stub:
        def __init__(self, name, error=None):
            self.cfg, self.error = SimpleNamespace(name=name), error

        def run(self, model, tokenizer):
            if self.error is not None:
                raise self.error
            return EvalResult(self.cfg.name, "zeroshot", {"top1": 0.5}, {})

    logged = []
    out = run_evaluations([Stub("gone", InputNotFound("images/ not found")), Stub("ok")], None, None, logged.append)
    assert out["gone.error"] == "images/ not found" and out["ok.top1"] == 0.5 and "ok.time_s" in out
    assert any("evaluation gone failed" in line for line in logged)
    for bug in (TypeError("unexpected keyword"), KeyError("top1"), ValueError("a bug's ValueError")):
        with pytest.raises(type(bug)):
            run_evaluations([Stub("buggy", bug)], None, None, logged.append)

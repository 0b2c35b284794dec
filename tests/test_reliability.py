"""Bad inputs and faults: every one ends in a clear error or a counted skip, never a hang, a
traceback or a silently wrong result."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from coca.config import ConfigError, load_run_config
from coca.errors import UserError
from coca.tokenizer import Tokenizer
from coca.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from faults import write_tar  # noqa: E402

FAST = ["model.text.vocab_size=64", "data.tokenizer_vocab_size=64", "data.tokenizer_model_type=bpe",
        "data.batch_size=4", "data.workers=0", "train.progress=false", "train.val_every=0", "train.log_every=1",
        "train.tensorboard=false", "train.threads=1", "train.steps=3"]


def run_config(tmp_path, *extra):
    return load_run_config(None, FAST + [f"train.run_dir={tmp_path / 'run'}", *extra])


# ----------------------------------------------------------------------------- config validation

@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "inf", "1e999"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="optim.lr' must be a finite number"):
        load_run_config(None, [f"optim.lr={value}"])


@pytest.mark.parametrize("value, reason", [
    ("[1, 2", "expected ',' or ']'"),
    ("!!python/object/apply:os.system ['touch PWNED']", "could not determine a constructor"),
    ("{a: 1", "expected ',' or '}'"),
])
def test_malformed_set_values_name_the_key(tmp_path, value, reason):
    with pytest.raises(ConfigError, match=f"--set optim.lr: cannot read the value .*{reason}"):
        load_run_config(None, [f"optim.lr={value}"])
    # the command line: exit 2, one line, no traceback, nothing executed
    proc = subprocess.run([sys.executable, "-m", "coca.cli", "train", "--set", f"optim.lr={value}",
                           "--set", f"train.run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "optim.lr" in proc.stderr
    assert not (tmp_path / "PWNED").exists()


def test_one_pair_per_step_is_refused_for_contrastive_training():
    with pytest.raises(ConfigError, match="data.batch_size=1 .* at least 2 pairs"):
        load_run_config(None, ["data.batch_size=1"])
    # GradCache gives the contrastive loss 2 pairs; a captioning-only run needs one
    assert load_run_config(None, ["data.batch_size=1", "train.accum_steps=2"]).data.batch_size == 1
    assert load_run_config(None, ["data.batch_size=1", "loss.contrastive_weight=0"]).data.batch_size == 1


def test_caption_only_training_runs_at_batch_size_one(tmp_path):
    cfg = run_config(tmp_path, "data.batch_size=1", "loss.contrastive_weight=0", "train.steps=2",
                     "data.tokenizer_train_captions=500")
    assert train(cfg, log=lambda *a: None)["step"] == 2


# ---------------------------------------------------------------------------------------- hangs

def test_training_on_data_that_is_all_bad_stops_with_the_skip_counts(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(b"not an image")
    (tmp_path / "data.csv").write_text("filepath,caption\n" + "".join(f"{i}.jpg,a red circle {i}\n" for i in range(4)))
    cfg = run_config(tmp_path, "data.kind=csv", f"data.train={tmp_path / 'data.csv'}", "data.tokenizer_vocab_size=16")
    with pytest.raises(UserError, match=r"50 steps in a row had fewer than 2 valid samples .*data.csv.*"
                                        r"'decode_error': 200"):
        train(cfg, log=lambda *a: None)


@pytest.mark.parametrize("workers", [0, 1])
def test_an_empty_shard_stops_instead_of_looping(tmp_path, workers):
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    cfg = run_config(tmp_path, "data.kind=webdataset", f"data.train={tmp_path / 'empty.tar'}",
                     f"data.workers={workers}", "data.tokenizer=" + str(_tokenizer(tmp_path)))
    with pytest.raises(UserError, match="empty.tar yielded no sample: the shards are empty or not tar files"):
        train(cfg, log=lambda *a: None)


def _tokenizer(tmp_path):
    return Tokenizer.train([f"a {c} circle" for c in ("red", "green", "blue")] * 20, vocab_size=16,
                           out_dir=tmp_path / "tok", model_type="bpe").path


def test_no_valid_caption_for_the_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no caption to train a tokenizer on"):
        Tokenizer.train(["", "  ", "\n"], vocab_size=16, out_dir=tmp_path)
    (tmp_path / "data.csv").write_text("filepath,caption\na.jpg,\nb.jpg,  \n")
    cfg = run_config(tmp_path, "data.kind=csv", f"data.train={tmp_path / 'data.csv'}")
    with pytest.raises(UserError, match=r"tokenizer training on data.train=.*data.csv.*no caption"):
        train(cfg, log=lambda *a: None)


# -------------------------------------------------------------------------- silent wrong results

def gradient_16bit_png() -> bytes:
    """A left-to-right 16-bit greyscale gradient over the full range: its 8-bit mean is ~128."""
    import io

    import numpy as np
    from PIL import Image
    a = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (96, 1))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_high_bit_depth_images_keep_their_brightness(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from coca.data.samples import decode_image, to_rgb
    from coca.data.transforms import load_image
    data = gradient_16bit_png()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I;16") and np.asarray(im.convert("RGB")).mean() > 240  # PIL alone: near white
    (tmp_path / "g.png").write_bytes(data)
    for image in (decode_image(data), load_image(tmp_path / "g.png")):
        rgb = np.asarray(image)
        assert image.mode == "RGB" and abs(rgb.mean() - 127.5) < 1
        assert rgb[:, 0].max() == 0 and rgb[:, -1].min() == 255  # the ends of the range map to black and white
    # 32-bit integer and float images: by their range unless already 8-bit / unit range
    ramp = np.tile(np.arange(96, dtype=np.int32), (8, 1))
    assert np.asarray(to_rgb(Image.fromarray(ramp))).max() == 95  # values 0-95: already 8-bit
    assert np.asarray(to_rgb(Image.fromarray(ramp * 1000))).max() == 255
    assert abs(np.asarray(to_rgb(Image.fromarray(ramp.astype(np.float32) / 95))).mean() - 127.5) < 1
    assert np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 7, np.int32) * 1000))).max() == 0  # constant


def test_prepare_writes_a_16bit_png_at_its_real_brightness(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from coca.cli import main
    write_tar(tmp_path / "in.tar", [("g.png", gradient_16bit_png()), ("g.txt", b"a grey gradient from left to right")])
    assert main(["data", "prepare", "--input", str(tmp_path / "in.tar"), "--output", str(tmp_path / "out"),
                 "--set", "filters.min_side=64", "--set", "workers=1"]) == 0
    (shard,) = sorted((tmp_path / "out").glob("*.tar"))
    with tarfile.open(shard) as tf:
        (jpg,) = [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    assert abs(np.asarray(Image.open(io.BytesIO(jpg))).mean() - 127.5) < 3


def test_samples_made_of_links_are_rejected_not_lost(tmp_path):
    import pyarrow.parquet as pq

    from coca.cli import main
    from coca.data.readers import read_tar_groups
    from coca.data.samples import Skipped
    from coca.prepare.planted import jpeg, random_photo
    photo = jpeg(random_photo(3, 96))
    tar = write_tar(tmp_path / "in.tar", [("ok.jpg", photo), ("ok.txt", b"a photo of a garden in spring")],
                    links=[("linked.jpg", "/etc/passwd"), ("linked.txt", "/etc/hostname")])
    with tarfile.open(tar, "a") as tf:  # a sample with a real caption and a linked image
        import io
        info = tarfile.TarInfo("half.txt")
        info.size = 12
        tf.addfile(info, io.BytesIO(b"half a photo"))
        link = tarfile.TarInfo("half.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "ok.jpg"
        tf.addfile(link)
    read = list(read_tar_groups(str(tar)))
    assert [r.key for r in read] == ["ok", "linked", "half"]
    assert [r.reason for r in read if isinstance(r, Skipped)] == ["unsupported_member"] * 2
    out = tmp_path / "out"
    assert main(["data", "prepare", "--input", str(tar), "--output", str(out), "--set", "filters.min_side=64",
                 "--set", "workers=1"]) == 0
    rejects = {r["key"]: r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert rejects == {"linked": "unsupported_member", "half": "unsupported_member"}
    stats = __import__("json").loads((out / "stats.json").read_text())
    assert stats["input_samples"] == 3 == stats["output_samples"] + sum(stats["rejected_by_reason"].values())


# ------------------------------------------------------------------------------------- recovery

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("finished")
    cfg = run_config(root, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                     "data.tokenizer_train_captions=500")
    train(cfg, log=lambda *a: None)
    return root / "run"


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "truncated safetensors": lambda step: _truncate(step / "model.safetensors"),
    "garbled safetensors header": lambda step: (step / "model.safetensors").write_bytes(
        b"\x13\x37" * 64 + (step / "model.safetensors").read_bytes()[128:]),
    "truncated state": lambda step: _truncate(step / "state.pt"),
    "missing state": lambda step: (step / "state.pt").unlink(),
    "empty step folder": lambda step: [p.unlink() for p in step.iterdir()],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        finished_run, tmp_path, damage):
    import shutil

    from safetensors.torch import load_file
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "model")
    DAMAGE[damage](run / "checkpoints" / "step_00000004")
    lines = []
    cfg = load_run_config(str(run / "config.yaml"), [f"train.run_dir={run}"])
    summary = train(cfg, log=lines.append)
    assert any("step_00000004 does not load" in line and "moved aside" in line for line in lines), lines
    assert any("resumed from" in line and "step_00000002" in line for line in lines)
    assert summary["step"] == 4
    assert (run / "checkpoints" / "step_00000004.damaged").is_dir()  # kept for a post-mortem, not deleted
    assert (run / "checkpoints" / "step_00000004" / "model.safetensors").is_file()  # saved again
    # steps 3-4 redone from step 2 give exactly the uninterrupted run's model
    redone, reference = load_file(run / "model" / "model.safetensors"), load_file(finished_run / "model" / "model.safetensors")
    assert redone.keys() == reference.keys() and all(torch.equal(redone[k], reference[k]) for k in reference)


def test_no_loadable_checkpoint_is_an_error_and_a_config_mismatch_moves_nothing(finished_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for step in (run / "checkpoints").glob("step_*"):
        (step / "state.pt").unlink()
    cfg = load_run_config(str(run / "config.yaml"), [f"train.run_dir={run}"])
    with pytest.raises(UserError, match="no checkpoint in .* loads; the damaged ones were moved aside"):
        train(cfg, log=lambda *a: None)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.damaged", "step_00000004.damaged"]
    # a checkpoint that is fine but does not fit changed settings stays where it is
    run2 = tmp_path / "run2"
    shutil.copytree(finished_run, run2)
    cfg = load_run_config(str(run2 / "config.yaml"), [f"train.run_dir={run2}", "optim.freeze=visual", "train.steps=6"])
    with pytest.raises(UserError, match="parameter groups differ"):
        train(cfg, log=lambda *a: None)
    assert sorted(p.name for p in (run2 / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def _no_space(*args, **kwargs):
    import errno
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_checkpointing_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import coca.train.checkpoint as checkpoint
    cfg = run_config(tmp_path, "train.steps=4", "train.checkpoint_every=2", "data.tokenizer_train_captions=500")
    real_save, saves = torch.save, []

    def save_once(*args, **kwargs):  # the first checkpoint is written; the disk is full at the second
        saves.append(1)
        return real_save(*args, **kwargs) if len(saves) == 1 else _no_space()
    monkeypatch.setattr(checkpoint.torch, "save", save_once)
    with pytest.raises(UserError, match=r"no space left on the device writing .*checkpoints/step_00000004$"):
        train(cfg, log=lambda *a: None)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # no half-written or hidden leftovers
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    lines = []
    assert train(cfg, log=lines.append)["step"] == 4  # space again: the run resumes from the intact one
    assert any("resumed from" in line and "step_00000002" in line for line in lines)


def test_a_full_disk_while_exporting_or_logging_is_one_clear_error(tmp_path, monkeypatch):
    import builtins

    import coca.io
    cfg = run_config(tmp_path, "train.steps=2", "train.checkpoint_every=2", "data.tokenizer_train_captions=500")
    monkeypatch.setattr(coca.io.os, "fdopen", _no_space)  # every atomic write: here the exported model
    train_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"no space left on the device writing .*(model|tokenizer|config)"):
        train(cfg, log=lambda *a: None)
    assert not [p for p in train_dir.rglob("*.tmp")]
    monkeypatch.undo()
    real_open = builtins.open

    def open_metrics(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            _no_space()
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_metrics)
    cfg = run_config(tmp_path / "again", "train.steps=2", "data.tokenizer_train_captions=500")
    with pytest.raises(UserError, match=r"no space left on the device writing .*metrics.jsonl$"):
        train(cfg, log=lambda *a: None)


def test_a_torn_metrics_line_is_dropped_with_a_warning(finished_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "model")
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # the append a crash cut short
    lines = []
    cfg = load_run_config(str(run / "config.yaml"), [f"train.run_dir={run}"])
    assert train(cfg, log=lines.append)["step"] == 4
    assert any(f"dropped 1 unreadable line(s) of {metrics}" in line for line in lines), lines
    records = [__import__("json").loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------- signals

def _train_in_own_group(run, *extra):
    import os
    args = [sys.executable, "-m", "coca.cli", "train"]
    for o in FAST + [f"train.run_dir={run}", "train.steps=1000", "train.checkpoint_every=500", "data.workers=1",
                     "data.tokenizer_train_captions=500", *extra]:
        args += ["--set", o]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=env)


def _wait_for_steps(run, proc, step=3, timeout=120):
    import json
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any(json.loads(x).get("step", 0) >= step
                                    for x in metrics.read_text().splitlines() if x.endswith("}")):
            return
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_whole_group_checkpoints_and_exits_0(tmp_path, signame):
    """What `timeout`, `scancel` and Ctrl-C do: the signal reaches the data workers too."""
    import os
    import signal
    run = tmp_path / "run"
    proc = _train_in_own_group(run)
    _wait_for_steps(run, proc)
    os.killpg(proc.pid, getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert f"stopped by signal ({signame}) at step".encode() in out + err
    (saved,) = (run / "checkpoints").iterdir()
    assert int(saved.name.split("_")[1]) >= 3 and "Traceback" not in err.decode()


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    import os
    import signal
    import time
    run = tmp_path / "run"
    proc = _train_in_own_group(run, "data.batch_size=256")  # steps of about a second: both arrive in one
    _wait_for_steps(run, proc, step=2)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)  # the first one handled (two pending ones would merge into one)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.decode().rstrip().endswith("interrupted"), err.decode()[-2000:]
    assert b"stopped by signal" not in out + err and "Traceback" not in err.decode()


# ------------------------------------------------------------------------------ long csv fields

def test_a_csv_with_a_huge_field_is_read_and_the_long_caption_skipped(tmp_path):
    from PIL import Image

    from coca.data.readers import CsvSource
    from coca.data.samples import Skipped
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "data.csv").write_text("filepath,caption\n"
                                       f"a.png,{'word ' * 40_000}\n"  # 200 KB: over the csv module's 128 KB
                                       "a.png,a short caption\n")
    source = CsvSource(tmp_path / "data.csv")
    first, second = source.load(0), source.load(1)
    assert isinstance(first, Skipped) and first.reason == "caption_too_long"
    assert second[1] == "a short caption"


def test_an_image_that_decodes_but_fails_its_transform_skips_only_itself(tmp_path):
    from PIL import Image

    from coca.evaluate.common import ImageFiles, image_batches
    for i in range(5):
        Image.new("RGB", (40 + i, 40), (i, 0, 0)).save(tmp_path / f"{i}.png")
    paths = [tmp_path / f"{i}.png" for i in range(5)]
    original = ImageFiles.__init__

    def fragile(self, *args, **kwargs):  # the transform fails on the 42-pixel-wide image alone
        original(self, *args, **kwargs)
        transform = self.transform
        self.transform = lambda im: (_ for _ in ()).throw(ValueError("bad")) if im.width == 42 else transform(im)
    ImageFiles.__init__ = fragile
    try:
        skipped = []
        batches = list(image_batches(paths, 32, batch_size=4, skipped=skipped))
    finally:
        ImageFiles.__init__ = original
    assert [i for positions, _ in batches for i in positions] == [0, 1, 3, 4]
    assert skipped == [{"path": str(paths[2]), "reason": "decode_error"}]


# ---------------------------------------------------------------------- the test machine's tools

def test_a_missing_program_fails_in_ci_and_skips_elsewhere(monkeypatch):
    import shutil

    from conftest import require_program
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="needs java"):
        require_program("java", why="the COCO caption scorers")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="needs java"):
        require_program("java", why="the COCO caption scorers")


def test_system_packages_that_cannot_be_installed_are_an_error(tmp_path):
    import os
    import shutil
    bin_dir = tmp_path / "bin"  # a PATH with none of the packages and no apt-get
    bin_dir.mkdir()
    os.symlink(shutil.which("id"), bin_dir / "id")
    script = Path(__file__).resolve().parents[1] / "scripts" / "ensure-system-packages.sh"
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    proc = subprocess.run(["/bin/bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "could not install default-jre-headless g++ ninja-build chromium" in proc.stderr
    allowed = subprocess.run(["/bin/bash", str(script)], env={**env, "COCA_ALLOW_MISSING_SYSTEM_PACKAGES": "1"},
                             capture_output=True, text=True)
    assert allowed.returncode == 0 and "error: could not install" in allowed.stderr


def test_a_run_that_ends_with_its_data_workers_alive_still_exits(tmp_path):
    """Workers ignore a SIGTERM sent to the process group, but not the one their own main process
    sends (DataLoader / multiprocessing ``terminate()``): an interpreter that exits while a loader
    is still alive (held by a traceback, say) must not wait for its workers forever."""
    script = tmp_path / "leak.py"
    script.write_text(f"""
from coca.config import load_run_config
from coca.data.loader import train_batches
from coca.tokenizer import Tokenizer
tok = Tokenizer.train(["a red circle", "a blue square"] * 20, vocab_size=16, out_dir={str(tmp_path)!r},
                      model_type="bpe")
batches = train_batches(load_run_config(None, ["data.workers=2", "data.batch_size=4"]).data, 64, tok, seed=0)
next(batches)
print("exiting with the loader alive", flush=True)
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------------------------------------- one run per directory

def test_a_second_training_on_a_run_directory_refuses_and_a_killed_ones_lock_does_not_block_resume(tmp_path):
    import json
    import signal
    import time
    run_dir = tmp_path / "run"
    settings = [f"train.run_dir={run_dir}", "train.steps=400", "train.checkpoint_every=2", "train.log_every=1",
                "data.batch_size=8", "data.workers=0", "train.progress=false", "train.val_every=0",
                "train.tensorboard=false", "train.threads=1", "train.precision=fp32", "model.text.vocab_size=64",
                "data.tokenizer_vocab_size=64", "data.tokenizer_model_type=bpe", "data.tokenizer_train_captions=500"]
    def command(items):
        return [sys.executable, "-m", "coca.cli", "train", *[a for item in items for a in ("--set", item)]]
    cmd = command(settings)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.5)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert "is in use" in second.stderr and f"pid {first.pid}" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    from coca.layout import step_of
    latest = max(s for s in map(step_of, (p.name for p in (run_dir / "checkpoints").iterdir())) if s is not None)
    # the killed run's lock file is still there, with its pid; the resume takes the lock all the same
    assert f"pid {first.pid}" in (run_dir / "train.lock").read_text()
    resumed = subprocess.run(command([settings[0], f"train.steps={latest + 2}", *settings[2:]]),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"split"' not in x]
    assert steps[-1] == latest + 2 and steps == sorted(set(steps))  # resumed from its checkpoint, no mixed lines


def test_resume_with_another_tokenizer_is_refused_naming_both_fingerprints(tmp_path):
    """A changed data.tokenizer, or the same path retrained, would give the step-N weights ids that
    mean other pieces; before the first checkpoint a new one simply replaces the run's copy."""
    from coca.train.loop import fingerprint
    captions = [f"a {c} {s}" for c in ("red", "blue", "green", "pink") for s in ("circle", "square", "star")] * 20
    first = Tokenizer.train(captions, vocab_size=40, out_dir=tmp_path / "tok1", model_type="bpe")
    other = Tokenizer.train([c.upper() + " now" for c in captions], vocab_size=44, out_dir=tmp_path / "tok2",
                            model_type="bpe")
    train(run_config(tmp_path, f"data.tokenizer={first.path}", "train.checkpoint_every=3"), log=lambda *a: None)
    run_tok = tmp_path / "run" / "tokenizer.model"
    assert fingerprint(run_tok) == fingerprint(first.path)
    with pytest.raises(ConfigError, match=rf"fingerprint {fingerprint(other.path)}.*fingerprint {fingerprint(first.path)}"):
        train(run_config(tmp_path, f"data.tokenizer={other.path}", "train.steps=5"), log=lambda *a: None)
    first.path.write_bytes(other.path.read_bytes())  # retrained in place, same path
    with pytest.raises(ConfigError, match="is not the tokenizer this run's checkpoints were trained with"):
        train(run_config(tmp_path, f"data.tokenizer={first.path}", "train.steps=5"), log=lambda *a: None)
    # the run's own copy (or no data.tokenizer) resumes
    summary = train(run_config(tmp_path, f"data.tokenizer={run_tok}", "train.steps=5"), log=lambda *a: None)
    assert summary["step"] == 5 and fingerprint(run_tok) != fingerprint(other.path)


def test_numeric_class_names_are_names_not_indices(tmp_path):
    """Class names "1".."4" and "10": a label that is a class name is that class (read as an index,
    "1" would be class "2" and "10" out of range); a number that names no class is still an index."""
    from PIL import Image

    from coca.evaluate.zeroshot import labelled_images
    names = ["1", "2", "3", "4", "10"]
    for c in names:
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / c / "a.png")
    by_folder = labelled_images(tmp_path, None, names)
    assert by_folder.mapping == "by name"
    assert {p.parent.name: names[label] for p, label in zip(by_folder.paths, by_folder.labels)} == {c: c for c in names}
    (tmp_path / "labels.csv").write_text("1/a.png,1\n2/a.png,2\n10/a.png,10\n4/a.png,0\n")
    by_file = labelled_images(tmp_path, tmp_path / "labels.csv", names)
    assert [names[label] for label in by_file.labels] == ["1", "2", "10", "1"]

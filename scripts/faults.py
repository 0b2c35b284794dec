"""The fault-injection suite: bad inputs and injected faults against training, data preparation,
evaluation and captioning, with one table of what went wrong.

    .venv/bin/python scripts/faults.py [--json FILE] [--keep DIR]       (what `make faults` runs)

It builds a corpus of bad inputs (truncated, zero-byte, non-image, decompression-bomb, CMYK, RGBA,
palette, 1x1, animated GIF and 16-bit images; non-UTF-8, empty and huge captions; malformed CSVs;
tar shards with path-traversal, symlink and corrupt members, empty and non-tar shards; malformed
settings), runs the commands over it, and injects faults into training: SIGKILL at random steps
(5 times, resuming each time), SIGTERM to the whole process group, a damaged latest checkpoint,
a full disk, non-finite losses. Every probe runs in a child process with a time limit.

Each probe reports, against an expectation written in the probe:
  hang       the child did not finish in its time limit
  crash      an exception escaped the command (a traceback instead of a one-line error)
  wrong      a silently wrong result: a wrong exit code, a model that differs from the
             uninterrupted run's, an image decoded at the wrong brightness, a file written
             outside the output folder
  unaccounted  input samples or files that are neither in the output nor counted as skipped
  lost       checkpoints that existed before a fault and no longer load after it
Every count but "inputs" must be 0; the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN = ["model.text.vocab_size=64", "data.tokenizer_vocab_size=32", "data.tokenizer_model_type=bpe",
         "data.tokenizer_train_captions=300", "data.batch_size=4", "data.workers=0", "train.progress=false",
         "train.val_every=0", "train.log_every=1", "train.tensorboard=false", "train.threads=1"]
TIME_LIMIT_S = 120


@dataclass
class Outcome:
    inputs: int = 1
    crash: int = 0
    wrong: list[str] = field(default_factory=list)
    unaccounted: int = 0
    lost: int = 0


# ------------------------------------------------------------------------------------ the corpus

def _png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(seed: int, size: int = 72) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(6, 6, 3)).astype(np.uint8)
    return Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)


def gradient16() -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 65535, 72).astype(np.uint16), (72, 1)))


def bad_images() -> dict[str, bytes]:
    """name -> bytes; the first group cannot be used, the second must decode (and look right)."""
    good = _png(photo(1), "JPEG")
    bomb = bytearray(_png(Image.new("RGB", (1, 1))))
    import struct
    import zlib
    bomb[16:24] = struct.pack(">II", 40000, 40000)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    frames = [Image.new("P", (72, 72), i * 40) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "truncated.jpg": good[: len(good) // 2], "zero.jpg": b"", "text.png": b"this is not an image",
        "bomb.png": bytes(bomb),
        "cmyk.jpg": _png(photo(2).convert("CMYK"), "JPEG"), "rgba.png": _png(photo(3).convert("RGBA")),
        "palette.png": _png(photo(4).convert("P")), "one.png": _png(Image.new("RGB", (1, 1), (9, 9, 9))),
        "anim.gif": gif.getvalue(), "grey16.png": _png(gradient16()),
    }


UNUSABLE = {"truncated.jpg", "zero.jpg", "text.png", "bomb.png"}


def write_tar(path: Path, members: list[tuple[str, bytes]], links: list[tuple[str, str]] = ()) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return path


def captions() -> dict[str, bytes]:
    return {"latin1": "un caf\xe9 cr\xe8me".encode("latin-1"), "empty": b"   ", "huge": b"word " * 30_000}


# --------------------------------------------------------------------------------- running probes

def run_child(fn, *args, limit: float = TIME_LIMIT_S) -> tuple[str, object]:
    """Run ``fn(*args)`` in a forked child in its own process group: ("ok", result), ("crash",
    traceback) or ("hang", None)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        os.setpgid(0, 0)
        try:
            payload = ("ok", fn(*args))
        except BaseException:  # noqa: BLE001 - reported to the parent
            payload = ("crash", traceback.format_exc())
        with os.fdopen(write, "w") as f:
            json.dump(payload, f, default=str)
        os._exit(0)
    os.close(write)
    deadline = time.time() + limit
    while time.time() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        return "hang", None
    with os.fdopen(read) as f:
        text = f.read()
    return tuple(json.loads(text)) if text else ("crash", "the child died without a result")


def cli(argv: list[str]) -> dict:
    """``coca`` in this process: exit code, stderr and stdout (a traceback escapes as a crash)."""
    from coca.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return {"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()}


def train_argv(run: Path, *extra: str) -> list[str]:
    return ["train"] + sum((["--set", s] for s in [*TRAIN, f"train.run_dir={run}", *extra]), [])


def expect_rc(result: dict, rc: int, what: str) -> list[str]:
    if result["rc"] != rc:
        return [f"{what}: exit {result['rc']}, expected {rc}: {result['stderr'].strip()[-300:]}"]
    if rc == 2 and ("Traceback" in result["stderr"] or len(result["stderr"].strip().splitlines()) > 3):
        return [f"{what}: exit 2 but not a short message: {result['stderr'][-300:]}"]
    return []


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    import torch
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def loadable_checkpoints(run: Path) -> set[str]:
    from coca.train.checkpoint import checkpoint_dirs
    ok = set()
    for path in checkpoint_dirs(run / "checkpoints"):
        try:
            import torch
            from safetensors.torch import load_file
            load_file(str(path / "model.safetensors"))
            torch.load(path / "state.pt", weights_only=True)
            ok.add(path.name)
        except Exception:  # noqa: BLE001
            pass
    return ok


def wait_for_step(run: Path, step: int, pid: int, limit: float = 60) -> bool:
    deadline = time.time() + limit
    while time.time() < deadline:
        f = run / "metrics.jsonl"
        if f.exists():
            steps = [json.loads(x).get("step", 0) for x in f.read_text().splitlines() if x.endswith("}")]
            if steps and max(steps) >= step:
                return True
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
        time.sleep(0.02)
    return False


# ------------------------------------------------------------------------------------- the probes

def probe_settings(root: Path) -> Outcome:
    bad = ["optim.lr=.inf", "optim.lr=nan", "optim.lr=[1, 2", "optim.lr=!!python/object/apply:os.system ['touch PWNED']",
           "train.steps=many", "data.batch_size=1", "data.kind=parquet", "train.stpes=3", "optim.freeze=nothing",
           "model.text.vocab_size=-1"]
    o = Outcome(inputs=len(bad))
    for i, setting in enumerate(bad):
        status, r = run_child(cli, train_argv(root / f"settings{i}", "train.steps=1", setting))
        o.crash += status != "ok"
        if status == "ok":
            o.wrong += expect_rc(r, 2, f"--set {setting}")
    if (Path.cwd() / "PWNED").exists() or (root / "PWNED").exists():
        o.wrong.append("a YAML tag in --set was executed")
    return o


def probe_prepare(root: Path) -> Outcome:
    """Every input key is in the output or in the rejects; nothing is written outside the output."""
    images, caps = bad_images(), captions()
    members, expected = [], set()
    for name, data in images.items():
        key = name.replace(".", "_")
        members += [(f"{key}.{name.rsplit('.', 1)[1]}", data), (f"{key}.txt", f"a picture called {key}".encode())]
        expected.add(key)
    for i, (key, data) in enumerate(caps.items()):
        members += [(f"cap_{key}.jpg", _png(photo(10 + i), "JPEG")), (f"cap_{key}.txt", data)]
        expected.add(f"cap_{key}")
    members += [("../../escape.jpg", _png(photo(20), "JPEG")), ("../../escape.txt", b"a path that climbs out")]
    members += [("nocap.jpg", _png(photo(21), "JPEG"))]
    expected |= {"nocap"}
    src = root / "prep_in"
    src.mkdir()
    write_tar(src / "bad.tar", members, links=[("linked.jpg", "/etc/passwd"), ("linked.txt", "/etc/hostname")])
    expected.add("linked")
    good = _png(photo(30), "JPEG")
    raw = bytearray(tarfile_bytes([("ok.jpg", good), ("ok.txt", b"a colourful photo of a field")]))
    (src / "cut.tar").write_bytes(bytes(raw[: len(raw) - 700]))  # ends inside the last member
    (src / "notatar.tar").write_bytes(b"plain text, not a tar archive")
    write_tar(src / "empty.tar", [])
    out = root / "prep_out"
    status, r = run_child(cli, ["data", "prepare", "--input", *sorted(map(str, src.glob("*.tar"))),
                                "--output", str(out), "--set", "filters.min_side=1", "--set", "workers=1"])
    o = Outcome(inputs=len(members) // 2 + 4)
    if status != "ok":
        o.crash += 1
        return o
    o.wrong += expect_rc(r, 0, "data prepare")
    if r["rc"] != 0:
        return o
    import pyarrow.parquet as pq
    rejects = {x["key"]: x["reason"] for x in pq.read_table(out / "rejects.parquet").to_pylist()}
    kept, brightness = {}, {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            data = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, blob in data.items():
            if name.endswith(".json"):
                uid = name[:-5]
                meta = json.loads(blob)
                key = meta.get("source_key", uid)
                kept[key] = uid
                brightness[key] = np.asarray(Image.open(io.BytesIO(data[f"{uid}.jpg"]))).mean()
    seen = set(kept) | set(rejects)
    missing = {k for k in expected if not any(k == s or s.endswith(k) for s in seen)}
    o.unaccounted += len(missing)
    stats = json.loads((out / "stats.json").read_text())
    if stats["input_samples"] != stats["output_samples"] + sum(stats["rejected_by_reason"].values()):
        o.wrong.append(f"data prepare: input {stats['input_samples']} != output + rejects")
    for key, mean in brightness.items():
        if "grey16" in key and not 100 < mean < 155:
            o.wrong.append(f"data prepare: the 16-bit gradient was written with mean {mean:.0f} (expected ~128)")
    for unusable in UNUSABLE:
        if unusable.replace(".", "_") in kept:
            o.wrong.append(f"data prepare kept the unusable {unusable}")
    if list(root.glob("escape*")) or list(root.parent.glob("escape*")) or list(out.parent.glob("**/escape.jpg")):
        o.wrong.append("a path-traversal member was written outside the output")
    # the same inputs through the partitioned deduplication, two samples per partition
    status, r = run_child(cli, ["data", "prepare", "--input", *sorted(map(str, src.glob("*.tar"))), "--output",
                                str(root / "prep_parts"), "--set", "filters.min_side=1", "--set", "workers=1",
                                "--set", "dedup.partitioned=true", "--set", "dedup.partition_samples=2"])
    if status != "ok":
        o.crash += 1
    elif r["rc"] != 0 or any((root / "prep_parts" / f.name).read_bytes() != f.read_bytes()
                             for f in [out / "rejects.parquet", *out.glob("*.tar")]):
        o.wrong.append("data prepare: the partitioned deduplication gave another output")
    return o


def tarfile_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def image_folder(root: Path, name: str, with_good: int = 3) -> tuple[Path, list[str]]:
    folder = root / name
    folder.mkdir(parents=True)
    files = []
    for fname, data in bad_images().items():
        (folder / fname).write_bytes(data)
        files.append(fname)
    for i in range(with_good):
        photo(40 + i).save(folder / f"good{i}.png")
        files.append(f"good{i}.png")
    return folder, files


def probe_caption(root: Path, model: Path) -> Outcome:
    folder, files = image_folder(root, "caption_in")
    out = root / "captions.jsonl"
    status, r = run_child(cli, ["caption", str(folder), "--model", str(model), "--out", str(out), "--batch-size", "4"])
    o = Outcome(inputs=len(files))
    if status != "ok":
        o.crash += 1
        return o
    o.wrong += expect_rc(r, 0, "caption")
    done = {Path(json.loads(x)["path"]).name for x in out.read_text().splitlines()} if out.exists() else set()
    skipped = sum(int(n) for n in _skip_counts(r["stdout"] + r["stderr"]).values())
    o.unaccounted += abs(len(files) - len(done) - skipped)
    o.wrong += [f"caption: the unusable {n} got a caption" for n in UNUSABLE if n in done]
    return o


def _skip_counts(text: str) -> dict:
    import ast
    import re
    m = re.search(r"skipped unreadable images: (\{[^}]*\})", text)
    return ast.literal_eval(m.group(1)) if m else {}


def probe_zeroshot(root: Path, model: Path) -> Outcome:
    classes = root / "zeroshot_in"
    files = 0
    for cls in ("red circle", "blue square"):
        folder, names = image_folder(classes, cls.replace(" ", "_"), with_good=2)
        files += len(names)
    out = root / "zeroshot.json"
    status, r = run_child(cli, ["eval", "zeroshot", "--model", str(model), "--images", str(classes),
                                "--dataset", "folder", "--out", str(out)])
    o = Outcome(inputs=files)
    if status != "ok":
        o.crash += 1
        return o
    o.wrong += expect_rc(r, 0, "eval zeroshot")
    if out.exists():
        res = json.loads(out.read_text())
        o.unaccounted += abs(files - res["metrics"]["n_images"] - sum(res["skipped"].values()))
    else:
        o.wrong.append("eval zeroshot wrote no results")
    return o


def probe_training_data(root: Path) -> Outcome:
    """Training over a CSV mixing good rows with every bad image and caption kind finishes and
    counts its skips; data with no usable sample, an empty shard and a non-tar shard stop with a
    one-line error instead of looping."""
    o = Outcome(inputs=0)
    folder, files = image_folder(root, "train_in", with_good=6)
    rows = ["filepath,caption"] + [f"{f},a picture named {f.split('.')[0]}" for f in files]
    rows += ["good0.png,", 'good1.png,"' + "long " * 3000 + '"', "missing.png,a file that is not there"]
    (folder / "mixed.csv").write_text("\n".join(rows) + "\n")
    (folder / "latin1.csv").write_bytes(b"filepath,caption\ngood0.png,caf\xe9\n" + b"good1.png,a photo\n" * 3)
    (folder / "allbad.csv").write_text("filepath,caption\n" + "".join(f"{n},a broken picture\n" for n in UNUSABLE))
    (folder / "nocolumn.csv").write_text("path,text\ngood0.png,a photo\n")
    (folder / "nocaptions.csv").write_text("filepath,caption\ngood0.png,\ngood1.png,  \n")
    (folder / "empty.csv").write_text("")
    (folder / "ragged.csv").write_text('filepath,caption\ngood0.png\ngood1.png,a,b,c\ngood2.png,"unclosed\n')
    write_tar(root / "empty.tar", [])
    (root / "text.tar").write_bytes(b"not a tar at all")
    tok = f"data.tokenizer={root / 'tok' / 'tokenizer.model'}"
    cases = [  # (name, extra settings, expected exit code)
        ("mixed", ["data.kind=csv", f"data.train={folder / 'mixed.csv'}", "train.steps=6", tok], 0),
        ("latin1", ["data.kind=csv", f"data.train={folder / 'latin1.csv'}", "train.steps=2", tok], 0),
        ("ragged", ["data.kind=csv", f"data.train={folder / 'ragged.csv'}", "train.steps=2", tok], None),
        ("nocaptions", ["data.kind=csv", f"data.train={folder / 'nocaptions.csv'}", "train.steps=2"], 2),
        ("allbad", ["data.kind=csv", f"data.train={folder / 'allbad.csv'}", "train.steps=3"], 2),
        ("nocolumn", ["data.kind=csv", f"data.train={folder / 'nocolumn.csv'}", "train.steps=3"], 2),
        ("emptycsv", ["data.kind=csv", f"data.train={folder / 'empty.csv'}", "train.steps=3"], 2),
        ("emptytar", ["data.kind=webdataset", f"data.train={root / 'empty.tar'}", "train.steps=3",
                      f"data.tokenizer={root / 'tok' / 'tokenizer.model'}"], 2),
        ("texttar", ["data.kind=webdataset", f"data.train={root / 'text.tar'}", "train.steps=3",
                     f"data.tokenizer={root / 'tok' / 'tokenizer.model'}"], 2),
    ]
    for name, extra, rc in cases:
        o.inputs += 1
        status, r = run_child(cli, train_argv(root / f"data_{name}", *extra))
        if status == "hang":
            o.wrong.append(f"training on {name}: no result in {TIME_LIMIT_S} s")
            continue
        if status != "ok":
            o.crash += 1
            continue
        if rc is None:  # either a clear error or a run with counted skips
            o.wrong += expect_rc(r, r["rc"] if r["rc"] in (0, 2) else 0, f"training on {name}")
        else:
            o.wrong += expect_rc(r, rc, f"training on {name}")
        if name == "mixed" and r["rc"] == 0:
            last = [json.loads(x) for x in (root / "data_mixed" / "metrics.jsonl").read_text().splitlines()][-1]
            if not set(last["skipped"]) >= {"decode_error", "too_many_pixels", "missing_image", "empty_caption",
                                            "caption_too_long"}:
                o.wrong.append(f"training on mixed: skip reasons {sorted(last['skipped'])}")
    return o


def _reference(root: Path) -> Path:
    run = root / "reference"
    status, r = run_child(cli, train_argv(run, *FAULT_RUN))
    if status != "ok" or r["rc"] != 0:
        raise SystemExit(f"the reference run failed: {status} {r}")
    return run


FAULT_RUN = ["train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=8",
             "data.tokenizer_train_captions=300"]


def check_resume(o: Outcome, run: Path, reference: Path, what: str, extra=None) -> None:
    """Rerun the same command: it must finish with the uninterrupted run's model, bit for bit."""
    status, r = run_child(cli, train_argv(run, *(extra or FAULT_RUN)))
    if status != "ok":
        o.crash += 1
    elif r["rc"] != 0 or not same_weights(run / "model", reference / "model"):
        o.wrong.append(f"the run resumed after {what} differs from the uninterrupted run "
                       f"(exit {r['rc']}: {r['stderr'].strip()[-200:]})")


def probe_sigkill(root: Path, reference: Path, kills: int = 5, seed: int = 0) -> Outcome:
    """SIGKILL at random steps, resuming after each: the final model equals the uninterrupted one."""
    from coca.cli import main
    o = Outcome(inputs=kills)
    run, rng = root / "killed", random.Random(seed)
    for _ in range(kills):
        before = loadable_checkpoints(run) if run.exists() else set()
        at = rng.randint(1, 7)
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                try:
                    main(train_argv(run, *FAULT_RUN))
                finally:
                    os._exit(0)
        wait_for_step(run, at, pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        o.lost += len(before - loadable_checkpoints(run))
    check_resume(o, run, reference, f"{kills} SIGKILLs")
    return o


def probe_sigterm_group(root: Path, reference: Path) -> Outcome:
    """SIGTERM to the whole process group (data workers included): a checkpoint, exit 0, then an
    exact resume."""
    from coca.cli import main
    o = Outcome()
    run = root / "sigterm"
    extra = [*FAULT_RUN, "train.checkpoint_every=100", "data.workers=1"]
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            code = 1
            try:
                code = main(train_argv(run, *extra))
            finally:
                os._exit(code)
    reached = wait_for_step(run, 3, pid)
    os.killpg(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if not reached or code != 0:
        o.wrong.append(f"SIGTERM to the group: exit {code} (reached step 3: {reached})")
    if not loadable_checkpoints(run):
        o.lost += 1
    check_resume(o, run, reference, "SIGTERM", extra)
    return o


def probe_damaged_checkpoint(root: Path, reference: Path) -> Outcome:
    o = Outcome(inputs=3)
    for kind in ("truncate", "garble", "empty"):
        run = root / f"damaged_{kind}"
        shutil.copytree(reference, run)
        shutil.rmtree(run / "model")
        last = sorted((run / "checkpoints").glob("step_*"))[-1]
        target = last / "model.safetensors"
        if kind == "truncate":
            target.write_bytes(target.read_bytes()[:1000])
        elif kind == "garble":
            target.write_bytes(os.urandom(64) + target.read_bytes()[64:])
        else:
            for p in last.iterdir():
                p.unlink()
        check_resume(o, run, reference, f"a {kind}d checkpoint")
        if not (last.parent / f"{last.name}.damaged").is_dir():
            o.lost += 1
    return o


def _train_with_full_disk(run: Path) -> dict:
    import errno

    import torch

    import coca.train.checkpoint as checkpoint
    real, calls = torch.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    checkpoint.torch.save = save
    return cli(train_argv(run, *FAULT_RUN))


def probe_full_disk(root: Path, reference: Path) -> Outcome:
    o = Outcome()
    run = root / "full"
    status, r = run_child(_train_with_full_disk, run)
    if status != "ok":
        o.crash += 1
        return o
    o.wrong += expect_rc(r, 2, "disk full while checkpointing")
    if "no space left" not in r["stderr"]:
        o.wrong.append(f"disk full: the message does not say so: {r['stderr'][-200:]}")
    o.lost += len({"step_00000002"} - loadable_checkpoints(run))
    check_resume(o, run, reference, "a full disk")
    return o


def _train_with_nan(run: Path, every_step: bool) -> dict:
    import torch

    from coca import losses
    real, calls = losses.CoCaLoss.__call__, []

    def poisoned(self, outputs, tokens):
        calls.append(1)
        out = real(self, outputs, tokens)
        if every_step or len(calls) == 3:
            out = losses.Losses(out.loss * torch.nan, out.contrastive, out.caption)
        return out
    losses.CoCaLoss.__call__ = poisoned
    return cli(train_argv(run, "train.steps=30", "train.checkpoint_every=30", "data.tokenizer_train_captions=300"))


def probe_nan(root: Path) -> Outcome:
    o = Outcome(inputs=2)
    for every_step, rc in ((False, 0), (True, 2)):
        status, r = run_child(_train_with_nan, root / f"nan_{every_step}", every_step)
        if status != "ok":
            o.crash += 1
            continue
        o.wrong += expect_rc(r, rc, "a NaN loss " + ("at every step" if every_step else "once"))
    return o


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the table and every finding as JSON here")
    p.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    p.add_argument("--only", action="append", help="run only the probes whose name contains this (repeatable)")
    args = p.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="coca_faults_")).resolve() / "work"
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    from coca.tokenizer import Tokenizer
    Tokenizer.train([f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")] * 10,
                    vocab_size=32, out_dir=root / "tok", model_type="bpe")
    print("reference training run ...", flush=True)
    reference = _reference(root)
    probes = {
        "settings": lambda: probe_settings(root),
        "data prepare": lambda: probe_prepare(root),
        "captioning": lambda: probe_caption(root, reference / "model"),
        "zero-shot evaluation": lambda: probe_zeroshot(root, reference / "model"),
        "training data": lambda: probe_training_data(root),
        "SIGKILL x5 + resume": lambda: probe_sigkill(root, reference),
        "SIGTERM to the group": lambda: probe_sigterm_group(root, reference),
        "damaged checkpoint": lambda: probe_damaged_checkpoint(root, reference),
        "full disk": lambda: probe_full_disk(root, reference),
        "non-finite loss": lambda: probe_nan(root),
    }
    if args.only:
        probes = {k: v for k, v in probes.items() if any(o.lower() in k.lower() for o in args.only)}
    rows, findings = [], []
    for name, probe in probes.items():
        t0 = time.time()
        status, result = run_child(lambda probe=probe: probe().__dict__, limit=6 * TIME_LIMIT_S)
        if status == "ok":
            out = Outcome(**result)
            hang = sum("no result in" in w for w in out.wrong)
        else:
            out, hang = Outcome(crash=int(status == "crash")), int(status == "hang")
            findings.append(f"{name}: the probe itself {'hung' if hang else 'failed'}: {result}")
        wrong = [w for w in out.wrong if "no result in" not in w]
        findings += [f"{name}: {w}" for w in out.wrong]
        rows.append({"probe": name, "inputs": out.inputs, "hangs": hang, "crashes": out.crash, "wrong": len(wrong),
                     "unaccounted": out.unaccounted, "lost": out.lost, "seconds": round(time.time() - t0, 1)})
        print(f"  {name}: {rows[-1]}", flush=True)
    total = {k: sum(r[k] for r in rows) for k in ("inputs", "hangs", "crashes", "wrong", "unaccounted", "lost")}
    print()
    print("| probe | inputs | hangs | crashes | silent wrong results | samples unaccounted for | checkpoints lost |")
    print("|---|---|---|---|---|---|---|")
    for r in rows + [{"probe": "**total**", **total}]:
        print(f"| {r['probe']} | {r['inputs']} | {r['hangs']} | {r['crashes']} | {r['wrong']} | {r['unaccounted']} | "
              f"{r['lost']} |")
    for f in findings:
        print("  -", f)
    print(f"\n{time.time() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "total": total, "findings": findings,
                                               "seconds": round(time.time() - start, 1)}, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(root.parent, ignore_errors=True)
    return 0 if all(v == 0 for k, v in total.items() if k != "inputs") else 1


if __name__ == "__main__":
    sys.exit(main())

"""Progress off a terminal: whole lines at an interval, never carriage-return frames."""

import io
import os
import subprocess
import sys
import time

import pytest

from coca import progress
from coca.progress import LineProgress, progress_bar


def test_line_progress_writes_one_line_per_interval_and_one_at_close(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = LineProgress(total=200, desc="train", unit="step", file=out, interval=10)
    bar.set_postfix({"loss": "1.234"}, refresh=False)
    for _ in range(100):  # 100 s of one update a second: a line at 10 s, 20 s, ... 100 s
        clock[0] += 1
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10 + 1
    assert lines[0].startswith("train: 10/200 (5%)") and "loss=1.234" in lines[0] and "eta 03:10" in lines[0]
    assert lines[-1].startswith("train: 100/200 (50%), 01:40 elapsed, 1 step/s")


def test_progress_bar_is_tqdm_on_a_terminal_and_lines_elsewhere():
    assert isinstance(progress_bar(3, file=io.StringIO()), LineProgress)
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = progress_bar(3, desc="x", file=tty)
        assert not isinstance(bar, LineProgress) and type(bar).__name__ == "tqdm"
        bar.close()
    os.close(master)


@pytest.fixture(scope="module")
def piped(trained, planted, tmp_path_factory):
    """Runs a command with its stdout and stderr piped (as in CI or a job's log file)."""
    root = tmp_path_factory.mktemp("piped")

    def run(*argv):
        env = {**os.environ, "COCA_PROGRESS_INTERVAL": "1"}
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "coca.cli", *map(str, argv)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:]
        return done.stdout, time.monotonic() - t0
    return run, trained, planted, root


def progress_lines(out: str, desc: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{desc}: ")]


@pytest.mark.parametrize("command", ["train", "caption", "index", "eval", "prepare"])
def test_piped_commands_write_bounded_progress_lines_without_carriage_returns(piped, command):
    run, trained, (planted_root, _, _), root = piped
    (root / "templates.txt").write_text("a photo of {}.\n")
    if command == "train":
        out, seconds = run("train", "--set", "model.text.vocab_size=64", "--set", "data.tokenizer_vocab_size=64",
                           "--set", "data.tokenizer_model_type=bpe", "--set", "data.tokenizer_train_captions=500",
                           "--set", "data.batch_size=8", "--set", "data.workers=0", "--set", "train.steps=6",
                           "--set", "train.val_every=0", "--set", "train.tensorboard=false",
                           "--set", "train.log_every=2", "--set", f"train.run_dir={root / 'run'}")
        desc = "train"
    elif command == "caption":
        out, seconds = run("caption", trained["captions"], "--model", trained["model"], "--max-new-tokens", "4")
        desc = "caption"
    elif command == "index":
        out, seconds = run("index", trained["captions"], "--model", trained["model"], "--out", root / "index")
        desc = "index"
    elif command == "eval":
        out, seconds = run("eval", "zeroshot", "--model", trained["model"], "--dataset", "folder",
                           "--images", trained["classify"], "--templates", root / "templates.txt", "--out", root / "zeroshot.json")
        desc = "zero-shot"
    else:
        out, seconds = run("data", "prepare", "--input", planted_root / "in", "--output", root / "prepared",
                           "--set", "workers=1")
        desc = ""
    assert "\r" not in out
    lines = progress_lines(out, desc) if desc else [x for x in out.splitlines() if "/s" in x and "elapsed" in x]
    # one line per second of the run at most (COCA_PROGRESS_INTERVAL=1) plus the closing line of each bar
    assert 1 <= len(lines) <= seconds + 3, out[-3000:]
    assert all("elapsed" in x for x in lines)

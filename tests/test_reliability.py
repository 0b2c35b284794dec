"""Bad inputs and faults: every one ends in a clear error or a counted skip, never a hang, a
traceback or a silently wrong result."""

import subprocess
import sys
import tarfile

import pytest

from coca.config import ConfigError, load_run_config
from coca.errors import UserError
from coca.tokenizer import Tokenizer
from coca.train import train

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

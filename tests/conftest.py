import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COCA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; run with COCA_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def require_program(*names: str, why: str) -> str:
    """The path of the first of ``names`` on PATH. Missing: a skip on a developer's machine, a
    failure in CI (CI=true), where `make test` must have installed it."""
    import shutil
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"needs {names[0]} ({why}); `make test` installs it with apt-get"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def java_runtime():
    return require_program("java", why="the COCO caption scorers")


@pytest.fixture
def tiny():
    import coca
    torch.manual_seed(0)
    return coca.create_model("coca-tiny").eval()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A coca-tiny trained for a few steps, the same architecture with random weights, and the
    held-out synthetic scenes written to disk (with one corrupt image in each set)."""
    import coca
    from coca.config import load_run_config
    from coca.evaluate.synthetic import write_eval_sets
    from coca.train import train
    root = tmp_path_factory.mktemp("eval")
    cfg = load_run_config(None, [
        "model.text.vocab_size=64", "data.tokenizer_vocab_size=64", "data.tokenizer_model_type=bpe",
        "data.tokenizer_train_captions=2000", "data.batch_size=16", "data.workers=0", "train.progress=false",
        "train.val_every=0", "train.log_every=10", "train.tensorboard=false", "train.threads=2",
        "optim.lr=2e-3", "train.steps=60", "train.checkpoint_every=60", f"train.run_dir={root / 'run'}"])
    model_dir = train(cfg, log=lambda *a: None)["model_dir"]
    trained_model = coca.load(model_dir)
    torch.manual_seed(1)
    random_dir = coca.create_model(trained_model.cfg).save_pretrained(root / "random", tokenizer=trained_model.tokenizer)
    sets = write_eval_sets(root / "data", n_classify=72, n_caption=40)
    (root / "data" / "classify" / "red_circle" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "data" / "captions" / "00003.png").write_bytes(b"")
    return {"model": model_dir, "random": str(random_dir), **sets, "root": root}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """160 img2dataset-layout samples in 4 tar shards: 120 distinct pictures and 40 planted copies."""
    from coca.prepare.planted import planted_samples, write_shards
    root = tmp_path_factory.mktemp("planted")
    samples, truth = planted_samples(120, 40, seed=3, size=128)
    write_shards(samples, root / "in", 40)
    return root, samples, truth

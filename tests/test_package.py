"""The package outside the checkout: a wheel built from this tree, installed into a fresh virtual
environment, run from a directory with no `configs/` in it. The shipped recipes resolve by name,
and training, evaluation, data preparation and the server's page find their packaged files."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin dir, working directory): the wheel installed without its dependencies,
    which come from this environment's site-packages through a .pth file (nothing downloaded but
    the build backend). This environment's editable `coca` is not on that path: its finder is
    itself a .pth file, and .pth files named inside a .pth file are not processed."""
    root = tmp_path_factory.mktemp("package")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(root / "dist"), str(ROOT)],
                           capture_output=True, text=True, cwd=root, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # no deprecation warning from the build backend (project.license is an SPDX string): its class is
    # SetuptoolsDeprecationWarning or BuildBackendWarning depending on the setuptools release
    warned = [x for x in (build.stdout + build.stderr).splitlines() if "Warning:" in x and "deprecated" in x.lower()]
    assert not warned, warned
    wheel = next((root / "dist").glob("coca-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "_coca_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = root / "work"
    work.mkdir()
    return python, python.parent, work


def coca(installed, *args, timeout=300):
    python, bin_dir, work = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run([str(bin_dir / "coca"), *map(str, args)], capture_output=True, text=True, cwd=work,
                          env=env, timeout=timeout)
    assert done.returncode == 0, f"coca {' '.join(map(str, args))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_installed_package_is_the_wheel(installed):
    python, _, work = installed
    where = subprocess.run([str(python), "-c", "import coca; print(coca.__file__)"], capture_output=True, text=True,
                           cwd=work, check=True).stdout.strip()
    assert str(ROOT / "src") not in where and where.startswith(str(python.parents[1])), where


def test_recipes_by_name_train_demo_eval_prepare_and_the_page_from_the_wheel(installed, tmp_path):
    httpx = pytest.importorskip("httpx")
    python, _, work = installed
    listed = coca(installed, "list")
    for name in ("coca-large-v2", "demo", "finetune-coco-captions", "finetune-retrieval", "prepare"):
        assert f"\n{name} " in listed, listed
    coca(installed, "train", "--config", "demo", "--set", "train.steps=2", "--set", "data.workers=0",
         "--set", "train.run_dir=run", "--set", "train.progress=false")
    model = work / "run" / "model"
    assert (model / "model.safetensors").is_file() and (work / "run" / "config.yaml").is_file()
    coca(installed, "demo", "--out", "demo", "--set", "train.steps=2", "--set", "data.workers=0")
    demo = json.loads((work / "demo" / "metrics.json").read_text())
    assert demo["steps"] == 2 and demo["n_zeroshot_images"] > 0 and (work / "demo" / "model" / "config.json").is_file()
    # the default templates are the shipped file (CLIP's 80)
    coca(installed, "synthetic", "--out", "scenes", "--n-classify", "36", "--n-caption", "4")
    coca(installed, "eval", "zeroshot", "--model", model, "--images", "scenes/classify", "--dataset", "folder",
         "--out", "zeroshot.json", "--workers", "0")
    assert json.loads((work / "zeroshot.json").read_text())["metrics"]["n_images"] == 36

    from coca.prepare.planted import planted_samples, write_shards
    samples, _ = planted_samples(8, 2, seed=1, size=96)
    write_shards(samples, tmp_path / "raw", 5)
    coca(installed, "data", "prepare", "--input", tmp_path / "raw", "--output", "clean", "--config", "prepare",
         "--set", "filters.min_side=64", "--set", "workers=1")
    stats = json.loads((work / "clean" / "stats.json").read_text())
    assert stats["input_samples"] == 10 and stats["output_samples"] == 8, stats  # the 2 planted copies go

    from coca.serve.process import spawn_server
    proc, url = spawn_server(str(model), python=str(python), cwd=str(work))
    try:
        page = httpx.get(url + "/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower() and "caption" in page.text.lower()
    finally:
        proc.kill()
        proc.wait()


def test_a_missing_recipe_names_the_shipped_ones(installed):
    python, bin_dir, work = installed
    done = subprocess.run([str(bin_dir / "coca"), "train", "--config", "coca-huge"], capture_output=True, text=True,
                          cwd=work)
    assert done.returncode == 2 and "coca-huge" in done.stderr and "coca-large-v2" in done.stderr, done.stderr

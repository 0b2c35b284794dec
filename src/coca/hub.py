"""Models on the Hugging Face Hub: ``hf-hub:ORG/NAME[@REVISION]`` wherever a model directory is
taken, and sharing a model directory as a Hub repository with a model card.

Everything goes through ``huggingface_hub``: its cache (``HF_HUB_CACHE`` / ``HF_HOME``), its
revisions and ``HF_HUB_OFFLINE``, its token (``HF_TOKEN`` or ``huggingface-cli login``). A name
that is neither cached nor reachable is a one-line error saying which.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .clip_tokenizer import VOCAB_FILE
from .errors import InputNotFound, UserError
from .models.coca import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

PREFIX = "hf-hub:"
# what a model directory holds (coca.models.coca): the files a load needs and those a push shares
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, VOCAB_FILE)
CARD_EXTRAS = ("eval.json",)
# open_clip's file names for its published weights, the safe one first (as open_clip tries them)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def is_hub(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (repo id, revision or None)."""
    name = spec[len(PREFIX):]
    repo, _, revision = name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{spec!r} is not a Hub model name: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401 (a submodule the package does not import itself)
    except ImportError:
        raise UserError("hf-hub: names need the huggingface_hub package (pip install huggingface_hub)") from None
    return huggingface_hub


class _Missing(Exception):
    """A file the repository lacks (or, offline, the cache lacks) when another may stand in."""


def _fetch(spec: str, what, action, missing_ok: bool = False):
    """Run a download ``action`` (a callable), turning the Hub's errors into one-line ones."""
    hub = _hub()
    errors = hub.errors
    try:
        return action()
    except errors.LocalEntryNotFoundError:
        if missing_ok:
            raise _Missing from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise InputNotFound(f"{spec}: {what} is not in the local Hugging Face cache and {why}; download it once "
                            "where the Hub is reachable (or point HF_HUB_CACHE at a cache that holds it)") from None
    except errors.RepositoryNotFoundError:
        raise InputNotFound(f"{spec}: no such model repository on the Hub (or it is private: log in with "
                            "`huggingface-cli login` or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise InputNotFound(f"{spec}: the repository has no such revision") from None
    except errors.EntryNotFoundError:
        if missing_ok:
            raise _Missing from None
        raise InputNotFound(f"{spec}: the repository has no {what}") from None


def model_dir(spec) -> Path:
    """A model directory for ``spec``: a local path as given, or the Hub snapshot of an
    ``hf-hub:`` name (only the model's files), downloaded into the Hugging Face cache if needed."""
    if not is_hub(spec):
        return Path(spec)
    repo, revision = parse(spec)
    hub = _hub()
    path = _fetch(spec, "the model", lambda: hub.snapshot_download(
        repo, revision=revision, allow_patterns=[*MODEL_FILES, *CARD_EXTRAS, "README.md"]))
    return Path(path)


def file(spec: str, names: tuple[str, ...]) -> Path:
    """The first of ``names`` that the Hub repository of ``spec`` holds, from the cache or downloaded."""
    repo, revision = parse(spec)
    hub = _hub()
    for i, name in enumerate(names):
        last = i == len(names) - 1
        try:
            return Path(_fetch(spec, " or ".join(names) if last else name,
                               lambda n=name: hub.hf_hub_download(repo, n, revision=revision), missing_ok=not last))
        except _Missing:
            continue
    raise AssertionError("unreachable")


# --- sharing ---------------------------------------------------------------------------------

def model_card(directory: Path, repo_id: str) -> str:
    """The README.md a push writes: Hub metadata (``library_name: coca``), how to use the model,
    its config, the training config of the run it came from and its evaluation results where the
    directory (or its run) has them."""
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    family = cfg.get("family", "t5")
    v, t = cfg["vision"], cfg["text"]
    tags = ["coca", "image-captioning", "image-to-text", "zero-shot-image-classification", "image-text-retrieval"]
    if family == "open_clip":
        tags.append("open_clip")
    lines = ["---", "library_name: coca", "pipeline_tag: image-to-text", "tags:", *[f"- {tag}" for tag in tags], "---", "",
             f"# {repo_id}", "",
             f"A CoCa contrastive-captioning model ({'open_clip CoCa architecture' if family == 'open_clip' else 'ViT + T5'}, "
             f"preset `{cfg.get('name', 'custom')}`): ViT {v['width']}x{v['layers']} with patch {v['patch_size']} at "
             f"{v['image_size']}px, text width {t['d_model']} with {t['encoder_layers']}+{t['decoder_layers']} layers, "
             f"vocabulary {t['vocab_size']}.", "",
             "## Use", "", "```python", "import coca", "", f'model = coca.load("hf-hub:{repo_id}")',
             "captions = model.tokenizer.decode(model.generate(images))  # images: [B, 3, H, W], normalised", "```", "",
             "```bash", f"coca caption --model hf-hub:{repo_id} photos/ --out captions.jsonl",
             f"coca serve --model hf-hub:{repo_id}", "```", "",
             "## Model config", "", "```json", json.dumps(cfg, indent=2), "```"]
    train_config = directory.parent / "config.yaml"  # a run's model/ or best/ sits in its run directory
    if train_config.is_file() and (directory.name in ("model", "best")):
        lines += ["", "## Training config", "", "```yaml", train_config.read_text().rstrip(), "```"]
    results = directory / "eval.json"
    if results.is_file():
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flat(json.loads(results.read_text()))]
    return "\n".join(lines) + "\n"


def _flat(data, prefix: str = ""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(data, (int, float, str, bool)) or data is None:
        yield prefix.rstrip("."), data


def push_plan(directory: str | os.PathLike, repo_id: str) -> dict[str, bytes]:
    """The files a push uploads, by name: the model directory's model files and eval.json, and the
    model card as README.md."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise InputNotFound(f"{directory} is not a model directory (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{repo_id!r} is not a Hub repository name: expected ORG/NAME")
    files = {name: (directory / name).read_bytes() for name in (*MODEL_FILES, *CARD_EXTRAS) if (directory / name).is_file()}
    files["README.md"] = model_card(directory, repo_id).encode()
    return files


def push(directory: str | os.PathLike, repo_id: str, private: bool = False, commit_message: str | None = None,
         token: str | None = None) -> str:
    """Create (or reuse) the Hub repository ``repo_id`` and upload the push plan in one commit;
    returns the commit's URL."""
    files = push_plan(directory, repo_id)
    hub = _hub()
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                     commit_message=commit_message or f"Upload {Path(directory).name} with coca")
        except hub.errors.HfHubHTTPError as e:
            raise UserError(f"pushing to {repo_id}: {e}") from None
    return str(getattr(info, "commit_url", info))


def push_model(model, repo_id: str, **options) -> str:
    """``model.push_to_hub``: save it (with its tokenizer) and push that directory."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        return push(Path(tmp) / "model", repo_id, **options)

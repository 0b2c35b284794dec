"""From a model directory to a fine-tuned, evaluated model: warm start, freezing, per-part learning
rates, COCO-format training data, evaluation during training and the best model kept."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import coca
from coca.config import ConfigError, OptimConfig, load_run_config
from coca.train import train
from coca.train.optim import param_groups

FAST = ["data.batch_size=8", "data.workers=0", "train.progress=false", "train.val_every=0", "train.log_every=1",
        "train.tensorboard=false", "train.threads=1", "train.precision=fp32", "optim.lr=1e-3"]
PRETRAIN = ["model.text.vocab_size=64", "data.tokenizer_vocab_size=64", "data.tokenizer_model_type=bpe",
            "data.tokenizer_train_captions=2000"]
quiet = dict(log=lambda *a: None)


def run(tmp, name, *extra):
    return train(load_run_config(None, FAST + [f"train.run_dir={tmp / name}", *extra]), **quiet)


def eval_lines(run_dir):
    return [x for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if x.get("split") == "eval"]


def train_losses(run_dir):
    return {x["step"]: x["loss"] for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "split" not in x}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A briefly pretrained tiny model (synthetic scenes) and held-out sets in the layouts `coca eval` reads."""
    from coca.evaluate.synthetic import write_eval_sets
    root = tmp_path_factory.mktemp("finetune")
    run(root, "pre", *PRETRAIN, "train.steps=80", "train.checkpoint_every=80", "data.batch_size=16")
    write_eval_sets(root / "train_set", n_classify=18, n_caption=160, seed=1, split="train")
    write_eval_sets(root / "val_set", n_classify=36, n_caption=40, seed=2, split="val")
    return root


def coco_data(work):
    return ["data.kind=coco", f"data.train={work / 'train_set/captions.json'}",
            f"data.image_root={work / 'train_set/captions'}"]


def caption_eval(work, **extra):
    spec = {"task": "caption", "images": str(work / "val_set/captions"), "annotations": str(work / "val_set/captions.json"),
            "strategy": "greedy", "max_new_tokens": 12, "workers": 0, **extra}
    return "train.eval=" + json.dumps([spec])


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------- warm start

def test_init_from_with_zero_steps_exports_the_loaded_model_bitwise(work, tmp_path):
    summary = run(tmp_path, "zero", f"train.init_from={work / 'pre/model'}", "train.steps=0")
    assert summary["finished"] and summary["step"] == 0
    assert same_tensors(load_file(str(work / "pre/model/model.safetensors")),
                        load_file(str(tmp_path / "zero/model/model.safetensors")))
    assert (tmp_path / "zero/model/tokenizer.model").read_bytes() == (work / "pre/model/tokenizer.model").read_bytes()
    report = json.loads((tmp_path / "zero/init.json").read_text())
    assert report["missing"] == [] and report["unexpected"] == [] and report["loaded"] > 100


def test_init_from_takes_the_architecture_and_refuses_shape_overrides(work, tmp_path):
    init = f"train.init_from={work / 'pre/model'}"
    cfg = load_run_config(None, [init, "model.text.dropout=0.1", "model.max_logit_scale=50"])
    assert cfg.model.text.vocab_size == 64 and cfg.model.text.dropout == 0.1 and cfg.model.max_logit_scale == 50
    with pytest.raises(ConfigError, match=r"model.text.d_model=256 would change the architecture.*remove model.text.d_model"):
        load_run_config(None, [init, "model.text.d_model=256"])
    with pytest.raises(ConfigError, match="model.preset='coca-base' with this config's overrides differs"):
        load_run_config(None, [init, "model.preset=coca-base"])
    # the very config the directory was trained with (its preset and its overrides) is accepted;
    # the bare preset is not, naming what differs
    same = load_run_config(None, [init, "model.preset=coca-tiny", *PRETRAIN[:1]])
    assert same.model.to_dict() == coca.load(work / "pre/model").cfg.to_dict()
    with pytest.raises(ConfigError, match=r"text.vocab_size \(1024 here, 64 there\)"):
        load_run_config(None, [init, "model.preset=coca-tiny"])
    with pytest.raises(ConfigError, match="model.vision.act='quick_gelu' would change"):
        load_run_config(None, [init, "model.vision.act=quick_gelu"])
    with pytest.raises(FileNotFoundError, match="model directory"):
        load_run_config(None, [f"train.init_from={tmp_path / 'nowhere'}"])


def test_init_from_refuses_a_tokenizer_larger_than_the_vocabulary(work, tmp_path):
    big = coca.Tokenizer.train([f"word{i} thing{i} item{i}" for i in range(300)], vocab_size=200, out_dir=tmp_path / "tok",
                               model_type="bpe")
    assert big.vocab_size > 64
    with pytest.raises(ConfigError, match=rf"has {big.vocab_size} ids but the model's vocabulary .* is 64"):
        run(tmp_path, "bigtok", f"train.init_from={work / 'pre/model'}", f"data.tokenizer={big.path}", "train.steps=1")
    # and a model directory carrying such a tokenizer is refused when loaded
    bad = tmp_path / "bad_model"
    shutil.copytree(work / "pre/model", bad)
    shutil.copy(big.path, bad / "tokenizer.model")
    with pytest.raises(ValueError, match=rf"has {big.vocab_size} ids but the model's vocabulary"):
        coca.load(bad)


def test_partial_init_lists_missing_and_unexpected_tensors(work, tmp_path):
    from safetensors.torch import save_file
    partial = tmp_path / "no_poolers"
    shutil.copytree(work / "pre/model", partial)
    state = load_file(str(partial / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith(("gen_pooler.", "contrastive_pooler."))}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(partial / "model.safetensors"))
    with pytest.raises(ValueError, match="init_strict=false"):
        run(tmp_path, "strict", f"train.init_from={partial}", "train.steps=0")
    logged = []
    cfg = load_run_config(None, FAST + [f"train.run_dir={tmp_path / 'loose'}", f"train.init_from={partial}",
                                        "train.init_strict=false", "train.steps=0"])
    train(cfg, log=logged.append)
    report = json.loads((tmp_path / "loose/init.json").read_text())
    expected_missing = sorted(k for k in load_file(str(work / "pre/model/model.safetensors")) if "pooler." in k)
    assert sorted(report["missing"]) == expected_missing and report["unexpected"] == ["extra.weight"]
    for name in expected_missing + ["extra.weight"]:
        assert any(name in line for line in logged)
    out = load_file(str(tmp_path / "loose/model/model.safetensors"))
    assert all(torch.equal(out[k], state[k]) for k in state if k in out)  # everything present was loaded
    state["visual.conv1.weight"] = torch.zeros(3)  # a misshapen tensor is an error even when not strict
    save_file(state, str(partial / "model.safetensors"))
    from coca.errors import UserError
    with pytest.raises(UserError, match="visual.conv1.weight has shape"):
        run(tmp_path, "loose2", f"train.init_from={partial}", "train.init_strict=false", "train.steps=0")


def test_resume_refuses_changed_optimiser_groups(tmp_path):
    from coca.errors import UserError
    run(tmp_path, "groups", *PRETRAIN, "train.steps=4", "train.checkpoint_every=2")
    shutil.rmtree(tmp_path / "groups/checkpoints/step_00000004")
    with pytest.raises(UserError, match="parameter groups differ from the checkpoint"):
        run(tmp_path, "groups", *PRETRAIN, "train.steps=4", "train.checkpoint_every=2", "optim.freeze=[visual]")


def test_resumed_run_ignores_init_from(work, tmp_path):
    init = work / "init_copy"
    shutil.copytree(work / "pre/model", init, dirs_exist_ok=True)
    args = [f"train.init_from={init}", "train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    run(tmp_path, "straight", *args)
    run(tmp_path, "resumed", *args)
    shutil.rmtree(tmp_path / "resumed/checkpoints/step_00000006")  # as if killed after the step-3 checkpoint
    shutil.rmtree(tmp_path / "resumed/model")
    shutil.rmtree(init)  # a resumed run needs neither the directory nor its weights any more
    summary = run(tmp_path, "resumed", *args)
    assert summary["finished"]
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")


# --------------------------------------------------------------------------- freezing and rates

def test_frozen_tower_is_bitwise_unchanged_and_outside_the_optimiser(work, tmp_path):
    run(tmp_path, "frozen", f"train.init_from={work / 'pre/model'}", "train.steps=4", "optim.freeze=[visual, temperature]")
    before = load_file(str(work / "pre/model/model.safetensors"))
    after = load_file(str(tmp_path / "frozen/model/model.safetensors"))
    frozen = [k for k in before if k.startswith("visual.") or k == "logit_scale"]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["gen_pooler.query"], after["gen_pooler.query"])  # the rest trains
    model = coca.create_model(load_run_config(None, PRETRAIN).model)
    from coca.train.optim import freeze
    freeze(model, ["visual"])
    in_optimiser = {id(p) for g in param_groups(model, OptimConfig()) for p in g["params"]}
    assert not any(id(p) in in_optimiser for p in model.visual.parameters())
    images = torch.randn(2, 3, 64, 64)
    assert not model.visual(images).requires_grad  # no graph is built through the frozen tower
    with pytest.raises(ConfigError, match="did you mean 'visual'"):
        load_run_config(None, ["optim.freeze=[vision]"])


def test_lr_mult_and_layer_decay_rates():
    cfg = load_run_config(None, ["optim.lr=0.01", "optim.lr_mult={visual: 0.1, lm_head: 2}", "optim.layer_decay=0.5"])
    model = coca.create_model(cfg.model)
    rate = {id(p): g["lr"] for g in param_groups(model, cfg.optim) for p in g["params"]}
    named = dict(model.named_parameters())
    n_vit, n_enc, n_dec = cfg.model.vision.layers, cfg.model.text.encoder_layers, cfg.model.text.decoder_layers
    expected = {  # lr x lr_mult x 0.5 ** (N + 1 - depth); inputs depth 0, block i depth i + 1, outputs N + 1
        "visual.conv1.weight": 0.01 * 0.1 * 0.5 ** (n_vit + 1),
        "visual.blocks.0.attn.qkv.weight": 0.01 * 0.1 * 0.5 ** n_vit,
        f"visual.blocks.{n_vit - 1}.mlp.c_fc.weight": 0.01 * 0.1 * 0.5,
        "visual.ln_post.weight": 0.01 * 0.1,
        "text_encoder.embed_tokens.weight": 0.01 * 0.5 ** (n_enc + 1),
        "text_encoder.blocks.1.ff.wo.weight": 0.01 * 0.5 ** (n_enc - 1),
        "text_decoder.position_bias.embedding.weight": 0.01 * 0.5 ** (n_dec + 1),
        "text_decoder.lm_head.weight": 0.01 * 2,
        "gen_pooler.query": 0.01, "logit_scale": 0.01,
    }
    for name, lr in expected.items():
        assert rate[id(named[name])] == pytest.approx(lr), name
    assert len(rate) == len(named)


# ------------------------------------------------------------------------ captioning data sets

def test_coco_training_data_uses_every_caption_and_karpathy_splits(tmp_path):
    from PIL import Image

    from coca.data.readers import CocoCaptionsSource
    (tmp_path / "coco/train2014").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (32, 32), "red").save(tmp_path / f"coco/train2014/{name}.jpg")
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "one"}, {"raw": "two"}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "three"}]},
        {"filepath": "train2014", "filename": "c.jpg", "split": "val", "sentences": [{"raw": "four"}]}]}))
    # images given as coco/train2014 while the paths already start with train2014/: the parent is used
    src = CocoCaptionsSource(ann, "train+restval", image_root=tmp_path / "coco/train2014")
    assert src.root.path == tmp_path / "coco" and "parent" in src.root.note
    assert [src.load(i)[1] for i in range(len(src))] == ["one", "two", "three"]
    assert [c for c in CocoCaptionsSource(ann, "train", image_root=tmp_path / "coco").captions()] == ["one", "two"]
    with pytest.raises(ValueError, match="no images in split 'test'"):
        CocoCaptionsSource(ann, "test", image_root=tmp_path / "coco")
    # the validation losses read data.val with data.val_split
    from coca.config import DataConfig
    from coca.data.loader import val_batches
    tok = coca.Tokenizer.train(["one two three four"] * 50, vocab_size=20, out_dir=tmp_path / "tok", model_type="bpe")
    cfg = DataConfig(kind="coco", train=str(ann), val=str(ann), val_split="train+val", image_root=str(tmp_path / "coco"),
                     batch_size=3)
    (batch,) = val_batches(cfg, 64, tok, 4)
    assert batch["captions"] == ["one", "four"]  # one caption per image for validation


# ---------------------------------------------------------------- evaluation during training

def test_evaluation_during_training_equals_coca_eval_and_keeps_the_best(work, tmp_path):
    evals = [{"task": "caption", "images": str(work / "val_set/captions"), "annotations": str(work / "val_set/captions.json"),
              "num_beams": 2, "max_new_tokens": 10, "workers": 0},
             {"task": "zeroshot", "images": str(work / "val_set/classify"), "classnames": str(work / "val_set/classnames.txt"),
              "templates": str(work / "val_set/templates.txt"), "workers": 0},
             {"task": "retrieval", "images": str(work / "val_set/captions"), "annotations": str(work / "val_set/captions.json"),
              "workers": 0}]
    run(tmp_path, "ev", f"train.init_from={work / 'pre/model'}", *coco_data(work), "train.steps=6",
        "train.eval=" + json.dumps(evals), "train.eval_every=3", "train.best_metric=retrieval.mean_recall")
    lines = eval_lines(tmp_path / "ev")
    assert [x["step"] for x in lines] == [3, 6]
    final = lines[-1]
    model_dir = tmp_path / "ev/model"
    cli = {"caption": ["--annotations", evals[0]["annotations"], "--num-beams", "2", "--max-new-tokens", "10", "--no-spice"],
           "zeroshot": ["--classnames", evals[1]["classnames"], "--templates", evals[1]["templates"]],
           "retrieval": ["--annotations", evals[2]["annotations"]]}
    for e in evals:
        out = tmp_path / f"{e['task']}.json"
        subprocess.run([sys.executable, "-m", "coca.cli", "eval", e["task"], "--model", str(model_dir), "--images",
                        e["images"], "--workers", "0", "--out", str(out), *cli[e["task"]]], check=True, capture_output=True)
        reported = json.loads(out.read_text())["metrics"]
        for k, v in reported.items():
            if isinstance(v, (int, float)):
                assert final[f"{e['task']}.{k}"] == pytest.approx(v, abs=1e-9), (e["task"], k)
    best = json.loads((tmp_path / "ev/best/eval.json").read_text())
    values = [x["retrieval.mean_recall"] for x in lines]
    assert best["value"] == max(values) and best["step"] == lines[values.index(max(values))]["step"]
    # the model kept in best/ is the one that scored that value
    out = tmp_path / "best_retrieval.json"
    subprocess.run([sys.executable, "-m", "coca.cli", "eval", "retrieval", "--model", str(tmp_path / "ev/best"),
                    "--images", evals[2]["images"], "--annotations", evals[2]["annotations"], "--workers", "0",
                    "--out", str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text())["metrics"]["mean_recall"] == pytest.approx(best["value"], abs=1e-9)


def test_best_metric_must_name_a_configured_evaluation(work):
    with pytest.raises(ConfigError, match="no evaluation named 'caption'"):
        load_run_config(None, ["train.best_metric=caption.CIDEr"])
    with pytest.raises(ConfigError, match="did you mean 'CIDEr'"):
        load_run_config(None, [caption_eval(work), "train.best_metric=caption.cider"])
    with pytest.raises(ConfigError, match="runs without SPICE"):
        load_run_config(None, [caption_eval(work), "train.best_metric=caption.SPICE"])


def test_bad_evaluation_input_fails_before_training(work, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        run(tmp_path, "bad_eval", "train.steps=50", caption_eval(work, annotations=str(tmp_path / "missing.json")))
    assert not (tmp_path / "bad_eval/checkpoints").exists()


def test_finetuning_from_pretrained_beats_training_from_scratch(work, tmp_path):
    """Caption-only fine-tuning on a COCO-format set from the pretrained model reaches a higher
    held-out CIDEr than the same steps from random weights (with the same tokenizer)."""
    common = [*coco_data(work), "loss.contrastive_weight=0", "train.steps=30", "train.checkpoint_every=30",
              caption_eval(work), "train.best_metric=caption.CIDEr", "data.batch_size=16"]
    run(tmp_path, "finetuned", f"train.init_from={work / 'pre/model'}", "train.eval_every=15", *common)
    run(tmp_path, "scratch", *PRETRAIN, f"data.tokenizer={work / 'pre/model/tokenizer.model'}", *common)
    tuned = eval_lines(tmp_path / "finetuned")[-1]["caption.CIDEr"]
    scratch = eval_lines(tmp_path / "scratch")[-1]["caption.CIDEr"]
    print(f"held-out CIDEr after 30 steps: fine-tuned {tuned:.3f}, from scratch {scratch:.3f}")
    assert tuned > scratch + 0.5, (tuned, scratch)
    best = json.loads((tmp_path / "finetuned/best/eval.json").read_text())
    assert best["value"] == max(x["caption.CIDEr"] for x in eval_lines(tmp_path / "finetuned"))
    assert (tmp_path / "finetuned/best/model.safetensors").is_file()


# ---------------------------------------------------------------- zero-shot class-name mapping

def test_zeroshot_maps_folders_to_class_names_by_name(tmp_path):
    from coca.evaluate.zeroshot import labelled_images
    for name in ("Golden_retriever", "tabby cat", "airliner"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"")
    shuffled = ["airliner", "golden retriever", "Tabby_Cat"]  # another order and spelling than the folders
    li = labelled_images(tmp_path, None, shuffled)
    assert li.mapping == "by name"
    assert {p.parent.name: shuffled[label] for p, label in zip(li.paths, li.labels)} == {
        "Golden_retriever": "golden retriever", "tabby cat": "Tabby_Cat", "airliner": "airliner"}
    other = labelled_images(tmp_path, None, ["n01", "n02", "n03"])  # names that are not the folders: sorted order
    assert other.mapping == "sorted folder order" and [p.parent.name for p in other.paths] == sorted(
        ["Golden_retriever", "tabby cat", "airliner"]) and other.labels == [0, 1, 2]


def test_shipped_finetune_recipes_load(work):
    import os
    here = os.path.join(os.path.dirname(__file__), "..", "configs")
    init = f"train.init_from={work / 'pre/model'}"
    captions = load_run_config(os.path.join(here, "finetune-coco-captions.yaml"), [init])
    assert captions.loss.contrastive_weight == 0 and captions.loss.caption_weight == 1
    assert captions.data.kind == "coco" and captions.data.split == "train+restval"
    assert captions.train.best_metric == "caption.CIDEr" and captions.train.eval[0].strategy == "beam"
    assert captions.train.eval[0].split == "val" and captions.model.text.vocab_size == 64  # from init_from
    retrieval = load_run_config(os.path.join(here, "finetune-retrieval.yaml"), [init])
    assert retrieval.loss.contrastive_weight == retrieval.loss.caption_weight == 1
    assert retrieval.train.best_metric == "retrieval.mean_recall" and retrieval.train.eval[0].task == "retrieval"

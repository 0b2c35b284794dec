"""The ``coca`` command. Entry points only: all logic lives in the importable library."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import UserError


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def cmd_list(args) -> int:
    from .config import get_preset, list_presets, list_recipes, recipes_dir
    from .models.coca import create_model
    from .summary import parameter_counts
    print(f"{'preset':<16} {'image':>6} {'vision':>18} {'text (enc+dec)':>18} {'vocab':>7} {'params':>9}")
    for name in list_presets():
        cfg = get_preset(name)
        v, t = cfg.vision, cfg.text
        total = parameter_counts(create_model(name, device="meta"))["total"]
        print(f"{name:<16} {v.image_size:>6} {f'ViT {v.width}x{v.layers} /{v.patch_size}':>18} "
              f"{f'{t.d_model}x({t.encoder_layers}+{t.decoder_layers})':>18} {t.vocab_size:>7} {_fmt_params(total):>9}")
    print(f"\n{'recipe':<24} (--config NAME: shipped with the package, in {recipes_dir()})")
    for name in list_recipes():
        text = (recipes_dir() / f"{name}.yaml").read_text().splitlines()
        first = text[0].lstrip("# ").strip() if text and text[0].startswith("#") else ""
        print(f"{name:<24} {first}")
    return 0


def cmd_info(args) -> int:
    from .models.coca import create_model
    from .components import component_label
    from .summary import branch_totals, forward_flops, parameter_counts
    model = create_model(args.preset, device="meta")
    counts = parameter_counts(model)
    flops = forward_flops(model, batch=1)
    cfg = model.cfg
    text = "T5" if cfg.family == "t5" else "open_clip CoCa: CLIP text"
    print(f"{cfg.name}: ViT {cfg.vision.width}x{cfg.vision.layers} patch {cfg.vision.patch_size} at "
          f"{cfg.vision.image_size}px; {text} d_model {cfg.text.d_model}, {cfg.text.encoder_layers}+"
          f"{cfg.text.decoder_layers} layers, {cfg.text.num_heads} heads, d_ff {cfg.text.d_ff}, "
          f"vocab {cfg.text.vocab_size}, {cfg.text.context_length} tokens")
    print(f"\n{'component':<16} {'':<26} {'parameters':>14} {'share':>7} {'fwd GFLOPs/sample':>18}")
    for comp, n in counts.items():
        if comp == "total":
            print("-" * 84)
        gf = flops.get(comp)
        gf_s = f"{gf / 1e9:.2f}" if gf is not None else ""
        label = component_label(comp, cfg.family)
        print(f"{comp:<16} {label:<26} {n:>14,} {n / counts['total']:>7.1%} {gf_s:>18}")
    print("(the component names are what optim.freeze and optim.lr_mult take)")
    visual, language = branch_totals(counts)
    print(f"\nvisual branch {_fmt_params(visual)}, language branch {_fmt_params(language)}, "
          f"total {_fmt_params(counts['total'])}")
    print(f"forward FLOPs per sample (image + {cfg.text.context_length} tokens, measured with "
          f"torch.utils.flop_counter): {flops['total'] / 1e9:.1f} GFLOPs; training step ~3x that")
    return 0


def cmd_init(args) -> int:
    from .convert import init_from_pretrained
    if args.t5 is None and args.vit is None:
        print("error: give --t5 DIR and/or --vit FILE", file=sys.stderr)
        return 2
    model = init_from_pretrained(args.preset, t5_dir=args.t5, vit_file=args.vit, vit_act=args.vit_act)
    out = model.save_pretrained(args.out)
    print(f"wrote {out} ({args.preset}; text branch from {args.t5 or 'random init'}, vision tower from "
          f"{args.vit or 'random init'}; poolers, projections and temperature freshly initialised)")
    return 0


def cmd_convert_open_clip(args) -> int:
    from .convert import convert_open_clip
    path, arch = convert_open_clip(args.checkpoint, args.out, arch=args.arch, vocab=args.vocab)
    print(f"wrote {path} (open_clip {arch}); load it with coca.load({str(path)!r}) or --model {path}")
    return 0


def cmd_push(args) -> int:
    from .hub import push, push_plan
    if args.dry_run:
        for name, data in push_plan(args.model_dir, args.repo).items():
            print(f"{name}\t{len(data)} bytes")
        return 0
    url = push(args.model_dir, args.repo, private=args.private, commit_message=args.message)
    print(f"pushed {args.model_dir} to {args.repo}: {url}\nload it with coca.load('hf-hub:{args.repo}')")
    return 0


def cmd_caption(args) -> int:
    from pathlib import Path

    from .caption_files import caption_files, collect_image_paths
    from .loading import load_model
    from .generation import GenerationConfig
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out!r} is a directory; give a .jsonl file path")
    paths = collect_image_paths(args.images)  # bad inputs fail before the model loads
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                              strategy=args.strategy, num_beams=args.num_beams, top_k=args.top_k, top_p=args.top_p,
                              temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size,
                              num_return_sequences=args.num_return_sequences, seed=args.seed, compile=args.compile)
    model = load_model(args.model, args.device, args.dtype)
    n_prefix = len(model.tokenizer.encode_ids(args.prefix)) if args.prefix else 0
    config.validate(model.cfg.text.context_length, n_prefix)
    run = caption_files(model, paths, Path(args.out) if args.out else None, batch_size=args.batch_size,
                        workers=args.workers, with_score=args.score, config=config, prefix=args.prefix or None)
    done = f"{run.captioned} images captioned in {run.seconds:.1f}s ({run.captioned / max(run.seconds, 1e-9):.1f} images/s)"
    if run.already_done:
        done += f"; {run.already_done} already in {args.out}"
    if run.skipped:
        done += f"; skipped unreadable images: {run.skipped}"
    print(done + (f"; captions in {args.out}" if args.out else ""), file=sys.stderr)
    if run.captioned == 0 and run.already_done == 0:
        raise UserError(f"none of the {run.total} images could be read ({run.skipped})")
    return 0


def cmd_serve(args) -> int:
    from .serve.app import serve
    if not 1 <= args.max_batch <= 256:
        raise UserError(f"--max-batch must be in [1, 256], got {args.max_batch}")
    if not 0 <= args.max_wait_ms <= 1000:
        raise UserError(f"--max-wait-ms must be in [0, 1000], got {args.max_wait_ms}")
    serve(args.model, args.host, args.port, args.dtype, args.index, args.api_key, args.max_batch, args.max_wait_ms,
          args.device, compile=args.compile)
    return 0


def cmd_index(args) -> int:
    from .loading import load_model
    from .serve.index import build_index
    model = load_model(args.model, args.device, args.dtype)
    run = build_index(model, args.images, args.out, model_dir=args.model, batch_size=args.batch_size,
                      workers=args.workers)
    msg = f"indexed {run.embedded} images into {args.out}"
    if run.already_done:
        msg += f"; {run.already_done} were already there"
    if run.skipped:
        msg += f"; skipped unreadable images: {run.skipped}"
    print(msg)
    return 0


def cmd_tokenizer_train(args) -> int:
    from .tokenizer import Tokenizer
    t0 = time.time()
    tok = Tokenizer.train(args.input, vocab_size=args.vocab_size, out_dir=args.out, model_type=args.model_type,
                          character_coverage=args.character_coverage, hard_vocab_limit=args.hard_vocab_limit)
    print(f"wrote {tok.path}: vocabulary {tok.vocab_size} (asked {args.vocab_size}) in {time.time() - t0:.1f}s")
    return 0


def cmd_train(args) -> int:
    from .config import load_run_config
    from .train import train
    cfg = load_run_config(args.config, args.set)
    summary = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # one summary line per launch, not per rank
        return 0
    state = "finished" if summary["finished"] else "stopped"
    print(f"{state} at step {summary['step']}; run directory {summary['run_dir']}"
          + (f"; model {summary['model_dir']}" if "model_dir" in summary else ""))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.out, args.set)
    return 0


def cmd_eval(args) -> int:
    """`coca eval zeroshot|caption|retrieval`: the same ``Evaluation`` that training runs."""
    from .config import EvalConfig
    from .evaluate.common import print_table, write_results
    from .loading import load_model
    from .evaluate.tasks import Evaluation
    task = args.eval_command
    options = {"images": args.images, "batch_size": args.batch_size, "workers": args.workers}
    if task == "zeroshot":
        options.update(dataset=args.dataset, classnames=args.classnames or "", templates=args.templates or "",
                       labels_file=args.labels_file or "", method=args.method)
    else:
        options.update(annotations=args.annotations, split=args.split or "test", limit=args.limit or 0)
    if task == "caption":
        options.update(strategy=args.strategy, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                       spice=not args.no_spice, compile=args.compile)
    evaluation = Evaluation(EvalConfig(task=task, **options))  # reads the inputs: errors before the model loads
    model = load_model(args.model, args.device, args.dtype)
    result = evaluation.run(model, model.tokenizer)
    results = {"task": task, "model": str(args.model), **result.details}
    path = write_results(args.out or f"eval_{task}.json", results)
    print_table(f"{task} ({args.model})", result.rows)
    if results.get("image_root"):
        print(f"  {results['image_root']}")
    skipped = results.get("skipped")
    if skipped:
        print(f"  skipped images: {skipped} (listed in the JSON under skipped_files)")
    for name, reason in results.get("unavailable", {}).items():
        print(f"  {name}: unavailable: {reason}")
    print(f"results and per-item predictions: {path}")
    return 0


def cmd_classify(args) -> int:
    from .data import eval_transform, load_image
    from .loading import load_model
    from .evaluate.zeroshot import check_template, load_templates, rank_labels
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        raise UserError(f"--labels needs at least two comma-separated labels, got {args.labels!r}")
    templates = None
    if args.templates:
        templates = load_templates(args.templates)
    elif args.template:
        check_template(args.template, "--template")
        templates = [args.template]
    model = load_model(args.model, args.device, args.dtype)
    transform = eval_transform(model.cfg.vision.image_size)
    import torch
    images = torch.stack([transform(load_image(p)) for p in args.images])
    probs = rank_labels(model, model.tokenizer, images, labels, templates, method=args.method)
    for path, row in zip(args.images, probs.tolist()):
        print(path)
        for p, label in sorted(zip(row, labels), reverse=True)[:args.top]:
            print(f"  {p:7.2%}  {label}")
    return 0


def cmd_synthetic(args) -> int:
    from .evaluate.synthetic import write_eval_sets
    paths = write_eval_sets(args.out, args.n_classify, args.n_caption, args.seed, args.image_size, args.split)
    print(f"wrote {args.n_classify} single-object scenes to {paths['classify']} (class names {paths['classnames']}, "
          f"templates {paths['templates']}) and {args.n_caption} captioned scenes to {paths['captions']} "
          f"(annotations {paths['annotations']})")
    return 0


def cmd_plan(args) -> int:
    from .config import load_run_config
    from .plan import format_plan, plan
    cfg = load_run_config(args.config, args.set)
    print(format_plan(plan(cfg, args.gpus, args.gpu_memory, args.peak_tflops, args.mfu, args.samples,
                           args.mean_caption_tokens)))
    return 0


def cmd_data_prepare(args) -> int:
    from .prepare.config import load_prepare_config
    from .prepare.pipeline import run_prepare
    cfg = load_prepare_config(args.config, args.set)
    stats = run_prepare(args.input, args.output, cfg)
    print(f"wrote {stats['shards']} shards ({stats['output_samples']} samples) to {args.output}; "
          f"stats.json and rejects.parquet ({sum(stats['rejected_by_reason'].values())} rejected) beside them")
    return 0


def dtype_option(parser) -> None:
    parser.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                        help="inference precision: bf16 weights, or int8 dynamic quantisation of the Linear "
                        "layers (CPU only)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import EVAL_STRATEGIES, STRATEGIES, ZEROSHOT_METHODS
    p = argparse.ArgumentParser(prog="coca", description="CoCa-Large-v2: contrastive captioning (ViT + T5).")
    p.add_argument("--version", action="version", version=f"coca {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list the model presets and the shipped run recipes")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("info", help="parameter table and forward FLOPs of a preset (built on the meta device)")
    s.add_argument("preset")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("init", help="initialise a model from a local T5 v1.1 / Flan-T5 directory and CLIP ViT file")
    s.add_argument("--t5", help="Hugging Face T5 directory (config.json + model.safetensors or pytorch_model.bin)")
    s.add_argument("--vit", help="CLIP/open_clip ViT checkpoint (.safetensors, or .bin/.pt state dict)")
    s.add_argument("--vit-act", choices=["gelu", "quick_gelu"], default="gelu",
                   help="MLP activation of the ViT checkpoint: quick_gelu for OpenAI CLIP, gelu for LAION/open_clip")
    s.add_argument("--preset", default="coca-large-v2")
    s.add_argument("--out", required=True, help="output model directory")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("convert", help="read a checkpoint of another library into a model directory")
    conv = s.add_subparsers(dest="source", required=True)
    c = conv.add_parser("open-clip", help="open_clip CoCa weights (coca_ViT-B-32, coca_ViT-L-14 and their fine-tunes)")
    c.add_argument("--checkpoint", required=True,
                   help="open_clip_model.safetensors / open_clip_pytorch_model.bin, a directory holding one, or "
                        "hf-hub:ORG/NAME (e.g. hf-hub:laion/CoCa-ViT-L-14-laion2B-s13B-b90k)")
    c.add_argument("--arch", choices=["coca_ViT-B-32", "coca_ViT-L-14"],
                   help="default: open_clip_config.json beside the weights, else the tensor shapes")
    c.add_argument("--vocab", help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: the installed open_clip's)")
    c.add_argument("--out", required=True, help="output model directory")
    c.set_defaults(fn=cmd_convert_open_clip)

    s = sub.add_parser("push", help="upload a model directory to the Hugging Face Hub with a model card")
    s.add_argument("model_dir")
    s.add_argument("repo", help="ORG/NAME")
    s.add_argument("--private", action="store_true")
    s.add_argument("--message", help="commit message")
    s.add_argument("--dry-run", action="store_true", help="list the files (and card) that would be uploaded")
    s.set_defaults(fn=cmd_push)

    s = sub.add_parser("caption", help="caption images, folders, globs or path lists (resumable JSON lines with --out)")
    s.add_argument("images", nargs="+", help="image files, folders (recursive), glob patterns ('photos/**/*.jpg'), "
                   "or .txt/.lst files with one image path per line")
    s.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer) or hf-hub:ORG/NAME")
    s.add_argument("--out", help="JSON lines file (path, caption[, score]); rerun with the same file to resume "
                   "(default: print path<TAB>caption)")
    s.add_argument("--score", action="store_true", help="add each caption's mean log-probability per token")
    s.add_argument("--strategy", choices=STRATEGIES, default="beam")
    s.add_argument("--num-beams", type=int, default=4)
    s.add_argument("--num-return-sequences", type=int, default=1, help="captions per image (beam or sample)")
    s.add_argument("--max-new-tokens", type=int, default=30)
    s.add_argument("--min-new-tokens", type=int, default=0)
    s.add_argument("--prefix", help='caption start to continue, e.g. "a photo of"')
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens (HF semantics)")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating any n-gram of this size")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    s.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd step: faster per token, after a compile of about "
                        "10 s per batch-size bucket; worth it for hundreds of images and more")
    s.add_argument("--device", default="cpu")
    dtype_option(s)
    s.set_defaults(fn=cmd_caption)

    s = sub.add_parser("serve", help="HTTP API (caption, classify, embed, search) with dynamic batching, and a web page")
    s.add_argument("--model", required=True, help="model directory (with its tokenizer) or hf-hub:ORG/NAME")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--index", help="an index directory from `coca index` (enables search)")
    s.add_argument("--api-key", help="require this key (X-API-Key header) on every endpoint but the page and "
                   "/health; also read from COCA_API_KEY")
    s.add_argument("--max-batch", type=int, default=16, help="caption requests per generate call")
    s.add_argument("--max-wait-ms", type=float, default=30.0,
                   help="under load, how long a batch waits for more requests (a lone request never waits)")
    s.add_argument("--compile", action="store_true",
                   help="caption through a torch.compile'd decoding step: faster per token; the first batch of "
                        "each row bucket (images x beams, padded to a power of two) and length bucket waits for its compile (seconds)")
    s.add_argument("--device", default="cpu")
    dtype_option(s)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("index", help="embed every image under a folder into a search index (resumable)")
    s.add_argument("images", help="image folder (searched recursively)")
    s.add_argument("--model", required=True, help="model directory or hf-hub:ORG/NAME")
    s.add_argument("--out", required=True, help="index directory (rerun to resume or add new images)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--device", default="cpu")
    dtype_option(s)
    s.set_defaults(fn=cmd_index)

    s = sub.add_parser("classify", help="rank labels for images by zero-shot similarity")
    s.add_argument("images", nargs="+")
    s.add_argument("--model", required=True, help="model directory or hf-hub:ORG/NAME")
    s.add_argument("--labels", required=True, help='comma-separated labels, e.g. "a dog,a cat,a car"')
    s.add_argument("--template", help="one prompt template with {} for the label, e.g. 'a photo of {}.'")
    s.add_argument("--templates", help="file of prompt templates (one per line), averaged per label")
    s.add_argument("--top", type=int, default=5, help="how many labels to print per image")
    s.add_argument("--method", choices=ZEROSHOT_METHODS, default="contrastive",
                   help="contrastive similarity, caption likelihood under the decoder, or their ensemble")
    s.add_argument("--device", default="cpu")
    dtype_option(s)
    s.set_defaults(fn=cmd_classify)

    s = sub.add_parser("eval", help="evaluate a model: zero-shot classification, captioning, retrieval")
    esub = s.add_subparsers(dest="eval_command", required=True)

    def common(e, batch_size):
        e.add_argument("--model", required=True, help="model directory (with its tokenizer) or hf-hub:ORG/NAME")
        e.add_argument("--images", required=True, help="image directory (annotation paths are resolved against it "
                       "or, when they already start with its name, against its parent)")
        e.add_argument("--out", help="JSON results file (default eval_<task>.json)")
        e.add_argument("--batch-size", type=int, default=batch_size)
        e.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
        e.add_argument("--device", default="cpu")
        dtype_option(e)

    e = esub.add_parser("zeroshot", help="zero-shot classification: top-1, top-5, per-class accuracy")
    common(e, 64)
    e.add_argument("--dataset", choices=["imagenet", "folder"], default="folder",
                   help="imagenet: the shipped 1,000 class names (sorted synset folders = class order)")
    e.add_argument("--classnames", help="class names file, one per line; folders are matched to the names by name "
                   "when they agree (case and '_' ignored), else sorted folder i = line i")
    e.add_argument("--templates", help="prompt templates file, one per line with {} (default: CLIP's 80)")
    e.add_argument("--labels-file", help="CSV/TSV of image,label (index or name) instead of class folders")
    e.add_argument("--method", choices=ZEROSHOT_METHODS, default="contrastive",
                   help="contrastive: nearest class embedding; likelihood: the class whose prompts the decoder "
                   "finds most likely (one decoder pass per image x prompt: use few templates); both: each, and "
                   "their ensemble as the headline")
    e.set_defaults(fn=cmd_eval)

    for name, help_text in (("caption", "captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE"),
                            ("retrieval", "image-text retrieval recall@1/5/10")):
        e = esub.add_parser(name, help=help_text)
        common(e, 32 if name == "caption" else 64)
        e.add_argument("--annotations", required=True,
                       help="COCO captions JSON, Karpathy dataset_coco.json, or a list of {image, caption}")
        e.add_argument("--split", help="Karpathy split to use (default test)")
        e.add_argument("--limit", type=int, help="evaluate only the first N images")
        if name == "caption":
            e.add_argument("--strategy", choices=EVAL_STRATEGIES, default="beam")
            e.add_argument("--num-beams", type=int, default=3)
            e.add_argument("--max-new-tokens", type=int, default=30)
            e.add_argument("--no-spice", action="store_true", help="skip SPICE (slow; needs Java + CoreNLP)")
            e.add_argument("--compile", action="store_true",
                           help="decode through a torch.compile'd step: faster per token after a compile of about "
                                "10 s per batch-size bucket")
        e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("data", help="data preparation")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="filter, deduplicate and shard raw image-text pairs into webdataset shards")
    d.add_argument("--input", nargs="+", required=True,
                   help="tar shards (brace patterns allowed), directories of them, or CSV/TSV/Parquet files")
    d.add_argument("--output", required=True, help="output directory (rerun the same command to resume)")
    d.add_argument("--config", help="prepare config: a YAML path or the shipped recipe name `prepare` (it documents every key)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set filters.min_side=128 --set engine=ray")
    d.set_defaults(fn=cmd_data_prepare)

    s = sub.add_parser("synthetic", help="write held-out synthetic scenes as an image folder and a COCO captions file")
    s.add_argument("--out", required=True)
    s.add_argument("--n-classify", type=int, default=540)
    s.add_argument("--n-caption", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--split", choices=["train", "val", "test"], default="test")
    s.set_defaults(fn=cmd_synthetic)

    s = sub.add_parser("tokenizer", help="SentencePiece tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a SentencePiece model on a text file (one caption per line)")
    t.add_argument("--input", required=True)
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--out", required=True, help="directory for tokenizer.model")
    t.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument("--hard-vocab-limit", action="store_true",
                   help="fail instead of shrinking the vocabulary when the corpus is too small")
    t.set_defaults(fn=cmd_tokenizer_train)

    s = sub.add_parser("train", help="train or resume a run from a YAML config")
    s.add_argument("--config", help="run config: a YAML path or a shipped recipe name (`coca list`); omitted: built-in defaults")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 --set train.steps=100 (repeatable)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("plan", help="per-GPU memory, FLOPs, step time and GPU-hours of a run config")
    s.add_argument("--config", help="run config: a YAML path or a shipped recipe name (e.g. coca-large-v2)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    s.add_argument("--gpus", type=int, default=1)
    s.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU (default 80, A100 80GB)")
    s.add_argument("--peak-tflops", type=float, default=312, help="dense BF16 peak per GPU (A100: 312)")
    s.add_argument("--mfu", type=float, default=0.5, help="assumed model-FLOPs utilisation (default 0.5)")
    s.add_argument("--samples", type=float, help="samples seen (default: train.steps x global batch)")
    s.add_argument("--mean-caption-tokens", type=float, default=None,
                   help="real tokens per caption, for packed text towers (default: data.mean_caption_tokens)")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("demo", help="the built-in demo on the tiny preset")
    s.add_argument("--out", default="runs/demo", help="run directory for the model and the report")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override configs/demo.yaml")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:  # bad input: one line naming what is wrong; anything else is a bug (traceback)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (training: the second one; the first checkpoints and stops)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

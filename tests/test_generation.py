import os
import subprocess
import sys

import pytest
import torch

import coca


@pytest.fixture(scope="module")
def peaked():
    """coca-tiny with a sharpened LM head, so decoding makes confident, varied choices, and an EOS
    row copied from a token that greedy decoding emits in some rows at different steps, so rows end
    at different lengths (random weights alone never pick EOS)."""
    torch.manual_seed(0)
    model = coca.create_model("coca-tiny").eval()
    with torch.no_grad():
        W = model.text_decoder.lm_head.weight
        W.mul_(8.0)
        ids = model.generate(images_for(model, B=6), max_new_tokens=30, min_new_tokens=30).tolist()
        first = {}
        for row in ids:
            for tok in set(row):
                first.setdefault(tok, set()).add(row.index(tok))
        rows_with = {tok: sum(tok in row for row in ids) for tok in first}
        tok = max((t for t in first if 2 <= rows_with[t] < len(ids)), key=lambda t: len(first[t]))
        W[model.cfg.text.eos_id] = W[tok] * 1.02
    return model


def images_for(model, B=4, seed=0):
    s = model.cfg.vision.image_size
    return torch.randn(B, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_equals_uncached(peaked, strategy):
    images = images_for(peaked, B=5)
    a = peaked.generate(images, max_new_tokens=24, strategy=strategy, num_beams=3)
    b = peaked.generate(images, max_new_tokens=24, strategy=strategy, num_beams=3, use_cache=False)
    assert torch.equal(a, b)
    # the test is only meaningful if rows really differ and some end early
    assert len({tuple(r.tolist()) for r in a}) > 1


def test_cached_equals_uncached_full_length(tiny):
    images = images_for(tiny)
    for strategy in ("greedy", "beam"):
        a = tiny.generate(images, max_new_tokens=40, min_new_tokens=40, strategy=strategy)
        b = tiny.generate(images, max_new_tokens=40, min_new_tokens=40, strategy=strategy, use_cache=False)
        assert a.shape == (4, 40) and torch.equal(a, b)


def test_per_row_eos_then_padding(peaked):
    out = peaked.generate(images_for(peaked, B=6), max_new_tokens=30)
    eos, pad = peaked.cfg.text.eos_id, peaked.cfg.text.pad_id
    ended = 0
    for row in out.tolist():
        if eos in row:
            i = row.index(eos)
            assert all(t == pad for t in row[i + 1:])
            ended += 1
        assert pad not in row[: row.index(eos) if eos in row else len(row)]
    assert ended >= 1


def test_min_and_max_new_tokens(peaked):
    images = images_for(peaked)
    out = peaked.generate(images, max_new_tokens=12, min_new_tokens=12)
    assert out.shape == (4, 12) and (out != peaked.cfg.text.eos_id).all()
    assert peaked.generate(images, max_new_tokens=3).shape[1] <= 3


def test_batched_equals_one_by_one(peaked):
    images = images_for(peaked, B=3)
    batched = peaked.generate(images, max_new_tokens=15, strategy="beam", num_beams=3)
    for i in range(3):
        single = peaked.generate(images[i:i + 1], max_new_tokens=15, strategy="beam", num_beams=3)
        row = batched[i, :single.shape[1]]
        assert torch.equal(row, single[0]) and (batched[i, single.shape[1]:] == 0).all()


def test_beam_with_one_beam_is_greedy(peaked):
    images = images_for(peaked)
    assert torch.equal(peaked.generate(images, strategy="beam", num_beams=1, max_new_tokens=10),
                       peaked.generate(images, max_new_tokens=10))


def test_sampling_seeded_and_filtered(peaked):
    images = images_for(peaked)
    kw = dict(strategy="sample", max_new_tokens=10, min_new_tokens=10)
    a = peaked.generate(images, seed=1, **kw)
    assert torch.equal(a, peaked.generate(images, seed=1, **kw))
    assert not torch.equal(a, peaked.generate(images, seed=2, temperature=5.0, **kw))
    greedy = peaked.generate(images, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(peaked.generate(images, seed=3, top_k=1, **kw), greedy)
    assert torch.equal(peaked.generate(images, seed=3, top_p=1e-6, **kw), greedy)
    assert torch.equal(peaked.generate(images, seed=3, top_k=5, top_p=0.9, use_cache=False, **kw),
                       peaked.generate(images, seed=3, top_k=5, top_p=0.9, **kw))


def test_top_k_restricts_support(peaked):
    images = images_for(peaked, B=2)
    _, visual = peaked.encode_image_tokens(images)
    first_logits = peaked.text_decoder(torch.zeros(2, 1, dtype=torch.long), visual)[:, 0]
    allowed = first_logits.topk(3, dim=-1).indices
    for seed in range(10):
        tok = peaked.generate(images, strategy="sample", top_k=3, seed=seed, max_new_tokens=1, min_new_tokens=1)[:, 0]
        assert all(t in allowed[i] for i, t in enumerate(tok.tolist()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="nucleus"), "strategy"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=200), "context length"),
    (dict(min_new_tokens=40, max_new_tokens=10), "min_new_tokens"),
    (dict(strategy="sample", top_p=1.5), "top_p"),
    (dict(strategy="sample", top_k=0), "top_k"),
    (dict(strategy="sample", temperature=0.0), "temperature"),
    (dict(strategy="beam", num_beams=0), "num_beams"),
    (dict(prefix=list(range(2, 80))), "prefix has 78 tokens.*context length 77"),
    (dict(prefix=[5, 6, 7], max_new_tokens=75), r"max_new_tokens must be in \[1, 74\].*3 prefix tokens"),
    (dict(prefix=[5, 1]), "EOS"),
    (dict(prefix=[5, 10**6]), "prefix ids must be in"),
    (dict(prefix="a photo of"), "tokenizer"),
    (dict(strategy="beam", num_beams=3, num_return_sequences=4), r"num_return_sequences \(4\) must be <= num_beams \(3\)"),
    (dict(num_return_sequences=2), "greedy"),
    (dict(strategy="sample", num_return_sequences=0), "num_return_sequences"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.5), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size=2.5), "no_repeat_ngram_size"),
    (dict(compile=True, use_cache=False), "use_cache=True"),
])
def test_bad_generation_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(images_for(tiny, B=1), **kwargs)


@torch.no_grad()
def teacher_forced_logprobs(model, images, prefix, tokens):
    """Independent reference: one full (uncached) decoder pass over start + prefix + tokens, log-softmax
    over the whole vocabulary, the log-probability of each generated token up to its EOS."""
    pad, eos = model.cfg.text.pad_id, model.cfg.text.eos_id
    _, visual = model.encode_image_tokens(images)
    P = len(prefix)
    inputs = torch.cat([torch.full((tokens.shape[0], 1), pad), torch.as_tensor(prefix, dtype=torch.long).expand(tokens.shape[0], -1),
                        tokens[:, :-1]], 1)
    logp = torch.log_softmax(model.text_decoder(inputs, visual).double(), -1)[:, P:]
    sums, counts = [], []
    for r, row in enumerate(tokens.tolist()):
        n = row.index(eos) + 1 if eos in row else len(row)
        sums.append(sum(float(logp[r, i, row[i]]) for i in range(n)))
        counts.append(n)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("prefix", [[], [17, 42, 17]])
def test_returned_scores_equal_a_teacher_forced_pass(peaked, strategy, prefix):
    n_return = 1 if strategy == "greedy" else 3
    images = images_for(peaked, B=3)
    out = peaked.generate(images, max_new_tokens=14, strategy=strategy, num_beams=3, seed=0, prefix=prefix,
                          include_prefix=False, num_return_sequences=n_return, return_dict=True,
                          repetition_penalty=1.2)
    assert out.tokens.shape[0] == 3 * n_return and out.prefix_length == len(prefix)
    visual_images = images.repeat_interleave(n_return, 0)
    ref_sum, ref_count = teacher_forced_logprobs(peaked, visual_images, prefix, out.tokens)
    torch.testing.assert_close(out.scores.double(), ref_sum, rtol=0, atol=1e-4)
    assert torch.equal(out.num_tokens, ref_count)
    torch.testing.assert_close(out.normalized_scores.double(), ref_sum / ref_count, rtol=0, atol=1e-4)
    embeds, visual = peaked.encode_image_tokens(images)
    assert torch.equal(out.image_embeds, embeds) and torch.equal(out.visual_tokens, visual)
    if strategy == "beam":  # best first within each image, by length-normalised beam score
        assert len({tuple(r) for r in out.tokens[:3].tolist()}) == 3


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_prefix_is_continued_with_and_without_cache(peaked, strategy):
    images = images_for(peaked, B=4)
    prefix = [23, 5, 23]
    kw = dict(max_new_tokens=12, strategy=strategy, num_beams=3, seed=4, prefix=prefix,
              num_return_sequences=2 if strategy == "sample" else 1)
    a = peaked.generate(images, **kw)
    assert torch.equal(a, peaked.generate(images, use_cache=False, **kw))
    assert (a[:, :3] == torch.tensor(prefix)).all()
    stripped = peaked.generate(images, include_prefix=False, **kw)
    assert torch.equal(stripped, a[:, 3:3 + stripped.shape[1]])
    # the prefix conditions decoding: its continuation differs from plain decoding
    plain = peaked.generate(images, **{**kw, "prefix": None})
    assert not torch.equal(stripped[:, :5], plain[:, :5])


def test_text_prefix_through_the_tokenizer(peaked, tmp_path):
    from coca.tokenizer import Tokenizer
    lines = [f"a photo of a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")] * 30
    (tmp_path / "t.txt").write_text("\n".join(lines))
    tok = Tokenizer.train(tmp_path / "t.txt", vocab_size=60, out_dir=tmp_path)
    ids = tok.encode_ids("a photo of")
    images = images_for(peaked, B=2)
    peaked.tokenizer = tok
    try:
        by_text = peaked.generate(images, prefix="a photo of", max_new_tokens=6)
    finally:
        peaked.tokenizer = None  # the fixture is shared by the module
    assert torch.equal(by_text, peaked.generate(images, prefix=ids, max_new_tokens=6))
    assert all(t.startswith("a photo of") for t in tok.decode(by_text))


def test_sampling_several_sequences_per_image(peaked):
    images = images_for(peaked, B=2)
    out = peaked.generate(images, strategy="sample", num_return_sequences=4, seed=0, max_new_tokens=10,
                          min_new_tokens=10, temperature=3.0)
    assert out.shape == (8, 10)
    assert len({tuple(r) for r in out[:4].tolist()}) > 1  # the samples of one image differ
    # the rows of an image are samples given that image: with top_k=1 all equal its greedy caption
    greedy = peaked.generate(images, max_new_tokens=10, min_new_tokens=10)
    same = peaked.generate(images, strategy="sample", num_return_sequences=4, top_k=1, max_new_tokens=10,
                           min_new_tokens=10)
    assert torch.equal(same, greedy.repeat_interleave(4, 0))


def test_no_repeat_ngram_leaves_no_repeated_ngram(peaked):
    images = images_for(peaked, B=6)
    for n in (1, 2, 3):
        out = peaked.generate(images, max_new_tokens=30, min_new_tokens=30, no_repeat_ngram_size=n)
        for row in out.tolist():
            grams = [tuple([0] + row)[i:i + n] for i in range(len(row) + 1 - n + 1)]
            assert len(grams) == len(set(grams)), (n, row)


def caption_batch(model, T=5, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, model.cfg.text.vocab_size, (T, L), generator=g)
    for i, n in enumerate([L, 4, 1, 6, 2][:T]):  # EOS at different places, pad after
        tokens[i, n - 1] = model.cfg.text.eos_id
        tokens[i, n:] = model.cfg.text.pad_id
    return tokens


def test_score_equals_a_teacher_forced_pass(peaked):
    images = images_for(peaked, B=5)
    tokens = caption_batch(peaked)
    out = peaked.score(images, tokens)
    ref_sum, ref_count = teacher_forced_logprobs(peaked, images, [], tokens)
    torch.testing.assert_close(out.sum.double(), ref_sum, rtol=0, atol=1e-4)
    assert torch.equal(out.num_tokens, ref_count)
    torch.testing.assert_close(out.mean.double(), ref_sum / ref_count, rtol=0, atol=1e-4)
    # batching does not change a score beyond fp32 rounding: the batch size changes the kernels'
    # summation order, and each of the caption's log-probabilities (a log-softmax over a matmul) moves
    # by a few units in the last place; 16 ulps (2^-20) of the sum's size bounds it (measured: 1 ulp)
    torch.testing.assert_close(peaked.score(images, tokens, batch_size=2).sum, out.sum, rtol=2.0 ** -20, atol=1e-6)


def test_pairwise_score_is_every_image_against_every_caption(peaked):
    images = images_for(peaked, B=3)
    tokens = caption_batch(peaked, T=5)
    matrix = peaked.score(images, tokens, pairwise=True, batch_size=2)
    assert matrix.sum.shape == (3, 5) and matrix.mean.shape == (3, 5)
    for b in range(3):
        ref_sum, ref_count = teacher_forced_logprobs(peaked, images[b:b + 1].expand(5, -1, -1, -1), [], tokens)
        torch.testing.assert_close(matrix.sum[b].double(), ref_sum, rtol=0, atol=1e-4)
    assert matrix.sum.std(0).max() > 0  # images really differ in how they score a caption


def test_a_generated_caption_scores_higher_than_a_random_one(peaked):
    images = images_for(peaked, B=4)
    out = peaked.generate(images, max_new_tokens=10, return_dict=True)
    scored = peaked.score(images, out.tokens)
    torch.testing.assert_close(scored.sum, out.scores, rtol=0, atol=1e-4)
    assert (scored.mean > peaked.score(images, caption_batch(peaked, T=4, L=10)).mean).all()


def test_bad_score_arguments(tiny):
    images = images_for(tiny, B=2)
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        tiny.score(images, caption_batch(tiny, T=3))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.score(images, torch.full((2, 4), 10**6))


def test_a_failed_compile_is_a_clear_error(tiny):
    import torch._inductor.config as inductor_config
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        with pytest.raises(ValueError, match="compile=True could not compile the decoding step .*C\\+\\+ compiler"):
            tiny.generate(images_for(tiny, B=2), max_new_tokens=3, compile=True)


def test_static_step_equals_the_cached_forward(peaked):
    """The fixed-shape step (all cache slots attended, later ones masked by the bias table,
    keys/values written at a position tensor) gives the cached forward's logits at every step."""
    dec = peaked.text_decoder
    with torch.no_grad():
        _, visual = peaked.encode_image_tokens(images_for(peaked, B=3))
        tokens = peaked.generate(images_for(peaked, B=3), max_new_tokens=12, min_new_tokens=12)
        seq = torch.cat([torch.zeros(3, 1, dtype=torch.long), tokens], 1)
        cached, static = dec.new_cache(visual, 13), dec.new_cache(visual, 16, static=True)
        keys, values = [c.k for c in static.layers], [c.v for c in static.layers]
        for t in range(13):
            want = dec(seq[:, t:t + 1], cache=cached)[:, -1]
            got = dec.static_step(seq[:, t:t + 1], torch.tensor([t]), keys, values, static.cross, static.bias_table)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            static.advance()


def test_single_query_attention_equals_softmax_attention():
    """The written-out attention of compiled decoding equals an independent float64 softmax
    attention (additive mask, scale given or 1/sqrt(d))."""
    from coca.compiled_decoding import SINGLE_QUERY
    from coca.models.attention import attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (1, 11, 11))
    mask = torch.randn(1, 3, 1, 11, generator=g)
    for scale in (None, 1.0):
        s = 8 ** -0.5 if scale is None else scale
        want = ((q.double() @ k.double().transpose(-1, -2)) * s + mask.double()).softmax(-1) @ v.double()
        got = attention(q, k, v, mask, scale=scale, impl=SINGLE_QUERY)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


def test_compiled_step_runs_two_row_linears_as_batched_matmuls(peaked, monkeypatch, tmp_path):
    """At two rows on an Intel CPU the step a ``CompiledDecoder`` traces replaces every fp32 Linear
    (blocks and LM head) by a batched matmul and keeps the Linear at one and four rows (and at two
    elsewhere: slower on AMD); the model's own step never enters the mode. It never calls SDPA
    (one query: ``single_query_attention``). The two-row compiled decoding gives eager decoding's tokens."""
    import types

    from torch import nn

    from coca import compiled_decoding
    from coca.compiled_decoding import TwoRowLinearAsBatchedMatmul
    from coca.cpu import cpu_vendor
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        (tmp_path / vendor).write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu\n")
        assert cpu_vendor(str(tmp_path / vendor)) == vendor
    assert compiled_decoding.TWO_ROW_LINEAR_HELPS == (cpu_vendor() == "GenuineIntel")
    dec = peaked.text_decoder
    # the cross K/V projections run before the step
    n_linear = sum(type(m) is nn.Linear for m in dec.modules()) - len(dec.blocks)
    traced = {}

    def record(gm, example_inputs):
        traced[len(traced)] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward

    with torch.no_grad():
        for rows, helps in ((1, True), (2, True), (4, True), (2, False)):
            monkeypatch.setattr(compiled_decoding, "TWO_ROW_LINEAR_HELPS", helps)
            _, visual = peaked.encode_image_tokens(images_for(peaked, B=rows))
            cache = dec.new_cache(visual, 16, static=True)
            step = torch.compile(types.MethodType(compiled_decoding._traced_step, dec), backend=record,
                                 fullgraph=True, dynamic=False)
            n_traced = len(traced)
            step(torch.full((rows, 1), 5), torch.tensor([0]), [c.k for c in cache.layers], [c.v for c in cache.layers],
                 cache.cross, cache.bias_table)
            assert len(traced) == n_traced + 1, "a graph traced for these rows and this CPU"
            ops = traced[len(traced) - 1]
            bmm = sum(t is torch.bmm for t in ops)
            linear = sum(t is torch._C._nn.linear for t in ops)
            two_row_path = rows == 2 and helps and compiled_decoding.MODES_TRACEABLE  # off before PyTorch 2.6
            assert (bmm, linear) == ((n_linear, 0) if two_row_path else (0, n_linear)), (rows, bmm, linear)
            assert torch.nn.functional.scaled_dot_product_attention not in ops  # single_query_attention instead
        torch._dynamo.reset()
        # the mode itself: two rows of an fp32 Linear without bias, nothing else
        lin, x = nn.Linear(8, 5, bias=False), torch.randn(2, 1, 8)
        with TwoRowLinearAsBatchedMatmul():
            torch.testing.assert_close(lin(x), x @ lin.weight.T, rtol=0, atol=1e-6)
        seen = []

        class Spy(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                seen.append(func)
                return func(*args, **(kwargs or {}))

        with Spy(), TwoRowLinearAsBatchedMatmul():
            lin(x)
            lin(torch.randn(3, 1, 8))
            nn.Linear(8, 5)(x)  # with a bias
            lin.to(torch.bfloat16)(x.bfloat16())
        assert [f for f in seen if f in (torch.bmm, torch._C._nn.linear)] == [torch.bmm] + [torch._C._nn.linear] * 3
    monkeypatch.setattr(compiled_decoding, "TWO_ROW_LINEAR_HELPS", True)
    images = images_for(peaked, B=2)
    for kwargs in (dict(strategy="greedy"), dict(strategy="greedy", prefix=[17, 42])):
        assert torch.equal(peaked.generate(images, max_new_tokens=15, compile=True, **kwargs),
                           peaked.generate(images, max_new_tokens=15, **kwargs)), kwargs


def test_compiled_decoding_equals_eager_and_follows_weight_changes(peaked):
    """``compile=True``: same tokens as eager decoding for greedy with a prefix and for beam search,
    at a batch size that is padded to its power-of-two bucket (3 -> 4); a ``CompiledDecoder`` keeps
    its graphs across calls, and after the weights change in place it rebuilds them rather than
    serving the old weights, dropping only its own: another compiled function keeps its graph."""
    from torch._dynamo.testing import CompileCounter

    from coca.compiled_decoding import CompiledDecoder
    other_counter = CompileCounter()
    other = torch.compile(lambda x: x.sin() + 1, backend=other_counter)
    other(torch.ones(3))
    compiled = CompiledDecoder(peaked)
    images = images_for(peaked, B=3)
    first = None
    for kwargs in (dict(strategy="greedy", prefix=[17, 42]), dict(strategy="beam", num_beams=2, max_new_tokens=13)):
        kwargs = {"max_new_tokens": 15, **kwargs}
        want = peaked.generate(images, **kwargs)
        got = peaked.generate(images, compiled=compiled, **kwargs)
        assert torch.equal(got, want), kwargs
        first = want if first is None else first
    assert len({tuple(r.tolist()) for r in want}) > 1
    assert compiled.compiles == 1  # one build, a graph per shape in it
    lm_head = peaked.text_decoder.lm_head.weight
    saved = lm_head.detach().clone()
    try:
        with torch.no_grad():
            lm_head[:, :].copy_(lm_head.flip(0))  # in place: same tensor, new values
        # the shapes of the first call, so its compiled graph would be reused if stale
        changed = peaked.generate(images, max_new_tokens=15, prefix=[17, 42])
        assert torch.equal(peaked.generate(images, max_new_tokens=15, prefix=[17, 42], compiled=compiled), changed)
        assert not torch.equal(changed, first) and compiled.compiles == 2
        # a write through .data is invisible to PyTorch's version counter (as is fused AdamW's
        # step): the weights' sampled values show it
        lm_head.data.copy_(saved)
        assert torch.equal(peaked.generate(images, max_new_tokens=15, prefix=[17, 42], compiled=compiled), first)
        assert compiled.compiles == 3
        compiled.forget()  # by hand (e.g. after a write through .data to a part of a weight)
        assert torch.equal(peaked.generate(images, max_new_tokens=15, prefix=[17, 42], compiled=compiled), first)
        assert compiled.compiles == 4
        other(torch.ones(3))
        assert other_counter.frame_count == 1  # not recompiled: its graph outlived every rebuild
    finally:
        with torch.no_grad():
            lm_head.copy_(saved)


def test_a_step_compiled_under_a_restricted_isa_is_not_loaded_by_an_unrestricted_process(tmp_path):
    """TorchInductor's cache key leaves ONEDNN_MAX_CPU_ISA out, and a frozen step holds weights
    packed for oneDNN's ISA: loaded by an unrestricted process, a step cached under the AVX2
    restriction aborted it. Each restriction now compiles into a cache directory of its own."""
    from coca.cpu import ISA_LIMITS
    script = ("import torch, coca; torch.manual_seed(0); m = coca.create_model('coca-tiny').eval(); "
              "print(m.generate(torch.randn(2, 3, 64, 64), max_new_tokens=6, strategy='greedy', compile=True).tolist())")
    plain = {k: v for k, v in os.environ.items() if k not in ISA_LIMITS}
    plain["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    restricted = {**plain, "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    for env in (restricted, plain):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert (tmp_path / "inductor" / "isa-ONEDNN_MAX_CPU_ISA-AVX2-MKL_ENABLE_INSTRUCTIONS-AVX2-ATEN_CPU_CAPABILITY-avx2").is_dir()


def test_missing_private_torch_settings_warn_and_decoding_still_works(tiny, monkeypatch):
    """The private inductor / dynamo names compiled decoding reads are looked up through one
    function: where this PyTorch lacks one (here: freezing, dropping one function's graphs, the
    default cache directory), it warns once, and decoding still gives eager decoding's tokens."""
    import torch._inductor.runtime.cache_dir_utils as cache_dir_utils

    from coca import compiled_decoding
    from coca.cpu import isolate_inductor_cache
    settings = tuple(("torch._inductor.config", "freezing_gone", True, "weights are not frozen") if key == "freezing"
                     else (module, key, value, lost) for module, key, value, lost in compiled_decoding.COMPILE_SETTINGS)
    monkeypatch.setattr(compiled_decoding, "COMPILE_SETTINGS", settings)
    monkeypatch.setattr(compiled_decoding, "_WARNED", set())
    monkeypatch.delattr(torch._dynamo, "reset_code")
    monkeypatch.delattr(cache_dir_utils, "default_cache_dir")
    images = images_for(tiny, B=1)
    with pytest.warns(RuntimeWarning) as warned:
        got = tiny.generate(images, max_new_tokens=5, compile=True)
        restricted = isolate_inductor_cache({"ONEDNN_MAX_CPU_ISA": "AVX2"})
    messages = [str(w.message) for w in warned]
    for missing in ("torch._inductor.config.freezing_gone", "torch._dynamo.reset_code",
                    "torch._inductor.runtime.cache_dir_utils.default_cache_dir"):
        assert sum(missing in m for m in messages) == 1, (missing, messages)
    assert torch.equal(got, tiny.generate(images, max_new_tokens=5))
    assert restricted.endswith("isa-ONEDNN_MAX_CPU_ISA-AVX2") and "torchinductor_" in restricted

import pytest
import torch

import coca
from coca.data.synthetic import SyntheticScenes


def demo_captions():
    return SyntheticScenes(300).captions()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return coca.Tokenizer.train(demo_captions() * 3, vocab_size=60, out_dir=tmp_path_factory.mktemp("tok"))


def test_special_ids_follow_t5(tok):
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size <= 60


def test_encode_fixed_length_with_eos_and_padding(tok):
    ids = tok.encode(["a small red circle", "a large blue square left of a small green triangle"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    for row in ids.tolist():
        n = row.index(tok.eos_id)
        assert n > 0 and all(t == tok.pad_id for t in row[n + 1:]) and tok.pad_id not in row[:n]
    assert tok.encode("a red circle").shape == (1, 77)


def test_decode_roundtrip(tok):
    texts = ["a small red circle", "a large purple triangle right of a small yellow square"]
    assert tok.decode(tok.encode(texts)) == texts
    assert tok.decode(tok.encode(texts)[0]) == texts[0]


def test_empty_whitespace_and_long_captions(tok):
    ids = tok.encode(["", "   \n\t "])
    assert (ids[:, 0] == tok.eos_id).all() and (ids[:, 1:] == tok.pad_id).all()
    assert tok.decode(ids) == ["", ""]
    long = " ".join(["a large red circle left of a small blue square"] * 500)
    row = tok.encode(long)[0]
    assert row[-1] == tok.eos_id and (row[:-1] != tok.pad_id).all()  # 76 pieces + EOS
    assert tok.decode(row).startswith("a large red circle left of")


def test_unknown_characters_map_to_unk(tok):
    ids = tok.encode("a red ☃ circle")[0].tolist()
    assert tok.unk_id in ids


def test_decode_skips_out_of_range_and_special_ids(tok):
    ids = tok.encode("a red circle")[0].tolist()
    noisy = [ids[0], 10_000, tok.pad_id] + ids[1:]
    assert tok.decode(noisy) == "a red circle"


def test_train_from_file_and_load(tmp_path):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(demo_captions()) + "\n", encoding="utf-8")
    tok = coca.Tokenizer.train(corpus, vocab_size=50, out_dir=tmp_path / "out")
    again = coca.Tokenizer(tmp_path / "out" / "tokenizer.model")
    assert torch.equal(tok.encode(["a small red circle"]), again.encode(["a small red circle"]))
    assert coca.Tokenizer(tmp_path / "out").vocab_size == tok.vocab_size  # a directory works too


def test_foreign_sentencepiece_without_pad_gets_appended_specials(tmp_path):
    import io

    import sentencepiece as spm
    buf = io.BytesIO()
    # LLaMA-style layout: unk 0, bos 1, eos 2, no pad piece
    spm.SentencePieceTrainer.train(sentence_iterator=iter(demo_captions()), model_writer=buf, vocab_size=30,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "foreign.model").write_bytes(buf.getvalue())
    tok = coca.Tokenizer(tmp_path / "foreign.model")
    assert tok.eos_id == 2 and tok.pad_id == tok.num_pieces and tok.vocab_size == tok.num_pieces + 1
    ids = tok.encode(["a red circle"])
    assert (ids[0, ids[0].tolist().index(2) + 1:] == tok.pad_id).all()
    assert tok.decode(ids) == ["a red circle"]


def test_bad_inputs(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="not found"):
        coca.Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        coca.Tokenizer(tmp_path / "junk.model")
    with pytest.raises(FileNotFoundError, match="training text file"):
        coca.Tokenizer.train(str(tmp_path / "nope.txt"), vocab_size=50, out_dir=tmp_path)
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(["ok", None])
    with pytest.raises(ValueError, match="SentencePiece training failed"):
        coca.Tokenizer.train(["a b"], vocab_size=500, out_dir=tmp_path, hard_vocab_limit=True)


def test_model_saves_and_loads_its_tokenizer(tok, tmp_path):
    model = coca.create_model("coca-tiny")
    path = model.save_pretrained(tmp_path / "m", tokenizer=tok)
    loaded = coca.load(path)
    assert torch.equal(loaded.tokenizer.encode(["a red circle"]), tok.encode(["a red circle"]))

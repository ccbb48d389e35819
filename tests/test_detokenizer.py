"""IncrementalDetokenizer: deltas concatenate to the full decode, never show a half character."""
from __future__ import annotations

import pytest

from model.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from model.tokenizer import Tokenizer
from tests.test_tokenizer import make_sentencepiece_dir

MULTIBYTE_TEXTS = [
    "Héllo wörld, naïve café! Ünïcödé àçcénts",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷 in a row😀😀",
    "中文字符 日本語のテキスト 한국어 text",
    "mixed: a😀b中c é 1234 ROMEO:\nO, she doth teach",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_llama_dir, tmp_path_factory, shakespeare_text) -> dict[str, Tokenizer]:
    sp_dir = make_sentencepiece_dir(tmp_path_factory.mktemp("sp_detok"), shakespeare_text)
    return {"byte_bpe": Tokenizer.from_pretrained(tiny_llama_dir), "sentencepiece": Tokenizer.from_pretrained(sp_dir)}


class WindowOnly:
    """The same tokenizer without decode_stream: the detokenizer's own two-window path."""

    def __init__(self, tok: Tokenizer):
        self.decode = tok.decode


@pytest.fixture(params=["decode_stream", "window"])
def path(request) -> str:
    """Every streaming test runs on both paths: the tokenizers library's native stream and our window."""
    return request.param


def make_detok(tok: Tokenizer, path: str, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tok if path == "decode_stream" else WindowOnly(tok),
                                  prompt_ids=tok.encode("The prompt: "), skip_special_tokens=skip_special_tokens)


def stream(tok: Tokenizer, output_ids: list[int], path: str, skip_special_tokens: bool = True):
    """Feed tokens one by one; check every prefix; return (deltas, number of held-back steps)."""
    detok = make_detok(tok, path, skip_special_tokens)
    deltas, held = [], 0
    for k, token_id in enumerate(output_ids, start=1):
        delta = detok.add(token_id)
        deltas.append(delta)
        full = tok.decode(output_ids[:k], skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == detok.text
        if REPLACEMENT_CHAR in delta:
            assert REPLACEMENT_CHAR in full
        if not full.endswith(REPLACEMENT_CHAR):
            assert detok.text == full, (k, detok.text, full)
        else:
            # Held back. (Not a prefix check: HF's ByteFallback decoder turns every byte of an incomplete
            # run into U+FFFD, even a complete character before it, so decode(prefix) can differ there.)
            held += 1
    return deltas, held


@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece"])
def test_deltas_equal_full_decode_at_every_complete_prefix(tokenizers, kind, path):
    tok = tokenizers[kind]
    total_held = 0
    for text in MULTIBYTE_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas, held = stream(tok, ids, path)
        assert "".join(deltas) == tok.decode(ids) == text
        total_held += held
    # The texts must really split characters across tokens, or this test proves nothing.
    assert total_held >= 10


def test_sentencepiece_byte_fallback_pieces_are_held_until_complete(tokenizers, path):
    tok = tokenizers["sentencepiece"]
    ids = tok.encode("a😀", add_special_tokens=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    deltas, _ = stream(tok, ids, path)
    assert deltas[-4:] == ["", "", "", "😀"]


def test_sentencepiece_first_word_space_follows_hf_decode(tokenizers, path):
    tok = tokenizers["sentencepiece"]
    ids = tok.encode("Hello world again", add_special_tokens=False)
    deltas, _ = stream(tok, ids, path)
    assert "".join(deltas) == "Hello world again"  # as decode(output_ids): the first "▁" is a dummy prefix
    assert any(d.startswith(" ") for d in deltas[1:])  # later word boundaries keep their space


@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece"])
def test_special_tokens_skipped_or_kept(tokenizers, kind, path):
    tok = tokenizers[kind]
    eos, bos = tok.eos_token_ids[0], tok.bos_token_id
    ids = (tok.encode("café 😀", add_special_tokens=False) + [eos, bos]
           + tok.encode(" more 中", add_special_tokens=False))
    skipped, _ = stream(tok, ids, path, skip_special_tokens=True)
    kept, _ = stream(tok, ids, path, skip_special_tokens=False)
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True)
    assert "</s>" not in "".join(skipped)
    assert "".join(kept) == tok.decode(ids, skip_special_tokens=False)
    assert "</s><s>" in "".join(kept)


def test_invalid_bytes_surface_only_once_the_decode_has_them(tokenizers, path):
    tok = tokenizers["byte_bpe"]
    lone_lead_byte = tok.encode("中", add_special_tokens=False)[0]  # the first of its three bytes (or more)
    ids = [lone_lead_byte] + tok.encode(" ok", add_special_tokens=False)
    deltas, _ = stream(tok, ids, path)
    assert "".join(deltas) == tok.decode(ids)
    assert REPLACEMENT_CHAR in "".join(deltas)


def test_work_per_token_is_amortised_constant(tokenizers, shakespeare_text):
    tok = tokenizers["byte_bpe"]
    ids = tok.encode(shakespeare_text[:20_000] + " 😀中文" * 50, add_special_tokens=False)

    class CountingTokenizer:
        decoded = 0

        def decode(self, token_ids, skip_special_tokens=True):
            CountingTokenizer.decoded += len(token_ids)
            return tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(CountingTokenizer(), prompt_ids=[])
    for token_id in ids:
        detok.add(token_id)
    assert detok.text == tok.decode(ids)
    assert len(ids) > 5000
    assert CountingTokenizer.decoded < 8 * len(ids)  # a whole-sequence re-decode would be ~len(ids)**2 / 2


@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece"])
def test_flush_releases_an_incomplete_tail(tokenizers, kind, path):
    tok = tokenizers[kind]
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    detok = make_detok(tok, path)
    for token_id in ids:
        detok.add(token_id)
    assert detok.text == "ok "
    assert REPLACEMENT_CHAR in detok.flush()
    assert detok.text == tok.decode(ids)
    assert detok.flush() == ""


@pytest.mark.parametrize("then_a_word", [True, False], ids=["then-a-word", "at-the-end"])
def test_byte_fallback_run_that_turns_invalid_behind_emitted_text(tokenizers, path, then_a_word):
    """Sentencepiece byte fallback: "w" as a byte piece, the first byte of a 3-byte character, then a whole
    piece. decode() now turns the whole byte run, the emitted "w" too, into U+FFFDs, which tokenizers'
    DecodeStream refuses ("Invalid prefix": it used to stop the engine); both paths keep what they emitted
    and add the U+FFFD and the word, and the same goes for flush at the end."""
    tok = tokenizers["sentencepiece"]
    ids = [tok._backend.token_to_id("<0x77>"), tok._backend.token_to_id("<0xE7>")]
    ids += tok.encode(" and", add_special_tokens=False) if then_a_word else []
    assert tok.decode(ids).startswith(REPLACEMENT_CHAR * 2)  # (the case: "w" is gone from decode())
    detok = make_detok(tok, path)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert deltas[:2] == ["w", ""]
    assert detok.text == "w" + REPLACEMENT_CHAR + (" and" if then_a_word else "")
    assert detok.add(tok.encode(" the", add_special_tokens=False)[-1]) == " the"  # and it goes on


def test_native_stream_decodes_nothing_in_python(tokenizers, shakespeare_text):
    """With a Tokenizer the engine's per-token work is one native DecodeStream step, not decode() calls."""
    tok = tokenizers["byte_bpe"]
    ids = tok.encode(shakespeare_text[:4_000] + " 😀中文", add_special_tokens=False)

    class CountingTokenizer:
        decoded = 0

        def decode(self, token_ids, skip_special_tokens=True):
            CountingTokenizer.decoded += 1
            return tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

        def decode_stream(self, skip_special_tokens=True):
            return tok.decode_stream(skip_special_tokens)

    detok = IncrementalDetokenizer(CountingTokenizer(), prompt_ids=[])
    text = "".join(detok.add(t) for t in ids)
    assert text == detok.text == tok.decode(ids)
    assert CountingTokenizer.decoded == 0

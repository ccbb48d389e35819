"""Tokenizer against transformers' AutoTokenizer: tokenizer.json (the tiny byte-level BPE fixture) and a
sentencepiece tokenizer.model trained here; BOS/EOS flags, special tokens, chat templates and their limits."""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import pytest

from model.chat_template import ChatTemplate, ChatTemplateError
from model.tokenizer import Tokenizer, TokenizerError

SP_VOCAB_SIZE = 400
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
TEXTS = [
    "Hello world",
    "ROMEO:\nO, she doth teach the torches to burn bright!",
    " leading space",
    "  two  spaces   three",
    "trailing space ",
    "digits 1234567890 and 3.14",
    "emoji 😀🎉 café naïve 中文 日本語 Ελληνικά",
    "tabs\tand\nnewlines\n\n\nend",
    "<s>special</s> in <unk> text",
    "x<s>y",
    "",
]
MESSAGES = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Tell me a <joke> about 中文 😀."},
]


def make_sentencepiece_dir(out_dir: Path, text: str, *, add_bos: bool = True,
                           chat_template: str | None = LLAMA_CHAT_TEMPLATE,
                           user_defined_symbols: tuple[str, ...] = ()) -> Path:
    """A LLaMA-style tokenizer.model (BPE, byte fallback, identity normalisation) + tokenizer_config.json."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text[:60_000].splitlines()), model_writer=model, vocab_size=SP_VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, user_defined_symbols=list(user_defined_symbols))
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              # the older dict form of a special token, as many LLaMA checkpoints still write it
              "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "rstrip": False,
                            "normalized": False, "single_word": False, "special": True},
              "add_bos_token": add_bos,
              "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, shakespeare_text) -> Path:
    return make_sentencepiece_dir(tmp_path_factory.mktemp("sp_llama"), shakespeare_text)


def hf_tokenizer(model_dir: Path, **kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_dir, **kwargs)


def assert_same_as_hf(ours: Tokenizer, hf, texts=TEXTS) -> None:
    for text in texts:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == hf.encode(text, add_special_tokens=add_special), (text, add_special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), \
                    (text, add_special, skip)


def test_tokenizer_json_matches_hf(tiny_llama_dir):
    ours = Tokenizer.from_pretrained(tiny_llama_dir)
    # transformers ignores tokenizer_config's add_bos_token when a tokenizer.json exists; we honour it
    # (this fixture asks for BOS), so the reference gets the flag explicitly.
    assert_same_as_hf(ours, hf_tokenizer(tiny_llama_dir, add_bos_token=True))
    assert ours.encode("Hello")[0] == ours.bos_token_id == 1
    assert ours.eos_token_ids == (2,)
    assert ours.vocab_size == 384
    assert ours.all_special_ids == frozenset({0, 1, 2})
    assert ours.id_to_piece(1) == "<s>"
    assert ours.id_to_piece(ours.encode(" the", add_special_tokens=False)[0]).startswith("Ġ")
    with pytest.raises(TokenizerError):
        ours.id_to_piece(10_000)


def test_sentencepiece_matches_hf(sp_dir):
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with protobuf")
    ours = Tokenizer.from_pretrained(sp_dir)
    hf = hf_tokenizer(sp_dir)
    assert_same_as_hf(ours, hf)
    assert ours.vocab_size == len(hf) == SP_VOCAB_SIZE
    assert ours.all_special_ids == frozenset(hf.all_special_ids) == frozenset({0, 1, 2})
    # Byte fallback: characters the training text lacks become <0xNN> pieces, and decode restores them.
    emoji_ids = ours.encode("😀", add_special_tokens=False)
    assert [ours.id_to_piece(i) for i in emoji_ids][-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert ours.decode(emoji_ids) == "😀"


def test_sentencepiece_user_defined_symbols_encode_whole_like_hf(tmp_path, shakespeare_text):
    """Pieces a model was trained with as user_defined_symbols are one token each wherever they occur (as
    sentencepiece and transformers tokenize them), and decode back as text, not as special tokens."""
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with protobuf")
    symbols = ("<tool>", "foo", "\n\n")
    model_dir = make_sentencepiece_dir(tmp_path, shakespeare_text, user_defined_symbols=symbols)
    ours, hf = Tokenizer.from_pretrained(model_dir), hf_tokenizer(model_dir)
    for text in ("foofoo", "x<tool>y", "a\n\nb", "ROMEO:\n\nfoo <tool> bar"):
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids) == text
    pieces = [ours.id_to_piece(i) for i in ours.encode("x<tool>y", add_special_tokens=False)]
    assert "<tool>" in pieces
    assert not ours.all_special_ids & set(ours.encode("foo", add_special_tokens=False))


def test_sentencepiece_leading_space_like_hf_llama(sp_dir):
    ours = Tokenizer.from_pretrained(sp_dir)
    words = ours.encode("Hello world", add_special_tokens=False)
    assert ours.id_to_piece(words[0]).startswith("▁")  # the dummy prefix
    assert ours.decode(words) == "Hello world"          # ... and its space stripped on decode
    assert ours.decode([ours.bos_token_id] + words, skip_special_tokens=False) == "<s> Hello world"
    assert ours.encode(" Hello world", add_special_tokens=False) == words  # one "▁", as HF v5 does


def test_bos_eos_flags(tmp_path, shakespeare_text, tiny_llama_dir):
    sp_no_bos = make_sentencepiece_dir(tmp_path / "nobos", shakespeare_text, add_bos=False)
    tok = Tokenizer.from_pretrained(sp_no_bos)
    assert tok.encode("Hello")[0] != tok.bos_token_id == 1
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)

    eos_dir = tmp_path / "eos"
    shutil.copytree(tiny_llama_dir, eos_dir)
    config = json.loads((eos_dir / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (eos_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(eos_dir)
    ids = tok.encode("Hello")
    assert ids[0] != 1 and ids[-1] == 2
    assert tok.encode("Hello", add_special_tokens=False) == ids[:-1]


def test_special_tokens_in_text_encode_whole(tiny_llama_dir):
    tok = Tokenizer.from_pretrained(tiny_llama_dir)
    ids = tok.encode("a<s>b</s>", add_special_tokens=False)
    assert 1 in ids and ids[-1] == 2
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<s>b</s>"


def test_eos_ids_union_from_all_configs(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "eos_union"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2, 6], "bos_token_id": 1}))
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = [7, 5]
    (model_dir / "config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(model_dir).eos_token_ids == (2, 5, 6, 7)


def test_missing_tokenizer_files_give_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_from_tokenizer_config_matches_hf(tiny_llama_dir, sp_dir):
    for model_dir in (tiny_llama_dir, sp_dir):
        if model_dir == sp_dir:
            pytest.importorskip("google.protobuf")
        ours = Tokenizer.from_pretrained(model_dir)
        hf = hf_tokenizer(model_dir)
        assert ours.has_chat_template
        for add_prompt in (True, False):
            expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_prompt)
            assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_prompt) == expected


def test_chat_template_jinja_file_wins_and_list_form(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "jinja"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}\n    {% if m.content %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ours = Tokenizer.from_pretrained(model_dir)
    expected = hf_tokenizer(model_dir).apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES) == expected
    assert ours.apply_chat_template(MESSAGES[:1]) == "<|user|>Hi there!\n<|assistant|>"  # trim/lstrip blocks

    listed = tmp_path / "listed"
    shutil.copytree(tiny_llama_dir, listed)
    config = json.loads((listed / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    (listed / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(listed).apply_chat_template(MESSAGES) == "Hi there!!"


@pytest.mark.parametrize("source", [
    "{% if tools is not none %}TOOLS {{ tools | tojson }}\n{% endif %}{{ messages[0].content }}",
    "{% if tools is defined %}TOOLS {{ tools | tojson }}\n{% endif %}{{ messages[0].content }}",
    "{% if documents is not none %}DOCS{% endif %}{{ messages[0].content }}",
], ids=["tools-is-not-none", "tools-is-defined", "documents"])
def test_a_request_without_tools_renders_as_transformers_does(tmp_path, tiny_llama_dir, source):
    """transformers always passes tools=None and documents=None: a template testing `tools is not none`
    failed (tojson of an undefined) and so refused every chat request that had no tools."""
    model_dir = tmp_path / "tools"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(source)
    expected = hf_tokenizer(model_dir).apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_pretrained(model_dir).apply_chat_template(MESSAGES) == expected


def test_missing_chat_template_gives_a_clear_error(tmp_path, shakespeare_text):
    tok = Tokenizer.from_pretrained(make_sentencepiece_dir(tmp_path, shakespeare_text, chat_template=None))
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_a_template_that_does_not_compile_is_named_at_load(tmp_path, tiny_llama_dir, caplog):
    model_dir = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with caplog.at_level("WARNING", logger="model.chat_template"):
        tok = Tokenizer.from_pretrained(model_dir)
    assert "does not compile" in caplog.text and "line 2" in caplog.text
    with pytest.raises(ChatTemplateError, match="does not compile"):  # and each chat request says so
        tok.apply_chat_template(MESSAGES)
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.chat_template"):
        Tokenizer.from_pretrained(tiny_llama_dir)
    assert "chat template" not in caplog.text


def test_template_raise_exception_reaches_the_caller(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
])
def test_sandbox_refuses_unsafe_template_code(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render(MESSAGES)


def test_sandbox_hides_private_attributes():
    # An unsafe attribute reads as undefined (renders empty) unless used further, as in transformers.
    assert ChatTemplate("{{ raise_exception.__globals__ }}|{{ messages.__len__ }}").render(MESSAGES) == "|"


def test_hf_template_extras():
    source = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
              "{% else %}{{ m | tojson }}{% endif %}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}"
              "{% set ns = namespace(self=1) %}{{ ns.self }}")
    assert ChatTemplate(source).render(MESSAGES) == (
        '{"role": "user", "content": "Hi there!"}Hello. How can I help?1')  # tojson keeps '<' and non-ASCII


def test_output_and_time_limits():
    huge = ChatTemplate("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", max_output_chars=1_000_000)
    with pytest.raises(ChatTemplateError, match="exceeds 1000000 characters"):
        huge.render(MESSAGES)
    slow = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                        max_render_seconds=0.2)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="longer than 0.2 s"):
        slow.render(MESSAGES)
    assert time.monotonic() - start < 2.0


def test_unigram_sentencepiece_is_flagged(tmp_path, shakespeare_text, caplog):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shakespeare_text[:30_000].splitlines()),
                                   model_writer=model, vocab_size=300, model_type="unigram", minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with caplog.at_level("WARNING", logger="model.tokenizer"):
        tok = Tokenizer.from_pretrained(tmp_path)
    assert "unigram" in caplog.text
    assert tok.decode(tok.encode("the king")) == "the king"


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_token_bytes_rebuild_the_text_where_decoding_tokens_alone_gives_replacement_characters(
        kind, tiny_llama_dir, sp_dir):
    """OpenAI's logprob `bytes`: an emoji split over byte tokens decodes, token by token, to U+FFFDs; the
    tokens' own bytes, joined, are the text (sentencepiece: after its dummy-prefix space)."""
    from model.token_bytes import token_string
    tok = Tokenizer.from_pretrained(tiny_llama_dir if kind == "tokenizer.json" else sp_dir)
    text = "emoji 😀🎉 café naïve 中文 日本語"
    ids = tok.encode(text, add_special_tokens=False)
    joined = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8")
    assert joined == (text if kind == "tokenizer.json" else " " + text)
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial, "the text should need byte tokens in this vocabulary"
    assert all(token_string(tok.token_bytes(i), "bytes:").startswith("bytes:\\x") for i in partial)
    whole = [i for i in ids if "\ufffd" not in tok.decode([i])]  # a whole token: the text decoding gives
    assert all(tok.token_bytes(i).decode().strip() == tok.decode([i]).strip() for i in whole)
    special = tok.all_special_ids
    assert all(tok.token_bytes(i) == tok.decode([i], skip_special_tokens=False).encode() for i in special)
    past = tok.vocab_size + 3  # a model's padded vocabulary (Qwen2.5: 151,936 rows, 151,665 tokens) can
    assert tok.token_bytes(past) == tok.decode([past]).encode() == b""  # sample these: no text, no error

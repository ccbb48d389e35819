"""Tokenizer: text <-> token ids for a checkpoint dir, matching transformers' AutoTokenizer.

One backend for both formats: a `tokenizers.Tokenizer`. `tokenizer.json` loads as is; a sentencepiece
`tokenizer.model` is read with `sentencepiece` and rebuilt as the BPE that transformers' LlamaTokenizer
builds from it (byte fallback, Metaspace "▁" with the dummy prefix, a decoder that strips the first
space), so encode and decode agree with HF id for id, including HF's quirks (a text that starts with a
space gets one "▁", not two; after a special token in the text no dummy prefix is added unless
`legacy` is true).

BOS/EOS: if tokenizer_config.json states `add_bos_token` or `add_eos_token`, those flags decide (the
other defaults to false); if it states neither, tokenizer.json's post-processor decides (none: no BOS).
This is transformers' rule for tokenizer.model. For tokenizer.json, transformers 5 ignores the config's
flags and always uses the post-processor; we honour an explicit flag instead, since a checkpoint that
writes `add_bos_token: true` next to a tokenizer.json without a post-processor means it.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

from model.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from model.token_bytes import piece_decoder

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "TokenizerError", "ChatTemplateError", "sentencepiece_backend"]

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
LLAMA_SPECIAL_DEFAULTS = MappingProxyType({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
METASPACE = "\u2581"  # sentencepiece's visible space, "▁"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the file and the reason."""


class Tokenizer:
    def __init__(self, backend, *, bos_token_id: int | None, eos_token_ids: tuple[int, ...],
                 special_tokens: dict[str, str], chat_template: ChatTemplate | None) -> None:
        self._backend = backend  # tokenizers.Tokenizer, post-processor already set for BOS/EOS
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.special_tokens = dict(special_tokens)  # "bos_token" -> "<s>", ... (only those defined)
        self._chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        specials = {tok.content for tok in backend.get_added_tokens_decoder().values() if tok.special}
        specials.update(special_tokens.values())
        self.all_special_ids: frozenset[int] = frozenset(
            i for i in (backend.token_to_id(t) for t in specials) if i is not None)
        self._added = frozenset(backend.get_added_tokens_decoder())  # ids of tokens that are their text
        self._piece_bytes = piece_decoder(backend.to_str())
        self._token_bytes: dict[int, bytes] = {}  # memo: logprobs ask for the same tokens step after step

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        if (model_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as Backend
            try:
                backend = Backend.from_file(str(model_dir / "tokenizer.json"))
            except Exception as exc:
                raise TokenizerError(f"{model_dir / 'tokenizer.json'} is not a valid tokenizers file: {exc}") from exc
            special_tokens = _special_tokens(config, {})
        elif (model_dir / "tokenizer.model").is_file():
            backend = sentencepiece_backend(model_dir / "tokenizer.model", legacy=bool(config.get("legacy", False)),
                                            add_prefix_space=config.get("add_prefix_space"))
            special_tokens = _special_tokens(config, LLAMA_SPECIAL_DEFAULTS)
        else:
            raise TokenizerError(f"{model_dir} has neither tokenizer.json nor tokenizer.model; cannot tokenize")
        _add_configured_tokens(backend, config, special_tokens)
        bos_id = _id_or_none(backend, special_tokens.get("bos_token"))
        eos_id = _id_or_none(backend, special_tokens.get("eos_token"))
        _set_post_processor(backend, config, special_tokens, bos_id, eos_id)
        model_configs = [_read_json(model_dir / "generation_config.json"), _read_json(model_dir / "config.json")]
        if bos_id is None:
            bos_id = next((c["bos_token_id"] for c in model_configs if isinstance(c.get("bos_token_id"), int)), None)
        # Stable union: the tokenizer's eos first, then generation_config's, then config's (either may be a list).
        eos_ids: list[int] = [] if eos_id is None else [eos_id]
        for c in model_configs:
            value = c.get("eos_token_id")
            for i in (value if isinstance(value, list) else [value]):
                if isinstance(i, int) and i not in eos_ids:
                    eos_ids.append(i)
        template = load_chat_template(model_dir, config, tuple(special_tokens.items()))
        return cls(backend, bos_token_id=bos_id, eos_token_ids=tuple(eos_ids), special_tokens=special_tokens,
                   chat_template=template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def backend_json(self) -> str:
        """The whole tokenizer as tokenizers' JSON (what grammar libraries such as llguidance load)."""
        return self._backend.to_str()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None]:
        """A streaming decoder: call it with each new token id; it returns the text that token completes,
        or None while a character is still partial (model/detokenizer.py's rule, run natively)."""
        from tokenizers.decoders import DecodeStream

        return partial(DecodeStream(skip_special_tokens=skip_special_tokens).step, self._backend)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token stands for (model/token_bytes.py): part of a character for a byte token."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            piece = self._backend.id_to_token(token_id)  # None past the tokenizer: a model's padded vocabulary
            if self._piece_bytes is None or piece is None or token_id in self._added:
                raw = self._backend.decode([token_id], skip_special_tokens=False).encode()
            else:
                raw = self._piece_bytes(piece)
            self._token_bytes[token_id] = raw
        return raw

    def id_to_piece(self, token_id: int) -> str:
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return piece

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @property
    def chat_template_source(self) -> str | None:
        return None if self._chat_template is None else self._chat_template.source

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **extra) -> str:
        """extra: more template variables (`tools`, as transformers passes them). continue_final_message: the
        final message is left open for the model to continue (needs add_generation_prompt False)."""
        if self._chat_template is None:
            raise ChatTemplateError("this model has no chat template (neither chat_template.jinja nor "
                                    "chat_template in tokenizer_config.json); send a plain prompt instead")
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                          continue_final_message=continue_final_message, **extra)


def sentencepiece_backend(model_file: Path, *, legacy: bool = False, add_prefix_space: bool | None = None):
    """A sentencepiece BPE model as the `tokenizers` BPE transformers' LlamaTokenizer builds from it."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except Exception as exc:
        raise TokenizerError(f"{model_file} is not a sentencepiece model: {exc}") from exc
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    normal = [i for i in range(len(pieces))
              if not (sp.is_unused(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    if any(not float(sp.get_score(i)).is_integer() for i in normal):
        # BPE models score piece k as -k; fractional scores mean a unigram model, which transformers'
        # LlamaTokenizer (and so this backend) still tokenizes as BPE.
        logger.warning("%s looks like a unigram sentencepiece model; tokenizing it as BPE, like "
                       "transformers' LlamaTokenizer, may differ from sentencepiece itself", model_file)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if add_prefix_space is None:
        # Whether the model prepends the dummy "▁" (normalizer_spec.add_dummy_prefix), read without protobuf.
        add_prefix_space = sp.encode("a", out_type=str)[:1] != ["a"]
    backend = Backend(models.BPE(vocab=vocab, merges=merges_from_vocab(pieces), fuse_unk=True, byte_fallback=True))
    prepend = ("first" if not legacy else "always") if add_prefix_space else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme=prepend, split=False)
    steps = [decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # undo the dummy prefix of the first word
    backend.decoder = decoders.Sequence(steps)
    # Control and unknown pieces (<s>, </s>, <unk>) are special: matched whole in text, skipped on decode.
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for i, p in enumerate(pieces)
                                if sp.is_control(i) or sp.is_unknown(i)])
    # User-defined pieces are matched whole too, as sentencepiece and transformers do, but decoded as text.
    backend.add_tokens([AddedToken(p, special=False, normalized=False) for p in user_defined_pieces(model_file)])
    return backend


def user_defined_pieces(model_file: Path) -> list[str]:
    """The USER_DEFINED pieces of a sentencepiece model, in id order. The processor's API cannot tell them
    from normal pieces, so they are read from the model's protobuf."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in proto.pieces if p.type == user_defined]


def merges_from_vocab(pieces: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a rank-ordered vocabulary: every split of a piece into two known pieces,
    ranked by the merged piece's id, then by the left part's length (sentencepiece stores no merges)."""
    rank = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for merged_id, piece in enumerate(pieces):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in rank and right in rank:
                merges.append((merged_id, cut, left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict[str, Any], defaults: Mapping[str, str]) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config[name]) if name in config else defaults.get(name)
        if text is not None:
            tokens[name] = text
    return tokens


def _add_configured_tokens(backend, config: dict[str, Any], special_tokens: dict[str, str]) -> None:
    """added_tokens_decoder entries and the named special tokens join the backend's added vocabulary,
    so they are matched whole in text (an existing piece keeps its id, as in transformers)."""
    from tokenizers import AddedToken

    entries = config.get("added_tokens_decoder") or {}
    for token_id in sorted(entries, key=int):
        entry = entries[token_id]
        content = _token_text(entry)
        if content is None:
            continue
        token = AddedToken(content, single_word=bool(entry.get("single_word", False)),
                           lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                           normalized=bool(entry.get("normalized", not entry.get("special", False))),
                           special=bool(entry.get("special", False)))
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in special_tokens.values() if t not in known]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _set_post_processor(backend, config: dict[str, Any], special_tokens: dict[str, str],
                        bos_id: int | None, eos_id: int | None) -> None:
    from tokenizers import processors

    explicit = "add_bos_token" in config or "add_eos_token" in config
    if not explicit and backend.post_processor is not None:
        return  # tokenizer.json's own post-processor decides, as in transformers
    add_bos = bool(config.get("add_bos_token", False)) and bos_id is not None
    add_eos = bool(config.get("add_eos_token", False)) and eos_id is not None
    bos, eos = special_tokens.get("bos_token"), special_tokens.get("eos_token")
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos and eos != bos else [])
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _id_or_none(backend, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)

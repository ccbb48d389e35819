"""AttentionExplainer: one model directory, a float32 torch-path model per requested num_kv_heads, and the
checks that turn a request into model/explain.py's computation.

Models are loaded on first use and kept in this object (never in module state), with the layer inputs of
the last few prompts, so that following another token of the same prompt needs no new forward. A lock
serialises requests, because the recording hooks sit on a shared module for the length of one forward.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from model.config import ModelConfig
from model.explain import KVGroup, LayerAttention, capture_layer_inputs, explain_layers, kv_groups
from model.kv_heads import valid_num_kv_heads

MAX_PROMPT_TOKENS = 256
MAX_LAYERS_PER_REQUEST = 4
_KEPT_PROMPTS = 4


class ExplainError(ValueError):
    """A request the explainer cannot serve; `field` names the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ExplainerInfo:
    model: str
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    native_num_kv_heads: int
    valid_num_kv_heads: tuple[int, ...]
    max_prompt_tokens: int
    max_layers_per_request: int


@dataclass(frozen=True)
class Token:
    index: int
    id: int
    text: str   # decoded alone (may show U+FFFD for a partial UTF-8 sequence)
    piece: str  # the vocabulary entry


@dataclass(frozen=True)
class AttentionExplanation:
    num_kv_heads: int
    head_dim: int
    groups: tuple[KVGroup, ...]
    tokens: tuple[Token, ...]
    query_index: int
    layers: tuple[LayerAttention, ...]


class AttentionExplainer:
    def __init__(self, model_dir: str | Path, *, tokenizer=None, device: str = "cpu",
                 kv_head_method: str = "mean", calibration_text: str | Path | None = None,
                 calibration_tokens: int = 2048, max_prompt_tokens: int = MAX_PROMPT_TOKENS):
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_pretrained(self.model_dir)
        if tokenizer is None:
            from model.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_pretrained(self.model_dir)
        self.tokenizer = tokenizer
        self.device = device
        self.kv_head_method = kv_head_method  # with its calibration: the pooled heads the server runs
        self.calibration = dict(calibration_text=calibration_text, calibration_tokens=calibration_tokens)
        self.max_prompt_tokens = min(max_prompt_tokens, self.config.max_context)
        self._models: dict[int, object] = {}
        # layer inputs of the last few (num_kv_heads, prompt) pairs: a token click re-walks without a forward
        self._inputs: dict[tuple[int, tuple[int, ...]], list] = {}
        self._lock = threading.Lock()

    def info(self) -> ExplainerInfo:
        c = self.config
        return ExplainerInfo(
            model=self.model_dir.name, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
            head_dim=c.head_dim, hidden_size=c.hidden_size, native_num_kv_heads=c.num_key_value_heads,
            valid_num_kv_heads=tuple(valid_num_kv_heads(c.num_attention_heads, c.num_key_value_heads)),
            max_prompt_tokens=self.max_prompt_tokens, max_layers_per_request=MAX_LAYERS_PER_REQUEST)

    def model_for(self, num_kv_heads: int | None):
        """The float32 torch-path model with `num_kv_heads` (native when None), loaded once."""
        count = self.config.num_key_value_heads if num_kv_heads is None else num_kv_heads
        valid = self.info().valid_num_kv_heads
        if count not in valid:
            raise ExplainError("num_kv_heads", f"{count} is not valid for this model "
                                               f"({self.config.num_attention_heads} query heads); valid: {list(valid)}")
        if count not in self._models:
            from model.kv_refit import load_with_kv_head_method
            native = count == self.config.num_key_value_heads
            self._models[count] = load_with_kv_head_method(
                self.model_dir, num_kv_heads=None if native else count, kv_head_method=self.kv_head_method,
                **self.calibration, dtype="float32", device=self.device, attention_backend="torch")
        return self._models[count]

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        if not prompt:
            raise ExplainError("prompt", "must not be empty")
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not ids:
            raise ExplainError("prompt", "encodes to no tokens")
        if len(ids) > self.max_prompt_tokens:
            raise ExplainError("prompt", f"is {len(ids)} tokens long; the explorer takes at most "
                                         f"{self.max_prompt_tokens}")
        return ids

    def explain(self, prompt: str, *, layers: list[int], heads: list[int] | None = None,
                num_kv_heads: int | None = None, query_index: int | None = None,
                add_special_tokens: bool = True) -> AttentionExplanation:
        """Validate every field (naming it on error), then compute. query_index None = the last token."""
        c = self.config
        if not layers:
            raise ExplainError("layers", "give at least one layer")
        if len(layers) > MAX_LAYERS_PER_REQUEST:
            raise ExplainError("layers", f"at most {MAX_LAYERS_PER_REQUEST} layers per request, got {len(layers)}")
        for layer in layers:
            if not 0 <= layer < c.num_hidden_layers:
                raise ExplainError("layers", f"layer {layer} does not exist; the model has layers "
                                             f"0..{c.num_hidden_layers - 1}")
        if heads is not None:
            if not heads:
                raise ExplainError("heads", "give at least one head, or leave it out for all heads")
            for head in heads:
                if not 0 <= head < c.num_attention_heads:
                    raise ExplainError("heads", f"head {head} does not exist; the model has query heads "
                                                f"0..{c.num_attention_heads - 1}")
        ids = self.tokenize(prompt, add_special_tokens)
        if query_index is None:
            query_index = len(ids) - 1
        if not -len(ids) <= query_index < len(ids):
            raise ExplainError("query_index", f"{query_index} is outside the prompt's {len(ids)} tokens")
        query_index %= len(ids)
        layers = list(dict.fromkeys(layers))
        with self._lock:
            model = self.model_for(num_kv_heads)
            key = (model.config.num_kv_heads, tuple(ids))
            inputs = self._inputs.pop(key, None)
            if inputs is None or len(inputs) <= max(layers):
                inputs = capture_layer_inputs(model, ids, max(layers) + 1)
            self._inputs[key] = inputs  # most recent last
            while len(self._inputs) > _KEPT_PROMPTS:
                self._inputs.pop(next(iter(self._inputs)))
            results = explain_layers(model, ids, layers, heads, query_index, inputs)
        kvh = model.config.num_kv_heads
        return AttentionExplanation(
            num_kv_heads=kvh, head_dim=c.head_dim, groups=kv_groups(c.num_attention_heads, kvh),
            tokens=tuple(self._token(i, t) for i, t in enumerate(ids)), query_index=query_index,
            layers=tuple(results))

    def _token(self, index: int, token_id: int) -> Token:
        piece = self.tokenizer.id_to_piece(token_id)
        try:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        except TypeError:  # a tokenizer without the keyword
            text = self.tokenizer.decode([token_id])
        return Token(index, token_id, text, piece)

"""ChatTemplate: a model's Jinja chat template, rendered the way transformers renders it, but bounded.

Templates come from the checkpoint, which is untrusted code. They render in jinja2's
ImmutableSandboxedEnvironment (no attribute access to dunders, no mutation of passed-in objects), with
HF's settings (`trim_blocks`, `lstrip_blocks`, `raise_exception`, a non-HTML-escaping `tojson`), so the
prompt text is byte-for-byte what `tokenizer.apply_chat_template(..., tokenize=False)` produces, with
`continue_final_message` too (the final message left open: transformers 5's marker-and-cut).

Bounds: a sandbox cannot interrupt a running template, so the time limit is cooperative: rendering is
streamed (`Template.generate`) and the deadline and output size are checked at every emitted chunk and
at every call, attribute and item access the sandbox mediates. Every loop of a template does at least one
of those per iteration, except an empty loop body, and `range` is capped at 100 000 items by jinja2
itself, so the overshoot past the deadline is bounded by one such inner loop.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_OUTPUT_CHARS = 1_000_000
MAX_RENDER_SECONDS = 2.0
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
TEMPLATE_FILE = "chat_template.jinja"
logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """No template, a template that fails, or one that exceeds the output or time limit."""


class ContinuationError(ChatTemplateError):
    """continue_final_message cannot be served: no final message to continue, or the template drops it."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()  # (variable name, token text), e.g. ("bos_token", "<s>")
    max_output_chars: int = MAX_OUTPUT_CHARS
    max_render_seconds: float = MAX_RENDER_SECONDS

    def syntax_error(self) -> str | None:
        """Why the template does not compile, or None: checked at load so the log says it at start-up, not
        at the first chat request."""
        from jinja2.exceptions import TemplateError
        try:
            _bounded_environment(time.monotonic() + self.max_render_seconds, self.max_render_seconds).parse(self.source)
        except TemplateError as exc:
            return f"{type(exc).__name__}: {exc}" + (f" (line {exc.lineno})" if getattr(exc, "lineno", None) else "")
        return None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False, **extra: Any) -> str:
        """continue_final_message: the final message is left open, for the model to continue (transformers'
        way: its content gets a marker, and the text is cut where the marker lands)."""
        if not continue_final_message:
            return self._render(messages, add_generation_prompt, extra)
        if add_generation_prompt:
            raise ContinuationError("not compatible with add_generation_prompt: the "
                                    "final message is continued, not answered")
        tagged, final = _tag_final_message(messages)
        rendered = self._render(tagged, False, extra)
        if final.strip() not in rendered or CONTINUE_TAG.strip() not in rendered:
            raise ContinuationError("the final message does not appear in the rendered "
                                    "chat (the chat template changes or drops it), so it cannot be continued")
        at = rendered.rindex(CONTINUE_TAG.strip())
        # a template that trims the content trims the marker's trailing space too: then trim the cut text
        return rendered[:at] if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:at].rstrip()

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, extra: dict[str, Any]) -> str:
        from jinja2.exceptions import SecurityError, TemplateError

        deadline = time.monotonic() + self.max_render_seconds
        env = _bounded_environment(deadline, self.max_render_seconds)
        try:
            template = env.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        variables = dict(self.special_tokens)
        variables.update(tools=None, documents=None)  # as transformers passes them: `tools is not none` works
        variables.update(extra)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        chunks: list[str] = []
        size = 0
        try:
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise ChatTemplateError(
                        f"chat template output exceeds {self.max_output_chars} characters; refusing it")
                _check_deadline(deadline, self.max_render_seconds)
                chunks.append(chunk)
        except ChatTemplateError:
            raise
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template tried an unsafe operation: {exc}") from exc
        except TemplateError as exc:  # raise_exception(...) from the template lands here, with its message
            raise ChatTemplateError(f"chat template error: {exc}") from exc
        except Exception as exc:  # untrusted code: any failure is the template's, reported as such
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        return "".join(chunks)


def _tag_final_message(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """A copy of messages whose final content (its last text part, for a list of parts) ends with the marker,
    and that content as it was."""
    if not messages:
        raise ContinuationError("the conversation is empty")
    final = dict(messages[-1])
    content = final.get("content")
    if isinstance(content, str):
        text, final["content"] = content, content + CONTINUE_TAG
    elif isinstance(content, (list, tuple)):
        parts = [dict(p) if isinstance(p, dict) else p for p in content]
        index = next((i for i in reversed(range(len(parts))) if isinstance(parts[i], dict) and "text" in parts[i]),
                     None)
        if index is None:
            raise ContinuationError("the final message has no text to continue")
        text = parts[index]["text"]
        parts[index]["text"] = text + CONTINUE_TAG
        final["content"] = parts
    else:
        raise ContinuationError("the final message has no content to continue")
    return [*messages[:-1], final], text


def load_chat_template(model_dir: Path, tokenizer_config: dict[str, Any],
                       special_tokens: tuple[tuple[str, str], ...]) -> ChatTemplate | None:
    """`chat_template.jinja` wins over `chat_template` in tokenizer_config.json, as in transformers."""
    template = _read_chat_template(model_dir, tokenizer_config, special_tokens)
    error = template.syntax_error() if template is not None else None
    if error:
        logger.warning("%s: the chat template does not compile, so chat requests will be refused: %s",
                       model_dir, error)
    return template


def _read_chat_template(model_dir: Path, tokenizer_config: dict[str, Any],
                        special_tokens: tuple[tuple[str, str], ...]) -> ChatTemplate | None:
    template_file = Path(model_dir) / TEMPLATE_FILE
    if template_file.is_file():
        return ChatTemplate(template_file.read_text(encoding="utf-8"), special_tokens)
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ChatTemplateError(f"chat_template in tokenizer_config.json must be a string, got {type(source).__name__}")
    return ChatTemplate(source, special_tokens)


def _check_deadline(deadline: float, limit: float) -> None:
    if time.monotonic() > deadline:
        raise ChatTemplateError(f"chat template rendering took longer than {limit:g} s; refusing it")


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes ('<' -> \u003c); chat templates expect plain JSON, as in transformers.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    from datetime import datetime
    return datetime.now().strftime(fmt)


def _bounded_environment(deadline: float, limit: float):
    """A fresh sandbox per render: the deadline lives in the environment, never in module state."""
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-token marking) renders its body as is."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        def call(self, context, obj, /, *args, **kwargs):  # positional-only: a template may pass self=...
            _check_deadline(deadline, limit)
            return super().call(context, obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            _check_deadline(deadline, limit)
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _check_deadline(deadline, limit)
            return super().getitem(obj, argument)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env

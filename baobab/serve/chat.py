"""Chat templates: how a list of chat messages becomes the prompt's token ids.

An export directory may hold ``chat_template.jinja`` beside ``tokenizer.json`` (the Hugging
Face convention); without one, :data:`DEFAULT_TEMPLATE` is used. A template is Jinja2,
rendered in a sandbox with these variables:

- ``messages``: a list of ``{"role", "content"}`` dicts (role: system, developer, user or
  assistant; content: a string);
- ``add_generation_prompt``: always true (the server asks for the assistant's next turn);
- ``eos_token``: the end-of-text token, ``<|endoftext|>``;
- ``raise_exception(message)``: refuses the conversation with a 400 and that message.

The default template, ChatML-like with baobab's end-of-text token closing each turn::

    <|system|>
    You are terse.<|endoftext|>
    <|user|>
    Hi!<|endoftext|>
    <|assistant|>

so a model trained on such transcripts ends its turn with ``<|endoftext|>`` (the engine's
end-of-sequence token). ``<|user|>`` and the other role markers are ordinary text.

Special-token strings in the template itself become special tokens; in message contents they
never do: the template is rendered with a placeholder for each content, and the contents are
encoded as plain text, so a user cannot forge an end of turn. A template must therefore
insert message contents unchanged (it may add text around them, or leave a message out).
"""

from __future__ import annotations

import re
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from baobab.data.tokenizer import EOT, Tokenizer

TEMPLATE_FILE = "chat_template.jinja"

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}{{ message['content'] }}{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Private-use characters: a template never contains them, so each placeholder is unambiguous.
_HOLE = "\ue000{}\ue001"
_HOLE_RE = re.compile("\ue000(\\d+)\ue001")


class ChatTemplateError(ValueError):
    """The template cannot render this conversation; the server answers 400."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class ChatTemplate:
    """A compiled chat template; :meth:`encode` turns messages into prompt token ids."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, origin: str = "the default template"):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise ValueError(f"{origin} is not a valid Jinja2 template: {err}") from None
        self.source, self.origin = source, origin

    @classmethod
    def for_export(cls, export_dir: str | Path) -> ChatTemplate:
        """The export's ``chat_template.jinja``, or the default template when it has none."""
        path = Path(export_dir) / TEMPLATE_FILE
        if path.is_file():
            return cls(path.read_text(encoding="utf-8"), origin=f"'{path}'")
        return cls()

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text (for display; :meth:`encode` is what the server uses)."""
        return self._render(messages)

    def _render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, eos_token=EOT, bos_token=""
            )
        except ChatTemplateError:
            raise
        except Exception as err:  # a template bug or a sandbox refusal, on this conversation
            raise ChatTemplateError(f"the chat template failed on these messages: {err}") from None

    def encode(self, messages: list[dict[str, str]], tokenizer: Tokenizer) -> list[int]:
        """Token ids of the rendered conversation; contents are encoded as plain text."""
        holes = [{**m, "content": _HOLE.format(i)} for i, m in enumerate(messages)]
        rendered = self._render(holes)
        pieces = _HOLE_RE.split(rendered)  # text, index, text, index, ..., text
        broken = any("\ue000" in p or "\ue001" in p for p in pieces[::2])  # a content cut up
        if broken or any(int(i) >= len(messages) for i in pieces[1::2]):
            raise ChatTemplateError(f"{self.origin} must insert message contents unchanged")
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                ids += tokenizer.encode(piece, allow_special=True) if piece else []
            else:
                content = messages[int(piece)]["content"]
                ids += tokenizer.encode(content) if content else []
        return ids

"""Chat templates: choosing one (tokenizer's own, bundled chatml/llama3, Jinja) and rendering with trained spans.

`render` returns the text and, per assistant turn, the character span the model learns: the
content and its end-of-turn token. Templates with `{% generation %}` blocks mark it themselves;
for others each span is measured by rendering the conversation prefix by prefix.
"""

import os
import re
from typing import Dict, List, Optional, Tuple

from launcher.data.errors import BadRow, DataError

# Both mark the learned part with {% generation %}: content plus end-of-turn, not the newline after.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def resolve_template(choice: Optional[str], tokenizer) -> Tuple[str, str]:
    """(label, Jinja text) for data.template: None (the tokenizer's own), a bundled name, a .jinja file or Jinja."""
    if choice is None:
        try:
            return "tokenizer", tokenizer.get_chat_template()
        except ValueError:
            raise DataError("the tokenizer has no chat template: set data.template to "
                            f"{' or '.join(TEMPLATES)}, a .jinja file or a Jinja string") from None
    if choice in TEMPLATES:
        return choice, TEMPLATES[choice]
    if choice.endswith(".jinja") and os.path.isfile(os.path.expanduser(choice)):
        with open(os.path.expanduser(choice), encoding="utf-8") as f:
            return f"file:{choice}", f.read()
    if "{{" in choice or "{%" in choice:
        return "jinja", choice
    raise DataError(f"data.template={choice!r}: must be null (the tokenizer's own), "
                    f"{', '.join(TEMPLATES)}, a .jinja file or a Jinja string")


class Renderer:
    """Renders conversations with one template and the tokenizer's special tokens."""

    def __init__(self, template: str, special_tokens: Dict[str, str]):
        self.template, self.special_tokens = template, dict(special_tokens)
        self.marked = bool(_GENERATION.search(template))

    def _render(self, messages, generation_prompt=False, spans=False):
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                [messages], chat_template=self.template, add_generation_prompt=generation_prompt,
                return_assistant_tokens_mask=spans, **self.special_tokens)
        except Exception as e:  # noqa: BLE001 - a template raising on a row is that row's problem
            raise BadRow("template_error", f"the chat template failed: {type(e).__name__}: {e}") from None
        return texts[0], (indices[0] if spans else None)

    def render(self, messages: List[Dict[str, str]]) -> Tuple[str, List[Tuple[int, int]]]:
        """The rendered conversation and one trained character span per assistant turn, in order."""
        if self.marked:
            return self._render(messages, spans=True)
        text, _ = self._render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head, _ = self._render(messages[:i], generation_prompt=True)
            turn, _ = self._render(messages[: i + 1])
            if not (text.startswith(turn) and turn.startswith(head)):
                raise BadRow("template_error", "the chat template does not render this conversation prefix by "
                             "prefix, so the assistant turns cannot be located; add {% generation %} markers to it")
            end = len(turn)
            while end > len(head) and turn[end - 1].isspace():  # the newline after the end-of-turn token
                end -= 1
            spans.append((len(head), end))
        return text, spans

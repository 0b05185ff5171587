"""Small deterministic byte-level BPE with a ChatML template, trained on the bundled tasks."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Ids 0, 1, 2 in this order. eos is <|im_end|> (it closes every assistant turn, so greedy
# generation stops at the end of the answer); <|endoftext|> is only the pad token.
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
VOCAB_SIZE = 512

# Qwen-style ChatML. {% generation %} marks what return_assistant_tokens_mask=True reports as
# assistant tokens: the answer plus its closing <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def training_texts(rows: Iterable[dict]) -> Iterable[str]:
    """Role headers and contents as the chat template lays them out, without the special tokens."""
    for row in rows:
        for m in row["messages"]:
            yield f"{m['role']}\n{m['content']}\n"


def build_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the BPE on texts and wrap it as a fast HF tokenizer with the ChatML template."""
    tok = Tokenizer(models.BPE())
    # Single digits keep arithmetic learnable (no "37" token) and, as a non-regex split, keep
    # offsets exact; ByteLevel then handles words/whitespace GPT-2 style.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="right",
    )

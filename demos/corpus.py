"""The demos' corpus and tokenizer.

The corpus is the English reference text that ships with Python (`pydoc_data.topics`): one document per
topic, plus chat pairs made from each section heading and the paragraph under it. The Llama demo trains
a byte-level BPE tokenizer on it with Llama-3 style special tokens and chat template; the other demos
copy that tokenizer's files byte for byte, so every demo speaks the same vocabulary.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 4096
# What `save_pretrained()` writes for the tokenizer; the other demos copy these from the Llama one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Llama-3 style special tokens; the chat markers let the chat template round-trip.
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Every HELD_OUT_EVERY-th topic (at HELD_OUT_AT) is kept out of the draft's training, so that its
# agreement with the demo model is measured on text it never saw (the demo model itself saw it all).
HELD_OUT_EVERY, HELD_OUT_AT = 10, 5
Part = Literal["all", "train", "held_out"]

_QUESTIONS = (
    "Tell me about {}.",
    "What does the Python documentation say about {}?",
    "Explain {}.",
    "Can you describe {}?",
)


def _is_underline(line: str) -> bool:
    line = line.strip()
    return len(line) >= 3 and len(set(line)) == 1 and line[0] in "*=-~"


def _blocks(text: str) -> list[tuple[str, str]]:
    """Split a reST-ish topic text into ("heading" | "prose" | "code", text) blocks.

    Prose is hard-wrapped at 72 columns in the source; joining it into one line per paragraph
    makes the model write running text. Indented blocks (code, grammar, tables) keep their layout.
    """
    blocks = []
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = para.split("\n")
        if len(lines) >= 2 and _is_underline(lines[1]):
            blocks.append(("heading", lines[0].strip()))
            lines = lines[2:]
            if not lines:
                continue
        if any(line.startswith((" ", "\t")) for line in lines):
            blocks.append(("code", "\n".join(lines)))
        else:
            blocks.append(("prose", " ".join(line.strip() for line in lines)))
    return blocks


def _topics(max_docs: int | None, part: Part) -> list[str]:
    from pydoc_data.topics import topics

    texts = [text for _, text in sorted(topics.items())[:max_docs]]
    if part == "all":
        return texts
    held_out = part == "held_out"
    return [text for i, text in enumerate(texts) if (i % HELD_OUT_EVERY == HELD_OUT_AT) == held_out]


def load_corpus(max_docs: int | None = None, part: Part = "all") -> tuple[list[str], list[tuple[str, str]]]:
    """English documents from `pydoc_data.topics`, plus (question, answer) chat pairs made
    from each section heading and the paragraph that follows it.

    `max_docs` keeps the first topics only; `part` keeps all of them, the draft's training part, or
    its held-out part (a topic's chat pairs go with it).
    """
    docs, chats = [], []
    for text in _topics(max_docs, part):
        blocks = _blocks(text)
        docs.append("\n\n".join(body for _, body in blocks))
        heading = None
        for kind, body in blocks:
            if kind == "heading":
                heading = body
            elif heading and kind == "prose" and body.endswith(".") and len(body) >= 40:
                # A heading's first full-sentence paragraph answers "tell me about <heading>".
                topic = heading.replace('"', "").lower()
                chats.append((_QUESTIONS[len(chats) % len(_QUESTIONS)].format(topic), body))
                heading = None
    return docs, chats


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (never an unknown token), adding <|begin_of_text|> like Llama 3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def wrap_tokenizer(tok: Tokenizer):
    """A transformers fast tokenizer with the special tokens and chat template set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def encode_corpus(tokenizer, docs: list[str], chats: list[tuple[str, str]]) -> torch.Tensor:
    """One long token stream: plain documents, then chat turns, each self-delimited."""
    backend = tokenizer.backend_tokenizer  # raw encoder: no max-length warnings on long docs
    ids: list[int] = []
    for doc in docs:
        ids += backend.encode(doc).ids + [tokenizer.eos_token_id]  # BOS comes from the template
    for question, answer in chats:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids += backend.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def copy_tokenizer_files(source: Path, output_dir: Path) -> None:
    """Byte-for-byte copies, so the demos' tokenizers cannot drift apart."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{source} has no tokenizer.json to reuse")
    for name in copied:
        shutil.copyfile(source / name, output_dir / name)

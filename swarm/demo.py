"""The shipped demo model: a tiny Llama-architecture causal LM trained on CPU in minutes.

`build_demo_model()` trains a byte-level BPE tokenizer and an 8-block Llama (grouped-query
attention, 8 query / 4 key-value heads) on the English reference text that ships with Python
(`pydoc_data.topics`), then saves it in the usual Hugging Face layout (safetensors, bfloat16)
so `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained()` load it offline. The result lives
in `swarm/demo_model/` (`DEMO_MODEL_PATH`) so nobody has to train it.

Plain Python on purpose: no Django import, so workers and scripts can use it directly.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEMO_MODEL_PATH: Path = Path(__file__).resolve().parent / "demo_model"

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

# Model shape. Parameters: 2 * vocab * hidden (untied embeddings + head)
# + layers * (attention 2*h*h + 2*h*h/2 + MLP 3*h*inter) ~= 6.8M, i.e. ~13.6 MB in bfloat16.
VOCAB_SIZE = 4096
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 512
NUM_LAYERS = 8
NUM_HEADS = 8
NUM_KV_HEADS = 4

# Training. Windows are short (CPU budget) but long enough to cover a paragraph.
BLOCK_SIZE = 256
BATCH_SIZE = 8
LEARNING_RATE = 2e-3
MIN_LR_RATIO = 0.1
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
LOG_EVERY_S = 20.0

_QUESTIONS = (
    "Tell me about {}.",
    "What does the Python documentation say about {}?",
    "Explain {}.",
    "Can you describe {}?",
)


# ---------------------------------------------------------------------------------------------
# Data


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


def load_corpus(max_docs: int | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """English documents from `pydoc_data.topics`, plus (question, answer) chat pairs made
    from each section heading and the paragraph that follows it."""
    from pydoc_data.topics import topics

    docs, chats = [], []
    for _, text in sorted(topics.items())[:max_docs]:
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


# ---------------------------------------------------------------------------------------------
# Tokenizer


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


# ---------------------------------------------------------------------------------------------
# Model and training


def make_model(tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # A chat answer ends with <|eot_id|>, a document with <|end_of_text|>: stop on either.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, eot_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        repetition_penalty=1.1,
        max_new_tokens=128,
    )
    return model


def _lr_at(progress: float) -> float:
    """Linear warmup then cosine decay to MIN_LR_RATIO, over the fraction of time spent."""
    if progress < WARMUP_FRACTION:
        return LEARNING_RATE * max(progress, 1e-3) / WARMUP_FRACTION
    decay = min(1.0, (progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION))
    return LEARNING_RATE * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * decay)))


def train(
    model,
    data: torch.Tensor,
    *,
    train_seconds: float,
    seed: int,
    log: Callable[[str], object] = print,
) -> dict[str, float]:
    """AdamW on random windows for a wall-clock budget; the schedule follows elapsed time."""
    gen = torch.Generator().manual_seed(seed)
    block = min(BLOCK_SIZE, len(data) - 1)
    # No weight decay on norms (1-D tensors); the usual GPT recipe.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8)
    model.train()

    start = last_log = time.monotonic()
    step, tokens, window_loss, window_steps, recent_loss = 0, 0, 0.0, 0, float("nan")
    while True:
        elapsed = time.monotonic() - start
        if step > 0 and elapsed >= train_seconds:
            break
        lr = _lr_at(elapsed / train_seconds if train_seconds > 0 else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr

        starts = torch.randint(0, len(data) - block, (BATCH_SIZE,), generator=gen)
        batch = torch.stack([data[s : s + block + 1] for s in starts.tolist()])
        inputs, targets = batch[:, :-1], batch[:, 1:]  # next-token prediction, shifted here
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

        step += 1
        tokens += inputs.numel()
        window_loss += loss.item()
        window_steps += 1
        now = time.monotonic()
        if now - last_log >= LOG_EVERY_S or now - start >= train_seconds:
            recent_loss = window_loss / window_steps
            log(
                f"step {step:5d} | {now - start:6.1f}s | loss {recent_loss:.3f} | lr {lr:.2e}"
                f" | {tokens / (now - start):6.0f} tok/s"
            )
            last_log, window_loss, window_steps = now, 0.0, 0
    model.eval()
    return {"steps": step, "tokens": tokens, "loss": recent_loss, "seconds": time.monotonic() - start}


# ---------------------------------------------------------------------------------------------
# Entry point


def build_demo_model(
    output_dir: str | Path,
    *,
    train_seconds: float = 300,
    seed: int = 0,
    log: Callable[[str], object] = print,
    max_docs: int | None = None,
    num_threads: int = 2,
) -> None:
    """Train the tokenizer and model from scratch and save both to `output_dir`.

    `max_docs` limits the corpus (tests use it to stay fast). The step count depends on the
    machine, so only the seeds (data order, initialisation) are deterministic.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)  # the machine is shared; a small model gains little more
    try:
        torch.manual_seed(seed)
        docs, chats = load_corpus(max_docs)
        log(f"corpus: {len(docs)} documents, {sum(map(len, docs))} characters, {len(chats)} chat pairs")

        tokenizer = wrap_tokenizer(train_tokenizer(docs))
        data = encode_corpus(tokenizer, docs, chats)
        log(f"tokenizer: {len(tokenizer)} tokens; corpus is {len(data)} tokens")

        model = make_model(tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {n_params / 1e6:.2f}M parameters ({n_params * 2 / 1e6:.1f} MB in bfloat16)")

        stats = train(model, data, train_seconds=train_seconds, seed=seed, log=log)
        log(f"trained {stats['steps']} steps, {stats['tokens']} tokens in {stats['seconds']:.0f}s")

        model.to(torch.bfloat16)
        model.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "training.json").write_text(
            json.dumps({"seed": seed, "parameters": n_params, "corpus_tokens": len(data), **stats}, indent=2) + "\n"
        )
        files = [f for f in output_dir.iterdir() if f.is_file()]
        for f in files:
            f.chmod(0o644)  # safetensors writes 0600; the folder ships in the repo
        size = sum(f.stat().st_size for f in files)
        log(f"saved to {output_dir} ({size / 1e6:.1f} MB)")
    finally:
        torch.set_num_threads(previous_threads)

"""Training the shipped demo models on CPU in minutes (`manage.py makedemomodel`).

Two families, one recipe. The Llama demo trains a byte-level BPE tokenizer and an 8-block Llama
(grouped-query attention, 8 query / 4 key-value heads) on the English reference text that ships
with Python (`pydoc_data.topics`). The Mixtral demo reuses that tokenizer (same vocabulary, same
chat template) and trains an 8-block sparse MoE (4 experts, top-2) on the same corpus with the
same loop. Both are saved in the usual Hugging Face layout (safetensors, bfloat16) so
`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained()` load them offline; the results ship
in `swarm/demo_model/` and `swarm/demo_moe_model/` (`swarm.demo_models`) so nobody has to train them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from swarm.demo_models import DEMO_MODEL_PATH, DEMO_MOE_MODEL_PATH

FAMILIES = ("llama", "mixtral")
DEFAULT_OUTPUT: dict[str, Path] = {"llama": DEMO_MODEL_PATH, "mixtral": DEMO_MOE_MODEL_PATH}
# What `save_pretrained()` writes for the tokenizer; the Mixtral demo copies these from the Llama one.
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

# Model shape. Llama parameters: 2 * vocab * hidden (untied embeddings + head)
# + layers * (attention 2*h*h + 2*h*h/2 + MLP 3*h*inter) ~= 6.8M, i.e. ~13.6 MB in bfloat16.
VOCAB_SIZE = 4096
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 512
NUM_LAYERS = 8
NUM_HEADS = 8
NUM_KV_HEADS = 4
# Mixtral: the same attention, and each MLP becomes experts * 3*h*inter + a router, ~= 7.6M
# parameters, i.e. ~15.2 MB in bfloat16: the largest expert size that keeps the folder under 16 MB.
MOE_INTERMEDIATE_SIZE = 160
MOE_NUM_EXPERTS = 4
MOE_TOP_K = 2
MOE_ROUTER_AUX_LOSS_COEF = 0.02  # Mixtral-8x7B's; keeps the router from collapsing onto one expert

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


def make_generation_config(tokenizer):
    from transformers import GenerationConfig

    # A chat answer ends with <|eot_id|>, a document with <|end_of_text|>: stop on either.
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        repetition_penalty=1.1,
        max_new_tokens=128,
    )


def make_model(tokenizer, family: str = "llama"):
    """A freshly initialised demo model of `family` ("llama" or "mixtral") for this tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    shared = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
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
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=INTERMEDIATE_SIZE, **shared))
    elif family == "mixtral":
        config = MixtralConfig(
            intermediate_size=MOE_INTERMEDIATE_SIZE,
            num_local_experts=MOE_NUM_EXPERTS,
            num_experts_per_tok=MOE_TOP_K,
            router_aux_loss_coef=MOE_ROUTER_AUX_LOSS_COEF,
            **shared,
        )
        model = MixtralForCausalLM(config)
    else:
        raise ValueError(f"unknown demo family {family!r}; expected one of {FAMILIES}")
    model.generation_config = make_generation_config(tokenizer)
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
    """AdamW on random windows for a wall-clock budget; the schedule follows elapsed time.

    A sparse MoE also gets its router's load-balancing loss (scaled by the config's coefficient), so
    that every expert learns; the logged loss is next-token cross-entropy alone, comparable across families.
    """
    gen = torch.Generator().manual_seed(seed)
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0)  # 0 for dense models
    forward_options = {"output_router_logits": True} if aux_coef else {}
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
        outputs = model(input_ids=inputs, **forward_options)
        logits = outputs.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        objective = loss + aux_coef * outputs.aux_loss if aux_coef else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
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
    output_dir: str | Path | None = None,
    *,
    family: str = "llama",
    train_seconds: float = 300,
    seed: int = 0,
    log: Callable[[str], object] = print,
    max_docs: int | None = None,
    num_threads: int = 2,
    tokenizer_from: str | Path = DEMO_MODEL_PATH,
) -> Path:
    """Train a demo model of `family` from scratch and save it to `output_dir` (default: the shipped folder).

    The Llama demo trains its own tokenizer; the Mixtral demo copies the tokenizer files of
    `tokenizer_from` (the Llama demo's), so both demos speak the same vocabulary and chat template.
    `max_docs` limits the corpus (tests use it to stay fast). The step count depends on the
    machine, so only the seeds (data order, initialisation) are deterministic.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown demo family {family!r}; expected one of {FAMILIES}")
    output_dir = Path(output_dir) if output_dir is not None else DEFAULT_OUTPUT[family]
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)  # the machine is shared; a small model gains little more
    try:
        torch.manual_seed(seed)
        docs, chats = load_corpus(max_docs)
        log(f"corpus: {len(docs)} documents, {sum(map(len, docs))} characters, {len(chats)} chat pairs")

        if family == "llama":
            tokenizer = wrap_tokenizer(train_tokenizer(docs))
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        data = encode_corpus(tokenizer, docs, chats)
        log(f"tokenizer: {len(tokenizer)} tokens; corpus is {len(data)} tokens")

        model = make_model(tokenizer, family)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {family}, {n_params / 1e6:.2f}M parameters ({n_params * 2 / 1e6:.1f} MB in bfloat16)")

        stats = train(model, data, train_seconds=train_seconds, seed=seed, log=log)
        log(f"trained {stats['steps']} steps, {stats['tokens']} tokens in {stats['seconds']:.0f}s")

        model.to(torch.bfloat16)
        model.save_pretrained(output_dir, safe_serialization=True)
        if family == "llama":
            tokenizer.save_pretrained(output_dir)
        else:
            _copy_tokenizer_files(Path(tokenizer_from), output_dir)
        (output_dir / "training.json").write_text(
            json.dumps({"seed": seed, "parameters": n_params, "corpus_tokens": len(data), **stats}, indent=2) + "\n"
        )
        files = [f for f in output_dir.iterdir() if f.is_file()]
        for f in files:
            f.chmod(0o644)  # safetensors writes 0600; the folder ships in the repo
        size = sum(f.stat().st_size for f in files)
        log(f"saved to {output_dir} ({size / 1e6:.1f} MB)")
        return output_dir
    finally:
        torch.set_num_threads(previous_threads)


def _copy_tokenizer_files(source: Path, output_dir: Path) -> None:
    """Byte-for-byte copies, so the two demos' tokenizers cannot drift apart."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{source} has no tokenizer.json to reuse")
    for name in copied:
        shutil.copyfile(source / name, output_dir / name)

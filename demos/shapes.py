"""The demo models' shapes and generation settings.

Sizes in bfloat16 (2 bytes a parameter), with vocab V = 4096 and hidden size h:
- Llama: untied embeddings and head (2*V*h) + 8 blocks of attention (2*h*h + 2*h*h/2, grouped-query)
  and MLP (3*h*inter): ~6.8M parameters, ~13.6 MB.
- Mixtral: the same attention, each MLP becomes experts * 3*h*inter + a router: ~7.6M, ~15.2 MB, the
  largest expert size that keeps the folder under 16 MB.
- Draft: the Llama demo's assistant for speculative decoding, distilled from it. Its hidden size is the
  demo's, so it starts from the demo's own output embedding (tied: V*h = 1.05M) and first block; that
  leaves room for one block whose MLP keeps 128 of the 512 units: ~1.34M parameters, ~2.69 MB, under
  3 MB with the tokenizer files (0.27 MB). (A 2-block draft of hidden size 192 agreed less with the demo after
  the same training, since it cannot start from the demo's parts.)
"""

from __future__ import annotations

from typing import Any

from demos.corpus import EOT

FAMILIES = ("llama", "mixtral", "draft")

_DEMO: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
SHAPES: dict[str, dict[str, Any]] = {
    "llama": _DEMO,
    "mixtral": {
        **_DEMO,
        "intermediate_size": 160,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02,  # Mixtral-8x7B's; keeps the router from collapsing onto one expert
    },
    "draft": {**_DEMO, "intermediate_size": 128, "num_hidden_layers": 1, "tie_word_embeddings": True},
}

# The draft proposes this many tokens at every verification step ("constant"). A round trip to the
# servers costs far more than a draft token, and the sequence-distilled draft is right ~80% of the time,
# so a long fixed draft wins: bench_wan's speculative_speedup (10 ms links) was 2.41 with transformers'
# "heuristic" schedule from 5 (+2 after a fully accepted step, -1 after a rejection), 2.73 with 6,
# 2.93 with 8 and 3.00 with 10, whose no-delay speedup fell to 1.33 (1.45 with 8).
DRAFT_TOKENS = 8
DRAFT_SCHEDULE = "constant"
# Left unset, transformers stops drafting at the first token the draft gives under 0.4; distilled from
# a demo this uncertain, the draft is under that even when right, and the demo's greedy output then
# took 1.98 tokens per forward instead of 2.81. 0 turns that early stop off.
DRAFT_CONFIDENCE_THRESHOLD = 0.0


def make_generation_config(tokenizer, family: str = "llama"):
    from transformers import GenerationConfig

    # A chat answer ends with <|eot_id|>, a document with <|end_of_text|>: stop on either.
    options: dict[str, Any] = dict(
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
    if family == "draft":
        options.update(
            num_assistant_tokens=DRAFT_TOKENS,
            num_assistant_tokens_schedule=DRAFT_SCHEDULE,
            assistant_confidence_threshold=DRAFT_CONFIDENCE_THRESHOLD,
        )
    return GenerationConfig(**options)


def make_model(tokenizer, family: str = "llama"):
    """A freshly initialised demo model of `family` (one of FAMILIES) for this tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown demo family {family!r}; expected one of {FAMILIES}")
    options = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[family],
    )
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**options))
    else:
        model = LlamaForCausalLM(LlamaConfig(**options))
    model.generation_config = make_generation_config(tokenizer, family)
    return model

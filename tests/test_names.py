"""Block UIDs and DHT prefixes (PROTOCOL.md, "Names")."""

from __future__ import annotations

import pytest

from swarm.models.registry import UnsupportedModelError, dht_prefix_for
from swarm.names import (
    MAX_PREFIX_LENGTH,
    block_uid,
    block_uids,
    is_private_prefix,
    is_valid_dht_prefix,
    join_chain,
    parse_block_uid,
    split_chain,
)


@pytest.mark.parametrize(
    ("repository", "model_type", "expected"),
    [
        ("meta-llama/Meta-Llama-3.1-70B", "llama", "Meta-Llama-3-1-70B-hf"),
        ("meta-llama/Meta-Llama-3.1-405B-Instruct", "llama", "Meta-Llama-3-1-405B-Instruct-hf"),
        ("meta-llama/Llama-2-70b-hf", "llama", "Llama-2-70b-hf"),
        ("someone/Llama-2-70b-chat-hf", "llama", "Llama-2-70b-chat-hf"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral", "Mistral-7B-Instruct-v0-2"),
        # Petals' Mixtral config keeps the owner (unlike its Llama and Falcon configs).
        ("mistralai/Mixtral-8x7B-v0.1", "mixtral", "mistralai/Mixtral-8x7B-v0-1"),
        ("tiiuae/falcon-180B", "falcon", "falcon-180B"),
        ("tiiuae/falcon-7b", "falcon", "falcon-7b"),
        ("Qwen/Qwen2.5-72B-Instruct", "qwen2", "Qwen2-5-72B-Instruct"),
        ("Qwen/Qwen3-235B-A22B", "qwen3_moe", "Qwen3-235B-A22B"),
        ("google/gemma-2-27b-it", "gemma2", "gemma-2-27b-it"),
        ("google/gemma-3-27b-it", "gemma3_text", "gemma-3-27b-it"),
        ("bigscience/bloom", "bloom", "bigscience/bloom-petals"),
        ("bigscience/bloomz-7b1.1", "bloom", "bigscience/bloomz-7b1-1-petals"),
    ],
)
def test_dht_prefix_for_hub_repositories(repository: str, model_type: str, expected: str) -> None:
    """Prefixes match what Petals 2.x peers announce for the same repository."""
    assert dht_prefix_for(repository, model_type) == expected


def test_dht_prefix_for_local_path_uses_folder_name() -> None:
    """A local checkpoint folder is named by its basename (a trailing slash does not matter), owner or not."""
    assert dht_prefix_for("/data/models/Tiny.Llama-v1.0/", "llama") == "Tiny-Llama-v1-0-hf"
    assert dht_prefix_for("/data/models/Tiny.Llama-v1.0", "llama") == "Tiny-Llama-v1-0-hf"
    assert dht_prefix_for("./mistral-mini", "mistral") == "mistral-mini"
    assert dht_prefix_for("/data/demo_moe_model", "mixtral") == "demo_moe_model"
    assert dht_prefix_for("/data/bloom-560m", "bloom") == "bloom-560m-petals"


def test_unsupported_model_type_names_the_supported_families() -> None:
    with pytest.raises(UnsupportedModelError) as error:
        dht_prefix_for("openai-community/gpt2", "gpt2")
    message = str(error.value)
    assert "'gpt2'" in message and "\n" not in message
    for model_type in ("llama", "mistral", "mixtral", "falcon", "bloom", "qwen2", "qwen3", "qwen3_moe", "gemma2"):
        assert model_type in message


@pytest.mark.parametrize(
    ("repository", "model_type"),
    [
        ("meta-llama/Meta-Llama-3.1-70B", "llama"),
        ("mistralai/Mixtral-8x7B-v0.1", "mixtral"),
        ("bigscience/bloom-7b1.0", "bloom"),
        ("/x/y/Local.Model", "llama"),
    ],
)
def test_derived_prefixes_are_valid(repository: str, model_type: str) -> None:
    """Derived prefixes never contain the UID delimiter or spaces."""
    prefix = dht_prefix_for(repository, model_type)
    assert is_valid_dht_prefix(prefix)
    assert "." not in prefix


def test_block_uid_round_trip() -> None:
    for prefix, index in [("Meta-Llama-3-1-70B-hf", 0), ("Meta-Llama-3-1-70B-hf", 79), ("bigscience/bloom-petals", 5)]:
        uid = block_uid(prefix, index)
        assert uid == f"{prefix}.{index}"
        assert parse_block_uid(uid) == (prefix, index)


def test_block_uids_range_is_end_exclusive() -> None:
    assert block_uids("m", 2, 5) == ["m.2", "m.3", "m.4"]
    assert block_uids("m", 3, 3) == []


def test_parse_block_uid_uses_last_dot() -> None:
    """Only the last dot separates the index (the prefix itself is never split further)."""
    assert parse_block_uid("a.b.7") == ("a.b", 7)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "model",  # no delimiter
        ".3",  # empty prefix
        "model.",  # empty index
        "model.x",  # non-digit index
        "model.-1",  # negative
        "model.+1",
        "model.1.5e3",
        "model. 3",
        "model.3 ",
        "model.1234567890",  # more than 9 digits
        "model.²",  # a unicode "digit" that int() cannot parse
    ],
)
def test_parse_block_uid_rejects_malformed(uid: str) -> None:
    with pytest.raises(ValueError):
        parse_block_uid(uid)


def test_parse_block_uid_rejects_non_ascii_digits() -> None:
    with pytest.raises(ValueError):
        parse_block_uid("model.\u0663")  # ARABIC-INDIC DIGIT THREE


def test_chain_join_and_split() -> None:
    uids = block_uids("Llama-2-70b-hf", 3, 6)
    chain = join_chain(uids)
    assert chain == "Llama-2-70b-hf.3 Llama-2-70b-hf.4 Llama-2-70b-hf.5"
    assert split_chain(chain) == uids
    assert split_chain(join_chain(["m.0"])) == ["m.0"]
    assert split_chain("") == []


@pytest.mark.parametrize(
    ("prefix", "valid"),
    [
        ("Meta-Llama-3-1-70B-hf", True),
        ("bigscience/bloom-petals", True),
        ("_private-model", True),
        ("x" * MAX_PREFIX_LENGTH, True),
        ("x" * (MAX_PREFIX_LENGTH + 1), False),
        ("", False),
        ("has.dot", False),
        ("has space", False),
        ("tab\tinside", False),
        ("newline\n", False),
        (None, False),
        (42, False),
        (b"bytes", False),
    ],
)
def test_is_valid_dht_prefix(prefix: object, valid: bool) -> None:
    assert is_valid_dht_prefix(prefix) is valid


def test_private_prefixes_start_with_underscore() -> None:
    assert is_private_prefix("_secret")
    assert not is_private_prefix("public_model")

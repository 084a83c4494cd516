"""Block UIDs and DHT prefixes, named as Petals 2.x names them (PROTOCOL.md, "Names")."""

from __future__ import annotations

UID_DELIMITER = "."
CHAIN_DELIMITER = " "
MODELS_INDEX_KEY = "_petals.models"
MAX_PREFIX_LENGTH = 128


def is_valid_dht_prefix(prefix: str) -> bool:
    return (
        isinstance(prefix, str)
        and 0 < len(prefix) <= MAX_PREFIX_LENGTH
        and UID_DELIMITER not in prefix
        and not any(ch.isspace() for ch in prefix)
    )


def is_private_prefix(prefix: str) -> bool:
    return prefix.startswith("_")


def block_uid(prefix: str, index: int) -> str:
    return f"{prefix}{UID_DELIMITER}{index}"


def block_uids(prefix: str, start: int, end: int) -> list[str]:
    return [block_uid(prefix, i) for i in range(start, end)]


def parse_block_uid(uid: str) -> tuple[str, int]:
    """Split `prefix.index`; raises ValueError for anything else."""
    prefix, sep, index = uid.rpartition(UID_DELIMITER)
    if not sep or not prefix or not (index.isascii() and index.isdigit()) or len(index) > 9:
        raise ValueError(f"malformed block uid {uid[:100]!r}")
    return prefix, int(index)


def join_chain(uids: list[str]) -> str:
    return CHAIN_DELIMITER.join(uids)


def split_chain(chain: str) -> list[str]:
    return chain.split(CHAIN_DELIMITER) if chain else []

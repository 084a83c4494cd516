"""Which models a crawl reads: MONITOR_MODELS parsing, and bounds on what the DHT's model index adds."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from monitor import conf
from monitor.targets import ModelTarget, choose_targets, hf_model_url, parse_models_setting, repository_url
from swarm.data_structures import ModelInfo


def test_compact_setting():
    targets = parse_models_setting(
        "Meta-Llama-3-1-405B-Instruct-hf:126:meta-llama/Meta-Llama-3.1-405B-Instruct; demo_model-hf:8::Demo: tiny"
    )
    assert targets == [
        ModelTarget(
            "Meta-Llama-3-1-405B-Instruct-hf",
            126,
            "meta-llama/Meta-Llama-3.1-405B-Instruct",
            "https://huggingface.co/meta-llama/Meta-Llama-3.1-405B-Instruct",
        ),
        ModelTarget("demo_model-hf", 8, "Demo: tiny"),
    ]


def test_json_and_list_settings():
    entry = {"dht_prefix": "bigscience/bloom-petals", "num_blocks": 70, "repository": "bigscience/bloom"}
    expected = [
        ModelTarget("bigscience/bloom-petals", 70, "bigscience/bloom", "https://huggingface.co/bigscience/bloom")
    ]
    assert (
        parse_models_setting(
            '[{"dht_prefix": "bigscience/bloom-petals", "num_blocks": 70, "repository": "bigscience/bloom"}]'
        )
        == expected
    )
    assert parse_models_setting([entry]) == expected
    assert parse_models_setting("") == []


@pytest.mark.parametrize(
    "setting",
    ["just-a-prefix", "has.dot:8", "has space:8", "model:zero", "model:0", "a:8;a:4", '[{"num_blocks": 8}]', "[1]"],
)
def test_bad_settings_are_refused(setting):
    with pytest.raises(ValueError):
        parse_models_setting(setting)


def test_conf_reports_a_bad_setting_as_improperly_configured(settings):
    settings.MONITOR_MODELS = "model:-3"
    with pytest.raises(ImproperlyConfigured, match="num_blocks"):
        conf.configured_models()


def _hf(name: str, num_blocks: int = 4) -> ModelInfo:
    return ModelInfo(num_blocks=num_blocks, repository=f"https://huggingface.co/owner/{name}")


def test_index_models_are_bounded():
    configured = [ModelTarget("official-hf", 80, "Official")]
    index = {f"custom{i:02d}": _hf(f"Custom{i}", 4 + i % 3) for i in range(30)}
    index["official-hf"] = ModelInfo(num_blocks=80)  # configured wins
    index["huge"] = _hf("Huge", 5000)  # valid on the wire, absurd for a model
    index["_private"] = _hf("Private")
    index["big"] = ModelInfo(num_blocks=64, repository="https://huggingface.co/owner/Big")

    targets, skipped = choose_targets(configured, index, max_custom_models=20, max_num_blocks=1000)

    assert targets[0] == configured[0]
    assert len(targets) == 21
    assert {t.dht_prefix for t in targets[1:]} <= {"big"} | {f"custom{i:02d}" for i in range(30)}
    (big,) = choose_targets([], {"big": index["big"]}, max_custom_models=20, max_num_blocks=1000)[0]
    assert big == ModelTarget("big", 64, "owner/Big", "https://huggingface.co/owner/Big", official=False)
    assert skipped == 1 + 1 + 11  # huge, private, and 31 custom models over the cap of 20
    assert all(not t.official for t in targets[1:])


def test_index_models_need_a_hugging_face_url_and_rank_by_verified_servers_not_claims():
    configured = [ModelTarget("official-hf", 80, "Official")]
    index = {
        # Strangers' entries: no repository, other sites, odd URLs, and many valid-looking big models.
        "norepo": ModelInfo(num_blocks=999),
        "elsewhere": ModelInfo(num_blocks=999, repository="https://example.org/owner/name"),
        "subpage": ModelInfo(num_blocks=999, repository="https://huggingface.co/owner/name/tree/main"),
        "query": ModelInfo(num_blocks=999, repository="https://huggingface.co/owner/name?x=1"),
        "plain": ModelInfo(num_blocks=999, repository="http://huggingface.co/owner/name"),
        "dots": ModelInfo(num_blocks=999, repository="https://huggingface.co/owner/../name"),
        **{f"aaa-spam{i:02d}": _hf(f"Spam{i}", 999) for i in range(40)},
        # Models real servers serve: small, late in any order, but verified by earlier crawls.
        "zz-real-a": _hf("RealA", 2),
        "zz-real-b": _hf("RealB", 2),
    }
    verified = {"zz-real-a": 3, "zz-real-b": 1, "official-hf": 5}
    targets, skipped = choose_targets(
        configured, index, max_custom_models=5, max_num_blocks=1000, verified=verified, salt=b"one"
    )
    assert [t.dht_prefix for t in targets[:3]] == ["official-hf", "zz-real-a", "zz-real-b"]
    assert all(t.dht_prefix.startswith("aaa-spam") for t in targets[3:]) and len(targets) == 6
    assert skipped == 6 + 40 - 3  # no Hugging Face URL; spam over the cap
    # The unverified candidates take turns: another crawl's salt tries others.
    again, _ = choose_targets(
        configured, index, max_custom_models=5, max_num_blocks=1000, verified=verified, salt=b"two"
    )
    assert again[:3] == targets[:3] and again[3:] != targets[3:]


@pytest.mark.parametrize(
    ("repository", "expected"),
    [
        ("https://huggingface.co/meta-llama/Meta-Llama-3.1-8B", "https://huggingface.co/meta-llama/Meta-Llama-3.1-8B"),
        ("https://huggingface.co/owner/name/", "https://huggingface.co/owner/name"),
        ("https://huggingface.co/owner", None),
        ("https://huggingface.co/owner/name/blob/main/x", None),
        ("https://huggingface.co.evil.org/owner/name", None),
        ("https://huggingface.co/owner/<b>x</b>", None),
        ("https://huggingface.co/owner/name#x", None),
        ("owner/name", None),
        ("javascript:alert(1)", None),
        (None, None),
    ],
)
def test_hugging_face_model_urls(repository, expected):
    assert hf_model_url(repository) == expected


def test_only_https_repository_links_survive():
    assert repository_url("owner/name") == "https://huggingface.co/owner/name"
    assert repository_url("https://example.org/x") == "https://example.org/x"
    assert repository_url("http://example.org/x") is None
    assert repository_url("javascript://alert(1)") is None
    assert repository_url("javascript:alert(1)").startswith("https://huggingface.co/")
    assert repository_url(None) is None

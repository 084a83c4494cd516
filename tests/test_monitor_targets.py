"""Which models a crawl reads: MONITOR_MODELS parsing, and bounds on what the DHT's model index adds."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from monitor import conf
from monitor.targets import ModelTarget, choose_targets, parse_models_setting, repository_url
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


def test_index_models_are_bounded():
    configured = [ModelTarget("official-hf", 80, "Official")]
    index = {f"custom{i:02d}": ModelInfo(num_blocks=4 + i % 3) for i in range(30)}
    index["official-hf"] = ModelInfo(num_blocks=80)  # configured wins
    index["huge"] = ModelInfo(num_blocks=5000)  # valid on the wire, absurd for a model
    index["_private"] = ModelInfo(num_blocks=4)
    index["big"] = ModelInfo(num_blocks=64, repository="https://huggingface.co/owner/Big")

    targets, skipped = choose_targets(configured, index, max_custom_models=20, max_num_blocks=1000)

    assert targets[0] == configured[0]
    assert len(targets) == 21
    assert targets[1] == ModelTarget("big", 64, "owner/Big", "https://huggingface.co/owner/Big", official=False)
    sizes = [t.num_blocks for t in targets[1:]]
    assert sizes == sorted(sizes, reverse=True)  # largest first
    assert skipped == 1 + 1 + 11  # huge, private, and 31 custom models over the cap of 20
    assert all(not t.official for t in targets[1:])


def test_only_https_repository_links_survive():
    assert repository_url("owner/name") == "https://huggingface.co/owner/name"
    assert repository_url("https://example.org/x") == "https://example.org/x"
    assert repository_url("http://example.org/x") is None
    assert repository_url("javascript://alert(1)") is None
    assert repository_url("javascript:alert(1)").startswith("https://huggingface.co/")
    assert repository_url(None) is None

"""CheckpointFiles: loading only the wanted tensors from single-file and sharded safetensors checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import swarm.checkpoint
from swarm.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointFiles

LAYER = "model.layers.2."


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoints(tiny_model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    tiny_model.save_pretrained(root / "single")
    tiny_model.save_pretrained(root / "sharded", max_shard_size="50KB")
    assert (root / "single" / SINGLE_FILE).exists() and not (root / "single" / INDEX_FILE).exists()
    assert (root / "sharded" / INDEX_FILE).exists() and not (root / "sharded" / SINGLE_FILE).exists()
    return {"single": root / "single", "sharded": root / "sharded"}


def _expected(model: LlamaForCausalLM, prefix: str) -> dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict().items() if name.startswith(prefix)}


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_tensor_names_list_the_whole_checkpoint(kind: str, checkpoints, tiny_model) -> None:
    files = CheckpointFiles(str(checkpoints[kind]))
    assert files.is_local
    assert (files.weight_map is None) == (kind == "single")
    assert set(files.tensor_names()) == set(tiny_model.state_dict())


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_load_only_wanted_tensors(kind: str, checkpoints, tiny_model) -> None:
    files = CheckpointFiles(str(checkpoints[kind]))
    loaded = files.load(lambda name: name.startswith(LAYER), dtype=torch.float32)
    expected = _expected(tiny_model, LAYER)
    assert len(expected) == 9
    assert set(loaded) == set(expected)
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_casts_to_dtype(kind: str, dtype: torch.dtype, checkpoints, tiny_model) -> None:
    loaded = CheckpointFiles(str(checkpoints[kind])).load(
        lambda name: name.startswith(LAYER) or name == "model.norm.weight", dtype=dtype
    )
    expected = _expected(tiny_model, LAYER) | {"model.norm.weight": tiny_model.state_dict()["model.norm.weight"]}
    assert set(loaded) == set(expected)
    for name, tensor in loaded.items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor, expected[name].to(dtype)), name


def test_load_nothing(checkpoints) -> None:
    assert CheckpointFiles(str(checkpoints["sharded"])).load(lambda name: False, dtype=torch.float32) == {}


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real = swarm.checkpoint.safe_open

    def recording(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(swarm.checkpoint, "safe_open", recording)
    return opened


def test_sharded_load_opens_only_needed_shards(checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoints["sharded"]
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    all_shards = set(weight_map.values())
    needed = {shard for name, shard in weight_map.items() if name.startswith(LAYER)}
    assert 1 < len(needed) < len(all_shards)  # the checkpoint really is split, and layer 2 is not everywhere

    opened = _record_opens(monkeypatch)
    loaded = CheckpointFiles(str(path)).load(lambda name: name.startswith(LAYER), dtype=torch.float32)
    assert len(loaded) == 9
    assert sorted(opened) == sorted(needed)  # each needed shard once, nothing else


def test_sharded_load_of_embeddings_opens_one_shard(checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoints["sharded"]
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    opened = _record_opens(monkeypatch)
    loaded = CheckpointFiles(str(path)).load(lambda name: name == "model.embed_tokens.weight", dtype=torch.float32)
    assert list(loaded) == ["model.embed_tokens.weight"]
    assert opened == [weight_map["model.embed_tokens.weight"]]


def test_files_for_groups_by_shard(checkpoints) -> None:
    path = checkpoints["sharded"]
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    names = [name for name in weight_map if name.startswith(LAYER)]
    groups = CheckpointFiles(str(path)).files_for(names)
    assert sorted(n for members in groups.values() for n in members) == sorted(names)
    for file, members in groups.items():
        assert Path(file).parent == path
        assert all(weight_map[n] == Path(file).name for n in members)


def test_missing_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CheckpointFiles(str(tmp_path))


def test_missing_shard_raises_file_not_found(checkpoints, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((checkpoints["sharded"] / INDEX_FILE).read_text())
    (broken / INDEX_FILE).write_text(json.dumps(index))
    files = CheckpointFiles(str(broken))  # the index alone is enough to construct
    with pytest.raises(FileNotFoundError):
        files.load(lambda name: name.startswith(LAYER), dtype=torch.float32)


def test_missing_shard_error_names_the_shard(checkpoints, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((checkpoints["sharded"] / INDEX_FILE).read_text())
    (broken / INDEX_FILE).write_text(json.dumps(index))
    shard = index["weight_map"]["model.embed_tokens.weight"]
    with pytest.raises(FileNotFoundError, match=shard):
        CheckpointFiles(str(broken)).load(lambda name: name == "model.embed_tokens.weight", dtype=torch.float32)


def test_nonexistent_absolute_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CheckpointFiles(str(tmp_path / "no-such-model"))


# ----- block by block, casting a chunk at a time -----

BLOCKS = [f"model.layers.{index}." for index in range(4)]


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_blocks_reads_each_block_only_when_taken(kind, dtype, checkpoints, tiny_model, monkeypatch) -> None:
    """A block's tensors are read when the consumer asks for that block, not before: a server that converts
    each block before taking the next never holds more than one block of unconverted bytes."""
    read: list[str] = []
    real = swarm.checkpoint.TensorReader.read

    def recording(self, path, name, wanted_dtype):
        read.append(name)
        return real(self, path, name, wanted_dtype)

    monkeypatch.setattr(swarm.checkpoint.TensorReader, "read", recording)
    monkeypatch.setattr(swarm.checkpoint, "CAST_CHUNK_BYTES", 1000)  # several chunks per tensor
    blocks = CheckpointFiles(str(checkpoints[kind])).load_blocks(BLOCKS, dtype=dtype)
    for index, prefix in enumerate(BLOCKS):
        weights = next(blocks)
        assert {name for name in read if not name.startswith(prefix)} == set().union(
            *({name for name in read if name.startswith(BLOCKS[i])} for i in range(index))
        )  # nothing of a later block yet
        expected = _expected(tiny_model, prefix)
        assert set(weights) == {name[len(prefix) :] for name in expected}
        for name, tensor in expected.items():
            assert weights[name[len(prefix) :]].dtype == dtype
            assert torch.equal(weights[name[len(prefix) :]], tensor.to(dtype)), name
        del weights
    assert next(blocks, None) is None


def test_cast_reads_a_chunk_at_a_time(checkpoints, monkeypatch) -> None:
    """A cast never holds the stored tensor whole: it goes through one buffer of CAST_CHUNK_BYTES."""
    monkeypatch.setattr(swarm.checkpoint, "CAST_CHUNK_BYTES", 4096)
    buffers: list[int] = []
    real = swarm.checkpoint._read_into

    def recording(path, stored, flat, buffer, step):
        buffers.append(buffer.numel())
        return real(path, stored, flat, buffer, step)

    monkeypatch.setattr(swarm.checkpoint, "_read_into", recording)
    (weights,) = CheckpointFiles(str(checkpoints["single"])).load_blocks([LAYER], dtype=torch.float16)
    assert weights["mlp.up_proj.weight"].numel() * 4 > 4096 and max(buffers) == 4096


def test_truncated_or_malformed_file_gives_a_clear_error(checkpoints, tmp_path: Path) -> None:
    source = (checkpoints["single"] / SINGLE_FILE).read_bytes()
    (tmp_path / SINGLE_FILE).write_bytes(source[: len(source) // 2])
    with pytest.raises(ValueError, match="outside the file"):
        swarm.checkpoint.read_header(str(tmp_path / SINGLE_FILE))
    (tmp_path / SINGLE_FILE).write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        swarm.checkpoint.read_header(str(tmp_path / SINGLE_FILE))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 8]}}).encode()
    (tmp_path / SINGLE_FILE).write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ValueError, match="not what its shape and dtype take"):
        swarm.checkpoint.read_header(str(tmp_path / SINGLE_FILE))
    (tmp_path / SINGLE_FILE).write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(ValueError, match="unreadable"):
        swarm.checkpoint.read_header(str(tmp_path / SINGLE_FILE))

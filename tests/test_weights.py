"""Checkpoint reading and strict loading: every way a checkpoint can be wrong is named."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from stages.attention import attention
from stages.weights import WeightsError, load_into, load_or_init, read_state_dict


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_reads_safetensors_pth_and_shards(tmp_path):
    state = {key: value.clone() for key, value in small_model().state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save(state, tmp_path / "model.pth")
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("model.safetensors", "model.pth", "model.safetensors.index.json"):
        loaded = read_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in keys)


def test_a_missing_shard_is_named(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(WeightsError, match="gone.safetensors"):
        read_state_dict(tmp_path / "model.safetensors.index.json")


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage" * 20)
    (tmp_path / "bad.pth").write_bytes(b"garbage" * 20)
    for name in ("bad.safetensors", "bad.pth"):
        with pytest.raises(WeightsError, match="cannot read"):
            read_state_dict(tmp_path / name)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="unknown weights file type"):
        (tmp_path / "weights.txt").write_text("x")
        read_state_dict(tmp_path / "weights.txt")


def test_load_into_names_missing_unexpected_misshaped_and_wrong_dtype():
    model = small_model()
    state = dict(model.state_dict())
    state.pop("1.bias")
    state["extra.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 4)
    state["1.weight"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(WeightsError) as error:
        load_into(model, state, "test.safetensors")
    message = str(error.value)
    assert "test.safetensors" in message and "1.bias" in message and "extra.weight" in message
    assert "0.weight (expected (3, 4), found (5, 4))" in message
    assert "1.weight (expected a floating dtype, found torch.int64)" in message


def test_load_into_casts_floating_weights():
    model = small_model()
    state = {key: value.to(torch.bfloat16) for key, value in model.state_dict().items()}
    load_into(model, state, "bf16")
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, state["0.weight"].float())


def test_random_init_is_seeded_and_warned(caplog):
    warnings = []
    with caplog.at_level(logging.WARNING):
        first = load_or_init("", None, small_model_unseeded, "the thing", "stages.x.weights", warnings)
        second = load_or_init("", None, small_model_unseeded, "the thing", "stages.x.weights", warnings)
    assert torch.equal(first[0].weight, second[0].weight)
    assert len(warnings) == 2 and "RANDOM" in warnings[0] and "stages.x.weights" in warnings[0]
    assert "RANDOM" in caplog.text


def small_model_unseeded() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3))


def test_attention_matches_softmax_closed_form():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)  # (B, L, heads, d)
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    torch.testing.assert_close(attention(q, k, v), expected, rtol=1e-5, atol=1e-6)

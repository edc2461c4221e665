"""TextEncoder against the transformers encoders it loads, in every checkpoint layout.

The reference for each prompt is the transformers model run on that prompt alone, without padding,
so a match also shows that padding to text_len changes nothing on the prompt's own tokens."""

from __future__ import annotations

import logging
import string
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel, T5Tokenizer, UMT5Config, UMT5EncoderModel

from stages.base.text_encoder import (
    TEXT_ENCODER_SIZES,
    TextEncoder,
    TextEncoderConfig,
    transformers_state_dict_from_official,
)
from stages.weights import WeightsError

PROMPTS = ["a cat runs on the grass", "一只猫在草地上奔跑", "the dog"]
TEXT_LEN = 32
NUM_LAYERS = 2
# Small sizes; a maximum distance of 16 below TEXT_LEN exercises the logarithmic position buckets.
SIZES = dict(d_model=32, d_ff=48, d_kv=8, num_layers=NUM_LAYERS, num_heads=4, vocab_size=384,
             relative_attention_num_buckets=8, relative_attention_max_distance=16,
             feed_forward_proj="gated-gelu")
UMT5_CONFIG = TextEncoderConfig(architecture="umt5", tokenizer="pretrained", text_len=TEXT_LEN, **SIZES)


def random_transformers_encoder(architecture: str = "umt5", seed: int = 0):
    torch.manual_seed(seed)
    config_class, model_class = {"t5": (T5Config, T5EncoderModel), "umt5": (UMT5Config, UMT5EncoderModel)}[
        architecture
    ]
    model = model_class(config_class(**SIZES)).eval()
    with torch.no_grad():  # norms start at one; make them matter
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def sentencepiece_style_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer of the same class as umt5-xxl's, with a tiny vocabulary (built offline;
    the real umt5-xxl vocabulary cannot be fetched here)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(letter, -3.0) for letter in string.ascii_lowercase]
    pieces += [("▁" + word, -1.0) for word in ["a", "cat", "dog", "the", "on", "grass", "runs"]]
    pieces += [(character, -3.0) for character in "一只猫在草地上奔跑"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def official_state_dict(model: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    """transformers UMT5 weights under the names of Wan's `T5Encoder` (wan/modules/t5.py):
    token_embedding, blocks.N.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2},
    pos_embedding.embedding}, norm."""
    weights = model.state_dict()
    official = {
        "token_embedding.weight": weights["shared.weight"],
        "norm.weight": weights["encoder.final_layer_norm.weight"],
    }
    for n in range(model.config.num_layers):
        attention = f"encoder.block.{n}.layer.0."
        feed_forward = f"encoder.block.{n}.layer.1."
        official[f"blocks.{n}.norm1.weight"] = weights[attention + "layer_norm.weight"]
        for projection in "qkvo":
            official[f"blocks.{n}.attn.{projection}.weight"] = weights[attention + f"SelfAttention.{projection}.weight"]
        official[f"blocks.{n}.pos_embedding.embedding.weight"] = weights[
            attention + "SelfAttention.relative_attention_bias.weight"
        ]
        official[f"blocks.{n}.norm2.weight"] = weights[feed_forward + "layer_norm.weight"]
        official[f"blocks.{n}.ffn.gate.0.weight"] = weights[feed_forward + "DenseReluDense.wi_0.weight"]
        official[f"blocks.{n}.ffn.fc1.weight"] = weights[feed_forward + "DenseReluDense.wi_1.weight"]
        official[f"blocks.{n}.ffn.fc2.weight"] = weights[feed_forward + "DenseReluDense.wo.weight"]
    return {key: value.clone() for key, value in official.items()}


def write_official_folder(folder, model, dtype=torch.float32, tokenizer=None):
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.to(dtype) for key, value in official_state_dict(model).items()}
    torch.save(state, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    (tokenizer or sentencepiece_style_tokenizer()).save_pretrained(str(folder / "google" / "umt5-xxl"))
    return folder


def assert_matches_reference(encoder, model, tokenizer, prompts, record_property, atol, rtol=0.0):
    """Each prompt alone through `model` gives our embeddings up to its length; zeros after.
    Records the largest |ours − reference| / max |reference| over the prompts."""
    embeddings, lengths = encoder.encode(prompts)
    assert embeddings.shape == (len(prompts), encoder.config.text_len, model.config.d_model)
    assert embeddings.dtype == torch.float32
    errors = []
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).last_hidden_state[0].float()
        assert lengths[row].item() == ids.shape[1]
        ours = embeddings[row, : ids.shape[1]]
        errors.append(((ours - expected).abs().max() / expected.abs().max()).item())
        torch.testing.assert_close(ours, expected, atol=atol, rtol=rtol)
        assert embeddings[row, ids.shape[1] :].abs().max().item() == 0.0
    record_property("relative_error", max(errors))  # collected by bench/parity_report.py


# --- official layout ----------------------------------------------------------------------------


def test_official_names_cover_wan_t5_encoder():
    model = random_transformers_encoder()
    official = official_state_dict(model)
    assert len(official) == 2 + 10 * NUM_LAYERS  # Wan's T5Encoder, shared_pos=False
    renamed = transformers_state_dict_from_official(official, NUM_LAYERS)
    assert set(renamed) == set(model.state_dict()) - {"encoder.embed_tokens.weight"}
    for key, value in renamed.items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize(
    "file_dtype, load_dtype, atol, rtol",
    [
        (torch.float32, torch.float32, 1e-5, 1e-5),
        (torch.bfloat16, torch.float32, 1e-5, 1e-5),  # the bf16 file cast up exactly
        (torch.bfloat16, torch.bfloat16, 5e-2, 5e-2),  # bf16 arithmetic
    ],
    ids=["float32", "bf16-file-float32-run", "bf16-file-bf16-run"],
)
def test_official_folder_matches_transformers(tmp_path, file_dtype, load_dtype, atol, rtol, record_property):
    model = random_transformers_encoder()
    folder = write_official_folder(tmp_path / "Wan2.1-T2V-1.3B", model, file_dtype)
    encoder = TextEncoder.from_pretrained(folder, UMT5_CONFIG, dtype=load_dtype)
    assert encoder.model.dtype == load_dtype
    assert isinstance(encoder.tokenizer, T5Tokenizer)
    reference = model.to(file_dtype).float()  # the weights as the file holds them
    assert_matches_reference(encoder, reference, sentencepiece_style_tokenizer(), PROMPTS, record_property, atol, rtol)


def test_official_pth_file_with_byte_tokenizer(tmp_path, record_property):
    model = random_transformers_encoder(seed=1)
    folder = write_official_folder(tmp_path / "wan", model)
    config = replace(UMT5_CONFIG, tokenizer="byte")
    encoder = TextEncoder.from_pretrained(folder / "models_t5_umt5-xxl-enc-bf16.pth", config)
    assert isinstance(encoder.tokenizer, ByT5Tokenizer)
    assert_matches_reference(encoder, model, ByT5Tokenizer(), PROMPTS, record_property, atol=1e-5, rtol=1e-5)


# --- diffusers layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("architecture, shard_size", [("umt5", "20KB"), ("t5", None)])
def test_diffusers_folder_matches_transformers(tmp_path, architecture, shard_size, record_property):
    model = random_transformers_encoder(architecture, seed=2)
    model.save_pretrained(str(tmp_path / "text_encoder"), **({"max_shard_size": shard_size} if shard_size else {}))
    ByT5Tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    if shard_size:
        assert (tmp_path / "text_encoder" / "model.safetensors.index.json").is_file()
    # The sizes come from text_encoder/config.json, not from the (tiny, t5) config passed in.
    config = TextEncoderConfig(tokenizer="pretrained", text_len=TEXT_LEN)
    encoder = TextEncoder.from_pretrained(tmp_path, config)
    assert encoder.config.architecture == architecture
    assert encoder.config.d_model == SIZES["d_model"]
    assert type(encoder.model) is type(model)
    assert encoder.model.shared.weight is encoder.model.encoder.embed_tokens.weight
    assert_matches_reference(encoder, model, ByT5Tokenizer(), PROMPTS, record_property, atol=1e-5, rtol=1e-5)


# --- tokens, padding, truncation ----------------------------------------------------------------


def byte_ids(text: str) -> list[int]:
    """ByT5 ids in closed form: ids 0, 1, 2 are pad, end-of-sequence, unknown; byte b is b + 3."""
    return [byte + 3 for byte in text.encode("utf-8")] + [1]


@pytest.fixture(scope="module")
def tiny_encoder() -> TextEncoder:
    torch.manual_seed(3)
    return TextEncoder(replace(TEXT_ENCODER_SIZES["tiny"], text_len=TEXT_LEN))


def reference_rows(encoder: TextEncoder, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_byte_tokens_lengths_and_zero_padding_english_and_chinese(tiny_encoder):
    prompts = ["a red fox", "海边，女孩在奔跑", "", "big"]
    embeddings, lengths = tiny_encoder.encode(prompts)
    assert embeddings.shape == (4, TEXT_LEN, 64)
    for row, prompt in enumerate(prompts):
        ids = byte_ids(prompt)
        assert tiny_encoder.token_count(prompt) == len(ids)
        assert lengths[row].item() == len(ids)
        torch.testing.assert_close(embeddings[row, : len(ids)], reference_rows(tiny_encoder, ids),
                                   atol=1e-5, rtol=1e-5)
        assert embeddings[row, len(ids) :].abs().max().item() == 0.0
        assert embeddings[row, : len(ids)].abs().sum(dim=-1).min().item() > 0.0
    assert lengths[2].item() == 1  # the empty prompt is its end-of-sequence token


def test_long_prompt_truncated_with_warning(tiny_encoder, caplog):
    prompt = "猫" * 20  # 60 bytes + end-of-sequence: 61 tokens
    assert tiny_encoder.token_count(prompt) == 61
    with caplog.at_level(logging.WARNING, logger="stages.base.text_encoder"):
        embeddings, lengths = tiny_encoder.encode([prompt, "ok"])
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "61 tokens" in warnings[0] and str(TEXT_LEN) in warnings[0]
    assert lengths.tolist() == [TEXT_LEN, 3]
    truncated = byte_ids(prompt)[: TEXT_LEN - 1] + [1]  # the end-of-sequence token is kept
    torch.testing.assert_close(embeddings[0], reference_rows(tiny_encoder, truncated), atol=1e-5, rtol=1e-5)


def test_whitespace_and_html_entities_are_cleaned(tiny_encoder):
    messy, _ = tiny_encoder.encode(["  a   cat\n &amp; dog "])
    clean, _ = tiny_encoder.encode(["a cat & dog"])
    assert torch.equal(messy, clean)


def test_bad_prompt_lists_rejected(tiny_encoder):
    with pytest.raises(ValueError, match="non-empty list"):
        tiny_encoder.encode([])
    with pytest.raises(ValueError, match="non-empty list"):
        tiny_encoder.encode("a cat")


# --- configs ------------------------------------------------------------------------------------


def test_configs_are_omegaconf_structured():
    for name, config in TEXT_ENCODER_SIZES.items():
        structured = OmegaConf.structured(config)
        merged = OmegaConf.merge(structured, OmegaConf.create({"text_len": 77}))
        assert OmegaConf.to_object(merged) == replace(config, text_len=77), name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "bert"}, "architecture='bert'"),
        ({"tokenizer": "words"}, "tokenizer='words'"),
        ({"num_heads": 0}, "num_heads=0"),
        ({"tokenizer": "pretrained"}, "from_pretrained"),
        ({"vocab_size": 100}, "vocab_size must be at least 384"),
    ],
)
def test_bad_configs_named(change, message):
    with pytest.raises(ValueError, match=message):
        TextEncoder(replace(TEXT_ENCODER_SIZES["tiny"], **change))


# --- bad checkpoints ----------------------------------------------------------------------------


def rewrite_official(folder, edit):
    path = folder / "models_t5_umt5-xxl-enc-bf16.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state.pop("blocks.1.ffn.fc1.weight"),
         r"missing keys: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight"),
        (lambda state: state.update({"blocks.0.attn.q.weight": torch.zeros(32, 31)}),
         r"encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight \(expected \(32, 32\), found \(32, 31\)\)"),
        (lambda state: state.update({"blocks.2.attn.q.weight": torch.zeros(32, 32)}),
         r"unexpected keys: blocks\.2\.attn\.q\.weight"),
    ],
)
def test_bad_official_checkpoint_names_the_key(tmp_path, edit, message):
    folder = write_official_folder(tmp_path, random_transformers_encoder())
    rewrite_official(folder, edit)
    with pytest.raises(WeightsError, match=message):
        TextEncoder.from_pretrained(folder, UMT5_CONFIG)


def test_bad_diffusers_checkpoint_names_the_key(tmp_path):
    random_transformers_encoder().save_pretrained(str(tmp_path / "text_encoder"))
    ByT5Tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    weights_path = tmp_path / "text_encoder" / "model.safetensors"
    weights = load_file(str(weights_path))
    del weights["encoder.final_layer_norm.weight"]
    save_file(weights, str(weights_path))
    with pytest.raises(WeightsError, match=r"missing keys: encoder\.final_layer_norm\.weight"):
        TextEncoder.from_pretrained(tmp_path, UMT5_CONFIG)


def test_neither_layout(tmp_path):
    (tmp_path / "unrelated.txt").write_text("nothing here")
    for path in (tmp_path, tmp_path / "does-not-exist"):
        with pytest.raises(WeightsError, match="neither a diffusers folder .*text_encoder.* nor an official"):
            TextEncoder.from_pretrained(path, UMT5_CONFIG)
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        TextEncoder.from_pretrained(tmp_path, UMT5_CONFIG)


def test_official_checkpoint_needs_umt5(tmp_path):
    folder = write_official_folder(tmp_path, random_transformers_encoder())
    with pytest.raises(ValueError, match="architecture='t5'"):
        TextEncoder.from_pretrained(folder, replace(UMT5_CONFIG, architecture="t5"))


def test_missing_tokenizer_folder_named(tmp_path):
    folder = write_official_folder(tmp_path, random_transformers_encoder())
    for child in sorted((folder / "google" / "umt5-xxl").iterdir()):
        child.unlink()
    (folder / "google" / "umt5-xxl").rmdir()
    with pytest.raises(WeightsError, match=r"tokenizer folder not found: .*umt5-xxl"):
        TextEncoder.from_pretrained(folder, UMT5_CONFIG)

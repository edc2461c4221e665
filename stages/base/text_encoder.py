"""The prompt encoder of the base stage: a T5 / UMT5 encoder as Wan2.1 uses it.

Wan2.1 encodes each prompt with the umt5-xxl encoder: the tokenizer pads or truncates it to
`text_len` (512) tokens with an attention mask, the encoder runs over all of them, and the outputs
past the prompt's own token count (its end-of-sequence token included) are set to zero, so the DiT
receives the prompt's own tokens zero-padded to `text_len`.

The model is transformers' `T5EncoderModel` or `UMT5EncoderModel` (UMT5 gives every layer its own
relative-position bias; T5 shares the first layer's). `TextEncoder.from_pretrained` reads:

- a diffusers folder: `text_encoder/` (transformers `config.json` and safetensors, sharded or not)
  and `tokenizer/`;
- an official Wan2.1 folder: `models_t5_umt5-xxl-enc-bf16.pth` (the state dict of Wan's own T5
  module, renamed here onto transformers' names) and the tokenizer folder `google/umt5-xxl/`;
- the official `.pth` file itself;
- a `.safetensors` file under transformers' names, sized by the config (the project's own tiny
  encoder, trained by `train_stage.py text_encoder`).

The small configurations use `ByT5Tokenizer`, which needs no vocabulary file: it encodes any text,
Chinese included, as its UTF-8 bytes.

transformers is imported where a model or tokenizer is built, not with this module: importing it
takes about 3 s, which the run's driver and the tsr and ssr actors (which read only the configs
here) would otherwise pay at every start.
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from stages.weights import WeightsError, load_into, read_state_dict

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, T5EncoderModel, UMT5EncoderModel

log = logging.getLogger(__name__)

ARCHITECTURES = ("t5", "umt5")
TOKENIZERS = ("byte", "pretrained")
FEED_FORWARD_PROJECTIONS = ("relu", "gated-gelu")

OFFICIAL_CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER_FOLDER = "google/umt5-xxl"
DIFFUSERS_MODEL_FOLDER = "text_encoder"
DIFFUSERS_TOKENIZER_FOLDER = "tokenizer"


@dataclass
class TextEncoderConfig:
    """Which encoder and tokenizer, the token length, and the model sizes. The sizes are used for a
    random initialisation and for the official `.pth`; a diffusers folder brings its own sizes in
    `text_encoder/config.json`."""

    architecture: str = "t5"  # "t5" or "umt5"
    tokenizer: str = "byte"  # "byte" (ByT5, no vocabulary file) or "pretrained" (the checkpoint's)
    text_len: int = 512  # tokens per prompt, end-of-sequence token included
    d_model: int = 64
    d_ff: int = 128
    d_kv: int = 16  # per-head size of queries, keys and values
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 384
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"  # "gated-gelu" (T5 v1.1, UMT5) or "relu" (original T5)


# Named configurations; copy one with `dataclasses.replace` before changing it.
TEXT_ENCODER_SIZES: dict[str, TextEncoderConfig] = {
    # A small T5 over UTF-8 bytes: 256 byte ids + 3 special tokens + 125 sentinels = 384.
    "tiny": TextEncoderConfig(architecture="t5", tokenizer="byte", text_len=128),
    # The umt5-xxl encoder of the Wan2.1 release.
    "umt5-xxl": TextEncoderConfig(
        architecture="umt5",
        tokenizer="pretrained",
        text_len=512,
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_layers=24,
        num_heads=64,
        vocab_size=256384,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
    ),
}


def _check_config(config: TextEncoderConfig) -> None:
    choices = {
        "architecture": ARCHITECTURES,
        "tokenizer": TOKENIZERS,
        "feed_forward_proj": FEED_FORWARD_PROJECTIONS,
    }
    for field, valid in choices.items():
        if getattr(config, field) not in valid:
            raise ValueError(f"text encoder {field}={getattr(config, field)!r} is not one of {valid}")
    sizes = ("text_len", "d_model", "d_ff", "d_kv", "num_layers", "num_heads", "vocab_size",
             "relative_attention_num_buckets", "relative_attention_max_distance")
    for field in sizes:
        if getattr(config, field) < 1:
            raise ValueError(f"text encoder {field}={getattr(config, field)} must be at least 1")


def _transformers_encoder(config: TextEncoderConfig) -> T5EncoderModel | UMT5EncoderModel:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = {
        "t5": (T5Config, T5EncoderModel),
        "umt5": (UMT5Config, UMT5EncoderModel),
    }[config.architecture]
    transformers_config = config_class(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_ff=config.d_ff,
        d_kv=config.d_kv,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        feed_forward_proj=config.feed_forward_proj,
        dropout_rate=0.0,  # the encoder is frozen: no dropout even in train mode
    )
    return model_class(transformers_config)


def clean_prompt(prompt: str) -> str:
    """Wan's prompt cleaning: HTML entities unescaped, runs of whitespace made one space, ends
    stripped. (Wan also runs `ftfy.fix_text`, which repairs mis-decoded Unicode; not done here.)"""
    prompt = html.unescape(html.unescape(prompt))
    return re.sub(r"\s+", " ", prompt).strip()


# --- the official Wan2.1 checkpoint ----------------------------------------------------------

# Wan's T5 encoder names (wan/modules/t5.py, `T5Encoder` with shared_pos=False) against
# transformers' `UMT5EncoderModel` names. Inside each block: `blocks.N.<wan>` -> `encoder.block.N.<ours>`.
OFFICIAL_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
OFFICIAL_TOP_KEYS = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}


def transformers_state_dict_from_official(
    state_dict: dict[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """Renames the state dict of Wan's official T5 encoder onto transformers' `UMT5EncoderModel`
    keys for an encoder of `num_layers` blocks. Keys outside that table keep their official name,
    so loading reports them as unexpected under the name the file uses."""
    renames = dict(OFFICIAL_TOP_KEYS)
    for layer in range(num_layers):
        for official, ours in OFFICIAL_BLOCK_KEYS.items():
            renames[f"blocks.{layer}.{official}"] = f"encoder.block.{layer}.{ours}"
    return {renames.get(key, key): tensor for key, tensor in state_dict.items()}


def _with_tied_embeddings(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The encoder reads its token embedding through two tied names, `shared.weight` and
    `encoder.embed_tokens.weight`; checkpoints store one of them or both."""
    names = ("shared.weight", "encoder.embed_tokens.weight")
    present = [name for name in names if name in state_dict]
    if len(present) == 2 and not torch.equal(state_dict[names[0]], state_dict[names[1]]):
        raise WeightsError(f"weights {source} hold two different token embeddings: {', '.join(names)}")
    if len(present) == 1:
        state_dict = {**state_dict, **{name: state_dict[present[0]] for name in names}}
    return state_dict


# --- the encoder ------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Prompts -> (embeddings (B, text_len, d_model) float32, zero past each prompt; lengths (B,)).

    Frozen: built in eval mode without dropout, runs under `torch.no_grad`."""

    def __init__(self, config: TextEncoderConfig, tokenizer: PreTrainedTokenizerBase | None = None):
        """Random weights. `tokenizer` defaults to the byte tokenizer when `config.tokenizer` is
        "byte"; a "pretrained" tokenizer comes from `TextEncoder.from_pretrained`."""
        super().__init__()
        _check_config(config)
        if tokenizer is None:
            if config.tokenizer != "byte":
                raise ValueError(
                    f"text encoder tokenizer={config.tokenizer!r} is read from a checkpoint folder: "
                    "use TextEncoder.from_pretrained, or tokenizer='byte' for a random encoder"
                )
            from transformers import ByT5Tokenizer

            tokenizer = ByT5Tokenizer()
        if len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the encoder's vocab_size is "
                f"{config.vocab_size}: vocab_size must be at least {len(tokenizer)}"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.model = _transformers_encoder(config).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: TextEncoderConfig, dtype: torch.dtype = torch.float32
    ) -> TextEncoder:
        """Loads a diffusers folder, an official Wan2.1 folder or the official `.pth` itself (see
        the module docstring). `config` gives `text_len` and the tokenizer choice ("byte", or
        "pretrained": the layout's tokenizer folder); the model sizes come from
        `text_encoder/config.json` for a diffusers folder and from `config` otherwise. The weights
        are held in `dtype`."""
        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":  # transformers' names, sizes from `config`
            return cls._with_weights(config, read_state_dict(path), str(path), path.parent, dtype)
        if path.is_file():
            return cls._from_official(path, config, dtype)
        if (path / DIFFUSERS_MODEL_FOLDER).is_dir():
            return cls._from_diffusers(path, config, dtype)
        if (path / OFFICIAL_CHECKPOINT_NAME).is_file():
            return cls._from_official(path / OFFICIAL_CHECKPOINT_NAME, config, dtype)
        raise WeightsError(
            f"text encoder checkpoint {path} is neither a diffusers folder ({DIFFUSERS_MODEL_FOLDER}/ "
            f"with config.json and model.safetensors, {DIFFUSERS_TOKENIZER_FOLDER}/) nor an official "
            f"Wan2.1 folder ({OFFICIAL_CHECKPOINT_NAME}, {OFFICIAL_TOKENIZER_FOLDER}/), nor a .pth or .safetensors file"
        )

    @classmethod
    def _from_official(cls, checkpoint: Path, config: TextEncoderConfig, dtype: torch.dtype) -> TextEncoder:
        if config.architecture != "umt5":
            raise ValueError(
                f"the official Wan2.1 text encoder {checkpoint} is a UMT5 encoder (a position bias in "
                f"every layer), but the config says architecture={config.architecture!r}: use 'umt5'"
            )
        state_dict = transformers_state_dict_from_official(read_state_dict(checkpoint), config.num_layers)
        source = f"{checkpoint} (official Wan T5 keys renamed to transformers UMT5 keys)"
        return cls._with_weights(config, state_dict, source, checkpoint.parent / OFFICIAL_TOKENIZER_FOLDER, dtype)

    @classmethod
    def _from_diffusers(cls, root: Path, config: TextEncoderConfig, dtype: torch.dtype) -> TextEncoder:
        folder = root / DIFFUSERS_MODEL_FOLDER
        sizes = _sizes_from_transformers_config(folder / "config.json")
        differing = [f"{field}={value!r} (config: {getattr(config, field)!r})"
                     for field, value in sizes.items() if getattr(config, field) != value]
        if differing:
            log.warning("text encoder sizes taken from %s/config.json: %s", folder, ", ".join(differing))
        config = replace(config, **sizes)
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if (folder / name).is_file():
                state_dict = read_state_dict(folder / name)
                break
        else:
            raise WeightsError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json")
        return cls._with_weights(config, state_dict, str(folder), root / DIFFUSERS_TOKENIZER_FOLDER, dtype)

    @classmethod
    def _with_weights(
        cls,
        config: TextEncoderConfig,
        state_dict: dict[str, torch.Tensor],
        source: str,
        tokenizer_folder: Path,
        dtype: torch.dtype,
    ) -> TextEncoder:
        tokenizer = _pretrained_tokenizer(tokenizer_folder) if config.tokenizer == "pretrained" else None
        # Built without initialising (on the meta device, then given empty storage): every value
        # is overwritten by `load_into`, which first checks that the checkpoint covers them all.
        with torch.device("meta"):
            encoder = cls(config, tokenizer)
        encoder.to(dtype).to_empty(device="cpu")
        encoder.model.tie_weights()  # `to_empty` gives the two embedding names separate storage
        load_into(encoder.model, _with_tied_embeddings(state_dict, source), source)
        return encoder

    def token_count(self, prompt: str) -> int:
        """Tokens of the cleaned prompt, end-of-sequence token included, before truncation."""
        return len(self.tokenizer(clean_prompt(prompt))["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the embeddings (B, text_len, d_model) float32, zero past each prompt's tokens,
        and each prompt's token count (B,) int64. A prompt longer than `text_len` tokens is
        truncated (its last kept token is the end-of-sequence token) with a logged warning."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        text_len = self.config.text_len
        cleaned = [clean_prompt(prompt) for prompt in prompts]
        for prompt in cleaned:
            count = self.token_count(prompt)
            if count > text_len:
                log.warning(
                    "prompt of %d tokens is longer than the text encoder's limit of %d tokens and is "
                    "truncated: %r", count, text_len, prompt[:80],
                )
        tokens = self.tokenizer(
            cleaned, padding="max_length", max_length=text_len, truncation=True, return_tensors="pt"
        )
        device = self.model.device
        mask = tokens["attention_mask"].to(device)  # (B, text_len), ones then zeros
        hidden = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=mask).last_hidden_state
        embeddings = hidden.float() * mask.unsqueeze(-1)  # (B, text_len, d_model)
        return embeddings, mask.sum(dim=1)


def _sizes_from_transformers_config(path: Path) -> dict:
    """The `TextEncoderConfig` fields a transformers T5/UMT5 `config.json` decides."""
    if not path.is_file():
        raise WeightsError(f"transformers config not found: {path}")
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise WeightsError(f"cannot read transformers config {path}: {error}") from None
    if values.get("model_type") not in ARCHITECTURES:
        raise WeightsError(f"{path} has model_type={values.get('model_type')!r}; expected one of {ARCHITECTURES}")
    fields = ("d_model", "d_ff", "d_kv", "num_layers", "num_heads", "vocab_size",
              "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj")
    absent = [field for field in fields if field not in values]
    if absent:
        raise WeightsError(f"{path} lacks the fields {', '.join(absent)}")
    return {"architecture": values["model_type"], **{field: values[field] for field in fields}}


def _pretrained_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    if not folder.is_dir():
        raise WeightsError(f"tokenizer folder not found: {folder} (or use the config's tokenizer='byte')")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot load a tokenizer from {folder}: {error}") from None

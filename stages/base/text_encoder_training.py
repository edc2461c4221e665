"""Training the tiny text encoder on the procedural world's captions: `train_stage.py text_encoder`.

    python train_stage.py text_encoder --steps 1500

The tiny cascade's encoder is a small T5 over UTF-8 bytes; it has to learn from nothing which bytes
of a caption name a colour, a shape, a direction and a speed, in English and in Chinese, whatever
sentence they stand in. It learns that from a supervised probe: two learned queries (one per object
a caption may describe) attend over the encoder's token outputs, and small heads read each object's
colour, shape, direction and speed from them (the second object's colour head also has a "none"
class). The probe is thrown away after training; the DiT, trained next with this encoder frozen,
cross-attends to the token outputs the probe made informative.

Captions come from the world's `train` phrasings only, most of them with made-up words put in
(so that the encoder learns to find the attribute words in any sentence); the accuracy on the `held_out` phrasings,
which the encoder never sees, is measured at the end and recorded.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.base.text_encoder import TEXT_ENCODER_SIZES, TextEncoder, TextEncoderConfig, clean_prompt
from stages.training import TrainingConfig, config_from_overrides, train, write_record
from stages.weights import write_safetensors
from stages.world import COLOURS, DIRECTIONS, SHAPES, SPEEDS, caption, random_clip

WEIGHTS_NAME = "text_encoder.safetensors"
OBJECT_SLOTS = 2
ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS), "speed": list(SPEEDS)}


@dataclass
class TextEncoderTrainingConfig:
    text_encoder: TextEncoderConfig = field(default_factory=lambda: replace(TEXT_ENCODER_SIZES["tiny"]))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(batch_size=64, learning_rate=2e-3))
    two_object_share: float = 0.2
    made_up_share: float = 0.6  # of training captions with made-up words put in (stages.world.add_made_up_words)
    evaluation_captions: int = 1000


class AttributeProbe(nn.Module):
    """Token outputs (B, L, D) and their mask -> logits of every attribute of every object slot."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(OBJECT_SLOTS, dim) * dim**-0.5)
        # one "none" class more for the colour of the second slot: is there a second object?
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(values) + 1) for name, values in ATTRIBUTES.items()})

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = torch.einsum("sd,bld->bsl", self.queries, tokens) / tokens.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask[:, None, :].bool(), float("-inf")).softmax(-1)
        slots = torch.einsum("bsl,bld->bsd", weights, tokens)  # (B, slots, D)
        return {name: head(slots) for name, head in self.heads.items()}  # each (B, slots, classes)


class EncoderWithProbe(nn.Module):
    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.probe = AttributeProbe(encoder.config.d_model)

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.encoder.tokenizer([clean_prompt(prompt) for prompt in prompts], padding="longest",
                                        truncation=True, max_length=self.encoder.config.text_len, return_tensors="pt")
        hidden = self.encoder.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return self.probe(hidden, tokens["attention_mask"])


def _labels(clips) -> dict[str, torch.Tensor]:
    """(B, slots) class indices; a missing second object is the extra last class (colour), and its
    other attributes are ignored (-100)."""
    labels = {}
    for name, values in ATTRIBUTES.items():
        rows = []
        for clip in clips:
            row = [values.index(getattr(obj, name)) for obj in clip.objects]
            row += [len(values) if name == "colour" else -100] * (OBJECT_SLOTS - len(row))
            rows.append(row)
        labels[name] = torch.tensor(rows)
    return labels


def captions_and_labels(step: int, seed: int, count: int, split: str, two_object_share: float,
                        made_up_share: float = 0.0):
    rng = np.random.default_rng([seed, step, 7])
    clips = [random_clip(rng, 17, two_object_share) for _ in range(count)]
    return [caption(clip, rng, split, made_up_share=made_up_share) for clip in clips], _labels(clips)


def probe_loss(model: EncoderWithProbe, batch) -> tuple[torch.Tensor, dict[str, float]]:
    prompts, labels = batch
    logits = model(prompts)
    losses = {name: F.cross_entropy(logits[name].flatten(0, 1), labels[name].flatten(), ignore_index=-100)
              for name in ATTRIBUTES}
    return sum(losses.values()), {name: value.item() for name, value in losses.items()}


@torch.no_grad()
def attribute_accuracy(model: EncoderWithProbe, config: TextEncoderTrainingConfig, split: str) -> dict[str, float]:
    """Share of the first object's attributes read right from `split`'s phrasings."""
    prompts, labels = captions_and_labels(10**6, config.training.seed, config.evaluation_captions, split,
                                          config.two_object_share)
    model.eval()
    logits = model(prompts)
    return {name: round(float((logits[name][:, 0].argmax(-1) == labels[name][:, 0]).float().mean()), 4)
            for name in ATTRIBUTES}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="train_stage.py text_encoder",
        description="Trains the tiny byte-level T5 encoder on the procedural world's captions.",
        epilog="key=value overrides set any field of TextEncoderTrainingConfig, e.g. text_encoder.num_layers=3",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/text_encoder"), help="run folder (default runs/text_encoder)")
    parser.add_argument("--steps", type=int, help="training steps (training.steps)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args(argv)
    try:
        config = config_from_overrides(TextEncoderTrainingConfig, arguments.overrides, {"training.steps": arguments.steps})
        if config.text_encoder.tokenizer != "byte":
            raise ValueError(f"text_encoder.tokenizer must be 'byte' to train from scratch, got {config.text_encoder.tokenizer!r}")
    except ValueError as error:
        print(f"error: {error}")
        return 2
    encoder = TextEncoder(config.text_encoder)
    encoder.model.requires_grad_(True)
    model = EncoderWithProbe(encoder)
    started = time.time()
    train(
        model, probe_loss,
        lambda step: captions_and_labels(step, config.training.seed, config.training.batch_size, "train",
                                         config.two_object_share, config.made_up_share),
        config.training, arguments.out, "encoder_with_probe.safetensors",
    )
    weights = arguments.out / WEIGHTS_NAME
    tied_copy = "encoder.embed_tokens.weight"  # the loader ties it to shared.weight again
    write_safetensors(weights, {key: value for key, value in encoder.model.state_dict().items() if key != tied_copy})
    record = write_record(
        arguments.out, "text_encoder", argv, "captions of procedural world clips in the train phrasings (stages/world.py)",
        config, encoder, started, weights,
        accuracy_train_phrasings=attribute_accuracy(model, config, "train"),
        accuracy_held_out_phrasings=attribute_accuracy(model, config, "held_out"),
    )
    print(json.dumps({key: record[key] for key in ("accuracy_train_phrasings", "accuracy_held_out_phrasings")}))
    print(f"wrote {weights}")
    return 0

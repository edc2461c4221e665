"""The shared training loop: it learns, logs, and a resumed run ends in exactly the state of an
uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from stages.training import TrainingConfig, train

TRUE_WEIGHT = torch.tensor([[2.0, -1.0, 0.5]])


def batches(step: int):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 3, generator=generator)
    return x, x @ TRUE_WEIGHT.T


def loss_fn(model, batch):
    x, y = batch
    noise = 0.01 * torch.randn_like(y)  # uses the global RNG, which a resume must restore
    loss = (model(x) - y - noise).square().mean()
    return loss, {"mse": loss.item()}


def fresh_model():
    torch.manual_seed(1)
    return nn.Linear(3, 1, bias=False)


def test_training_learns_and_logs(tmp_path):
    config = TrainingConfig(steps=200, batch_size=16, learning_rate=0.05, log_every=50, checkpoint_every=100, warmup_steps=5)
    model = fresh_model()
    weights = train(model, loss_fn, batches, config, tmp_path, "linear.safetensors")
    torch.testing.assert_close(load_file(str(weights))["weight"], TRUE_WEIGHT, atol=0.05, rtol=0)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150, 200] and records[-1]["mse"] < records[0]["mse"]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    config = TrainingConfig(steps=40, learning_rate=0.05, checkpoint_every=20, warmup_steps=5)
    straight = fresh_model()
    train(straight, loss_fn, batches, config, tmp_path / "straight", "w.safetensors")


    def interrupted_batches(step: int):
        if step == 27:  # the process dies after the checkpoint of step 20
            raise KeyboardInterrupt
        return batches(step)

    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), loss_fn, interrupted_batches, config, tmp_path / "resumed", "w.safetensors")
    assert not (tmp_path / "resumed" / "w.safetensors").exists()
    resumed = fresh_model()  # a new process: fresh weights, everything comes from the checkpoint
    train(resumed, loss_fn, batches, config, tmp_path / "resumed", "w.safetensors")
    assert torch.equal(resumed.weight, straight.weight)

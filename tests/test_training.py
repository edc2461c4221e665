"""The shared training loop: it learns, logs, and a resumed run ends in exactly the state of an
uninterrupted one."""

import json
from dataclasses import replace

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


def batches_dying_at_step_27(step: int):
    if step == 27:  # the process dies after the checkpoint of step 20
        raise KeyboardInterrupt
    return batches(step)


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
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), loss_fn, batches_dying_at_step_27, config, tmp_path / "resumed", "w.safetensors")
    assert not (tmp_path / "resumed" / "w.safetensors").exists()
    resumed = fresh_model()  # a new process: fresh weights, everything comes from the checkpoint
    train(resumed, loss_fn, batches, config, tmp_path / "resumed", "w.safetensors")
    assert torch.equal(resumed.weight, straight.weight)


def test_written_weights_are_the_moving_average_of_the_steps(tmp_path):
    decay = 0.9
    seen = []  # the weights each loss call sees: those after steps 1 .. n-1

    def recording_loss(model, batch):
        seen.append(model.weight.detach().clone())
        return loss_fn(model, batch)

    config = TrainingConfig(steps=30, learning_rate=0.05, warmup_steps=5, average_decay=decay)
    model = fresh_model()
    weights = train(model, recording_loss, batches, config, tmp_path, "w.safetensors")
    after_each_step = [*seen[1:], model.weight.detach()]  # model ends with the weights of step n
    expected = after_each_step[0]  # w_1, then w_k = decay·w_{k-1} + (1 − decay)·weights_k
    for weight in after_each_step[1:]:
        expected = decay * expected + (1 - decay) * weight
    torch.testing.assert_close(load_file(str(weights))["weight"], expected)
    assert not torch.allclose(expected, model.weight)


def test_resume_keeps_the_average(tmp_path):
    config = TrainingConfig(steps=40, learning_rate=0.05, checkpoint_every=20, warmup_steps=5, average_decay=0.8)
    straight = train(fresh_model(), loss_fn, batches, config, tmp_path / "straight", "w.safetensors")
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), loss_fn, batches_dying_at_step_27, config, tmp_path / "resumed", "w.safetensors")
    resumed = train(fresh_model(), loss_fn, batches, config, tmp_path / "resumed", "w.safetensors")
    assert torch.equal(load_file(str(resumed))["weight"], load_file(str(straight))["weight"])


def test_compiled_training_follows_the_eager_run(tmp_path):
    eager, compiled = fresh_model(), fresh_model()
    config = TrainingConfig(steps=20, learning_rate=0.05, warmup_steps=5)
    train(eager, loss_fn, batches, config, tmp_path / "eager", "w.safetensors")
    models_seen = []

    def recording_loss(model, batch):
        models_seen.append(type(model))
        return loss_fn(model, batch)

    train(compiled, recording_loss, batches, replace(config, compile=True), tmp_path / "compiled", "w.safetensors")
    assert set(models_seen) == {torch._dynamo.eval_frame.OptimizedModule}  # the loss ran on the compiled model
    torch.testing.assert_close(compiled.weight, eager.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_average_decay_outside_its_range_is_refused(decay):
    with pytest.raises(ValueError, match=r"average_decay=.*\[0, 1\)"):
        TrainingConfig(average_decay=decay)

"""Training of the tiny base-stage models on the procedural world: the VAE, the text encoder and the
DiT train a few steps through their commands, write weights the stages load, and resume."""

import json

import numpy as np
import pytest
import torch

from stages.base.dit import WanDiT, WanDiTConfig
from stages.base.dit_training import (
    DitTrainingConfig,
    FlowBatch,
    flow_matching_loss,
    latent_object_masks,
    main as dit_main,
    training_batches as dit_training_batches,
)
from stages.base.text_encoder import TEXT_ENCODER_SIZES, TextEncoder
from stages.base.text_encoder_training import _labels, main as text_encoder_main
from stages.base.vae import WanVAE, WanVAEConfig
from stages.base.vae_training import VaeTrainingConfig, main as vae_main, training_batches, vae_loss
from stages.training import TrainingConfig, train
from stages.world import COLOURS, DIRECTIONS, random_clip

SMALL_VAE = ["vae.base_dim=4", "vae.dim_mult=[1,2,2,2]", "vae.num_res_blocks=1"]
SMALL_TEXT = ["text_encoder.d_model=16", "text_encoder.d_ff=32", "text_encoder.num_heads=2", "text_encoder.d_kv=8",
              "text_encoder.num_layers=1", "text_encoder.text_len=64"]
FAST = ["training.log_every=1", "training.warmup_steps=1", "training.checkpoint_every=1"]


@pytest.fixture(scope="module")
def trained_vae_and_text_encoder(tmp_path_factory):
    """A VAE and a text encoder trained 2 steps each by their commands."""
    root = tmp_path_factory.mktemp("base_training")
    assert vae_main(["--out", str(root / "vae"), "--steps", "2", *SMALL_VAE, *FAST, "training.batch_size=1",
                     "crop_size=32", "clip_frames=5", "statistics_clips=2"]) == 0
    assert text_encoder_main(["--out", str(root / "text"), "--steps", "2", *SMALL_TEXT, *FAST,
                              "training.batch_size=4", "evaluation_captions=8"]) == 0
    return root


def test_the_vae_command_writes_weights_with_their_latent_statistics(trained_vae_and_text_encoder):
    root = trained_vae_and_text_encoder
    record = json.loads((root / "vae" / "training_record.json").read_text())
    assert {"reconstruction", "kl"} <= record["final_losses"].keys()
    config = WanVAEConfig(base_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae = WanVAE.from_pretrained(root / "vae" / "vae.safetensors", config)
    assert vae.config.latents_mean == pytest.approx(record["latents_mean"])
    assert vae.config.latents_std == pytest.approx(record["latents_std"])
    # the stored statistics are those of the model's posterior means: normalised latents of
    # fresh world clips have per-channel mean near 0 and std near 1
    from stages.base.vae_training import measure_latent_statistics

    training = VaeTrainingConfig(vae=config, statistics_clips=8)
    training.training.seed = 1  # other clips than the ones the statistics came from
    mean, std = measure_latent_statistics(vae, training)
    normalised_mean = (np.array(mean) - record["latents_mean"]) / np.array(record["latents_std"])
    assert np.abs(normalised_mean).max() < 1.0
    assert np.all((np.array(std) / record["latents_std"] > 0.5) & (np.array(std) / record["latents_std"] < 2.0))


def test_the_vae_training_path_is_the_frozen_path_with_gradients():
    torch.manual_seed(0)
    config = WanVAEConfig(base_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, z_dim=4,
                          latents_mean=[0.5, -0.2, 0.1, 0.0], latents_std=[2.0, 1.0, 0.5, 1.5])
    vae = WanVAE(config).eval()
    frames = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    mu, _ = vae.posterior(frames)
    mean, std = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1), torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(vae.encode(frames), (mu.detach() - mean) / std)
    decoded = torch.cat(list(vae.decode_chunks(mu)), dim=2)
    torch.testing.assert_close(vae.decode(vae.encode(frames)), decoded.detach().clamp(-1, 1), atol=1e-5, rtol=0)
    decoded.square().mean().backward()
    assert all(parameter.grad is not None for parameter in vae.encoder.parameters())


def test_vae_training_resumes_to_the_state_of_an_uninterrupted_run(tmp_path):
    config = VaeTrainingConfig(vae=WanVAEConfig(base_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
                               training=TrainingConfig(steps=3, batch_size=1, checkpoint_every=1, warmup_steps=1),
                               crop_size=16, clip_frames=5)
    batches = training_batches(config)

    def loss(model, batch):
        return vae_loss(model, batch, config.kl_weight)

    def fresh():
        torch.manual_seed(3)
        return WanVAE(config.vae)

    straight = fresh()
    train(straight, loss, batches, config.training, tmp_path / "straight", "w.safetensors")

    def interrupted(step):
        if step == 2:
            raise KeyboardInterrupt
        return batches(step)

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), loss, interrupted, config.training, tmp_path / "resumed", "w.safetensors")
    resumed = fresh()
    train(resumed, loss, batches, config.training, tmp_path / "resumed", "w.safetensors")
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_probe_labels_name_each_object_and_a_missing_second_one():
    rng = np.random.default_rng(0)
    one, two = random_clip(rng, 17, 0.0), random_clip(rng, 17, 1.0)
    labels = _labels([one, two])
    assert labels["colour"][0].tolist() == [list(COLOURS).index(one.objects[0].colour), len(COLOURS)]
    assert labels["direction"][0, 1] == -100  # ignored: there is no second object
    assert labels["direction"][1].tolist() == [list(DIRECTIONS).index(obj.direction) for obj in two.objects]


def test_the_text_encoder_command_writes_weights_the_stage_loads(trained_vae_and_text_encoder):
    root = trained_vae_and_text_encoder
    record = json.loads((root / "text" / "training_record.json").read_text())
    assert set(record["accuracy_held_out_phrasings"]) == {"colour", "shape", "direction", "speed"}
    config = record["config"]["text_encoder"]
    from dataclasses import replace

    encoder_config = replace(TEXT_ENCODER_SIZES["tiny"], **{key: config[key] for key in
                             ("d_model", "d_ff", "num_heads", "d_kv", "num_layers", "text_len")})
    encoder = TextEncoder.from_pretrained(root / "text" / "text_encoder.safetensors", encoder_config)
    trained = torch.load(root / "text" / "checkpoint.pt", weights_only=False)["model"]
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, trained[f"encoder.model.{key}"]), key
    embeddings, lengths = encoder.encode(["a red circle moving to the right", "红色的圆向右移动"])
    assert embeddings.shape == (2, 64, 16) and lengths.tolist() == [33, 25]


def test_the_dit_command_trains_on_encoded_world_clips_and_reuses_them(trained_vae_and_text_encoder, tmp_path):
    root = trained_vae_and_text_encoder
    arguments = [
        "--out", str(tmp_path / "dit"), "--steps", "2", *SMALL_VAE, *SMALL_TEXT, *FAST,
        f"vae_weights={root / 'vae' / 'vae.safetensors'}",
        f"text_encoder_weights={root / 'text' / 'text_encoder.safetensors'}",
        "dit.dim=24", "dit.ffn_dim=48", "dit.num_heads=2", "dit.num_layers=1", "dit.text_dim=16", "dit.text_len=64",
        "clips=3", "num_frames=5", "frame_size=32", "training.batch_size=2", "training.threads=1",
        "overview_share=0.5", "long_clips=2", "long_frames=[9]",
    ]
    assert dit_main(arguments) == 0
    cached = torch.load(tmp_path / "dit" / "latents.pt", weights_only=True)
    latents = cached["latents"]
    assert latents.shape == (3, 16, 2, 4, 4) and cached["object_masks"].shape == (3, 1, 2, 4, 4)
    long = torch.load(tmp_path / "dit" / "long_latents_9.pt", weights_only=True)  # 9 frames: 3 latent frames
    assert long["latents"].shape == (2, 16, 3, 4, 4) and long["object_masks"].shape == (2, 1, 3, 4, 4)
    dit = WanDiT.from_pretrained(tmp_path / "dit" / "dit.safetensors", WanDiTConfig(
        dim=24, ffn_dim=48, num_heads=2, num_layers=1, text_dim=16, text_len=64))
    velocity = dit(latents[:1], torch.tensor([500.0]), torch.zeros(1, 64, 16))
    assert velocity.shape == latents[:1].shape and torch.isfinite(velocity).all()
    # a second invocation with more steps resumes and reuses the encoded clips
    marker = (tmp_path / "dit" / "latents.pt").stat().st_mtime_ns
    assert dit_main([*arguments[:3], "3", *arguments[4:]]) == 0
    assert (tmp_path / "dit" / "latents.pt").stat().st_mtime_ns == marker
    steps = [json.loads(line)["step"] for line in (tmp_path / "dit" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_overview_steps_train_on_long_clips_frames_at_their_places():
    """With overview_share 1 every batch holds long clips' overview frames (0, 3, 6, 9, 12 of 13
    latent frames, for windows of 5) with those frame positions; with 0 the batches are the ones a
    run without long clips draws."""
    text_encoder = TextEncoder(TEXT_ENCODER_SIZES["tiny"])
    short = torch.randn(6, 16, 5, 2, 2)
    long_latents = torch.arange(13.0).view(1, 1, 13, 1, 1).expand(4, 16, 13, 2, 2) + 100 * torch.arange(4.0).view(4, 1, 1, 1, 1)
    long = {49: (long_latents, torch.zeros(4, 1, 13, 2, 2, dtype=torch.bool))}
    masks = torch.zeros(6, 1, 5, 2, 2, dtype=torch.bool)
    config = DitTrainingConfig(clips=6, long_clips=4, long_frames=[49], overview_share=1.0)
    for step in range(3):
        batch = dit_training_batches(config, short, masks, text_encoder, long)(step)
        assert batch.frame_positions == [0, 3, 6, 9, 12]
        clip = batch.latents[:, 0, 0, 0, 0] // 100  # which long clip each sample is
        expected = 100 * clip[:, None] + torch.tensor([0.0, 3, 6, 9, 12])
        assert torch.equal(batch.latents[:, 0, :, 0, 0], expected)
    config = DitTrainingConfig(clips=6, long_clips=4, long_frames=[49], overview_share=0.0)
    plain = DitTrainingConfig(clips=6)
    for step in range(3):
        with_long = dit_training_batches(config, short, masks, text_encoder, long)(step)
        without = dit_training_batches(plain, short, masks, text_encoder)(step)
        assert with_long.frame_positions is None and torch.equal(with_long.latents, without.latents)
        assert torch.equal(with_long.noise, without.noise) and torch.equal(with_long.text, without.text)


def test_a_long_length_listed_twice_is_drawn_twice_as_often():
    """long_frames [33, 49, 49]: of the overview steps about two thirds are of 49 frames (latent
    frames 0, 3, 6, 9, 12) and one third of 33 (0, 2, 4, 6, 8)."""
    text_encoder = TextEncoder(TEXT_ENCODER_SIZES["tiny"])
    short, masks = torch.randn(6, 16, 5, 2, 2), torch.zeros(6, 1, 5, 2, 2, dtype=torch.bool)
    long = {33: (torch.randn(2, 16, 9, 2, 2), torch.zeros(2, 1, 9, 2, 2, dtype=torch.bool)),
            49: (torch.randn(2, 16, 13, 2, 2), torch.zeros(2, 1, 13, 2, 2, dtype=torch.bool))}
    config = DitTrainingConfig(clips=6, long_clips=2, long_frames=[33, 49, 49], overview_share=1.0,
                               training=TrainingConfig(batch_size=1))
    batches = dit_training_batches(config, short, masks, text_encoder, long)
    positions = [tuple(batches(step).frame_positions) for step in range(90)]
    assert set(positions) == {(0, 2, 4, 6, 8), (0, 3, 6, 9, 12)}
    assert 45 <= positions.count((0, 3, 6, 9, 12)) <= 75  # 60 expected, the binomial's sd 4.5


def test_latent_object_masks_cover_the_object_on_the_causal_latent_grid():
    frames = np.full((2, 9, 64, 64, 3), 128, dtype=np.uint8)  # grey: no object
    frames[0, 0, 10:14, 40:44] = (255, 0, 0)  # frame 0 -> latent frame 0, latent pixel (1, 5)
    frames[0, 6, 50:52, 3:5] = (0, 0, 255)  # frame 6 -> latent frame 2 (frames 5-8), latent pixel (6, 0)
    frames[1, 1:9, 32:36, 32:36] = (0, 200, 0)  # frames 1-8 -> latent frames 1 and 2, pixel (4, 4)
    masks = latent_object_masks(frames)
    assert masks.shape == (2, 1, 3, 8, 8) and masks.dtype == torch.bool
    expected = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    for clip, latent_frame, row, column in [(0, 0, 1, 5), (0, 2, 6, 0), (1, 1, 4, 4), (1, 2, 4, 4)]:
        expected[clip, latent_frame, max(row - 1, 0) : row + 2, max(column - 1, 0) : column + 2] = True
    assert torch.equal(masks[:, 0], expected)


def test_the_flow_matching_loss_is_the_weighted_mean_of_squared_errors():
    class Constant(torch.nn.Module):  # a "DiT" whose velocity is 0: the error is the target itself
        def forward(self, noisy, timesteps, text, frame_positions=None):
            return torch.zeros_like(noisy)

    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 2, 4, 4, generator=generator), torch.randn(2, 16, 2, 4, 4, generator=generator)
    weights = torch.ones(2, 1, 2, 4, 4)
    weights[1, :, 1, 2:, :] = 10.0
    loss, _ = flow_matching_loss(Constant(), FlowBatch(x0, torch.zeros(2, 8, 4), torch.tensor([0.3, 0.8]), noise, weights))
    squared = (noise - x0).square()
    expected = sum(float(weights[b, 0, t, i, j]) * float(squared[b, c, t, i, j])
                   for b, c, t, i, j in np.ndindex(*squared.shape)) / (16 * float(weights.sum()))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_commands_name_bad_values(capsys):
    assert vae_main(["clip_frames=6"]) == 2
    assert "clip_frames" in capsys.readouterr().out
    assert dit_main(["dit.text_dim=32"]) == 2
    assert "text_dim" in capsys.readouterr().out
    assert dit_main(["speed_named_share=1.5"]) == 2
    assert "speed_named_share=1.5" in capsys.readouterr().out
    assert dit_main(["overview_share=-0.5"]) == 2
    assert "overview_share=-0.5 must be in [0, 1]" in capsys.readouterr().out
    assert dit_main(["long_frames=[61]"]) == 2
    assert "long_frames [61]: each must be 4·k + 1 frames" in capsys.readouterr().out


def test_the_reconstruction_weight_follows_hsv_saturation():
    import colorsys

    from stages.base.vae_training import saturation

    pixels = torch.rand(1, 3, 1, 4, 5)
    ours = saturation(pixels * 2 - 1)[0, 0, 0]
    for row in range(4):
        for column in range(5):
            expected = colorsys.rgb_to_hsv(*pixels[0, :, 0, row, column].tolist())[1]
            assert ours[row, column].item() == pytest.approx(expected, abs=1e-5)


def test_the_commands_name_missing_weights(tmp_path, capsys):
    missing = str(tmp_path / "nothing.safetensors")
    assert vae_main(["--out", str(tmp_path / "vae"), "--init", missing]) == 2
    assert "nothing.safetensors" in capsys.readouterr().out
    assert dit_main(["--out", str(tmp_path / "dit"), f"vae_weights={missing}", "clips=1"]) == 2
    assert "nothing.safetensors" in capsys.readouterr().out

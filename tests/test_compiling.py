"""The C++ compiler check for torch.compile on the CPU (stages/compiling.py): where torch itself
cannot compile (checked here by compiling a function), the base stage and the training loop refuse
at set-up, naming their setting; where it can, the check passes and nothing is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import train_stage
from cascade.config import load_config
from stages.base.stage import BaseStage
from stages.compiling import CompilerMissing, require_compiler
from stages.training import TrainingConfig, train
from tests.test_parallel import SMALL_DIT

ABSENT_COMPILER = "/nonexistent/bin/c++"


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """torch's inductor sees only a compiler that does not exist, and caches nothing from before."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": (ABSENT_COMPILER,), "fx_graph_cache": False}):
        yield
    torch._dynamo.reset()


def test_torch_itself_cannot_compile_without_the_compiler(no_compiler):
    """The premise, from torch: the first call of a compiled function fails without a compiler."""
    compiled = torch.compile(lambda x: torch.nn.functional.gelu(x).sin() * 2.5)
    with pytest.raises(Exception, match="No working C\\+\\+ compiler"):
        compiled(torch.randn(3, 4))


def test_the_check_names_the_setting_and_what_torch_tried(no_compiler):
    with pytest.raises(CompilerMissing) as refused:
        require_compiler("cpu", "stages.base.compile")
    message = str(refused.value)
    assert "stages.base.compile=true" in message and ABSENT_COMPILER in message
    assert "stages.base.compile=false" in message and "CXX" in message


def test_a_gpu_needs_no_cpp_compiler(no_compiler):
    require_compiler("cuda", "stages.base.compile")  # GPU kernels are Triton: nothing to look for


def test_with_the_compiler_the_check_passes_and_torch_compiles():
    require_compiler("cpu", "stages.base.compile")
    compiled = torch.compile(lambda x: torch.nn.functional.gelu(x).cos() * 1.5)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), torch.nn.functional.gelu(x).cos() * 1.5)


def test_the_base_stage_refuses_compile_at_set_up(no_compiler):
    config = dataclasses.replace(load_config(None, []).stages.base, dit=SMALL_DIT, dit_weights="", compile=True)
    with pytest.raises(CompilerMissing, match="stages.base.compile=true"):
        BaseStage(config)
    BaseStage(dataclasses.replace(config, compile=False))  # eager needs no compiler


def test_training_refuses_compile_before_writing_anything(no_compiler, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CompilerMissing, match="training.compile=true"):
        train(torch.nn.Linear(3, 1), lambda model, batch: (model(batch).sum(), {}), lambda step: torch.randn(4, 3),
              TrainingConfig(steps=2, compile=True), out, "w.safetensors")
    assert not out.exists()


def test_train_stage_prints_one_error_line(no_compiler, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_stage.main(["tsr", "--out", str(out), "--steps", "1", "training.compile=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training.compile=true") and "Traceback" not in err
    assert not (out / "interpolator.safetensors").exists()

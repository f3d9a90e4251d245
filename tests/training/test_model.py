"""training/model.py: any smp architecture, clear errors, fast offline failure, rebuilds."""

from __future__ import annotations

import pytest
import torch

from training.config import ConfigError, ModelConfig, Recipe
from training.model import (
    architectures,
    build_model,
    hub_reachable,
    model_from_checkpoint,
    offline_message,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus", "FPN", "Segformer"])
def test_architectures_build_and_keep_the_input_size(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder="resnet18"), num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5, 64, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Raw logits (no activation): per-pixel values are not a probability distribution.
    assert not torch.allclose(out.sum(dim=1), torch.ones(2, 64, 64))


def test_arch_name_is_case_insensitive_like_smp() -> None:
    model = build_model(ModelConfig(arch="deeplabv3plus", encoder="resnet18"), num_classes=2)
    assert type(model).__name__ == "DeepLabV3Plus"


def test_unknown_arch_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"model.arch: 'UNet3D'") as err:
        build_model(ModelConfig(arch="UNet3D"), num_classes=2)
    for name in ("Unet", "DeepLabV3Plus", "FPN", "Segformer"):
        assert name in str(err.value)
    assert set(architectures()) >= {"Unet", "FPN", "Segformer", "UPerNet"}


def test_unknown_encoder_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"model.encoder: 'resnet19'.*'resnet18'.*'mit_b0'"):
        build_model(ModelConfig(encoder="resnet19"), num_classes=2)


def test_unknown_timm_encoder() -> None:
    with pytest.raises(ConfigError, match="timm has no model 'not_a_model'"):
        build_model(ModelConfig(encoder="tu-not_a_model"), num_classes=2)


def test_unknown_weights_name_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"'instagram' does not exist for resnet18.*'imagenet'"):
        build_model(ModelConfig(encoder_weights="instagram"), num_classes=2)


def test_unknown_kwarg_is_refused_not_silently_dropped() -> None:
    with pytest.raises(ConfigError, match=r"model.kwargs.decoder_chanels: Unet takes no such"):
        build_model(ModelConfig(kwargs={"decoder_chanels": [8, 8, 8, 8, 8]}), num_classes=2)


@pytest.mark.parametrize("key", ["activation", "classes", "aux_params"])
def test_kwargs_that_would_break_the_logits_contract_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=f"model.kwargs.{key}: set by segserve itself"):
        build_model(ModelConfig(kwargs={key: None}), num_classes=2)


def test_bad_kwarg_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="smp cannot build Unet"):
        build_model(ModelConfig(kwargs={"decoder_channels": [8, 8]}), num_classes=2)


def test_kwargs_reach_the_model() -> None:
    model = build_model(
        ModelConfig(kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]}), num_classes=3
    )
    assert model.segmentation_head[0].in_channels == 4
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_hub_probe_reports_a_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert hub_reachable(timeout=1.0) is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable(timeout=1.0) is False


def test_pretrained_weights_offline_fail_fast_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # Point the hub at a closed local port: offline on any machine, internet or not.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(encoder="resnet18", encoder_weights="imagenet"), num_classes=2)
    message = str(err.value)
    assert "pretrained weights for resnet18 need internet" in message
    assert "set model.encoder_weights: null or pre-download to $TORCH_HOME" in message
    assert message == offline_message("resnet18")


def test_pretrained_weights_offline_here() -> None:
    """This machine has no route to the hub: the real default endpoint fails just the same."""
    if hub_reachable():
        pytest.skip("the Hugging Face hub is reachable from this machine")
    with pytest.raises(ConfigError, match="pretrained weights for mit_b0 need internet"):
        build_model(ModelConfig(arch="Segformer", encoder="mit_b0", encoder_weights="imagenet"), 2)


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(ModelConfig(), num_classes=0)


def test_model_from_checkpoint_rebuilds_the_same_function() -> None:
    recipe = Recipe()
    recipe.model = ModelConfig(arch="FPN", encoder="resnet18")
    torch.manual_seed(1)
    trained = build_model(recipe.model, num_classes=3)
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in trained.parameters():
            p.add_(0.01)
    ckpt = {
        "model": trained.state_dict(),
        "recipe": recipe.to_dict(),
        "metadata": {"num_classes": 3},
    }
    rebuilt = model_from_checkpoint(ckpt)
    assert not rebuilt.training
    assert next(rebuilt.parameters()).device.type == "cpu"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained.eval()(x))


def test_model_from_checkpoint_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained from ImageNet weights rebuilds offline: the checkpoint has every weight."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    recipe = Recipe()
    state = build_model(recipe.model, num_classes=2).state_dict()
    recipe.model.encoder_weights = "imagenet"
    ckpt = {"model": state, "recipe": recipe.to_dict(), "metadata": {"num_classes": 2}}
    assert model_from_checkpoint(ckpt)(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_model_from_checkpoint_rejects_a_foreign_dict() -> None:
    with pytest.raises(ConfigError, match="checkpoint lacks 'recipe'"):
        model_from_checkpoint({"model": {}, "metadata": {}})

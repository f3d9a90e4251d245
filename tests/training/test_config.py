"""training/config.py: validation messages, overrides, the input-size rule, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import (
    ConfigError,
    Recipe,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    save_recipe,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_valid_and_synthetic() -> None:
    recipe = recipe_from_dict({})
    assert recipe.data.kind == "synthetic"
    assert recipe.data.input_size == (128, 128)
    assert recipe.model.encoder_weights is None


def test_unknown_key_names_the_dotted_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key optim\.learning_rate") as err:
        recipe_from_dict({"optim": {"learning_rate": 0.1}})
    assert "lr" in str(err.value)  # the allowed keys are listed


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError, match="unknown key trainer in the recipe"):
        recipe_from_dict({"trainer": {}})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": 2.5}}, "train.epochs"),
        ({"train": {"progress": "yes"}}, "train.progress"),
        ({"data": {"input_size": [128]}}, "data.input_size"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"model": "Unet"}, "model"),
    ],
)
def test_wrong_type_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    assert str(err.value).startswith(key)


def test_int_is_accepted_where_float_is_expected() -> None:
    assert recipe_from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


def test_bad_choice_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"optim\.name: 'adam' is not one of \['adamw', 'sgd'\]"):
        recipe_from_dict({"optim": {"name": "adam"}})
    with pytest.raises(ConfigError, match="data.kind"):
        recipe_from_dict({"data": {"kind": "coco"}})


@pytest.mark.parametrize("size", [[100, 128], [128, 0], [-32, 64]])
def test_input_size_must_be_positive_multiples_of_32(size: list[int]) -> None:
    with pytest.raises(ConfigError, match="data.input_size.*multiples of 32"):
        recipe_from_dict({"data": {"input_size": size}})


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="data.root: required"):
        recipe_from_dict({"data": {"kind": "voc"}})
    with pytest.raises(ConfigError, match="mean and data.std"):
        recipe_from_dict({"data": {"mean": [0.5, 0.5, 0.5]}})
    with pytest.raises(ConfigError, match="at least one of ce, dice, focal"):
        recipe_from_dict({"loss": {"ce": 0.0}})
    with pytest.raises(ConfigError, match="parity_sizes"):
        recipe_from_dict({"export": {"parity_sizes": [[100, 64]]}})


def test_overrides_parse_values_as_yaml() -> None:
    recipe = apply_overrides(
        Recipe(),
        ["optim.lr=0.01", "data.input_size=[64, 96]", "model.encoder_weights=null", "seed=7"],
    )
    assert recipe.optim.lr == 0.01
    assert recipe.data.input_size == (64, 96)
    assert recipe.model.encoder_weights is None
    assert recipe.seed == 7


def test_overrides_are_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match="unknown key train.epoch "):
        apply_overrides(Recipe(), ["train.epoch=3"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides(Recipe(), ["train.epochs"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        apply_overrides(Recipe(), ["seed.x=1"])
    with pytest.raises(ConfigError, match="data.input_size"):
        apply_overrides(Recipe(), ["data.input_size=[100, 100]"])


def test_overrides_do_not_mutate_the_input() -> None:
    recipe = Recipe()
    apply_overrides(recipe, ["train.epochs=3"])
    assert recipe.train.epochs == Recipe().train.epochs


def test_save_load_round_trip(tmp_path: Path) -> None:
    recipe = apply_overrides(
        Recipe(),
        ["model.arch=FPN", "data.mean=[0.5, 0.4, 0.3]", "data.std=[0.2, 0.2, 0.2]",
         "model.kwargs={decoder_dropout: 0.1}", "export.parity_sizes=[[64, 96]]"],
    )  # fmt: skip
    path = tmp_path / "recipe.yaml"
    save_recipe(recipe, path)
    loaded = load_recipe(path)
    assert loaded == recipe
    assert loaded.to_dict() == recipe.to_dict()


def test_load_recipe_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml: recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: a recipe is a YAML mapping"):
        load_recipe(listing)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  name: rmsprop\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: optim.name"):
        load_recipe(wrong)


def test_there_are_example_recipes() -> None:
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "cityscapes.yaml", "voc.yaml", "folder.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    # Every shipped recipe must be able to build its model: arch/encoder/kwargs are checked.
    from training.model import check_model_config

    check_model_config(recipe.model)


def test_default_recipe_is_the_fast_offline_demo() -> None:
    recipe = load_recipe(CONFIGS[0].parent / "default.yaml")
    assert recipe.data.kind == "synthetic"
    assert recipe.model.encoder_weights is None  # no download in the demo
    assert recipe.data.input_size[0] <= 128 and recipe.data.input_size[1] <= 128


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_builds_its_model(path: Path) -> None:
    """Its model kwargs are ones the architecture takes (weights left out: no download here)."""
    import dataclasses

    import torch

    from training.model import build_model

    recipe = load_recipe(path)
    model = build_model(dataclasses.replace(recipe.model, encoder_weights=None), num_classes=3)
    with torch.no_grad():
        logits = model.eval()(torch.zeros(1, 3, 64, 64))
    assert tuple(logits.shape) == (1, 3, 64, 64)

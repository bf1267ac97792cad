"""Any dataset flag in one command: configs derived from metadata alone, YAMLs that replace them, the listing
command and the unknown-name error (train -> export -> evaluate of derived configs: tests/test_export.py)."""

import pytest

from training.cli import main
from training.config import CONFIG_DIR, TrainConfig
from training.data import available_sizes, dataset_flags, official_split_sizes
from training.recipes import derive_config, resolve_config


@pytest.mark.parametrize("flag", dataset_flags())
def test_every_flag_derives_a_config_at_every_size_from_metadata_alone(flag):
    for size in available_sizes(flag):
        cfg = derive_config(flag, size)  # no data dir: only the packages' metadata
        assert (cfg.dataset, cfg.size) == (flag, size) and cfg.name == (f"{flag}-cnn" if size == 28 else
                                                                        f"{flag}-cnn-{size}")
    cfg, n_train = derive_config(flag), official_split_sizes(flag)["train"]
    steps = cfg.epochs * (n_train // cfg.batch_size)
    is_3d = flag.endswith("3d")
    assert cfg.widths == ([16, 32, 64] if is_3d else [32, 64, 128])
    assert cfg.augment.hflip == (is_3d and flag != "organmnist3d")  # its labels name sides
    assert steps >= (600 if is_3d else 1500)  # tiny datasets still get enough steps
    assert cfg.epochs * n_train <= 600_000  # big ones do not take forever on a CPU


def test_the_recipes_reproduce_the_tuned_configs_training_length():
    for flag in ("pneumoniamnist", "adrenalmnist3d"):
        tuned, derived = TrainConfig.load(CONFIG_DIR / f"{flag}.yaml"), derive_config(flag)
        assert (derived.epochs, derived.batch_size) == (tuned.epochs, tuned.batch_size)
    assert derive_config("breastmnist").epochs > derive_config("bloodmnist").epochs > derive_config("pathmnist").epochs


def test_a_yaml_replaces_the_recipe_and_another_size_gets_its_own_name():
    assert resolve_config("pneumoniamnist") == TrainConfig.load(CONFIG_DIR / "pneumoniamnist.yaml")
    assert resolve_config("breastmnist") == derive_config("breastmnist")
    assert resolve_config("pneumoniamnist", {"size": 64}).name == "pneumoniamnist-cnn-64"
    bigger = resolve_config("breastmnist", {"size": 128, "epochs": 2, "augment.hflip": True})
    assert (bigger.name, bigger.size, bigger.epochs, bigger.augment.hflip) == ("breastmnist-cnn-128", 128, 2, True)
    with pytest.raises(ValueError, match=r"128; choose from 28, 64"):
        resolve_config("organmnist3d", {"size": 128})


@pytest.mark.parametrize(("config", "overrides", "recipe", "name"), [
    ("breastmnist", {"arch": "transfer"}, False, "breastmnist-transfer"),  # not the next breastmnist-cnn
    ("breastmnist", {"arch": "transfer", "size": 64}, False, "breastmnist-transfer-64"),
    ("breastmnist", {"dataset": "dermamnist"}, False, "breastmnist-cnn-dermamnist"),
    ("mnist", {"arch": "transfer", "backbone": "resnet18"}, False, "mnist-cnn-transfer"),  # a shipped YAML
    ("pneumoniamnist", {"arch": "transfer"}, False, "pneumoniamnist-cnn-transfer"),  # not the shipped transfer model
    ("pneumoniamnist-transfer", {"dataset": "dermamnist"}, False, "pneumoniamnist-transfer-dermamnist"),
    ("pneumoniamnist-transfer", {"dataset": "dermamnist", "name": "d"}, False, "d"),  # a given name wins
    ("pneumoniamnist", {"size": 64}, True, "pneumoniamnist-cnn-recipe-64"),  # the size last
    ("pneumoniamnist", {"arch": "transfer"}, True, "pneumoniamnist-transfer-recipe"),
])
def test_a_name_never_claims_a_model_the_config_is_not(config, overrides, recipe, name):
    assert resolve_config(config, overrides, recipe=recipe).name == name


def test_recipe_trains_the_generic_recipe_where_a_tuned_yaml_exists_under_its_own_name():
    forced = resolve_config("pneumoniamnist", {"seed": 2}, recipe=True)
    derived = derive_config("pneumoniamnist")
    assert forced.name == "pneumoniamnist-cnn-recipe" and forced.seed == 2  # never publishes over the tuned model
    assert (forced.ema, forced.select, forced.epochs) == (derived.ema, derived.select, derived.epochs)
    assert resolve_config("breastmnist", recipe=True).name == "breastmnist-cnn"  # no YAML: the usual name
    with pytest.raises(ValueError, match="--recipe takes a dataset flag"):
        resolve_config("mnist-fast", recipe=True)


def test_an_unknown_name_is_one_line_listing_flags_and_configs(capsys):
    assert main(["train", "brainmnist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown config or dataset 'brainmnist'")
    assert all(name in err for name in [*dataset_flags(), "pneumoniamnist-transfer", "mnist-fast"])


def test_datasets_lists_every_flag_with_its_metadata_and_local_files(fixture_data, capsys):
    assert main(["datasets", "--data-dir", str(fixture_data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == dataset_flags()
    # flag, task..., shape, labels, train, val, test, sizes, local, config...
    assert rows["breastmnist"][2:9] == ["28x28", "2", "546", "78", "156", "28,64,128,224", "-"]
    assert rows["pneumoniamnist"][7:10] == ["28,64,128,224", "28,64", "pneumoniamnist.yaml"]  # fixture files
    assert rows["organmnist3d"][2:9] == ["28x28x28", "11", "971", "161", "610", "28,64", "28"]
    assert rows["chestmnist"][1:3] == ["multi-label,", "binary-class"] and rows["mnist"][-2:] == ["28", "mnist.yaml"]
    assert " ".join(rows["tissuemnist"][9:]) == f"2D recipe ({derive_config('tissuemnist').epochs} epochs, batch 128)"


def test_the_3d_recipe_flips_only_datasets_whose_labels_name_no_side():
    # OrganMNIST3D's labels include kidney-left and kidney-right: flipped, an outside probe's run collapsed each
    # mirrored pair onto one class (test accuracy 0.594 against 1.000 without the flip)
    assert derive_config("nodulemnist3d").augment.hflip and derive_config("adrenalmnist3d").augment.hflip
    assert not derive_config("organmnist3d").augment.hflip and not derive_config("organmnist3d", 64).augment.hflip

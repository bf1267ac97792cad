"""A bad config value is one clear error when the config is read, naming the key, the value and what is allowed."""

from pathlib import Path

import pytest

from training.config import BACKBONES, CHECKPOINT_BACKBONE, CONFIG_DIR, TRANSFER_ONLY, TrainConfig


def read(**fields) -> TrainConfig:
    return TrainConfig.from_dict({"name": "t", "dataset": "pneumoniamnist", **fields})


@pytest.mark.parametrize("fields,message", [
    ({"arch": "vit"}, "'arch' is 'vit'; choose from cnn, transfer"),
    ({"backbone": "resnet50"}, "'backbone' is 'resnet50'; choose from resnet18, mobilenet_v3_small, efficientnet_b0"),
    ({"optimizer": "adam"}, "'optimizer' is 'adam'; choose from adamw, sgd"),
    ({"schedule": "step"}, "'schedule' is 'step'; choose from onecycle, cosine, constant"),
    ({"select": "loss"}, "'select' is 'loss'; choose from None, acc, auc, acc\\+auc"),
    ({"dataset": "pneumonia"}, "'dataset' is 'pneumonia'; choose from mnist, pathmnist, "),
    ({"size": 32}, "'size' is 32; choose from 28, 64, 128, 224 \\(sizes of pneumoniamnist\\)"),
    ({"dataset": "organmnist3d", "size": 128}, "'size' is 128; choose from 28, 64 \\(sizes of organmnist3d\\)"),
    ({"dataset": "mnist", "size": 64}, "'size' is 64; choose from 28 \\(sizes of mnist\\)"),
    ({"dataset": "organmnist3d", "arch": "transfer"}, "'arch' is 'transfer', but organmnist3d is 3D"),
    ({"dataset": "organmnist3d", "highpass": 1.5}, "'highpass' is 1.5, but organmnist3d is 3D"),
    ({"highpass": 0}, "'highpass' is 0; give a blur sigma > 0"),
    ({"epochs": 0}, "'epochs' is 0; it must be >= 1"),
    ({"ensemble": 0}, "'ensemble' is 0; it must be >= 1"),
    ({"batch_size": -8}, "'batch_size' is -8; it must be >= 1"),
    ({"train_limit": 0}, "'train_limit' is 0; it must be >= 1"),
    ({"input_size": 0}, "'input_size' is 0; it must be >= 1"),
    ({"patience": -1}, "'patience' is -1; it must be >= 0"),
    ({"lr": -0.1}, "'lr' is -0.1; it must be >= 0"),
    ({"dropout": 1.0}, "'dropout' is 1.0; it must be >= 0 and < 1"),
    ({"widths": []}, "'widths' is \\[\\]; give one or more positive channel counts"),
    ({"widths": [16, "32"]}, "'widths' is \\[16, '32'\\]; give one or more positive channel counts"),
    ({"augment": {"rotate": -5}}, "'augment.rotate' is -5; it must be >= 0"),
    ({"augment": {"hflip": "yes"}}, "'augment.hflip' is 'yes'; give true or false"),
    ({"augment": {"flip": True}}, "unknown augment keys: \\['flip'\\]"),
    ({"epochs": "3"}, "'epochs' is '3'; give an integer"),
    ({"epochs": True}, "'epochs' is True; give an integer"),
    ({"lr": "3e-3"}, "'lr' is '3e-3'; give a number"),  # YAML 1.1 reads 3e-3 (no dot) as a string
    ({"train_limit": 2.5}, "'train_limit' is 2.5; give an integer or null"),
    ({"ensemble": 2, "ensemble_variants": [{"optimizer": "adam"}]}, "'optimizer' is 'adam'"),
    # an outside probe's: each of these was a traceback (TypeError), or a run and an export outside the repository
    ({"augment": 5}, "'augment' is 5; give a mapping"),
    ({"ensemble": 2, "ensemble_variants": [5]}, "'ensemble_variants' is \\[5\\]; give a list of config overrides"),
])
def test_a_bad_value_is_one_clear_error_when_read(fields, message):
    with pytest.raises(ValueError, match=message):
        read(**fields)


def test_malformed_yaml_and_configs_missing_their_names_are_one_clear_error(tmp_path):
    # an outside probe's: a YAML syntax error was 20 lines of PyYAML's traceback, an empty config a TypeError
    from training.config import parse_override, with_overrides

    for text, message in (("", "the config has no 'name' or 'dataset'"), ("name: x\n", "the config has no 'dataset'"),
                          ("name: x\ndataset: [\n", "is not valid YAML: while parsing"),
                          ("- a\n- b\n", "holds a YAML list, not a mapping")):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            TrainConfig.load(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="override 'widths=\\[16,32' is not valid YAML"):
        parse_override("widths=[16,32")
    with pytest.raises(ValueError, match="'epochs' holds a value, not keys"):
        with_overrides({"epochs": 3}, {"epochs.x": 1})


@pytest.mark.parametrize("fields,message", [
    # an outside probe's: a flip swaps OrganMNIST's kidney-left and kidney-right; freeze did nothing on a CNN
    ({"dataset": "organmnist3d", "augment": {"hflip": True}},
     r"'augment.hflip' is true, but organmnist3d's labels name sides \(kidney-right, kidney-left, "),
    ({"dataset": "organamnist", "augment": {"hflip": True}}, "but organamnist's labels name sides"),
    ({"freeze": True}, "'freeze' is true, but arch is 'cnn'"),
    # an outside probe's: a name with slashes trained into, and published to, folders outside runs/ and the repository
    ({"name": "../../escape"}, "'name' is '../../escape'; give a folder name"),
    ({"name": ".hidden"}, "'name' is '.hidden'; give a folder name"),
])
def test_a_run_cannot_start_with_these_but_their_configs_still_read(fields, message):
    cfg = read(**fields)  # a checkpoint of a run made before the check is still read, evaluated and exported
    with pytest.raises(ValueError, match=message):
        cfg.check_trainable()


def test_the_shipped_configs_and_good_values_are_accepted():
    for path in CONFIG_DIR.glob("*.yaml"):
        TrainConfig.load(path)
    cfg = read(arch="transfer", backbone=CHECKPOINT_BACKBONE, backbone_checkpoint="m.pt", size=224, select="acc+auc",
               lr=0)
    assert (cfg.size, cfg.select_metric, cfg.lr) == (224, "acc+auc", 0)
    assert read(dataset="organmnist3d", size=64, train_limit=None, dropout=0).size == 64


def test_the_backbone_choices_are_the_backbones_models_builds():
    from training.models import TORCHVISION_BACKBONES

    assert set(BACKBONES) == {*TORCHVISION_BACKBONES, CHECKPOINT_BACKBONE}


def test_a_backbone_from_a_file_is_never_recorded_as_pretrained():
    # however the file is named (--backbone-checkpoint, --set, a YAML), no ImageNet weights are fetched for it
    base = {"name": "t", "dataset": "pneumoniamnist", "arch": "transfer"}
    assert TrainConfig.from_dict(base).pretrained is True
    assert TrainConfig.from_dict({**base, "backbone_checkpoint": "/w/resnet18.pt"}).pretrained is False
    # and the file is named by its absolute path, so the card names it wherever it is read
    relative = TrainConfig.from_dict({**base, "backbone_checkpoint": "w/r.pt"})
    assert relative.backbone_checkpoint == str(Path("w/r.pt").resolve())


def test_a_card_records_only_what_shaped_its_model():
    # an outside probe: every CNN's card said "backbone: resnet18, pretrained: true" (the defaults), and transfer
    # cards "input_size: null" where the backbone was fed 64-pixel images
    assert not set(TRANSFER_ONLY) & set(read().recorded())
    transfer = read(arch="transfer", pretrained=False).recorded()
    assert transfer["backbone"] == "resnet18" and transfer["input_size"] == 64
    assert read(arch="transfer", input_size=96).recorded()["input_size"] == 96
    from_file = read(arch="transfer", backbone=CHECKPOINT_BACKBONE, backbone_checkpoint="m.pt").recorded()
    assert from_file["input_size"] is None  # a checkpoint backbone keeps the images' own size

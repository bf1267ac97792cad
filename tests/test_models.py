import pytest
import torch

from training.augment import BatchAugment
from training.config import Augment, TrainConfig
from training.data import dataset_spec
from training.models import TORCHVISION_BACKBONES, build_model


@pytest.mark.parametrize("flag,outputs", [
    ("mnist", 10), ("pneumoniamnist", 2), ("retinamnist", 5), ("chestmnist", 14), ("pathmnist", 9),
    ("organmnist3d", 11), ("adrenalmnist3d", 2),
])
def test_cnn_takes_raw_uint8_in_dataset_layout(flag, outputs):
    spec = dataset_spec(flag)
    cfg = TrainConfig(name="t", dataset=flag, widths=[8, 16])
    model = build_model(spec, cfg).eval()
    x = torch.randint(0, 256, (3, *spec.image_shape), dtype=torch.uint8)
    assert model(x).shape == (3, outputs)


@pytest.mark.parametrize("backbone", sorted(TORCHVISION_BACKBONES))
def test_torchvision_backbones_adapt_grey_and_rgb_inputs(backbone):
    for flag in ("pneumoniamnist", "retinamnist"):
        spec = dataset_spec(flag)
        cfg = TrainConfig(name="t", dataset=flag, arch="transfer", backbone=backbone, pretrained=False,
                          input_size=32)
        model = build_model(spec, cfg).eval()
        x = torch.randint(0, 256, (2, *spec.image_shape), dtype=torch.uint8)
        assert model(x).shape == (2, spec.num_outputs)
        assert model.preprocess(x).shape == (2, 3, 32, 32)


def test_transfer_from_a_local_torchvision_state_dict(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(TORCHVISION_BACKBONES["resnet18"].build(weights=None).state_dict(), path)
    cfg = TrainConfig(name="t", dataset="pneumoniamnist", arch="transfer", backbone="resnet18",
                      backbone_checkpoint=str(path))
    assert build_model(dataset_spec("pneumoniamnist"), cfg)(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape == (1, 2)


def test_a_state_dict_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(TORCHVISION_BACKBONES["mobilenet_v3_small"].build(weights=None).state_dict(), path)
    cfg = TrainConfig(name="t", dataset="pneumoniamnist", arch="transfer", backbone="resnet18",
                      backbone_checkpoint=str(path))
    with pytest.raises(ValueError, match="is not a resnet18 state dict"):
        build_model(dataset_spec("pneumoniamnist"), cfg)


def test_a_3d_model_is_refused_as_the_backbone_of_a_2d_one():
    volumes = build_model(dataset_spec("organmnist3d"), TrainConfig(name="v", dataset="organmnist3d", widths=[8, 16]))
    cfg = TrainConfig(name="t", dataset="pneumoniamnist", arch="transfer", backbone="checkpoint")
    with pytest.raises(ValueError, match="3D model; transfer backbones are 2D"):
        build_model(dataset_spec("pneumoniamnist"), cfg, volumes)


def test_highpass_removes_a_colour_cast_and_keeps_detail():
    cfg = TrainConfig(name="t", dataset="retinamnist", widths=[8, 16], highpass=1.5)
    pre = build_model(dataset_spec("retinamnist"), cfg).preprocess
    image = torch.randint(60, 160, (1, 28, 28, 3), dtype=torch.uint8)
    tinted = image + torch.tensor([40, 10, 0], dtype=torch.uint8)  # a camera's tint: the same offset everywhere
    torch.testing.assert_close(pre(tinted), pre(image), atol=1e-5, rtol=0)
    assert pre(image).abs().mean() > 0.1  # the pixel-to-pixel detail is still there
    with pytest.raises(ValueError, match="2D"):
        build_model(dataset_spec("organmnist3d"), TrainConfig(name="t", dataset="organmnist3d", highpass=1.5))


def test_3d_transfer_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="2D"):
        build_model(dataset_spec("organmnist3d"), TrainConfig(name="t", dataset="organmnist3d", arch="transfer"))


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 28, 28), (4, 1, 28, 28, 28)])
def test_batch_augment_keeps_shape_and_differs_per_sample(shape):
    aug = BatchAugment(Augment(translate=0.1, rotate=15, scale=0.1, hflip=True))
    x = torch.rand(1, *shape[1:]).expand(shape).contiguous()
    y = aug(x)
    assert y.shape == x.shape
    assert not torch.allclose(y[0], y[1])  # per-sample parameters
    assert not BatchAugment(Augment()).active


def test_brightness_contrast_jitter_is_per_sample_and_keeps_structure():
    aug = BatchAugment(Augment(brightness=0.1, contrast=0.2))
    assert aug.active
    x = torch.rand(1, 3, 28, 28).expand(8, 3, 28, 28).contiguous()
    y = aug(x)
    assert y.shape == x.shape and not torch.allclose(y[0], y[1])
    # an affine change of intensity per sample: each output is perfectly correlated with its input
    for i in range(len(x)):
        corr = torch.corrcoef(torch.stack([x[i].flatten(), y[i].flatten()]))[0, 1]
        assert corr > 0.9999
    shift = (y - x).mean(dim=(1, 2, 3)).abs().max()
    assert shift <= 0.1 * (x.amax() - x.amin()) + 1e-6


def test_imagenet_weights_missing_offline_are_one_clear_error_before_any_data(tmp_path, monkeypatch):
    # an outside probe: with downloads off, torchvision fetched the weights anyway and failed in a 40-frame traceback
    from urllib.error import URLError

    from training.models import imagenet_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fetched = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: fetched.append(url))
    with pytest.raises(ValueError, match=r"resnet18 ImageNet weights are not cached and downloads are off .* put "
                                         r"https://download.pytorch.org/models/resnet18-\w+\.pth at "
                                         + str(tmp_path / "hub" / "checkpoints")):
        imagenet_weights("resnet18", download=False)
    assert not fetched
    imagenet_weights("resnet18", download=True)
    assert fetched and fetched[0].endswith(".pth")

    def unreachable(url, **kw):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    with pytest.raises(ValueError, match=r"could not download the resnet18 ImageNet weights .*--set pretrained=false"):
        imagenet_weights("resnet18", download=True)

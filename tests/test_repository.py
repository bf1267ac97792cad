"""Model repository behaviour without a server: device selection, versions, broken models."""

import shutil

import onnxruntime as ort
import pytest

from serving.errors import ModelNotFound, ModelNotReady
from serving.repository import DeviceError, ModelRepository, providers_for
from serving.settings import Settings
from tests.conftest import EXPORTS


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_requested_without_a_cuda_provider_fails_at_start_with_a_clear_message(tmp_path):
    with pytest.raises(DeviceError, match="CNNSERVE_DEVICE=cuda but onnxruntime offers no CUDA provider"):
        ModelRepository(Settings(model_dir=tmp_path, device="cuda"))
    assert providers_for("auto") == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="auto, cpu or cuda"):
        providers_for("tpu")


def test_versions_latest_and_lookup_errors(tmp_path):
    shutil.copytree(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "1")
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu"))
    assert repo.scan() == ["loaded mnist-cnn/1"] and repo.ready
    assert repo.get("mnist-cnn").version == 1 and repo.get("mnist-cnn", "1").version == 1
    with pytest.raises(ModelNotFound, match="version 7 not found"):
        repo.get("mnist-cnn", 7)
    (tmp_path / "mnist-cnn" / "2").mkdir()  # a version without files: reported, the others serve
    assert repo.scan() == ["failed mnist-cnn/2"]
    with pytest.raises(ModelNotReady, match=r"model card .* is missing"):
        repo.get("mnist-cnn", 2)
    assert repo.get("mnist-cnn").version == 1
    shutil.rmtree(tmp_path / "mnist-cnn" / "2")
    assert repo.scan() == ["removed mnist-cnn/2"]
    repo.close()

"""Inference batches sized by what the model makes of an image: large inputs run in small batches, results unchanged."""

import numpy as np
import torch

import training.evaluate as evaluate
from training.config import TrainConfig
from training.data import dataset_spec
from training.evaluate import inference_batch_size, largest_activation, onnx_largest_activation
from training.export import export_onnx
from training.models import build_model


def test_a_3d_model_at_64_runs_in_batches_that_fit_a_small_machine():
    """An outside probe: the whole test split of 64^3 volumes at once asked for 5 GB for one activation."""
    spec = dataset_spec("adrenalmnist3d", 64)
    model = build_model(spec, TrainConfig(name="v", dataset="adrenalmnist3d", size=64, widths=[16, 32])).eval()
    per_volume = largest_activation(model, torch.zeros((1, 64, 64, 64), dtype=torch.uint8))
    assert per_volume >= 16 * 64**3  # the first block's output, not the input
    batch = inference_batch_size(per_volume, 512)
    assert batch * per_volume * 4 <= 256 * 2**20 and batch >= 1
    assert inference_batch_size(32 * 28 * 28, 512) == 512  # a small 2D model keeps eval_batch_size


def test_smaller_batches_give_the_same_predictions_in_torch_and_onnx(tmp_path, monkeypatch):
    spec = dataset_spec("pneumoniamnist")
    model = build_model(spec, TrainConfig(name="p", dataset="pneumoniamnist", widths=[8, 16])).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    export_onnx(model, spec, tmp_path / "model.onnx")
    per_image = onnx_largest_activation(tmp_path / "model.onnx", (28, 28))
    assert per_image == largest_activation(model, images[:1]) == 8 * 28 * 28  # both ways of finding it agree
    whole_torch = evaluate.predict_logits(model, images)
    whole_onnx = evaluate.predict_onnx(tmp_path / "model.onnx", images.numpy())
    batches = []
    monkeypatch.setattr(evaluate, "ACTIVATION_BUDGET", 7 * per_image)  # 7 images a batch
    run = model.forward
    monkeypatch.setattr(model, "forward", lambda x: batches.append(len(x)) or run(x))
    torch.testing.assert_close(evaluate.predict_logits(model, images), whole_torch)
    assert batches[1:] == [7] * 5 + [5]  # after the one-image probe
    import onnxruntime as ort

    session_run, onnx_batches = ort.InferenceSession.run, []

    def recording_run(self, outputs, feed, *args, **kwargs):
        onnx_batches.append(len(feed["images"]))
        return session_run(self, outputs, feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", recording_run)
    np.testing.assert_allclose(evaluate.predict_onnx(tmp_path / "model.onnx", images.numpy()), whole_onnx, atol=1e-6)
    assert onnx_batches == [7] * 5 + [5]

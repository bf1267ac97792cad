"""cnnserve training: data, models, train loop, evaluation, reports and ONNX export."""

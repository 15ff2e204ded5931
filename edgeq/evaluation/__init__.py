"""Task evaluation through ONNX Runtime or PyTorch: GLUE tasks and their dev data, official metrics, scoring."""

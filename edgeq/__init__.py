"""edgeq: 4-bit ONNX models of Hugging Face encoders for ONNX Runtime, with the k most salient
weights of every Linear kept exact in FP32."""

__version__ = "0.1.0"

"""Everything that touches ONNX graphs: export, the MatMulNBits rewrite, reading plans back."""

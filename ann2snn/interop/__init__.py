"""Other tools' formats: ONNX export and SpikingJelly conversion in both directions."""

"""Export RainDiffusion checkpoints to verified ONNX and TensorRT engines."""

"""RainDiffusion training (PyTorch): the model, Algorithm 1 and the reference sampler."""

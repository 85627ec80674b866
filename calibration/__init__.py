"""INT8 calibration of the fused DDIM step (timestep-aware, Q/DQ)."""

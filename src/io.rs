//! File formats: numpy `.npy` in, safetensors out (written atomically).

"""Universal checkpoints: JSON manifest + safetensors payloads on any pyarrow filesystem."""

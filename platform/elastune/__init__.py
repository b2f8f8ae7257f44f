"""Elastune: elastic distributed training and tuning on Ray.

Training stays what the job spec says at any world size: the same global batch and gradient
scale, every sample read once per epoch, randomness tied to samples, learning rate a function
of samples seen. See DESIGN.md for the map.
"""

__version__ = "0.1.0"

"""fedsam: federated learning with sharpness-aware local optimizers, on Flower."""

__version__ = "0.1.0"

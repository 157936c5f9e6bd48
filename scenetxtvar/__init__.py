"""scenetxtvar: controllable next-scale autoregressive scene-text generation (CAR on a frozen Infinity)."""

__version__ = "0.1.0"

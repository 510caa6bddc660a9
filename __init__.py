"""marnet: image classifiers aligned with training-only text on a two-stage feature cache."""

__version__ = "0.1.0"

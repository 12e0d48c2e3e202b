"""normbench: measure what normalization layers really do."""

__version__ = "0.1.0"

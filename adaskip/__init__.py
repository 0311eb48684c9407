"""adaskip: training-free sublayer skipping (AdaSkip, AAAI'25) as a deployable engine toolchain."""

__version__ = "0.1.0"

"""MCIS: Mining Cross-Image Semantics for weakly supervised semantic segmentation."""

__version__ = "0.1.0"

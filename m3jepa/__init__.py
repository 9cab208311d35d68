"""m3jepa: M3-JEPA multimodal alignment on cached encoder features."""

__version__ = "0.1.0"

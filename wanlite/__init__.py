"""wanlite: distil Wan 2.2 T2V-A14B into a small Wan-architecture text-to-image model."""

__version__ = "0.1.0"

"""llmtune: domain material to an evaluated, published adapter."""

__version__ = "0.1.0"

"""llmopt: declarative recipes from a base causal LM to a quantized, measured, servable artifact."""

__version__ = "0.1.0"

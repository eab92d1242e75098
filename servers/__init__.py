"""The model-server runtime and one module per model kind."""

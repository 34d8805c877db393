"""DynFocus inference engine: EVA ViT-g + Q-Former + DynFocus connector + LLaMA-family LLM."""
__version__ = "0.1.0"

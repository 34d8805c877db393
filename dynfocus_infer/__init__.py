"""DynFocus inference engine: EVA ViT-g + Q-Former + DynFocus connector + LLaMA-family LLM.

    from dynfocus_infer import LLM, SamplingParams     # vLLM's names; AsyncLLM for asyncio servers
"""
__version__ = "0.1.0"

_EXPORTS = {"LLM": "engine", "SamplingParams": "sampling", "AsyncLLM": "core.async_llm",
            "RequestOutput": "outputs", "CompletionOutput": "outputs", "Request": "outputs", "Logprob": "sampling"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Imported on first use, so `import dynfocus_infer` (the CLI's argument parsing) stays free of torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dynfocus_infer' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

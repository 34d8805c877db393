"""Engine core v2 (DESIGN.md 10): sequences, the block manager, the scheduler, the model runner, the engine loop,
incremental detokenisation and the asyncio front end. `engine.LLM` and `core.async_llm.AsyncLLM` run on it."""

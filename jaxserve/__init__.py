"""jaxserve: an LLM serving engine on JAX/XLA (paged KV cache, continuous batching, OpenAI server)."""
from jaxserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def _configure_logging() -> None:
    """JAXSERVE_LOGGING_LEVEL (like vLLM's VLLM_LOGGING_LEVEL): INFO shows the engine's start-up lines (KV cache
    size and why, compiles, the program store) in offline runs and scripts. Unset: Python's defaults (warnings
    only) unless the program configured logging itself; the server configures its own (--uvicorn-log-level)."""
    import logging
    import os
    level = os.environ.get("JAXSERVE_LOGGING_LEVEL", "").strip().upper()
    if not level:
        return
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"JAXSERVE_LOGGING_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    logger = logging.getLogger("jaxserve")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # Silent once the program configures the root logger (the server does): its handler prints the record.
        handler.addFilter(lambda record: not logging.getLogger().handlers)
        logger.addHandler(handler)


_configure_logging()


def __getattr__(name):
    # LLM pulls in JAX; keep `import jaxserve` light for the scheduler's pure-Python users.
    if name == "LLM":
        from jaxserve.llm import LLM
        return LLM
    raise AttributeError(name)

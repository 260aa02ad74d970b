"""jaxserve: an LLM serving engine on JAX/XLA (paged KV cache, continuous batching, OpenAI server)."""
from jaxserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # LLM pulls in JAX; keep `import jaxserve` light for the scheduler's pure-Python users.
    if name == "LLM":
        from jaxserve.llm import LLM
        return LLM
    raise AttributeError(name)

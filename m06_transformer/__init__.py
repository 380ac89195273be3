"""The GPT from module 06, used as the model that module 07 trains."""
from .model import GPT, GPTConfig, create_gpt_tiny

__all__ = ["GPT", "GPTConfig", "create_gpt_tiny"]

"""The GPT from module 06, used as the model that module 07 trains."""
from .model import GPT, GPTConfig, check_decoding, create_gpt_tiny, next_token_probs

__all__ = ["GPT", "GPTConfig", "create_gpt_tiny", "next_token_probs", "check_decoding"]

"""Text conditioning: a frozen text encoder (tokenizer + transformer) and prompt sets."""

from .encoder import TextEncoder, load_text_encoder
from .prompts import PromptSet, caption_prompts, read_prompts

__all__ = ["PromptSet", "TextEncoder", "caption_prompts", "load_text_encoder", "read_prompts"]

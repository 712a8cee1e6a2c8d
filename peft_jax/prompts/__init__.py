"""Discrete prompt search at the input tap: `autoprompt` (AutoPrompt, Shin et al. 2020).

Example:
    >>> from peft_jax import prompts
    >>> prompts.AutoPromptConfig(num_tokens=5, steps=20).candidates_per_step
    10
"""

from peft_jax.prompts.autoprompt import AutoPromptConfig, AutoPromptResult, search

__all__ = ["AutoPromptConfig", "AutoPromptResult", "search"]

"""Architectures codellm runs, keyed by what a Hugging Face `config.json` says it is.

An `Architecture` is everything the checkpoint code needs to know about one model family: how to read and
write its config, which module to build, and how its tensor names map to ours. `checkpoint.py` is generic
over them: adding a family (the CodeT5+ encoder-decoder next) is a new module here plus one `register`
call, with no edit to the Llama code. A config that matches no family gets one error listing those that
exist.
"""

from codellm.arch import llama, t5  # noqa: F401 - registers the built-in families
from codellm.arch.registry import Architecture, from_hf_config, of_model, register, supported

__all__ = ["Architecture", "from_hf_config", "of_model", "register", "supported"]

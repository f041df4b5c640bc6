"""codellm: a self-hostable implementation of the Code Llama system."""

__version__ = "0.1.0"

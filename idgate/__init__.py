"""idgate: an identity-aware gateway for LLM and tool access."""

__version__ = "0.1.0"

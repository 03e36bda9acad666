"""mpagent: a credential agent for Maskinporten."""

__version__ = "0.1.0"

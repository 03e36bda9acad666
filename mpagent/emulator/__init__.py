"""The Maskinporten emulator, a product of its own: `server` (real HTTP on loopback), `rules`
(Maskinporten's grant rules as pure functions) and `pki` (the throwaway test PKI for the demo
and the tests). It checks certificates with its own code, never with `mpagent.keys`: it
emulates the other side of the exchange.
"""

from mpagent.emulator.server import Emulator

__all__ = ["Emulator"]

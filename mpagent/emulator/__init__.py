"""The Maskinporten emulator, a product of its own: `server` (real HTTP on loopback), `rules`
(Maskinporten's grant rules as pure functions), `admin` (Digdir's self-service API for a
client's keys: the key sets, their rules and propagation, pure), `altinn` (Altinn 3's token
exchange and which organisations have a system user for a client, pure) and `pki` (the
throwaway test PKI for the demo and the tests). It checks certificates with its own code, never with
`mpagent.keys`: it emulates the other side of the exchange.
"""

from mpagent.emulator.server import Emulator

__all__ = ["Emulator"]

"""Byzantine attacks for the fault harness (``faults: {round: {client: "<name>[:<param>]"}}``).

``ATTACKS[name](byzantine, honest, reference, param, rng)`` returns the states the Byzantine
clients upload instead of their honest ones: ``byzantine`` and ``honest`` map client ids to the
states those clients trained this round (the attacker is omniscient: it sees every honest
update), ``reference`` is the global state the round started from, ``param`` the number after the
colon (or None) and ``rng`` a ``numpy.random.Generator`` derived from (seed, round, attempt).
``smartfed.federated.faults.FaultInjectingGrid`` calls them on the replies before the strategy
sees any.
"""

ATTACKS = {}

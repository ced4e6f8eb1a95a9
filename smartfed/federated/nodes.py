"""Which node is which client: the setup handshake that maps client ids (partition ids) to the
nodes of a grid.

A node is sent the setup query (the run configuration as JSON) and answers with the partition it
holds and its pool's fingerprint. ``NodeMap.connect`` refuses a node whose reply is unusable or
names another pool than the server's. Nodes that claim one partition cannot be told apart by the
server: all are refused (``contested``), and that client is dropped from every round it is
sampled in. A partition no node claims, or fewer than ``min_clients`` mapped clients, stops the
run here.

``listed`` closes the door on strangers: the node ids the operator listed for the run (from
``flwr supernode register``). Only those are waited for and sent the setup query; any other node
connected to the SuperLink (someone who registered a key of their own) is ignored and cannot
claim, or contest, a partition.
"""

import time
from logging import INFO, WARNING

from flwr.app import Message, MessageType
from flwr.common import log

from smartfed.federated.protocol import NODE, NUM_PARTITIONS, PARTITION_ID, POOL, POOL_FINGERPRINT, setup_content

POLL_S = 0.5


def last_line(reason):
    """The last non-empty line of a Flower error reason (a whole traceback, ending on the
    exception's message); the full text goes to the log."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def _wait_for_nodes(grid, wanted, *, listed, wait_s):
    """The node ids to set up: every connected node (or, with ``listed``, the listed ones) once
    ``wanted`` of them are connected; TimeoutError after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        connected = set(grid.get_node_ids())
        nodes = sorted(connected & set(listed)) if listed else sorted(connected)
        if len(nodes) >= wanted:
            strangers = sorted(connected - set(listed)) if listed else []
            if strangers:
                log(INFO, "SmartFed setup: ignored nodes %s, not listed in the run config's nodes", strangers)
            return nodes
        if time.monotonic() > deadline:
            what = f"of the listed nodes {sorted(listed)} " if listed else ""
            raise TimeoutError(f"{len(nodes)} SuperNode(s) {what}connected after {wait_s} s, "
                               f"federation.num_clients needs {wanted}")
        time.sleep(POLL_S)


class NodeMap:
    """Client id -> node id of one run, and the partitions whose nodes were refused."""

    def __init__(self):
        self.clients = {}
        self.contested = {}  # client id -> the refused nodes that all claimed it

    def node_of(self, client_id):
        return self.clients.get(client_id)

    def client_by_node(self, client_ids=None):
        """node id -> client id of ``client_ids`` (default: every mapped client)."""
        wanted = self.clients if client_ids is None else [c for c in client_ids if c in self.clients]
        return {self.clients[c]: c for c in wanted}

    def contested_reason(self, client_id):
        return {"client": client_id, "reason": f"no node: nodes {self.contested[client_id]} all claimed this "
                "partition and were refused at setup"}

    def connect(self, grid, *, num_clients, min_clients, setup_json, pool_fingerprint, wait_s, reply_timeout_s,
                listed=()):
        """Wait up to ``wait_s`` for ``num_clients`` nodes (of ``listed`` when given), send each
        the setup query (replies awaited up to ``reply_timeout_s``: a node's first reply builds
        its model, which a loaded machine takes long over) and map partitions to nodes; returns
        ``clients``."""
        node_ids = _wait_for_nodes(grid, len(listed) or num_clients, listed=listed, wait_s=wait_s)
        replies = list(grid.send_and_receive(
            [Message(setup_content(setup_json), node_id, MessageType.QUERY) for node_id in node_ids],
            timeout=reply_timeout_s,
        ))
        claims, problems = {}, []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if node_id not in node_ids:
                continue
            problem, partition_id = _setup_problem(reply, num_clients, pool_fingerprint)
            if problem is not None:
                problems.append(f"node {node_id}: {problem}")
            else:
                claims.setdefault(partition_id, []).append(node_id)
        clients, contests = {}, []
        self.contested = {}
        for partition_id, nodes in sorted(claims.items()):
            if len(nodes) == 1:
                clients[partition_id] = nodes[0]
            else:
                nodes = sorted(nodes)
                self.contested[partition_id] = nodes
                contests.append(f"nodes {', '.join(map(str, nodes[:-1]))} and {nodes[-1]} both hold "
                                f"partition-id {partition_id}")
        problems = contests + problems
        missing = sorted(set(range(num_clients)) - set(claims))
        if missing or len(clients) < min_clients:
            raise RuntimeError(
                f"cannot map federation.num_clients={num_clients} clients onto nodes {node_ids}: "
                f"{'; '.join(problems) or 'no problem reported'}; partitions without a node: {missing} "
                f"({len(replies)} of {len(node_ids)} nodes replied; each needs --node-config "
                f"'{PARTITION_ID}=I {NUM_PARTITIONS}={num_clients}')"
            )
        for problem in problems:
            log(WARNING, "SmartFed setup: refused %s", problem)
        self.clients = clients
        return clients


def _setup_problem(reply, num_clients, pool_fingerprint):
    """(why the setup reply is unusable or None, the partition it claims)."""
    if reply.has_error():
        log(WARNING, "SmartFed setup: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
        return last_line(reply.error.reason), None
    try:
        partition_id = reply.content.metric_records[NODE][PARTITION_ID]
        fingerprint = reply.content.config_records[POOL][POOL_FINGERPRINT]
    except KeyError as error:
        return f"setup reply without {error}", None
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < num_clients:
        return f"partition-id {partition_id!r:.40} outside [0, {num_clients})", None
    if fingerprint != pool_fingerprint:
        return (f"pool fingerprint {str(fingerprint)[:16]} differs from the server's {pool_fingerprint[:16]}",
                None)
    return None, partition_id

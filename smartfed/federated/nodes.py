"""Which node is which client: the setup handshake that maps client ids (partition ids) to the
nodes of a grid.

A node is sent the setup query (the run configuration as JSON) and answers with the partition it
holds and its pool's fingerprint. ``NodeMap.connect`` refuses a node whose reply is unusable or
names another pool than the server's. Nodes that claim one partition cannot be told apart by the
server: all are refused (``contested``), and that client is dropped from every round it is
sampled in. So is a partition no node holds (its node's setup reply was an error, e.g. a
``data-path`` that does not exist on it, or never came): the run goes on without it while
``min_clients`` are mapped, and stops here with fewer. Where each client holds its own data the
setup reply also declares the node's example count (``declared``), the only count the server has.

``listed`` closes the door on strangers: the node ids the operator listed for the run (from
``flwr supernode register``). Only those are waited for and sent the setup query; any other node
connected to the SuperLink (someone who registered a key of their own) is ignored and cannot
claim, or contest, a partition.
"""

import time
from logging import INFO, WARNING

from flwr.app import Message, MessageType
from flwr.common import log

from smartfed.federated.messages import NUM_EXAMPLES
from smartfed.federated.protocol import NODE, NUM_PARTITIONS, PARTITION_ID, POOL, POOL_FINGERPRINT, setup_content
from smartfed.federated.server import WIRE_INT_LIMIT, shown

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
        self.unclaimed = ""  # why some partitions have no node: the setup problems, for their drop reasons
        self.declared = {}  # client id -> the example count its node declared at setup

    def node_of(self, client_id):
        return self.clients.get(client_id)

    def client_by_node(self, client_ids=None):
        """node id -> client id of ``client_ids`` (default: every mapped client)."""
        wanted = self.clients if client_ids is None else [c for c in client_ids if c in self.clients]
        return {self.clients[c]: c for c in wanted}

    def absent_reason(self, client_id):
        """The drop record of a client without a node."""
        if client_id in self.contested:
            return {"client": client_id, "reason": f"no node: nodes {self.contested[client_id]} all claimed this "
                    "partition and were refused at setup"}
        return {"client": client_id, "reason": f"no node holds this partition ({self.unclaimed})"}

    def connect(self, grid, *, num_clients, min_clients, setup_json, pool_fingerprint, wait_s, reply_timeout_s,
                listed=(), declared_counts=False):
        """Wait up to ``wait_s`` for ``num_clients`` nodes (of ``listed`` when given), send each
        the setup query (replies awaited up to ``reply_timeout_s``: a node's first reply builds
        its model, which a loaded machine takes long over) and map partitions to nodes; returns
        ``clients``. ``declared_counts``: every reply must declare its example count."""
        node_ids = _wait_for_nodes(grid, len(listed) or num_clients, listed=listed, wait_s=wait_s)
        replies = list(grid.send_and_receive(
            [Message(setup_content(setup_json), node_id, MessageType.QUERY) for node_id in node_ids],
            timeout=reply_timeout_s,
        ))
        claims, problems, counts = {}, [], {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if node_id not in node_ids:
                continue
            problem, partition_id = _setup_problem(reply, num_clients, pool_fingerprint)
            if problem is None and declared_counts:
                problem, counts[node_id] = _declared_count(reply)
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
        answered = f"{len(replies)} of {len(node_ids)} nodes replied"
        if len(clients) < min_clients:
            raise RuntimeError(
                f"cannot map federation.min_clients={min_clients} of {num_clients} clients onto nodes {node_ids}: "
                f"{'; '.join(problems) or 'no problem reported'}; partitions without a node: {missing} "
                f"({answered}; each needs --node-config '{PARTITION_ID}=I {NUM_PARTITIONS}={num_clients}')"
            )
        for problem in problems:
            log(WARNING, "SmartFed setup: refused %s", problem)
        if missing:
            log(WARNING, "SmartFed setup: partitions %s have no node; the run goes on without them", missing)
        self.unclaimed = f"{'; '.join(problems) or 'no problem reported'}; {answered}"
        self.clients = clients
        self.declared = {client: counts[node] for client, node in clients.items() if node in counts}
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


def _declared_count(reply):
    """(why the declared example count is unusable or None, the count)."""
    count = reply.content.metric_records[NODE].get(NUM_EXAMPLES)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count < WIRE_INT_LIMIT:
        return f"{NUM_EXAMPLES} {shown(count)} is not an int in [1, 2^63)", None
    return None, count

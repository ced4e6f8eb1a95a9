"""Grids that wrap a grid: ``GridWrapper`` hands every call to the grid inside; its subclasses
change what passes through (``smartfed.federated.faults.FaultInjectingGrid``) or how the replies
are waited for (``PollingGrid``).

``PollingGrid`` is what the ServerApp drives over Flower's grid: it pushes a round's messages,
then pulls the replies every ``poll_s`` (Flower's own ``send_and_receive`` sleeps 3 s between
pulls, a floor on every round of a deployment) and logs each reply as it arrives, so that
``flwr run --stream`` shows a round's progress, not only its end.
"""

import time
from logging import INFO

from flwr.common import log
from flwr.serverapp import Grid


class GridWrapper(Grid):
    """A Grid that hands every call to ``inner`` (any Grid); ``close`` and ``with`` reach it too."""

    def __init__(self, inner):
        self.inner = inner

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages):
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self.inner.send_and_receive(messages, timeout=timeout)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class PollingGrid(GridWrapper):
    """``inner`` with replies pulled every ``poll_s`` and each one logged as it arrives."""

    def __init__(self, inner, *, poll_s=0.2):
        super().__init__(inner)
        self.poll_s = poll_s

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        what = f"{messages[0].metadata.message_type} {messages[0].metadata.group_id}".strip()
        pending = set(self.inner.push_messages(messages))
        total, replies = len(pending), []
        started = time.monotonic()
        while pending:
            for reply in self.inner.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                log(INFO, "SmartFed %s: %d/%d replies after %.1f s (node %d%s)", what, len(replies), total,
                    time.monotonic() - started, reply.metadata.src_node_id, ", an error" if reply.has_error() else "")
            if not pending or (timeout is not None and time.monotonic() - started >= timeout):
                break
            time.sleep(self.poll_s)
        return replies

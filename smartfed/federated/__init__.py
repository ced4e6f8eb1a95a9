"""The round engine: SmartFed's server as a Flower strategy, its clients, and the grids between.

- ``strategy``: ``SmartFedStrategy`` (sampling, messages and byte accounting, screening,
  aggregation, EEQA, evaluation, checkpoints, ``metrics.jsonl``) and its one round loop
- ``grid``: ``InProcessGrid``, the embedded transport (Flower's own grids are the others)
- ``client``: the client handlers a Flower ClientApp and the in-process grid both call
- ``trainer``: local training and evaluation in PyTorch; ``methods``: what a method is
- ``server``: state, sampling, screening, FedAvg and quota updates, free of any transport
- ``messages`` / ``protocol``: what travels; ``data``, ``partition``: examples and their split
- ``accounting``, ``checkpoint``, ``seeding``

It imports no task, experiment, baseline or CLI: the experiment layer
(``smartfed.experiments.runs``) builds the method, the model and the data and hands them in.
"""

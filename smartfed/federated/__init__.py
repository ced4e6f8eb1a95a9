"""The round engine: SmartFed's server as a Flower strategy composed of pieces, its clients, the
grids between, and the run folder that records it (docs/design.md §6.3).

- ``strategy``: ``SmartFedStrategy`` (sampling, messages and byte accounting, screening, EEQA,
  evaluation); its pieces ``nodes`` (which node is which client), ``aggregation`` (norm bound,
  weighted or central-DP aggregation), ``secure_round`` (SecAgg+); ``driver``: the round loop
- ``run_dir``: ``RunDir``, the one writer of a run folder; ``checkpoint``: the checkpoint format
- ``grid``: ``InProcessGrid``, the embedded transport (Flower's own grids are the others);
  ``grid_wrappers`` and ``faults``: grids around any grid (progress, fault and attack injection)
- ``client``: the client handlers a Flower ClientApp and the in-process grid both call
- ``trainer``: local training and evaluation in PyTorch; ``methods``: what a method is
- ``server``: state, sampling, structural checks, FedAvg and quota updates, free of any transport;
  ``screening``: every check of a reply
- ``messages`` / ``protocol``: what travels; ``data``, ``partition``: examples and their split
- ``flower_compat``: every Flower internal the engine uses; ``accounting``, ``seeding``,
  ``privacy``, ``secagg``, ``robust``, ``attacks``

It imports no task, experiment, baseline or CLI: the experiment layer
(``smartfed.experiments.runs``) builds the method, the model and the data and hands them in.
"""

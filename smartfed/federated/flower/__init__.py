"""SmartFed as a Flower app: ``client_app.app`` (ClientApp) and ``server_app.app`` (ServerApp).

Both only translate Flower messages (``messages``) to and from the protocol objects of
``smartfed.federated.protocol``; training, aggregation, EEQA quotas, evaluation and checkpoints
are the same code as the in-process simulation. The app folder ``flower_app/`` points at these
objects; docs/flower.md shows how to run it. Importing this package needs ``flwr``
(``pip install -e ".[flower]"``).
"""

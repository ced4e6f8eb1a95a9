"""Client-side training and evaluation in plain PyTorch: what every client of the federation
runs, whatever carries its messages (``smartfed.federated.client``).

``ClientTrainer`` is handed the method and the model that method built (frozen base plus pool,
made by the experiment layer) ONCE; each ``train`` call loads the server's state and quotas into
it, so one instance can serve any number of clients and rounds (in-process, every client in turn).
"""

import contextlib
import copy
import time

import torch

from smartfed.federated.accounting import PeakMemory
from smartfed.federated.protocol import ClientResult


class ClientTimeout(RuntimeError):
    """A client ran past its wall-clock limit (checked after every local step)."""


class ClientTrainer:
    """``method`` and the ``model`` it built (on ``device``); ``label_token_ids`` are the answer
    tokens of the task (one id per label, a tuple of ids per label for several-token answers,
    empty for instruction tuning); ``pool_fingerprint`` names the pool whose experts the state
    indexes. The examples it is handed (``smartfed.federated.data``) say how a batch is drawn,
    what its loss is and how the model is scored."""

    def __init__(self, method, model, *, label_token_ids, pool_fingerprint, device="cpu"):
        self.method = method
        self.model = model
        self.label_token_ids = tuple(label_token_ids)
        self.pool_fingerprint = pool_fingerprint
        self.device = torch.device(device)
        self._initial_state = self.method.trainable_state(self.model)

    def replica(self) -> "ClientTrainer":
        """This trainer on a deep copy of its model: the same results, no shared tensors. Copy an
        idle model only: a forward in flight leaves its hooks on the modules."""
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model)
        return twin

    def initial_state(self):
        """The trainable state right after building (the server's round-0 global state)."""
        return {name: tensor.clone() for name, tensor in self._initial_state.items()}

    def max_per_matrix(self):
        return self.method.max_per_matrix(self.model)

    def _load(self, state, quotas):
        self.method.load_trainable_state(self.model, {k: v.to(self.device) for k, v in state.items()})
        self.method.apply_quotas(self.model, quotas)

    def _trainable_parameters(self):
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def train(self, instructions, examples, *, time_limit_s=None):
        """Train from ``instructions`` on ``examples`` for ``local_steps`` AdamW steps (a fresh
        optimizer, so nothing but the server's state carries between rounds); returns a
        ``ClientResult``. Raises ``ClientTimeout`` once ``time_limit_s`` is exceeded."""
        if len(examples) == 0:
            raise ValueError("examples must hold at least one example to train on")
        started = time.perf_counter()
        self._load(instructions.state, instructions.quotas)
        named = self._trainable_parameters()
        anchors = [p.detach().clone() for _, p in named] if instructions.fedprox_mu > 0 else None
        optimizer = torch.optim.AdamW(
            [p for _, p in named], lr=instructions.lr, weight_decay=instructions.weight_decay
        )
        generator = torch.Generator().manual_seed(instructions.seed)
        tracker = self.method.importance_tracker(self.model)
        losses, tokens = [], 0
        self.model.train()
        with PeakMemory(self.device) as memory, torch.random.fork_rng(devices=[]):
            torch.manual_seed(instructions.seed)
            with tracker if tracker is not None else contextlib.nullcontext():
                batches = examples.training_batches(instructions.batch_size, instructions.local_steps, generator)
                for step, index in enumerate(batches):
                    loss, fed = examples.training_loss(
                        self.model, index, label_token_ids=self.label_token_ids, device=self.device
                    )
                    memory.sample()
                    objective = loss
                    if anchors is not None:
                        drift = sum(((p - a) ** 2).sum() for (_, p), a in zip(named, anchors))
                        objective = loss + 0.5 * instructions.fedprox_mu * drift
                    optimizer.zero_grad(set_to_none=True)
                    objective.backward()
                    optimizer.step()
                    memory.sample()
                    losses.append(float(loss.detach()))
                    tokens += fed
                    elapsed = time.perf_counter() - started
                    if time_limit_s is not None and elapsed > time_limit_s:
                        raise ClientTimeout(
                            f"timeout: {elapsed:.3f} s after {step + 1} of {instructions.local_steps} "
                            f"local steps exceeds the {time_limit_s} s limit"
                        )
        self.model.eval()
        compute_s = time.perf_counter() - started
        metrics = {
            "loss": sum(losses) / len(losses),
            "final_loss": losses[-1],
            "compute_s": compute_s,
            "step_time_s": compute_s / len(losses),
            "peak_memory_bytes": memory.peak_bytes,
            "peak_memory_source": memory.source,
            "active_flops": self.method.forward_flops_per_token(self.model) * tokens,
            "tokens": tokens,
        }
        return ClientResult(
            state=self.method.trainable_state(self.model),
            num_examples=len(examples),
            importance=None if tracker is None else tracker.stats().to_dict(),
            metrics=metrics,
        )

    @torch.no_grad()
    def evaluate(self, state, quotas, examples, *, batch_size=64, round_index=None, items=False):
        """Scores of the model with ``state`` and ``quotas`` on ``examples``: a dict with
        ``loss``, ``accuracy`` and ``num_examples``, plus what the examples' shape adds
        (instruction: ``perplexity``, and at the rounds its generation settings name
        ``exact_match`` / ``f1`` / ``rouge_l``). ``round_index``: the round being scored (None: a
        standalone evaluation); ``items``: each example's own result too (``items``, see
        smartfed.federated.data)."""
        if len(examples) == 0:
            raise ValueError("examples must hold at least one example to evaluate on")
        self._load(state, quotas)
        self.model.eval()
        return examples.evaluate(self.model, label_token_ids=self.label_token_ids, batch_size=batch_size,
                                 device=self.device, round_index=round_index, items=items)

"""What the engine trains and scores, and its split across clients.

Three kinds of examples, one interface: ``training_batches`` (the index batches of a client's
local steps), ``training_loss`` (one batch's loss and the tokens it fed) and ``evaluate`` (a
metrics dict with at least ``loss``, ``accuracy`` and ``num_examples``; with ``items=True`` also
``items``, each held-out example's own result, the columns ``smartfed evaluate`` keeps).
``ClientTrainer`` runs every method through it, whatever the shape.

- ``Examples``: the built-in tasks. A fixed-length prompt whose answer is one label token
  predicted at the last position; no padding, no mask. Loss is cross-entropy over the whole
  vocabulary there; accuracy is the argmax over the label tokens (exact match within the label set).
- ``ClassificationSequences``: prompts of any length from a file, left-padded with an attention
  mask. With one token per label, scored exactly as ``Examples`` (one forward, logits at the last
  position). With label words of several tokens, each label's answer is scored by its full
  log-likelihood, the sum of its tokens' log-probabilities given the prompt, not length-normalised:
  that sum is log p(label | prompt), so the argmax is the model's most probable label and one
  token gives today's score exactly. Training and the loss use the correct answer's negative
  log-likelihood (summed over its tokens, averaged over examples), which is the one-token
  cross-entropy when the answer is one token.
- ``InstructionExamples``: prompt + response token ids, left-padded; the loss is the mean
  cross-entropy over the response tokens only. Evaluation: that loss, its perplexity, token
  accuracy (``accuracy``: the share of response tokens predicted exactly, teacher-forced) and, at
  the rounds its ``generation`` settings name, greedy answers scored by exact match, F1 and ROUGE-L.

Left padding keeps every answer at the right end of its row, so the logits of all answers are
the last few positions (``logits_to_keep``): the full [batch, length, vocabulary] logits are never
built. Position ids count real tokens only, so padding changes no result. Training batches of
variable-length examples are drawn by length (``length_bucketed_batches``) so little of a batch
is padding.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from smartfed.federated.evaluation import answer_columns, answer_scores, greedy_generate, left_padded, positions
from smartfed.federated.partition import partition_labels
from smartfed.federated.seeding import STREAM_PARTITION, derived_seed

# Length-sorted pools of this many batches are cut into batches (``length_bucketed_batches``).
BUCKET_BATCHES = 16


def answer_logits(model, input_ids):
    """Logits [B, V] at the answer (last) position."""
    return model(input_ids=input_ids, logits_to_keep=1).logits[:, -1, :]


def answer_loss(logits, labels, label_token_ids):
    targets = torch.as_tensor(label_token_ids, device=logits.device)[labels]
    return F.cross_entropy(logits.float(), targets)


def answer_accuracy_count(logits, labels, label_token_ids):
    index = torch.as_tensor(label_token_ids, device=logits.device)
    return int((logits[:, index].argmax(dim=-1) == labels).sum())


class ClassificationItems:
    """Each example's answer in a classification evaluation, in example order: ``prediction``
    (class id), ``correct`` (0/1) and ``margin`` (the best label's score minus the runner-up's: a
    small margin is an answer another CPU's rounding could flip)."""

    METRIC = "correct"

    def __init__(self, labels):
        self.labels = labels
        count = len(labels)
        self.prediction, self.correct, self.margin = [0] * count, [0] * count, [0.0] * count

    def add(self, index, scores):
        """Rows ``index`` scored ``scores`` [B, K] (one score per label)."""
        top = torch.topk(scores.float(), k=min(2, scores.shape[1]), dim=1).values
        gaps = ((top[:, 0] - top[:, 1]) if top.shape[1] == 2 else top[:, 0]).cpu()
        chosen = scores.argmax(dim=1).cpu()
        for row, example in enumerate(index.tolist()):
            self.prediction[example] = int(chosen[row])
            self.correct[example] = int(chosen[row] == self.labels[example])
            self.margin[example] = float(gaps[row])

    def columns(self):
        return {"metric": self.METRIC, "prediction": self.prediction, "correct": self.correct, "margin": self.margin}


def batch_indices(num_examples, batch_size, generator):
    """A random batch (without replacement within the batch) of example indices."""
    size = min(batch_size, num_examples)
    return torch.randperm(num_examples, generator=generator)[:size]


def length_bucketed_batches(lengths, batch_size, steps, generator, *, pool_batches=BUCKET_BATCHES):
    """``steps`` index batches over examples of ``lengths``: epochs of a random order, each cut
    into pools of ``pool_batches`` batches, each pool sorted by length and cut into batches, the
    batches in random order. Every example appears once per epoch (no example is favoured), and a
    batch holds examples of similar length (little padding)."""
    lengths = torch.as_tensor(lengths)
    count = int(lengths.numel())
    size = min(batch_size, count)
    batches = []
    while len(batches) < steps:
        order = torch.randperm(count, generator=generator)
        epoch = []
        for start in range(0, count, size * pool_batches):
            pool = order[start:start + size * pool_batches]
            pool = pool[torch.argsort(lengths[pool], stable=True)]
            epoch.extend(pool[i:i + size] for i in range(0, len(pool), size))
        # A short batch is kept: dropping it would drop the longest examples of the last pool.
        batches.extend(epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist())
    return batches[:steps]


@dataclass
class Examples:
    input_ids: torch.Tensor  # [M, L], int64; the answer is predicted at the last position
    labels: torch.Tensor  # [M] class ids in [0, num_labels)

    def __len__(self):
        return int(self.labels.shape[0])

    def subset(self, indices):
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Examples(self.input_ids[index], self.labels[index])

    def training_batches(self, batch_size, steps, generator):
        return [batch_indices(len(self), batch_size, generator) for _ in range(steps)]

    def training_loss(self, model, index, *, label_token_ids, device):
        input_ids = self.input_ids[index].to(device)
        labels = self.labels[index].to(device)
        return answer_loss(answer_logits(model, input_ids), labels, label_token_ids), input_ids.numel()

    def evaluate(self, model, *, label_token_ids, batch_size, device, round_index=None, items=False):
        loss_sum, correct = 0.0, 0
        answers = ClassificationItems(self.labels) if items else None
        for start in range(0, len(self), batch_size):
            input_ids = self.input_ids[start:start + batch_size].to(device)
            labels = self.labels[start:start + batch_size].to(device)
            logits = answer_logits(model, input_ids)
            loss_sum += float(answer_loss(logits, labels, label_token_ids)) * len(labels)
            correct += answer_accuracy_count(logits, labels, label_token_ids)
            if answers is not None:
                answers.add(torch.arange(start, start + len(labels)),
                            logits[:, torch.as_tensor(label_token_ids, device=logits.device)])
        metrics = {"loss": loss_sum / len(self), "accuracy": correct / len(self), "num_examples": len(self)}
        return metrics if answers is None else {**metrics, "items": answers.columns()}


@dataclass
class _Padded:
    """Variable-length token sequences stored left-padded: ``input_ids`` [M, W] (each sequence at
    the right end of its row), ``lengths`` [M]; ``groups`` (optional) names each example's source
    (a natural partition's column)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    pad_token_id: int
    groups: np.ndarray = None

    def __len__(self):
        return int(self.lengths.shape[0])

    def _subset_fields(self, index):
        return {"input_ids": self.input_ids[index], "lengths": self.lengths[index], "labels": self.labels[index],
                "groups": None if self.groups is None else self.groups[index.numpy()]}

    def subset(self, indices):
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return replace(self, **self._subset_fields(index))

    def training_batches(self, batch_size, steps, generator):
        return length_bucketed_batches(self.lengths, batch_size, steps, generator)

    def _rows(self, index, device, extra=0):
        """(ids, mask, position ids) of rows ``index``, cut to the longest of them (+ ``extra``)."""
        width = int(self.lengths[index].max()) + extra
        ids = self.input_ids[index, self.input_ids.shape[1] - width:].to(device)
        mask = (torch.arange(width) >= width - self.lengths[index, None]).long().to(device)
        return ids, mask, positions(mask)

    def _sorted_batches(self, batch_size):
        order = torch.argsort(self.lengths, stable=True)
        return [order[i:i + batch_size] for i in range(0, len(self), batch_size)]

    def padding_share(self, batches):
        """The share of the tokens fed in ``batches`` that are padding."""
        fed = sum(len(index) * int(self.lengths[index].max()) for index in batches)
        return 1 - sum(int(self.lengths[index].sum()) for index in batches) / fed


def _stack_left_padded(token_ids, pad_token_id, extra_width=0):
    width = max(len(ids) for ids in token_ids) + extra_width
    ids, _ = left_padded(token_ids, pad_token_id, width=width)
    return ids, torch.as_tensor([len(t) for t in token_ids], dtype=torch.long)


@dataclass
class ClassificationSequences(_Padded):
    """Prompts of any length and their class ids; the answer tokens come from ``label_token_ids``
    (ints: one token per label; tuples: several). With several-token labels ``input_ids`` is
    wide enough for the longest prompt plus the longest answer, so the engine's bound on the
    tokens a batch feeds holds."""

    @classmethod
    def build(cls, token_ids, labels, *, pad_token_id, answer_tokens=1, groups=None):
        ids, lengths = _stack_left_padded(token_ids, pad_token_id, extra_width=answer_tokens - 1)
        return cls(ids, lengths, torch.as_tensor(labels, dtype=torch.long), int(pad_token_id),
                   None if groups is None else np.asarray(groups))

    def _answered(self, index, answers, device):
        """Rows ``index`` followed by ``answers`` (one token tuple per row): (ids, mask, positions,
        answer targets [B, A], answer mask [B, A]); the answers' logits are the last A + 1."""
        ids, mask, _ = self._rows(index, device)
        width = max(len(answer) for answer in answers)
        targets = torch.full((len(answers), width), self.pad_token_id, dtype=torch.long)
        target_mask = torch.zeros((len(answers), width), dtype=torch.long)
        for row, answer in enumerate(answers):
            targets[row, :len(answer)] = torch.as_tensor(answer)
            target_mask[row, :len(answer)] = 1
        targets, target_mask = targets.to(device), target_mask.to(device)
        ids, mask = torch.cat([ids, targets], dim=1), torch.cat([mask, target_mask], dim=1)
        return ids, mask, positions(mask), targets, target_mask

    def _answer_log_likelihood(self, model, index, answers, device):
        """Sum of the log-probabilities of each row's answer tokens given its prompt, [B]."""
        ids, mask, position, targets, target_mask = self._answered(index, answers, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position,
                       logits_to_keep=targets.shape[1] + 1).logits[:, :-1, :]
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        return (log_probs * target_mask).sum(dim=1)

    def _last_logits(self, model, index, device):
        ids, mask, position = self._rows(index, device)
        return model(input_ids=ids, attention_mask=mask, position_ids=position, logits_to_keep=1).logits[:, -1, :]

    def training_loss(self, model, index, *, label_token_ids, device):
        labels = self.labels[index]
        if not isinstance(label_token_ids[0], tuple):
            logits = self._last_logits(model, index, device)
            return answer_loss(logits, labels.to(device), label_token_ids), len(index) * int(self.lengths[index].max())
        answers = [label_token_ids[label] for label in labels.tolist()]
        loss = -self._answer_log_likelihood(model, index, answers, device).mean()
        return loss, len(index) * (int(self.lengths[index].max()) + max(map(len, answers)))

    def label_scores(self, model, index, label_token_ids, device):
        """Log-likelihood of every label's answer for rows ``index``, [B, K] (all K answers of
        all B rows in one forward)."""
        count = len(label_token_ids)
        rows = index.repeat_interleave(count)
        answers = [label_token_ids[k] for _ in range(len(index)) for k in range(count)]
        return self._answer_log_likelihood(model, rows, answers, device).view(len(index), count)

    def evaluate(self, model, *, label_token_ids, batch_size, device, round_index=None, items=False):
        loss_sum, correct = 0.0, 0
        answers = ClassificationItems(self.labels) if items else None
        for index in self._sorted_batches(batch_size):
            labels = self.labels[index].to(device)
            if isinstance(label_token_ids[0], tuple):
                scores = self.label_scores(model, index, label_token_ids, device)
                loss_sum += float(-scores.gather(1, labels[:, None]).sum())
                correct += int((scores.argmax(dim=1) == labels).sum())
            else:
                logits = self._last_logits(model, index, device)
                loss_sum += float(answer_loss(logits, labels, label_token_ids)) * len(index)
                correct += answer_accuracy_count(logits, labels, label_token_ids)
                scores = logits[:, torch.as_tensor(label_token_ids, device=logits.device)]
            if answers is not None:
                answers.add(index, scores)
        metrics = {"loss": loss_sum / len(self), "accuracy": correct / len(self), "num_examples": len(self)}
        return metrics if answers is None else {**metrics, "items": answers.columns()}


@dataclass
class InstructionExamples(_Padded):
    """Prompt + response token ids; ``response_lengths`` [M] counts the response tokens at the
    end of each sequence. ``references`` are the response texts and ``generation`` (a
    ``GenerationSettings``, or None) says when to answer the prompts by generation."""

    response_lengths: torch.Tensor = None
    references: list = field(default=None, repr=False)
    generation: object = None

    @classmethod
    def build(cls, token_ids, prompt_lengths, *, pad_token_id, references=None, generation=None, groups=None):
        ids, lengths = _stack_left_padded(token_ids, pad_token_id)
        prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long)
        response = lengths - prompt_lengths
        if bool((response < 1).any()) or bool((prompt_lengths < 1).any()):
            raise ValueError("every instruction example needs at least one prompt and one response token")
        return cls(ids, lengths, torch.zeros(len(token_ids), dtype=torch.long), int(pad_token_id),
                   None if groups is None else np.asarray(groups), response_lengths=response,
                   references=references, generation=generation)

    def _subset_fields(self, index):
        fields = super()._subset_fields(index)
        fields["response_lengths"] = self.response_lengths[index]
        fields["references"] = None if self.references is None else [self.references[i] for i in index.tolist()]
        return fields

    def _response_nll(self, model, index, device):
        """(summed cross-entropy over the response tokens, correct argmax count, response tokens, tokens fed)."""
        ids, mask, position = self._rows(index, device)
        span = int(self.response_lengths[index].max())
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position,
                       logits_to_keep=span + 1).logits[:, :-1, :].float()
        targets = ids[:, -span:]
        target_mask = (torch.arange(span, device=device) >= span - self.response_lengths[index, None].to(device))
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        nll = (nll.view(targets.shape) * target_mask).sum()
        correct = int(((logits.argmax(dim=-1) == targets) & target_mask).sum())
        return nll, correct, int(target_mask.sum()), ids.numel()

    def training_loss(self, model, index, *, label_token_ids, device):
        nll, _, count, fed = self._response_nll(model, index, device)
        return nll / count, fed

    def prompts(self, index):
        """The prompt token ids of rows ``index`` (each row without its response and padding)."""
        width = self.input_ids.shape[1]
        return [self.input_ids[row, width - int(self.lengths[row]):width - int(self.response_lengths[row])].tolist()
                for row in index.tolist()]

    def evaluate(self, model, *, label_token_ids, batch_size, device, round_index=None, items=False):
        """``items`` (with generation settings): every example's greedy answer and its scores
        (as ``answer_items``), whatever ``max_examples`` says; the aggregate's own answers are
        reused when they cover every example."""
        nll_sum, correct, tokens = 0.0, 0, 0
        for index in self._sorted_batches(batch_size):
            nll, right, count, _ = self._response_nll(model, index, device)
            nll_sum, correct, tokens = nll_sum + float(nll), correct + right, tokens + count
        loss = nll_sum / tokens
        metrics = {"loss": loss, "accuracy": correct / tokens, "perplexity": math.exp(min(loss, 700.0)),
                   "response_tokens": tokens, "num_examples": len(self)}
        if self.generation is None:
            return metrics
        answers = None
        if self.generation.due(round_index):
            answers = self._answers(model, device, self._generated_count())
            metrics.update(self._answers_scored(*answers))
        if items:
            if answers is None or len(answers[0]) < len(self):
                answers = self._answers(model, device, len(self))
            metrics["items"] = self._answer_columns(*answers)
        return metrics

    def _generated_count(self):
        limit = self.generation.max_examples
        return len(self) if limit is None else min(limit, len(self))

    def _answers(self, model, device, count):
        """Greedy answers to the first ``count`` prompts, generated in batches of similar prompt
        length: (the example of each answer, the answers' texts), in the order generated."""
        settings = self.generation
        order = torch.arange(count)
        order = order[torch.argsort(self.lengths[:count] - self.response_lengths[:count], stable=True)]
        rows, predictions = [], []
        for start in range(0, count, settings.batch_size):
            index = order[start:start + settings.batch_size]
            answers = greedy_generate(model, self.prompts(index), max_new_tokens=settings.max_new_tokens,
                                      stop_token_ids=settings.stop_token_ids, pad_token_id=self.pad_token_id,
                                      device=device)
            rows.extend(index.tolist())
            predictions.extend(settings.decode(ids) for ids in answers)
        return rows, predictions

    def _answers_scored(self, rows, predictions):
        scores = answer_scores(predictions, [self.references[i] for i in rows], self.generation.metrics)
        return {**scores, "generated_examples": len(rows)}

    def _answer_columns(self, rows, predictions):
        by_example = [""] * len(self)
        for row, prediction in zip(rows, predictions):
            by_example[row] = prediction
        return {"metric": "exact_match", "prediction": by_example,
                **answer_columns(by_example, self.references, self.generation.metrics)}

    def generated_scores(self, model, device):
        """Greedy answers to the prompts (the first ``max_examples``), scored against the references."""
        return self._answers_scored(*self._answers(model, device, self._generated_count()))

    def answer_items(self, model, device):
        """Every example's greedy answer (``prediction``) and its ``exact_match`` / ``f1`` /
        ``rouge_l`` (those of the generation settings), in example order."""
        if self.generation is None:
            raise ValueError("instruction examples without generation settings have no per-item answers to score")
        return self._answer_columns(*self._answers(model, device, len(self)))


@dataclass
class FederatedData:
    clients: list  # examples per client id (a SuperNode holding its own data: {its id: examples})
    evaluation: object  # held-out examples of the target task for the global model; None: the server holds none
    partitions: list  # indices into the training examples, per client; None: the clients hold their data
    validation: object = None  # held out of the training examples before the split; None: none
    root: object = None  # the server's root set, held out after the validation split; None: none
    held_out: dict = None  # client id -> its own held-out examples; None: a client scores its training examples

    def client_evaluation(self, client_id):
        """The examples client ``client_id`` scores the global state on."""
        return self.held_out[client_id] if self.held_out is not None else self.clients[client_id]


def split_clients(train: Examples, evaluation: Examples, federation, *, seed, validation=None) -> FederatedData:
    """``train`` split across ``federation.num_clients`` clients by label (``federation.partition``:
    Dirichlet(``alpha``) or IID, at least ``min_examples_per_client`` each), deterministic by ``seed``;
    ``validation`` is passed through for the server."""
    parts = partition_labels(
        train.labels.numpy(), federation.num_clients, method=federation.partition, alpha=federation.alpha,
        seed=derived_seed(seed, STREAM_PARTITION), min_per_client=federation.min_examples_per_client,
    )
    return FederatedData(clients=[train.subset(part) for part in parts], evaluation=evaluation, partitions=parts,
                         validation=validation)

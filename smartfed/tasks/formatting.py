"""Prompts and answers as token ids: the two shapes of a file task, cut to a maximum length.

A prompt template (a plain one, or the tokenizer's chat template rendered around a marker) is
split at its content into the text before and after it, and the three parts are encoded
separately: truncation then cuts the content (keeping its start), never the template around it.
A chat ``messages`` column has no single content: its rendered prompt is cut from the left
(keeping the latest turns). An instruction's response keeps at least half the budget.
"""

from dataclasses import dataclass

from smartfed.tasks.files import DatasetError

# Stands for the content while a template is rendered; split out again before encoding.
MARKER = "\u2063SMARTFED_CONTENT\u2063"


def encode(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


@dataclass
class TokenizedSplit:
    """One split of a file task. ``token_ids`` per example: the prompt, then (instruction) the
    response; ``prompt_lengths``: tokens of the prompt; ``labels``: class ids (0 for
    instruction); ``groups``: the partition column's values (None without one); ``references``:
    the response texts (instruction) for scoring generated answers; ``truncated``: how many
    examples were cut to the maximum length."""

    token_ids: list
    prompt_lengths: list
    labels: list
    groups: list = None
    references: list = None
    truncated: int = 0

    def __len__(self):
        return len(self.token_ids)


def render_chat(tokenizer, turns, *, add_generation_prompt):
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja raises its own TemplateError subclasses
        raise DatasetError(f"the tokenizer's chat template failed to render ({str(error).splitlines()[0][:160]})") \
            from None


def has_chat_template(tokenizer):
    return bool(getattr(tokenizer, "chat_template", None))


def template_parts(template_kind, plain_template, tokenizer, field_name):
    """(text before the content, text after it) of the prompt, by a plain template or the chat
    template (one user turn, then the assistant's generation prompt)."""
    if template_kind == "chat":
        rendered = render_chat(tokenizer, [{"role": "user", "content": MARKER}], add_generation_prompt=True)
    else:
        rendered = plain_template.format(**{field_name: MARKER})
    if rendered.count(MARKER) != 1:
        raise DatasetError(f"the {template_kind} template must place the {field_name} exactly once")
    before, after = rendered.split(MARKER)
    return before, after


def chat_answer_parts(tokenizer):
    """(text before, text after) the assistant's answer in the chat template: what rendering the
    answer adds to the generation prompt. A template whose full rendering does not extend its
    generation prompt cannot mark the response and is an error."""
    question = [{"role": "user", "content": "q"}]
    prompt = render_chat(tokenizer, question, add_generation_prompt=True)
    full = render_chat(tokenizer, question + [{"role": "assistant", "content": MARKER}], add_generation_prompt=False)
    if not full.startswith(prompt) or full.count(MARKER) != 1:
        raise DatasetError("the tokenizer's chat template does not render an answer as a continuation of its "
                           "generation prompt, so the response tokens cannot be told apart: use template 'plain'")
    return tuple(full[len(prompt):].split(MARKER))


def resolve_template(kind, tokenizer):
    """"chat" or "plain" for the configured template ``kind`` ("auto": chat when the tokenizer has one)."""
    if kind == "chat" and not has_chat_template(tokenizer):
        raise DatasetError("task.data.template: 'chat', but the tokenizer has no chat template (set template to "
                           "'plain' or 'auto')")
    if kind == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    return kind


def fit_content(before, content, after, budget, *, truncation, where, max_length):
    """``before + content + after`` within ``budget`` tokens, cutting the content's end; (ids, cut?)."""
    room = budget - len(before) - len(after)
    if len(content) <= room:
        return before + content + after, False
    if not truncation:
        total = len(before) + len(content) + len(after) + (max_length - budget)
        raise DatasetError(f"{where} has {total} tokens, more than task.data.max_length={max_length} (set "
                           "task.data.truncation: true to cut it)")
    if room < 1:
        raise DatasetError(f"{where}: task.data.max_length={max_length} leaves no room for the text after the "
                           f"template's {len(before) + len(after)} tokens and the answer")
    return before + content[:room] + after, True


def instruction_split(tokenizer, prompts, responses, *, template, plain_template, max_length, truncation, path,
                      eos_token_id, numbers, groups=None, messages=None):
    """A ``TokenizedSplit`` of prompt / response pairs (or chat ``messages``), ``numbers`` their
    rows in the file (for error messages): the response ends
    with the end-of-sequence token (the chat template's own end of turn, or ``eos_token_id`` after
    a plain template), and it keeps at least half of ``max_length`` when the pair is cut."""
    if template == "chat":
        answer_before, answer_after = chat_answer_parts(tokenizer)
        answer_before, answer_after = encode(tokenizer, answer_before), encode(tokenizer, answer_after)
    else:
        answer_before, answer_after = [], []
    if eos_token_id is not None and eos_token_id not in answer_after:
        answer_after = answer_after + [eos_token_id]
    if messages is None:
        before, after = (encode(tokenizer, part) for part in template_parts(template, plain_template, tokenizer,
                                                                             "prompt"))
    token_ids, prompt_lengths, references, truncated = [], [], [], 0
    count = len(messages) if messages is not None else len(prompts)
    for row in range(count):
        where = f"{path}: row {numbers[row]}"
        if messages is not None:
            turns = messages[row]
            response = turns[-1]["content"]
            prompt_text = render_chat(tokenizer, turns[:-1], add_generation_prompt=True)
            prompt_ids = encode(tokenizer, prompt_text)
            prompt_length = len(prompt_ids)
        else:
            response = responses[row]
            prompt_text = prompts[row]
            content = encode(tokenizer, prompt_text)
            prompt_length = len(before) + len(content) + len(after)
        answer = answer_before + encode(tokenizer, response) + answer_after
        if len(answer) == len(answer_before) + len(answer_after):
            raise DatasetError(f"{where}: the response encodes to no tokens")
        # The response keeps at least half the budget; the prompt takes what is left.
        answer_budget = max(max_length // 2, max_length - prompt_length)
        if prompt_length + len(answer) > max_length and not truncation:
            raise DatasetError(f"{where} has {prompt_length + len(answer)} tokens, more than task.data.max_length="
                               f"{max_length} (set task.data.truncation: true to cut it)")
        cut = len(answer) > answer_budget
        answer = answer[:answer_budget]
        budget = max_length - len(answer)
        if messages is not None:
            cut = cut or prompt_length > budget
            prompt_ids = prompt_ids[max(0, prompt_length - budget):]
        else:
            prompt_ids, content_cut = fit_content(before, content, after, budget, truncation=True, where=where,
                                                  max_length=max_length)
            cut = cut or content_cut
        truncated += cut
        token_ids.append(prompt_ids + answer)
        prompt_lengths.append(len(prompt_ids))
        references.append(response)
    return TokenizedSplit(token_ids=token_ids, prompt_lengths=prompt_lengths, labels=[0] * count, groups=groups,
                          references=references, truncated=truncated)


def label_sequences(tokenizer, words):
    """The token ids of each label word (one or more tokens each, all distinct)."""
    sequences = []
    for word in words:
        ids = encode(tokenizer, word)
        if not ids:
            raise DatasetError(f"task.data.label_words: {word!r} encodes to no tokens")
        sequences.append(tuple(ids))
    if len(set(sequences)) != len(sequences):
        raise DatasetError(f"task.data.label_words: {list(words)} encode to repeated token sequences")
    return tuple(sequences)


def classification_split(tokenizer, texts, labels, *, prompt_template, answer_tokens, max_length, truncation, path,
                         numbers, groups=None):
    """A ``TokenizedSplit`` of prompts (``prompt_template`` around each text, cut so that the
    longest answer, ``answer_tokens`` tokens, still fits in ``max_length``) and class ids."""
    before, after = (encode(tokenizer, part) for part in template_parts("plain", prompt_template, tokenizer, "text"))
    budget = max_length - answer_tokens
    token_ids, truncated = [], 0
    for row, text in enumerate(texts):
        ids, cut = fit_content(before, encode(tokenizer, text), after, budget, truncation=truncation,
                               where=f"{path}: row {numbers[row]}", max_length=max_length)
        token_ids.append(ids)
        truncated += cut
    return TokenizedSplit(token_ids=token_ids, prompt_lengths=[len(ids) for ids in token_ids], labels=list(labels),
                          groups=groups, truncated=truncated)

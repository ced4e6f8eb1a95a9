"""Offline pieces for the data tests: a tiny word-level tokenizer (trained here on a few sentences,
wrapped in transformers' PreTrainedTokenizerFast, optionally with a chat template), tiny random
causal LMs of two families saved as Hugging Face folders, and data files in every format."""

import json

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} [EOS]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL = ["[PAD]", "[UNK]", "[EOS]", "<|user|>", "<|assistant|>", "<|system|>"]
SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "what is two plus three", "five", "seven",
    "name the colour of the sky", "blue", "green grass grows fast", "red apples and yellow bananas",
    "answer with one word", "topic sports business politics", "the market fell sharply today",
    "the team won the cup final", "ministers met to discuss the budget", "question answer headline",
    "very good news", "very bad news", "positive negative neutral", "review of the film was great",
]


def build_tokenizer(*, chat=False):
    """A ~80-word WordLevel tokenizer (ids < 100, the tiny Llama's vocabulary); ``chat``: with a
    chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
        additional_special_tokens=SPECIAL[3:],
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(folder, family, *, tokenizer, seed=0):
    """A tiny random causal LM of ``family`` ("llama" or "gpt2") saved with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                             max_position_embeddings=128))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=128))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_rows(path, rows):
    """``rows`` (a list of dicts) as a data file whose format follows the suffix of ``path``
    (.jsonl, .csv, .parquet, or no suffix: a save_to_disk folder)."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def instruction_rows(count=12):
    prompts = ["what is two plus three", "name the colour of the sky", "the cat sat on the mat",
               "a dog ran in the park"]
    responses = ["five", "blue", "very good news", "green grass grows fast"]
    return [{"prompt": prompts[i % 4], "response": responses[i % 4], "source": f"s{i % 3}"} for i in range(count)]


def classification_rows(count=24):
    texts = ["the team won the cup final", "the market fell sharply today", "ministers met to discuss the budget",
             "review of the film was great"]
    labels = ["sports", "business", "politics", "business"]
    return [{"text": texts[i % 4] + (" today" * (i % 3)), "label": labels[i % 4], "source": f"s{i % 2}"}
            for i in range(count)]

"""Upper bounds on everything read from a config that allocates or repeats work.

A config comes from a file, a ``--set`` or a Flower run config, so it is input like any other:
every size or count is bounded before anything is built from it, and the YAML itself is bounded
before it is validated. The bounds sit far above any run this project makes on one machine
(docs/config.md lists them); a value past one is refused with one line naming the key.
"""

# YAML and JSON input, checked while loading (aliases counted as the nodes they expand to).
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000

# Counts of things a run builds or repeats.
MAX_SEED = 2**63 - 1
MAX_CLIENTS = 10_000
MAX_ROUNDS = 100_000
MAX_STEPS = 1_000_000  # local steps per round, pool training steps
MAX_BATCH = 65_536
MAX_RETRIES = 100
MAX_EXAMPLES = 1_000_000  # per split
MAX_SEQ_LEN = 8_192
MAX_TASK_TOKENS = 100_000_000  # (train + eval examples) x seq_len of the synthetic task
MAX_LABELS = 1_024
MAX_SOURCE_TASKS = 256
MAX_ADAPTERS = 256
MAX_RANK = 4_096
MAX_TOP_K = 65_536
MAX_ROUTER_DIM = 65_536
MAX_QUOTA_BUDGET = 10_000_000
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_LORA_ALPHA = 1e6
MAX_ATTACK_PARAM = 1_000_000  # the number of an attack fault, "sign_flip:<c>"

# task.data: rows read from a file, labels of a classification file, tokens of one example.
MAX_DATA_ROWS = 10_000_000
MAX_DATA_LABELS = 1_000
MAX_EXAMPLE_TOKENS = 32_768

# model.tiny: the random Llama's sizes, and its parameter count (float32: 4 bytes each).
MAX_TINY_SIZES = {
    "hidden_size": 65_536,
    "intermediate_size": 262_144,
    "num_hidden_layers": 512,
    "num_attention_heads": 1_024,
    "num_key_value_heads": 1_024,
    "head_dim": 65_536,
    "vocab_size": 1_048_576,
    "max_position_embeddings": 1_048_576,
}
MAX_TINY_PARAMETERS = 1_000_000_000

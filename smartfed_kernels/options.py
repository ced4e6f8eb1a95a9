"""The op's option names, torch-free: configuration checks them without importing torch.

Each backend keys its implementations by these names and refuses any other.
"""

GATES = ("topk_softmax", "softmax_topk")
ROUTERS = ("linear", "expert_space")
BACKENDS = ("auto", "torch", "triton", "reference")

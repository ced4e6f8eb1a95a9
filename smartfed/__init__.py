"""SmartFed: federated fine-tuning by reuse of public LoRA adapters as rank-wise experts."""

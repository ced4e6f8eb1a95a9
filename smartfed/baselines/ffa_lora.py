"""FFA-LoRA: FedIT's LoRA with A frozen at its (seeded, identical everywhere) random init and only
B trained and uploaded, so the server's average of B is the exact average of the updates BA."""

from smartfed.baselines.common import trainable_tensors
from smartfed.baselines.fedit import FedITMethod


class FFALoRAMethod(FedITMethod):
    name = "ffa_lora"

    def build(self, base_model, pool):
        model = super().build(base_model, pool)
        for name, parameter in model.named_parameters():
            if ".lora_A." in name:
                parameter.requires_grad_(False)
        self._names = sorted(trainable_tensors(model))
        if not self._names or any(".lora_B." not in name for name in self._names):
            raise RuntimeError(f"FFA-LoRA expected only lora_B tensors to train, got {self._names[:4]}")
        return model

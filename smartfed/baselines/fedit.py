"""FedIT: a peft LoRA trained from scratch on the pool's target modules; clients upload A and B,
the server averages each (FedAvg of A and of B separately, as FedIT does)."""

from smartfed.baselines.common import TrainableParametersMethod, seeded_init, trainable_tensors


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


class FedITMethod(TrainableParametersMethod):
    name = "fedit"

    def build(self, base_model, pool):
        from peft import LoraConfig, get_peft_model

        baseline = self.config.baseline
        lora = LoraConfig(
            r=baseline.lora_rank, lora_alpha=baseline.lora_alpha,
            target_modules=list(self.config.pool.target_modules), lora_dropout=0.0,
        )
        with seeded_init(self.config.seed):
            model = get_peft_model(base_model, lora)
        self._names = sorted(trainable_tensors(model))
        return model

    def forward_flops_per_token(self, model):
        rank = self.config.baseline.lora_rank
        return sum(2 * rank * (layer.in_features + layer.out_features) for layer in lora_layers(model))

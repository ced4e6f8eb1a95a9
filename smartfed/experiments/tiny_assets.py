"""``smartfed tiny-assets``: a base model folder and peft adapter folders to try SmartFed with.

The README's snippets load a model and a pool the way a user's own would be loaded (a
transformers folder, peft adapter folders); this command makes small ones in seconds on a CPU:
the tiny random Llama of the default run config (configs/tiny.yaml) saved with
``save_pretrained``, and its pool of LoRA adapters trained with peft on the synthetic source
tasks. Random weights: they show the API, not what a real model learns.
"""

import shutil
from pathlib import Path

MODEL_FOLDER = "model"
ADAPTERS_FOLDER = "adapters"


def write_tiny_assets(output, *, progress=True):
    """Write OUTPUT/model and OUTPUT/adapters/<name> for the default run config; returns the
    adapter folders. OUTPUT must not exist yet: nothing of the user's is overwritten."""
    from smartfed.config import RunConfig
    from smartfed.experiments.assets import build_base_model, build_tiny_pool
    from smartfed.staging import finish_staging, make_staging, remove_stale_staging

    output = Path(output).resolve()
    if output.exists():
        raise FileExistsError(f"--output {output}: exists; name a new folder")
    config = RunConfig.model_validate({})
    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(parent)
    staging = make_staging(parent, f".{output.name}-staging-")
    try:
        build_base_model(config.model, config.seed).save_pretrained(str(staging / MODEL_FOLDER))
        for source in build_tiny_pool(config, progress=progress):
            shutil.copytree(source, staging / ADAPTERS_FOLDER / source.name)
        finish_staging(staging)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted((output / ADAPTERS_FOLDER).iterdir())


def configure_parser(parser):
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="a new folder for model/ and adapters/")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from smartfed.config import ConfigError

    try:
        adapters = write_tiny_assets(args.output, progress=not args.no_progress)
    except FileExistsError as error:
        raise ConfigError(str(error)) from None
    output = adapters[0].parent.parent
    print(f"model: {output / MODEL_FOLDER}")
    for adapter in adapters:
        print(f"adapter: {adapter}")
    return 0

"""Stage kinds, one file each. A stage module defines `Config` (a `StageConfig` subclass) and
`run(cfg, ctx) -> StageResult`. Modules are imported only when their kind is used."""

import importlib

STAGE_KINDS = {
    "pretrain": "recipes.pretrain",
    "sample_logits": "recipes.sample_logits",
    "distill": "recipes.distill",
    "evaluate": "recipes.evaluate",
    "sft": "recipes.sft",
    "onpolicy_distill": "recipes.onpolicy_distill",
    "rl": "recipes.rl",
    "merge": "recipes.merge",
    "reward_model": "recipes.reward_model",
}


def stage_module(kind: str):
    return importlib.import_module(STAGE_KINDS[kind])


def stage_config_class(kind: str):
    return stage_module(kind).Config

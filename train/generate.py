"""Sample text from a trained stage of a run, or from a Hugging Face Gemma checkpoint.

    python -m train.generate --run runs/quickstart --stage teacher --prompt "In the beginning"
    python -m train.generate --hf path/to/gemma-3-1b-pt --prompt "The capital of France is"

A Hugging Face directory must hold tokenizer.json next to config.json and the safetensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
from flax import nnx


def load_run_stage(run_dir: Path, stage: str):
    """(model, tokenizer) of a finished stage: its final checkpoint and the run's tokenizer,
    loaded the way a downstream stage would (`StageContext.trained_params` / `.tokenizer`)."""
    import yaml

    from train.config import parse_config
    from train.pipeline import Manifest, StageContext

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["mesh"] = {"data": -1}
    raw["run"].update(dir=str(run_dir.parent), name=run_dir.name)
    cfg = parse_config(raw, source=str(run_dir / "config.yaml"))
    manifest = Manifest(run_dir / "manifest.json")
    if manifest.stage(stage).get("status") != "done":
        done = [n for n, e in manifest.data["stages"].items() if e.get("status") == "done"]
        raise SystemExit(f"error: stage {stage!r} of {run_dir} is not done; done: {done}")
    ctx = StageContext(pipeline=cfg, name=stage, manifest=manifest, stop=None)
    graphdef, params, _ = ctx.trained_params(stage)
    return nnx.merge(graphdef, params), ctx.tokenizer()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run directory, e.g. runs/quickstart")
    src.add_argument("--hf", type=Path, help="a Hugging Face checkpoint directory")
    p.add_argument("--stage", help="with --run: the stage whose final checkpoint to use")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from train.sampler import sample

    if args.run:
        if not args.stage:
            p.error("--run needs --stage")
        model, tok = load_run_stage(args.run, args.stage)
    else:
        from data.tokenizer import load_hf as load_hf_tokenizer
        from train.models.hf import load_hf

        model, tok = load_hf(args.hf), load_hf_tokenizer(args.hf / "tokenizer.json")
    prompts = [[tok.bos_id, *tok.encode(text)] for text in args.prompt]
    out = sample(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        rng=jax.random.key(args.seed),
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
        stop_tokens=(tok.eos_id,),
    )
    for text, toks, n in zip(args.prompt, out.tokens.tolist(), out.lengths.tolist(), strict=True):
        print(f"--- {text}{tok.decode(toks[:n])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""report.md: the stage table, the distilled-vs-scratch comparison, the loss plot."""

import json

import yaml

from train.config import parse_config
from train.pipeline import comparisons
from train.report import write_report

RAW = yaml.safe_load(
    """
run: {name: r, dir: RUNS}
logging: {wandb: disabled}
models: {m: {preset: gemma3-tiny}}
stages:
  teacher: {kind: pretrain, model: m}
  logits: {kind: sample_logits, teacher: teacher, data: {max_rows: 10}}
  student: {kind: distill, model: m, logits: logits, data: {max_rows: 10}, steps: 20}
  scratch: {kind: pretrain, model: m, data: {max_rows: 10}, steps: 20}
"""
)


def test_comparison_and_plot(tmp_path):
    raw = json.loads(json.dumps(RAW).replace("RUNS", str(tmp_path)))
    cfg = parse_config(raw, num_devices=1)
    manifest = {"stages": {}}
    curves = {
        "student": [(10, 3.0, 90.0), (20, 2.0, 80.0)],
        "scratch": [(10, 4.0, 50.0), (20, 5.0, 120.0)],
    }
    for name, points in curves.items():
        d = cfg.run_dir / name
        d.mkdir(parents=True)
        lines = []
        for step, loss, ppl in points:
            lines.append({"step": step, "kind": "train", "loss": loss})
            lines.append({"step": step, "kind": "eval", "eval_loss": loss, "eval_ppl": ppl})
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        manifest["stages"][name] = {
            "status": "done",
            "step": 20,
            "metrics": {"eval_ppl": points[-1][2]},
        }
    text = comparisons(cfg, manifest)
    assert "distilled `student` eval ppl 80.000 vs from-scratch `scratch` 120.000" in text
    assert "lower (+33.3%)" in text and "80.000 (step 20) vs 50.000 (step 10)" in text
    kinds = {n: s.kind for n, s in cfg.stages.items()}
    report = write_report(
        run_dir=cfg.run_dir,
        run_name="r",
        order=cfg.order,
        kinds=kinds,
        manifest=manifest,
        extra=text,
    )
    assert "| student | distill" in report and "![losses](losses.png)" in report
    assert (cfg.run_dir / "losses.png").stat().st_size > 1000

"""Shared set-up of the demo A/B scripts (``positions_demo.py``, ``scheme_ab_demo.py``): the
layer-copied student of the recipe (built once under ``work``) and a ROUGE scorer on the test
split whose results are cached in ``work/scores.json`` by name and row count."""

from __future__ import annotations

import json
from pathlib import Path


def student_and_scorer(teacher: Path, recipe, work: Path, eval_samples: int | None):
    """``(student folder, score(name, folder) -> {rouge..., rows})`` for ``recipe`` under ``work``."""
    from dqtool.data.pairs import DataConfig
    from dqtool.stages.distill import distill
    from dqtool.stages.evaluate import EvalConfig, evaluate_model

    work.mkdir(parents=True, exist_ok=True)
    student = work / "student"
    if not student.exists():
        distill(teacher, student, recipe.distill)
    score_file = work / "scores.json"
    scores = json.loads(score_file.read_text()) if score_file.is_file() else {}
    any_cfg = next(iter(recipe.qats.values()))
    ecfg = EvalConfig(data=any_cfg.data, split="test",
                      data_cfg=DataConfig(source_max_length=any_cfg.source_max_length, prefix=any_cfg.prefix),
                      max_length=any_cfg.target_max_length, batch_size=64, max_samples=eval_samples)

    def score(name: str, folder: Path) -> dict:
        key = f"{name}@{eval_samples}"
        if key not in scores:
            r = evaluate_model(folder, None, ecfg)
            scores[key] = {k: round(v, 2) for k, v in r.metrics.items() if k.startswith("rouge")}
            scores[key]["rows"] = len(r.predictions)
            score_file.write_text(json.dumps(scores, indent=1) + "\n")
        return scores[key]

    return student, score

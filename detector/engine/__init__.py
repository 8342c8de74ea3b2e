"""The training and evaluation flows of the library, as chains of keyed stages.

    from detector.config import load_config
    from detector.engine import train, evaluate

    cfg = load_config("digits_zf5")     # a packaged config by name, or a path
    model_path = train(cfg)              # proposals -> pretrain -> cache -> finetune -> stats -> svm -> bbox -> model
    report = evaluate(cfg)               # proposals -> detect -> score; report.text() ends with "mAP: ..."

Modules: :mod:`~detector.engine.run` (a run, stages, keys), :mod:`~detector.engine.data` (the split
policy), :mod:`~detector.engine.proposals`, :mod:`~detector.engine.pretrain`,
:mod:`~detector.engine.train`, :mod:`~detector.engine.evaluate`. The commands (``detector.commands``,
``sppnet train`` / ``sppnet test``) parse arguments and call one of these.
"""
from __future__ import annotations

from detector.engine.evaluate import EvalReport, build_detector, evaluate
from detector.engine.run import Output, Run, Stage, StopAfter
from detector.engine.train import TRAIN_STAGES, detect_params, train

__all__ = ["train", "evaluate", "build_detector", "detect_params", "EvalReport", "TRAIN_STAGES", "Run", "Stage",
           "Output", "StopAfter"]

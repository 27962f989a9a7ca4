"""Plateau pilot of the large-batch study (docs/study.md): SGD at B_ref = 64 with the recipe's lr,
trained for 2, 4 and 8 epochs (the study's warm-up fraction and decay, validation split), two
seeds each; prints the final validation and test accuracy of every run as JSON lines, with the
load average. Tells whether an epoch budget leaves B_ref within 0.5 pp of its plateau.

    PYTHONPATH=. .venv/bin/python benchmarks/study_plateau.py [--epochs 2,4,8] [--seeds 1,2]
"""
import argparse
import json
import os
import time

from hvdscale.study import sweep
from hvdscale.study.engine_run import run_with_engine

RECIPE = "pipelines/sweep_sgd.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="2,4,8")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    setting = sweep.read_setting(RECIPE)
    for epochs in (float(e) for e in args.epochs.split(",")):
        settings = sweep.StudySettings(recipes=[RECIPE], batch_sizes=[args.batch, 2 * args.batch],
                                       target=0.85, epochs=epochs)
        study = sweep.Study(settings, "/tmp/hvdscale-study-plateau", log=lambda *_: None)
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.time()
            lr = sweep.rule_lr(setting.base_lr, setting.reference_batch, args.batch,
                               setting.scaling)
            res = run_with_engine(study.config(setting, args.batch, lr, seed), *study.data)
            print(json.dumps({"epochs": epochs, "seed": seed, "val": res.evals[-1][1],
                              "test": res.test_accuracy, "steps": res.steps_run,
                              "steps_to_0.85": res.steps_to_target,
                              "wall_s": round(time.time() - start, 1),
                              "load": [round(v, 2) for v in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()

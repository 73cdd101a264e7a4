"""Collect the copy hit rate curves of the diagnosis runs from their checkpoints.

A diagnosis run that was stopped before its last step has no result row, only a checkpoint
holding the hit rate at every checkpoint so far; this writes all of them to one JSON file,
keyed by suite and case id:

    .venv/bin/python suites/diagnosis/curves.py runs/diag results/diagnosis-curves.json
"""

import json
import sys
from pathlib import Path

import torch


def main(runs: str, out: str) -> None:
    curves = {}
    for path in sorted(Path(runs).glob("*-checkpoints/*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        suite = path.parent.name.rsplit("-", 2)[0]  # <suite>-<device>-checkpoints
        curves[f"{suite}/{path.stem}"] = [
            {
                "step": point["step"],
                "time_s": round(point["time_s"], 1),
                **{
                    name.split("_")[1]: {
                        r: None if v is None else round(v, 4) for r, v in level.items()
                    }
                    for name, level in point["levels"].items()
                },
            }
            for point in state["curve"]
        ]
    Path(out).write_text(json.dumps(curves, indent=1) + "\n")
    for run, curve in curves.items():
        last = curve[-1]
        largest = list(last)[-1]  # levels are listed smallest first
        hits = last[largest]
        print(f"{run}: step {last['step']}, {largest} r1 {hits['r1']}, r2 {hits['r2']}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

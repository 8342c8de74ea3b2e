"""Where two training runs of one config part: their ``fingerprints.json`` files compared.

Each finished stage writes an identity to ``<output_dir>/fingerprints.json`` (a digest of its key
and of the bytes it produced; :meth:`detector.engine.run.Run.write_fingerprints`), beside the numeric
environment of the machine. A stage's key holds the identities of its inputs, so the first stage
whose identity differs is where the two runs' results part, and every later stage that uses its
output differs with it; the environment lines
that differ say what may have caused it (RELIABILITY.md measures which library moves which stage).

    report = compare_runs("runs/a", "runs/b")
    print(report.text())
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from detector.artifacts import ArtifactError

__all__ = ["RunComparison", "compare_runs", "read_fingerprints"]


def read_fingerprints(run: str | Path) -> dict:
    """``fingerprints.json`` of a run folder (or the file itself).

    Raises:
        ArtifactError: the file is missing or is not a fingerprints file (named).
    """
    path = Path(run)
    if path.is_dir():
        path = path / "fingerprints.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no fingerprints file (a training run writes it when it ends or stops)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not a fingerprints file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise ArtifactError(f"{path}: not a fingerprints file (no 'stages' table)")
    return {"path": path, "stages": data["stages"], "environment": data.get("environment", {}),
            "world_size": data.get("world_size", 1)}


@dataclass
class RunComparison:
    """Two runs' stage identities side by side.

    Attributes:
        a, b: the two fingerprints files.
        stages: every stage name of either run, in run order.
        first_difference: the first stage whose identity differs, or that only one run finished;
            None when every stage of both runs is identical.
        environment: ``{key: (value in a, value in b)}`` for the environment entries that differ.
    """

    a: Path
    b: Path
    stages: list[str]
    identities: dict[str, tuple[str | None, str | None]]
    first_difference: str | None
    environment: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"A: {self.a}", f"B: {self.b}", "", f"{'stage':<12}{'A':<20}{'B':<20}"]
        for s in self.stages:
            ia, ib = self.identities[s]
            mark = "" if ia == ib else "  <- differs" if s == self.first_difference else "  differs"
            lines.append(f"{s:<12}{ia or '(not run)':<20}{ib or '(not run)':<20}{mark}")
        lines.append("")
        if self.first_difference is None:
            lines.append("identical: every stage produced the same bytes")
        else:
            lines.append(f"the runs part at stage '{self.first_difference}' (the later stages that use its output "
                         "differ with it)")
        if self.environment:
            lines.append("environment entries that differ:")
            lines += [f"  {k}: {va!r} vs {vb!r}" for k, (va, vb) in self.environment.items()]
        else:
            lines.append("the recorded environments are the same")
        return "\n".join(lines)


def compare_runs(a: str | Path, b: str | Path) -> RunComparison:
    """Compare the fingerprints of two runs (folders or ``fingerprints.json`` files)."""
    fa, fb = read_fingerprints(a), read_fingerprints(b)
    stages = list(fa["stages"]) + [s for s in fb["stages"] if s not in fa["stages"]]
    ids = {s: (fa["stages"].get(s), fb["stages"].get(s)) for s in stages}
    first = next((s for s in stages if ids[s][0] != ids[s][1]), None)
    keys = list(fa["environment"]) + [k for k in fb["environment"] if k not in fa["environment"]]
    env = {k: (fa["environment"].get(k), fb["environment"].get(k)) for k in keys
           if fa["environment"].get(k) != fb["environment"].get(k)}
    if fa["world_size"] != fb["world_size"]:
        env["world_size"] = (str(fa["world_size"]), str(fb["world_size"]))
    return RunComparison(a=fa["path"], b=fb["path"], stages=stages, identities=ids, first_difference=first,
                         environment=env)

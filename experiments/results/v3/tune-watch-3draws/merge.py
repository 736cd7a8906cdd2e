"""Each dataset's tuned settings for every method in one file, as `fediomt experiment accuracy --tuned` reads them.

watch: every method re-tuned on 3 validation draws (baselines/, adaptive/; watch's earlier winners, in
tune-watch/, came from one draw); heart and PhysioNet 2012: FedIoMT re-tuned with its current grid
(tabular-fediomt/), the other methods' 3-draw winners as before (tune-fediomt-momentum/*-merged.json).
Run from the repository root: .venv/bin/python experiments/results/v3/tune-watch-3draws/merge.py
"""
import json
from pathlib import Path

HERE = Path("experiments/results/v3/tune-watch-3draws")   # from the repository root, as the files record it
EARLIER = HERE.parent / "tune-fediomt-momentum"


def chosen(path: Path) -> dict:
    return json.loads(path.read_text())["chosen"]


def main() -> None:
    watch = {**chosen(HERE / "baselines" / "tune.json"), **chosen(HERE / "adaptive" / "tune.json")}
    (HERE / "watch-merged.json").write_text(json.dumps(
        {"chosen": watch, "sources": {"baselines": str(HERE / "baselines" / "tune.json"),
                                      "fedadam, fediomt": str(HERE / "adaptive" / "tune.json")}}, indent=1))
    fediomt = chosen(HERE / "tabular-fediomt" / "tune.json")
    for name in ("heart", "physionet2012"):
        merged = {**chosen(EARLIER / f"{name}-merged.json"), f"{name}/fediomt": fediomt[f"{name}/fediomt"]}
        (HERE / f"{name}-merged.json").write_text(json.dumps(
            {"chosen": merged, "sources": {"fediomt": str(HERE / "tabular-fediomt" / "tune.json"),
                                           "others": str(EARLIER / f"{name}-merged.json")}}, indent=1))


if __name__ == "__main__":
    main()

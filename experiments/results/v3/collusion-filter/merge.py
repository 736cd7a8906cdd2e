"""Watch's tuned settings with FedIoMT re-tuned under the edges' new default filters (tune-watch/, collusion ->
norm -> cosine), every other method's 3-draw winner as before (the filters are FedIoMT's alone).
Run from the repository root: .venv/bin/python experiments/results/v3/collusion-filter/merge.py
"""
import json
from pathlib import Path

HERE = Path("experiments/results/v3/collusion-filter")   # from the repository root, as the files record it
BEFORE = HERE.parent / "tune-watch-3draws" / "watch-merged.json"


def main() -> None:
    chosen = json.loads(BEFORE.read_text())["chosen"]
    chosen["watch/fediomt"] = json.loads((HERE / "tune-watch" / "tune.json").read_text())["chosen"]["watch/fediomt"]
    (HERE / "watch-merged.json").write_text(json.dumps(
        {"chosen": chosen, "sources": {"fediomt": str(HERE / "tune-watch" / "tune.json"), "others": str(BEFORE)}},
        indent=1))


if __name__ == "__main__":
    main()

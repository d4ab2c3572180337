"""Rebuild the local lm-eval tasks' data (stages/tasks/data/*.jsonl) from the held-out novel.

Deterministic: the same text gives byte-identical files (tests/test_evaluate.py checks that the
shipped files are current). Usage: python scripts/build_eval_tasks.py [--text PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.eval.taskdata import build_all, heldout_text_path, write_task_data

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "stages" / "tasks" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=None, help="the novel (default: the packaged persuasion.txt)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    path = args.text or heldout_text_path()
    text = path.read_text(encoding="utf-8")
    written = write_task_data(build_all(text), text, args.out)
    for name, count in written.items():
        print(f"{name}: {count} docs -> {args.out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()

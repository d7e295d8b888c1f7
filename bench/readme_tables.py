"""Copy the Markdown tables in bench/results/ into README.md between the bench markers."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# The order the tables appear in; any other results file follows alphabetically.
ORDER = [
    "deploy", "accuracy_latency", "fmnist", "mnist", "cifar10", "thirdparty", "qcfs", "own_models", "stock_models", "lava_speed",
    "throughput", "conv_algorithms",
]  # fmt: skip


def _rank(path: Path) -> tuple[int, str]:
    for index, prefix in enumerate(ORDER):
        if path.stem.startswith(prefix):
            return index, path.stem
    return len(ORDER), path.stem


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print("README.md has no bench markers", file=sys.stderr)
        return 2
    tables = sorted((ROOT / "bench" / "results").glob("*.md"), key=_rank)
    body = "\n".join(f"<!-- from bench/results/{p.name} -->\n{p.read_text().strip()}\n" for p in tables)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")
    print(f"copied {len(tables)} tables into README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

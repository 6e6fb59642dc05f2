"""Issue 4's second bar against what any choice of fixed block sizes could do, for saved runs.

Reads results of `hybrid bench --block-sizes 1,2,4,auto --json` (the last line of each file) and prints
what the bench prints after its tables: each auto variant over the best fixed size per category and over
every fixed size overall, and the fastest fixed size of each category picked in hindsight, over the best
single fixed size (the most a chooser of one fixed size per category could gain on those prompts):

    .venv/bin/python bench/size_oracle.py bench/results/*block-sizes*.json
"""
import sys

from hybrid.bench import auto_lines, hindsight_lines, load_result


def main(paths: list[str]) -> None:
    for path in paths:
        result = load_result(path)
        print(path)
        for line in auto_lines(result) + hindsight_lines(result):
            if line:
                print("  " + line)


if __name__ == "__main__":
    main(sys.argv[1:])

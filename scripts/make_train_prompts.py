"""Write the prompt set for self-distillation (`hybrid train-drafter --prompts`): data/train-prompts.jsonl.

Sources that exist on any machine with Python: the standard library's sources (functions with docstrings,
module docstrings), optional HumanEval prompts (`--human-eval HumanEval.jsonl.gz`, MIT), and templates
with random numbers. Categories mirror bench/prompts.jsonl (code, chat, math, summarisation,
translation); no prompt of bench/prompts.jsonl is used or copied.

    python scripts/make_train_prompts.py --human-eval /path/HumanEval.jsonl.gz
"""
from __future__ import annotations

import argparse
import ast
import gzip
import json
import random
import sysconfig
from pathlib import Path

LANGS = ["JavaScript", "Go", "Rust", "C", "TypeScript", "Java", "C++", "Bash"]
TARGET_LANGS = ["French", "German", "Spanish", "Italian", "Portuguese", "Dutch"]
TOPICS = [
    "a hash table", "recursion", "a race condition", "garbage collection", "a REST API", "a database index",
    "TCP and UDP", "public-key cryptography", "a compiler and an interpreter", "unit tests", "a virtual machine",
    "DNS", "a load balancer", "Big-O notation", "a mutex", "functional programming", "a linked list", "caching",
    "photosynthesis", "inflation", "the water cycle", "black holes", "vaccines", "plate tectonics",
    "the greenhouse effect", "machine learning", "a neural network", "blockchains", "version control",
    "containers and virtual machines", "type hints in Python", "Python decorators", "Python generators",
    "the GIL in Python", "async/await", "memoization", "binary search", "dynamic programming", "SQL joins",
    "HTTP status codes", "OAuth", "continuous integration", "code review", "technical debt", "regular expressions",
    "floating-point rounding errors", "Unicode and UTF-8", "the difference between a list and a tuple",
    "pointers", "stack and heap memory", "sorting algorithms", "graph search", "supply and demand",
    "compound interest", "the scientific method", "climate and weather", "sleep and memory", "exercise and health",
]
ASKS = [
    "What is {t}? Answer in a few sentences.", "Explain {t} to a beginner.", "Why does {t} matter? Be brief.",
    "Give a short explanation of {t} with an example.", "What are common mistakes people make with {t}?",
]
TIPS = [
    "learning a new programming language", "writing good documentation", "debugging a slow program",
    "preparing for a technical interview", "working remotely", "reading other people's code", "naming variables",
    "giving a presentation", "managing my time", "learning to cook", "saving money", "staying focused",
    "writing unit tests", "reviewing pull requests", "keeping a project's dependencies up to date",
    "studying for an exam", "running my first marathon", "starting a vegetable garden", "writing an email to a client",
]


def functions(root: Path, rng: random.Random, limit: int):
    """(signature-and-docstring source, name, args, first docstring line) of stdlib functions."""
    files = sorted(p for p in root.glob("*.py"))
    rng.shuffle(files)
    out = []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = src.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.col_offset != 0:
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40 or not node.body:
                continue
            first = node.body[0]
            head = "".join(lines[node.lineno - 1 : first.end_lineno])
            if len(head) > 1200:
                continue
            args = ", ".join(a.arg for a in node.args.args)
            out.append((head, node.name, args, doc.split("\n\n")[0].replace("\n", " ").strip()))
            break  # one function per module: variety
        if len(out) >= limit:
            break
    return out


def module_docs(root: Path):
    docs = []
    for f in sorted(root.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if doc:
            docs.append((f.stem, doc))
    return docs


def sentences(text: str):
    for s in text.replace("\n", " ").split(". "):
        s = " ".join(s.split())
        if 40 <= len(s) <= 200 and s[0].isupper() and "`" not in s and ">>>" not in s:
            yield s.rstrip(".") + "."


def math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 19), rng.randint(20, 99), rng.randint(100, 999)
    names = rng.sample(["Maria", "Tom", "Lea", "Omar", "Yuki", "Paul", "Sara", "Ivan", "Nina", "Raj"], 2)
    templates = [
        f"A car travels {c} km in {a} hours. What is its average speed? Show your steps.",
        f"{names[0]} has {a} times as many stickers as {names[1]}. Together they have {a * b + b} stickers. How many does each have?",
        f"A book costs {b} dollars. It is discounted by {rng.choice([10, 15, 20, 30])}%. What is the new price?",
        f"What is {b} multiplied by {c}? Explain the steps.",
        f"A rectangle is {a} cm wide and {b} cm long. What are its area and perimeter?",
        f"If {a} workers build a wall in {b} hours, how long do {a * 2} workers need at the same pace?",
        f"Solve for x: {a}x + {b} = {c}. Show your work.",
        f"The average of {a}, {b} and {c} is what? Explain.",
        f"{names[0]} saves {b} euros a month. How many months until {names[0]} has {c * 10} euros?",
        f"A recipe needs {a} eggs for {rng.randint(2, 6)} people. How many eggs for {b} people?",
        f"What is {rng.randint(10, 90)}% of {c}?",
        f"Is {c} a prime number? Explain how you check.",
    ]
    return rng.choice(templates)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--human-eval", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "train-prompts.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    if args.human_eval:
        with gzip.open(args.human_eval, "rt") as f:
            rows += [{"prompt": json.loads(line)["prompt"], "category": "code", "chat": False} for line in f]
    fns = functions(root, rng, 400)
    for head, name, fargs, desc in fns[:200]:
        rows.append({"prompt": head, "category": "code", "chat": False})
    for head, name, fargs, desc in fns[200:]:
        lang = "Python" if rng.random() < 0.6 else rng.choice(LANGS)
        rows.append({"prompt": f"Write a {lang} function `{name}({fargs})`: {desc}", "category": "code"})
    for t in TOPICS:
        for ask in rng.sample(ASKS, 3):
            rows.append({"prompt": ask.format(t=t), "category": "chat"})
    for t in TIPS:
        rows.append({"prompt": f"Give me {rng.choice(['three', 'four', 'five'])} tips for {t}.", "category": "chat"})
    docs = module_docs(root)
    for name, doc in rng.sample(docs, min(60, len(docs))):
        rows.append({"prompt": f"What is the Python module `{name}` used for? Answer briefly.", "category": "chat"})
    for _ in range(200):
        rows.append({"prompt": math_prompt(rng), "category": "math"})
    paras = [p for _, d in docs for p in d.split("\n\n") if 250 <= len(p) <= 1200 and ">>>" not in p]
    asks = ["Summarise the following paragraph in one sentence.", "Summarise this text in two sentences.",
            "Give a short summary of the following text.", "Summarise the key points as a bulleted list."]
    for p in rng.sample(paras, min(150, len(paras))):
        rows.append({"prompt": f"{rng.choice(asks)}\n\n{' '.join(p.split())}", "category": "summarisation"})
    sents = sorted({s for _, d in docs for s in sentences(d)})
    for s in rng.sample(sents, min(200, len(sents))):
        rows.append({"prompt": f'Translate into {rng.choice(TARGET_LANGS)}: "{s}"', "category": "translation"})
    bench = {json.loads(l)["prompt"] for l in (args.out.parents[1] / "bench" / "prompts.jsonl").read_text().splitlines()}
    rows = [r for r in rows if r["prompt"] not in bench]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {}
    for r in rows:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    print(f"{len(rows)} prompts -> {args.out}: {counts}")


if __name__ == "__main__":
    main()

"""Write the prompt set for self-distillation (`hybrid train-drafter --prompts`): data/train-prompts.jsonl.

Sources that exist on any machine with Python: the standard library's sources (functions with docstrings,
module docstrings), optional HumanEval prompts (`--human-eval HumanEval.jsonl.gz`, MIT), and templates
with random numbers. Categories mirror bench/prompts.jsonl (code, chat, math, summarisation,
translation); no prompt of bench/prompts.jsonl is used or copied.

    python scripts/make_train_prompts.py --human-eval /path/HumanEval.jsonl.gz
    python scripts/make_train_prompts.py --round 2   # data/train-prompts-2.jsonl: other sources, no repeats
    python scripts/make_train_prompts.py --round 4   # data/train-prompts-4.jsonl: round 3's kinds, new functions

Round 2 draws on what round 1 left: functions and methods of the standard library's subpackages,
"explain / test / annotate this function" requests, scripting tasks, the language reference text that
ships with Python (pydoc_data.topics) for chat, summarisation and translation, and more maths templates.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import json
import random
import sysconfig
import textwrap
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


def documented_functions(files: list[Path], rng: random.Random):
    """Per file (shuffled): (source lines, [public functions with a docstring of 40+ characters])."""
    files = list(files)
    rng.shuffle(files)
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
                 and n.body and len(ast.get_docstring(n) or "") >= 40]
        yield src.splitlines(keepends=True), nodes


def summary(node) -> str:
    return ast.get_docstring(node).split("\n\n")[0].replace("\n", " ").strip()


def functions(root: Path, rng: random.Random, limit: int):
    """(signature-and-docstring source, name, args, first docstring line) of stdlib functions."""
    out = []
    for lines, nodes in documented_functions(sorted(root.glob("*.py")), rng):
        for node in nodes:
            if node.col_offset != 0:
                continue
            head = "".join(lines[node.lineno - 1 : node.body[0].end_lineno])
            if len(head) > 1200:
                continue
            args = ", ".join(a.arg for a in node.args.args)
            out.append((head, node.name, args, summary(node)))
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


TASKS = [
    "reads a CSV file and prints the average of its second column", "renames every .jpeg file in a folder to .jpg",
    "counts the words in a text file and prints the ten most common", "downloads a URL and saves it to a file",
    "checks whether a string is a valid IPv4 address", "flattens a nested list", "merges two sorted lists",
    "finds duplicate files in a directory by their SHA-256 hash", "converts a JSON file to YAML",
    "parses a log file and counts lines per log level", "implements a stack with push, pop and peek",
    "implements a queue using two stacks", "computes the Levenshtein distance of two strings",
    "validates an email address with a regular expression", "prints the Fibonacci numbers below 1000",
    "reverses the words in a sentence", "groups a list of words into anagrams", "rotates a matrix by 90 degrees",
    "implements binary search on a sorted list", "reads environment variables with defaults into a config object",
    "retries a function call with exponential backoff", "times a function with a decorator",
    "implements an LRU cache class", "walks a directory tree and prints the total size per extension",
    "converts Roman numerals to integers", "checks whether brackets in a string are balanced",
    "computes the prime numbers below n with a sieve", "serialises a dataclass to JSON and back",
    "splits a list into chunks of size n", "implements a simple command-line argument parser with argparse",
    "reads a large file line by line and prints lines matching a pattern", "computes a moving average",
    "implements a thread-safe counter", "runs shell commands and captures their output",
    "deduplicates a list while keeping order", "parses an ISO 8601 date and prints the weekday",
    "implements breadth-first search on a graph given as a dict", "transposes a CSV file",
    "generates a random password with letters, digits and symbols", "converts a number to words in English",
    "implements a trie with insert and search", "computes the median of a stream of numbers",
    "finds the longest common prefix of a list of strings", "implements merge sort",
    "watches a folder and prints new files", "sends a JSON POST request and prints the response",
    "zips every file in a folder", "implements a simple rate limiter", "formats a table of rows as Markdown",
    "validates that a dict matches a simple schema",
]
TOPICS_2 = [
    "object-oriented programming", "inheritance and composition", "immutability", "side effects", "closures",
    "exceptions and error codes", "logging", "profiling a program", "threads and processes", "event loops",
    "message queues", "microservices", "REST and GraphQL", "websockets", "CORS", "SQL injection",
    "cross-site scripting", "password hashing", "two-factor authentication", "TLS certificates", "JSON Web Tokens",
    "rate limiting", "idempotency in APIs", "database transactions", "normalisation in databases", "NoSQL databases",
    "sharding", "replication", "eventual consistency", "the CAP theorem", "consistent hashing", "bloom filters",
    "heaps and priority queues", "tries", "hash collisions", "tail recursion", "lazy evaluation", "pattern matching",
    "virtual environments in Python", "packaging a Python library", "semantic versioning", "Docker images",
    "Kubernetes pods", "infrastructure as code", "feature flags", "A/B testing", "code coverage", "mocking in tests",
    "property-based testing", "refactoring", "design patterns", "the singleton pattern", "dependency injection",
    "the observer pattern", "pure functions", "recursion limits", "bit manipulation", "two's complement",
    "endianness", "compression", "hash functions", "random number generators", "gradient descent", "overfitting",
    "cross-validation", "embeddings", "attention in transformers", "tokenisation", "the Turing test",
    "the French Revolution", "the Roman Empire", "the printing press", "the industrial revolution", "the moon landing",
    "volcanoes", "earthquakes", "the immune system", "DNA", "evolution", "antibiotics", "the solar system",
    "renewable energy", "electric cars", "interest rates", "stocks and bonds", "budgeting", "healthy eating",
    "meditation", "learning a second language", "public speaking", "negotiation", "leadership", "time zones",
]
ASKS_2 = [
    "Can you explain {t} in simple terms?", "What should a junior developer know about {t}?",
    "Compare {t} with an alternative, briefly.", "Summarise the pros and cons of {t}.",
    "Explain {t} in three bullet points.", "How would you teach {t} to a friend?", "Tell me something surprising about {t}.",
]


def all_functions(root: Path, rng: random.Random, skip: set[str], limit: int, per_file: int = 3,
                  leave_out: frozenset = frozenset({"test", "tests", "idlelib", "site-packages"})):
    """Like functions(), from every module and subpackage, methods included, several per file."""
    files = sorted(p for p in root.rglob("*.py") if not leave_out & set(p.relative_to(root).parts))
    out = []
    for lines, nodes in documented_functions(files, rng):
        found = 0
        for node in nodes:
            whole = "".join(lines[node.lineno - 1: node.end_lineno])
            head = "".join(lines[node.lineno - 1: node.body[0].end_lineno])
            if len(whole) > 1500 or head in skip or node.end_lineno - node.lineno < 4:
                continue
            args = ", ".join(a.arg for a in node.args.args if a.arg != "self")
            out.append((textwrap.dedent(head), textwrap.dedent(whole), node.name, args, summary(node)))
            found += 1
            if found == per_file:
                break
        if len(out) >= limit:
            break
    return out


def math_prompt_2(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 12), rng.randint(13, 60), rng.randint(100, 5000)
    item = rng.choice(["apples", "books", "tickets", "pencils", "shirts", "plants", "cups of coffee"])
    templates = [
        f"What is {c} divided by {a}, to two decimal places? Show the division.",
        f"A shop sells {item} at {b} cents each. How much do {a * 7} {item} cost in dollars?",
        f"Convert {c} seconds into hours, minutes and seconds.",
        f"A train leaves at {rng.randint(6, 11)}:{rng.choice(['05', '20', '35', '50'])} and the trip takes {a} hours and {b} minutes. When does it arrive?",
        f"What is the least common multiple of {a} and {b}? Explain.",
        f"What is the greatest common divisor of {b * a} and {c}? Use Euclid's algorithm.",
        f"Simplify the fraction {a * b}/{a * c}.",
        f"A tank holds {c} litres and drains at {b} litres per minute. How long until it is empty?",
        f"Compute {a}^{rng.randint(2, 5)} and explain the steps.",
        f"A square has a perimeter of {4 * b} cm. What is its area?",
        f"A circle has radius {a} m. What are its circumference and area? Use pi = 3.14.",
        f"A price rises from {b} to {b + a} dollars. What is the percentage increase?",
        f"Solve the system: x + y = {b + a}, x - y = {b - a}.",
        f"A bag has {a} red and {b} blue marbles. What is the probability of drawing a red one?",
        f"If {item} cost {b} dollars for {a}, how much do {a * 3 + 1} cost?",
        f"What is the sum of the integers from 1 to {c}? Explain the formula.",
        f"Write {c} in binary and explain how.",
        f"{a} friends share a bill of {c / 10:.2f} euros equally and tip 10%. How much does each pay?",
        f"A runner covers {a + 3} km in {b} minutes. What is the pace per km?",
        f"Find x if {a}(x - {b}) = {c}.",
    ]
    return rng.choice(templates)


def round_two(rng: random.Random, root: Path, skip: set[str]) -> list[dict]:
    import pydoc_data.topics as doc_topics

    rows = []
    fns = all_functions(root, rng, skip, 560)
    for head, whole, name, fargs, desc in fns[:140]:  # complete a function from its signature and docstring
        rows.append({"prompt": head, "category": "code", "chat": False})
    for head, whole, name, fargs, desc in fns[140:260]:
        lang = "Python" if rng.random() < 0.5 else rng.choice(LANGS)
        rows.append({"prompt": f"Write a {lang} function `{name}({fargs})`: {desc}", "category": "code"})
    asks = ["Explain what this Python function does, step by step.", "Write pytest unit tests for this function.",
            "Add type hints to this function and explain your choices.", "Review this code: is there anything you would improve?",
            "Rewrite this function to be shorter and clearer.", "Translate this Python function into {lang}."]
    for head, whole, name, fargs, desc in fns[260:400]:
        ask = rng.choice(asks).format(lang=rng.choice(LANGS))
        rows.append({"prompt": f"{ask}\n\n```python\n{whole}```", "category": "code"})
    for task in TASKS:
        lang = "Python" if rng.random() < 0.7 else rng.choice(LANGS)
        rows.append({"prompt": f"Write a {lang} program that {task}.", "category": "code"})
    for t in TOPICS_2:
        for ask in rng.sample(ASKS_2, 2):
            rows.append({"prompt": ask.format(t=t), "category": "chat"})
    keys = [k for k in doc_topics.topics if len(doc_topics.topics[k]) > 400]
    title = lambda k: doc_topics.topics[k].strip().splitlines()[0].strip()
    for k in keys:
        rows.append({"prompt": f"{rng.choice(['Explain', 'Describe briefly', 'Give an example of'])} {title(k)} in Python.",
                     "category": "chat"})
    for _ in range(160):
        rows.append({"prompt": math_prompt_2(rng), "category": "math"})
    paras = [" ".join(p.split()) for k in keys for p in doc_topics.topics[k].split("\n\n")
             if 300 <= len(p) <= 1200 and "::=" not in p and ">>>" not in p and not p.startswith("   ")]
    sum_asks = ["Summarise the following paragraph in one sentence.", "Explain this passage in plain words.",
                "What is the main point of this text?", "Summarise this in two sentences for a beginner."]
    for p in rng.sample(paras, min(120, len(paras))):
        rows.append({"prompt": f"{rng.choice(sum_asks)}\n\n{p}", "category": "summarisation"})
    sents = sorted({s for k in keys for s in sentences(doc_topics.topics[k]) if '"' not in s})
    for s in rng.sample(sents, min(160, len(sents))):
        rows.append({"prompt": f'Translate into {rng.choice(TARGET_LANGS)}: "{s}"', "category": "translation"})
    return rows


TASKS_3 = [
    "How do I {task} in {lang}? Show a short example.", "Write a {lang} script that {task}.",
    "Show me idiomatic {lang} code that {task}, with comments.", "Write a function in {lang} that {task}, and explain it.",
]
ASKS_3 = [
    "What are the main differences between {t} and something similar? Answer in a few sentences.",
    "I keep hearing about {t}. What is it, and when should I care?", "Explain {t} simply, as you would to a ten-year-old.",
    "Give me three facts about {t}.", "What is a good way to get started with {t}?",
]
TIPS_3 = [
    "Give me three tips for {t}.", "I want to get better at {t}. Where should I start?",
    "What are the most common mistakes in {t}?", "I have to do {t} tomorrow. How should I prepare?",
]


def round_three(rng: random.Random, root: Path, skip: set[str]) -> list[dict]:
    """Code from the installed packages (hybrid's dependencies), and new pairings of rounds 1-2's topics."""
    rows = []
    fns = all_functions(root, rng, skip, 330, per_file=2,
                        leave_out=frozenset({"test", "tests", "testing", "_vendor", "vendored", "hybrid"}))
    for head, whole, name, fargs, desc in fns[:110]:
        rows.append({"prompt": head, "category": "code", "chat": False})
    for head, whole, name, fargs, desc in fns[110:230]:
        lang = "Python" if rng.random() < 0.6 else rng.choice(LANGS)
        rows.append({"prompt": f"Write a {lang} function `{name}({fargs})` that does this: {desc}", "category": "code"})
    asks = ["Explain what this function does.", "Write unit tests for this function with pytest.",
            "Is there a bug in this code? Explain.", "Simplify this function.", "Document this function with a docstring."]
    for head, whole, name, fargs, desc in fns[230:330]:
        rows.append({"prompt": f"{rng.choice(asks)}\n\n```python\n{whole}```", "category": "code"})
    for task in TASKS:
        for ask in rng.sample(TASKS_3, 2):
            verb, rest = task.split(" ", 1)  # "How do I implement ...", not "implements"
            rows.append({"prompt": ask.format(task=f"{verb.removesuffix('s')} {rest}" if ask.startswith("How do I") else task,
                                              lang=rng.choice(["Python", "Python"] + LANGS)), "category": "code"})
    for t in rng.sample(TOPICS + TOPICS_2, 120):
        rows.append({"prompt": rng.choice(ASKS_3 + ASKS + ASKS_2).format(t=t), "category": "chat"})
    for t in TIPS:
        for ask in rng.sample(TIPS_3, 3):
            rows.append({"prompt": ask.format(t=t), "category": "chat"})
    for _ in range(60):
        rows.append({"prompt": (math_prompt if rng.random() < 0.5 else math_prompt_2)(rng), "category": "math"})
    docs = [(f.stem, d) for f in sorted(root.glob("*/__init__.py"))[:400]
            for d in [_docstring(f)] if d]
    sum_asks = ["Summarise the following paragraph in one sentence.", "Give a short summary of the following paragraph.",
                "Summarise the key points of this paragraph as a bulleted list.", "Summarise this text in two sentences."]
    return rows + doc_prompts(docs, rng, sum_asks, 50, 50)


def round_four(rng: random.Random, root: Path, seen_text: str) -> list[dict]:
    """More of round 3's kinds, weighted to code: functions of the installed packages that no earlier round
    used (neither their source nor their `name(` appears in an earlier prompt), three per file."""
    fns = [f for f in all_functions(root, rng, set(), 2000, per_file=3,
                                    leave_out=frozenset({"test", "tests", "testing", "_vendor", "vendored", "hybrid"}))
           if f[0] not in seen_text and f"`{f[2]}(" not in seen_text]
    rows = []
    for head, whole, name, fargs, desc in fns[:150]:
        rows.append({"prompt": head, "category": "code", "chat": False})
    for head, whole, name, fargs, desc in fns[150:300]:
        lang = "Python" if rng.random() < 0.6 else rng.choice(LANGS)
        rows.append({"prompt": f"Write a {lang} function `{name}({fargs})` that does this: {desc}", "category": "code"})
    asks = ["Explain what this function does.", "Write unit tests for this function with pytest.",
            "Is there a bug in this code? Explain.", "Simplify this function.", "Document this function with a docstring.",
            "Add type hints to this function.", "Rewrite this function in {lang}."]
    for head, whole, name, fargs, desc in fns[300:450]:
        ask = rng.choice(asks).format(lang=rng.choice(LANGS))
        rows.append({"prompt": f"{ask}\n\n```python\n{whole}```", "category": "code"})
    for t in rng.sample(TOPICS + TOPICS_2, min(150, len(TOPICS + TOPICS_2))):
        rows.append({"prompt": rng.choice(ASKS_3 + ASKS + ASKS_2).format(t=t), "category": "chat"})
    for _ in range(60):
        rows.append({"prompt": (math_prompt if rng.random() < 0.5 else math_prompt_2)(rng), "category": "math"})
    files = [f for f in sorted(root.glob("*/*.py")) if f.name != "__init__.py"]  # round 3 read the __init__s
    docs = [(f.stem, d) for f in rng.sample(files, min(800, len(files))) for d in [_docstring(f)] if d]
    sum_asks = ["Summarise the following paragraph in one sentence.", "Give a short summary of the following paragraph.",
                "Summarise the key points of this paragraph as a bulleted list.", "Summarise this text in two sentences."]
    return rows + doc_prompts(docs, rng, sum_asks, 50, 50)


def doc_prompts(docs: list[tuple[str, str]], rng: random.Random, asks: list[str], summaries: int,
                translations: int) -> list[dict]:
    """Summarisation prompts from the docstrings' paragraphs and translation prompts from their sentences."""
    rows = []
    paras = [p for _, d in docs for p in d.split("\n\n") if 250 <= len(p) <= 1200 and ">>>" not in p]
    for p in rng.sample(paras, min(summaries, len(paras))):
        rows.append({"prompt": f"{rng.choice(asks)}\n\n{' '.join(p.split())}", "category": "summarisation"})
    sents = sorted({s for _, d in docs for s in sentences(d)})
    for s in rng.sample(sents, min(translations, len(sents))):
        rows.append({"prompt": f'Translate into {rng.choice(TARGET_LANGS)}: "{s}"', "category": "translation"})
    return rows


def _docstring(f: Path) -> str | None:
    try:
        return ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--human-eval", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "train-prompts.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round", type=int, default=1, choices=[1, 2, 3, 4])
    args = ap.parse_args()
    data = Path(__file__).resolve().parents[1] / "data"
    root = Path(sysconfig.get_paths()["stdlib"])
    if args.round == 4:
        out = args.out if args.out != data / "train-prompts.jsonl" else data / "train-prompts-4.jsonl"
        earlier = [json.loads(l)["prompt"] for n in ("", "-2", "-3") for l in (data / f"train-prompts{n}.jsonl").read_text().splitlines()]
        purelib = Path(sysconfig.get_paths()["purelib"])
        seen = set(earlier)
        rows = [r for r in round_four(random.Random(args.seed + 4), purelib, "\n".join(earlier)) if r["prompt"] not in seen]
        return write(rows, out, data.parent / "bench" / "prompts.jsonl")
    if args.round == 3:
        out = args.out if args.out != data / "train-prompts.jsonl" else data / "train-prompts-3.jsonl"
        seen = {json.loads(l)["prompt"] for n in ("", "-2") for l in (data / f"train-prompts{n}.jsonl").read_text().splitlines()}
        purelib = Path(sysconfig.get_paths()["purelib"])
        rows = [r for r in round_three(random.Random(args.seed + 3), purelib, seen) if r["prompt"] not in seen]
        return write(rows, out, data.parent / "bench" / "prompts.jsonl")
    if args.round == 2:
        out = args.out if args.out != data / "train-prompts.jsonl" else data / "train-prompts-2.jsonl"
        seen = {json.loads(l)["prompt"] for l in (data / "train-prompts.jsonl").read_text().splitlines()}
        rows = [r for r in round_two(random.Random(args.seed + 2), root, seen) if r["prompt"] not in seen]
        return write(rows, out, data.parent / "bench" / "prompts.jsonl")
    rng = random.Random(args.seed)
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
    asks = ["Summarise the following paragraph in one sentence.", "Summarise this text in two sentences.",
            "Give a short summary of the following text.", "Summarise the key points as a bulleted list."]
    rows += doc_prompts(docs, rng, asks, 150, 200)
    write(rows, args.out, data.parent / "bench" / "prompts.jsonl")


def write(rows: list[dict], out: Path, bench_file: Path) -> None:
    """Write rows as JSONL, leaving out any bench prompt and any repeat."""
    bench = {json.loads(l)["prompt"] for l in bench_file.read_text().splitlines()}
    seen, kept = set(), []
    for r in rows:
        if r["prompt"] not in bench and r["prompt"] not in seen:
            seen.add(r["prompt"])
            kept.append(r)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    counts = {}
    for r in kept:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    print(f"{len(kept)} prompts -> {out}: {counts}")


if __name__ == "__main__":
    main()

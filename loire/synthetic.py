"""A deterministic synthetic five-domain stream, laid out like `shared/data`, for demos and tests.

Each domain (WB, NEWS, REV, BIO, CS) has its own vocabulary of topic words and sentence templates,
so a model trained on one domain has something to forget on the next (the perplexity matrix and
AP+ mean something), and shares function words with the others (so growth and distillation have
something to transfer). Every domain also gets one downstream classification task: the document's
sub-topic (three classes), with train/dev/test files and a task catalogue in `loire.downstream`'s
format. Same seed, same bytes.

Layout written under `root`:
    corpora/<domain>/train.jsonl            {"text": ...} per document (lower-case folder names)
    <domain>_topic/{train,dev,test}.jsonl   {"text": ..., "label": ...}
    tasks.yaml                              the catalogue of the five tasks
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from loire.domains import DOMAINS

# Per domain: three sub-topics (the downstream labels), each with its own content words.
_TOPICS: dict[str, dict[str, list[str]]] = {
    "WB": {
        "history": ["empire", "dynasty", "treaty", "century", "king", "revolution", "battle", "colony"],
        "geography": ["river", "mountain", "valley", "province", "coast", "island", "climate", "border"],
        "music": ["album", "singer", "band", "guitar", "concert", "label", "chart", "melody"],
    },
    "NEWS": {
        "politics": ["senator", "election", "minister", "parliament", "vote", "policy", "campaign", "bill"],
        "markets": ["shares", "investors", "stocks", "inflation", "earnings", "bank", "trading", "profit"],
        "sports": ["coach", "season", "striker", "league", "match", "title", "injury", "goal"],
    },
    "REV": {
        "electronics": ["battery", "screen", "charger", "headphones", "bluetooth", "remote", "cable", "speaker"],
        "kitchen": ["blender", "knife", "pan", "kettle", "oven", "mixer", "toaster", "lid"],
        "movies": ["plot", "actor", "director", "scene", "sequel", "ending", "script", "villain"],
    },
    "BIO": {
        "genetics": ["gene", "mutation", "allele", "chromosome", "expression", "promoter", "transcript", "locus"],
        "clinical": ["patients", "trial", "dose", "placebo", "cohort", "therapy", "symptoms", "outcome"],
        "proteins": ["enzyme", "receptor", "kinase", "binding", "inhibitor", "substrate", "domain", "ligand"],
    },
    "CS": {
        "learning": ["network", "gradient", "training", "loss", "embedding", "classifier", "layer", "dataset"],
        "systems": ["kernel", "cache", "latency", "thread", "scheduler", "memory", "throughput", "disk"],
        "theory": ["theorem", "proof", "lemma", "complexity", "graph", "bound", "polynomial", "reduction"],
    },
}

_TEMPLATES: dict[str, list[str]] = {
    "WB": ["The {a} of the {b} is known for its {c}.", "In the early years, the {a} shaped the {b} and the {c}."],
    "NEWS": [
        "Officials said the {a} would affect the {b} this week.",
        "The {a} reported that the {b} rose after the {c}.",
    ],
    "REV": ["I bought this {a} and the {b} stopped working after a week.", "Great {a}, but the {b} feels cheap."],
    "BIO": ["We observed that the {a} regulates the {b} in the {c}.", "Expression of the {a} was reduced by the {b}."],
    "CS": ["We propose a {a} that reduces the {b} of the {c}.", "Our {a} improves the {b} on every {c}."],
}
_FILLERS = ["and", "however", "moreover", "also", "in particular", "as expected", "in contrast"]


def _document(rng: random.Random, domain: str, topic: str, sentences: int) -> str:
    words = _TOPICS[domain][topic]
    parts = []
    for _ in range(sentences):
        template = rng.choice(_TEMPLATES[domain])
        a, b, c = rng.sample(words, 3)
        sentence = template.format(a=a, b=b, c=c)
        if rng.random() < 0.3:
            sentence = f"{rng.choice(_FILLERS).capitalize()}, {sentence[0].lower()}{sentence[1:]}"
        parts.append(sentence)
    return " ".join(parts)


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def generate(
    root: str | Path, *, documents: int = 400, task_examples: int = 120, eval_examples: int | None = None, seed: int = 0
) -> Path:
    """Write the five corpora, five downstream tasks and `tasks.yaml` under `root`; returns `root`.

    Each task has `task_examples` training rows and `eval_examples` dev and test rows each (default a
    third of the training rows).
    """
    held_out = task_examples // 3 if eval_examples is None else eval_examples
    out = Path(root)
    catalogue: dict[str, object] = {"version": 1, "tasks": {}}
    for index, domain in enumerate(DOMAINS):
        rng = random.Random(seed * 1000 + index)
        topics = sorted(_TOPICS[domain])
        docs = [{"text": _document(rng, domain, rng.choice(topics), rng.randint(3, 8))} for _ in range(documents)]
        _write_jsonl(out / "corpora" / domain.lower() / "train.jsonl", docs)
        task = f"{domain.lower()}_topic"
        for split, n in (("train", task_examples), ("dev", held_out), ("test", held_out)):
            rows = []
            for _ in range(n):
                topic = rng.choice(topics)
                rows.append({"text": _document(rng, domain, topic, rng.randint(1, 3)), "label": topic})
            _write_jsonl(out / task / f"{split}.jsonl", rows)
        catalogue["tasks"][task] = {  # type: ignore[index]
            "domain": domain,
            "paper_task": f"synthetic {domain} sub-topic classification (3 classes)",
            "note": "generated by loire.synthetic (deterministic); not a task of the paper",
            "files": {s: f"{task}/{s}.jsonl" for s in ("train", "dev", "test")},
            "labels": topics,
            "metric": "macro_f1",
            "max_length": 64,
            "epochs": 6,
            "lr": 3.0e-3,
            "patience": 2,
            "seeds": [0],
        }
    (out / "tasks.yaml").write_text(yaml.safe_dump(catalogue, sort_keys=False))
    return out


__all__ = ["DOMAINS", "generate"]

"""A tiny corpus in the `codellm data build` layout (JSONL shards per split + manifest.json) for training tests."""

from __future__ import annotations

import json
from pathlib import Path

PYTHON_DOC = '''\
import math


def area_{i}(radius: float) -> float:
    """Return the area of a circle with the given radius."""
    return math.pi * radius ** 2 + {i}


class Counter{i}:
    def increment(self, by: int = 1) -> int:
        """Add `by` to the counter and return the new value."""
        self.value = getattr(self, "value", 0) + by
        return self.value


def _helper():
    """Too short."""
    return None
'''

JS_DOC = '''\
function add{i}(a, b) {{
  // sum of two numbers
  return a + b + {i};
}}
'''


def make_corpus(root: Path, n_train: int = 24, n_val: int = 6, long_every: int = 0) -> Path:
    """Python and JavaScript documents; with `long_every`, every such document is ~40x longer."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        docs = []
        for i in range(n):
            lang = "python" if i % 3 else "javascript"
            text = (PYTHON_DOC if lang == "python" else JS_DOC).format(i=i)
            if long_every and i % long_every == 0:
                text *= 40
            path = f"pkg{i}/mod{i}.{'py' if lang == 'python' else 'js'}"
            docs.append({"text": text, "path": path, "lang": lang, "package": f"pkg{i}", "license": "MIT"})
        name = f"{split}-00000.jsonl"
        (root / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
        splits[split] = {"docs": n, "shards": [{"file": name, "docs": n}]}
    (root / "manifest.json").write_text(json.dumps({"format": "codellm-corpus/1", "splits": splits}))
    return root

"""Reading a corpus directory (`codellm data build`): its manifest and its JSONL document shards.

There are no token shards: every training stage reads the documents as text, because what it trains on is
made from the text (infilling examples split documents at character positions, as the Code Llama paper
does; the python stage keeps documents by language; sft mines docstrings from the source), and the data
workers (`--data-workers`) tokenize as the GPU trains.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from codellm.data.build import FORMAT as CORPUS_FORMAT
from codellm.errors import UserError


def read_corpus(corpus: Path, split: str) -> Iterator[dict]:
    """Documents of one split of a corpus dir, in order."""
    manifest = load_manifest(corpus, CORPUS_FORMAT, "--corpus")
    for shard in manifest["splits"][split]["shards"]:
        with open(Path(corpus) / shard["file"], encoding="utf-8") as f:
            yield from (json.loads(line) for line in f)


def load_manifest(root: Path, fmt: str, flag: str) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{flag} {root}: no manifest.json (not a {fmt} directory)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != fmt:
        raise UserError(f"{flag} {root}: manifest format is {manifest.get('format')!r}, expected {fmt!r}")
    return manifest

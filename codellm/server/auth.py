"""API keys (`Authorization: Bearer KEY`) and SageMaker's EULA attribute.

Keys come from --api-key and from --api-key-file (one per line; blank lines and `#` comments skipped). The
check compares the given token with every key in constant time. When keys are set, every route needs
one except /health, /ping and the playground page (it holds no data and asks for the key itself).

Gated models. Meta's Code Llama repositories gate downloads behind a licence (`license: llama2` and
`extra_gated_*` keys in the README front matter); SageMaker JumpStart endpoints for such models refuse
/invocations unless the caller passes `CustomAttributes="accept_eula=true"`, which SageMaker forwards as
the `X-Amzn-SageMaker-Custom-Attributes` header. `eula_required` reads the front matter; --require-eula
and --no-require-eula override it.
"""

from __future__ import annotations

import hmac
import re
from pathlib import Path

from codellm.errors import UserError

EULA_HEADER = "x-amzn-sagemaker-custom-attributes"
EULA_MESSAGE = (
    "Need to pass custom_attributes='accept_eula=true' as part of header. This means you have read and "
    "accept the end-user-license-agreement (EULA) of the model. EULA can be found in model card "
    "description or from https://ai.meta.com/resources/models-and-libraries/llama-downloads/."
)


def load_keys(keys: list[str], files: list[Path]) -> list[bytes]:
    out = [k.strip() for k in keys]
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise UserError(f"--api-key-file {path}: {e.strerror}") from None
        found = [s for line in lines if (s := line.strip()) and not s.startswith("#")]
        if not found:
            raise UserError(f"--api-key-file {path}: no key in it (one key per line)")
        out += found
    if any(not k or any(c.isspace() for c in k) for k in out):
        raise UserError("API keys must be non-empty and contain no spaces")
    return [k.encode() for k in out]


def authorized(keys: list[bytes], header: str | None) -> bool:
    """True if no keys are set, or `header` is `Bearer <one of the keys>` (compared in constant time)."""
    if not keys:
        return True
    scheme, _, token = (header or "").strip().partition(" ")
    given, match = token.strip().encode(), False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        match |= hmac.compare_digest(given, key)
    return match and scheme.lower() == "bearer"


def custom_attributes(header: str | None) -> dict[str, str]:
    """`k=v` pairs separated by `;` or `,`; keys lower-cased; the last value of a repeated key wins."""
    out = {}
    for part in re.split(r"[;,]", header or ""):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            out[key.strip().lower()] = value.strip()
    return out


def eula_accepted(header: str | None) -> bool:
    return custom_attributes(header).get("accept_eula", "").lower() == "true"


def eula_required(model_dir: Path) -> bool:
    """Whether the model card gates the model: `extra_gated_*` keys or a Llama licence in its front matter."""
    for name in ("README.md", "MODEL_CARD.md"):
        path = model_dir / name
        if path.is_file():
            meta = front_matter(path.read_text(errors="replace"))
            if any(k.startswith("extra_gated_") for k in meta) or meta.get("license", "").startswith("llama"):
                return True
    return False


def front_matter(text: str) -> dict[str, str]:
    """Top-level `key: value` lines of a README's leading `---` block (enough YAML for these keys)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if m := re.match(r"([A-Za-z0-9_]+)\s*:\s*(.*)$", line):
            out[m.group(1)] = m.group(2).strip().strip("'\"").lower()
    return out

"""Where corpus files come from: source trees, site-packages, archives; language by extension; licences.

A source yields `Package`s: one split unit (a dist, an npm package, a stdlib top-level module) with one
licence and a list of candidate files. `open_source(path)` picks the reader from what is on disk:

- an archive file (.whl, .zip, .tar.gz, .tgz, ...)    -> one package; licence from the metadata inside
- a dir holding `*.dist-info` (site-packages-like)     -> one package per dist, files from RECORD
- a dir with package.json, PKG-INFO or a LICENSE file  -> one package
- any other dir (node_modules, a folder of archives)   -> each child is opened as a package

Inside a package, VCS/cache dirs, nested node_modules and site-packages are skipped (they are other
packages: pass them as sources of their own). Archive-backed packages read from an open archive, so
process each package before asking for the next.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import sysconfig
import tarfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from codellm.errors import UserError

LANG_BY_EXT = {
    ".py": "python", ".pyi": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp",
    ".java": "java", ".php": "php", ".cs": "csharp", ".sh": "bash", ".bash": "bash",
    ".go": "go", ".rs": "rust",
    ".md": "markdown", ".rst": "rst",  # natural language about code
}
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".tox", ".venv", "site-packages",
             "dist-packages"}
ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
META_FILES = ("METADATA", "PKG-INFO", "package.json", "pyproject.toml")
LICENSE_FILE = re.compile(r"(?i)^(licen[cs]e|copying|unlicense)([-._].*)?$")

# (label, permissive, pattern). Earliest match in the text wins, so a BSD text that later quotes a
# GPL notice for a bundled library is BSD.
_FAMILIES = [(label, ok, re.compile(pattern, re.I)) for label, ok, pattern in [
    ("AGPL", False, r"\bAGPL|Affero General Public"),
    ("LGPL", False, r"\bLGPL|Lesser General Public|Library General Public|GNU Library or Lesser"),
    ("GPL", False, r"\bGPL|General Public License"),
    ("MPL", False, r"\bMPL\b|Mozilla Public"),
    ("EPL", False, r"\bEPL\b|Eclipse Public"),
    ("CDDL", False, r"\bCDDL\b|Common Development and Distribution"),
    ("EUPL", False, r"\bEUPL\b|European Union Public"),
    ("SSPL", False, r"\bSSPL\b|Server Side Public"),
    ("CC-BY-NC", False, r"\bCC[- ]BY[- ]NC|NonCommercial"),
    ("Artistic", False, r"\bArtistic\b"),  # permissive only under some readings: excluded to be safe
    ("Proprietary", False, r"\bproprietary\b"),
    ("MIT", True, r"\bMIT\b|\bExpat\b|Permission is hereby granted, free of charge"),
    ("BSD", True, r"\b(0|Free|Net|Open)?BSD\b|Redistribution and use in source and binary forms"),
    ("Apache-2.0", True, r"\bApache\b"),
    ("PSF-2.0", True, r"\bPSF|Python Software Foundation|\bPython-2\.0|\bCNRI"),
    ("ISC", True, r"\bISC\b|Permission to use, copy, modify, and/?or distribute this software for any"),
    ("Unlicense", True, r"\bUnlicense\b|free and unencumbered software released into the public domain"),
    ("CC0-1.0", True, r"\bCC0\b"),
    ("Zlib", True, r"\bzlib\b"),
    ("BSL-1.0", True, r"\bBSL-1\.0\b|Boost Software License"),
    ("HPND", True, r"\bHPND\b|Historical Permission Notice"),
    ("BlueOak-1.0.0", True, r"\bBlueOak\b|Blue Oak Model License"),
    ("ZPL", True, r"\bZPL\b|Zope Public License"),
    ("TCL", True, r"\bTCL\b"),
    ("Public-Domain", True, r"\bpublic domain\b"),
]]


@dataclass(frozen=True)
class License:
    name: str  # family label ("MIT", "GPL", ...), an SPDX expression, or "unknown"
    permissive: bool
    evidence: str  # where it was read, e.g. "METADATA License-Expression", "LICENSE"


UNKNOWN = License("unknown", False, "no licence metadata or LICENSE file found")
PSF = License("PSF-2.0", True, "Python standard library")


@dataclass
class Package:
    name: str  # the split unit
    source: str  # the path the package came from
    license: License
    files: list[tuple[str, int]]  # (relative path, size in bytes) of files with a known language
    read: Callable[[str], bytes]


def language(path: str) -> str | None:
    return LANG_BY_EXT.get(os.path.splitext(path)[1].lower())


def classify(text: str) -> tuple[str, bool] | None:
    """(family, permissive) of the earliest licence name or phrase in `text`, None if none is known."""
    hits = [(m.start(), i) for i, (_, _, rx) in enumerate(_FAMILIES) if (m := rx.search(text[:20000]))]
    if not hits:
        return None
    label, ok, _ = _FAMILIES[min(hits)[1]]
    return label, ok


def classify_expression(expr: str, evidence: str) -> License | None:
    """SPDX expression: any permissive choice under OR suffices; with AND every part must be permissive."""
    words = re.findall(r"[\w.+-]+", expr)
    # operators are not licences, nor is the exception named after WITH
    ids = [w for i, w in enumerate(words)
           if w.upper() not in ("AND", "OR", "WITH") and (i == 0 or words[i - 1].upper() != "WITH")]
    found = [classify(i) for i in ids]
    if not any(found):
        return None
    oks = [bool(f and f[1]) for f in found]
    return License(expr, all(oks) if " AND " in expr.upper() else any(oks), evidence)


def _combine(found: list[tuple[str, bool]], evidence: str) -> License | None:
    """Several classifiers or licence files: permissive only if all of them are (conservative)."""
    if not found:
        return None
    names = sorted({name for name, _ in found})
    return License(" + ".join(names), all(ok for _, ok in found), evidence)


def license_from_core_metadata(text: str) -> License | None:
    """METADATA / PKG-INFO: License-Expression, then classifiers, then the free-text License field."""
    msg = email.parser.HeaderParser().parsestr(text)
    if expr := msg.get("License-Expression"):
        return classify_expression(expr, "METADATA License-Expression")
    classifiers = [c.split("::", 1)[1] for c in msg.get_all("Classifier") or [] if c.startswith("License ::")]
    if lic := _combine([f for c in classifiers if (f := classify(c))], "METADATA classifiers"):
        return lic
    field = (msg.get("License") or "").strip()
    if field and field.upper() != "UNKNOWN" and (found := classify(field)):
        return License(found[0], found[1], "METADATA License")
    return None


def _json_object(text: str) -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def license_from_package_json(text: str) -> License | None:
    meta = _json_object(text)
    lic = meta.get("license") or meta.get("licenses") or ""
    if isinstance(lic, dict):  # legacy {"type": "MIT", "url": ...}
        lic = lic.get("type", "")
    if isinstance(lic, list):  # legacy list of alternatives
        lic = " OR ".join(x.get("type", "") for x in lic if isinstance(x, dict))
    if not isinstance(lic, str) or lic.upper().startswith("SEE LICENSE"):
        return None  # "SEE LICENSE IN <file>": the LICENSE file decides
    return classify_expression(lic, "package.json license")


def license_from_pyproject(text: str) -> License | None:
    try:
        lic = tomllib.loads(text).get("project", {}).get("license")
    except tomllib.TOMLDecodeError:
        return None
    if isinstance(lic, str):  # PEP 639 SPDX expression
        return classify_expression(lic, "pyproject.toml license")
    if isinstance(lic, dict) and (found := classify(lic.get("text", ""))):
        return License(found[0], found[1], "pyproject.toml license.text")
    return None  # {file = ...}: the licence file decides


def _shallowest(meta: dict[str, str]) -> dict[str, str]:
    """{file name: text}, taking the file nearest the package root when a name occurs twice."""
    return {path.rsplit("/", 1)[-1]: meta[path] for path in sorted(meta, key=lambda p: -p.count("/"))}


def detect_license(meta: dict[str, str]) -> License:
    """Licence from metadata and licence files, given as {relative path: text}; metadata wins over files."""
    by_name = _shallowest(meta)
    readers = [("METADATA", license_from_core_metadata), ("PKG-INFO", license_from_core_metadata),
               ("package.json", license_from_package_json), ("pyproject.toml", license_from_pyproject)]
    for name, reader in readers:
        if name in by_name and (lic := reader(by_name[name])):
            return lic
    found = {p: f for p, text in sorted(meta.items())
             if LICENSE_FILE.match(p.rsplit("/", 1)[-1]) and (f := classify(text))}
    return _combine(list(found.values()), "licence file " + ", ".join(found)) or UNKNOWN


def package_name(meta: dict[str, str], fallback: str) -> str:
    """Dist name (PEP 503 normalised) or npm name, so all versions of a package share a split."""
    by_name = _shallowest(meta)
    for core in ("METADATA", "PKG-INFO"):
        if core in by_name and (name := email.parser.HeaderParser().parsestr(by_name[core])["Name"]):
            return re.sub(r"[-_.]+", "-", name).lower()
    name = _json_object(by_name.get("package.json", "{}")).get("name")
    return name if isinstance(name, str) and name else fallback


def _is_meta(path: str) -> bool:
    """Metadata at the package root or in its *.dist-info (licence files also under dist-info/licenses)."""
    parts = path.split("/")
    in_dist_info = len(parts) > 1 and parts[0].endswith(".dist-info")
    if not (len(parts) == 1 or in_dist_info):
        return False
    return parts[-1] in META_FILES or bool(LICENSE_FILE.match(parts[-1]))


def _is_code(path: str) -> bool:
    return bool(language(path)) and not any(_skip_dir(d) for d in path.split("/")[:-1])


def _text(data: bytes) -> str:
    return data[:200_000].decode("utf-8", errors="replace")


def _walk(root: Path) -> Iterator[tuple[str, int]]:
    """(path relative to root, size) of code files, in sorted order for determinism."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        rel_dir = os.path.relpath(dirpath, root)
        for f in sorted(filenames):
            rel = f if rel_dir == "." else f"{rel_dir}/{f}".replace(os.sep, "/")
            if language(f) and os.path.isfile(full := os.path.join(dirpath, f)):
                yield rel, os.path.getsize(full)


def _skip_dir(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith(".") or name.endswith((".dist-info", ".egg-info"))


def _reader(root: Path) -> Callable[[str], bytes]:
    return lambda rel: (root / rel).read_bytes()


@dataclass
class Source:
    path: str
    kind: str  # archive | site-packages | package-dir | container | stdlib
    packages: Callable[[], Iterator[Package]]


def dir_package(root: Path, source: str) -> Package:
    meta = {p.name: _text(p.read_bytes()) for p in sorted(root.iterdir()) if p.is_file() and _is_meta(p.name)}
    return Package(package_name(meta, root.name), source, detect_license(meta), list(_walk(root)), _reader(root))


def _record_files(site: Path, dist: Path) -> list[tuple[str, int]]:
    """Code files a dist installed, from RECORD (or top_level.txt when RECORD is missing)."""
    if (dist / "RECORD").is_file():
        rows = [line.rsplit(",", 2)[0] for line in (dist / "RECORD").read_text(errors="replace").splitlines()]
        paths = sorted({r.strip('"') for r in rows if r and not r.startswith(("..", "/")) and _is_code(r)})
        return [(p, (site / p).stat().st_size) for p in paths if (site / p).is_file()]
    files = []
    for top in (dist / "top_level.txt").read_text().split() if (dist / "top_level.txt").is_file() else []:
        if (site / top).is_dir():
            files += [(f"{top}/{rel}", size) for rel, size in _walk(site / top)]
        elif (site / f"{top}.py").is_file():
            files.append((f"{top}.py", (site / f"{top}.py").stat().st_size))
    return files


def _site_packages(site: Path, source: str) -> Iterator[Package]:
    for dist in sorted(site.glob("*.dist-info")):
        rels = {p.relative_to(site).as_posix(): p for p in sorted(dist.rglob("*")) if p.is_file()}
        meta = {rel: _text(p.read_bytes()) for rel, p in rels.items() if _is_meta(rel)}
        name = package_name(meta, dist.name.split("-")[0])
        yield Package(name, source, detect_license(meta), _record_files(site, dist), _reader(site))


def _archive_packages(path: Path) -> Iterator[Package]:
    """One package from a wheel, sdist, npm tarball or zip; the archive stays open while it is used."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            sizes = {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}
            yield _archive_package(path, sizes, zf.read)
        return
    try:
        tf = tarfile.open(path)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{path}: not a readable zip or tar archive ({e})") from e
    with tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        read = lambda name: tf.extractfile(members[name]).read()  # noqa: E731
        yield _archive_package(path, {n: m.size for n, m in members.items()}, read)


def _archive_package(path: Path, sizes: dict[str, int], read: Callable[[str], bytes]) -> Package:
    tops = {n.split("/", 1)[0] for n in sizes}
    prefix = f"{tops.pop()}/" if len(tops) == 1 and all("/" in n for n in sizes) else ""  # sdist/npm root
    rel = {n[len(prefix):]: s for n, s in sizes.items()}
    meta = {r: _text(read(prefix + r)) for r in sorted(rel) if _is_meta(r)}
    fallback = re.split(r"-\d", path.name, maxsplit=1)[0].split(".")[0]
    files = sorted((r, s) for r, s in rel.items() if _is_code(r))
    return Package(package_name(meta, fallback), str(path), detect_license(meta), files,
                   lambda r: read(prefix + r))


def _children(root: Path, source: str) -> Iterator[Package]:
    for child in sorted(root.iterdir()):
        if child.is_file() and child.name.endswith(ARCHIVE_SUFFIXES):
            yield from _archive_packages(child)
        elif child.is_dir() and child.name.startswith("@"):  # npm scope: @scope/name
            yield from _children(child, source)
        elif child.is_dir() and not _skip_dir(child.name):
            yield dir_package(child, source)


def open_source(path: Path) -> Source:
    """Pick the reader for `path` (see the module docstring)."""
    path = Path(path)
    src = str(path)
    if not path.exists():
        raise UserError(f"--source {path}: no such file or directory")
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"--source {path}: a file must be an archive ({' '.join(ARCHIVE_SUFFIXES)})")
        return Source(src, "archive", lambda: _archive_packages(path))
    if any(path.glob("*.dist-info")):
        return Source(src, "site-packages", lambda: _site_packages(path, src))
    if any(_is_meta(p.name) for p in path.iterdir() if p.is_file()):
        return Source(src, "package-dir", lambda: iter([dir_package(path, src)]))
    return Source(src, "container", lambda: _children(path, src))


def stdlib_source(root: Path | None = None) -> Source:
    """The Python standard library: PSF licence, each top-level module or package is a split unit."""
    root = Path(root or sysconfig.get_paths()["stdlib"])

    def packages() -> Iterator[Package]:
        for child in sorted(root.iterdir()):
            if child.is_dir() and not _skip_dir(child.name) and (child / "__init__.py").is_file():
                files = [(f"{child.name}/{rel}", size) for rel, size in _walk(child)]
            elif child.is_file() and language(child.name):
                files = [(child.name, child.stat().st_size)]
            else:
                continue  # lib-dynload, config-*, site-packages, data dirs
            yield Package(f"stdlib/{child.name.removesuffix('.py')}", str(root), PSF, files, _reader(root))

    return Source(str(root), "stdlib", packages)

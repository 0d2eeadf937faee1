"""Where a ``model.name`` or ``data.path`` points -- a local path, a hub name, or a built-in -- checked without I/O
beyond the file system, so ``fastft train`` rejects a typo in seconds instead of after a hub timeout or a model load.

The hard case is a name such as ``models/nope``: it has the shape of a hub repo id (``org/name``). It is read as a
local path when it cannot be a hub id (see :func:`why_not_hub`); anything that can be one is passed through to the
hub, which has the last word.
"""

from __future__ import annotations

import difflib
import os

#: Local data files fastft reads, by extension -> the ``datasets`` builder that reads them.
LOCAL_DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ACCEPTED_DATA_FILES = ", ".join(LOCAL_DATA_BUILDERS)
BUILTIN_PREFIX = "builtin:"
#: builtin:arithmetic (operands 0..20) or builtin:arithmetic:N (operands 0..N).
BUILTIN_DATASETS = ("arithmetic",)
TINY_PREFIX = "tiny:"
#: huggingface.co/models, /datasets and /spaces are the site's own listings, so no user or organization has these
#: names: ``models/x`` can only be a local path.
HUB_RESERVED_NAMESPACES = ("models", "datasets", "spaces")
MODEL_NAME_FORMS = (
    "an existing local model directory with config.json, a hub name like 'Qwen/Qwen2.5-0.5B', or tiny:<arch> for tests"
)


def why_not_hub(name: str) -> str | None:
    """Why ``name`` cannot be a Hugging Face repo id (so it can only be a local path), or None if it can be one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(name):
        return "it starts like a file-system path"
    if "\\" in name:
        return "it contains a backslash"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return "it is not of the form 'name' or 'org/name'"
    namespace = name.split("/", 1)[0] if "/" in name else None
    if namespace in HUB_RESERVED_NAMESPACES:
        return f"the hub has no user or organization called {namespace!r}"
    if namespace is not None and os.path.isdir(namespace):
        return f"{namespace + '/'!r} is a local directory"
    return None


def closest_path(path: str) -> str | None:
    """The existing entry next to ``path`` whose name is closest to its last part, spelled as the user spelled the
    directory part; None if there is none close enough."""
    directory, base = os.path.split(path.rstrip("/"))
    real = os.path.expanduser(directory or ".")
    if not base or not os.path.isdir(real):
        return None
    close = difflib.get_close_matches(base, sorted(os.listdir(real)), n=1, cutoff=0.6)
    return os.path.join(directory, close[0]) if close else None


def _did_you_mean_path(path: str, fallback: str = "") -> str:
    """ "; did you mean 'x'?" for the closest existing sibling of ``path``; else ", nor does 'dir/'" when the
    directory part is missing too, followed by ``fallback`` (another hint)."""
    close = closest_path(path)
    if close is not None:
        return f"; did you mean {close!r}?"
    directory = os.path.dirname(path.rstrip("/"))
    if directory and not os.path.isdir(os.path.expanduser(directory)):
        return f", nor does {directory + '/'!r}{fallback}"
    return fallback


def check_model_name(name: str, tiny_architectures: tuple[str, ...]) -> str | None:
    """The problem with ``model.name`` (without its key), or None. A hub-shaped name is allowed through."""
    if name.startswith(TINY_PREFIX):
        arch = name[len(TINY_PREFIX) :] or "llama"
        if arch in tiny_architectures:
            return None
        close = difflib.get_close_matches(arch, tiny_architectures, n=1, cutoff=0.5)
        hint = f"; did you mean `{TINY_PREFIX}{close[0]}`?" if close else ""
        return f"no tiny model {arch!r}{hint} (known: {', '.join(TINY_PREFIX + a for a in tiny_architectures)})"
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"{name!r} is a directory but has no config.json, so it is not a model; expected {MODEL_NAME_FORMS}"
        return None
    if os.path.exists(path):
        return f"{name!r} is a file; expected {MODEL_NAME_FORMS}"
    reason = why_not_hub(name)
    if reason is None:
        return None
    return (
        f"{name!r} does not exist{_did_you_mean_path(name)}. It is read as a local path because {reason}. "
        f"Expected {MODEL_NAME_FORMS}"
    )


def check_data_source(source: str) -> str | None:
    """The problem with a ``data.path`` / ``data.eval_path`` value (without its key), or None."""
    if source.startswith(BUILTIN_PREFIX):
        name, _, arg = source[len(BUILTIN_PREFIX) :].partition(":")
        if name in BUILTIN_DATASETS and (not arg or arg.isdigit()):
            return None
        close = difflib.get_close_matches(name, BUILTIN_DATASETS, n=1, cutoff=0.6)
        hint = f"; did you mean `{BUILTIN_PREFIX}{close[0]}`?" if close else ""
        return (
            f"unknown built-in dataset {source!r}{hint} (built-ins: "
            f"{', '.join(BUILTIN_PREFIX + b for b in BUILTIN_DATASETS)}, optionally :N, the largest operand)"
        )
    accepted = f"Accepted: {ACCEPTED_DATA_FILES} files, or a datasets hub name such as 'trl-lib/Capybara'"
    path = os.path.expanduser(source)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        return f"{source!r} is a directory; point at one data file. {accepted}"
    if os.path.isfile(path):
        if ext in LOCAL_DATA_BUILDERS:
            return None
        what = f"unsupported file type {ext!r}" if ext else "has no file extension, so its format is unknown"
        return f"{source!r}: {what}{_did_you_mean_ext(ext)}. {accepted}"
    reason = why_not_hub(source)
    if ext in LOCAL_DATA_BUILDERS or reason is not None or _did_you_mean_ext(ext):
        # A datasets hub name never ends in a data-file extension, nor in a misspelt one.
        return f"{source!r} does not exist{_did_you_mean_path(source, _did_you_mean_ext(ext))}. {accepted}"
    return None


def _did_you_mean_ext(ext: str) -> str:
    if not ext or ext in LOCAL_DATA_BUILDERS:
        return ""
    close = difflib.get_close_matches(ext, list(LOCAL_DATA_BUILDERS), n=1, cutoff=0.7)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_chat_template(template: str) -> str | None:
    """A ``data.chat_template`` is a Jinja template string or the path of a file holding one."""
    if os.path.isfile(os.path.expanduser(template)):
        return None
    if template.endswith((".jinja", ".j2")) or ("{{" not in template and "{%" not in template):
        return (
            f"{template!r} does not exist{_did_you_mean_path(template)}; expected a Jinja template string "
            "(with {{ }} or {% %}) or the path of a .jinja file"
        )
    return None

"""Where input comes from: filesystems (local paths or pyarrow URIs), the data files of a format under a
path, and the Hive ``day=YYYY-MM-DD`` partition each file sits in.  :class:`InputError` is what every
reader raises when the input cannot be read at all."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import pyarrow.fs as pafs

FORMATS = ("parquet", "csv", "movielens", "retailrocket", "kuairand")
_EXTENSIONS = {
    "parquet": (".parquet", ".parq", ".pq"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "movielens": (".dat", ".dat.gz"),
    "retailrocket": (".csv", ".csv.gz"),
    "kuairand": (".csv", ".csv.gz"),
}
_DAY_RE = re.compile(r"(?:^|/)(?:day|date|dt)=(\d{4}-\d{2}-\d{2})(?:/|$)")


class InputError(ValueError):
    """The input cannot be read at all: unreadable file, missing column, no files, no rows."""


# ---- filesystems -------------------------------------------------------------------------------------
def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI (``s3://b/k``, ``gs://...``, ``file:///...``)."""
    if not uri:
        raise InputError("empty path")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join_path(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


def display_path(fs: pafs.FileSystem, path: str) -> str:
    """A path a user can paste: plain for local files, ``scheme://`` otherwise."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


@dataclass
class InputFile:
    path: str  # path inside the filesystem
    display: str  # what error messages and the manifest show
    size: int
    partition_day: Optional[str] = None  # "YYYY-MM-DD" from a Hive partition in the path


def partition_day(path: str) -> Optional[str]:
    m = None
    for m in _DAY_RE.finditer(path):
        pass
    return m.group(1) if m else None


def list_input_files(uri: str, fmt: str) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Every data file of ``fmt`` under ``uri`` (a file or a directory), in a stable order."""
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; choose from {list(FORMATS)}")
    fs, root = resolve_filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                 if i.type == pafs.FileType.File and not _hidden(i.path[len(root):])
                 and i.path.lower().endswith(_EXTENSIONS[fmt])]
        if not infos:
            raise InputError(f"input is empty: no {fmt} files ({', '.join(_EXTENSIONS[fmt])}) under {uri}")
    infos.sort(key=lambda i: i.path)
    return fs, [InputFile(i.path, display_path(fs, i.path), int(i.size or 0), partition_day(i.path))
                for i in infos]


def _hidden(rel: str) -> bool:
    return any(p.startswith((".", "_")) for p in rel.strip("/").split("/") if p and "=" not in p)

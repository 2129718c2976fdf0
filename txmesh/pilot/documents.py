"""
The pilot's Istio documents: the C{*.yaml}/C{*.yml} files of a directory,
read in name order, optionally with changes an operator proposes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml

from txmesh.config.errors import ConfigError

Document = tuple[str, int, Any]
"""C{(file, number in the file from 1, parsed document)}."""


def istio_files(directory: str) -> list[str]:
    """
    @return: the names (not paths) of the document files of C{directory},
        sorted; dot files (editors' and the operator API's temporaries) are
        skipped.
    """
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if n.endswith((".yaml", ".yml")) and not n.startswith("."))


def parse_documents(source: str, content: bytes | str) -> list[Document]:
    """
    @return: the non-empty documents of C{content}.
    @raise ConfigError: C{content} is not valid YAML.
    """
    try:
        docs = list(yaml.safe_load_all(content))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from None
    return [(source, i, d) for i, d in enumerate(docs, start=1) if d is not None]


def load_istio_documents(directory: str, changes: Mapping[str, bytes | None] | None = None) -> list[Document]:
    """
    Read every document file of C{directory}, in name order.

    @param changes: file name to the content to read instead of the file's,
        or C{None} to leave the file out; a name in angle brackets (such as
        C{<request>}) adds documents after the directory's.
    @return: C{(file, number, document)} for each non-empty document.
    @raise ConfigError: a file cannot be read or is not valid YAML.
    """
    changes = changes or {}
    names = set(istio_files(directory)) | set(changes)
    documents: list[Document] = []
    for name in sorted(names, key=lambda n: (n.startswith("<"), n)):
        path = name if name.startswith("<") else os.path.join(directory, name)
        if name in changes:
            content = changes[name]
            if content is None:
                continue
        else:
            try:
                with open(path, "rb") as f:
                    content = f.read()
            except OSError as e:
                raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
        documents += parse_documents(path, content)
    return documents

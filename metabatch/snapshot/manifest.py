"""The snapshot's ``manifest.json``: what was exported, when, from where
(without passwords), with which versions, and the files of each part."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .. import __version__
from ..pipeline.embed import JOINT_TYPE
from ..errors import MetabatchError
from ..urls import DatabaseURL

SCHEMA_VERSION = 1
FORMAT = "metabatch-snapshot"
MANIFEST = "manifest.json"


def describe_url(url: DatabaseURL) -> str:
    """A URL fit for the manifest: no password, no query string (which may hold one)."""
    if url.scheme == "duckdb":
        return "duckdb://" + str(Path(url.duckdb_path).resolve())
    parts = urlsplit(url.raw)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, user + host, parts.path, "", ""))


def make_manifest(
    historical: DatabaseURL,
    runtime: DatabaseURL,
    selection: dict,
    embeddings: dict,
    runs: dict,
    seconds: float,
    models: dict | None = None,
) -> dict:
    """The manifest of a snapshot: ``selection`` (model_id, strategy_ids, start,
    end as JSON values), the ``embeddings`` and ``runs`` sections their writers
    return, and the export's seconds."""
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "metabatch_version": __version__,
        "snapshot_id": uuid.uuid4().hex,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": {"historical": describe_url(historical), "runtime": describe_url(runtime)},
        "selection": {"joint_type": JOINT_TYPE, **selection},
        "embeddings": embeddings,
        "runs": runs,
        "models": models or {},
        "export_seconds": round(seconds, 3),
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the snapshot at ``path`` (MetabatchError when it is not one)."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise MetabatchError(
            f"`{folder}` is not a metabatch snapshot (no {MANIFEST})",
            "write one with `metabatch export-parquet --out DIR`",
        ) from None
    except (OSError, ValueError) as exc:
        raise MetabatchError(f"cannot read the manifest of `{folder}`: {exc}", "export the snapshot again") from None
    if manifest.get("format") != FORMAT:
        raise MetabatchError(f"`{folder}` is not a metabatch snapshot", "export it again with `metabatch export-parquet`")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise MetabatchError(
            f"snapshot `{folder}` has schema version {manifest.get('schema_version')}, this metabatch reads {SCHEMA_VERSION}",
            "export it again with this version of metabatch",
        )
    return manifest

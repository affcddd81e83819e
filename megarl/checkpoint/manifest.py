"""A checkpoint's manifest: every file's relative path, size and CRC-32, written last at commit.

    MANIFEST.json = {"format": "megarl-checkpoint-manifest", "version": 1, "checksum": "crc32",
                     "step": 10, "total_bytes": 123456,
                     "files": {"megatron/.metadata": {"size": 4312, "crc32": "9a0b1c2d"}, ...}}

CRC-32 (zlib, standard library) over the bytes is enough to catch what shared file systems do to
checkpoints — a missing file, a partial copy, a flipped block — and runs at memory bandwidth; it is
not a defence against deliberate tampering. zlib releases the GIL on large buffers, so files are
hashed on a few threads at once (a real checkpoint has one or more files per rank).
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = "megarl-checkpoint-manifest"
MANIFEST_VERSION = 1
CHUNK_BYTES = 8 << 20
MAX_THREADS = 8


class ManifestError(ValueError):
    """The manifest itself is unreadable or malformed."""


def file_crc32(path: str) -> tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of a file, read in 8 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def list_files(folder: str) -> list[str]:
    """Every regular file under `folder` as a '/'-separated relative path (the manifest excluded), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            if rel != MANIFEST_FILE:
                found.append(rel)
    return sorted(found)


def _checksums(folder: str, rel_paths: list[str]) -> dict[str, tuple[int, str] | OSError]:
    def one(rel):
        try:
            return file_crc32(os.path.join(folder, rel))
        except OSError as err:
            return err

    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(rel_paths)))
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(rel_paths, pool.map(one, rel_paths)))


def build_manifest(folder: str, step: int) -> dict:
    """The manifest of everything now in `folder`."""
    files = {}
    for rel, result in _checksums(folder, list_files(folder)).items():
        if isinstance(result, OSError):
            raise result
        files[rel] = {"size": result[0], "crc32": result[1]}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "checksum": "crc32", "step": step,
            "total_bytes": sum(entry["size"] for entry in files.values()), "files": files}


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{MANIFEST_FILE} is not valid JSON ({err}): it was cut short or overwritten") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{MANIFEST_FILE} is not a megarl checkpoint manifest")
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("checksum") != "crc32":
        raise ManifestError(f"{MANIFEST_FILE} has version {manifest.get('version')} / checksum "
                            f"{manifest.get('checksum')!r}; this megarl reads version {MANIFEST_VERSION} / crc32")
    return manifest


def check_files(folder: str, manifest: dict, checksums: bool = True) -> list[str]:
    """One line per file that is missing, of the wrong size, or (with checksums) whose bytes differ;
    [] when all match. Files present but not in the manifest are not errors (a user's notes beside
    the weights)."""
    listed = manifest["files"]
    present = [rel for rel in listed if os.path.isfile(os.path.join(folder, rel))]
    problems = [f"{rel}: missing" for rel in listed if rel not in set(present)]
    sized = []
    for rel in present:
        size, expected = os.path.getsize(os.path.join(folder, rel)), listed[rel]["size"]
        if size != expected:
            problems.append(f"{rel}: {size} bytes, the manifest says {expected} (truncated or partly copied)"
                            if size < expected else f"{rel}: {size} bytes, the manifest says {expected}")
        else:
            sized.append(rel)
    for rel, result in (_checksums(folder, sized) if checksums else {}).items():
        if isinstance(result, OSError):
            problems.append(f"{rel}: unreadable ({result})")
        elif result[1] != listed[rel]["crc32"]:
            problems.append(f"{rel}: contents differ from the manifest (crc32 {result[1]}, expected "
                            f"{listed[rel]['crc32']})")
    return sorted(problems)

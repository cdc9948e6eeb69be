"""Every fuzz harness by name, loaded on demand.

Loading is lazy so that the runner can import a harness (and with it the
code under test) inside atheris's instrumentation; nothing here imports the
code under test.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .harness import Harness

CORPUS = Path(__file__).resolve().parent / "corpus"

#: name -> "module:attribute" inside tests.fuzz
HARNESSES: dict[str, str] = {
    "vhost_codec": "vhost_user:CODEC",
    "vhost_session": "vhost_user:SESSION",
    "admission": "vhost_user:ADMISSION",
    "virtio_chain": "virtio:CHAIN",
    "virtio_scsi": "scsi:VIRTIO_SCSI",
    "scsi_cdb": "scsi:CDB",
    "statestore": "statestore:STATESTORE",
    "control": "control:CONTROL",
    "qmp": "qmp:QMP",
    "spec": "spec:SPEC",
    "mpqemu": "mpqemu:MPQEMU",
}


def load(name: str) -> Harness:
    """The harness called `name` (KeyError for an unknown one)."""
    module, attribute = HARNESSES[name].split(":")
    harness = getattr(importlib.import_module(f"{__package__}.{module}"), attribute)
    assert isinstance(harness, Harness) and harness.name == name, name
    return harness


def corpus_dir(name: str) -> Path:
    return CORPUS / name

"""The lsi slot's reading of the remote's PCI view: where the controller's
registers are once the relay's replay has mapped them, and nothing before."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from launcher.lsi import slot


def remote_with(devices: list[dict[str, Any]]) -> Any:
    async def execute(command: str, args: Any = None) -> Any:
        assert command == "query-pci"
        return [{"bus": 0, "devices": devices}]
    return SimpleNamespace(qmp=SimpleNamespace(execute=execute))


def lsi(regions: list[dict[str, Any]], vendor: int = 0x1000) -> dict[str, Any]:
    return {"id": {"vendor": vendor, "device": 0x12}, "regions": regions}


@pytest.mark.parametrize(("devices", "port"), [
    ([lsi([{"bar": 0, "type": "io", "address": 0xC000, "size": 256},
           {"bar": 1, "type": "memory", "address": 0xFEBF1000, "size": 1024}])], 0xC000),
    ([lsi([{"bar": 0, "type": "io", "address": 0xFFFFFFFFFFFFFFFF, "size": 256}])], None),
    ([lsi([{"bar": 0, "type": "io", "address": 0, "size": 256}])], None),
    ([lsi([{"bar": 1, "type": "memory", "address": 0xFEBF1000, "size": 1024}])], None),
    ([lsi([{"bar": 0, "type": "io", "address": 0xC000, "size": 256}], vendor=0x8086)], None),
    ([], None),
])
def test_io_bar_only_once_mapped(devices: list[dict[str, Any]], port: int | None) -> None:
    assert asyncio.run(slot._io_bar(remote_with(devices))) == port


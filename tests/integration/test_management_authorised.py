"""disk-add and disk-resize through the real management server and the real
VM control: only images under [vm] image_dirs, never through a final
symlink, and block devices only if [vm] devices lists them; each refusal is
a QMP error naming the rule, and nothing reaches the emulator."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from launcher.management.server import EventBus, ManagementServer
from launcher.spec import DiskSpec
from launcher.vmcontrol import SupervisorControl

pytestmark = pytest.mark.timeout(30)
MIB = 1 << 20


class FakeSlot:
    """The slot's side of a disk change: records what reached it."""

    id = "e0"

    def __init__(self, d0: DiskSpec) -> None:
        self.disks: dict[str, list[DiskSpec]] = {"c0": [d0]}
        self.disk_fds = {"d0": os.open(d0.image, os.O_RDWR | os.O_CLOEXEC)}
        self.added: list[tuple[DiskSpec, Path]] = []
        self.resized: list[int] = []

    def disk(self, disk_id: str) -> DiskSpec | None:
        return next((d for d in self.disks["c0"] if d.id == disk_id), None)

    def disk_changes_refused(self, what: str) -> str | None:
        return None  # a scsi emulator's slot: every disk change may be tried

    async def add_disk(self, disk: DiskSpec, opened: int | None = None) -> None:
        assert opened is not None
        self.added.append((disk, Path(os.readlink(f"/proc/self/fd/{opened}"))))
        self.disks["c0"].append(disk)

    async def resize_disk(self, disk: DiskSpec, size: int) -> int:
        self.resized.append(size)
        return MIB


def image(path: Path, size: int = MIB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@asynccontextmanager
async def managed(tmp_path: Path, pool: Path, devices: tuple[Path, ...] = ()
                  ) -> AsyncIterator[tuple[QMPClient, FakeSlot]]:
    d0 = DiskSpec("d0", "c0", 0, image(pool / "d0.img"), "raw", False, 512)
    slot = FakeSlot(d0)
    vm = SimpleNamespace(image_dirs=(pool.resolve(),), devices=devices)
    supervisor = SimpleNamespace(slots=[slot], spec=SimpleNamespace(vm=vm),
                                 emit=lambda name, data: None,
                                 incoming_pending=False, migration=None)  # none under way
    bus = EventBus()
    server = ManagementServer(tmp_path / "mplaunch.sock",
                              SupervisorControl(supervisor),  # type: ignore[arg-type]
                              bus)
    await server.start()
    client = QMPClient("test")
    await client.connect(str(server.path))
    try:
        yield client, slot
    finally:
        await client.disconnect()
        await server.close()
        os.close(slot.disk_fds["d0"])


async def refused(client: QMPClient, name: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(ExecuteError) as info:
        await client.execute(name, arguments)
    assert info.value.error_class == "GenericError"
    return str(info.value)


def add(image: Path | str, lun: int = 1) -> dict[str, Any]:
    return {"id": f"d{lun}", "controller": "c0", "lun": lun, "image": str(image)}


def test_disk_add_is_refused_outside_image_dirs(tmp_path: Path) -> None:
    pool, outside = tmp_path / "pool", tmp_path / "outside"
    pool.mkdir()
    outside.mkdir()
    secret = image(outside / "secret.img")
    (pool / "link.img").symlink_to(secret)
    (pool / "escape").symlink_to(outside, target_is_directory=True)
    (outside / "tty").symlink_to("/dev/null")

    async def main() -> None:
        async with managed(tmp_path, pool) as (client, slot):
            desc = await refused(client, "disk-add", add(secret))
            assert "outside the folders [vm] image_dirs allows" in desc
            assert desc.endswith("(rule: image_dirs)"), desc
            desc = await refused(client, "disk-add", add(pool / "link.img"))
            assert desc.endswith("is a symlink; name the image itself (a symlink is never "
                                 "followed) (rule: no-symlink)"), desc
            # A symlinked folder on the way: the real path is what counts.
            desc = await refused(client, "disk-add", add(pool / "escape" / "secret.img"))
            assert f"is {secret}, outside" in desc and "(rule: image_dirs)" in desc
            desc = await refused(client, "disk-add", add("/dev/null"))
            assert desc.endswith("is not a regular file or a block device (rule: file-type)")
            desc = await refused(client, "disk-add", add("/etc/shadow"))
            assert "(rule: image_dirs)" in desc
            assert slot.added == []
            # What the pool holds is accepted, and the fd handed on is that file.
            inside = image(pool / "new.img")
            assert await client.execute("disk-add", add(inside)) == {}
            assert [(d.image, real) for d, real in slot.added] == [(inside, inside)]

    asyncio.run(main())


def test_a_device_node_is_refused_unless_listed(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    node = pool / "loop-like"
    try:  # a block device node inside the pool: its folder allows it, devices does not
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 250))
    except OSError as e:
        pytest.skip(f"cannot make a device node here: {e}")

    async def main() -> None:
        async with managed(tmp_path, pool) as (client, slot):
            desc = await refused(client, "disk-add", add(node))
            assert desc.endswith("which [vm] devices does not list (rule: devices)"), desc
            assert slot.added == []
        async with managed(tmp_path, pool, devices=(node,)) as (client, slot):
            # Listed: the rule passes (opening a loop device with no backing file
            # may still fail, with the kernel's reason, never with a rule's).
            try:
                await client.execute("disk-add", add(node))
            except ExecuteError as e:
                assert "rule:" not in str(e), str(e)

    asyncio.run(main())


def test_disk_resize_is_refused_for_a_disk_outside_image_dirs(tmp_path: Path) -> None:
    pool, other = tmp_path / "pool", tmp_path / "other"
    pool.mkdir()
    other.mkdir()

    async def main() -> None:
        async with managed(tmp_path, pool) as (client, slot):
            assert await client.execute("disk-resize", {"id": "d0", "size": "2M"}) == {}
            assert slot.resized == [2 * MIB]
        async with managed(tmp_path, pool) as (client, slot):
            # The held file moved out of the pool since it was opened.
            (pool / "d0.img").rename(other / "d0.img")
            desc = await refused(client, "disk-resize", {"id": "d0", "size": "2M"})
            assert "(rule: image_dirs)" in desc and str(other / "d0.img") in desc
            assert slot.resized == []

    asyncio.run(main())

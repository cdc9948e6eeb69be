"""The chaos suite's own parts, without a VM: phases, ledgers, the plan."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.chaos import guest
from tests.chaos.driver import Phase, phase_of
from tests.chaos.test_chaos import EVENTS, quotas


def test_phase_follows_the_console_through_a_reboot() -> None:
    assert phase_of("") == (1, Phase.FIRMWARE)
    text = "SeaBIOS\nMPL BOOT kernel=x\n"
    assert phase_of(text) == (1, Phase.PROBE)
    text += "MPL DISK name=sda size=1 ro=0\nMPL IO name=sda round=1 ok=8 bad=0\n"
    assert phase_of(text) == (1, Phase.IO)
    text += "MPL KLOG x\nMPL DONE workload=shell rc=0\n"
    assert phase_of(text) == (1, Phase.REBOOT)
    text += "MPL BOOT kernel=x\n"
    assert phase_of(text) == (2, Phase.PROBE)
    assert phase_of(text + "MPL DISK name=sda size=1 ro=0\n") == (2, Phase.IO)


def test_the_plan_spends_every_event_in_guest_order() -> None:
    plan = quotas()
    assert sum(n for _, _, n in plan) == EVENTS
    order = [Phase.FIRMWARE, Phase.PROBE, Phase.IO, Phase.REBOOT]
    keys = [(boot, order.index(phase)) for boot, phase, _ in plan]
    assert keys == sorted(keys)
    assert any(p is Phase.PROBE and n > 0 for _, p, n in plan)
    assert any(p is Phase.REBOOT and n > 0 for _, p, n in plan)


def test_the_last_write_wins_and_a_changed_block_is_found(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    blocks = [bytes([i]) * guest.BLOCK for i in range(4)]
    image.write_bytes(b"".join(blocks))
    md5 = [hashlib.md5(b).hexdigest() for b in blocks]
    console = (f"MPL LEDGER size=16 off=1 md5={md5[0]}\n"  # first boot, overwritten later
               f"MPL LEDGER size=16 off=2 md5={md5[2]}\n"
               "MPL BOOT kernel=x\n"
               f"MPL LEDGER size=16 off=1 md5={md5[1]}\n")
    entries = guest.ledger(console)
    assert entries == {(16, 1): md5[1], (16, 2): md5[2]}
    assert guest.compare_images(entries, [(16, image)]) == []
    with open(image, "r+b") as f:
        f.seek(2 * guest.BLOCK)
        f.write(b"\xff")
    bad = guest.compare_images(entries, [(16, image)])
    assert [(m.disk_size, m.block, m.want) for m in bad] == [(16, 2, md5[2])]
    assert guest.compare_images({(99, 0): md5[0]}, [(16, image)])[0].got.startswith("no image")


def test_the_script_fits_its_disk_and_the_loader_the_command_line(tmp_path: Path) -> None:
    text = guest.script(20, 8, 2, 16 * 1024 * 1024, 5)
    assert "@" not in text
    guest.script_image(tmp_path / "s.img", text)
    data = (tmp_path / "s.img").read_bytes()
    assert len(data) == guest.SCRIPT_DISK_SIZE and data.rstrip(b"\0").decode() == text
    assert len(guest.loader()) < 300

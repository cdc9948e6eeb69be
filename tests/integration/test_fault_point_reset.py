"""The one fault point a real guest cannot reach through QEMU: a device reset
(RESET_OWNER), which QEMU's vhost-user-scsi does not send when the guest
resets. Here the test plays the front-end (tests/support/recovery_rig.py):
the emulator is killed at ``device.reset``, the successor gets the replay
and the reset again, and the rings set up anew serve requests."""

from __future__ import annotations

from pathlib import Path

from emulators.vhost_user.constants import Request
from tests.integration.test_emulator_recovery import Q, do_io, spec
from tests.support.driver import TestDriver
from tests.support.recovery_rig import RecoveryRig, request_or_death


def test_kill_at_device_reset_then_fresh_rings_serve(tmp_path: Path) -> None:
    rr = RecoveryRig.start(spec(tmp_path), tmp_path, fault="device.reset@1")
    try:
        do_io(rr, Q, 3)
        assert request_or_death(rr.frontend, Request.RESET_OWNER, None) is None \
            or not rr.alive()
        assert rr.died_of_fault(), rr.stderr()
        assert "mplaunch-fault: point device.reset reached" in rr.stderr()
        rr.restart()
        assert rr.alive(), rr.stderr()
        # After a reset the driver sets its rings up anew and QEMU starts them
        # at base 0: the successor must start them fresh, not resume.
        for index in range(rr.rig.num_rings):
            old = rr.rig.drivers[index]
            rr.rig.drivers[index] = TestDriver(
                rr.rig.memory, old.size, old.layout.desc_gpa, data_end=old.data_end
            )
        rr.rig.start()
        do_io(rr, Q, 2, first_lba=40)
        assert rr.alive()
    finally:
        status, text = rr.close()
    assert "Traceback" not in text

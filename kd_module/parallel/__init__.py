"""Process groups and devices: :mod:`.runtime` (initialize / destroy, the CPU bridge, device
choice), :mod:`.collectives` (barrier, gather, free port) and :mod:`.timing` (a clock that waits
for the device)."""

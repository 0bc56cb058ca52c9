"""Adapters for upstream internals: every private Lightning, ModelOpt and megatron-core name we use.

One module per upstream (:mod:`.lightning`, :mod:`.modelopt`, :mod:`.megatron`). Each function
names the workaround it is, the upstream release it was written against, the private thing it
touches and why nothing public does the job. ``tests/kd_module/test_upstream.py`` checks each one
against the installed release, so an upgrade that moves a private name fails there, by name,
instead of somewhere in a fit.

Importing these modules is cheap: they import no upstream package at module level.
"""

from __future__ import annotations

LIGHTNING_VERSION = "2.6.6"
"""The Lightning release :mod:`.lightning` was written against (pinned in pyproject.toml)."""
MODELOPT_VERSION = "0.47.0"
"""The nvidia-modelopt release :mod:`.modelopt` was written against."""
MEGATRON_CORE_VERSION = "0.16.1"
"""The megatron-core release :mod:`.megatron` was written against."""

"""The app settles its heap after startup (core/gc_tuning.py): what startup built is moved out
of the cyclic collector's way, and handed back at shutdown so that an app torn down inside a
longer-lived process is freed."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from llm_api.core.gc_tuning import GEN0_THRESHOLD
from tests.conftest import running_app
from tests.conftest import test_settings as make_settings

pytestmark = pytest.mark.model


async def test_startup_freezes_the_heap_and_shutdown_frees_the_app(tmp_path: Path) -> None:
    gc.unfreeze()  # whatever another app of this test session froze
    before = gc.get_threshold()
    try:
        async with running_app(make_settings(tmp_path)) as app:
            assert gc.get_freeze_count() > 10_000  # the app, its routes, models, pools
            assert gc.get_threshold()[0] == GEN0_THRESHOLD
            ref = weakref.ref(app)
            del app
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert ref() is None, "a frozen app would never be collected"
    finally:
        gc.set_threshold(*before)

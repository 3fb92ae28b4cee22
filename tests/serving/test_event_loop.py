"""The servers' event loop choice (serving/event_loop.py)."""

import asyncio

import pytest

from serving import event_loop
from serving.server import ServeOptions


def test_auto_takes_uvloop_where_installed():
    uvloop = pytest.importorskip("uvloop")  # a dependency on Linux: present in CI
    assert event_loop.loop_factory("auto") is uvloop.new_event_loop
    assert event_loop.run(_loop_type()) is uvloop.Loop


def test_asyncio_is_the_stock_loop():
    assert event_loop.loop_factory("asyncio") is asyncio.new_event_loop
    assert issubclass(event_loop.run(_loop_type(), "asyncio"), asyncio.BaseEventLoop)
    assert not event_loop.run(_loop_type(), "asyncio").__module__.startswith("uvloop")


def test_unknown_loop_rejected_naming_the_flag():
    with pytest.raises(ValueError, match=r"--loop.*auto, asyncio, uvloop.*'tokio'"):
        ServeOptions(port=0, loop="tokio")


async def _loop_type():
    return type(asyncio.get_running_loop())

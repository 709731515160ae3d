"""Server-assigned ids: the form the window packs into 16 bytes, unique, and a fresh key after a fork."""

from __future__ import annotations

import os

from app import ids
from app.windows import _HEX_ID  # the ids the packed window stores as 16 bytes


def test_ids_are_32_lowercase_hex_and_unique() -> None:
    got = [ids.new_id() for _ in range(20_000)]
    assert all(_HEX_ID.fullmatch(i) for i in got)
    assert len(set(got)) == len(got)


def test_a_forked_child_draws_its_own_key() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its first id, as the parent's would be without the re-seed
        os.close(read)
        os.write(write, ids.new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent_next = [ids.new_id() for _ in range(1000)]
    assert _HEX_ID.fullmatch(child)
    assert child not in parent_next

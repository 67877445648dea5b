"""agent.malloc: the arena cap is applied on glibc, skipped where it cannot be, and the environment wins."""

from __future__ import annotations

from agent import malloc


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    class _Mallopt:
        def __init__(self, calls: list[tuple[int, int]]) -> None:
            self.calls = calls
            self.argtypes: object = None
            self.restype: object = None

        def __call__(self, option: int, value: int) -> int:
            self.calls.append((option, value))
            return 1

    @property
    def mallopt(self) -> _Libc._Mallopt:
        return self._Mallopt(self.calls)


def test_the_cap_is_set_through_mallopt(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    libc = _Libc()
    assert malloc.limit_arenas(libc=libc) is True
    assert libc.calls == [(malloc.M_ARENA_MAX, malloc.ARENAS)]


def test_this_glibc_accepts_the_cap(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert malloc.limit_arenas() is True


def test_without_mallopt_nothing_happens(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert malloc.limit_arenas(libc=object()) is False


def test_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    libc = _Libc()
    assert malloc.limit_arenas(libc=libc) is False
    assert libc.calls == []

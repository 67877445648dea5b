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


class _TrimLibc:
    def __init__(self) -> None:
        self.calls: list[int] = []
        outer = self

        class _Trim:
            argtypes: object = None
            restype: object = None

            def __call__(self, pad: int) -> int:
                outer.calls.append(pad)
                return 1

        self.malloc_trim = _Trim()


def test_trims_after_a_tick_at_most_every_interval():
    now = [100.0]
    libc = _TrimLibc()
    trim = malloc.Trimmer(interval=30.0, libc=libc, clock=lambda: now[0])
    trim()
    now[0] += 10
    trim()
    assert libc.calls == [0]
    now[0] += 25
    trim()
    assert libc.calls == [0, 0]


def test_trimming_without_malloc_trim_is_a_no_op():
    trim = malloc.Trimmer(libc=object())
    trim()
    trim()


def test_this_glibc_trims():
    trim = malloc.Trimmer(interval=0.0)
    assert trim._trim is not None  # glibc here: the real malloc_trim is bound
    trim()

"""Errors meant for people: each names the file, key or row, what was expected and how to fix it."""

from __future__ import annotations

from collections.abc import Callable


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, or its type's name where it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def behind(exc: BaseException, test: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in `exc`'s chain that passes `test`: itself, or what it was raised from or
    while handling (the chain Python's traceback shows), as libraries raise their own errors over
    the one that matters (datasets and pyarrow over a full disk's OSError, datasets' process pool over
    a Ctrl-C)."""
    seen: set[int] = set()
    here: BaseException | None = exc
    while here is not None and id(here) not in seen:
        if test(here):
            return here
        seen.add(id(here))
        here = here.__cause__ or here.__context__
    return None


def interrupted(exc: BaseException) -> bool:
    """Whether `exc` is, or was raised over, a KeyboardInterrupt (Ctrl-C): a library's clean-up may
    raise its own error over it (datasets' process pool: multiprocess's TimeoutError)."""
    return behind(exc, lambda e: isinstance(e, KeyboardInterrupt)) is not None


class UserError(Exception):
    """A problem with the user's input (recipe, data, run directory). The CLI prints it without a
    traceback and exits with code 2."""

    exit_code = 2
    # raised alike by every rank of a launch (an outcome the ranks shared): the CLI prints it from rank
    # 0 alone, as one line rather than one per rank (`agreed`)
    everywhere = False


def agreed(exc: UserError) -> UserError:
    """`exc`, marked as raised alike by every rank (`UserError.everywhere`)."""
    exc.everywhere = True
    return exc


class RecipeError(UserError):
    """One or more problems in a recipe, collected so the user fixes them in one pass."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class DataError(UserError):
    """A problem with a data source or a row of it."""


class RunDirError(UserError):
    """The run directory holds something that this launch must not touch."""


class JobFailedError(UserError):
    """A submitted job that failed (`submit --wait`): said without the submitting process's traceback,
    with exit code 1 (the job, not the command line, went wrong)."""

    exit_code = 1

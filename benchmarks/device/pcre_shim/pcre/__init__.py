"""Stand-in for PyPcre on the GPU machine, used only by benchmarks/device/setup.sh.

GPTQModel imports `pcre` (PyPcre) for a handful of regular expressions. PyPcre has no
cp312 wheel on the package index and its sdist clones PCRE2 from GitHub at build time,
which the offline GPU machine cannot do. Every pattern GPTQModel compiles is also valid for
Python's `re`, so this module maps the five names it uses onto `re`.
"""
import enum
import re

Pattern = re.Pattern


class Flag(enum.IntFlag):
    CASELESS = re.IGNORECASE
    MULTILINE = re.MULTILINE
    DOTALL = re.DOTALL
    VERBOSE = re.VERBOSE


def compile(pattern, flags=0):  # noqa: A001 - mirrors PyPcre's API
    return re.compile(pattern, int(flags))


escape = re.escape


def split(pattern, string, maxsplit=0, flags=0):
    return re.split(pattern, string, maxsplit=maxsplit, flags=int(flags))


def match(pattern, string, flags=0):
    return re.match(pattern, string, int(flags))


def search(pattern, string, flags=0):
    return re.search(pattern, string, int(flags))


def sub(pattern, repl, string, count=0, flags=0):
    return re.sub(pattern, repl, string, count=count, flags=int(flags))

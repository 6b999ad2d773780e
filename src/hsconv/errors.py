"""Bad input: one error type, reported by the CLI as one line that names the culprit.

``hsconv <stage>: <what> (<culprit>): <how to fix>`` with exit status 2 (a traceback only under ``--debug``). The
culprit is what the user edits: a config key (``distill.exit_samples``), an option (``--batch-size``) or a file
position (``data.jsonl:12``). Every stage raises it before it writes anything, and outputs are renamed into place
only when complete (:func:`hsconv.io.atomic_path`), so a refused run leaves nothing a rerun would take for done.

Torch-free: the config check and the CLI's argument parsing import it before any model is loaded.
"""

from __future__ import annotations

import argparse
import re

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Input that cannot work. ``culprit`` and ``fix`` are optional for the older domain errors, whose message
    already names what is wrong (they subclass this)."""

    def __init__(self, what: str, culprit: str | None = None, fix: str | None = None):
        self.what, self.culprit, self.fix = what, culprit, fix
        message = what if culprit is None else f"{what} ({culprit})"
        super().__init__(f"{message}: {fix}" if fix else message)


# argparse types: each names the range it accepts, and argparse puts the option's name in front.

def integer(minimum: int | None = None, maximum: int | None = None, optional: bool = False):
    """An int within [minimum, maximum]; with ``optional``, ``none``/``null`` stand for None."""

    def parse(text: str):
        if optional and text in NULLS:
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer{_range(minimum, maximum)}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give an integer{_range(minimum, maximum)}")
        return value

    parse.__name__ = "integer"
    return parse


def real(low: float, high: float, open_low: bool = False, open_high: bool = False):
    """A float in [low, high] (open at either end where asked)."""
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number in {interval}") from None
        if not (value > low if open_low else value >= low) or not (value < high if open_high else value <= high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a number in {interval}")
        return value

    parse.__name__ = "real"
    return parse


NULLS = ("", "none", "None", "null")
# cpu, cuda, cuda:N, mps: what torch.device accepts for the hardware hsconv runs on.
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def device(text: str) -> str:
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda, cuda:N or mps")
    return text


def _range(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" ≥ {minimum}"
    return f" ≤ {maximum}" if maximum is not None else ""


def check_device_available(name: str, culprit: str = "--device") -> None:
    """Refuse a device this machine does not have, before a model is moved there (torch imported here)."""
    if not DEVICE_PATTERN.match(name):
        raise InputError(f"{name!r} is not a device", culprit, "give cpu, cuda, cuda:N or mps")
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise InputError(f"device {name!r} is not on this machine ({count} CUDA devices visible)", culprit,
                             "use cpu, or run where a GPU is visible")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' is not available on this machine", culprit, "use cpu")

"""Detach keys, as docker's `--detach-keys`: a sequence of bytes (ctrl-p
ctrl-q by default) that ends an attachment (`run -it`, `attach`) instead of
reaching the job, which runs on. Its bytes are held while they may still
become the sequence; when they do not, they are sent on, in order, with
what follows; when the sequence is complete we detach, and nothing of it,
nor anything typed after it, is sent.
"""

from __future__ import annotations

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"  # docker's: keys no shell or editor binds by default
# Letters, either case, and @[\]^_ (string.ascii_letters without the string
# module: the parser imports this one, so every command would pay for it).
_CTRL_KEYS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ@[\\]^_"
_PRINTABLE = {chr(code) for code in range(0x20, 0x7F)}


def parse_detach_keys(text: str) -> bytes:
    """The bytes of docker's `--detach-keys` format: comma-separated keys,
    each a printable ASCII character or `ctrl-X` with X a letter (either
    case) or one of @[\\]^_. '' is no detach keys (b''). ValueError names the
    first key that is neither."""
    if text == "":
        return b""
    codes = bytearray()
    for key in text.split(","):
        if len(key) == 1 and key in _PRINTABLE:
            codes.append(ord(key))
        elif len(key) == 6 and key[:5].lower() == "ctrl-" and key[5] in _CTRL_KEYS:
            codes.append(ord(key[5]) & 0x1F)  # 'p' and 'P' alike; '@' -> 0x00, '_' -> 0x1f
        else:
            raise ValueError(
                f"invalid detach key {key!r}: use a character or ctrl-<letter>,"
                f" comma-separated, e.g. {DEFAULT_DETACH_KEYS}"
            )
    return bytes(codes)


class DetachMatcher:
    """Finds the detach sequence in what a person types, fed in pieces.

    The result is the same however the input is cut: what `feed` forwards,
    in total, is the input up to the first whole sequence (which detaches),
    less the bytes still held because they may begin it (`pending`).
    """

    def __init__(self, keys: bytes) -> None:
        self.keys = bytes(keys)
        self._pending = b""

    @property
    def pending(self) -> bytes:
        """The bytes held: the end of the input so far that begins the sequence."""
        return self._pending

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(the bytes to send to the job, whether the sequence is complete).
        On True, nothing after the sequence is forwarded, and the matcher
        starts afresh."""
        if not self.keys:
            return bytes(data), False
        text = self._pending + data
        found = text.find(self.keys)
        if found >= 0:
            self._pending = b""
            return text[:found], True
        # Hold the longest end of the input that could begin the sequence: with
        # keys p,p,q and input p,p,p only the first p is surely not the start.
        for length in range(min(len(self.keys) - 1, len(text)), 0, -1):
            if text.endswith(self.keys[:length]):
                self._pending = text[-length:]
                return text[:-length], False
        self._pending = b""
        return text, False

"""What a new connection presents, read again from files when they change: the TLS context
(CA, client certificate and key) and the password (``password_file``).

Rotation without a restart: the transport asks these providers before every connect, so
once the files hold the new certificate or password, every reconnect uses them (a failover,
a restarted node, or the server closing the connections with ``CLIENT KILL``). Checking
costs a few ``stat()`` calls per connect; files are re-read only when their inode, size or
modification time changed (a Kubernetes secret swaps a symlink: a new inode).

A file caught half-written (a certificate whose new key is not there yet) does not break
anything: the last context or password that loaded keeps being used, and the next connect
tries again. Write new files with an atomic rename all the same.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ._errors import InvalidArgument
from ._settings import EngineSettings

__all__ = ["build_ssl_context", "password_provider", "ssl_provider"]

_T = TypeVar("_T")
_Signature = tuple[tuple[int, int, int] | None, ...]


def build_ssl_context(settings: EngineSettings) -> ssl.SSLContext | None:
    """The TLS context for a ``rediss://`` URL from the ``tls_*`` settings (None: plaintext).

    Raises:
        InvalidArgument: ``tls_*`` files without ``rediss://``, or files that do not load.
    """
    s = settings
    if not s.url.startswith("rediss://"):
        if s.tls_ca_file or s.tls_cert_file:
            raise InvalidArgument("tls_* settings need a rediss:// url")
        return None
    try:
        context = ssl.create_default_context(cafile=s.tls_ca_file)
        if s.tls_cert_file:
            context.load_cert_chain(s.tls_cert_file, s.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load the TLS files: {exc}") from exc
    context.check_hostname = s.tls_verify_hostname
    return context


class _Reloading(Generic[_T]):
    """A value loaded from files, loaded again when any of them changed on disk."""

    def __init__(self, paths: Sequence[str], load: Callable[[], _T]) -> None:
        self._paths = tuple(paths)
        self._load = load
        self._signature = self._stat()
        self._value = load()  # at open(): a file that does not load is the caller's error

    def _stat(self) -> _Signature:
        signature: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(signature)

    def __call__(self) -> _T:
        signature = self._stat()
        if signature != self._signature:
            try:
                self._value = self._load()
            except InvalidArgument:
                return self._value  # mid-rotation: keep the last good value, retry next time
            self._signature = signature
        return self._value


def ssl_provider(settings: EngineSettings) -> Callable[[], ssl.SSLContext | None] | None:
    """A provider of the TLS context, rebuilt when a ``tls_*`` file changes; None without
    TLS files to watch (the context then never changes).

    Raises:
        InvalidArgument: The files do not load now.
    """
    s = settings
    paths = [p for p in (s.tls_ca_file, s.tls_cert_file, s.tls_key_file) if p]
    if not paths or not s.url.startswith("rediss://"):
        return None
    return _Reloading(paths, lambda: build_ssl_context(s))


def _read_password(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(4097)
    except OSError as exc:
        raise InvalidArgument(f"cannot read password_file: {exc.strerror}") from None
    # Never echo the content: only what is wrong with it.
    if len(raw) > 4096:
        raise InvalidArgument("password_file is larger than 4 KiB")
    try:
        password = raw.decode().rstrip("\r\n")  # editors and `echo` add a newline
    except UnicodeDecodeError:
        raise InvalidArgument("password_file is not UTF-8") from None
    if not password or any(c in password for c in "\r\n\0"):
        raise InvalidArgument("password_file must hold one non-empty line")
    return password


def password_provider(settings: EngineSettings) -> Callable[[], str] | None:
    """A provider of the password in ``password_file``, read again when the file changes;
    None without ``password_file``.

    Raises:
        InvalidArgument: The file cannot be read now, or holds no usable password.
    """
    path = settings.password_file
    if path is None:
        return None
    return _Reloading([path], lambda: _read_password(path))

"""The job's syscall filter: libseccomp through ctypes, Docker's default list.

Every job (unless an admin asks for `unconfined`) runs under a seccomp
filter that refuses the system calls behind most local privilege
escalations and everything a container without CAP_SYS_ADMIN may not do:
Docker's default profile (moby, profiles/seccomp/default.json) is the
anchor. Refused calls fail with EPERM; clone3 and io_uring with ENOSYS,
which makes glibc and liburing fall back (to clone, to plain syscalls),
as Docker does. clone and unshare are refused only when they ask for a
new namespace (their flags argument), so fork and threads work. The
filter is for this architecture alone: a call of another ABI (x32 on
x86_64, i386) kills the process (libseccomp's bad-arch action).

init builds the filter while the sandbox is built ahead (`Filter()`:
libseccomp compiles the rules to a BPF program, ~1 ms, which is kept),
and installs the program last, after no_new_privs and the capability
drop, just before it spawns the command (`load`: one prctl): init and
the whole job tree run under it, the shim and corrald do not.

libseccomp rather than a BPF program of our own: it resolves syscall
numbers per architecture, orders the rules and handles the ABI check,
and it is on every Debian host (libseccomp2); the binding is ~60 lines.
"""

from __future__ import annotations

import ctypes
import errno
import os

from corral.shim import libc

# <seccomp.h>
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_BASE = 0x00050000
SCMP_CMP_MASKED_EQ = 7
NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)

# Refused with EPERM: Docker's default profile leaves these out for a
# container without CAP_SYS_ADMIN (and the other capabilities they need).
DENIED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
    "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp",
    "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "mount",
    "mount_setattr", "move_mount", "move_pages", "name_to_handle_at", "nfsservctl",
    "open_by_handle_at", "open_tree", "perf_event_open", "pivot_root",
    "process_vm_readv", "process_vm_writev", "query_module", "quotactl",
    "quotactl_fd", "reboot", "request_key", "set_mempolicy", "setns",
    "settimeofday", "stime", "swapoff", "swapon", "syslog", "sysfs", "_sysctl",
    "umount", "umount2", "uselib", "userfaultfd", "ustat", "vm86", "vm86old",
)  # fmt: skip
# Refused with ENOSYS, so that callers fall back to what is allowed.
MISSING = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")
# Refused with EPERM when argument 0 asks for a new namespace.
NO_NEW_NAMESPACES = ("clone", "unshare")


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _errno_action(error: int) -> int:
    return SCMP_ACT_ERRNO_BASE | (error & 0xFFFF)


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: a BPF program for PR_SET_SECCOMP."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_INSTRUCTION = 8  # bytes of one struct sock_filter


class Filter:
    """Docker's default filter, compiled (not installed) in this process.

    Raises OSError if libseccomp is missing or refuses a rule."""

    def __init__(self) -> None:
        try:
            self._lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError as exc:
            raise OSError(errno.ENOSYS, f"libseccomp is not installed: {exc}") from None
        lib = self._lib
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = (ctypes.c_uint32,)
        lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        lib.seccomp_rule_add_array.argtypes = (
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        )  # fmt: skip
        lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
        lib.seccomp_release.argtypes = (ctypes.c_void_p,)
        self._ctx: int | None = lib.seccomp_init(SCMP_ACT_ALLOW)
        if not self._ctx:
            raise OSError(errno.ENOMEM, "seccomp_init failed")
        for name in DENIED:
            self._refuse(name, errno.EPERM)
        for name in MISSING:
            self._refuse(name, errno.ENOSYS)
        flags = (_ArgCmp * 1)(_ArgCmp(0, SCMP_CMP_MASKED_EQ, NAMESPACE_FLAGS, 0))
        for name in NO_NEW_NAMESPACES:
            # One rule per flag: masked-equal to any namespace flag refuses.
            for bit in range(32):
                flag = 1 << bit
                if NAMESPACE_FLAGS & flag:
                    flags[0] = _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag)
                    self._refuse(name, errno.EPERM, flags)
        self._program: bytes | None = self._compile()

    def _compile(self) -> bytes:
        """The filter as the kernel takes it (libseccomp's export), and the
        rules freed."""
        fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
        try:
            result = self._lib.seccomp_export_bpf(self._ctx, fd)
            if result < 0:
                raise OSError(-result, f"seccomp_export_bpf: {errno.errorcode.get(-result)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            program = os.pread(fd, size, 0)
        finally:
            os.close(fd)
            self._lib.seccomp_release(self._ctx)
            self._ctx = None
        if not program or len(program) % BPF_INSTRUCTION:
            raise OSError(errno.EINVAL, f"libseccomp exported {len(program)} bytes of filter")
        return program

    def _refuse(self, name: str, error: int, args: ctypes.Array[_ArgCmp] | None = None) -> None:
        number = self._lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a call of this architecture
            return
        count = 0 if args is None else len(args)
        result = self._lib.seccomp_rule_add_array(
            self._ctx, _errno_action(error), number, count, args
        )
        if result < 0:
            raise OSError(-result, f"seccomp_rule_add({name}): {errno.errorcode.get(-result)}")

    def load(self) -> None:
        """Install the filter on this process (no_new_privs must be set);
        its children inherit it. OSError if the kernel refuses."""
        assert self._program is not None, "a filter is installed once"
        code = ctypes.create_string_buffer(self._program, len(self._program))
        program = _SockFprog(len(self._program) // BPF_INSTRUCTION, ctypes.addressof(code))
        libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(program))
        self.release()

    def release(self) -> None:
        """Drop the program (an unconfined job's, or once installed)."""
        self._program = None


__all__ = ["DENIED", "MISSING", "NO_NEW_NAMESPACES", "Filter"]
